//! The options `kto eval`, `export`, `generate` and `chat` share (config, `--set`, `--adapter`), and how they turn
//! into a config, an adapter folder and the base model; `kto tokenize` shares the config part ([`ConfigSource`]).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use kto_model::ModelFiles;
use kto_trainer::config::{Config, Override};
use kto_trainer::run_dir::{RunDir, FINAL_ADAPTER_DIR};

/// Which config, overrides and adapter a command works on.
#[derive(Debug, Args)]
pub struct ModelSource {
    /// The TOML config (the same file as for `kto train`): [model] is the base model, [train] output_dir holds the
    /// trained adapter.
    #[arg(long)]
    pub config: PathBuf,
    /// Override one config key, e.g. --set model.device=cuda or --set data.eval_file=test.jsonl (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<Override>,
    /// A PEFT adapter folder or a llama.cpp adapter .gguf file [default: output_dir/adapter when it exists, else
    /// [lora] init_adapter, else none].
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelSource {
    /// The config with the overrides applied, and the adapter: `--adapter`, else `output_dir/adapter` when
    /// training wrote one, else `[lora] init_adapter`, else none; none at all with `no_adapter`.
    pub fn load(&self, no_adapter: bool) -> Result<(Config, Option<PathBuf>)> {
        let config = Config::load(&self.config, &self.sets)?;
        let adapter = if no_adapter {
            None
        } else {
            self.choose_adapter(&config)?
        };
        Ok((config, adapter))
    }

    fn choose_adapter(&self, config: &Config) -> Result<Option<PathBuf>> {
        if let Some(dir) = &self.adapter {
            if !is_adapter(dir) {
                bail!(
                    "--adapter {}: no adapter_config.json there, and not a .gguf file. Pass the folder `kto train` wrote \
                     (output_dir/{FINAL_ADAPTER_DIR}, or adapter/ inside a checkpoint-N folder), an adapter .gguf file, \
                     or train first with `kto train --config {}`",
                    dir.display(),
                    self.config.display()
                );
            }
            return Ok(Some(dir.clone()));
        }
        let trained = config
            .train
            .output_dir
            .as_ref()
            .map(|d| RunDir::new(d).final_adapter())
            .filter(|d| is_adapter(d));
        Ok(trained.or_else(|| config.lora.init_adapter.clone()))
    }

    /// The base model of `[model] path` (a folder, a .gguf file or a hub id in the local cache).
    pub fn base_model(&self, config: &Config) -> Result<ModelFiles> {
        base_model(&self.config, config)
    }
}

/// A config and its overrides, without an adapter (`kto tokenize`).
#[derive(Debug, Args)]
pub struct ConfigSource {
    /// The TOML config (the same file as for `kto train`): [model] path names the model.
    #[arg(long)]
    pub config: PathBuf,
    /// Override one config key, e.g. --set model.path=model.gguf (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<Override>,
}

impl ConfigSource {
    /// The config with the overrides applied and its base model.
    pub fn load(&self) -> Result<(Config, ModelFiles)> {
        let config = Config::load(&self.config, &self.sets)?;
        let checkpoint = base_model(&self.config, &config)?;
        Ok((config, checkpoint))
    }
}

fn base_model(config_path: &Path, config: &Config) -> Result<ModelFiles> {
    let spec = config.model.path.as_ref().with_context(|| {
        format!(
            "{}: [model] path is not set (a model folder, a .gguf file or a hub id: the base model the adapter was \
             trained on); add it or pass --set model.path=DIR",
            config_path.display()
        )
    })?;
    ModelFiles::locate(&spec.to_string_lossy())
}

/// A PEFT folder, or a llama.cpp adapter GGUF file (`kto export --adapter-only`).
fn is_adapter(path: &Path) -> bool {
    path.join("adapter_config.json").is_file()
        || (kto_model::gguf::is_gguf_path(path) && path.is_file())
}
