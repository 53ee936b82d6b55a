//! The first step of the fixture's TRL `kto` run, recomputed from this crate's log-probs: TRL's logged log-prob,
//! entropy and mean-logit metrics, and its LoRA gradients (`grads_step1.safetensors`, unclipped since the logged
//! grad_norm is below max_grad_norm).
//!
//! At step 1 the policy equals the reference (both are `adapter_init`), so the log-ratios and the KL term are 0 and
//! the KTO loss reduces to mean_i(1 - sigmoid(±beta · logratio_i)), whose gradient only needs this crate.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kto_data::testing::trl_fixture;
use kto_model::{load_adapter, AdapterChoice, LlamaModel, ModelFiles, SequenceBatch};

/// The fixture's WordLevel tokenizer: whitespace split, `wN` → N, `</s>` → 2, `<s>` → 1.
fn tokenize(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .map(|w| match w {
            "<s>" => 1,
            "</s>" => 2,
            _ => w
                .strip_prefix('w')
                .and_then(|n| n.parse().ok())
                .expect("fixture word"),
        })
        .collect()
}

#[test]
fn step_one_matches_trl() -> Result<()> {
    let samples: Vec<serde_json::Value> =
        std::fs::read_to_string(trl_fixture().join("data.jsonl"))?
            .lines()
            .take(4)
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
    let rows: Vec<(Vec<u32>, usize, bool)> = samples
        .iter()
        .map(|s| {
            let prompt = tokenize(s["prompt"].as_str().unwrap());
            let full = tokenize(&format!(
                "{}{}",
                s["prompt"].as_str().unwrap(),
                s["completion"].as_str().unwrap()
            ));
            (full, prompt.len(), s["label"].as_bool().unwrap())
        })
        .collect();
    let width = rows.iter().map(|r| r.0.len()).max().unwrap();
    let mut input_ids = Vec::new();
    for (ids, _, _) in &rows {
        input_ids.extend(ids);
        input_ids.extend(std::iter::repeat_n(2u32, width - ids.len()));
    }
    let batch = SequenceBatch {
        input_ids,
        rows: 4,
        width,
        lengths: rows.iter().map(|r| r.0.len()).collect(),
        completion_starts: rows.iter().map(|r| r.1).collect(),
        pad_id: 2,
    };

    let ckpt = ModelFiles::from_dir(&trl_fixture().join("model"))?;
    let mut model = LlamaModel::load(&ckpt, DType::F32, &Device::Cpu)?;
    let run = trl_fixture().join("runs/kto");
    model.set_policy_adapter(Some(load_adapter(
        &trl_fixture().join("adapter_init"),
        model.config(),
        &Device::Cpu,
    )?))?;
    model.set_reference_adapter(Some(load_adapter(
        &run.join("ref"),
        model.config(),
        &Device::Cpu,
    )?))?;
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("log.json"))?)?;
    let step1 = &log[0];
    let beta = 0.1;

    let policy = model.sequence_logps(&batch, AdapterChoice::Policy)?;
    let reference = model.sequence_logps(&batch, AdapterChoice::Reference)?;
    let logps = policy.logps_vec()?;
    let labels: Vec<bool> = rows.iter().map(|r| r.2).collect();

    // Metrics as TRL logs them.
    let mean_over = |want: bool, values: &[f64], per_token: bool| {
        let picked = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == want)
            .map(|(i, _)| i);
        let (num, den) = picked.fold((0.0, 0.0), |(n, d), i| {
            (
                n + values[i],
                d + if per_token {
                    policy.token_counts[i] as f64
                } else {
                    1.0
                },
            )
        });
        num / den
    };
    let logps64: Vec<f64> = logps.iter().map(|&v| v as f64).collect();
    let close = |got: f64, key: &str, tol: f64| {
        let want = step1[key].as_f64().unwrap();
        assert!((got - want).abs() <= tol, "{key}: {got} vs TRL {want}");
    };
    close(mean_over(true, &logps64, false), "logps/chosen", 1e-4);
    close(mean_over(false, &logps64, false), "logps/rejected", 1e-4);
    close(
        mean_over(true, &policy.mean_logit_sums, true),
        "logits/chosen",
        1e-6,
    );
    close(
        mean_over(false, &policy.mean_logit_sums, true),
        "logits/rejected",
        1e-6,
    );
    let tokens: usize = policy.token_counts.iter().sum();
    close(
        policy.entropy_sums.iter().sum::<f64>() / tokens as f64,
        "entropy",
        1e-5,
    );
    close(
        batch.lengths.iter().sum::<usize>() as f64,
        "num_tokens",
        0.0,
    );

    // The KTO loss with KL = 0 (policy == reference at step 1).
    let logratio = (&policy.logps - reference.logps.detach())?;
    let signs = Tensor::new(
        labels
            .iter()
            .map(|&l| if l { 1f32 } else { -1f32 })
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let z = ((logratio * signs)? * beta)?;
    let sigmoid = ((z.neg()?.exp()? + 1.0)?.recip())?;
    let loss = (1.0 - sigmoid)?.mean_all()?;
    close(loss.to_scalar::<f32>()? as f64, "loss", 1e-6);
    let grads = loss.backward()?;

    let trl = candle_core::safetensors::load(run.join("grads_step1.safetensors"), &Device::Cpu)?;
    let mut norm_sq = 0f64;
    for (name, var) in model.trainable_vars() {
        let ours = grads.get(var.as_tensor()).expect("gradient");
        let theirs = trl
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not in grads_step1"));
        let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "{name}: max diff {diff} (TRL max |g| {scale})"
        );
        norm_sq += ours.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    close(norm_sq.sqrt(), "grad_norm", 1e-5);
    Ok(())
}
