//! KTO training against a frozen reference, matching TRL 1.16's `KTOTrainer`.
//!
//! `config` reads the TOML config; `train` runs the loop over a [`forward::PolicyModel`] and tokenized samples;
//! `evaluate` scores a held-out set; the other modules are the pieces the loop is made of.
pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod forward;
pub mod llama_policy;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod plan;
pub mod reference_cache;
pub mod run;
pub mod schedule;
pub mod train;
