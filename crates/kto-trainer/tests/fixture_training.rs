//! The LoRA Llama of the TRL fixture through the whole loop: exact resume (with gradient accumulation, a partial
//! accumulation group at the epoch end, LoRA dropout on, gradient checkpointing off and on), checkpointed gradients
//! equal to plain ones, and precomputed reference log-probs equal to online ones.

use kto_data::testing::trl_fixture;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use kto_trainer::config::{Config, Override};
use kto_trainer::from_config::{load_model, load_samples, run_training};
use kto_trainer::hooks::Hooks;
use kto_trainer::policy::{score_micro_batch, PolicyModel, Reference};
use kto_trainer::run_dir::{Begin, RunLock};
use kto_trainer::train::{loss_settings, micro_batches, train, TrainJob};
use kto_trainer::world::{Alone, Gather};
use serde_json::{Map, Value};

fn config(out: &Path, extra: &[&str]) -> Result<Config> {
    let fx = trl_fixture();
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
    let lock = RunLock::acquire(config.train.output_dir.as_deref().expect("output_dir set"))?;
    let job = TrainJob {
        config,
        output_dir: lock.dir(),
        lock: Some(&lock),
        world: &Alone,
        train: &samples,
        eval: Some(&eval),
        pad_id: loaded.tokenizer.pad_id,
        train_reference: None,
        eval_reference: None,
        resume_from: resume,
    };
    let hooks = Hooks {
        stop_after_step: stop,
        ..Hooks::default()
    };
    train(&mut loaded.policy, &job, &hooks)?;
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

type Rows = Vec<Map<String, Value>>;
type AdapterBits = Vec<(String, Vec<u32>)>;

fn adapter_bits(out: &Path) -> Result<AdapterBits> {
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

/// Exact resume with gradient checkpointing off (the default) and on: the recompute replays LoRA dropout, so a
/// resumed run still equals an uninterrupted one bit for bit.
#[test]
fn resume_is_exact_on_the_lora_llama() -> Result<()> {
    for extra in [&[][..], &["train.gradient_checkpointing=true"][..]] {
        resume_is_exact(extra).with_context(|| format!("with {extra:?}"))?;
    }
    Ok(())
}

fn resume_is_exact(extra: &[&str]) -> Result<()> {
    let straight = tempfile::tempdir()?;
    run(&config(straight.path(), extra)?, None, None)?;
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
        let config = config(out.path(), extra)?;
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

/// `[train] gradient_checkpointing` reaches the model, the model then recomputes (a plain `Tensor::backward` no
/// longer finds the LoRA gradients, which arrive through `PolicyModel::backward`), and the gradients equal the
/// plain path's, with a KL pass in the loss: for the fixture's initial adapter (B not zero, so every LoRA tensor
/// has a gradient) and for a fresh one (B zero: only the B tensors have one). Without LoRA dropout: with it, the
/// checkpointed layers draw their masks from per-layer seeds, so the two paths see different masks (each replays
/// its own exactly, which `resume_is_exact_on_the_lora_llama` checks).
#[test]
fn gradient_checkpointing_gives_the_plain_gradients() -> Result<()> {
    let init = format!(
        "lora.init_adapter={}",
        trl_fixture().join("adapter_init").display()
    );
    checkpointed_gradients_equal_plain(&[&init], true)?;
    checkpointed_gradients_equal_plain(&["kto.disable_dropout=true"], false)
}

fn checkpointed_gradients_equal_plain(extra: &[&str], every_nonzero: bool) -> Result<()> {
    let mut grads = Vec::new();
    for on in [false, true] {
        let out = tempfile::tempdir()?;
        let switch = format!("train.gradient_checkpointing={on}");
        let sets: Vec<&str> = extra.iter().copied().chain([switch.as_str()]).collect();
        let config = config(out.path(), &sets)?;
        let mut loaded = load_model(&config, None)?;
        assert_eq!(loaded.policy.model.options().gradient_checkpointing, on);
        let samples = load_samples(
            &config,
            &loaded.tokenizer,
            config.data.train_file.as_ref().unwrap(),
        )?;
        let settings = loss_settings(&config)?;
        let batch = micro_batches(&config, &samples, loaded.tokenizer.pad_id, false)?
            .batch(0, 0)
            .expect("a first micro-batch");
        let params = loaded.policy.trainable_parameters();
        let score = |policy: &mut kto_trainer::llama_policy::LoraPolicy| -> Result<Tensor> {
            policy.begin_step(7)?;
            let scored = score_micro_batch(
                &*policy,
                &batch,
                Reference::Online,
                &settings,
                true,
                Gather::alone(),
            )?;
            Ok(scored.loss.loss)
        };
        let loss = score(&mut loaded.policy)?;
        let store = loaded.policy.backward(&loss)?;
        let step: Vec<(String, Vec<f32>)> = params
            .iter()
            .map(|(name, var)| {
                let g = store
                    .get(var.as_tensor())
                    .expect("a gradient for every LoRA tensor");
                Ok((name.clone(), g.flatten_all()?.to_vec1::<f32>()?))
            })
            .collect::<Result<_>>()?;
        grads.push(step);
        // Last: the model refuses a further forward while gradients of a plain backward wait uncollected.
        let plain = score(&mut loaded.policy)?.backward()?;
        let plain_found = params
            .iter()
            .filter(|(_, v)| plain.get(v.as_tensor()).is_some())
            .count();
        if on {
            assert_eq!(
                plain_found, 0,
                "checkpointed layers hand their LoRA gradients to the model"
            );
        } else {
            assert_eq!(plain_found, params.len());
        }
    }
    let (plain, recomputed) = (&grads[0], &grads[1]);
    assert_eq!(plain.len(), recomputed.len());
    for ((name, a), (_, b)) in plain.iter().zip(recomputed) {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: gradients differ by {worst}");
        assert!(
            !every_nonzero || a.iter().any(|&x| x != 0.0),
            "{name}: a gradient to compare"
        );
    }
    assert!(
        plain.iter().any(|(_, a)| a.iter().any(|&x| x != 0.0)),
        "gradients to compare"
    );
    Ok(())
}

/// `run_training` as `kto train` calls it: holding the output folder's lock.
fn train_locked(config: &Config) -> Result<()> {
    let lock = RunLock::acquire(config.train.output_dir.as_deref().expect("output_dir set"))?;
    let start = lock.begin(Begin::Fresh)?;
    run_training(config, Some(&lock), &start, &Alone, &Hooks::default())?;
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
            trl_fixture().join("adapter_init").display()
        ),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let online = tempfile::tempdir()?;
    train_locked(&config(online.path(), &extra)?)?;
    let mut with_pre = extra.clone();
    with_pre.push("kto.precompute_ref_log_probs=true");
    let pre = tempfile::tempdir()?;
    train_locked(&config(pre.path(), &with_pre)?)?;
    let cached: Vec<_> = std::fs::read_dir(cache.path())?.collect();
    assert_eq!(
        cached.len(),
        2,
        "train and eval reference log-probs are cached"
    );
    // The steps skip the reference passes: fewer forward tokens, every other number the same.
    let (pre_rows, online_rows) = (rows(pre.path())?, rows(online.path())?);
    for (p, o) in pre_rows.iter().zip(&online_rows) {
        let tokens = |row: &Map<String, Value>, key: &str| row.get(key).and_then(Value::as_f64);
        if let (Some(p), Some(o)) = (
            tokens(p, "num_forward_tokens"),
            tokens(o, "num_forward_tokens"),
        ) {
            assert!(p < o, "precomputed: {p} forward tokens, online {o}");
        }
    }
    let without_forward_tokens = |rows: Vec<Map<String, Value>>| -> Vec<Map<String, Value>> {
        rows.into_iter()
            .map(|mut r| {
                r.remove("num_forward_tokens");
                r.remove("eval_num_forward_tokens");
                r
            })
            .collect()
    };
    let online_rows = without_forward_tokens(online_rows);
    assert_eq!(without_forward_tokens(pre_rows), online_rows);
    assert!(adapter_bits(pre.path())? == adapter_bits(online.path())?);
    // A second run reuses the cache and still matches.
    let again = tempfile::tempdir()?;
    train_locked(&config(again.path(), &with_pre)?)?;
    assert_eq!(without_forward_tokens(rows(again.path())?), online_rows);
    Ok(())
}

/// Padding-free batches and prefix-shared KL sequences change the work, not the numbers: training rows, held-out
/// evaluation rows and the adapter of a run with both on (the default) match runs with each off, to float rounding.
#[test]
fn padding_free_and_kl_prefix_sharing_change_only_the_work() -> Result<()> {
    // Without dropout (TRL's default): with LoRA dropout drawing masks, the KL sequences get a pass of their own.
    let run_with = |switches: &[&str]| -> Result<(Rows, AdapterBits)> {
        let out = tempfile::tempdir()?;
        let mut extra = vec!["kto.disable_dropout=true", "train.save_steps=0"];
        extra.extend_from_slice(switches);
        run(&config(out.path(), &extra)?, None, None)?;
        Ok((rows(out.path())?, adapter_bits(out.path())?))
    };
    let (on_rows, on_adapter) = run_with(&[])?;
    assert!(
        on_rows.iter().any(|r| r.contains_key("eval_loss")),
        "the runs evaluate"
    );
    for switches in [
        &["kto.padding_free=false"][..],
        &["kto.kl_prefix_sharing=false"],
        &["kto.padding_free=false", "kto.kl_prefix_sharing=false"],
    ] {
        let (off_rows, off_adapter) = run_with(switches)?;
        assert_eq!(off_rows.len(), on_rows.len());
        for (on, off) in on_rows.iter().zip(&off_rows) {
            assert_eq!(
                on.keys().collect::<Vec<_>>(),
                off.keys().collect::<Vec<_>>()
            );
            for (key, value) in on {
                let (a, b) = (value.as_f64(), off[key].as_f64());
                if key.ends_with("num_forward_tokens") {
                    assert!(a < b, "{switches:?}: {key} {a:?} on, {b:?} off");
                } else if let (Some(a), Some(b)) = (a, b) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{switches:?} step {}: {key} {a} on, {b} off",
                        on["step"]
                    );
                } else {
                    assert_eq!(value, &off[key], "{switches:?}: {key}");
                }
            }
        }
        for ((name, on), (_, off)) in on_adapter.iter().zip(&off_adapter) {
            for (a, b) in on.iter().zip(off) {
                let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{switches:?}: {name}: {a} vs {b}"
                );
            }
        }
    }
    Ok(())
}
