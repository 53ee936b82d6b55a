//! Durable atomic writes, the one helper every crate writes its outputs through: a file or folder is written under
//! a temporary sibling name (`.NAME.tmp-PID`), fsynced, renamed into place, and its parent folder fsynced, so that
//! after a crash of the process *or the machine* a reader sees either the old version or the complete new one.
//! A failed write removes its temporary and reports the OS error once.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The sibling that a write of `path` goes to before its rename. Leftovers of a killed process match
/// [`is_temporary_name`].
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Whether a file or folder name is a temporary of [`temp_sibling`] (of this or any earlier process).
pub fn is_temporary_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |tmp| Ok(std::fs::write(tmp, bytes)?))
}

/// Writes `path` atomically and durably; `write` creates the file at the temporary path it is given (for writers
/// that only take a path, e.g. safetensors).
pub fn write_file_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let written = write(&tmp)
        .and_then(|()| crate::faults::write_error(path).map_err(anyhow::Error::from))
        .and_then(|()| sync_file(&tmp));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(once(err, path));
    }
    rename_durably(&tmp, path)
}

/// Writes every file under its temporary name, then renames them all: either every file is complete or none is
/// replaced (a crash between two renames leaves complete files of both versions, never a partial one).
pub fn write_files(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut temporaries = Vec::new();
    let written = files.iter().try_for_each(|(path, bytes)| {
        let tmp = temp_sibling(path);
        temporaries.push(tmp.clone());
        std::fs::write(&tmp, bytes)
            .map_err(anyhow::Error::from)
            .and_then(|()| crate::faults::write_error(path).map_err(anyhow::Error::from))
            .and_then(|()| sync_file(&tmp))
            .map_err(|err| once(err, path))
    });
    if let Err(err) = written {
        for tmp in &temporaries {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(err);
    }
    for ((path, _), tmp) in files.iter().zip(&temporaries) {
        rename_durably(tmp, path)?;
    }
    Ok(())
}

/// Creates the folder `dir` atomically and durably: `fill` writes its contents into a temporary sibling folder,
/// every file in it is fsynced, then it replaces `dir` (an existing `dir` is removed first). A failed `fill`
/// removes the temporary folder.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the leftover {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(err) = fill(&tmp).and_then(|()| sync_tree(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    rename_durably(&tmp, dir)
}

/// Fsyncs every file and folder under `dir`, `dir` included.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

/// Fsyncs a folder, so that the names created, renamed or removed in it are on disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    // Only Unix can open a folder to fsync it; elsewhere a rename is as durable as the platform makes it.
    if cfg!(unix) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// Renames the finished temporary into place and fsyncs the parent, which makes the rename durable.
fn rename_durably(tmp: &Path, path: &Path) -> Result<()> {
    if let Err(err) = std::fs::rename(tmp, path) {
        let _ = if tmp.is_dir() {
            std::fs::remove_dir_all(tmp)
        } else {
            std::fs::remove_file(tmp)
        };
        bail!("cannot write {}: {err}", path.display());
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// One line for a failed write of `path`: the OS error once. Writers such as safetensors wrap an `io::Error` in
/// their own error whose text already shows it, so printing the whole chain would repeat it.
fn once(err: anyhow::Error, path: &Path) -> anyhow::Error {
    match err.chain().find_map(|e| e.downcast_ref::<io::Error>()) {
        Some(os) => anyhow!("cannot write {}: {os}", path.display()),
        None => err.context(format!("cannot write {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn file_replaced_whole() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.json");
        write_file(&path, b"one")?;
        write_file(&path, b"two")?;
        assert_eq!(std::fs::read(&path)?, b"two");
        assert_eq!(names(dir.path()), vec!["a.json"]);
        Ok(())
    }

    #[test]
    fn failed_write_removes_its_temporary_and_names_the_os_error_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.safetensors");
        write_file(&path, b"old")?;
        let err = write_file_with(&path, |tmp| {
            std::fs::write(tmp, b"partial")?;
            // A writer that wraps the io::Error and shows it in its own text, as safetensors does.
            Err(anyhow::Error::new(io::Error::from_raw_os_error(28)).context("IO error: No space"))
        })
        .unwrap_err();
        let text = format!("{err:#}");
        assert_eq!(text.matches("os error 28").count(), 1, "{text}");
        assert!(
            text.starts_with("cannot write ") && text.contains("w.safetensors"),
            "{text}"
        );
        assert_eq!(names(dir.path()), vec!["w.safetensors"]);
        assert_eq!(std::fs::read(&path)?, b"old");
        Ok(())
    }

    #[test]
    fn files_all_or_nothing() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (a, b) = (dir.path().join("a"), dir.path().join("missing/b"));
        assert!(write_files(&[(&a, b"1"), (&b, b"2")]).is_err());
        assert_eq!(names(dir.path()), Vec::<String>::new());
        let b = dir.path().join("b");
        write_files(&[(&a, b"1"), (&b, b"2")])?;
        assert_eq!(names(dir.path()), vec!["a", "b"]);
        Ok(())
    }

    #[test]
    fn folder_replaced_whole_or_left_as_it_was() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let target = dir.path().join("adapter");
        write_dir(&target, |tmp| Ok(std::fs::write(tmp.join("x"), b"1")?))?;
        let failed = write_dir(&target, |tmp| {
            std::fs::write(tmp.join("x"), b"2")?;
            bail!("no space")
        });
        assert!(failed.is_err());
        assert_eq!(names(dir.path()), vec!["adapter"]);
        assert_eq!(std::fs::read(target.join("x"))?, b"1");
        write_dir(&target, |tmp| Ok(std::fs::write(tmp.join("y"), b"2")?))?;
        assert_eq!(names(&target), vec!["y"]);
        Ok(())
    }

    #[test]
    fn temporary_names_are_recognised() {
        let tmp = temp_sibling(Path::new("out/checkpoint-3"));
        assert!(is_temporary_name(
            &tmp.file_name().unwrap().to_string_lossy()
        ));
        assert!(!is_temporary_name("checkpoint-3") && !is_temporary_name(".kto-run.lock"));
    }
}
