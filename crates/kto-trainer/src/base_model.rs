//! The one way from a config's `[model]` to a loaded base model: locate the checkpoint, open the device, load the
//! weights in the config's dtype (held as `quantize` says) with the config's [`ModelOptions`], read the tokenizer. `kto train` / `kto eval`
//! ([`crate::from_config::load_model`]) and `kto generate` / `kto chat` install their adapters on top of it.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use kto_data::tokenize::TokenizerBundle;
use kto_model::lora::LoraAdapter;
use kto_model::{LlamaModel, ModelFiles, ModelOptions};

use crate::config::Config;

/// A base model without adapters, with what was loaded alongside it.
pub struct BaseModel {
    pub model: LlamaModel,
    pub tokenizer: TokenizerBundle,
    pub checkpoint: ModelFiles,
    pub device: Device,
}

impl BaseModel {
    /// Locates `[model] path` (a folder, a `.gguf` file or a hub id in the local cache) and loads it.
    pub fn load(config: &Config) -> Result<Self> {
        let spec = config
            .model
            .path
            .as_ref()
            .context("[model] path is not set")?;
        Self::from_checkpoint(config, ModelFiles::locate(&spec.to_string_lossy())?)
    }

    /// Loads `checkpoint` (already located) on `[model] device` in `[model] dtype`, its matrices held as
    /// `[model] quantize` says.
    pub fn from_checkpoint(config: &Config, checkpoint: ModelFiles) -> Result<Self> {
        let device = kto_model::open_device(&config.model.device)?;
        let mut model = LlamaModel::load_quantized(
            &checkpoint,
            config.model.dtype.into(),
            &device,
            config.model.quantize,
        )?;
        model.set_options(model_options(config));
        let tokenizer = checkpoint.tokenizer()?;
        Ok(Self {
            model,
            tokenizer,
            checkpoint,
            device,
        })
    }

    /// Reads the PEFT adapter in `dir` for this model, on its device (checked against the model's shapes when
    /// installed).
    pub fn load_adapter(&self, dir: &Path) -> Result<LoraAdapter> {
        kto_model::peft::load_adapter(dir, &self.checkpoint.config, &self.device)
    }
}

/// How the model runs its passes, from `[kto] padding_free`, `[kto] kl_prefix_sharing` and
/// `[train] gradient_checkpointing`; the rest at [`ModelOptions`]' defaults.
pub fn model_options(config: &Config) -> ModelOptions {
    ModelOptions {
        padding_free: config.kto.padding_free,
        kl_prefix_sharing: config.kto.kl_prefix_sharing,
        gradient_checkpointing: config.train.gradient_checkpointing,
        ..ModelOptions::default()
    }
}
