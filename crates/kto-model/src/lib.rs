//! Llama-family models with LoRA adapters on candle: checkpoints, forward and backward over right-padded batches,
//! per-sequence log-probs, PEFT adapter files, merging and generation.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod frozen_linear;

pub use checkpoint::Checkpoint;
pub use config::{ModelConfig, ModelType, RopeScaling};
pub use device::{open_device, parse_dtype, DeviceSpec};
pub use frozen_linear::FrozenLinear;
