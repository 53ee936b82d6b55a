//! AdamW with `torch.optim.AdamW` semantics and f32 state that can be saved, and torch's global-norm clipping, on
//! the fused ops of `kto_kernels::adamw`: one pass over every LoRA tensor per step, parameters and moments updated
//! in place, the clipping coefficient applied inside the step (the gradients are read once, never rewritten).
//!
//! One AdamW step for parameter `p` with gradient `g` at step `t` (torch's single-tensor implementation, the
//! operations in the same order and each rounded to f32 like torch's kernels; bit for bit the stock candle-op chain
//! of `kto_kernels::testing::stock_adamw`, which this module ran before):
//! ```text
//! g = g * clip_coefficient                   # clip_grad_norm_'s `mul_` (1 without clipping)
//! p = p * (1 - lr * weight_decay)            # decoupled weight decay, before the moments
//! m = lerp(m, g, 1 - beta1)                  # m + (1 - beta1) * (g - m)
//! v = v * beta2 + (1 - beta2) * g * g
//! step_size = lr / (1 - beta1^t)             # host f64
//! denom = sqrt(v) / sqrt(1 - beta2^t) + eps  # eps outside the sqrt of the bias-corrected v
//! p = p + (-step_size * m) / denom
//! ```

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use kto_kernels::adamw::{adamw_step, clip_coefficient, global_grad_norm, AdamWHyper};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter (f32, updated in place by each step).
#[derive(Debug)]
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named parameters. The state is created lazily at a parameter's first step, as torch does. Not
/// `Clone`: the steps write the moments in place, so a copy would share them.
#[derive(Debug)]
pub struct AdamW {
    settings: AdamWSettings,
    /// Optimizer steps taken (torch's per-parameter `step`; all parameters step together here).
    step: u64,
    moments: HashMap<String, Moments>,
}

impl AdamW {
    pub fn new(settings: AdamWSettings) -> Self {
        Self {
            settings,
            step: 0,
            moments: HashMap::new(),
        }
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`. Parameters without a gradient are
    /// left alone (torch skips `p.grad is None`).
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.step_scaled(params, grads, lr, 1.0)
    }

    /// [`AdamW::step`] on the gradients multiplied by `grad_scale` first: the clipping coefficient of
    /// [`measure_grad_norm`], so that clipping costs no pass of its own. One fused launch for all parameters.
    pub fn step_scaled(
        &mut self,
        params: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        self.step += 1;
        let mut stepped: Vec<(&String, &Var, Tensor)> = Vec::with_capacity(params.len());
        for (name, var) in params {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            ensure!(
                grad.dims() == var.dims(),
                "gradient of {name} has shape {:?}, the parameter {:?}",
                grad.dims(),
                var.dims()
            );
            if !self.moments.contains_key(name) {
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                self.moments.insert(
                    name.clone(),
                    Moments {
                        exp_avg: zeros()?,
                        exp_avg_sq: zeros()?,
                    },
                );
            }
            stepped.push((name, var, grad.to_dtype(DType::F32)?));
        }
        let vars: Vec<&Var> = stepped.iter().map(|(_, v, _)| *v).collect();
        let grads: Vec<&Tensor> = stepped.iter().map(|(_, _, g)| g).collect();
        let moments: Vec<&Moments> = stepped.iter().map(|(n, _, _)| &self.moments[*n]).collect();
        let exp_avg: Vec<&Tensor> = moments.iter().map(|m| &m.exp_avg).collect();
        let exp_avg_sq: Vec<&Tensor> = moments.iter().map(|m| &m.exp_avg_sq).collect();
        let AdamWSettings {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.settings;
        let hyper = AdamWHyper {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            step: self.step,
            grad_scale,
        };
        adamw_step(&vars, &grads, &exp_avg, &exp_avg_sq, &hyper)?;
        Ok(())
    }

    /// Writes the state as safetensors (`<name>.exp_avg`, `<name>.exp_avg_sq`, and the step count), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, m) in &self.moments {
            tensors.insert(
                format!("{name}.exp_avg"),
                m.exp_avg.to_device(&Device::Cpu)?,
            );
            tensors.insert(
                format!("{name}.exp_avg_sq"),
                m.exp_avg_sq.to_device(&Device::Cpu)?,
            );
        }
        tensors.insert(
            STEP_KEY.to_string(),
            Tensor::new(&[self.step as i64], &Device::Cpu)?,
        );
        let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
        kto_model::files::write_safetensors(path, &tensors, None)
    }

    /// Reads a state written by [`AdamW::save`]; every parameter must have its moments with matching shapes.
    pub fn load(path: &Path, settings: AdamWSettings, params: &[(String, Var)]) -> Result<Self> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        let step = match tensors.remove(STEP_KEY) {
            Some(t) => t.to_vec1::<i64>()?.first().copied().unwrap_or(0),
            None => bail!(
                "{}: no `{STEP_KEY}` tensor: not an optimizer state written by kto",
                path.display()
            ),
        };
        let mut moments = HashMap::new();
        for (name, var) in params {
            let device = var.device();
            let mut take = |suffix: &str| -> Result<Option<Tensor>> {
                let key = format!("{name}.{suffix}");
                match tensors.remove(&key) {
                    None => Ok(None),
                    Some(t) => {
                        ensure!(
                            t.dims() == var.dims(),
                            "{}: tensor {key} has shape {:?}, the parameter {:?}",
                            path.display(),
                            t.dims(),
                            var.dims()
                        );
                        Ok(Some(t.to_device(device)?))
                    }
                }
            };
            match (take("exp_avg")?, take("exp_avg_sq")?) {
                (Some(exp_avg), Some(exp_avg_sq)) => {
                    moments.insert(
                        name.clone(),
                        Moments {
                            exp_avg,
                            exp_avg_sq,
                        },
                    );
                }
                (None, None) if step == 0 => {}
                _ => bail!(
                    "{}: missing the moments of parameter {name}",
                    path.display()
                ),
            }
        }
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "{}: tensor {extra} matches no trainable parameter",
                path.display()
            );
        }
        Ok(Self {
            settings,
            step: step as u64,
            moments,
        })
    }
}

const STEP_KEY: &str = "__step__";

/// What `torch.nn.utils.clip_grad_norm_` measures: the 2-norm over all gradients before clipping, and the
/// coefficient `min(max_norm / (norm + 1e-6), 1)` it multiplies every gradient by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clipping {
    pub norm: f32,
    pub coefficient: f32,
}

/// The global gradient norm (the norm of the per-tensor norms, combined in f32 in name order; each tensor's sum of
/// squares in f64, as torch reduces pairwise) and the clipping coefficient, in one pass over the gradients.
/// `max_norm = f64::INFINITY` only measures (transformers' `max_grad_norm <= 0` path multiplies by 1).
pub fn measure_grad_norm(grads: &HashMap<String, Tensor>, max_norm: f64) -> Result<Clipping> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let grads: Vec<Tensor> = names
        .iter()
        .map(|n| grads[*n].to_dtype(DType::F32))
        .collect::<candle_core::Result<_>>()?;
    let norm = global_grad_norm(&grads.iter().collect::<Vec<_>>())?;
    Ok(Clipping {
        norm,
        coefficient: clip_coefficient(norm, max_norm),
    })
}

/// The gradients as clipping leaves them: each multiplied by `coefficient` (rounded as torch's `mul_` rounds).
pub fn scale_grads(
    grads: &HashMap<String, Tensor>,
    coefficient: f32,
) -> Result<HashMap<String, Tensor>> {
    grads
        .iter()
        .map(|(name, g)| Ok((name.clone(), g.affine(coefficient as f64, 0.0)?)))
        .collect()
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: [`measure_grad_norm`], then every gradient times the
/// coefficient. Returns the norm before clipping. (The training loop hands the coefficient to
/// [`AdamW::step_scaled`] instead of rewriting the gradients.)
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f32> {
    let clipping = measure_grad_norm(grads, max_norm)?;
    *grads = scale_grads(grads, clipping.coefficient)?;
    Ok(clipping.norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(weight_decay: f64) -> AdamWSettings {
        AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// The reference in f64, written from torch's documentation of AdamW.
    fn reference(p0: &[f64], grads: &[Vec<f64>], lrs: &[f64], s: AdamWSettings) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * s.weight_decay;
                m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g[i];
                v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g[i] * g[i];
                let mhat = m[i] / (1.0 - s.beta1.powi(t));
                let denom = v[i].sqrt() / (1.0 - s.beta2.powi(t)).sqrt() + s.eps;
                p[i] -= lr * mhat / denom;
            }
        }
        p
    }

    #[test]
    fn adamw_matches_reference_updates() -> Result<()> {
        let dev = Device::Cpu;
        let p0 = [0.5f64, -1.0, 2.0, 1e-3];
        let grads = vec![
            vec![0.1, -0.2, 0.0, 3.0],
            vec![-0.3, 0.1, 1e-4, 2.0],
            vec![0.05, 0.05, -0.5, -1.0],
        ];
        let lrs = [0.01, 0.005, 0.02];
        let s = settings(0.1);
        let var = Var::new(&p0.map(|x| x as f32), &dev)?;
        let params = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(s);
        for (g, lr) in grads.iter().zip(lrs) {
            let g: Vec<f32> = g.iter().map(|&x| x as f32).collect();
            let grads = HashMap::from([("w".to_string(), Tensor::new(g.as_slice(), &dev)?)]);
            opt.step(&params, &grads, lr)?;
        }
        let got = var.as_tensor().to_vec1::<f32>()?;
        let want = reference(&p0, &grads, &lrs, s);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() < 1e-6 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
        // The first step of Adam moves each weight by about lr (sign of the gradient); a zero gradient moves it by
        // weight decay only.
        assert_eq!(opt.step_count(), 3);
        Ok(())
    }

    #[test]
    fn state_round_trips_and_continues_identically() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir()?;
        let make = || -> Result<Vec<(String, Var)>> {
            Ok(vec![
                ("a".to_string(), Var::new(&[1.0f32, 2.0, 3.0], &dev)?),
                ("b".to_string(), Var::new(&[[0.5f32, -0.5]], &dev)?),
            ])
        };
        let grads = |k: f32| -> Result<HashMap<String, Tensor>> {
            Ok(HashMap::from([
                (
                    "a".to_string(),
                    Tensor::new(&[0.1f32 * k, -0.2, 0.3], &dev)?,
                ),
                ("b".to_string(), Tensor::new(&[[k, 0.25f32]], &dev)?),
            ]))
        };
        let s = settings(0.01);
        let straight = make()?;
        let mut opt = AdamW::new(s);
        for k in 0..4 {
            opt.step(&straight, &grads(k as f32)?, 0.1)?;
        }

        let resumed = make()?;
        let mut first = AdamW::new(s);
        for k in 0..2 {
            first.step(&resumed, &grads(k as f32)?, 0.1)?;
        }
        let path = dir.path().join("optimizer.safetensors");
        first.save(&path)?;
        let mut second = AdamW::load(&path, s, &resumed)?;
        assert_eq!(second.step_count(), 2);
        for k in 2..4 {
            second.step(&resumed, &grads(k as f32)?, 0.1)?;
        }
        for ((_, a), (_, b)) in straight.iter().zip(&resumed) {
            assert_eq!(
                a.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                b.as_tensor().flatten_all()?.to_vec1::<f32>()?
            );
        }
        let wrong = vec![("c".to_string(), Var::new(&[1.0f32], &dev)?)];
        assert!(AdamW::load(&path, s, &wrong).is_err());
        Ok(())
    }

    #[test]
    fn clipping_matches_torch() -> Result<()> {
        let dev = Device::Cpu;
        let mut grads = HashMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32, 0.0], &dev)?),
            ("b".to_string(), Tensor::new(&[[4.0f32]], &dev)?),
        ]);
        let norm = clip_grad_norm(&mut grads, 1.0)?;
        assert_eq!(norm, 5.0);
        let coef = 1.0f32 / (5.0 + 1e-6);
        assert_eq!(grads["a"].to_vec1::<f32>()?, vec![3.0 * coef, 0.0]);

        let mut small = HashMap::from([("a".to_string(), Tensor::new(&[0.3f32, 0.4], &dev)?)]);
        let norm = clip_grad_norm(&mut small, 1.0)?;
        assert!((norm - 0.5).abs() < 1e-7);
        assert_eq!(
            small["a"].to_vec1::<f32>()?,
            vec![0.3, 0.4],
            "below max_norm: coefficient clamped to 1"
        );
        let norm = clip_grad_norm(&mut small, f64::INFINITY)?;
        assert!((norm - 0.5).abs() < 1e-7);
        Ok(())
    }
}
