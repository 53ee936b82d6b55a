//! Attention whose mask is a key range per query, and GQA attention built on it.
//!
//! [`AttentionMask`] holds, for each query of each batch row, the range of keys it sees: `[first, end)`. Causal,
//! padded, sliding-window and packed-sequence masks all take this form, so the kernel never reads an [n × n] mask.
//! [`masked_softmax`] turns scores into probabilities under such a mask (f32 arithmetic, the scores' dtype out), and
//! [`attention`] computes `softmax(scale · q kᵀ) v` over it for grouped-query heads without repeating K and V: the
//! query heads of one KV head are stacked as rows of one GEMM. Its graph node keeps only q, k and v; the backward
//! recomputes the probabilities.

use crate::attention_cpu::{AttentionDims, CpuAttention};
use crate::float::{u32_slice, Float};
use crate::handover::HandOver;
use crate::kernel::{Arg, Launch};
use crate::{kernels, with_float};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, Tensor, D,
};
use rayon::prelude::*;
use std::sync::Arc;

kernels! {
    module "attention";
    /// One warp (short rows) or one block (long rows) per score row: the masked softmax of `scale · scores`.
    pub MASKED_SOFTMAX_FWD = masked_softmax_fwd [F32 f32, BF16 bf16, F16 f16]
        (scores: Ptr, key_ranges: Ptr, probs: Ptr, rows: I32, batch_rows: I32, queries: I32, keys: I32, scale: F32,
         rows_per_block: I32) max_threads 1024, shared 0;
    /// The same rows: `dS = scale · P ⊙ (dP − Σ dP ⊙ P)`.
    pub MASKED_SOFTMAX_BWD = masked_softmax_bwd [F32 f32, BF16 bf16, F16 f16]
        (probs: Ptr, grad: Ptr, grad_scores: Ptr, rows: I32, keys: I32, scale: F32, rows_per_block: I32)
        max_threads 1024, shared 0;
}

/// The keys each query sees: `key_ranges` [rows, queries, 2] u32 = (first key, end key exclusive); a query with
/// first ≥ end sees nothing. Ends beyond the scores' key count are clipped to it.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    key_ranges: Tensor,
}

/// The range of a query that sees nothing.
const NOTHING: [u32; 2] = [0, 0];

fn key_index(i: usize, what: &str) -> Result<u32> {
    match u32::try_from(i) {
        Ok(v) => Ok(v),
        Err(_) => bail!("attention mask: {what} {i} is out of u32 range"),
    }
}

/// `[max(start, position + 1 − window), position]` as a half-open range.
fn causal_range(start: usize, position: usize, window: Option<usize>) -> Result<[u32; 2]> {
    let first = match window {
        Some(w) => start.max((position + 1).saturating_sub(w)),
        None => start,
    };
    Ok([key_index(first, "key")?, key_index(position + 1, "key")?])
}

fn check_window(window: Option<usize>) -> Result<()> {
    if window == Some(0) {
        bail!("attention mask: a sliding window of 0 keys");
    }
    Ok(())
}

impl AttentionMask {
    /// Right-padded causal rows: query `i` of row `r` sits at key position `offset + i` and sees the keys
    /// `[max(0, offset + i + 1 − window), offset + i]` below `lengths[r]` (the row's key count: `offset` + its real
    /// queries). Queries at padded positions (`offset + i ≥ lengths[r]`) see nothing.
    pub fn causal(
        lengths: &[usize],
        queries: usize,
        offset: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let ranges = Self::causal_ranges(lengths, queries, offset, window)?;
        Self::from_ranges(ranges, lengths.len(), queries, device)
    }

    /// The host-side ranges of [`AttentionMask::causal`], row-major [rows, queries].
    pub fn causal_ranges(
        lengths: &[usize],
        queries: usize,
        offset: usize,
        window: Option<usize>,
    ) -> Result<Vec<[u32; 2]>> {
        check_window(window)?;
        let mut ranges = Vec::with_capacity(lengths.len() * queries);
        for &length in lengths {
            for i in 0..queries {
                let position = offset + i;
                ranges.push(if position < length {
                    causal_range(0, position, window)?
                } else {
                    NOTHING
                });
            }
        }
        Ok(ranges)
    }

    /// Several sequences end to end in each row (queries and keys are the same positions): `boundaries[r]` lists
    /// row `r`'s sequence boundaries as cumulative lengths `[b₀, b₁, …, bₙ]` (flash-attention's `cu_seqlens`;
    /// sequence j spans `[b_j, b_{j+1})`). Query `i` of the sequence starting at `s` sees
    /// `[max(s, i + 1 − window), i]`; positions outside `[b₀, bₙ)` (padding) see nothing.
    pub fn packed(
        boundaries: &[Vec<usize>],
        queries: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let ranges = Self::packed_ranges(boundaries, queries, window)?;
        Self::from_ranges(ranges, boundaries.len(), queries, device)
    }

    /// The host-side ranges of [`AttentionMask::packed`], row-major [rows, queries].
    pub fn packed_ranges(
        boundaries: &[Vec<usize>],
        queries: usize,
        window: Option<usize>,
    ) -> Result<Vec<[u32; 2]>> {
        check_window(window)?;
        let mut ranges = vec![NOTHING; boundaries.len() * queries];
        for (row, bounds) in boundaries.iter().enumerate() {
            if bounds.windows(2).any(|w| w[1] < w[0])
                || bounds.last().is_some_and(|&end| end > queries)
            {
                bail!("attention mask: sequence boundaries {bounds:?} are not increasing within {queries} positions");
            }
            for sequence in bounds.windows(2) {
                for position in sequence[0]..sequence[1] {
                    ranges[row * queries + position] = causal_range(sequence[0], position, window)?;
                }
            }
        }
        Ok(ranges)
    }

    /// Any ranges, row-major [rows, queries].
    pub fn from_ranges(
        ranges: Vec<[u32; 2]>,
        rows: usize,
        queries: usize,
        device: &Device,
    ) -> Result<Self> {
        if ranges.len() != rows * queries {
            bail!(
                "attention mask: {} ranges for {rows} rows of {queries} queries",
                ranges.len()
            );
        }
        let flat: Vec<u32> = ranges.into_iter().flatten().collect();
        Ok(Self {
            key_ranges: Tensor::from_vec(flat, (rows, queries, 2), device)?,
        })
    }

    /// The u32 tensor [rows, queries, 2] of (first, end) per query.
    pub fn key_ranges(&self) -> &Tensor {
        &self.key_ranges
    }

    pub fn rows(&self) -> usize {
        self.key_ranges.dims()[0]
    }

    pub fn queries(&self) -> usize {
        self.key_ranges.dims()[1]
    }

    /// The ranges copied to the host, row-major [rows, queries].
    pub fn ranges(&self) -> Result<Vec<[u32; 2]>> {
        let flat = self.key_ranges.flatten_all()?.to_vec1::<u32>()?;
        Ok(flat.chunks_exact(2).map(|c| [c[0], c[1]]).collect())
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            key_ranges: self.key_ranges.to_device(device)?,
        })
    }
}

/// Keys per row up to which one warp takes a row (at most 8 keys per lane); longer rows take a block.
const WARP_ROW_KEYS: usize = 256;
/// Warps per block when each takes a row.
const WARP_ROWS_PER_BLOCK: usize = 4;

/// (grid, block, rows_per_block) for `rows` rows of `keys` keys.
fn row_grid(rows: usize, keys: usize) -> ([u32; 3], [u32; 3], i32) {
    if keys <= WARP_ROW_KEYS {
        let grid = rows.div_ceil(WARP_ROWS_PER_BLOCK) as u32;
        (
            [grid, 1, 1],
            [32 * WARP_ROWS_PER_BLOCK as u32, 1, 1],
            WARP_ROWS_PER_BLOCK as i32,
        )
    } else {
        // About eight keys per thread, whole warps.
        let threads = keys.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32;
        ([rows as u32, 1, 1], [threads, 1, 1], 1)
    }
}

fn check_rows(rows: usize, keys: usize) -> Result<()> {
    if rows == 0 || keys == 0 || rows > i32::MAX as usize || keys > i32::MAX as usize {
        bail!("masked softmax: {rows} rows of {keys} keys are out of range");
    }
    Ok(())
}

/// Which query range each score row uses: the scores are [mask rows, groups, m, keys], `batch_rows` = groups · m
/// score rows per batch row, and score row j of a group uses query `j % queries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMap {
    pub batch_rows: usize,
    pub queries: usize,
}

impl RowMap {
    /// The index of score row `row`'s range in the row-major [rows, queries] ranges.
    pub fn range_index(&self, row: usize) -> usize {
        row / self.batch_rows * self.queries + row % self.queries
    }
}

/// The forward launch over `rows` score rows of `keys` keys.
#[allow(clippy::too_many_arguments)]
pub fn forward_launch(
    dtype: DType,
    rows: usize,
    keys: usize,
    map: RowMap,
    scale: f32,
    scores: Arg,
    key_ranges: Arg,
    probs: Arg,
) -> Result<Launch> {
    check_rows(rows, keys)?;
    if map.queries == 0
        || !map.batch_rows.is_multiple_of(map.queries)
        || !rows.is_multiple_of(map.batch_rows.max(1))
    {
        bail!(
            "masked softmax: {rows} score rows do not split into batch rows of {} ({map:?})",
            map.batch_rows
        );
    }
    let (grid, block, rows_per_block) = row_grid(rows, keys);
    let args = vec![
        scores,
        key_ranges,
        probs,
        Arg::I32(rows as i32),
        Arg::I32(map.batch_rows as i32),
        Arg::I32(map.queries as i32),
        Arg::I32(keys as i32),
        Arg::F32(scale),
        Arg::I32(rows_per_block),
    ];
    Launch::new(&MASKED_SOFTMAX_FWD, dtype, grid, block, 0, args)
}

/// The backward launch: `grad_scores` from the probabilities and their gradient, all `rows` × `keys`.
pub fn backward_launch(
    dtype: DType,
    rows: usize,
    keys: usize,
    scale: f32,
    probs: Arg,
    grad: Arg,
    grad_scores: Arg,
) -> Result<Launch> {
    check_rows(rows, keys)?;
    let (grid, block, rows_per_block) = row_grid(rows, keys);
    let args = vec![
        probs,
        grad,
        grad_scores,
        Arg::I32(rows as i32),
        Arg::I32(keys as i32),
        Arg::F32(scale),
        Arg::I32(rows_per_block),
    ];
    Launch::new(&MASKED_SOFTMAX_BWD, dtype, grid, block, 0, args)
}

/// CPU twin of the forward: `scores` and `probs` are rows of `keys`; `ranges` as in [`AttentionMask::ranges`].
pub fn forward_twin<T: Float>(
    scores: &[T],
    ranges: &[[u32; 2]],
    probs: &mut [T],
    keys: usize,
    map: RowMap,
    scale: f32,
) {
    if keys == 0 {
        return;
    }
    probs
        .par_chunks_mut(keys)
        .zip(scores.par_chunks(keys))
        .enumerate()
        .for_each(|(row, (pr, sr))| {
            let [first, end] = ranges[map.range_index(row)];
            let end = (end as usize).min(keys);
            let first = (first as usize).min(end);
            let visible = &sr[first..end];
            let top = visible
                .iter()
                .fold(f32::MIN, |m, s| m.max(scale * s.to_f32()));
            let total: f32 = visible
                .iter()
                .map(|s| (scale * s.to_f32() - top).exp())
                .sum();
            let inv_total = 1.0 / total;
            for (k, (p, s)) in pr.iter_mut().zip(sr).enumerate() {
                let v = if k >= first && k < end {
                    (scale * s.to_f32() - top).exp() * inv_total
                } else {
                    0.0
                };
                *p = T::from_f32(v);
            }
        });
}

/// CPU twin of the backward: `dS = scale · P ⊙ (dP − Σ dP ⊙ P)` row by row.
pub fn backward_twin<T: Float>(
    probs: &[T],
    grad: &[T],
    grad_scores: &mut [T],
    keys: usize,
    scale: f32,
) {
    if keys == 0 {
        return;
    }
    grad_scores
        .par_chunks_mut(keys)
        .zip(probs.par_chunks(keys).zip(grad.par_chunks(keys)))
        .for_each(|(dr, (pr, gr))| {
            let dot: f32 = pr
                .iter()
                .zip(gr)
                .map(|(p, g)| p.to_f32() * g.to_f32())
                .sum();
            for ((d, p), g) in dr.iter_mut().zip(pr).zip(gr) {
                *d = T::from_f32(scale * p.to_f32() * (g.to_f32() - dot));
            }
        });
}

/// Softmax of `scale · scores` over the keys each query sees, computed in f32, in the scores' dtype; keys out of
/// range get 0 and a query that sees nothing a row of zeros. `scores` [mask rows, groups, m, keys] with `m` a
/// multiple of the mask's queries: score row j uses query `j % queries` (GQA: n_rep query heads stacked per KV
/// head). Differentiable in `scores`.
pub fn masked_softmax(scores: &Tensor, mask: &AttentionMask, scale: f64) -> Result<Tensor> {
    let (rows, groups, m, _) = scores.dims4()?;
    if rows != mask.rows() || mask.queries() == 0 || !m.is_multiple_of(mask.queries()) {
        bail!(
            "masked softmax: scores {:?} for a mask of {} rows × {} queries",
            scores.shape(),
            mask.rows(),
            mask.queries()
        );
    }
    if !scores.device().same_device(mask.key_ranges.device()) {
        bail!("masked softmax: the mask is on another device than the scores");
    }
    scores.contiguous()?.apply_op1(MaskedSoftmax {
        key_ranges: mask.key_ranges.contiguous()?,
        map: RowMap {
            batch_rows: groups * m,
            queries: mask.queries(),
        },
        scale: scale as f32,
    })
}

/// The gradient of the scores of [`masked_softmax`] from its output `probs` and their gradient `grad_probs`.
pub fn masked_softmax_backward(probs: &Tensor, grad_probs: &Tensor, scale: f64) -> Result<Tensor> {
    if probs.shape() != grad_probs.shape() {
        bail!(
            "masked softmax backward: probabilities {:?}, gradient {:?}",
            probs.shape(),
            grad_probs.shape()
        );
    }
    let grad = grad_probs.to_dtype(probs.dtype())?.contiguous()?;
    probs.contiguous()?.apply_op2_no_bwd(
        &grad,
        &MaskedSoftmaxBackward {
            scale: scale as f32,
        },
    )
}

struct MaskedSoftmax {
    key_ranges: Tensor,
    map: RowMap,
    scale: f32,
}

struct MaskedSoftmaxBackward {
    scale: f32,
}

fn rows_and_keys(layout: &Layout) -> (usize, usize) {
    let keys = layout.dims().last().copied().unwrap_or(1);
    (layout.shape().elem_count() / keys.max(1), keys)
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "kto-masked-softmax"
    }

    fn cpu_fwd(&self, scores: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, r_layout) = self.key_ranges.storage_and_layout();
        let Storage::Cpu(r) = &*r else {
            bail!("masked softmax: mask not on the CPU")
        };
        let flat = u32_slice(r, r_layout, "attention mask")?;
        let ranges: Vec<[u32; 2]> = flat.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        let (_, keys) = rows_and_keys(layout);
        with_float!(scores.dtype(), "masked softmax", |T| {
            let s = T::slice(scores, layout, "masked softmax scores")?;
            let mut p = vec![T::default(); s.len()];
            forward_twin(s, &ranges, &mut p, keys, self.map, self.scale);
            Ok((T::storage(p), layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        scores: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (r, r_layout) = self.key_ranges.storage_and_layout();
        let Storage::Cuda(r) = &*r else {
            bail!("masked softmax: mask not on the GPU")
        };
        let (rows, keys) = rows_and_keys(layout);
        let out = crate::cuda::output(
            &scores.device,
            scores.dtype(),
            layout.shape().elem_count(),
            |stream, p| {
                let sa = crate::cuda::address("masked softmax scores", scores, layout, stream)?;
                let ra = crate::cuda::address("masked softmax row map", r, r_layout, stream)?;
                let launch = forward_launch(
                    scores.dtype(),
                    rows,
                    keys,
                    self.map,
                    self.scale,
                    sa.arg(),
                    ra.arg(),
                    p,
                )?;
                crate::cuda::run(&scores.device, &launch)
            },
        )?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(masked_softmax_backward(
            probs,
            grad,
            self.scale as f64,
        )?))
    }
}

impl CustomOp2 for MaskedSoftmaxBackward {
    fn name(&self) -> &'static str {
        "kto-masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        probs: &CpuStorage,
        p_layout: &Layout,
        grad: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, keys) = rows_and_keys(p_layout);
        with_float!(probs.dtype(), "masked softmax backward", |T| {
            let p = T::slice(probs, p_layout, "masked softmax probabilities")?;
            let g = T::slice(grad, g_layout, "masked softmax gradient")?;
            let mut d = vec![T::default(); p.len()];
            backward_twin(p, g, &mut d, keys, self.scale);
            Ok((T::storage(d), p_layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        probs: &candle_core::CudaStorage,
        p_layout: &Layout,
        grad: &candle_core::CudaStorage,
        g_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, keys) = rows_and_keys(p_layout);
        let out = crate::cuda::output(
            &probs.device,
            probs.dtype(),
            p_layout.shape().elem_count(),
            |stream, d| {
                let pa = crate::cuda::address(
                    "masked softmax backward probabilities",
                    probs,
                    p_layout,
                    stream,
                )?;
                let ga = crate::cuda::address(
                    "masked softmax backward gradient",
                    grad,
                    g_layout,
                    stream,
                )?;
                let launch =
                    backward_launch(probs.dtype(), rows, keys, self.scale, pa.arg(), ga.arg(), d)?;
                crate::cuda::run(&probs.device, &launch)
            },
        )?;
        Ok((out, p_layout.shape().clone()))
    }
}

/// The head layout of one attention call.
#[derive(Debug, Clone, Copy)]
struct Heads {
    rows: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
}

impl Heads {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Self> {
        let (rows, heads, queries, d) = q.dims4()?;
        let (k_rows, kv_heads, keys, k_d) = k.dims4()?;
        let (v_rows, v_heads, v_keys, _) = v.dims4()?;
        if k_rows != rows || v_rows != rows || k_d != d || v_heads != kv_heads || v_keys != keys {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            bail!("attention: {heads} query heads over {kv_heads} KV heads");
        }
        if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
            bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                q.dtype(),
                k.dtype(),
                v.dtype()
            );
        }
        if mask.rows() != rows || mask.queries() != queries {
            bail!(
                "attention: a mask of {} rows × {} queries for q {:?}",
                mask.rows(),
                mask.queries(),
                q.shape()
            );
        }
        Ok(Self {
            rows,
            heads,
            kv_heads,
            queries,
        })
    }

    /// [rows, heads, queries, x] (contiguous) as [rows, kv_heads, n_rep · queries, x]: query head h = g · n_rep + i
    /// becomes rows i · queries.. of group g, the heads that share KV head g (transformers' `repeat_kv`).
    fn grouped(&self, t: &Tensor) -> Result<Tensor> {
        let last = t.dim(D::Minus1)?;
        t.contiguous()?.reshape((
            self.rows,
            self.kv_heads,
            self.heads / self.kv_heads * self.queries,
            last,
        ))
    }

    fn ungrouped(&self, t: &Tensor) -> Result<Tensor> {
        let last = t.dim(D::Minus1)?;
        t.reshape((self.rows, self.heads, self.queries, last))
    }
}

/// `softmax(scale · q kᵀ) v` over the keys `mask` lets each query see: q [rows, heads, queries, d], k and v
/// [rows, kv_heads, keys, d] with query head h reading KV head `h / (heads / kv_heads)`; output
/// [rows, heads, queries, d] in q's dtype. On the GPU the scores are one GEMM per KV head (no repeated K/V) and the
/// softmax is [`masked_softmax`]; on the CPU only the visible scores are computed ([`crate::attention_cpu`]). With any
/// input tracked it is one graph node that keeps only q, k and v.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let heads = Heads::of(q, k, v, mask)?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    if q.device().is_cpu() {
        // The CPU computes only the visible scores (crate::attention_cpu); the GEMM path below is the GPU's.
        let dims = AttentionDims {
            rows: heads.rows,
            heads: heads.heads,
            kv_heads: heads.kv_heads,
            queries: heads.queries,
            keys: k.dim(2)?,
            d: k.dim(3)?,
        };
        let op = CpuAttention {
            dims,
            ranges: Arc::new(mask.ranges()?),
            scale: scale as f32,
        };
        let q = q.contiguous()?;
        return if q.track_op() || k.track_op() || v.track_op() {
            q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))
        } else {
            q.apply_op3_no_bwd(&k, &v, &op)
        };
    }
    gemm_attention_prepared(heads, q, &k, &v, mask, scale)
}

/// The GPU's formulation on any device: the score and output GEMMs around [`masked_softmax`], the probabilities
/// recomputed in backward ([`attention`] takes it on the GPU; tests compare it with the CPU twin). Checks the inputs
/// and makes k and v contiguous, then runs `gemm_attention_prepared`.
#[doc(hidden)]
pub fn gemm_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let heads = Heads::of(q, k, v, mask)?;
    gemm_attention_prepared(heads, q, &k.contiguous()?, &v.contiguous()?, mask, scale)
}

/// [`gemm_attention`] on prepared inputs: `heads` from [`Heads::of`] (shapes and dtypes checked), k and v contiguous.
fn gemm_attention_prepared(
    heads: Heads,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return plain_attention(&heads, q, k, v, mask, scale);
    }
    let q = q.contiguous()?;
    let out = plain_attention(&heads, &q.detach(), &k.detach(), &v.detach(), mask, scale)?;
    let op = RecomputedAttention {
        heads,
        mask: mask.clone(),
        scale,
        out: HandOver::new("attention", out),
    };
    q.apply_op3_arc(k, v, Arc::new(Box::new(op)))
}

/// The probabilities [rows, kv_heads, n_rep · queries, keys] of grouped queries.
fn probabilities(
    grouped_q: &Tensor,
    k: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    masked_softmax(&grouped_q.matmul(&k.t()?)?, mask, scale)
}

fn plain_attention(
    heads: &Heads,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor> {
    let p = probabilities(&heads.grouped(q)?, k, mask, scale)?;
    heads.ungrouped(&p.matmul(v)?)
}

/// The op of [`attention`]: its forward hands over the output computed on detached inputs (so the graph holds
/// q, k, v and this node only); its backward recomputes the probabilities.
struct RecomputedAttention {
    heads: Heads,
    mask: AttentionMask,
    scale: f64,
    /// Given up to the forward, so the op does not keep a second copy of the output.
    out: HandOver,
}

impl CustomOp3 for RecomputedAttention {
    fn name(&self) -> &'static str {
        "kto-attention"
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
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    /// With grouped views: dV = Pᵀ dO, dP = dO Vᵀ, dS = masked_softmax_backward(P, dP), dQ = dS K, dK = dSᵀ Q.
    /// dK and dV sum over the n_rep query heads of each KV head inside the GEMMs.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = &self.heads;
        let (k, v) = (k.detach(), v.detach());
        let q = h.grouped(&q.detach())?;
        let grad = h.grouped(&grad.to_dtype(v.dtype())?)?;
        let p = probabilities(&q, &k, &self.mask, self.scale)?;
        let grad_v = p.t()?.matmul(&grad)?;
        let grad_p = grad.matmul(&v.t()?)?;
        let grad_s = masked_softmax_backward(&p, &grad_p, self.scale)?;
        let grad_q = h.ungrouped(&grad_s.matmul(&k)?)?;
        let grad_k = grad_s.t()?.matmul(&q)?;
        Ok((Some(grad_q), Some(grad_k), Some(grad_v)))
    }
}
