//! The real SmolLM2-135M-Instruct Q4_1 GGUF trains with `quantize = "keep"` to the per-step metrics and final
//! adapter of the same run with `quantize = "none"` (the file dequantized at load: the same values, held dense).
//!
//! The 93 MB file is not in the repository: `scripts/get-smollm2.sh` puts it in ~/.cache/kto/ (or set
//! KTO_SMOLLM2_GGUF). Without it the test prints a skip line and passes, unless KTO_SMOLLM2_GGUF names it: a test
//! asked for must not pass by skipping.

use anyhow::Result;
use candle_core::Device;
use kto_trainer::config::Config;
use kto_trainer::from_config::run_training;
use kto_trainer::hooks::Hooks;
use kto_trainer::run_dir::{Begin, RunLock};
use kto_trainer::world::Alone;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const STEPS: usize = 3;

fn real_file() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KTO_SMOLLM2_GGUF") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "KTO_SMOLLM2_GGUF={} is not a file (run scripts/get-smollm2.sh)",
            path.display()
        );
        return Some(path);
    }
    let path = PathBuf::from(std::env::var_os("HOME")?)
        .join(".cache/kto")
        .join(FILE_NAME);
    if path.is_file() {
        Some(path)
    } else {
        println!(
            "skipped: {} not found (run scripts/get-smollm2.sh)",
            path.display()
        );
        None
    }
}

fn config(model: &Path, out: &Path, quantize: &str) -> Result<Config> {
    // Short rows and few steps: SmolLM2 has 30 layers and this runs in a dev build.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/hh-sample/train.jsonl");
    let text = format!(
        "[model]\npath = \"{}\"\nquantize = \"{quantize}\"\n[lora]\nr = 4\nalpha = 8\n\
         [data]\ntrain_file = \"{}\"\nmax_length = 48\n\
         [train]\noutput_dir = \"{}\"\nper_device_train_batch_size = 2\nlearning_rate = 0.001\n\
         lr_scheduler_type = \"constant\"\nmax_steps = {STEPS}\nlogging_steps = 1\nsave_steps = {STEPS}\n",
        model.display(),
        data.canonicalize()?.display(),
        out.display()
    );
    Config::from_toml_str(&text, Path::new("."), &[])
}

fn train(config: &Config) -> Result<()> {
    let out = config.train.output_dir.as_deref().expect("output_dir");
    let lock = RunLock::acquire(out)?;
    let start = lock.begin(Begin::Fresh)?;
    let summary = run_training(config, Some(&lock), &start, &Alone, &Hooks::default())?;
    assert_eq!(summary.global_step, STEPS);
    Ok(())
}

/// metrics.jsonl without the timings.
fn rows(out: &Path) -> Result<Vec<Map<String, Value>>> {
    Ok(kto_trainer::metrics::read_rows(&out.join("metrics.jsonl"))?
        .into_iter()
        .map(|mut r| {
            r.retain(|k, _| !k.contains("per_second") && !k.contains("runtime"));
            r
        })
        .collect())
}

fn adapter(out: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let mut tensors: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(
        out.join("adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )?
    .into_iter()
    .map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?)))
    .collect::<Result<_>>()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

#[test]
fn the_real_q4_1_file_trains_kept_quantized_as_dequantized() -> Result<()> {
    let Some(path) = real_file() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (kept, dense) = (dir.path().join("run-keep"), dir.path().join("run-none"));
    train(&config(&path, &kept, "keep")?)?;
    train(&config(&path, &dense, "none")?)?;

    let (got, want) = (rows(&kept)?, rows(&dense)?);
    assert_eq!(got.len(), want.len());
    assert!(got.len() >= STEPS, "a row per step");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
        assert!(w.get("loss").and_then(Value::as_f64).is_some(), "{w:?}");
        for (key, value) in w {
            if let (Some(a), Some(b)) = (g[key].as_f64(), value.as_f64()) {
                assert!(close(a, b), "{key} is {a} kept, {b} dense");
            }
        }
    }

    let (got, want) = (adapter(&kept)?, adapter(&dense)?);
    // Every linear of SmolLM2's 30 layers (q, k, v, o, gate, up, down), A and B.
    assert_eq!(want.len(), 30 * 7 * 2);
    assert_eq!(got.len(), want.len());
    for ((key, a), (other, b)) in got.iter().zip(&want) {
        assert_eq!(key, other);
        assert_eq!(a.len(), b.len(), "{key}");
        for (a, b) in a.iter().zip(b) {
            assert!(close(*a as f64, *b as f64), "{key} has {a} kept, {b} dense");
        }
    }
    // B starts at zero: that it moved shows the runs trained, so the comparison above compared something.
    assert!(
        want.iter()
            .any(|(k, v)| k.contains("lora_B") && v.iter().any(|x| *x != 0.0)),
        "no lora_B moved"
    );
    Ok(())
}
