//! Completion log-probs over the vocabulary, from the LM head's logits [n, vocab] in the model dtype: per token
//! log p(target) with its gradient, and the softmax entropy and mean logit TRL logs (`entropy`, `logits/*`).
//!
//! The forward reads each row once (online max / sum-exp) and writes f32 [n, 4] =
//! (logp = x_t − lse, entropy = lse − Σ p·x, mean logit = Σ x / vocab, lse); the backward writes
//! `g · (onehot(t) − exp(x − lse))` in the logits' dtype. Neither materialises an [n × vocab] f32 tensor, and the
//! autograd node of [`token_logprobs`] keeps only the logits it already has, the targets and lse [n].

use crate::float::{u32_slice, Float};
use crate::handover::HandOver;
use crate::kernel::{Arg, Launch};
use crate::{kernels, with_float};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;
use std::sync::Arc;

kernels! {
    module "logprobs";
    /// One block per row: the row's softmax sums in one pass, then `stats[row] = (logp, entropy, mean, lse)`.
    pub LOGPROB_FWD = logprob_fwd [F32 f32, BF16 bf16, F16 f16]
        (logits: Ptr, targets: Ptr, stats: Ptr, rows: I32, vocab: I32) max_threads 512, shared 0;
    /// Grid (rows, column blocks), four elements per thread: `d = g · (onehot − exp(x − lse))`.
    pub LOGPROB_BWD = logprob_bwd [F32 f32, BF16 bf16, F16 f16]
        (logits: Ptr, targets: Ptr, lse: Ptr, grad: Ptr, dlogits: Ptr, rows: I32, vocab: I32)
        max_threads 256, shared 0;
}

/// Columns of the stats: `stats[.., LOGP]` and so on.
pub const LOGP: usize = 0;
pub const ENTROPY: usize = 1;
pub const MEAN_LOGIT: usize = 2;
pub const LSE: usize = 3;
pub const STATS: usize = 4;

/// Elements each backward thread writes (`LOGPROB_BWD_ELEMENTS` in the kernel).
const BACKWARD_ELEMENTS: usize = 4;

fn check_shape(rows: usize, vocab: usize) -> Result<()> {
    // The kernels index a row with `int` and look up to 3 strides (≤ 1536) past an index below `vocab`.
    if rows > i32::MAX as usize || vocab == 0 || vocab > (i32::MAX / 2) as usize {
        bail!("log-probs: {rows} rows of {vocab} logits are out of range");
    }
    Ok(())
}

/// Forward threads per row: at least eight logits each, whole warps, at most 512 (a 152k vocabulary gives each
/// thread ~300 and leaves room for four blocks per SM).
fn forward_threads(vocab: usize) -> u32 {
    vocab.div_ceil(8).next_multiple_of(32).clamp(32, 512) as u32
}

/// Backward threads per block: whole warps, at most 256, each writing [`BACKWARD_ELEMENTS`] columns.
fn backward_threads(vocab: usize) -> u32 {
    vocab
        .div_ceil(BACKWARD_ELEMENTS)
        .next_multiple_of(32)
        .clamp(32, 256) as u32
}

/// The forward launch over `rows` rows of `vocab` logits (dtype `dtype`), u32 `targets` [rows] and f32
/// `stats` [rows, 4].
pub fn forward_launch(
    dtype: DType,
    rows: usize,
    vocab: usize,
    logits: Arg,
    targets: Arg,
    stats: Arg,
) -> Result<Launch> {
    check_shape(rows, vocab)?;
    let args = vec![
        logits,
        targets,
        stats,
        Arg::I32(rows as i32),
        Arg::I32(vocab as i32),
    ];
    Launch::new(
        &LOGPROB_FWD,
        dtype,
        [rows as u32, 1, 1],
        [forward_threads(vocab), 1, 1],
        0,
        args,
    )
}

/// The backward launch: `dlogits` [rows, vocab] (dtype `dtype`) from the logits, targets, f32 `lse` [rows] and the
/// f32 gradient of logp `grad` [rows].
#[allow(clippy::too_many_arguments)]
pub fn backward_launch(
    dtype: DType,
    rows: usize,
    vocab: usize,
    logits: Arg,
    targets: Arg,
    lse: Arg,
    grad: Arg,
    dlogits: Arg,
) -> Result<Launch> {
    check_shape(rows, vocab)?;
    let threads = backward_threads(vocab);
    let column_blocks = vocab.div_ceil(threads as usize * BACKWARD_ELEMENTS);
    if column_blocks > 65535 {
        bail!("log-probs backward: a vocabulary of {vocab} needs {column_blocks} column blocks (at most 65535)");
    }
    let args = vec![
        logits,
        targets,
        lse,
        grad,
        dlogits,
        Arg::I32(rows as i32),
        Arg::I32(vocab as i32),
    ];
    Launch::new(
        &LOGPROB_BWD,
        dtype,
        [rows as u32, column_blocks as u32, 1],
        [threads, 1, 1],
        0,
        args,
    )
}

/// Fails on the first target outside the vocabulary, naming its row and value.
pub fn check_targets(targets: &[u32], vocab: usize) -> Result<()> {
    if let Some((row, &t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        bail!("log-probs: target {t} of row {row} is outside the vocabulary of {vocab}");
    }
    Ok(())
}

/// The vocabulary size of `len` logits in `rows` rows (which must divide them evenly).
fn vocab_of(len: usize, rows: usize) -> Result<usize> {
    if rows == 0 || !len.is_multiple_of(rows) {
        bail!("log-probs: {len} logits for {rows} targets");
    }
    Ok(len / rows)
}

/// Sums over a row in chunks of this many elements, the chunk sums then summed: f32 accumulation whose rounding
/// error grows with 1024 + vocab / 1024 rather than with vocab.
const TWIN_CHUNK: usize = 1024;

/// CPU twin of the forward: `stats` [rows, 4] from `logits` [rows, vocab] and `targets` [rows]. Two passes over each
/// row (max and Σ x, then the sums relative to the max), a different order from the kernel's online merge.
pub fn forward_twin<T: Float>(logits: &[T], targets: &[u32], stats: &mut [f32]) -> Result<()> {
    if targets.is_empty() {
        return Ok(());
    }
    let vocab = vocab_of(logits.len(), targets.len())?;
    if stats.len() != targets.len() * STATS {
        bail!(
            "log-probs: {} stats for {} rows",
            stats.len(),
            targets.len()
        );
    }
    check_targets(targets, vocab)?;
    stats
        .par_chunks_mut(STATS)
        .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
        .for_each(|(out, (row, &target))| {
            let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
            for chunk in row.chunks(TWIN_CHUNK) {
                let mut part = 0f32;
                for x in chunk {
                    let x = x.to_f32();
                    max = max.max(x);
                    part += x;
                }
                sum += part;
            }
            // s = Σ exp(x − max), t = Σ exp(x − max)·(x − max); -inf logits contribute nothing.
            let (mut s, mut t) = (0f32, 0f32);
            for chunk in row.chunks(TWIN_CHUNK) {
                let (mut s_part, mut t_part) = (0f32, 0f32);
                for x in chunk {
                    let x = x.to_f32();
                    if x == f32::NEG_INFINITY {
                        continue;
                    }
                    let d = x - max;
                    let e = d.exp();
                    s_part += e;
                    t_part += e * d;
                }
                s += s_part;
                t += t_part;
            }
            let log_s = s.ln();
            let lse = max + log_s;
            out[LOGP] = row[target as usize].to_f32() - lse;
            out[ENTROPY] = log_s - t / s;
            out[MEAN_LOGIT] = sum / vocab as f32;
            out[LSE] = lse;
        });
    Ok(())
}

/// CPU twin of the backward: `dlogits = grad · (onehot(target) − exp(logits − lse))` row by row.
pub fn backward_twin<T: Float>(
    logits: &[T],
    targets: &[u32],
    lse: &[f32],
    grad: &[f32],
    dlogits: &mut [T],
) -> Result<()> {
    if targets.is_empty() {
        return Ok(());
    }
    let vocab = vocab_of(logits.len(), targets.len())?;
    if lse.len() != targets.len() || grad.len() != targets.len() || dlogits.len() != logits.len() {
        bail!(
            "log-probs backward: {} lse, {} gradients and {} outputs for {} rows of {vocab}",
            lse.len(),
            grad.len(),
            dlogits.len(),
            targets.len()
        );
    }
    check_targets(targets, vocab)?;
    dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter().zip(lse.par_iter().zip(grad.par_iter())))
        .for_each(|((out, row), (&target, (&lse, &g)))| {
            for (i, (d, x)) in out.iter_mut().zip(row).enumerate() {
                let p = (x.to_f32() - lse).exp();
                let onehot = if i == target as usize { 1.0 } else { 0.0 };
                *d = T::from_f32(g * (onehot - p));
            }
        });
    Ok(())
}

/// (rows, vocab) of logits [rows, vocab] with u32 targets [rows].
fn check_inputs(logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.dims2()?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        bail!(
            "log-probs: targets must be u32 [{rows}] for logits {:?}, got {:?} {:?}",
            logits.shape(),
            targets.dtype(),
            targets.shape()
        );
    }
    if rows > 0 {
        check_shape(rows, vocab)?;
    }
    Ok((rows, vocab))
}

/// Per-row f32 stats [n, 4] = (logp, entropy, mean logit, lse) of logits [n, vocab] (f32, bf16 or f16) at u32
/// `targets` [n]; no graph. On the CPU an out-of-range target is an error; on the GPU its row is NaN.
pub fn logprob_stats(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_inputs(logits, targets)?;
    logits
        .detach()
        .contiguous()?
        .apply_op2_no_bwd(&targets.detach().contiguous()?, &LogprobStats)
}

/// The gradient of Σ grad_i · logp_i with respect to `logits` [n, vocab], in their dtype, given the `lse` [n] of the
/// forward and the gradient `grad` [n] of logp.
pub fn logprob_backward(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    let (rows, _) = check_inputs(logits, targets)?;
    if lse.dims() != [rows] || grad.elem_count() != rows {
        bail!(
            "log-probs backward: lse {:?} and gradient {:?} for {rows} rows",
            lse.shape(),
            grad.shape()
        );
    }
    let row_terms = |t: &Tensor| -> Result<Tensor> {
        t.detach().to_dtype(DType::F32)?.reshape(rows)?.contiguous()
    };
    logits.detach().contiguous()?.apply_op3_no_bwd(
        &targets.detach().contiguous()?,
        &row_terms(lse)?,
        &LogprobBackward {
            grad: row_terms(grad)?,
        },
    )
}

/// `(logp, stats)` for logits [n, vocab] at `targets` [n]: logp f32 [n] differentiable with respect to the logits
/// (one graph node), stats f32 [n, 4] detached as [`logprob_stats`] gives them (out-of-range targets: see there).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let stats = logprob_stats(logits, targets)?;
    let column = |c: usize| stats.narrow(1, c, 1)?.squeeze(1)?.contiguous();
    let logp = column(LOGP)?;
    if !logits.track_op() {
        return Ok((logp, stats));
    }
    let op = TokenLogprob {
        targets: targets.detach().contiguous()?,
        lse: column(LSE)?,
        logp: HandOver::new("token-logprobs", logp),
    };
    let logp = logits.apply_op1_arc(Arc::new(Box::new(op)))?;
    Ok((logp, stats))
}

struct LogprobStats;

impl CustomOp2 for LogprobStats {
    fn name(&self) -> &'static str {
        "kto-logprob-stats"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        t: &CpuStorage,
        t_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let targets = u32_slice(t, t_layout, "log-probs targets")?;
        let rows = targets.len();
        with_float!(x.dtype(), "log-probs", |T| {
            let logits = T::slice(x, x_layout, "log-probs logits")?;
            let mut stats = vec![0f32; rows * STATS];
            forward_twin(logits, targets, &mut stats)?;
            Ok((CpuStorage::F32(stats), Shape::from((rows, STATS))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        t: &candle_core::CudaStorage,
        t_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = x_layout.shape().dims2()?;
        let out = crate::cuda::output(&x.device, DType::F32, rows * STATS, |stream, stats| {
            let xa = crate::cuda::address("log-probs logits", x, x_layout, stream)?;
            let ta = crate::cuda::address("log-probs targets", t, t_layout, stream)?;
            let launch = forward_launch(x.dtype(), rows, vocab, xa.arg(), ta.arg(), stats)?;
            crate::cuda::run(&x.device, &launch)
        })?;
        Ok((out, Shape::from((rows, STATS))))
    }
}

/// The backward as an op over (logits, targets, lse); the gradient of logp is held like rms-norm's weight.
struct LogprobBackward {
    grad: Tensor,
}

impl CustomOp3 for LogprobBackward {
    fn name(&self) -> &'static str {
        "kto-logprob-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        t: &CpuStorage,
        t_layout: &Layout,
        l: &CpuStorage,
        l_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, g_layout) = self.grad.storage_and_layout();
        let Storage::Cpu(g) = &*g else {
            bail!("log-probs backward: gradient not on the CPU")
        };
        let grad = f32::slice(g, g_layout, "log-probs gradient")?;
        let targets = u32_slice(t, t_layout, "log-probs targets")?;
        let lse = f32::slice(l, l_layout, "log-probs lse")?;
        with_float!(x.dtype(), "log-probs backward", |T| {
            let logits = T::slice(x, x_layout, "log-probs logits")?;
            let mut dlogits = vec![T::default(); logits.len()];
            backward_twin(logits, targets, lse, grad, &mut dlogits)?;
            Ok((T::storage(dlogits), x_layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        t: &candle_core::CudaStorage,
        t_layout: &Layout,
        l: &candle_core::CudaStorage,
        l_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (g, g_layout) = self.grad.storage_and_layout();
        let Storage::Cuda(g) = &*g else {
            bail!("log-probs backward: gradient not on the GPU")
        };
        let (rows, vocab) = x_layout.shape().dims2()?;
        let out = crate::cuda::output(&x.device, x.dtype(), rows * vocab, |stream, dlogits| {
            let xa = crate::cuda::address("log-probs logits", x, x_layout, stream)?;
            let ta = crate::cuda::address("log-probs targets", t, t_layout, stream)?;
            let la = crate::cuda::address("log-probs lse", l, l_layout, stream)?;
            let ga = crate::cuda::address("log-probs gradient", g, g_layout, stream)?;
            let launch = backward_launch(
                x.dtype(),
                rows,
                vocab,
                xa.arg(),
                ta.arg(),
                la.arg(),
                ga.arg(),
                dlogits,
            )?;
            crate::cuda::run(&x.device, &launch)
        })?;
        Ok((out, x_layout.shape().clone()))
    }
}

/// The autograd node of [`token_logprobs`]: its forward hands over the logp the stats kernel already computed; its
/// backward runs [`logprob_backward`] from the logits (the op's input), the targets and lse.
struct TokenLogprob {
    targets: Tensor,
    lse: Tensor,
    /// Given up to the forward, so the graph holds no second copy.
    logp: HandOver,
}

impl CustomOp1 for TokenLogprob {
    fn name(&self) -> &'static str {
        "kto-token-logprobs"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.logp.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.logp.cuda()
    }

    fn bwd(&self, logits: &Tensor, _logp: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(logprob_backward(
            logits,
            &self.targets,
            &self.lse,
            grad,
        )?))
    }
}
