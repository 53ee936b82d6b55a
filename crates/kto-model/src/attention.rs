//! Scaled dot-product attention over an additive mask, with a backward that recomputes the probabilities.
//!
//! Built from plain tensor ops, autograd would keep every [rows, heads, queries, keys] intermediate of every layer
//! alive until backward (scores, their f32 copy, the masked scores, exp, softmax, its cast: most of a training
//! step's memory). [`RecomputedAttention`] keeps only q, k, v: its forward runs the same ops on detached inputs and
//! its backward recomputes the probabilities once, as flash attention does. The numbers are those of the plain ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, MetalStorage, Result, Shape, Storage,
    Tensor, D,
};
use std::sync::{Arc, Mutex};

/// `softmax(q kᵀ · scale + mask) v` for q [rows, heads, n, d], k and v [rows, heads, s, d] (KV heads already
/// repeated), mask [rows, 1, n, s] f32 (0 or -inf). Scores are computed in the input dtype and the softmax in f32,
/// as transformers' eager attention does.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return plain_attention(q, k, v, mask, scale);
    }
    let out = plain_attention(&q.detach(), &k.detach(), &v.detach(), mask, scale)?.contiguous()?;
    let op = RecomputedAttention {
        mask: mask.detach(),
        scale,
        out: Mutex::new(Some(out)),
    };
    q.apply_op3_arc(k, v, Arc::new(Box::new(op)))
}

/// f32 probabilities [rows, heads, n, s].
fn probabilities(q: &Tensor, k: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?
        .to_dtype(DType::F32)?
        .broadcast_add(mask)?;
    softmax_last_dim(&scores)
}

/// The reference formulation, differentiable op by op.
pub fn plain_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    probabilities(q, k, mask, scale)?
        .to_dtype(v.dtype())?
        .matmul(v)
}

/// Softmax whose max shift is detached: exact, and no gradient through the max reduction.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The custom op: its forward hands over the output computed by [`attention`]; its backward recomputes.
pub struct RecomputedAttention {
    mask: Tensor,
    scale: f64,
    /// Taken by the forward, so the graph does not hold a second copy of the output.
    out: Mutex<Option<Tensor>>,
}

impl RecomputedAttention {
    fn take_output(&self) -> Result<Tensor> {
        match self.out.lock().map(|mut o| o.take()) {
            Ok(Some(out)) => Ok(out),
            _ => bail!("recomputed-attention: forward ran twice"),
        }
    }
}

macro_rules! hand_over_output {
    ($self:ident, $variant:ident) => {{
        let out = $self.take_output()?;
        let (storage, layout) = out.storage_and_layout();
        let Storage::$variant(s) = &*storage else {
            bail!("recomputed-attention: output on another device");
        };
        Ok((s.try_clone(layout)?, out.shape().clone()))
    }};
}

impl CustomOp3 for RecomputedAttention {
    fn name(&self) -> &'static str {
        "recomputed-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        hand_over_output!(self, Cpu)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        hand_over_output!(self, Cuda)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        hand_over_output!(self, Metal)
    }

    /// dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − Σ_j dP ⊙ P), dQ = scale · dS K, dK = scale · dSᵀ Q.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let dtype = v.dtype();
        let grad = grad.to_dtype(dtype)?;
        let p = probabilities(&q, &k, &self.mask, self.scale)?;
        let grad_v = p.to_dtype(dtype)?.t()?.matmul(&grad)?;
        let grad_p = grad.matmul(&v.t()?)?.to_dtype(DType::F32)?;
        let row_dot = (&grad_p * &p)?.sum_keepdim(D::Minus1)?;
        let grad_s = (p * grad_p.broadcast_sub(&row_dot)?)?.to_dtype(dtype)?;
        let grad_q = (grad_s.matmul(&k)? * self.scale)?;
        let grad_k = (grad_s.t()?.matmul(&q)? * self.scale)?;
        Ok((Some(grad_q), Some(grad_k), Some(grad_v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn causal_mask(rows: usize, n: usize, lengths: &[usize]) -> Result<Tensor> {
        let mut m = Vec::new();
        for &len in lengths.iter().take(rows) {
            for i in 0..n {
                for j in 0..n {
                    m.push(if j <= i && j < len {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
        }
        Tensor::from_vec(m, (rows, 1, n, n), &Device::Cpu)
    }

    #[test]
    fn matches_plain_attention_in_value_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let shape = (2, 3, 5, 4);
        let q = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
        let mask = causal_mask(2, 5, &[5, 3])?;
        let probe = Tensor::randn(0f32, 1., shape, &dev)?;
        let fused = attention(&q, &k, &v, &mask, 0.5)?;
        let plain = plain_attention(&q, &k, &v, &mask, 0.5)?;
        assert!((&fused - &plain)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        let g1 = (&fused * &probe)?.sum_all()?.backward()?;
        let g2 = (&plain * &probe)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (
                g1.get(var.as_tensor()).unwrap(),
                g2.get(var.as_tensor()).unwrap(),
            );
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "d{name} differs by {diff}");
            assert!(a.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        }
        // One op over q, k, v: none of the [rows, heads, n, s] intermediates is part of the graph.
        let holds_scores = |t: &Tensor| t.sorted_nodes().iter().any(|n| n.dims() == [2, 3, 5, 5]);
        assert!(holds_scores(&plain) && !holds_scores(&fused));
        assert_eq!(fused.sorted_nodes().len(), 4);
        Ok(())
    }

    #[test]
    fn bf16_gradients_stay_close_to_plain() -> Result<()> {
        let dev = Device::Cpu;
        let shape = (1, 2, 6, 8);
        let var = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::BF16)?);
        let q = var(Tensor::randn(0f32, 1., shape, &dev)?)?;
        let k = var(Tensor::randn(0f32, 1., shape, &dev)?)?;
        let v = var(Tensor::randn(0f32, 1., shape, &dev)?)?;
        let mask = causal_mask(1, 6, &[6])?;
        let probe = Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(DType::BF16)?;
        let g1 = (attention(&q, &k, &v, &mask, 0.35)? * &probe)?
            .sum_all()?
            .backward()?;
        let g2 = (plain_attention(&q, &k, &v, &mask, 0.35)? * &probe)?
            .sum_all()?
            .backward()?;
        for var in [&q, &k, &v] {
            let a = g1.get(var.as_tensor()).unwrap().to_dtype(DType::F32)?;
            let b = g2.get(var.as_tensor()).unwrap().to_dtype(DType::F32)?;
            let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let size = b.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 0.02 * size,
                "bf16 gradient differs by {diff} (max {size})"
            );
        }
        Ok(())
    }

    #[test]
    fn detached_inputs_take_the_plain_path() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 2, 3, 4), &dev)?;
        let mask = causal_mask(1, 3, &[3])?;
        let out = attention(&q, &q, &q, &mask, 0.5)?;
        assert!(!out.track_op());
        Ok(())
    }
}
