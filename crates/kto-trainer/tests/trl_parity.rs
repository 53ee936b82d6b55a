//! The three TRL 1.16 runs of `tests/fixtures/trl-kto-parity/runs/`, driven through a TOML config: per-step
//! metrics, step-1 gradients after clipping, and the adapter after step 3.
//!
//! On CPU in f32 by default. `KTO_TEST_DEVICE=cuda` (a `--features cuda` build on the GPU machine) runs the same
//! checks on the GPU; `KTO_TEST_DTYPE=bf16` or `f16` checks loss and rewards within 2e-2 of TRL's f32 numbers instead
//! (gradients and adapters are then not compared: half-precision base weights change them beyond f32 tolerances).
//! Each run prints its worst metric against the tolerance (`--nocapture`), so a near miss shows in a passing run.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use kto_data::testing::trl_fixture;
use kto_trainer::config::{Config, Override};
use kto_trainer::from_config::run_training;
use kto_trainer::hooks::Hooks;
use kto_trainer::run_dir::{Begin, RunLock};
use kto_trainer::world::Alone;
use serde_json::Value;

/// The fixture folder: `KTO_FIXTURE_DIR` when set (a test binary carried to another machine), else the checkout's.
fn parity_fixture() -> PathBuf {
    if let Some(dir) = std::env::var_os("KTO_FIXTURE_DIR") {
        return PathBuf::from(dir);
    }
    trl_fixture()
}

/// Device and base dtype of the run: `KTO_TEST_DEVICE` (default cpu) and `KTO_TEST_DTYPE` (default f32).
fn test_target() -> (String, String) {
    let var =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    (var("KTO_TEST_DEVICE", "cpu"), var("KTO_TEST_DTYPE", "f32"))
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= allowed(want)
}

/// What `close` allows: 1e-6 absolute or 1e-4 relative, whichever is larger.
fn allowed(want: f64) -> f64 {
    1e-6f64.max(1e-4 * want.abs())
}

/// Half-precision (bf16/f16) base weights: loss and rewards within 2e-2 of TRL's f32 run; other metrics are not
/// compared (None).
fn allowed_half(key: &str) -> Option<f64> {
    (key == "loss" || key.starts_with("rewards/")).then_some(2e-2)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn check_run(name: &str, kto_section: &str, switches: &[&str]) -> Result<()> {
    let fx = parity_fixture();
    let run_dir = fx.join("runs").join(name);
    let out = tempfile::tempdir()?;
    let config_path = out.path().join("kto.toml");
    // `output_dir` is relative: it resolves against the config file's folder.
    let rel = |p: PathBuf| p.canonicalize().map(|p| p.display().to_string());
    let (device_name, dtype) = test_target();
    let full_precision = dtype == "f32";
    std::fs::write(
        &config_path,
        format!(
            "[model]\npath = \"{model}\"\ndevice = \"{device_name}\"\ndtype = \"{dtype}\"\n\n[lora]\ninit_adapter = \"{adapter}\"\n\n[data]\ntrain_file = \"{data}\"\n\
             max_length = 64\n\n[kto]\n{kto_section}\n\n[train]\noutput_dir = \"out\"\nper_device_train_batch_size = 4\n\
             learning_rate = 1e-2\nlr_scheduler_type = \"constant\"\nmax_steps = 3\nmax_grad_norm = 1.0\n\
             weight_decay = 0.0\nlogging_steps = 1\n",
            model = rel(fx.join("model"))?,
            adapter = rel(fx.join("adapter_init"))?,
            data = rel(fx.join("data.jsonl"))?,
        ),
    )?;
    let sets: Vec<Override> = switches.iter().map(|s| s.parse()).collect::<Result<_>>()?;
    let config = Config::load(&config_path, &sets)?;
    assert_eq!(config.train.output_dir, Some(out.path().join("out")));

    let step1: RefCell<HashMap<String, Tensor>> = RefCell::new(HashMap::new());
    let hook = |step: usize, grads: &HashMap<String, Tensor>| -> Result<()> {
        if step == 1 {
            *step1.borrow_mut() = grads.clone();
        }
        Ok(())
    };
    let lock = RunLock::acquire(out.path().join("out").as_path())?;
    let start = lock.begin(Begin::Fresh)?;
    let hooks = Hooks {
        gradients: Some(&hook),
        ..Hooks::default()
    };
    let summary = run_training(&config, Some(&lock), &start, &Alone, &hooks)?;
    assert_eq!(summary.global_step, 3);

    // Per-step metrics.
    let rows = kto_trainer::metrics::read_rows(&out.path().join("out/metrics.jsonl"))?;
    let log: Vec<serde_json::Map<String, Value>> =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("log.json"))?)?;
    assert_eq!(rows.len(), log.len(), "{name}: one row per step");
    let mut failures = Vec::new();
    // (|got − want| / allowed, what) of the metric nearest its tolerance
    let mut worst = (0f64, String::from("every metric exact"));
    for (row, want) in rows.iter().zip(&log) {
        for (key, value) in want {
            let Some(want) = value.as_f64() else { continue };
            let got = row
                .get(key)
                .and_then(Value::as_f64)
                .with_context(|| format!("{name}: row lacks {key}"))?;
            let ok = if full_precision {
                close(got, want)
            } else {
                allowed_half(key).is_none_or(|a| (got - want).abs() <= a)
            };
            let what = format!("step {} {key}: got {got}, TRL {want}", want_step(row));
            let limit = if full_precision {
                Some(allowed(want))
            } else {
                allowed_half(key)
            };
            if let Some(limit) = limit {
                let ratio = (got - want).abs() / limit;
                if ratio > worst.0 {
                    worst = (ratio, what.clone());
                }
            }
            if !ok {
                failures.push(what);
            }
        }
    }
    println!(
        "{name} on {device_name} in {dtype} ([kto] {kto_section:?}, {switches:?}): worst metric {}, {:.1} % of its tolerance",
        worst.1,
        100.0 * worst.0
    );

    if !full_precision {
        assert!(
            failures.is_empty(),
            "{name} ({dtype}): {} mismatches:\n{}",
            failures.len(),
            failures.join("\n")
        );
        return Ok(());
    }

    // Step-1 gradients after clipping.
    let device = Device::Cpu;
    let trl_grads =
        candle_core::safetensors::load(run_dir.join("grads_step1.safetensors"), &device)?;
    let ours = step1.borrow();
    assert_eq!(ours.len(), trl_grads.len(), "{name}: gradient count");
    for (key, want) in &trl_grads {
        let got = ours
            .get(key)
            .with_context(|| format!("{name}: no gradient for {key}"))?;
        let scale = want
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?
            .max(1e-3);
        let diff = max_abs_diff(&got.to_device(&device)?, want)?;
        if diff > 1e-4 * scale.max(1.0) {
            failures.push(format!("grad {key}: max diff {diff} (max |g| {scale})"));
        }
    }

    // The adapter after step 3.
    let trl_adapter =
        candle_core::safetensors::load(run_dir.join("adapter_model.safetensors"), &device)?;
    let ours = candle_core::safetensors::load(
        out.path().join("out/adapter/adapter_model.safetensors"),
        &device,
    )?;
    for (key, want) in &trl_adapter {
        let got = ours
            .get(key)
            .with_context(|| format!("{name}: saved adapter lacks {key}"))?;
        let diff = max_abs_diff(got, want)?;
        if diff > 1e-4 {
            failures.push(format!("adapter {key}: max diff {diff}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name} ([kto] {kto_section:?}, {switches:?}): {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Each run with padding-free batches and prefix-shared KL on (the defaults), each off, and both off, and with
/// gradient checkpointing on (`--set` overrides): the switches change the work, never TRL's numbers.
const SWITCHES: [&[&str]; 6] = [
    &[],
    &["kto.padding_free=false"],
    &["kto.kl_prefix_sharing=false"],
    &["kto.padding_free=false", "kto.kl_prefix_sharing=false"],
    &["train.gradient_checkpointing=true"],
    &[
        "train.gradient_checkpointing=true",
        "kto.padding_free=false",
        "kto.kl_prefix_sharing=false",
    ],
];

fn check_run_every_switch(name: &str, kto_section: &str) -> Result<()> {
    for switches in SWITCHES {
        check_run(name, kto_section, switches)
            .with_context(|| format!("{name} with {switches:?}"))?;
    }
    Ok(())
}

fn want_step(row: &serde_json::Map<String, Value>) -> i64 {
    row.get("step").and_then(Value::as_i64).unwrap_or(-1)
}

#[test]
fn trl_kto() -> Result<()> {
    check_run_every_switch(
        "kto",
        "loss_type = \"kto\"\nbeta = 0.1\ndesirable_weight = 1.0\nundesirable_weight = 1.0",
    )
}

#[test]
fn trl_kto_weighted() -> Result<()> {
    check_run_every_switch(
        "kto_weighted",
        "loss_type = \"kto\"\nbeta = 0.5\ndesirable_weight = 1.0\nundesirable_weight = 1.5",
    )
}

#[test]
fn trl_apo_zero_unpaired() -> Result<()> {
    check_run_every_switch(
        "apo_zero_unpaired",
        "loss_type = \"apo_zero_unpaired\"\nbeta = 0.1",
    )
}
