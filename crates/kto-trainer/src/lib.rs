//! KTO training against a frozen reference, matching TRL 1.16's `KTOTrainer` inside transformers 5.17's `Trainer`.
//!
//! - [`config`]: the TOML config (TRL's key names and defaults), `--set` overrides, validation, `--print-config`.
//! - [`base_model`]: `[model]` → the loaded base model, tokenizer and device (every command that loads a model).
//! - [`from_config`]: `kto train` / `kto eval` from a config → model, adapters, tokenized data, resolved `"auto"` weights, cached reference log-probs →
//!   [`train::train`] (`kto train`), or → [`evaluate::evaluate_batches`] (`kto eval`).
//! - [`run_dir`]: the one owner of `output_dir`: its file names, the lock, how a run starts there (refuse,
//!   `--overwrite`, the checkpoint `--resume` continues from), the `checkpoint-N` folders, metrics.jsonl and its
//!   TensorBoard twin ([`tensorboard`]: event files with transformers' tags, `[train] report_to`).
//! - [`train`]: the loop, one function that reads top to bottom, over any [`forward::PolicyModel`]
//!   ([`llama_policy::LoraPolicy`] for `kto-model`'s LoRA Llama).
//! - The pieces: [`loss`] (KTO / APO-zero-unpaired and TRL's batch metrics), [`optimizer`] (torch's AdamW and
//!   `clip_grad_norm_`), [`schedule`] (transformers' schedules), [`plan`] (steps, epochs, accumulation groups),
//!   [`metrics`] (metrics.jsonl rows averaged as TRL/transformers do), [`checkpoint`] (one atomic, checksummed
//!   checkpoint folder and its trainer state), [`reference_cache`] (precomputed reference log-probs on disk),
//!   [`evaluate`] (held-out loss, rewards, reward accuracy, AUROC, pair accuracy), [`policy`] (what the loop asks
//!   of a model and how one micro-batch is scored), [`progress`] (steps, precompute and evaluation reported to an
//!   observer), [`stop`] (graceful stop on request or signal).
//! - [`world`]: the processes training one run together (data parallelism) and the sums the step gathers over them;
//!   `nccl` (feature `nccl`): the gradient sum on GPUs through NCCL.
//! - [`hooks`]: what a caller passes to watch and steer a run (progress, stop, test probes); nothing is global.
pub mod base_model;
pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod from_config;
pub mod hooks;
pub mod llama_policy;
pub mod loss;
pub mod metrics;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optimizer;
pub mod plan;
pub mod policy;
pub mod progress;
pub mod reference_cache;
pub mod run_dir;
pub mod schedule;
pub mod stop;
pub mod tensorboard;
pub mod train;
pub mod world;
