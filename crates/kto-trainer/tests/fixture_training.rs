//! The LoRA Llama of the TRL fixture through the whole loop: exact resume (with gradient accumulation, a partial
//! accumulation group at the epoch end, LoRA dropout on) and precomputed reference log-probs equal to online ones.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;
use kto_trainer::config::{Config, Override};
use kto_trainer::run::{load_model, load_samples, run_training};
use kto_trainer::train::{train, TrainJob};
use serde_json::{Map, Value};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl-kto-parity")
}

fn config(out: &Path, extra: &[&str]) -> Result<Config> {
    let fx = fixture();
    let text = format!(
        "[model]\npath = \"{}\"\n[lora]\nr = 2\nalpha = 4\ndropout = 0.1\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n\
         [data]\ntrain_file = \"{}\"\neval_file = \"{}\"\nmax_length = 64\n\
         [kto]\ndisable_dropout = false\n\
         [train]\noutput_dir = \"{}\"\nper_device_train_batch_size = 4\nper_device_eval_batch_size = 5\n\
         gradient_accumulation_steps = 2\nlearning_rate = 0.01\nlr_scheduler_type = \"cosine\"\nwarmup_steps = 1\n\
         num_train_epochs = 2\nweight_decay = 0.1\nlogging_steps = 1\neval_steps = 3\nsave_steps = 1\n",
        fx.join("model").display(),
        fx.join("data.jsonl").display(),
        fx.join("data.jsonl").display(),
        out.display()
    );
    let sets: Vec<Override> = extra.iter().map(|s| s.parse()).collect::<Result<_>>()?;
    Config::from_toml_str(&text, Path::new("."), &sets)
}

fn run(config: &Config, resume: Option<&Path>, stop: Option<usize>) -> Result<()> {
    let mut loaded = load_model(config, None)?;
    let samples = load_samples(
        config,
        &loaded.tokenizer,
        config.data.train_file.as_ref().unwrap(),
    )?;
    let eval = load_samples(
        config,
        &loaded.tokenizer,
        config.data.eval_file.as_ref().unwrap(),
    )?;
    let job = TrainJob {
        config,
        train: &samples,
        eval: Some(&eval),
        pad_id: loaded.tokenizer.pad_id,
        train_reference: None,
        eval_reference: None,
        resume_from: resume,
        stop_after_step: stop,
        gradient_hook: None,
    };
    train(&mut loaded.policy, &job)?;
    Ok(())
}

fn rows(out: &Path) -> Result<Vec<Map<String, Value>>> {
    Ok(kto_trainer::metrics::read_rows(&out.join("metrics.jsonl"))?
        .into_iter()
        .map(|mut r| {
            r.remove("samples_per_second");
            r
        })
        .collect())
}

fn adapter_bits(out: &Path) -> Result<Vec<(String, Vec<u32>)>> {
    let tensors = candle_core::safetensors::load(
        out.join("adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    let mut out: Vec<(String, Vec<u32>)> = tensors
        .into_iter()
        .map(|(k, t)| {
            Ok((
                k,
                t.flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(f32::to_bits)
                    .collect(),
            ))
        })
        .collect::<Result<_>>()?;
    out.sort();
    Ok(out)
}

#[test]
fn resume_is_exact_on_the_lora_llama() -> Result<()> {
    let straight = tempfile::tempdir()?;
    run(&config(straight.path(), &[])?, None, None)?;
    let expected_rows = rows(straight.path())?;
    // 12 samples, batch 4: 3 micro-batches per epoch; accumulation 2: steps of 2 and 1 micro-batches; 2 epochs.
    assert_eq!(
        expected_rows
            .iter()
            .filter(|r| r.contains_key("loss"))
            .count(),
        4
    );
    assert_eq!(
        expected_rows
            .iter()
            .filter(|r| r.contains_key("eval_loss"))
            .count(),
        2,
        "step 3 and the end"
    );
    let expected_adapter = adapter_bits(straight.path())?;
    for k in [1usize, 2] {
        let out = tempfile::tempdir()?;
        let config = config(out.path(), &[])?;
        run(&config, None, Some(k))?;
        run(
            &config,
            Some(&out.path().join(format!("checkpoint-{k}"))),
            None,
        )?;
        assert_eq!(
            rows(out.path())?,
            expected_rows,
            "metrics after resuming at step {k}"
        );
        assert!(
            adapter_bits(out.path())? == expected_adapter,
            "adapter after resuming at step {k}"
        );
    }
    Ok(())
}

#[test]
fn precomputed_reference_matches_online_and_is_cached() -> Result<()> {
    let cache = tempfile::tempdir()?;
    std::env::set_var("KTO_CACHE_DIR", cache.path());
    let extra = [
        "train.save_steps=0".to_string(),
        format!(
            "lora.init_adapter={}",
            fixture().join("adapter_init").display()
        ),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let online = tempfile::tempdir()?;
    run_training(&config(online.path(), &extra)?, None, None)?;
    let mut with_pre = extra.clone();
    with_pre.push("kto.precompute_ref_log_probs=true");
    let pre = tempfile::tempdir()?;
    run_training(&config(pre.path(), &with_pre)?, None, None)?;
    let cached: Vec<_> = std::fs::read_dir(cache.path())?.collect();
    assert_eq!(
        cached.len(),
        2,
        "train and eval reference log-probs are cached"
    );
    assert_eq!(rows(pre.path())?, rows(online.path())?);
    assert!(adapter_bits(pre.path())? == adapter_bits(online.path())?);
    // A second run reuses the cache and still matches.
    let again = tempfile::tempdir()?;
    run_training(&config(again.path(), &with_pre)?, None, None)?;
    assert_eq!(rows(again.path())?, rows(online.path())?);
    Ok(())
}
