//! Per-sequence completion log-probs, plus the mean-logit and entropy sums TRL logs, from the final hidden states.
//!
//! Only the positions that predict a completion token go through the LM head, in chunks of tokens, and each chunk's
//! logits (model dtype) go through `kto-kernels`' fused log-prob op: one pass gives log p(target), the entropy, the
//! mean logit and the log-sum-exp in f32, with no f32 copy of the logits. The gradient is not taken through the
//! logits at all: for each chunk the exact gradient of `log p(target)` with respect to the final hidden state,
//! `Wᵀ(onehot − softmax)`, is computed right away, and the per-token log-prob is returned as
//! `value + (h·J − stop_grad(h·J))` — equal to the value, with gradient `J` for `h`. Backward then needs neither the
//! logits nor a second LM-head pass, like TRL's fused LM head (`trl/kernels/chunked_logprob.py`).

use crate::frozen_linear::FrozenLinear;
use crate::layout::TokenLayout;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use kto_data::batch::SequenceBatch;
use kto_kernels::logprobs::{logprob_backward, logprob_stats, ENTROPY, LOGP, LSE, MEAN_LOGIT};

/// Default f32 budget for one chunk of logits (the chunk's token count is this divided by the vocabulary size):
/// 64 MiB per [chunk × vocab] tensor.
pub const DEFAULT_LOGITS_CHUNK_ELEMENTS: usize = 16 * 1024 * 1024;

/// Per-row results of [`LlamaModel::sequence_logps`].
#[derive(Debug, Clone)]
pub struct SequenceLogps {
    /// Σ log p(token) over each row's completion, f32 [rows]; carries the LoRA gradient for `AdapterChoice::Policy`.
    pub logps: Tensor,
    /// Number of scored completion tokens per row.
    pub token_counts: Vec<usize>,
    /// Σ over the completion positions of the vocabulary-mean logit (TRL's `logits/*` numerator).
    pub mean_logit_sums: Vec<f64>,
    /// Σ over the completion positions of the softmax entropy (TRL's `entropy` numerator).
    pub entropy_sums: Vec<f64>,
    /// Tokens the pass pushed through the decoder (padding included; a KL continuation counts only its own).
    pub forward_tokens: usize,
}

impl SequenceLogps {
    /// The log-probs as plain numbers (no graph).
    pub fn logps_vec(&self) -> Result<Vec<f32>> {
        Ok(self.logps.to_dtype(DType::F32)?.to_vec1()?)
    }
}

/// Which hidden states predict which tokens: for every scored token, the flat index of the hidden state one
/// position earlier and the token id, row by row.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScoredTokens {
    pub(crate) sources: Vec<u32>,
    pub(crate) targets: Vec<u32>,
    /// Scored tokens per row.
    pub(crate) counts: Vec<usize>,
}

impl ScoredTokens {
    /// The completion tokens of `batch` laid out as `layout` (flat hidden index = sequence start + position).
    pub(crate) fn of_layout(batch: &SequenceBatch, layout: &TokenLayout) -> Result<Self> {
        check_batch(batch)?;
        let mut out = Self::default();
        for r in 0..batch.rows {
            let row = batch.row(r);
            // Position 0 has no earlier logits to be predicted from (TRL's shifted labels drop it too).
            let start = batch.completion_starts[r].max(1);
            for (p, &token) in row.iter().enumerate().skip(start) {
                out.sources.push((layout.sequence_starts[r] + p - 1) as u32);
                out.targets.push(token);
            }
            out.counts.push(row.len().saturating_sub(start));
        }
        Ok(out)
    }
}

/// Log-probs of the `scored` tokens, summed per row, from final hidden states (any shape whose last dimension is
/// the hidden size; `scored.sources` index them flattened) through `lm_head`, in chunks of at most
/// `chunk_elements / vocab` tokens; with `grad`, `logps` carries the gradient for the hidden states (and through
/// them the LoRA weights). `forward_tokens` is passed through to the result.
pub(crate) fn completion_logps(
    hidden: &Tensor,
    scored: &ScoredTokens,
    lm_head: &FrozenLinear,
    chunk_elements: usize,
    grad: bool,
    forward_tokens: usize,
) -> Result<SequenceLogps> {
    let device = hidden.device().clone();
    let hidden_size = lm_head.in_features();
    let vocab = lm_head.out_features();
    let total = scored.targets.len();
    let mut token_logps = Vec::new();
    let mut mean_logits = Vec::with_capacity(total);
    let mut entropies = Vec::with_capacity(total);
    if total > 0 {
        let sources = Tensor::from_slice(&scored.sources, total, &device)?;
        let targets = Tensor::from_slice(&scored.targets, total, &device)?;
        let selected = hidden
            .reshape((hidden.elem_count() / hidden_size, hidden_size))?
            .index_select(&sources, 0)?;
        let chunk = (chunk_elements / vocab.max(1)).max(1);
        let mut start = 0;
        while start < total {
            let n = chunk.min(total - start);
            let h = selected.narrow(0, start, n)?;
            let target = targets.narrow(0, start, n)?;
            let logits = lm_head.forward(&h.detach())?;
            let stats = logprob_stats(&logits, &target)?;
            let column = |c: usize| -> Result<Tensor> {
                Ok(stats.narrow(1, c, 1)?.squeeze(1)?.contiguous()?)
            };
            entropies.extend(column(ENTROPY)?.to_vec1::<f32>()?);
            mean_logits.extend(column(MEAN_LOGIT)?.to_vec1::<f32>()?);
            let target_logp = column(LOGP)?;
            let logp = if grad {
                let ones = Tensor::ones(n, DType::F32, &device)?;
                let grad_logits = logprob_backward(&logits, &target, &column(LSE)?, &ones)?;
                drop(logits);
                // d log p(target) / d h = Wᵀ (onehot − softmax), with the GEMM in the model dtype as torch does.
                let jacobian = lm_head.input_gradient(&grad_logits)?.to_dtype(DType::F32)?;
                let surrogate = h.to_dtype(DType::F32)?.mul(&jacobian)?.sum(1)?;
                (target_logp + (&surrogate - surrogate.detach())?)?
            } else {
                target_logp
            };
            token_logps.push(logp);
            start += n;
        }
    }
    let token_logps = if token_logps.is_empty() {
        Tensor::zeros(0, DType::F32, &device)?
    } else {
        Tensor::cat(&token_logps, 0)?
    };
    let mut row_logps = Vec::with_capacity(scored.counts.len());
    let (mut mean_logit_sums, mut entropy_sums) = (Vec::new(), Vec::new());
    let mut offset = 0;
    for &count in &scored.counts {
        row_logps.push(if count == 0 {
            Tensor::zeros((), DType::F32, &device)?
        } else {
            token_logps.narrow(0, offset, count)?.sum_all()?
        });
        let sum = |values: &[f32]| {
            values[offset..offset + count]
                .iter()
                .map(|&v| v as f64)
                .sum()
        };
        mean_logit_sums.push(sum(&mean_logits));
        entropy_sums.push(sum(&entropies));
        offset += count;
    }
    let logps = if row_logps.is_empty() {
        Tensor::zeros(0, DType::F32, &device)?
    } else {
        Tensor::stack(&row_logps, 0)?
    };
    Ok(SequenceLogps {
        logps,
        token_counts: scored.counts.clone(),
        mean_logit_sums,
        entropy_sums,
        forward_tokens,
    })
}

/// Checks that `batch` is consistent (the model calls this before running the decoder).
pub(crate) fn check_batch(batch: &SequenceBatch) -> Result<()> {
    let (rows, width) = (batch.rows, batch.width);
    if batch.input_ids.len() != rows * width
        || batch.lengths.len() != rows
        || batch.completion_starts.len() != rows
    {
        bail!(
            "inconsistent SequenceBatch: {} ids, {} lengths and {} completion starts for {rows} × {width}",
            batch.input_ids.len(),
            batch.lengths.len(),
            batch.completion_starts.len()
        );
    }
    for r in 0..rows {
        let (start, len) = (batch.completion_starts[r], batch.lengths[r]);
        if len > width || start > len {
            bail!(
                "SequenceBatch row {r}: completion {start}..{len} does not fit a width of {width}"
            );
        }
    }
    Ok(())
}

/// Per-row results of an empty batch (no rows or no columns).
pub(crate) fn empty_logps(rows: usize, device: &candle_core::Device) -> Result<SequenceLogps> {
    let zeros = vec![0.0; rows];
    Ok(SequenceLogps {
        logps: Tensor::zeros(rows, DType::F32, device)?,
        token_counts: vec![0; rows],
        mean_logit_sums: zeros.clone(),
        entropy_sums: zeros,
        forward_tokens: 0,
    })
}
