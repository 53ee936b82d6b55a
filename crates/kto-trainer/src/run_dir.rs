//! The run folder, `[train] output_dir`, and the one owner of everything in it: the names of its files, the lock
//! that keeps one training process per folder, how a run starts there (refusing an earlier run, `--overwrite`,
//! the checkpoint `--resume` continues from), the `checkpoint-N` folders (sealed, verified, pruned), the rows of
//! `metrics.jsonl` and their TensorBoard twin (`[train] report_to`, `logging_dir`), and where `kto eval` and `kto plot`
//! write.
//!
//! [`RunDir`] names and reads; anyone may hold one (`kto plot`, `kto eval` read a folder a training process holds).
//! [`RunLock`] is the held lock and the only way to write: [`RunLock::begin`] chooses how the run starts (the
//! earlier-run guard and the resume choice, run once), then the trainer writes through it.
//!
//! What goes *into* a checkpoint (adapter, trainable tensors, optimizer, trainer state) and the manifest format are
//! [`crate::checkpoint`]'s; the rows' format is [`crate::metrics`]'s, the event files' [`crate::tensorboard`]'s.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use kto_data::atomic;
use serde_json::{Map, Value};

use crate::checkpoint::{self, MANIFEST};
use crate::config::{Config, Integration, TrainSection};
use crate::metrics;
use crate::tensorboard::{self, EventFile};

/// One JSON object a line: the training rows, then the evaluation rows, as they are logged.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The trained adapter (PEFT layout), written once the last step is done.
pub const FINAL_ADAPTER_DIR: &str = "adapter";
/// The resolved config of the run (also saved in each checkpoint).
pub const CONFIG_FILE: &str = checkpoint::CONFIG;
/// `kto eval`'s held-out figures.
pub const EVAL_RESULTS_FILE: &str = "eval_results.json";
/// The learning curves, `curves.svg` and `curves.png`.
pub const CURVES_STEM: &str = "curves";
const CURVES_FILES: [&str; 2] = ["curves.svg", "curves.png"];
/// The lock file; it holds the PID of the process that trains in the folder.
pub const LOCK_FILE: &str = ".kto-run.lock";
const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// transformers' TensorBoard folders, `runs/<Mon DD_HH-MM-SS>_<host>` (its `default_logdir`), when `[train]
/// logging_dir` is not set.
pub const TENSORBOARD_RUNS_DIR: &str = "runs";
/// transformers 5's way to name the TensorBoard folder (it has no `logging_dir` argument any more).
pub const TENSORBOARD_LOGGING_DIR_ENV: &str = "TENSORBOARD_LOGGING_DIR";

/// `path` without `.` components and with each `..` taken back lexically (`configs/../runs/tiny` is
/// `runs/tiny`), so that the paths shown to the user are plain. The path need not exist; a leading `..` stays.
pub fn plain(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// A run folder (it need not exist yet): the names in it and what can be read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

/// How a run is asked to start in its folder (`kto train`, `--overwrite`, `--resume [DIR]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// A new run; refused when the folder holds an earlier one.
    Fresh,
    /// A new run replacing the earlier one's files (`--overwrite`, `[train] overwrite_output_dir = true`).
    Overwrite,
    /// Continue the run in the folder, or the one in DIR (a `checkpoint-N` folder or a folder holding them).
    Resume(Option<PathBuf>),
}

/// How the run starts, as [`RunLock::begin`] chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A new run in a folder without an earlier run.
    Fresh,
    /// A new run; the earlier run's files named here were removed.
    Overwrote(Vec<String>),
    /// `--resume` where no checkpoint was written yet (a run stopped before its first save): from the beginning.
    NothingToResume,
    /// Continue from this checkpoint, whose files were verified (sizes and SHA-256).
    Resume(PathBuf),
}

impl Start {
    /// The checkpoint to continue from, if any.
    pub fn checkpoint(&self) -> Option<&Path> {
        match self {
            Start::Resume(dir) => Some(dir),
            _ => None,
        }
    }
}

impl RunDir {
    pub fn new(path: &Path) -> Self {
        Self { path: plain(path) }
    }

    /// The folder, plain (see [`plain`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metrics_file(&self) -> PathBuf {
        self.path.join(METRICS_FILE)
    }

    pub fn final_adapter(&self) -> PathBuf {
        self.path.join(FINAL_ADAPTER_DIR)
    }

    pub fn config_file(&self) -> PathBuf {
        self.path.join(CONFIG_FILE)
    }

    pub fn eval_results_file(&self) -> PathBuf {
        self.path.join(EVAL_RESULTS_FILE)
    }

    /// The learning curves' path without its extension (`.svg`, `.png`).
    pub fn curves_stem(&self) -> PathBuf {
        self.path.join(CURVES_STEM)
    }

    pub fn checkpoint(&self, step: usize) -> PathBuf {
        self.path.join(format!("{CHECKPOINT_PREFIX}{step}"))
    }

    /// The run's TensorBoard folder: `set` (`[train] logging_dir`), else `$TENSORBOARD_LOGGING_DIR`, else
    /// transformers' default under the run folder ([`RunDir::default_logging_dir`]).
    pub fn logging_dir(&self, set: Option<&Path>, continuing: bool) -> PathBuf {
        if let Some(dir) = set {
            return dir.to_path_buf();
        }
        match std::env::var_os(TENSORBOARD_LOGGING_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(dir) => expand_home(Path::new(&dir)),
            None => self.default_logging_dir(continuing),
        }
    }

    /// transformers' `output_dir/runs/<Mon DD_HH-MM-SS>_<host>` (local time): named when a run starts; a continued
    /// run (`--resume`) takes the one holding the newest event file, so that it goes on in the same TensorBoard run.
    pub fn default_logging_dir(&self, continuing: bool) -> PathBuf {
        let runs = self.path.join(TENSORBOARD_RUNS_DIR);
        let newest = || {
            let folders = std::fs::read_dir(&runs).ok()?;
            folders
                .flatten()
                .filter_map(|e| tensorboard::event_files(&e.path()).pop())
                .max_by_key(|file| file.file_name().map(|n| n.to_os_string()))
                .and_then(|file| file.parent().map(Path::to_path_buf))
        };
        match continuing.then(newest).flatten() {
            Some(dir) => dir,
            None => runs.join(format!(
                "{}_{}",
                chrono::Local::now().format("%b%d_%H-%M-%S"),
                gethostname::gethostname().to_string_lossy()
            )),
        }
    }

    /// Every row of `metrics.jsonl` (through [`metrics::read_rows`], the one reader).
    pub fn read_metrics(&self) -> Result<Vec<Map<String, Value>>> {
        metrics::read_rows(&self.metrics_file())
    }

    /// The names in the folder that belong to a run (sorted); none when the folder does not exist.
    pub fn earlier_run_files(&self) -> Vec<String> {
        let mut found: Vec<String> = self
            .entries()
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| is_run_file(name))
            .collect();
        found.sort();
        found
    }

    /// A fresh run never writes over another run's files: the error names them and the ways on. A finished run
    /// (its final adapter written) has nothing left to resume, so `--resume` is offered only for an unfinished one.
    pub fn refuse_earlier_run(&self) -> Result<()> {
        let found = self.earlier_run_files();
        if found.is_empty() {
            return Ok(());
        }
        let replace =
            "replace it with --overwrite ([train] overwrite_output_dir = true), or choose another \
                       [train] output_dir";
        if self.final_adapter().is_dir() {
            bail!(
                "{} holds a finished run ({}), whose adapter is written: there is nothing to resume; {replace}",
                self.path.display(),
                found.join(", ")
            )
        }
        bail!(
            "{} holds an earlier run ({}): continue it with --resume, {replace}",
            self.path.display(),
            found.join(", ")
        )
    }

    /// The `checkpoint-N` folders, newest (largest N) first.
    pub fn checkpoints(&self) -> Vec<(usize, PathBuf)> {
        let mut found: Vec<(usize, PathBuf)> = self
            .entries()
            .into_iter()
            .filter_map(|(name, path)| {
                let step = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
                path.is_dir().then_some((step, path))
            })
            .collect();
        found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
        found
    }

    /// The newest checkpoint whose manifest checks out (sizes only).
    pub fn latest_complete(&self) -> Option<PathBuf> {
        self.checkpoints()
            .into_iter()
            .map(|(_, dir)| dir)
            .find(|dir| checkpoint::check_complete(dir, false).is_ok())
    }

    /// The newest checkpoint that passes the full check (sizes and SHA-256), for resuming. Each newer checkpoint
    /// that fails is reported with its reason and skipped in favour of the previous one.
    pub fn latest_verified(&self) -> Option<PathBuf> {
        for (_, dir) in self.checkpoints() {
            match checkpoint::check_complete(&dir, true) {
                Ok(_) => return Some(dir),
                Err(err) => tracing::warn!("skipping {}: {err:#}", dir.display()),
            }
        }
        None
    }

    /// The checkpoint `--resume` continues from: `from` (or this folder) when it is a checkpoint itself, else the
    /// newest intact one inside it, newer incomplete or damaged ones reported and skipped. `None` when the folder
    /// holds no checkpoint at all, e.g. a run stopped before its first save.
    pub fn resume_point(&self, from: Option<&Path>) -> Result<Option<PathBuf>> {
        let dir = match from {
            Some(dir) if !dir.exists() => bail!("--resume {}: no such folder", dir.display()),
            Some(dir) => RunDir::new(dir),
            None => self.clone(),
        };
        let path = dir.path();
        if path.join(MANIFEST).is_file() {
            checkpoint::check_complete(path, true)?;
            return Ok(Some(path.to_path_buf()));
        }
        let named_checkpoint = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(CHECKPOINT_PREFIX));
        if named_checkpoint && path.is_dir() {
            bail!(
                "--resume {}: no {MANIFEST}, an incomplete checkpoint; resume from the folder holding the \
                 checkpoints to use the newest complete one",
                path.display()
            );
        }
        match dir.latest_verified() {
            Some(checkpoint) => Ok(Some(checkpoint)),
            None if !dir.checkpoints().is_empty() => bail!(
                "--resume: no intact {CHECKPOINT_PREFIX}N folder in {} (every one is incomplete or damaged, see \
                 above)",
                path.display()
            ),
            None => Ok(None),
        }
    }

    /// Takes the folder's lock (creating the folder when missing), or fails at once naming the folder and the PID
    /// that holds it. A refused process writes nothing: the lock file is opened without truncating it.
    pub fn lock(&self) -> Result<RunLock> {
        let output_dir = &self.path;
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
            return Ok(RunLock {
                run: self.clone(),
                _file: file,
                created_dir,
                continuing: AtomicBool::new(false),
                tensorboard: Mutex::new(None),
            });
        }
    }

    /// The entries of the folder with their names (lossy text); none when it cannot be read (no folder yet).
    fn entries(&self) -> Vec<(String, PathBuf)> {
        std::fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The temporary files and folders (`.NAME.tmp-PID`, `.checkpoint-N.tmp-PID`) a killed process left.
    fn temporaries(&self) -> Vec<PathBuf> {
        self.entries()
            .into_iter()
            .filter(|(name, _)| atomic::is_temporary_name(name))
            .map(|(_, path)| path)
            .collect()
    }
}

fn is_run_file(name: &str) -> bool {
    [
        METRICS_FILE,
        FINAL_ADAPTER_DIR,
        CONFIG_FILE,
        EVAL_RESULTS_FILE,
        TENSORBOARD_RUNS_DIR,
    ]
    .contains(&name)
        || CURVES_FILES.contains(&name)
        || name.starts_with(CHECKPOINT_PREFIX)
}

/// `~/x` under `$HOME`, as Python's `os.path.expanduser` (transformers expands `TENSORBOARD_LOGGING_DIR`).
fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => Path::new(&home).join(rest),
        _ => path.to_path_buf(),
    }
}

/// Removes a file, or a folder whole: a folder is first renamed aside to a temporary (atomically, the parent
/// fsynced), so that a process killed while deleting leaves a leftover the next start removes, never a sealed
/// checkpoint or adapter with some of its files gone.
fn remove_entry(path: &Path) -> Result<()> {
    if !path.is_dir() {
        return Ok(std::fs::remove_file(path)?);
    }
    let aside = atomic::temp_sibling(path);
    std::fs::rename(path, &aside)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        atomic::sync_dir(parent)?;
    }
    Ok(std::fs::remove_dir_all(&aside)?)
}

/// The held lock of a run folder, and the only way to write there. Dropping it removes the lock file (and the
/// folder, when this process created it and nothing else was written there: a run refused on bad input leaves no
/// trace) and releases the lock.
#[derive(Debug)]
pub struct RunLock {
    run: RunDir,
    // Held open for the lock's life: closing the file releases the lock.
    _file: File,
    created_dir: bool,
    /// Whether [`RunLock::begin`] chose to continue the run there (`--resume`, with or without a checkpoint).
    continuing: AtomicBool,
    /// The event file the rows also go to (`[train] report_to` with tensorboard), once the metrics are reset.
    tensorboard: Mutex<Option<EventFile>>,
}

impl RunLock {
    /// [`RunDir::lock`] of `output_dir`.
    pub fn acquire(output_dir: &Path) -> Result<Self> {
        RunDir::new(output_dir).lock()
    }

    /// The folder, plain.
    pub fn dir(&self) -> &Path {
        self.run.path()
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    /// Chooses how the run starts, before anything of it is written: the earlier-run guard (refuse, or remove with
    /// `--overwrite`) and the resume choice, then the removal of what a killed process left half-written.
    pub fn begin(&self, how: Begin) -> Result<Start> {
        let start = match how {
            Begin::Fresh => {
                self.run.refuse_earlier_run()?;
                Start::Fresh
            }
            Begin::Overwrite => Start::Overwrote(self.remove_earlier_run()?),
            Begin::Resume(from) => match self.run.resume_point(from.as_deref())? {
                Some(checkpoint) => Start::Resume(checkpoint),
                None => Start::NothingToResume,
            },
        };
        let continuing = matches!(start, Start::Resume(_) | Start::NothingToResume);
        self.continuing.store(continuing, Ordering::Relaxed);
        for leftover in self.run.temporaries() {
            remove_entry(&leftover)
                .with_context(|| format!("removing the leftover {}", leftover.display()))?;
            tracing::info!("removed {}, left by an interrupted run", leftover.display());
        }
        Ok(start)
    }

    /// `--overwrite`: removes the earlier run's files (checkpoints, metrics, adapter, config, curves, temporaries)
    /// before the new run writes anything; other files in the folder stay. Returns what was removed.
    pub fn remove_earlier_run(&self) -> Result<Vec<String>> {
        let removed = self.run.earlier_run_files();
        let paths = removed.iter().map(|name| self.run.path.join(name));
        for path in paths.chain(self.run.temporaries()) {
            remove_entry(&path)
                .with_context(|| format!("--overwrite: cannot remove {}", path.display()))?;
        }
        atomic::sync_dir(&self.run.path)?;
        Ok(removed)
    }

    /// The run's resolved config, `config.toml`.
    pub fn write_config(&self, config: &Config) -> Result<()> {
        atomic::write_file(&self.run.config_file(), config.to_toml_string().as_bytes())
    }

    /// Replaces `metrics.jsonl` with `rows`: none for a new run, the checkpoint's for a resumed one. With `report_to`
    /// tensorboard, the run's event file holds the same rows: a new run starts a new file in its
    /// [`RunDir::logging_dir`]; a continued one ([`Begin::Resume`]) cuts the newest file there back to these rows
    /// ([`EventFile::continue_in`]), so that no step shows twice.
    pub fn reset_metrics(&self, rows: &[Map<String, Value>], train: &TrainSection) -> Result<()> {
        metrics::write_rows(&self.run.metrics_file(), rows)?;
        let event_file = match train.report_to.includes(Integration::Tensorboard) {
            false => None,
            true => {
                let continuing = self.continuing.load(Ordering::Relaxed);
                let dir = self
                    .run
                    .logging_dir(train.logging_dir.as_deref(), continuing);
                let file = match continuing {
                    true => EventFile::continue_in(&dir, rows),
                    false => EventFile::create(&dir, rows),
                }?;
                tracing::info!(
                    "TensorBoard event file {} (follow the run: tensorboard --logdir {})",
                    file.path().display(),
                    dir.display()
                );
                Some(file)
            }
        };
        *self.event_file() = event_file;
        Ok(())
    }

    /// Appends a row to metrics.jsonl and to the event file, if any.
    pub fn append_metrics(&self, row: &Map<String, Value>) -> Result<()> {
        metrics::append_row(&self.run.metrics_file(), row)?;
        match self.event_file().as_ref() {
            Some(file) => file.append(row),
            None => Ok(()),
        }
    }

    /// The folder of the event file the rows go to, once [`RunLock::reset_metrics`] opened one.
    pub fn logging_dir(&self) -> Option<PathBuf> {
        let file = self.event_file();
        file.as_ref()
            .and_then(|f| f.path().parent().map(Path::to_path_buf))
    }

    fn event_file(&self) -> std::sync::MutexGuard<'_, Option<EventFile>> {
        self.tensorboard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `checkpoint-<step>` (`fill` writes the files, which are then sealed; see
    /// [`checkpoint::write_checkpoint`]), then keeps the `limit` newest complete checkpoints (`0` keeps all).
    pub fn save_checkpoint(
        &self,
        step: usize,
        limit: usize,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let dir = checkpoint::write_checkpoint(&self.run.checkpoint(step), step, fill)?;
        tracing::info!("saved {}", dir.display());
        self.prune(limit)?;
        Ok(dir)
    }

    /// The final adapter, written whole or not at all.
    pub fn save_final_adapter(&self, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let dir = self.run.final_adapter();
        atomic::write_dir(&dir, |tmp| {
            fill(tmp)?;
            kto_data::faults::pause_before_seal();
            Ok(())
        })?;
        Ok(dir)
    }

    /// Keeps the `limit` newest complete checkpoints (`0` keeps all) and removes older ones, complete or not. The
    /// newest complete checkpoint is never removed, and nothing newer than it is touched.
    pub fn prune(&self, limit: usize) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        if limit == 0 {
            return Ok(removed);
        }
        let mut complete_seen = 0;
        for (_, dir) in self.run.checkpoints() {
            if checkpoint::check_complete(&dir, false).is_ok() {
                complete_seen += 1;
                if complete_seen <= limit {
                    continue;
                }
            } else if complete_seen == 0 {
                continue;
            }
            remove_entry(&dir)
                .with_context(|| format!("removing old checkpoint {}", dir.display()))?;
            removed.push(dir);
        }
        Ok(removed)
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still locked, so no other process can have taken this file's lock in between.
        let _ = std::fs::remove_file(self.run.path.join(LOCK_FILE));
        if self.created_dir {
            // Fails, as it should, unless the folder is empty.
            let _ = std::fs::remove_dir(&self.run.path);
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

/// Settings that may change between a run and its resumption; any other change would make the continuation differ
/// from the run that was interrupted.
const CHANGEABLE_ON_RESUME: &[&str] = &[
    "model.device",
    "data.eval_file",
    "data.dataset_test_split",
    "kto.precompute_ref_log_probs",
    "kto.precompute_ref_batch_size",
    "train.output_dir",
    "train.per_device_eval_batch_size",
    "train.logging_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.overwrite_output_dir",
    "train.report_to",
    "train.logging_dir",
];

/// The resume guard: `config` (resolved, `"auto"` weights included) continues the run saved in `checkpoint_dir`
/// only when nothing but the settings in `CHANGEABLE_ON_RESUME` changed.
pub fn check_resumable(config: &Config, checkpoint_dir: &Path) -> Result<()> {
    let path = checkpoint_dir.join(checkpoint::CONFIG);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // The saved config holds resolved paths; relative ones (from --set) stay relative, as they are now.
    let saved = Config::from_toml_str(&text, Path::new(""), &[])
        .with_context(|| format!("{}", path.display()))?;
    let (now, then) = (
        crate::config::flatten(config),
        crate::config::flatten(&saved),
    );
    for (key, value) in &now {
        if CHANGEABLE_ON_RESUME.contains(&key.as_str()) {
            continue;
        }
        let before = then.get(key);
        if before != Some(value) {
            let before = before.map_or("(not set)".to_string(), |v| v.to_string());
            bail!(
                "cannot resume from {}: {key} was {before} and is now {value}; only {} may change",
                checkpoint_dir.display(),
                CHANGEABLE_ON_RESUME.join(", ")
            );
        }
    }
    if let Some(key) = then
        .keys()
        .find(|k| !now.contains_key(*k) && !CHANGEABLE_ON_RESUME.contains(&k.as_str()))
    {
        bail!(
            "cannot resume from {}: {key} was set and is now unset",
            checkpoint_dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed checkpoint of `step` (two small files) in `run`.
    fn write(run: &RunDir, step: usize) -> Result<PathBuf> {
        checkpoint::write_checkpoint(&run.checkpoint(step), step, |tmp| {
            std::fs::write(tmp.join("a.bin"), vec![step as u8; 10])?;
            Ok(())
        })
    }

    fn sorted_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = RunDir::new(dir)
            .entries()
            .into_iter()
            .map(|e| e.0)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn paths_are_plain() {
        let run = RunDir::new(Path::new("configs/../runs/./tiny"));
        assert_eq!(run.path(), Path::new("runs/tiny"));
        assert_eq!(run.curves_stem(), Path::new("runs/tiny/curves"));
        assert_eq!(run.final_adapter(), Path::new("runs/tiny/adapter"));
        assert_eq!(run.checkpoint(7), Path::new("runs/tiny/checkpoint-7"));
        assert_eq!(plain(Path::new("../a/../../b")), Path::new("../../b"));
        assert_eq!(plain(Path::new("/x/../../y")), Path::new("/y"));
        assert_eq!(plain(Path::new("a/..")), Path::new("."));
        assert_eq!(plain(Path::new("./out")), Path::new("out"));
    }

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
        for dir in ["checkpoint-2", ".checkpoint-4.tmp-99", "notes"] {
            std::fs::create_dir_all(out.join(dir))?;
        }
        std::fs::write(out.join(METRICS_FILE), "{}\n")?;
        let err = RunDir::new(out)
            .refuse_earlier_run()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(checkpoint-2, metrics.jsonl)") && err.contains("--overwrite"),
            "{err}"
        );
        let lock = RunLock::acquire(out)?;
        assert_eq!(
            lock.begin(Begin::Overwrite)?,
            Start::Overwrote(vec!["checkpoint-2".into(), "metrics.jsonl".into()])
        );
        assert_eq!(sorted_names(out), vec![LOCK_FILE, "notes"]);
        RunDir::new(out).refuse_earlier_run()
    }

    #[test]
    fn an_interrupted_run_is_offered_resume_a_finished_one_is_not() -> Result<()> {
        let root = tempfile::tempdir()?;
        let run = RunDir::new(root.path());
        write(&run, 2)?;
        std::fs::write(run.metrics_file(), "{}\n")?;
        let lock = run.lock()?;
        let interrupted = lock.begin(Begin::Fresh).unwrap_err().to_string();
        assert!(
            interrupted.contains("holds an earlier run (checkpoint-2, metrics.jsonl)")
                && interrupted.contains("continue it with --resume")
                && interrupted.contains("--overwrite"),
            "{interrupted}"
        );

        std::fs::create_dir_all(run.final_adapter())?;
        let finished = lock.begin(Begin::Fresh).unwrap_err().to_string();
        assert!(
            finished.contains("holds a finished run (adapter, checkpoint-2, metrics.jsonl)")
                && finished.contains("nothing to resume")
                && !finished.contains("--resume")
                && finished.contains("--overwrite")
                && finished.contains("another [train] output_dir"),
            "{finished}"
        );
        Ok(())
    }

    #[test]
    fn resume_takes_the_newest_intact_checkpoint() -> Result<()> {
        let root = tempfile::tempdir()?;
        let run = RunDir::new(root.path());
        let lock = run.lock()?;
        assert_eq!(lock.begin(Begin::Resume(None))?, Start::NothingToResume);
        write(&run, 2)?;
        write(&run, 10)?;
        // A crashed save (no manifest) and a damaged one (same size, other bytes) are skipped.
        std::fs::create_dir_all(run.checkpoint(12))?;
        write(&run, 11)?;
        std::fs::write(run.checkpoint(11).join("a.bin"), vec![0u8; 10])?;
        // A temporary left by a killed save goes when the run begins.
        std::fs::create_dir_all(root.path().join(".checkpoint-14.tmp-99"))?;
        assert_eq!(run.latest_complete(), Some(run.checkpoint(11)));
        let start = lock.begin(Begin::Resume(None))?;
        assert_eq!(start, Start::Resume(run.checkpoint(10)));
        assert_eq!(start.checkpoint(), Some(run.checkpoint(10).as_path()));
        assert!(run.temporaries().is_empty());

        // A named checkpoint is verified in full; one without a manifest is refused.
        assert_eq!(
            run.resume_point(Some(&run.checkpoint(2)))?,
            Some(run.checkpoint(2))
        );
        let damaged = run.resume_point(Some(&run.checkpoint(11))).unwrap_err();
        assert!(
            format!("{damaged:#}").contains("checksum mismatch"),
            "{damaged:#}"
        );
        let incomplete = run.resume_point(Some(&run.checkpoint(12))).unwrap_err();
        assert!(
            incomplete.to_string().contains("no manifest.json"),
            "{incomplete}"
        );
        let missing = run
            .resume_point(Some(&root.path().join("nowhere")))
            .unwrap_err();
        assert!(
            missing.to_string().ends_with("nowhere: no such folder"),
            "{missing}"
        );

        // Every checkpoint damaged: refused, not started over.
        for step in [2, 10] {
            std::fs::remove_file(run.checkpoint(step).join("a.bin"))?;
        }
        assert!(lock.begin(Begin::Resume(None)).is_err());
        Ok(())
    }

    #[test]
    fn prune_keeps_newest_complete() -> Result<()> {
        let out = tempfile::tempdir()?;
        let lock = RunLock::acquire(out.path())?;
        let run = lock.run_dir().clone();
        for step in [1, 2, 3] {
            write(&run, step)?;
        }
        std::fs::create_dir_all(run.checkpoint(4))?; // incomplete, newer: untouched
        let removed = lock.prune(1)?;
        assert_eq!(removed, vec![run.checkpoint(2), run.checkpoint(1)]);
        assert!(run.checkpoint(3).exists() && run.checkpoint(4).exists());
        // Only one complete checkpoint: nothing more to delete even if it is damaged later.
        std::fs::remove_file(run.checkpoint(3).join("a.bin"))?;
        assert!(lock.prune(1)?.is_empty());
        assert!(lock.prune(0)?.is_empty());
        Ok(())
    }

    fn no_tensorboard() -> TrainSection {
        TrainSection {
            report_to: crate::config::ReportTo::NONE,
            ..TrainSection::default()
        }
    }

    fn step_row(step: usize) -> Map<String, Value> {
        let mut row = Map::new();
        row.insert("step".into(), Value::from(step));
        row.insert("loss".into(), Value::from(step as f64 / 4.0));
        row
    }

    /// The steps of the events in the run's event files, file by file.
    fn logged_steps(dir: &Path) -> Result<Vec<Vec<i64>>> {
        tensorboard::event_files(dir)
            .iter()
            .map(|file| {
                let events = tensorboard::read_events(file)?;
                Ok(events.iter().skip(1).map(|e| e.step).collect())
            })
            .collect()
    }

    #[test]
    fn metrics_are_reset_appended_and_read_back() -> Result<()> {
        let out = tempfile::tempdir()?;
        let lock = RunLock::acquire(out.path())?;
        let row = step_row(1);
        lock.reset_metrics(std::slice::from_ref(&row), &no_tensorboard())?;
        lock.append_metrics(&row)?;
        assert_eq!(
            lock.run_dir().read_metrics()?,
            vec![row.clone(), row.clone()]
        );
        lock.reset_metrics(&[], &no_tensorboard())?;
        assert!(lock.run_dir().read_metrics()?.is_empty());
        assert_eq!(lock.logging_dir(), None);
        assert!(!out.path().join(TENSORBOARD_RUNS_DIR).exists());
        Ok(())
    }

    #[test]
    fn tensorboard_follows_metrics_and_a_resume_logs_each_step_once() -> Result<()> {
        let root = tempfile::tempdir()?;
        let out = root.path().join("out");
        let train = TrainSection::default();
        let rows: Vec<_> = (1..=5).map(step_row).collect();
        let lock = RunLock::acquire(&out)?;
        lock.begin(Begin::Fresh)?;
        lock.reset_metrics(&[], &train)?;
        for row in &rows[..4] {
            lock.append_metrics(row)?;
        }
        // transformers' default folder, output_dir/runs/<Mon DD_HH-MM-SS>_<host>.
        let logs = lock.logging_dir().expect("tensorboard is the default");
        assert_eq!(
            logs.parent(),
            Some(out.join(TENSORBOARD_RUNS_DIR).as_path())
        );
        let name = logs.file_name().unwrap().to_string_lossy().into_owned();
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        assert!(
            name.ends_with(&format!("_{host}"))
                && name.len() == "Jan01_00-00-00_".len() + host.len(),
            "{name}"
        );
        assert_eq!(logged_steps(&logs)?, vec![vec![1, 2, 3, 4]]);
        drop(lock);

        // Crashed after step 4; the checkpoint holds steps 1-2. The resumed run logs 3-5 again in the same file.
        let lock = RunLock::acquire(&out)?;
        let refused = lock.begin(Begin::Fresh).unwrap_err().to_string();
        assert!(refused.contains("(metrics.jsonl, runs)"), "{refused}");
        lock.begin(Begin::Resume(None))?;
        lock.reset_metrics(&rows[..2], &train)?;
        for row in &rows[2..] {
            lock.append_metrics(row)?;
        }
        assert_eq!(lock.logging_dir(), Some(logs.clone()));
        assert_eq!(logged_steps(&logs)?, vec![vec![1, 2, 3, 4, 5]]);
        assert_eq!(
            std::fs::read_dir(out.join(TENSORBOARD_RUNS_DIR))?.count(),
            1
        );

        // --overwrite removes the earlier run's TensorBoard folder with its other files.
        assert!(lock.begin(Begin::Overwrite).is_ok());
        assert!(!out.join(TENSORBOARD_RUNS_DIR).exists());
        Ok(())
    }

    #[test]
    fn a_set_logging_dir_keeps_other_runs_files() -> Result<()> {
        let root = tempfile::tempdir()?;
        let logs = root.path().join("tb");
        let train = TrainSection {
            logging_dir: Some(logs.clone()),
            ..TrainSection::default()
        };
        let earlier = tensorboard::EventFile::create(&logs, &[step_row(7)])?;
        let lock = RunLock::acquire(&root.path().join("out"))?;
        lock.begin(Begin::Fresh)?;
        lock.reset_metrics(&[], &train)?;
        lock.append_metrics(&step_row(1))?;
        assert_eq!(lock.logging_dir(), Some(logs.clone()));
        let files = tensorboard::event_files(&logs);
        assert_eq!(files.len(), 2, "a fresh run writes a file of its own");
        assert_eq!(
            tensorboard::read_events(earlier.path())?.len(),
            2,
            "untouched"
        );
        Ok(())
    }
}
