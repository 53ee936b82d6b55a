//! A base model's files ([`ModelFiles`]): locating them (a Hugging Face folder, a hub id in the local cache, or a GGUF
//! file) and reading their weights and tokenizer; the rest of kto does not care which format it came in.
//!
//! There is no network access: a hub id must already be in the cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), laid out as `huggingface_hub` writes it (`models--org--name/refs/main` →
//! `snapshots/<commit>/...`).

use crate::config::ModelConfig;
use crate::gguf::{is_gguf_path, GgufFile};
use crate::gguf_tokenizer::GgufTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kto_data::tokenize::TokenizerBundle;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// How a checkpoint's weights and tokenizer are stored.
#[derive(Debug, Clone)]
pub enum ModelFormat {
    /// A Hugging Face folder: config.json, safetensors, tokenizer.json and tokenizer_config.json.
    Safetensors,
    /// One GGUF file holding config, (quantized) weights and tokenizer.
    Gguf(Arc<GgufFile>),
}

/// A located checkpoint: its folder, parsed config and the files holding its weights (the safetensors files, or
/// the one GGUF file).
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weight_files: Vec<PathBuf>,
    pub format: ModelFormat,
}

impl ModelFiles {
    /// `spec` is a folder, a `.gguf` file, or a hub id (`org/name`, optionally `org/name@revision`) in the default cache.
    pub fn locate(spec: &str) -> Result<Self> {
        Self::locate_with_cache(spec, &default_cache_dir()?)
    }

    /// Like [`ModelFiles::locate`] with an explicit hub cache folder (the one holding `models--*`).
    pub fn locate_with_cache(spec: &str, cache_dir: &Path) -> Result<Self> {
        // `~/` as a shell would expand it: recipes name files in the user's cache (scripts/get-smollm2.sh).
        let expanded = match (spec.strip_prefix("~/"), std::env::var_os("HOME")) {
            (Some(rest), Some(home)) => Some(PathBuf::from(home).join(rest)),
            _ => None,
        };
        let path = expanded.as_deref().unwrap_or(Path::new(spec));
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if path.is_file() && is_gguf_path(path) {
            return Self::from_gguf(path);
        }
        if path.exists() {
            bail!(
                "model `{spec}` is a file; expected a checkpoint folder (with {CONFIG_FILE}), a .gguf file or a hub id"
            );
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
            format: ModelFormat::Safetensors,
        })
    }

    /// A GGUF file (llama architecture); its header is read now, the weights when the model loads.
    pub fn from_gguf(file: &Path) -> Result<Self> {
        let gguf = GgufFile::open(file)?;
        let config = gguf.config()?;
        let dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Ok(Self {
            dir,
            config,
            weight_files: vec![file.to_path_buf()],
            format: ModelFormat::Gguf(Arc::new(gguf)),
        })
    }

    /// What the checkpoint is, for messages: the folder, or the GGUF file.
    pub fn source(&self) -> &Path {
        match &self.format {
            ModelFormat::Safetensors => &self.dir,
            ModelFormat::Gguf(gguf) => gguf.path(),
        }
    }

    /// The weights under their Hugging Face names, converted to `dtype` on `device` when fetched. Safetensors are
    /// memory-mapped; a GGUF file is dequantized once, here.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match &self.format {
            // SAFETY: the files are mapped read-only; modifying them while the model is loaded is unsupported.
            ModelFormat::Safetensors => {
                unsafe { VarBuilder::from_mmaped_safetensors(&self.weight_files, dtype, device) }
                    .with_context(|| {
                        format!("cannot map the safetensors files of {}", self.dir.display())
                    })
            }
            ModelFormat::Gguf(gguf) => {
                let tensors = gguf.hf_tensors(&self.config)?.into_iter().collect();
                Ok(VarBuilder::from_tensors(tensors, dtype, device))
            }
        }
    }

    /// Every weight on the CPU under its Hugging Face name, sorted by name, in its stored dtype (f32 for GGUF).
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        match &self.format {
            ModelFormat::Safetensors => {
                // SAFETY: read-only mapping of the checkpoint's files.
                let files = unsafe { MmapedSafetensors::multi(&self.weight_files) }
                    .with_context(|| format!("cannot map the weights of {}", self.dir.display()))?;
                let mut tensors = files
                    .tensors()
                    .into_iter()
                    .map(|(name, _)| Ok((name.clone(), files.load(&name, &Device::Cpu)?)))
                    .collect::<Result<Vec<_>>>()?;
                tensors.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(tensors)
            }
            ModelFormat::Gguf(gguf) => gguf.hf_tensors(&self.config),
        }
    }

    /// The tokenizer with its special tokens and chat template: the folder's tokenizer files, or the one the GGUF
    /// metadata describes.
    pub fn tokenizer(&self) -> Result<TokenizerBundle> {
        match &self.format {
            ModelFormat::Safetensors => TokenizerBundle::from_dir(&self.dir),
            ModelFormat::Gguf(gguf) => GgufTokenizer::from_gguf(gguf)?
                .bundle()
                .with_context(|| format!("tokenizer of {}", gguf.path().display())),
        }
    }

    /// config.json as transformers reads it: the folder's own, or one written from the GGUF metadata.
    pub fn hf_config_json(&self) -> Result<serde_json::Value> {
        match &self.format {
            ModelFormat::Safetensors => {
                let path = self.dir.join(CONFIG_FILE);
                serde_json::from_str(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
                .with_context(|| format!("{}: invalid JSON", path.display()))
            }
            ModelFormat::Gguf(_) => Ok(self.config.to_hf_json()),
        }
    }

    /// Puts the tokenizer files (and generation config) into an HF folder being written: copies of the folder's,
    /// or tokenizer.json and tokenizer_config.json rebuilt from the GGUF metadata.
    pub fn write_tokenizer_files(&self, out_dir: &Path) -> Result<()> {
        match &self.format {
            ModelFormat::Safetensors => {
                for file in TOKENIZER_FILES {
                    let src = self.dir.join(file);
                    if src.is_file() {
                        std::fs::copy(&src, out_dir.join(file))
                            .with_context(|| format!("cannot copy {}", src.display()))?;
                    }
                }
            }
            ModelFormat::Gguf(gguf) => {
                let tokenizer = GgufTokenizer::from_gguf(gguf)?;
                for (name, value) in [
                    ("tokenizer.json", &tokenizer.tokenizer_json),
                    ("tokenizer_config.json", &tokenizer.tokenizer_config),
                ] {
                    std::fs::write(out_dir.join(name), serde_json::to_string_pretty(value)?)
                        .with_context(|| {
                            format!("cannot write {}", out_dir.join(name).display())
                        })?;
                }
            }
        }
        Ok(())
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
