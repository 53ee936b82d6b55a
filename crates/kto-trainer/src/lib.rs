//! KTO training against a frozen reference, matching TRL 1.16's `KTOTrainer`.
pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod plan;
pub mod reference_cache;
pub mod schedule;
