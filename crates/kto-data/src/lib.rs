//! Preference data for KTO: input formats, HH-RLHF conversion, TRL's tokenization, batches.
pub mod batch;

pub use batch::SequenceBatch;
