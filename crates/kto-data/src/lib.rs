//! Preference data for KTO: input formats, HH-RLHF conversion, TRL's tokenization, batches.
//!
//! data files ([`sources`]: JSON, compressed JSON, Parquet, Arrow, CSV, folders, globs; [`hub`]: a data set in the
//! Hugging Face cache) → [`formats`] (+ [`hh`]) → [`Sample`]s → [`tokenize`] (+ [`chat_template`]) → [`TokenizedSample`]s
//! → [`batch`] → [`SequenceBatch`]es; [`balance`] for class weights; [`prepare`] for `kto prepare`.
pub mod atomic;
pub mod balance;
pub mod batch;
pub mod chat_template;
pub mod dataset_card;
pub mod drops;
pub mod faults;
pub mod formats;
pub mod hh;
pub mod hub;
pub mod prepare;
pub mod sample;
pub mod sources;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod tokenize;

pub use balance::ClassCounts;
pub use batch::{BatchConfig, BatchOrder, KlPairing, MicroBatch, MicroBatches, SequenceBatch};
pub use formats::{Format, ReadOptions, ReadReport};
pub use sample::{Message, Sample, Text};
pub use tokenize::{TokenizationConfig, TokenizedSample, TokenizerBundle, TruncationMode};
