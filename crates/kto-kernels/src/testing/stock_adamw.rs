//! The reference the fused AdamW is checked against: torch's single-tensor `AdamW` after `clip_grad_norm_`, one
//! candle op per operation (each rounded to f32 like torch's kernels), exactly as kto-trainer computed it before
//! it moved to [`crate::adamw`]. Only tests and benchmarks use it.
//!
//! One step for parameter `p` with gradient `g` at step `t`:
//! ```text
//! p = p * (1 - lr * weight_decay)            # decoupled weight decay, before the moments
//! m = lerp(m, g, 1 - beta1)                  # m + (1 - beta1) * (g - m)
//! v = v * beta2 + (1 - beta2) * g * g
//! step_size = lr / (1 - beta1^t)             # host f64
//! denom = sqrt(v) / sqrt(1 - beta2^t) + eps  # eps outside the sqrt of the bias-corrected v
//! p = p + (-step_size * m) / denom
//! ```

use std::collections::HashMap;

use candle_core::{bail, DType, Result, Tensor, Var};

/// AdamW over named parameters with lazily created moments, as torch keeps them.
#[derive(Debug, Clone)]
pub struct StockAdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: u64,
    /// `(exp_avg, exp_avg_sq)` by parameter name.
    moments: HashMap<String, (Tensor, Tensor)>,
}

impl StockAdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            moments: HashMap::new(),
        }
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The moments `(exp_avg, exp_avg_sq)` of a parameter that has taken a step.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.moments.get(name).map(|(m, v)| (m, v))
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`; parameters without one are left
    /// alone (torch skips `p.grad is None`).
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (beta1, beta2, eps, weight_decay) =
            (self.beta1, self.beta2, self.eps, self.weight_decay);
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for (name, var) in params {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            let param = var.as_tensor();
            if grad.dims() != param.dims() {
                bail!(
                    "gradient of {name} has shape {:?}, the parameter {:?}",
                    grad.dims(),
                    param.dims()
                );
            }
            let grad = grad.to_dtype(DType::F32)?;
            let mut p = param.to_dtype(DType::F32)?;
            if weight_decay != 0.0 {
                p = p.affine(f32_scalar(1.0 - lr * weight_decay), 0.0)?;
            }
            let (exp_avg, exp_avg_sq) = match self.moments.remove(name) {
                Some(m) => m,
                None => (grad.zeros_like()?, grad.zeros_like()?),
            };
            let exp_avg = lerp(&exp_avg, &grad, 1.0 - beta1)?;
            let exp_avg_sq = (exp_avg_sq.affine(f32_scalar(beta2), 0.0)?
                + grad.affine(f32_scalar(1.0 - beta2), 0.0)?.mul(&grad)?)?;
            let denom = exp_avg_sq
                .sqrt()?
                .broadcast_div(&Tensor::new(bias_correction2_sqrt as f32, grad.device())?)?
                .affine(1.0, f32_scalar(eps))?;
            let update = exp_avg.affine(f32_scalar(-step_size), 0.0)?.div(&denom)?;
            let new_param = (p + update)?.to_dtype(param.dtype())?;
            var.set(&new_param)?;
            self.moments.insert(name.clone(), (exp_avg, exp_avg_sq));
        }
        Ok(())
    }
}

/// torch multiplies an f32 tensor by a Python float rounded to f32.
fn f32_scalar(x: f64) -> f64 {
    x as f32 as f64
}

/// torch's `lerp(start, end, weight)` for a scalar weight: `start + weight * (end - start)` below 0.5, else
/// `end - (1 - weight) * (end - start)`.
fn lerp(start: &Tensor, end: &Tensor, weight: f64) -> Result<Tensor> {
    if weight.abs() < 0.5 {
        start + (end - start)?.affine(f32_scalar(weight), 0.0)?
    } else {
        end - (end - start)?.affine(f32_scalar(1.0 - weight), 0.0)?
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the 2-norm over all gradients (the norm of the per-tensor
/// norms in name order, in f32), then every gradient times `min(max_norm / (total + 1e-6), 1)`. Returns the norm
/// before clipping. `max_norm = f64::INFINITY` only measures (the gradients are still multiplied by 1).
pub fn stock_clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f32> {
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

/// The 2-norm of one tensor as torch's `vector_norm` returns it in f32; the sum of squares accumulated in f64.
fn tensor_norm(t: &Tensor) -> Result<f32> {
    let sum_sq = t
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(sum_sq.sqrt() as f32)
}
