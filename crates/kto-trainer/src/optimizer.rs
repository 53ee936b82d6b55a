//! AdamW with `torch.optim.AdamW` semantics and f32 state that can be saved, and torch's global-norm clipping.
//!
//! One AdamW step for parameter `p` with gradient `g` at step `t` (torch's single-tensor implementation, the
//! operations in the same order and each rounded to f32 like torch's kernels):
//! ```text
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

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named parameters. The state is created lazily at a parameter's first step, as torch does.
#[derive(Debug, Clone)]
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
        self.step += 1;
        let t = self.step as i32;
        let AdamWSettings {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.settings;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for (name, var) in params {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            let param = var.as_tensor();
            ensure!(
                grad.dims() == param.dims(),
                "gradient of {name} has shape {:?}, the parameter {:?}",
                grad.dims(),
                param.dims()
            );
            let grad = grad.to_dtype(DType::F32)?;
            let mut p = param.to_dtype(DType::F32)?;
            if weight_decay != 0.0 {
                p = p.affine(f32_scalar(1.0 - lr * weight_decay), 0.0)?;
            }
            let moments = match self.moments.remove(name) {
                Some(m) => m,
                None => Moments {
                    exp_avg: grad.zeros_like()?,
                    exp_avg_sq: grad.zeros_like()?,
                },
            };
            let exp_avg = lerp(&moments.exp_avg, &grad, 1.0 - beta1)?;
            let exp_avg_sq = (moments.exp_avg_sq.affine(f32_scalar(beta2), 0.0)?
                + grad.affine(f32_scalar(1.0 - beta2), 0.0)?.mul(&grad)?)?;
            let denom = exp_avg_sq
                .sqrt()?
                .broadcast_div(&scalar_tensor(bias_correction2_sqrt, grad.device())?)?
                .affine(1.0, f32_scalar(eps))?;
            let update = exp_avg.affine(f32_scalar(-step_size), 0.0)?.div(&denom)?;
            let new_param = (p + update)?.to_dtype(param.dtype())?;
            var.set(&new_param)?;
            self.moments.insert(
                name.clone(),
                Moments {
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
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
        let tmp = crate::checkpoint::temp_path(path);
        candle_core::safetensors::save(&tensors, &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
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

/// torch multiplies an f32 tensor by a Python float rounded to f32.
fn f32_scalar(x: f64) -> f64 {
    x as f32 as f64
}

fn scalar_tensor(x: f64, device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(x as f32, device)?)
}

/// torch's `lerp(start, end, weight)` for a scalar weight below 0.5: `start + weight * (end - start)`.
fn lerp(start: &Tensor, end: &Tensor, weight: f64) -> Result<Tensor> {
    if weight.abs() < 0.5 {
        Ok((start + (end - start)?.affine(f32_scalar(weight), 0.0)?)?)
    } else {
        Ok((end - (end - start)?.affine(f32_scalar(1.0 - weight), 0.0)?)?)
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the 2-norm over all gradients (the norm of the per-tensor
/// norms, in f32), then every gradient times `min(max_norm / (total + 1e-6), 1)`. Returns the norm before clipping.
/// `max_norm = f64::INFINITY` only measures (transformers' `max_grad_norm <= 0` path multiplies by 1).
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f32> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let mut sum_sq = 0f32;
    for name in &names {
        let norm = tensor_norm(&grads[*name])?;
        sum_sq += norm * norm;
    }
    let total = sum_sq.sqrt();
    let coef = (max_norm as f32 / (total + 1e-6)).min(1.0);
    for grad in grads.values_mut() {
        *grad = grad.affine(coef as f64, 0.0)?;
    }
    Ok(total)
}

/// The 2-norm of one tensor as torch's `vector_norm` returns it in f32; the sum of squares is accumulated in f64
/// (torch reduces pairwise, so a plain f32 running sum would drift on large tensors).
fn tensor_norm(t: &Tensor) -> Result<f32> {
    let sum_sq = t
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(sum_sq.sqrt() as f32)
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
