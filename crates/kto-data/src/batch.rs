//! Batches for the forward pass: right-padded sequences, KL pairing, batch order.

/// Right-padded token sequences for one forward pass.
///
/// Row `r` holds `lengths[r]` real tokens followed by `pad_id`; its completion (the tokens whose log-probs are
/// scored) is `input_ids[r * width + completion_starts[r] .. r * width + lengths[r]]`, each token predicted from the
/// logits one position earlier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceBatch {
    /// `rows × width` token ids, row-major.
    pub input_ids: Vec<u32>,
    pub rows: usize,
    pub width: usize,
    pub lengths: Vec<usize>,
    pub completion_starts: Vec<usize>,
    pub pad_id: u32,
}
