//! The KL sequences of a micro-batch as continuations of its target pass.
//!
//! TRL's KL sequence of sample i is prompt i followed by another sample's completion: its prompt is the target's.
//! Under a causal mask the prompt's keys and values do not depend on what follows, so the target pass's keys and
//! values of the prompt positions serve the KL sequence as they are, like a generation KV cache; only the KL
//! completions run through the model (packed end to end), and the first completion token is predicted from the
//! target pass's hidden state at the prompt's last position. The numbers equal a full pass over the KL sequences up
//! to floating-point summation order.

use crate::layout::{Segment, TokenLayout};
use crate::logprobs::ScoredTokens;
use anyhow::Result;
use kto_data::batch::SequenceBatch;

/// The continuation pass of a micro-batch's KL sequences over the target pass's prompt keys.
#[derive(Debug, Clone)]
pub(crate) struct KlContinuation {
    /// The KL completions packed in one row: positions continue each prompt, and the key ranges index the
    /// gathered keys of [`KlContinuation::key_gather`].
    pub(crate) layout: TokenLayout,
    /// The keys attention reads, sequence by sequence (its prompt's keys, then its completion's): indices into the
    /// target pass's keys flattened to one row, followed by the continuation's own keys.
    pub(crate) key_gather: Vec<u32>,
    /// Flat target-pass indices of each prompt's last position (rows with a non-empty prompt).
    pub(crate) prompt_ends: Vec<u32>,
    /// The scored KL completion tokens; sources index the hidden states `[prompt_ends…, continuation…]`.
    pub(crate) scored: ScoredTokens,
}

impl KlContinuation {
    /// Plans the continuation of `kl` over the pass of `target` laid out as `target_layout`; `None` when some KL
    /// row's prompt is not a prefix of its target row (then the KL sequences need a pass of their own).
    pub(crate) fn plan(
        target: &SequenceBatch,
        target_layout: &TokenLayout,
        kl: &SequenceBatch,
        window: Option<usize>,
    ) -> Result<Option<Self>> {
        crate::logprobs::check_batch(kl)?;
        if kl.rows != target.rows {
            return Ok(None);
        }
        let shares_prompt = |r: usize| {
            let prompt = kl.completion_starts[r];
            prompt <= target.lengths[r] && kl.row(r)[..prompt] == target.row(r)[..prompt]
        };
        if !(0..kl.rows).all(shares_prompt) {
            return Ok(None);
        }
        let target_keys = target_layout.forward_tokens();
        // The scored tokens' hidden states are the prompt ends (one per non-empty prompt), then the continuation.
        let prompt_rows = kl.completion_starts.iter().filter(|&&p| p > 0).count();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut key_ranges = Vec::new();
        let mut key_gather = Vec::new();
        let mut sequence_starts = Vec::with_capacity(kl.rows);
        let mut segments = Vec::with_capacity(kl.rows);
        let mut prompt_ends = Vec::new();
        let mut scored = ScoredTokens::default();
        for r in 0..kl.rows {
            let prompt = kl.completion_starts[r];
            let completion = &kl.row(r)[prompt..];
            let own_start = ids.len();
            let key_start = key_gather.len();
            sequence_starts.push(own_start);
            let target_start = target_layout.sequence_starts[r];
            key_gather.extend((target_start..target_start + prompt).map(|i| i as u32));
            key_gather.extend(
                (own_start..own_start + completion.len()).map(|i| (target_keys + i) as u32),
            );
            segments.push(Segment {
                queries: own_start..own_start + completion.len(),
                keys: key_start..key_start + prompt + completion.len(),
                offset: prompt,
            });
            for (j, &id) in completion.iter().enumerate() {
                let position = prompt + j;
                ids.push(id);
                positions.push(position as u32);
                let end = key_start + position + 1;
                let first = window.map_or(key_start, |w| key_start.max(end.saturating_sub(w)));
                key_ranges.push([first as u32, end as u32]);
            }
            // Token p is predicted from position p - 1: the prompt's last position (target pass) for the first
            // completion token, the continuation's own positions after it. Position 0 is never scored.
            if prompt > 0 {
                prompt_ends.push((target_start + prompt - 1) as u32);
            }
            let first_scored = prompt.max(1);
            for p in first_scored..prompt + completion.len() {
                scored.sources.push(if p == prompt {
                    (prompt_ends.len() - 1) as u32
                } else {
                    (prompt_rows + own_start + p - 1 - prompt) as u32
                });
                scored.targets.push(completion[p - prompt]);
            }
            scored
                .counts
                .push((prompt + completion.len()).saturating_sub(first_scored));
        }
        let width = ids.len();
        Ok(Some(Self {
            layout: TokenLayout {
                ids,
                positions,
                tensor_rows: 1,
                width,
                key_ranges,
                sequence_starts,
                segments,
            },
            key_gather,
            prompt_ends,
            scored,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_each_prompt_with_its_kl_completion() -> Result<()> {
        // Targets: [1 2 | 3 4], [5 | 6]; KL: [1 2 | 6], [5 | 3 4].
        let target =
            SequenceBatch::from_rows([(&[1, 2][..], &[3, 4][..]), (&[5][..], &[6][..])], None, 0);
        let kl =
            SequenceBatch::from_rows([(&[1, 2][..], &[6][..]), (&[5][..], &[3, 4][..])], None, 0);
        let layout = TokenLayout::padded(&target, None)?;
        let plan = KlContinuation::plan(&target, &layout, &kl, None)?.expect("prompts shared");
        assert_eq!(plan.layout.ids, vec![6, 3, 4]);
        assert_eq!(plan.layout.positions, vec![2, 1, 2]);
        // Padded targets of width 4 flatten to 8 keys; the continuation's own keys follow at 8, 9, 10.
        assert_eq!(plan.key_gather, vec![0, 1, 8, 4, 9, 10]);
        assert_eq!(plan.layout.key_ranges, vec![[0, 3], [3, 5], [3, 6]]);
        assert_eq!(plan.prompt_ends, vec![1, 4]);
        // Row 0 scores 6 from prompt end 0; row 1 scores 3 from prompt end 1 and 4 from continuation token 1.
        assert_eq!(plan.scored.sources, vec![0, 1, 2 + 1]);
        assert_eq!(plan.scored.targets, vec![6, 3, 4]);
        assert_eq!(plan.scored.counts, vec![1, 2]);
        Ok(())
    }

    #[test]
    fn a_different_prompt_needs_its_own_pass() -> Result<()> {
        let target = SequenceBatch::from_rows([(&[1, 2][..], &[3][..])], None, 0);
        let kl = SequenceBatch::from_rows([(&[1, 9][..], &[3][..])], None, 0);
        let layout = TokenLayout::padded(&target, None)?;
        assert!(KlContinuation::plan(&target, &layout, &kl, None)?.is_none());
        Ok(())
    }
}
