//! Locating a Hugging Face checkpoint (a folder, or a hub id in the local cache) and memory-mapping its weights.
//!
//! There is no network access: a hub id must already be in the cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), laid out as `huggingface_hub` writes it (`models--org--name/refs/main` →
//! `snapshots/<commit>/...`).

use crate::config::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
pub const SHARDED_INDEX_FILE: &str = "model.safetensors.index.json";

/// Files that travel with a model besides its weights (copied by `merge`).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// A located checkpoint: its folder, parsed config and the safetensors files holding its weights.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weight_files: Vec<PathBuf>,
}

impl Checkpoint {
    /// `spec` is a folder, or a hub id (`org/name`, optionally `org/name@revision`) in the default cache.
    pub fn locate(spec: &str) -> Result<Self> {
        Self::locate_with_cache(spec, &default_cache_dir()?)
    }

    /// Like [`Checkpoint::locate`] with an explicit hub cache folder (the one holding `models--*`).
    pub fn locate_with_cache(spec: &str, cache_dir: &Path) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if path.exists() {
            bail!("model `{spec}` is a file; expected a checkpoint folder (with {CONFIG_FILE}) or a hub id");
        }
        let (repo_id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (spec, "main"),
        };
        let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
        let repo = hf_hub::Repo::with_revision(
            repo_id.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let repo_folder = cache_dir.join(repo.folder_name());
        let Some(config_path) = cache.repo(repo.clone()).get(CONFIG_FILE) else {
            bail!(
                "model `{spec}` not found: no folder `{spec}`, and no {CONFIG_FILE} for revision `{revision}` in the \
                 Hugging Face cache at {} (the cache is HF_HUB_CACHE, else HF_HOME/hub, else \
                 ~/.cache/huggingface/hub). On a machine with network, run `hf download {repo_id}` (or \
                 `huggingface-cli download {repo_id}`) and copy its cache folder here, or pass a checkpoint folder",
                repo_folder.display()
            );
        };
        let dir = config_path
            .parent()
            .context("cached config.json has no parent folder")?;
        Self::from_dir(dir)
    }

    /// A folder with `config.json` and `model.safetensors` or `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            bail!("{}: missing {CONFIG_FILE}", dir.display());
        }
        let config = ModelConfig::from_file(&config_path)?;
        let weight_files = weight_files(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weight_files,
        })
    }

    /// Memory-maps every weight file; tensors are converted to `dtype` on `device` only when fetched.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        // SAFETY: the files are mapped read-only; modifying them while the model is loaded is unsupported.
        unsafe { VarBuilder::from_mmaped_safetensors(&self.weight_files, dtype, device) }
            .with_context(|| format!("cannot map the safetensors files of {}", self.dir.display()))
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
}

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn default_cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Ok(PathBuf::from(home).join("hub"));
    }
    let home = std::env::var_os("HOME").context("neither HF_HUB_CACHE, HF_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/huggingface/hub"))
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(SHARDED_INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing object key `weight_map`", index.display()))?;
        let mut files: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().with_context(|| {
                format!(
                    "{}: `weight_map.{tensor}` must be a file name",
                    index.display()
                )
            })?;
            if !files.contains(&file) {
                files.push(file);
            }
        }
        files.sort_unstable();
        if files.is_empty() {
            bail!("{}: `weight_map` is empty", index.display());
        }
        return files
            .into_iter()
            .map(|name| {
                let path = dir.join(name);
                if path.is_file() {
                    Ok(path)
                } else {
                    bail!(
                        "{}: shard `{name}` is missing ({})",
                        index.display(),
                        path.display()
                    )
                }
            })
            .collect();
    }
    let single = dir.join(SINGLE_WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no weights: expected {SINGLE_WEIGHTS_FILE} or {SHARDED_INDEX_FILE} (PyTorch .bin checkpoints are not \
         supported; convert them to safetensors)",
        dir.display()
    )
}
