//! Llama-family models with LoRA adapters on candle: checkpoints, forward and backward over right-padded batches,
//! per-sequence log-probs, PEFT adapter files, merging and generation.

pub mod checkpoint;
pub mod config;
pub mod device;
mod files;
pub mod frozen_linear;
pub mod generate;
pub mod llama;
pub mod logprobs;
pub mod lora;
pub mod merge;
pub mod peft;
pub mod testing;

pub use checkpoint::Checkpoint;
pub use config::{ModelConfig, ModelType, RopeScaling};
pub use device::{open_device, parse_dtype, DeviceSpec};
pub use frozen_linear::FrozenLinear;
pub use generate::{generate, Generation, GenerationOptions, StopReason};
pub use kto_data::batch::SequenceBatch;
pub use llama::{AdapterChoice, KvCache, LlamaModel};
pub use logprobs::SequenceLogps;
pub use lora::{LoraAdapter, LoraConfig, LoraTarget};
pub use merge::merge_to_checkpoint;
pub use peft::{load_adapter, save_adapter};
