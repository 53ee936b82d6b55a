//! Attention on the CPU in one pass over the keys each query sees.
//!
//! On the GPU, attention is two cuBLAS GEMMs around the masked-softmax kernel: the GEMMs compute every score of the
//! [queries × keys] square and the mask throws most of them away (the causal half, the padding of short rows). On
//! the CPU the GEMMs are the time, so this twin computes, for each query, only the scores of its visible keys
//! `[first, end)`, their softmax and the weighted sum of values; the backward recomputes the probabilities the same
//! way. Roundings follow the GEMM path (scores and probabilities held in the input dtype, sums in f32), so the two
//! agree within one rounding of the dtype; `tests/attention.rs` checks this twin against the stock-op chain and
//! `tests/gpu.rs` the GPU path against it.

use crate::float::{round_to, Float};
use crate::with_float;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// The shapes of one attention call: q [rows, heads, queries, d], k and v [rows, kv_heads, keys, d].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub d: usize,
}

impl AttentionDims {
    fn n_rep(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Σ a·b with eight independent partial sums, so the compiler can vectorise it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// y += a·x
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

fn widen<T: Float>(values: &[T]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// The visible keys of one query, clipped to the key count.
fn visible(range: [u32; 2], keys: usize) -> std::ops::Range<usize> {
    let end = (range[1] as usize).min(keys);
    (range[0] as usize).min(end)..end
}

/// The probabilities of one query over `keys` (its visible keys) as the GEMM path holds them: scores rounded to the
/// dtype, softmax of `scale · score` in f32, rounded to the dtype. Written into `p` (one entry per visible key).
fn probabilities<T: Float>(
    q: &[f32],
    k: &[f32],
    keys: std::ops::Range<usize>,
    d: usize,
    scale: f32,
    p: &mut Vec<f32>,
) {
    p.clear();
    let mut max = f32::NEG_INFINITY;
    for j in keys {
        let s = scale * round_to::<T>(dot(q, &k[j * d..(j + 1) * d]));
        max = max.max(s);
        p.push(s);
    }
    let mut sum = 0f32;
    for s in p.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in p.iter_mut() {
        *s = round_to::<T>(*s / sum);
    }
}

/// Forward twin: `out` [rows, heads, queries, d] = Σ over each query's visible keys of softmax · v; a query that sees
/// no key gets zeros. `ranges` [rows · queries] as [`crate::attention::AttentionMask`] holds them.
pub fn forward_twin<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    ranges: &[[u32; 2]],
    dims: AttentionDims,
    scale: f32,
    out: &mut [T],
) {
    let AttentionDims {
        queries, keys, d, ..
    } = dims;
    let n_rep = dims.n_rep();
    let group = n_rep * queries * d;
    out.par_chunks_mut(group)
        .zip(q.par_chunks(group))
        .zip(k.par_chunks(keys * d).zip(v.par_chunks(keys * d)))
        .enumerate()
        .for_each(|(task, ((out, q), (k, v)))| {
            let row = task / dims.kv_heads;
            let (k, v) = (widen(k), widen(v));
            let mut p = Vec::with_capacity(keys);
            let mut acc = vec![0f32; d];
            for (qi, (out, q)) in out.chunks_mut(d).zip(q.chunks(d)).enumerate() {
                let range = visible(ranges[row * queries + qi % queries], keys);
                let qf = widen(q);
                probabilities::<T>(&qf, &k, range.clone(), d, scale, &mut p);
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (j, &pj) in range.zip(&p) {
                    axpy(&mut acc, pj, &v[j * d..(j + 1) * d]);
                }
                for (o, a) in out.iter_mut().zip(&acc) {
                    *o = T::from_f32(*a);
                }
            }
        });
}

/// Backward twin: from the output gradient `grad` [rows, heads, queries, d], the gradients of q, k and v
/// (`dS = P ⊙ (dP − rowsum(dP ⊙ P))`, the probabilities recomputed), each summed in f32 and rounded once.
#[allow(clippy::too_many_arguments)]
pub fn backward_twin<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    grad: &[T],
    ranges: &[[u32; 2]],
    dims: AttentionDims,
    scale: f32,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let AttentionDims {
        queries, keys, d, ..
    } = dims;
    let group = dims.n_rep() * queries * d;
    dq.par_chunks_mut(group)
        .zip(dk.par_chunks_mut(keys * d).zip(dv.par_chunks_mut(keys * d)))
        .zip(q.par_chunks(group).zip(grad.par_chunks(group)))
        .zip(k.par_chunks(keys * d).zip(v.par_chunks(keys * d)))
        .enumerate()
        .for_each(|(task, (((dq, (dk, dv)), (q, grad)), (k, v)))| {
            let row = task / dims.kv_heads;
            let (k, v) = (widen(k), widen(v));
            let (mut dk_acc, mut dv_acc) = (vec![0f32; keys * d], vec![0f32; keys * d]);
            let mut p = Vec::with_capacity(keys);
            let mut dp = Vec::with_capacity(keys);
            let mut dq_acc = vec![0f32; d];
            for (qi, (dq, (q, g))) in dq
                .chunks_mut(d)
                .zip(q.chunks(d).zip(grad.chunks(d)))
                .enumerate()
            {
                let range = visible(ranges[row * queries + qi % queries], keys);
                let (qf, gf) = (widen(q), widen(g));
                probabilities::<T>(&qf, &k, range.clone(), d, scale, &mut p);
                dp.clear();
                dp.extend(
                    range
                        .clone()
                        .map(|j| round_to::<T>(dot(&gf, &v[j * d..(j + 1) * d]))),
                );
                let row_dot: f32 = p.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
                dq_acc.iter_mut().for_each(|a| *a = 0.0);
                for ((j, &pj), &dpj) in range.zip(&p).zip(&dp) {
                    let ds = scale * round_to::<T>(pj * (dpj - row_dot));
                    axpy(&mut dq_acc, ds, &k[j * d..(j + 1) * d]);
                    axpy(&mut dk_acc[j * d..(j + 1) * d], ds, &qf);
                    axpy(&mut dv_acc[j * d..(j + 1) * d], pj, &gf);
                }
                for (o, a) in dq.iter_mut().zip(&dq_acc) {
                    *o = T::from_f32(*a);
                }
            }
            for (o, a) in dk.iter_mut().zip(&dk_acc) {
                *o = T::from_f32(*a);
            }
            for (o, a) in dv.iter_mut().zip(&dv_acc) {
                *o = T::from_f32(*a);
            }
        });
}

/// The attention op on the CPU: its forward is [`forward_twin`], its backward [`backward_twin`]; the graph keeps
/// q, k and v only.
pub(crate) struct CpuAttention {
    pub(crate) dims: AttentionDims,
    pub(crate) ranges: Arc<Vec<[u32; 2]>>,
    pub(crate) scale: f32,
}

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "kto-attention-cpu"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float!(q.dtype(), "attention", |T| {
            let q = T::slice(q, q_layout, "attention q")?;
            let k = T::slice(k, k_layout, "attention k")?;
            let v = T::slice(v, v_layout, "attention v")?;
            let mut out = vec![T::default(); q.len()];
            forward_twin(q, k, v, &self.ranges, self.dims, self.scale, &mut out);
            Ok((T::storage(out), q_layout.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(q.dtype())?.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Storage::Cpu(gs)) =
            (&*qs, &*ks, &*vs, &*gs)
        else {
            bail!("attention: CPU attention on a tensor of another device");
        };
        let (dq, dk, dv) = with_float!(qs.dtype(), "attention backward", |T| {
            let q = T::slice(qs, ql, "attention q")?;
            let k = T::slice(ks, kl, "attention k")?;
            let v = T::slice(vs, vl, "attention v")?;
            let g = T::slice(gs, gl, "attention gradient")?;
            let mut dq = vec![T::default(); q.len()];
            let mut dk = vec![T::default(); k.len()];
            let mut dv = vec![T::default(); v.len()];
            backward_twin(
                q,
                k,
                v,
                g,
                &self.ranges,
                self.dims,
                self.scale,
                &mut dq,
                &mut dk,
                &mut dv,
            );
            let device = candle_core::Device::Cpu;
            (
                Tensor::from_vec(dq, ql.shape(), &device)?,
                Tensor::from_vec(dk, kl.shape(), &device)?,
                Tensor::from_vec(dv, vl.shape(), &device)?,
            )
        });
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
