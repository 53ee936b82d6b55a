//! A run's `output_dir`: one training process at a time (an OS advisory lock on `.kto-run.lock`, held for the
//! process's life and released by the kernel however it ends), the files that make up a run, refusing to mix two
//! runs in one folder, and `--overwrite`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kto_data::atomic;

use crate::checkpoint::CONFIG;
use crate::train::{FINAL_ADAPTER_DIR, METRICS_FILE};

/// The lock file inside `output_dir`; it holds the PID of the process that trains there.
pub const LOCK_FILE: &str = ".kto-run.lock";

/// The names a training run writes besides checkpoints (the CLI's curves and `kto eval`'s results included).
const RUN_FILES: &[&str] = &[
    METRICS_FILE,
    FINAL_ADAPTER_DIR,
    CONFIG,
    "curves.svg",
    "curves.png",
    "eval_results.json",
];

/// The held lock of an `output_dir`. Dropping it removes the lock file (and the folder, when this process created
/// it and nothing else was written there: a run refused on bad input leaves no trace) and releases the lock.
#[derive(Debug)]
pub struct RunLock {
    dir: PathBuf,
    // Held open for the lock's life: closing the file releases the lock.
    _file: File,
    created_dir: bool,
}

impl RunLock {
    /// Takes the lock of `output_dir` (created when missing), or fails at once naming the folder and the PID that
    /// holds it. A refused process writes nothing: the lock file is opened without truncating it.
    pub fn acquire(output_dir: &Path) -> Result<Self> {
        let created_dir = !output_dir.exists();
        std::fs::create_dir_all(output_dir)
            .with_context(|| format!("cannot create {}", output_dir.display()))?;
        let path = output_dir.join(LOCK_FILE);
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = match holder.trim() {
                        "" => "another process".to_string(),
                        pid => format!("process {pid}"),
                    };
                    bail!(
                        "{} is in use by {holder}, which is training there; wait for it to end or choose \
                         another [train] output_dir",
                        output_dir.display()
                    );
                }
                Err(TryLockError::Error(err)) => {
                    return Err(err).with_context(|| format!("cannot lock {}", path.display()))
                }
            }
            // The holder removes the file when it ends: a lock taken on a file that was removed meanwhile guards
            // nothing, so take the one now at the path.
            if !same_file(&file, &path) {
                continue;
            }
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| writeln!(file, "{}", std::process::id()))
                .with_context(|| format!("cannot write {}", path.display()))?;
            return Ok(Self {
                dir: output_dir.to_path_buf(),
                _file: file,
                created_dir,
            });
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `--overwrite`: removes the earlier run's files (checkpoints, metrics, adapter, config, curves, temporaries)
    /// before the new run writes anything; other files in the folder stay. Returns what was removed.
    pub fn remove_earlier_run(&self) -> Result<Vec<String>> {
        let removed = earlier_run_files(&self.dir);
        for name in removed.iter().chain(&temporaries(&self.dir)) {
            let path = self.dir.join(name);
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("--overwrite: cannot remove {}", path.display()))?;
        }
        atomic::sync_dir(&self.dir)?;
        Ok(removed)
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still locked, so no other process can have taken this file's lock in between.
        let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
        if self.created_dir {
            // Fails, as it should, unless the folder is empty.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Whether the open `file` is the one at `path` (not one removed since it was opened).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(now)) => (open.dev(), open.ino()) == (now.dev(), now.ino()),
        _ => false,
    }
}

/// Elsewhere an open file cannot be removed, so the file at the path is the open one.
#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

/// The names in `output_dir` that belong to a run (sorted); none when the folder does not exist.
pub fn earlier_run_files(output_dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = names(output_dir)
        .into_iter()
        .filter(|name| RUN_FILES.contains(&name.as_str()) || name.starts_with("checkpoint-"))
        .collect();
    found.sort();
    found
}

fn temporaries(output_dir: &Path) -> Vec<String> {
    names(output_dir)
        .into_iter()
        .filter(|name| atomic::is_temporary_name(name))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A fresh run never writes over another run's files: the error names them and the three ways on.
pub fn refuse_earlier_run(output_dir: &Path) -> Result<()> {
    let found = earlier_run_files(output_dir);
    if found.is_empty() {
        return Ok(());
    }
    bail!(
        "{} holds an earlier run ({}): continue it with --resume, replace it with --overwrite ([train] \
         overwrite_output_dir = true), or choose another [train] output_dir",
        output_dir.display(),
        found.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_refused_with_the_holders_pid() -> Result<()> {
        let root = tempfile::tempdir()?;
        let out = root.path().join("out");
        let held = RunLock::acquire(&out)?;
        let err = RunLock::acquire(&out).unwrap_err().to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id()))
                && err.contains("out is in use"),
            "{err}"
        );
        std::fs::write(out.join(METRICS_FILE), "")?;
        drop(held);
        assert!(!out.join(LOCK_FILE).exists(), "removed when released");
        let again = RunLock::acquire(&out)?;
        assert_eq!(again.dir(), out);
        Ok(())
    }

    #[test]
    fn refused_run_leaves_no_folder_behind() -> Result<()> {
        let root = tempfile::tempdir()?;
        let out = root.path().join("out");
        drop(RunLock::acquire(&out)?);
        assert!(!out.exists());
        Ok(())
    }

    #[test]
    fn overwrite_removes_only_the_runs_files() -> Result<()> {
        let root = tempfile::tempdir()?;
        let out = root.path();
        for dir in ["checkpoint-2", "adapter", ".checkpoint-4.tmp-99", "notes"] {
            std::fs::create_dir_all(out.join(dir))?;
        }
        std::fs::write(out.join(METRICS_FILE), "{}\n")?;
        let err = refuse_earlier_run(out).unwrap_err().to_string();
        assert!(
            err.contains("(adapter, checkpoint-2, metrics.jsonl)") && err.contains("--overwrite"),
            "{err}"
        );
        let lock = RunLock::acquire(out)?;
        assert_eq!(
            lock.remove_earlier_run()?,
            vec!["adapter", "checkpoint-2", "metrics.jsonl"]
        );
        let mut left = names(out);
        left.sort();
        assert_eq!(left, vec![LOCK_FILE, "notes"]);
        refuse_earlier_run(out)
    }
}
