//! The training loop on a toy bigram model: exact resume, precompute == online, non-finite stop.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use kto_data::batch::{SequenceBatch, Shard};
use kto_data::tokenize::TokenizedSample;
use kto_trainer::config::{Config, LossType, Override};
use kto_trainer::hooks::Hooks;
use kto_trainer::policy::{precompute_reference, AdapterChoice, PolicyModel, SequenceLogps};
use kto_trainer::run_dir::{RunDir, RunLock};
use kto_trainer::train::{micro_batches, train, TrainJob};
use kto_trainer::world::{Alone, Dealt};
use serde_json::{Map, Value};

const VOCAB: usize = 8;

/// logits of the next token = table[previous token]; the reference is the initial table.
struct Bigram {
    table: Var,
    reference: Tensor,
    poison: bool,
}

impl Bigram {
    fn new(seed: u32) -> Result<Self> {
        let values: Vec<f32> = (0..VOCAB * VOCAB)
            .map(|i| (((i as u32).wrapping_mul(2654435761u32) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(values, (VOCAB, VOCAB), &Device::Cpu)?;
        Ok(Self {
            table: Var::from_tensor(&t)?,
            reference: t,
            poison: false,
        })
    }
}

impl PolicyModel for Bigram {
    fn sequence_logps(
        &self,
        batch: &SequenceBatch,
        choice: AdapterChoice,
    ) -> Result<SequenceLogps> {
        let table = match choice {
            AdapterChoice::Policy => self.table.as_tensor().clone(),
            AdapterChoice::PolicyNoGrad => self.table.as_tensor().detach(),
            AdapterChoice::Reference => self.reference.clone(),
        };
        let (mut prev, mut next, mut counts) = (vec![], vec![], vec![]);
        for r in 0..batch.rows {
            let start = batch.completion_starts[r].max(1);
            for p in start..batch.lengths[r] {
                prev.push(batch.input_ids[r * batch.width + p - 1]);
                next.push(batch.input_ids[r * batch.width + p]);
            }
            counts.push(batch.lengths[r] - start);
        }
        let n = prev.len();
        let logits = table.index_select(&Tensor::new(prev.as_slice(), &Device::Cpu)?, 0)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let token = log_probs
            .gather(&Tensor::from_vec(next, (n, 1), &Device::Cpu)?, 1)?
            .squeeze(1)?;
        let probs = log_probs.exp()?;
        let entropy: Vec<f32> = (probs.mul(&log_probs)?.sum(D::Minus1)? * -1.0)?.to_vec1()?;
        let mean_logits: Vec<f32> = logits.mean(D::Minus1)?.to_vec1()?;
        let (mut rows, mut ents, mut means, mut offset) = (vec![], vec![], vec![], 0);
        for &c in &counts {
            rows.push(token.narrow(0, offset, c)?.sum_all()?);
            ents.push(entropy[offset..offset + c].iter().map(|&v| v as f64).sum());
            means.push(
                mean_logits[offset..offset + c]
                    .iter()
                    .map(|&v| v as f64)
                    .sum(),
            );
            offset += c;
        }
        let mut logps = Tensor::stack(&rows, 0)?;
        if self.poison {
            logps = (logps * f64::NAN)?;
        }
        Ok(SequenceLogps {
            logps,
            token_counts: counts,
            mean_logit_sums: means,
            entropy_sums: ents,
            forward_tokens: batch.rows * batch.width,
        })
    }

    fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        Ok(loss.backward()?)
    }

    fn trainable_parameters(&self) -> Vec<(String, Var)> {
        vec![("table".into(), self.table.clone())]
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let tensors = std::collections::HashMap::from([(
            "table".to_string(),
            self.table.as_tensor().clone(),
        )]);
        candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
        Ok(())
    }
}

fn samples(n: usize, seed: usize) -> Vec<TokenizedSample> {
    (0..n)
        .map(|i| {
            let x = i * 7 + seed;
            TokenizedSample {
                prompt_ids: (0..2 + x % 3).map(|k| ((x + k) % VOCAB) as u32).collect(),
                completion_ids: (0..1 + (x / 3) % 4)
                    .map(|k| ((x * 3 + k * 5) % VOCAB) as u32)
                    .collect(),
                label: (i + seed).is_multiple_of(2),
                pair: Some((i / 2) as u64),
            }
        })
        .collect()
}

fn config(out: &Path, extra: &[&str]) -> Result<Config> {
    let text = "[train]\nper_device_train_batch_size = 2\nper_device_eval_batch_size = 3\ngradient_accumulation_steps = 2\n\
                learning_rate = 0.05\nlr_scheduler_type = \"linear\"\nwarmup_steps = 1\nnum_train_epochs = 2\n\
                logging_steps = 2\neval_steps = 2\nsave_steps = 1\nweight_decay = 0.01\nmax_grad_norm = 0.5\n\
                [data]\nmax_length = 6\n";
    let mut sets: Vec<Override> = vec![format!("train.output_dir={}", out.display()).parse()?];
    for s in extra {
        sets.push(s.parse()?);
    }
    Config::from_toml_str(text, Path::new("."), &sets)
}

fn without_timing(rows: Vec<Map<String, Value>>) -> Vec<Map<String, Value>> {
    rows.into_iter()
        .map(|mut r| {
            r.remove("samples_per_second");
            r
        })
        .collect()
}

fn adapter_bits(dir: &Path) -> Result<Vec<u32>> {
    let t = candle_core::safetensors::load(
        dir.join("adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    Ok(t["table"]
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

fn run(out: &Path, extra: &[&str], resume: Option<&Path>, stop: Option<usize>) -> Result<()> {
    let config = config(out, extra)?;
    let (train_set, eval_set) = (samples(10, 0), samples(5, 3));
    let mut model = Bigram::new(1)?;
    let lock = RunLock::acquire(out)?;
    let job = TrainJob {
        config: &config,
        output_dir: lock.dir(),
        lock: Some(&lock),
        world: &Alone,
        train: &train_set,
        eval: Some(&eval_set),
        pad_id: 0,
        train_reference: None,
        eval_reference: None,
        resume_from: resume,
    };
    let hooks = Hooks {
        stop_after_step: stop,
        ..Hooks::default()
    };
    train(&mut model, &job, &hooks)?;
    Ok(())
}

#[test]
fn resumed_runs_match_an_uninterrupted_one() -> Result<()> {
    let straight = tempfile::tempdir()?;
    run(straight.path(), &[], None, None)?;
    let rows = kto_trainer::metrics::read_rows(&straight.path().join("metrics.jsonl"))?;
    // 10 samples, batch 2 -> 5 micro-batches; accumulation 2 -> 3 steps per epoch (2, 2, 1 micro-batches); 2 epochs.
    let steps: Vec<i64> = rows
        .iter()
        .filter(|r| r.contains_key("loss"))
        .map(|r| r["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![2, 4, 6]);
    let eval_rows: Vec<&Map<String, Value>> = rows
        .iter()
        .filter(|r| r.contains_key("eval_loss"))
        .collect();
    assert_eq!(eval_rows.len(), 3);
    assert!(
        eval_rows[0].contains_key("eval_reward_auroc")
            && eval_rows[0].contains_key("eval_pair_accuracy")
    );
    assert_eq!(
        rows[0]["epoch"].as_f64(),
        Some(0.8),
        "step 2 ends with micro-batch 4 of 5"
    );
    // linear, 6 steps, 1 warm-up step: the logged rate is the one the step used, lr * (6 - (step - 1)) / 5.
    let lrs: Vec<f64> = rows
        .iter()
        .filter(|r| r.contains_key("loss"))
        .map(|r| r["learning_rate"].as_f64().unwrap())
        .collect();
    for (got, want) in lrs.iter().zip([0.05, 0.03, 0.01]) {
        assert!((got - want).abs() < 1e-12, "{lrs:?}");
    }
    let expected_rows = without_timing(rows);
    let expected_adapter = adapter_bits(straight.path())?;

    // k = 1 and 4: mid-epoch with a pending (unlogged) step; k = 3: at the epoch end, after a partial group.
    for k in [1usize, 3, 4] {
        let out = tempfile::tempdir()?;
        run(out.path(), &[], None, Some(k))?;
        assert!(
            !out.path().join("adapter").exists(),
            "an interrupted run writes no final adapter"
        );
        let checkpoint = RunDir::new(out.path()).latest_complete().unwrap();
        assert_eq!(checkpoint, out.path().join(format!("checkpoint-{k}")));
        run(out.path(), &[], Some(&checkpoint), None)?;
        let rows = without_timing(kto_trainer::metrics::read_rows(
            &out.path().join("metrics.jsonl"),
        )?);
        assert_eq!(rows, expected_rows, "metrics after resuming at step {k}");
        assert_eq!(
            adapter_bits(out.path())?,
            expected_adapter,
            "adapter after resuming at step {k}"
        );
    }
    Ok(())
}

#[test]
fn held_out_metrics_of_an_untrained_policy() -> Result<()> {
    // Policy = reference: every log-ratio and the KL are 0, so each KTO loss is 1 - sigmoid(0) = 0.5, no sample is
    // strictly on its right side, all rewards tie (AUROC 0.5) and no pair is won.
    let out = tempfile::tempdir()?;
    let config = config(out.path(), &[])?;
    let model = Bigram::new(1)?;
    let eval_set = samples(6, 1);
    let batches = micro_batches(&config, &eval_set, 0, true)?;
    let settings = kto_trainer::train::loss_settings(&config)?;
    let row = kto_trainer::evaluate::evaluate_batches(
        &model,
        batches.epoch(0),
        &Alone,
        Dealt::of(&batches, Shard::WHOLE),
        kto_trainer::policy::Reference::Online,
        &settings,
        7,
    )?;
    let get = |k: &str| row[k].as_f64().unwrap();
    assert!((get("eval_loss") - 0.5).abs() < 1e-7);
    assert_eq!(get("eval_kl"), 0.0);
    assert_eq!(get("eval_rewards/chosen"), 0.0);
    assert_eq!(get("eval_reward_accuracy"), 0.0);
    assert_eq!(get("eval_reward_auroc"), 0.5);
    assert_eq!(get("eval_pair_accuracy"), 0.0);
    assert_eq!(get("eval_num_tokens"), 7.0);
    assert_eq!(row["eval_samples"].as_u64(), Some(6));
    Ok(())
}

#[test]
fn precomputed_reference_equals_online() -> Result<()> {
    let online = tempfile::tempdir()?;
    run(online.path(), &[], None, None)?;
    let pre = tempfile::tempdir()?;
    let config = config(pre.path(), &["kto.precompute_ref_log_probs=true"])?;
    let (train_set, eval_set) = (samples(10, 0), samples(5, 3));
    let mut model = Bigram::new(1)?;
    let train_batches = micro_batches(&config, &train_set, 0, false)?;
    let eval_batches = micro_batches(&config, &eval_set, 0, true)?;
    let alone = |batches| Dealt::of(batches, Shard::WHOLE);
    let train_ref = precompute_reference(
        &model,
        train_batches.epoch(0),
        &Alone,
        alone(&train_batches),
        true,
        "train",
    )?;
    let eval_ref = precompute_reference(
        &model,
        eval_batches.epoch(0),
        &Alone,
        alone(&eval_batches),
        true,
        "eval",
    )?;
    let lock = RunLock::acquire(pre.path())?;
    let job = TrainJob {
        config: &config,
        output_dir: lock.dir(),
        lock: Some(&lock),
        world: &Alone,
        train: &train_set,
        eval: Some(&eval_set),
        pad_id: 0,
        train_reference: Some(&train_ref),
        eval_reference: Some(&eval_ref),
        resume_from: None,
    };
    train(&mut model, &job, &Hooks::default())?;
    // Every number the same except the work: the precomputed run's steps skip the reference passes.
    let read = |p: &Path| -> Result<Vec<Map<String, Value>>> {
        let rows = kto_trainer::metrics::read_rows(&p.join("metrics.jsonl")).map(without_timing)?;
        Ok(rows
            .into_iter()
            .map(|mut r| {
                r.remove("num_forward_tokens");
                r.remove("eval_num_forward_tokens");
                r
            })
            .collect())
    };
    assert_eq!(read(pre.path())?, read(online.path())?);
    assert_eq!(adapter_bits(pre.path())?, adapter_bits(online.path())?);
    Ok(())
}

#[test]
fn apo_zero_unpaired_trains_without_kl() -> Result<()> {
    let out = tempfile::tempdir()?;
    run(
        out.path(),
        &["kto.loss_type=apo_zero_unpaired", "train.shuffle=true"],
        None,
        None,
    )?;
    let rows = kto_trainer::metrics::read_rows(&out.path().join("metrics.jsonl"))?;
    assert!(rows
        .iter()
        .filter(|r| r.contains_key("kl"))
        .all(|r| r["kl"].as_f64() == Some(0.0)));
    assert_eq!(
        config(out.path(), &["kto.loss_type=apo_zero_unpaired"])?
            .kto
            .loss_type,
        LossType::ApoZeroUnpaired
    );
    Ok(())
}

#[test]
fn non_finite_loss_stops_with_the_step_and_keeps_checkpoints() -> Result<()> {
    let out = tempfile::tempdir()?;
    run(out.path(), &[], None, Some(2))?;
    let config = config(out.path(), &[])?;
    let train_set = samples(10, 0);
    let mut model = Bigram::new(1)?;
    model.poison = true;
    let checkpoint = out.path().join("checkpoint-2");
    let lock = RunLock::acquire(out.path())?;
    let job = TrainJob {
        config: &config,
        output_dir: lock.dir(),
        lock: Some(&lock),
        world: &Alone,
        train: &train_set,
        eval: None,
        pad_id: 0,
        train_reference: None,
        eval_reference: None,
        resume_from: Some(&checkpoint),
    };
    let err = train(&mut model, &job, &Hooks::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("step 3") && err.contains("non-finite"),
        "{err}"
    );
    kto_trainer::checkpoint::check_complete(&checkpoint, true)?;
    let _ = DType::F32;
    Ok(())
}
