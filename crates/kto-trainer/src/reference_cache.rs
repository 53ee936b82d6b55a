//! Precomputed reference log-probs on disk (`precompute_ref_log_probs = true`).
//!
//! The cache file is named by a SHA-256 over everything the numbers depend on: the model files' identity, the
//! reference adapter's contents, the data file's contents, the tokenization settings, the batch size (padding
//! changes nothing mathematically, but TRL precomputes per batch and we keep the same granularity), and whether
//! KL pairs are scored. Any change gives another file; a stale file is never read.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::checkpoint::{file_digest, hex};

/// Reference log-probs of every sample of a dataset, in dataset order.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceLogps {
    /// Summed completion log-probs of the targets.
    pub targets: Vec<f32>,
    /// Summed completion log-probs of the KL pairs; `None` when the loss uses no KL term.
    pub kl: Option<Vec<f32>>,
}

/// Builds the cache key field by field; each field is length-prefixed so that no two inputs collide by
/// concatenation.
#[derive(Clone, Default)]
pub struct CacheKeyBuilder {
    hasher: Sha256,
}

impl CacheKeyBuilder {
    pub fn new() -> Self {
        Self::default().text("kto-reference-logps", "v1")
    }

    pub fn text(mut self, name: &str, value: &str) -> Self {
        for part in [name.as_bytes(), value.as_bytes()] {
            self.hasher.update((part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    /// The full contents of a file (data files, adapters, configs).
    pub fn file_contents(self, name: &str, path: &Path) -> Result<Self> {
        let (size, sha) = file_digest(path)?;
        Ok(self.text(name, &format!("{size}:{sha}")))
    }

    /// A large file's identity without reading it: canonical path, size and modification time (model weights).
    pub fn file_identity(self, name: &str, path: &Path) -> Result<Self> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        Ok(self.text(
            name,
            &format!("{}:{}:{modified}", canonical.display(), meta.len()),
        ))
    }

    pub fn finish(self) -> String {
        hex(&self.hasher.finalize())
    }
}

/// The cache file of `key` in `dir`.
pub fn cache_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("reference-logps-{key}.safetensors"))
}

/// Reads the cached log-probs of `key`, if present; `expected_len` guards against a truncated or foreign file.
pub fn load(dir: &Path, key: &str, expected_len: usize) -> Result<Option<ReferenceLogps>> {
    let path = cache_path(dir, key);
    if !path.exists() {
        return Ok(None);
    }
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading reference log-prob cache {}", path.display()))?;
    let targets = tensors
        .remove("ref_logps")
        .with_context(|| format!("{}: no ref_logps tensor", path.display()))?
        .to_vec1::<f32>()?;
    ensure!(
        targets.len() == expected_len,
        "{}: {} samples, expected {expected_len}",
        path.display(),
        targets.len()
    );
    let kl = match tensors.remove("ref_KL_logps") {
        Some(t) => {
            let kl = t.to_vec1::<f32>()?;
            ensure!(
                kl.len() == expected_len,
                "{}: {} KL samples, expected {expected_len}",
                path.display(),
                kl.len()
            );
            Some(kl)
        }
        None => None,
    };
    Ok(Some(ReferenceLogps { targets, kl }))
}

/// Writes the log-probs of `key` (atomically: temporary file, then rename).
pub fn store(dir: &Path, key: &str, logps: &ReferenceLogps) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = cache_path(dir, key);
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "ref_logps".to_string(),
        Tensor::new(logps.targets.as_slice(), &Device::Cpu)?,
    );
    if let Some(kl) = &logps.kl {
        tensors.insert(
            "ref_KL_logps".to_string(),
            Tensor::new(kl.as_slice(), &Device::Cpu)?,
        );
    }
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    kto_model::files::write_safetensors(&path, &tensors, None)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_every_input() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data.jsonl");
        std::fs::write(&data, "{\"a\": 1}\n")?;
        let key = |batch: &str| -> Result<String> {
            Ok(CacheKeyBuilder::new()
                .file_contents("data", &data)?
                .text("batch_size", batch)
                .finish())
        };
        let a = key("4")?;
        assert_eq!(a, key("4")?, "deterministic");
        assert_ne!(a, key("8")?);
        std::fs::write(&data, "{\"a\": 2}\n")?;
        assert_ne!(a, key("4")?, "data contents are part of the key");
        // length prefixes: ("ab","c") differs from ("a","bc")
        assert_ne!(
            CacheKeyBuilder::new().text("ab", "c").finish(),
            CacheKeyBuilder::new().text("a", "bc").finish()
        );
        Ok(())
    }

    #[test]
    fn store_then_load() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let logps = ReferenceLogps {
            targets: vec![-1.5, -2.25],
            kl: Some(vec![-3.0, -4.0]),
        };
        assert!(load(dir.path(), "k", 2)?.is_none());
        store(dir.path(), "k", &logps)?;
        assert_eq!(load(dir.path(), "k", 2)?, Some(logps));
        assert!(load(dir.path(), "k", 3).is_err());
        let no_kl = ReferenceLogps {
            targets: vec![-1.0],
            kl: None,
        };
        store(dir.path(), "j", &no_kl)?;
        assert_eq!(load(dir.path(), "j", 1)?, Some(no_kl));
        Ok(())
    }
}
