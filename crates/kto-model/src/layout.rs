//! How one forward pass lays out a batch's tokens: right-padded rows, or every sequence packed end to end in one row
//! (no padding: positions restart at each sequence, attention never crosses a boundary).
//!
//! Both layouts give the same per-token results; packing only drops the padded positions, which cost a GEMM row in
//! every linear of every layer. The [`TokenLayout`] also says where each sequence's first token sits in the flattened
//! `[tensor rows × width]` token order, which is all the log-prob gathering needs to know.

use anyhow::{bail, Result};
use kto_data::batch::SequenceBatch;
use kto_kernels::attention::AttentionMask;

/// The tokens of one forward: `ids` and `positions` are `tensor_rows × width`, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenLayout {
    pub(crate) ids: Vec<u32>,
    pub(crate) positions: Vec<u32>,
    pub(crate) tensor_rows: usize,
    pub(crate) width: usize,
    /// The keys each query sees, row-major `[tensor_rows, width]`.
    pub(crate) key_ranges: Vec<[u32; 2]>,
    /// Flat index (`row · width + column`) of each sequence's position 0.
    pub(crate) sequence_starts: Vec<usize>,
    /// The independent blocks of a one-row layout (empty when the rows are the blocks): attention can run block by
    /// block, which a dense (GEMM) attention needs to avoid scoring every query against every key of the row.
    pub(crate) segments: Vec<Segment>,
}

/// One block of a one-row layout: queries `queries` see only keys in `keys`, causally, the first query sitting at
/// key `offset` of the block (0 for a packed sequence; a continuation's prompt length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) queries: std::ops::Range<usize>,
    pub(crate) keys: std::ops::Range<usize>,
    pub(crate) offset: usize,
}

impl TokenLayout {
    /// The batch as it is: `rows × width`, right-padded, causal within each row.
    pub(crate) fn padded(batch: &SequenceBatch, window: Option<usize>) -> Result<Self> {
        let (rows, width) = (batch.rows, batch.width);
        Ok(Self {
            ids: batch.input_ids.clone(),
            positions: (0..rows).flat_map(|_| 0..width as u32).collect(),
            tensor_rows: rows,
            width,
            key_ranges: AttentionMask::causal_ranges(&batch.lengths, width, 0, window)?,
            sequence_starts: (0..rows).map(|r| r * width).collect(),
            segments: Vec::new(),
        })
    }

    /// Every row's real tokens end to end in one row of `Σ lengths` tokens.
    pub(crate) fn packed(batch: &SequenceBatch, window: Option<usize>) -> Result<Self> {
        let total = batch.num_tokens();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut boundaries = vec![0];
        for r in 0..batch.rows {
            let row = batch.row(r);
            ids.extend_from_slice(row);
            positions.extend(0..row.len() as u32);
            boundaries.push(ids.len());
        }
        let sequence_starts = boundaries[..batch.rows].to_vec();
        let segments = boundaries
            .windows(2)
            .map(|b| Segment {
                queries: b[0]..b[1],
                keys: b[0]..b[1],
                offset: 0,
            })
            .collect();
        Ok(Self {
            segments,
            key_ranges: AttentionMask::packed_ranges(&[boundaries], total, window)?,
            ids,
            positions,
            tensor_rows: 1,
            width: total,
            sequence_starts,
        })
    }

    /// Packed when `packed` and the batch has padding to drop, else padded.
    pub(crate) fn of(batch: &SequenceBatch, packed: bool, window: Option<usize>) -> Result<Self> {
        if batch.lengths.len() != batch.rows || batch.input_ids.len() != batch.rows * batch.width {
            bail!(
                "inconsistent SequenceBatch: {} ids and {} lengths for {} × {}",
                batch.input_ids.len(),
                batch.lengths.len(),
                batch.rows,
                batch.width
            );
        }
        if packed && batch.rows > 1 && batch.num_tokens() < batch.rows * batch.width {
            Self::packed(batch, window)
        } else {
            Self::padded(batch, window)
        }
    }

    /// Tokens pushed through the model, padding included.
    pub(crate) fn forward_tokens(&self) -> usize {
        self.tensor_rows * self.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> SequenceBatch {
        SequenceBatch::from_rows(
            [(&[1, 2, 3][..], &[4, 5][..]), (&[7, 8][..], &[9][..])],
            None,
            0,
        )
    }

    #[test]
    fn packing_drops_the_padding_and_restarts_positions() -> Result<()> {
        let packed = TokenLayout::of(&batch(), true, None)?;
        assert_eq!(packed.ids, vec![1, 2, 3, 4, 5, 7, 8, 9]);
        assert_eq!(packed.positions, vec![0, 1, 2, 3, 4, 0, 1, 2]);
        assert_eq!((packed.tensor_rows, packed.width), (1, 8));
        assert_eq!(packed.sequence_starts, vec![0, 5]);
        // The second sequence's queries see only its own keys.
        assert_eq!(packed.key_ranges[5..], [[5, 6], [5, 7], [5, 8]]);
        assert_eq!(packed.forward_tokens(), 8);

        let padded = TokenLayout::of(&batch(), false, None)?;
        assert_eq!((padded.tensor_rows, padded.width), (2, 5));
        assert_eq!(padded.sequence_starts, vec![0, 5]);
        assert_eq!(padded.positions[5..], [0, 1, 2, 3, 4]);
        assert_eq!(padded.key_ranges[8..], [[0, 0], [0, 0]]);
        assert_eq!(padded.forward_tokens(), 10);
        Ok(())
    }

    #[test]
    fn a_batch_without_padding_stays_as_it_is() -> Result<()> {
        let full =
            SequenceBatch::from_rows([(&[1, 2][..], &[3][..]), (&[4][..], &[5, 6][..])], None, 0);
        assert_eq!(
            TokenLayout::of(&full, true, None)?,
            TokenLayout::padded(&full, None)?
        );
        Ok(())
    }
}
