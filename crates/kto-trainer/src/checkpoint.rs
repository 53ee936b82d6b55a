//! One checkpoint folder: what is in it (adapter, trainable tensors, optimizer, trainer state, config) and its
//! seal. Written whole to a temporary folder, sealed with a manifest of sizes and SHA-256 checksums, fsynced, then
//! renamed into place ([`kto_data::atomic::write_dir`]). A folder without a valid manifest is incomplete and never
//! resumed from. Which folders a run has, and choosing, pruning and naming them, is the run folder's (`run_dir.rs`).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor, Var};
use kto_data::atomic;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::metrics::MetricsAccumulator;

pub const MANIFEST: &str = "manifest.json";
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const CONFIG: &str = "config.toml";
pub const ADAPTER_DIR: &str = "adapter";
/// The trainable tensors bit for bit (the PEFT adapter may be written in another dtype).
pub const TRAINABLE: &str = "trainable.safetensors";

/// Everything besides the adapter and optimizer needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken; also the scheduler position (the schedule is a function of the step).
    pub global_step: usize,
    /// transformers' fractional `state.epoch` after the last step.
    pub epoch: f64,
    /// Data position: the epoch the next step belongs to and how many of its micro-batches are done.
    pub epoch_index: usize,
    pub micro_batches_done: usize,
    /// The seed of the run's random streams (batch shuffling, dropout); positions are derived from the data position.
    pub seed: u64,
    /// Metric values accumulated since the last logged row.
    pub metrics_pending: MetricsAccumulator,
    /// Every `metrics.jsonl` row written so far.
    pub metrics_rows: Vec<Map<String, Value>>,
    /// A stop came during the evaluation of `global_step`: the resumed run evaluates that step first.
    #[serde(default)]
    pub evaluation_pending: bool,
    /// The kto version that wrote the state: resuming needs the same arithmetic.
    pub kto_version: String,
    /// The number of processes that trained the run (data parallelism): each one's share of the data, and so
    /// every step, depends on it. Checkpoints from before it was recorded were written by one process.
    #[serde(default = "one_process")]
    pub world_size: usize,
}

fn one_process() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub step: usize,
    pub files: Vec<ManifestEntry>,
}

/// Creates the checkpoint `final_dir` of `step`: `fill` writes the files into a temporary folder, which is then
/// sealed with a manifest and renamed into place (replacing an existing folder of the same step).
pub fn write_checkpoint(
    final_dir: &Path,
    step: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    if let Some(parent) = final_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let final_dir = final_dir.to_path_buf();
    atomic::write_dir(&final_dir, |tmp_dir| {
        fill(tmp_dir).with_context(|| format!("writing checkpoint {}", final_dir.display()))?;
        kto_data::faults::pause_before_seal();
        let manifest = Manifest {
            step,
            files: list_files(tmp_dir)?,
        };
        atomic::write_file(
            &tmp_dir.join(MANIFEST),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )
    })?;
    Ok(final_dir)
}

/// Every file under `dir` (recursively, manifest excluded) with size and checksum, sorted by path.
fn list_files(dir: &Path) -> Result<Vec<ManifestEntry>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .expect("under dir")
                .to_string_lossy()
                .replace('\\', "/");
            if rel == MANIFEST {
                continue;
            }
            let (size, sha256) = file_digest(&path)?;
            out.push(ManifestEntry {
                path: rel,
                size,
                sha256,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Size and SHA-256 (hex) of a file, streamed.
pub fn file_digest(path: &Path) -> Result<(u64, String)> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex(&hasher.finalize())))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the manifest and checks every listed file: present, same size and, with `verify_checksums`, same SHA-256.
pub fn check_complete(dir: &Path, verify_checksums: bool) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: no manifest (incomplete checkpoint)", dir.display()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{}: unreadable", path.display()))?;
    for entry in &manifest.files {
        let file = dir.join(&entry.path);
        let meta = std::fs::metadata(&file)
            .with_context(|| format!("{}: listed in the manifest but missing", file.display()))?;
        ensure!(
            meta.len() == entry.size,
            "{}: {} bytes, the manifest says {}",
            file.display(),
            meta.len(),
            entry.size
        );
        if verify_checksums {
            let (_, sha) = file_digest(&file)?;
            ensure!(
                sha == entry.sha256,
                "{}: checksum mismatch (corrupted checkpoint)",
                file.display()
            );
        }
    }
    Ok(manifest)
}

impl TrainerState {
    pub fn save(&self, dir: &Path) -> Result<()> {
        atomic::write_file(
            &dir.join(TRAINER_STATE),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TRAINER_STATE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let state: TrainerState = serde_json::from_str(&text)
            .with_context(|| format!("{}: unreadable", path.display()))?;
        if state.kto_version != env!("CARGO_PKG_VERSION") {
            bail!(
                "{}: written by kto {}, this is kto {}: resume with the same version",
                path.display(),
                state.kto_version,
                env!("CARGO_PKG_VERSION")
            );
        }
        Ok(state)
    }

    /// Refuses to continue the run with another number of processes than trained it.
    pub fn require_world_size(&self, dir: &Path, world_size: usize) -> Result<()> {
        let processes = |n: usize| match n {
            1 => "1 process".to_string(),
            n => format!("{n} processes"),
        };
        ensure!(
            self.world_size == world_size,
            "cannot resume from {}: it was trained by {} and this run has {}; resume it with {} (each \
             process's share of the data, and so every step, depends on their number)",
            dir.display(),
            processes(self.world_size),
            processes(world_size),
            match self.world_size {
                1 => "one process (kto train --resume, without mpirun)".to_string(),
                n => format!("mpirun -n {n} kto train --resume"),
            }
        );
        Ok(())
    }
}

/// The trainable tensors bit for bit (the PEFT adapter may be written in another dtype).
pub fn save_trainable(params: &[(String, Var)], path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    kto_model::files::write_safetensors(path, &tensors, None)
}

pub fn load_trainable(params: &[(String, Var)], path: &Path) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    for (name, var) in params {
        let t = tensors
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", path.display()))?;
        if t.dims() != var.dims() {
            bail!(
                "{}: {name} has shape {:?}, the model's {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, step: usize) -> Result<PathBuf> {
        write_checkpoint(&dir.join(format!("checkpoint-{step}")), step, |tmp| {
            std::fs::write(tmp.join("a.bin"), vec![step as u8; 10])?;
            std::fs::create_dir_all(tmp.join(ADAPTER_DIR))?;
            std::fs::write(tmp.join(ADAPTER_DIR).join("b.json"), b"{}")?;
            Ok(())
        })
    }

    #[test]
    fn manifest_lists_files_and_detects_damage() -> Result<()> {
        let out = tempfile::tempdir()?;
        let dir = write(out.path(), 3)?;
        assert_eq!(dir, out.path().join("checkpoint-3"));
        let manifest = check_complete(&dir, true)?;
        let paths: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["a.bin", "adapter/b.json"]);
        assert_eq!(manifest.files[0].size, 10);
        std::fs::write(dir.join("a.bin"), vec![9u8; 10])?;
        assert!(
            check_complete(&dir, false).is_ok(),
            "same size passes the quick check"
        );
        assert!(
            check_complete(&dir, true).is_err(),
            "checksum catches the change"
        );
        std::fs::write(dir.join("a.bin"), vec![9u8; 3])?;
        assert!(check_complete(&dir, false).is_err());
        // A failed fill leaves no folder.
        let failed = out.path().join("checkpoint-14");
        assert!(write_checkpoint(&failed, 14, |_| bail!("disk full")).is_err());
        assert!(!failed.exists());
        Ok(())
    }

    #[test]
    fn trainer_state_round_trips() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let state = TrainerState {
            global_step: 5,
            epoch: 1.25,
            epoch_index: 1,
            micro_batches_done: 2,
            seed: 42,
            metrics_pending: MetricsAccumulator::default(),
            metrics_rows: vec![Map::new()],
            evaluation_pending: true,
            kto_version: env!("CARGO_PKG_VERSION").into(),
            world_size: 2,
        };
        state.save(dir.path())?;
        assert_eq!(TrainerState::load(dir.path())?, state);
        Ok(())
    }
}
