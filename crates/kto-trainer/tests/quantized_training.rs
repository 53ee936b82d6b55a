//! KTO training over a base held quantized (`[model] quantize`) gives the per-step metrics and the final adapter of
//! the same run over its dense twin (the weights quantized and dequantized, written as a plain checkpoint), and a
//! run cannot be resumed with another `quantize`. The real SmolLM2-135M-Instruct Q4_1 GGUF (when present:
//! `scripts/get-smollm2.sh`) trains with `keep` as with `none` (the file dequantized at load).

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use kto_data::testing::trl_fixture;
use kto_model::testing::{dequantized_twin, TinyModel};
use kto_trainer::config::{Config, Override};
use kto_trainer::from_config::run_training;
use kto_trainer::hooks::Hooks;
use kto_trainer::run_dir::{check_resumable, Begin, RunLock};
use kto_trainer::world::Alone;
use serde_json::{Map, Value};
use std::path::Path;

/// The fixture's vocabulary (its tokenizer is copied beside the weights), with rows of 256 for k-quants.
fn tiny() -> TinyModel {
    TinyModel {
        vocab_size: 128,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        ..TinyModel::default()
    }
}

fn write_model(dir: &Path, weights: &[(String, Tensor)]) -> Result<()> {
    tiny().write_weights(dir, weights, 1)?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(trl_fixture().join("model").join(file), dir.join(file))?;
    }
    Ok(())
}

/// What a compared run trains on: its data, row length, batch and learning rate (3 steps, LoRA r 4, f32).
struct Shape<'a> {
    data: &'a Path,
    max_length: usize,
    batch: usize,
    learning_rate: f64,
}

/// The TRL fixture's data on the tiny model.
fn fixture_shape(data: &Path) -> Shape<'_> {
    Shape {
        data,
        max_length: 64,
        batch: 4,
        learning_rate: 0.01,
    }
}

fn config(model: &Path, out: &Path, quantize: &str, shape: &Shape) -> Result<Config> {
    let text = format!(
        "[model]\npath = \"{}\"\nquantize = \"{quantize}\"\n[lora]\nr = 4\nalpha = 8\n\
         [data]\ntrain_file = \"{}\"\nmax_length = {}\n\
         [train]\noutput_dir = \"{}\"\nper_device_train_batch_size = {}\nlearning_rate = {}\n\
         lr_scheduler_type = \"constant\"\nmax_steps = 3\nlogging_steps = 1\nsave_steps = 3\n",
        model.display(),
        shape.data.display(),
        shape.max_length,
        out.display(),
        shape.batch,
        shape.learning_rate,
    );
    Config::from_toml_str(&text, Path::new("."), &[])
}

fn train(config: &Config) -> Result<()> {
    let out = config.train.output_dir.as_deref().expect("output_dir");
    let lock = RunLock::acquire(out)?;
    let start = lock.begin(Begin::Fresh)?;
    let summary = run_training(config, Some(&lock), &start, &Alone, &Hooks::default())?;
    assert_eq!(summary.global_step, 3);
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

/// The runs in `got` and `want` logged the same rows (timings aside) and saved the same adapter, to 1e-5; and the
/// adapter's B moved from its zero init, so the runs trained and the comparison compared something.
fn assert_same_runs(label: &str, got: &Path, want: &Path) -> Result<()> {
    let (got_rows, want_rows) = (rows(got)?, rows(want)?);
    assert_eq!(got_rows.len(), want_rows.len());
    assert!(got_rows.len() >= 3, "{label}: a row per step");
    for (g, w) in got_rows.iter().zip(&want_rows) {
        assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
        assert!(w.get("loss").and_then(Value::as_f64).is_some(), "{w:?}");
        for (key, value) in w {
            if let (Some(a), Some(b)) = (g[key].as_f64(), value.as_f64()) {
                assert!(close(a, b), "{label}: {key} is {a}, the twin's {b}");
            }
        }
    }
    let (got, want) = (adapter(got)?, adapter(want)?);
    assert_eq!(got.len(), want.len());
    for ((key, a), (other, b)) in got.iter().zip(&want) {
        assert_eq!((key, a.len()), (other, b.len()));
        for (a, b) in a.iter().zip(b) {
            assert!(
                close(*a as f64, *b as f64),
                "{label}: {key} has {a}, the twin's {b}"
            );
        }
    }
    assert!(
        want.iter()
            .any(|(k, v)| k.contains("lora_B") && v.iter().any(|x| *x != 0.0)),
        "{label}: no lora_B moved"
    );
    Ok(())
}

#[test]
fn training_over_a_quantized_base_equals_training_over_its_dequantized_twin() -> Result<()> {
    let weights = tiny().random_weights(3)?;
    for (name, block_type) in [("q4_k", GgmlDType::Q4K), ("q8_0", GgmlDType::Q8_0)] {
        let dir = tempfile::tempdir()?;
        let (source, twin) = (dir.path().join("source"), dir.path().join("twin"));
        write_model(&source, &weights)?;
        write_model(&twin, &dequantized_twin(&weights, block_type)?)?;
        let data = trl_fixture().join("data.jsonl");
        let quantized = config(
            &source,
            &dir.path().join("run-q"),
            name,
            &fixture_shape(&data),
        )?;
        let dense = config(
            &twin,
            &dir.path().join("run-twin"),
            "none",
            &fixture_shape(&data),
        )?;
        train(&quantized)?;
        train(&dense)?;

        assert_same_runs(
            name,
            &dir.path().join("run-q"),
            &dir.path().join("run-twin"),
        )?;

        // The checkpoint records the setting; resuming with another one is refused, naming the key.
        let checkpoint = dir.path().join("run-q/checkpoint-3");
        let saved = std::fs::read_to_string(checkpoint.join("config.toml"))?;
        assert!(saved.contains(&format!("quantize = \"{name}\"")), "{saved}");
        check_resumable(&quantized, &checkpoint)?;
        let other: Override = "model.quantize=none".parse()?;
        let changed = Config::from_toml_str(&quantized.to_toml_string(), Path::new("."), &[other])?;
        let error = check_resumable(&changed, &checkpoint)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("model.quantize") && error.contains(name) && error.contains("none"),
            "{error}"
        );
    }
    Ok(())
}

#[test]
fn the_real_q4_1_file_trains_kept_quantized_as_dequantized() -> Result<()> {
    let Some(path) = kto_model::testing::smollm2_gguf() else {
        return Ok(());
    };
    // Short rows: SmolLM2 has 30 layers and this runs in a dev build.
    let data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/hh-sample/train.jsonl")
        .canonicalize()?;
    let shape = Shape {
        data: &data,
        max_length: 48,
        batch: 2,
        learning_rate: 0.001,
    };
    let dir = tempfile::tempdir()?;
    let (kept, dense) = (dir.path().join("run-keep"), dir.path().join("run-none"));
    train(&config(&path, &kept, "keep", &shape)?)?;
    train(&config(&path, &dense, "none", &shape)?)?;
    assert_same_runs("SmolLM2 Q4_1 keep", &kept, &dense)?;
    // Every linear of SmolLM2's 30 layers (q, k, v, o, gate, up, down), A and B.
    assert_eq!(adapter(&dense)?.len(), 30 * 7 * 2);
    Ok(())
}
