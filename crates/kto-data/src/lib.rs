//! Preference data for KTO: input formats, HH-RLHF conversion, TRL's tokenization, batches.
pub mod batch;
pub mod chat_template;
pub mod drops;
pub mod formats;
pub mod hh;
pub mod sample;
pub mod tokenize;

pub use batch::SequenceBatch;
pub use formats::Format;
pub use sample::{Message, Sample, Text};
