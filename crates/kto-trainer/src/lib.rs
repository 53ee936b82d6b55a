//! KTO training against a frozen reference, matching TRL 1.16's `KTOTrainer`.
pub mod config;
