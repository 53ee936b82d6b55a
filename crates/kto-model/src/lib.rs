//! Llama-family models with LoRA adapters on candle: checkpoints, forward and backward over packed or right-padded
//! batches, KL sequences as continuations of their targets' prompts, per-sequence log-probs, PEFT adapter files, merging and generation.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use kto_model::{AdapterChoice, ModelFiles, LlamaModel, LoraAdapter, LoraConfig, LoraTarget, ModelOptions, SequenceBatch};
//! let device = kto_model::open_device("auto")?;
//! let checkpoint = ModelFiles::locate("TinyLlama/TinyLlama-1.1B-Chat-v1.0")?; // folder or cached hub id
//! let mut model = LlamaModel::load(&checkpoint, kto_model::parse_dtype("bf16")?, &device)?;
//! let lora = LoraConfig::new(8, 16.0, 0.05, false, &LoraTarget::ALL)?;
//! model.set_policy_adapter(Some(LoraAdapter::init(lora, model.config(), 42, &device)?))?;
//! // optional: recompute layers in backward (the other options keep their defaults)
//! model.set_options(ModelOptions { gradient_checkpointing: true, ..ModelOptions::default() });
//! model.set_training(true, 7)?; // LoRA dropout on, seeded
//! let batch = SequenceBatch { input_ids: vec![1, 5, 6, 2], rows: 1, width: 4, lengths: vec![4], completion_starts: vec![2], pad_id: 2 };
//! let policy = model.sequence_logps(&batch, AdapterChoice::Policy)?; // logps [rows] with graph
//! let reference = model.sequence_logps(&batch, AdapterChoice::Reference)?; // no graph
//! let loss = (&policy.logps - &reference.logps)?.sum_all()?;
//! let grads = model.backward(&loss)?; // = loss.backward() plus gradients from checkpointed layers
//! for (peft_name, var) in model.trainable_vars() {
//!     let _g = grads.get(var.as_tensor());
//! }
//! kto_model::save_adapter(model.policy_adapter().unwrap(), std::path::Path::new("out/adapter"), "TinyLlama/TinyLlama-1.1B-Chat-v1.0")?;
//! # Ok(()) }
//! ```

pub mod base_weights;
mod block_decode;
pub mod config;
pub mod device;
pub mod files;
pub mod frozen_linear;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod gguf_vocab;
pub mod gguf_write;
mod kl_continuation;
mod layer;
mod layout;
pub mod llama;
pub mod logprobs;
pub mod lora;
pub mod lora_gguf;
pub mod merge;
pub mod model_files;
pub mod peft;
mod recompute;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use base_weights::Quantization;
pub use config::{ModelConfig, ModelType, RopeScaling};
pub use device::{open_device, parse_dtype, DeviceSpec};
pub use frozen_linear::{FrozenLinear, FrozenWeight};
pub use generate::{generate, Generation, GenerationOptions, StopReason};
pub use gguf_write::GgufDType;
pub use kto_data::batch::SequenceBatch;
pub use llama::{AdapterChoice, KvCache, LlamaModel, ModelOptions};
pub use logprobs::SequenceLogps;
pub use lora::{LoraAdapter, LoraConfig, LoraTarget};
pub use merge::{convert_to_checkpoint, merge_to_checkpoint, merge_to_gguf};
pub use model_files::{ModelFiles, ModelFormat};
pub use peft::{load_adapter, save_adapter};
