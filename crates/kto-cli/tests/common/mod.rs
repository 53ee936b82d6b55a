//! What the process-level tests share: running `kto` in a test's folder and reading what it printed, the fixture
//! run (`write_config`), launching `kto train` on it, and reading what a run leaves (metrics without wall-clock
//! figures, the final adapter's bytes). Every test file of kto-cli runs `kto` through [`kto_command`].
#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::{Command, Output, Stdio};

use kto_data::testing::trl_fixture;
use serde_json::{Map, Value};
use tempfile::TempDir;

/// `kto ARGS` in `dir`, with the reference cache kept inside the test's folder, and none of the caller's
/// `RUST_LOG`, backtrace or TensorBoard folder settings (so kto logs, reports errors and writes where it does for a
/// user).
pub fn kto_command(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kto"));
    command
        .args(args)
        .current_dir(dir)
        .env("KTO_CACHE_DIR", dir.join("cache"))
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove(kto_trainer::run_dir::TENSORBOARD_LOGGING_DIR_ENV);
    command
}

pub fn kto(dir: &Path, args: &[&str]) -> Output {
    kto_command(dir, args).output().unwrap()
}

/// [`kto`] logging warnings and errors only (`RUST_LOG=warn`).
pub fn kto_warn(dir: &Path, args: &[&str]) -> Output {
    kto_command(dir, args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// [`kto`] that must succeed (its stderr in the panic message otherwise).
pub fn kto_ok(dir: &Path, args: &[&str]) -> Output {
    let out = kto(dir, args);
    assert!(
        out.status.success(),
        "kto {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub const MAX_STEPS: usize = 12;

pub fn write_config(dir: &Path) {
    let fx = trl_fixture();
    let text = format!(
        "[model]\npath = \"{m}\"\n[lora]\nr = 4\nalpha = 8\ndropout = 0.1\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
         [data]\ntrain_file = \"{d}\"\nmax_length = 64\n[kto]\nbeta = 0.1\n[train]\noutput_dir = \"out\"\n\
         per_device_train_batch_size = 2\ngradient_accumulation_steps = 2\nlearning_rate = 1e-2\n\
         max_steps = {MAX_STEPS}\nsave_steps = 1\nsave_total_limit = 2\nlogging_steps = 1\nshuffle = true\n",
        m = fx.join("model").display(),
        d = fx.join("data.jsonl").display(),
    );
    std::fs::write(dir.join("kto.toml"), text).unwrap();
}

/// A fresh folder holding the fixture run's `kto.toml` (training into `out/`).
pub fn run_folder() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    dir
}

/// The fixture run trained to the end without interruption: what the interrupted runs must equal.
pub fn uninterrupted_run() -> TempDir {
    let dir = run_folder();
    run_to_end(dir.path(), false);
    dir
}

pub fn train_command(dir: &Path, resume: bool, fault_delay_ms: u64) -> Command {
    let mut cmd = kto_command(dir, &["train", "--config", "kto.toml"]);
    cmd.env("KTO_FAULT_DELAY_MS", fault_delay_ms.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

/// `cmd` evaluating on the fixture's data (`[data] eval_file`), with `--set` for each of `sets`.
pub fn with_evaluation_on_fixture(mut cmd: Command, sets: &[&str]) -> Command {
    let eval_file = format!(
        "data.eval_file={}",
        trl_fixture().join("data.jsonl").display()
    );
    for set in std::iter::once(eval_file.as_str()).chain(sets.iter().copied()) {
        cmd.args(["--set", set]);
    }
    cmd
}

pub fn run_to_end(dir: &Path, resume: bool) -> String {
    let out = train_command(dir, resume, 0).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kto train failed: {stderr}");
    stderr
}

pub fn metrics_rows(dir: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Rows without the wall-clock figures, which differ between any two runs.
pub fn deterministic(rows: Vec<Map<String, Value>>) -> Vec<Map<String, Value>> {
    rows.into_iter()
        .map(|mut r| {
            r.retain(|k, _| !k.contains("per_second") && !k.contains("runtime"));
            r
        })
        .collect()
}

pub fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("out/adapter/adapter_model.safetensors")).unwrap()
}
