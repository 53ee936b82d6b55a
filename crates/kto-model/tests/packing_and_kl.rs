//! Padding-free batches and prefix-shared KL sequences give the numbers of the plain path: right-padded batches,
//! the KL sequences in a full pass of their own. Per-row log-probs to 1e-5 in f32, every switch combination, rows cut
//! by `max_length`, one-token prompts, a prompt that fills the whole length, a sliding window; LoRA gradients of the
//! packed policy pass equal the padded one's.

use anyhow::Result;
use candle_core::{Device, Tensor};
use kto_data::testing::trl_fixture;
use kto_model::testing::with_fixture_adapter;
use kto_model::{
    AdapterChoice, LlamaModel, ModelFiles, ModelOptions, SequenceBatch, SequenceLogps,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The fixture's tiny Llama with its (non-zero) initial adapter as the policy; `sliding_window` makes it a Mistral.
fn model(sliding_window: Option<usize>) -> Result<(LlamaModel, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(
            trl_fixture().join("model").join(file),
            dir.path().join(file),
        )?;
    }
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        trl_fixture().join("model/config.json"),
    )?)?;
    if let Some(window) = sliding_window {
        config["model_type"] = "mistral".into();
        config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        config["sliding_window"] = window.into();
    }
    std::fs::write(dir.path().join("config.json"), config.to_string())?;
    let model = with_fixture_adapter(&ModelFiles::from_dir(dir.path())?)?;
    Ok((model, dir))
}

/// Targets and TRL-style KL sequences (completions rotated by one) of random tokens: prompts of 1 to 16 tokens,
/// completions of 1 to 9, cut at `max_length` = 14 (the 16-token prompt leaves no completion at all).
fn batches(vocab: usize) -> (SequenceBatch, SequenceBatch) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(3..vocab as u32)).collect() };
    let shapes = [(1, 4), (5, 9), (16, 3), (3, 7), (1, 1), (8, 8)];
    let samples: Vec<(Vec<u32>, Vec<u32>)> = shapes
        .iter()
        .map(|&(p, c)| (tokens(p), tokens(c)))
        .collect();
    let n = samples.len();
    let target = SequenceBatch::from_rows(
        samples.iter().map(|(p, c)| (p.as_slice(), c.as_slice())),
        Some(14),
        2,
    );
    let kl = SequenceBatch::from_rows(
        (0..n).map(|i| {
            (
                samples[i].0.as_slice(),
                samples[(i + n - 1) % n].1.as_slice(),
            )
        }),
        Some(14),
        2,
    );
    assert!(target.lengths.contains(&14) && target.lengths.iter().any(|&l| l < 14));
    (target, kl)
}

fn assert_rows_match(what: &str, got: &SequenceLogps, want: &SequenceLogps) -> Result<()> {
    assert_eq!(got.token_counts, want.token_counts, "{what}: token counts");
    for (r, (a, b)) in got.logps_vec()?.iter().zip(want.logps_vec()?).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what} row {r}: {a} vs plain {b}"
        );
    }
    for r in 0..want.token_counts.len() {
        assert!(
            (got.mean_logit_sums[r] - want.mean_logit_sums[r]).abs() <= 1e-4,
            "{what} row {r}: mean logit"
        );
        assert!(
            (got.entropy_sums[r] - want.entropy_sums[r]).abs() <= 1e-4,
            "{what} row {r}: entropy"
        );
    }
    Ok(())
}

/// (padding_free, kl_prefix_sharing, segmented attention).
const SWITCHES: [(bool, bool, bool); 6] = [
    (false, false, false),
    (false, true, false),
    (true, false, false),
    (true, true, false),
    (false, true, true),
    (true, true, true),
];

fn check_every_switch(sliding_window: Option<usize>) -> Result<()> {
    let (mut model, _dir) = model(sliding_window)?;
    let (target, kl) = batches(model.config().vocab_size);
    for choice in [AdapterChoice::Policy, AdapterChoice::Reference] {
        model.set_options(ModelOptions {
            padding_free: false,
            kl_prefix_sharing: false,
            ..ModelOptions::default()
        });
        let plain_target = model.sequence_logps(&target, choice)?;
        let plain_kl = model.sequence_logps(&kl, kl_choice(choice))?;
        assert_eq!(plain_target.forward_tokens, target.rows * target.width);
        // Segmented: attention block by block, as the GPU's dense attention runs packed rows and continuations.
        for (padding_free, sharing, segmented) in SWITCHES {
            {
                model.set_options(ModelOptions {
                    padding_free,
                    kl_prefix_sharing: sharing,
                    segmented_attention: segmented,
                    ..ModelOptions::default()
                });
                let what = format!("{choice:?} window {sliding_window:?} padding_free {padding_free} sharing {sharing} segmented {segmented}");
                let (t, k) = model.sequence_logps_with_kl(&target, &kl, choice)?;
                assert_rows_match(&format!("{what}: targets"), &t, &plain_target)?;
                assert_rows_match(&format!("{what}: KL"), &k, &plain_kl)?;
                let target_tokens = if padding_free {
                    target.num_tokens()
                } else {
                    target.rows * target.width
                };
                assert_eq!(t.forward_tokens, target_tokens, "{what}");
                // Shared: only the KL completions (what follows each prompt) run through the model.
                let kl_completions: usize = (0..kl.rows)
                    .map(|r| kl.lengths[r] - kl.completion_starts[r])
                    .sum();
                let kl_tokens = match (sharing, padding_free) {
                    (true, _) => kl_completions,
                    (false, true) => kl.num_tokens(),
                    (false, false) => kl.rows * kl.width,
                };
                assert_eq!(k.forward_tokens, kl_tokens, "{what}");
            }
        }
    }
    Ok(())
}

/// The KL pass's weights: the policy's without a graph for a policy pass, else the same.
fn kl_choice(choice: AdapterChoice) -> AdapterChoice {
    match choice {
        AdapterChoice::Policy => AdapterChoice::PolicyNoGrad,
        other => other,
    }
}

#[test]
fn every_switch_gives_the_plain_numbers() -> Result<()> {
    check_every_switch(None)
}

#[test]
fn every_switch_gives_the_plain_numbers_in_a_sliding_window() -> Result<()> {
    check_every_switch(Some(4))
}

#[test]
fn packed_policy_gradients_equal_padded_ones() -> Result<()> {
    let (mut model, _dir) = model(None)?;
    let (target, kl) = batches(model.config().vocab_size);
    let mut gradients = Vec::new();
    for (padding_free, segmented) in [(false, false), (true, false), (true, true)] {
        model.set_options(ModelOptions {
            padding_free,
            segmented_attention: segmented,
            ..ModelOptions::default()
        });
        let (t, _) = model.sequence_logps_with_kl(&target, &kl, AdapterChoice::Policy)?;
        // Weigh rows differently so that a row mix-up shows.
        let weights = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0, -1.0, 0.25], &Device::Cpu)?;
        let grads = (t.logps * weights)?.sum_all()?.backward()?;
        let per_var: Vec<(String, Tensor)> = model
            .trainable_vars()
            .into_iter()
            .map(|(name, var)| {
                (
                    name,
                    grads
                        .get(var.as_tensor())
                        .expect("every LoRA tensor has a gradient")
                        .clone(),
                )
            })
            .collect();
        gradients.push(per_var);
    }
    let mut nonzero = 0;
    for packed_gradients in &gradients[1..] {
        for ((name, padded), (_, packed)) in gradients[0].iter().zip(packed_gradients) {
            let scale = padded.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (padded - packed)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{name}: max diff {diff} (max |g| {scale})"
            );
        }
    }
    for (_, padded) in &gradients[0] {
        nonzero += usize::from(padded.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
    }
    assert_eq!(
        nonzero,
        gradients[0].len(),
        "every LoRA tensor gets a gradient"
    );
    Ok(())
}
