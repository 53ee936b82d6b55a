//! Model tests on the TRL parity fixture and on tiny random checkpoints (CPU, f32).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kto_data::testing::trl_fixture;
use kto_model::lora::{LoraAdapter, LoraConfig, LoraTarget};
use kto_model::peft::{load_adapter, save_adapter};
use kto_model::testing::TinyModel;
use kto_model::{AdapterChoice, LlamaModel, ModelFiles, ModelOptions, SequenceBatch};
use std::path::Path;

fn fixture_model() -> Result<LlamaModel> {
    let ckpt = ModelFiles::from_dir(&trl_fixture().join("model"))?;
    LlamaModel::load(&ckpt, DType::F32, &Device::Cpu)
}

fn fixture_model_with_adapter() -> Result<LlamaModel> {
    kto_model::testing::with_fixture_adapter(&ModelFiles::from_dir(&trl_fixture().join("model"))?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

fn batch_from_rows(rows: &[(Vec<u32>, usize)], width: usize, pad_id: u32) -> SequenceBatch {
    let mut input_ids = Vec::new();
    for (ids, _) in rows {
        input_ids.extend(ids);
        input_ids.extend(std::iter::repeat_n(pad_id, width - ids.len()));
    }
    SequenceBatch {
        input_ids,
        rows: rows.len(),
        width,
        lengths: rows.iter().map(|(ids, _)| ids.len()).collect(),
        completion_starts: rows.iter().map(|(_, s)| *s).collect(),
        pad_id,
    }
}

fn fixture_input_ids() -> Result<Tensor> {
    let golden =
        candle_core::safetensors::load(trl_fixture().join("logits.safetensors"), &Device::Cpu)?;
    Ok(golden["input_ids"].to_dtype(DType::U32)?)
}

#[test]
fn fixture_logits_match_transformers() -> Result<()> {
    let golden =
        candle_core::safetensors::load(trl_fixture().join("logits.safetensors"), &Device::Cpu)?;
    let ids = fixture_input_ids()?;
    let mut model = fixture_model()?;
    let base = model.forward_logits(&ids, &[8, 8], AdapterChoice::Reference)?;
    let diff = max_abs_diff(&base, &golden["base_logits"])?;
    assert!(diff < 1e-5, "base logits differ by {diff}");

    let adapter = load_adapter(
        &trl_fixture().join("adapter_init"),
        model.config(),
        &Device::Cpu,
    )?;
    model.set_policy_adapter(Some(adapter))?;
    for choice in [AdapterChoice::PolicyNoGrad, AdapterChoice::Policy] {
        let lora = model.forward_logits(&ids, &[8, 8], choice)?;
        let diff = max_abs_diff(&lora, &golden["lora_logits"])?;
        assert!(diff < 1e-5, "{choice:?} logits differ by {diff}");
    }
    // Without a reference adapter, Reference is the base model.
    let reference = model.forward_logits(&ids, &[8, 8], AdapterChoice::Reference)?;
    assert!(max_abs_diff(&reference, &golden["base_logits"])? < 1e-5);
    // With one, it is that adapter.
    let frozen = model.policy_adapter().unwrap().deep_copy()?;
    model.set_reference_adapter(Some(frozen))?;
    let reference = model.forward_logits(&ids, &[8, 8], AdapterChoice::Reference)?;
    assert!(max_abs_diff(&reference, &golden["lora_logits"])? < 1e-5);
    Ok(())
}

#[test]
fn sequence_logps_match_log_softmax_of_the_logits() -> Result<()> {
    let golden =
        candle_core::safetensors::load(trl_fixture().join("logits.safetensors"), &Device::Cpu)?;
    let ids = fixture_input_ids()?;
    let rows: Vec<Vec<u32>> = ids.to_vec2()?;
    let batch = batch_from_rows(&[(rows[0].clone(), 3), (rows[1][..6].to_vec(), 5)], 8, 0);
    let model = fixture_model_with_adapter()?;
    let out = model.sequence_logps(&batch, AdapterChoice::PolicyNoGrad)?;
    assert_eq!(out.token_counts, vec![5, 1]);

    // Independent computation from the golden logits (row 1 is a prefix, so its first 6 logits are unchanged).
    let logits = golden["lora_logits"].to_vec3::<f32>()?;
    for (r, (start, len)) in [(3usize, 8usize), (5, 6)].into_iter().enumerate() {
        let (mut logp, mut mean, mut entropy) = (0f64, 0f64, 0f64);
        for p in start..len {
            let z: Vec<f64> = logits[r][p - 1].iter().map(|&v| v as f64).collect();
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            logp += z[rows[r][p] as usize] - lse;
            mean += z.iter().sum::<f64>() / z.len() as f64;
            entropy += lse - z.iter().map(|v| (v - lse).exp() * v).sum::<f64>();
        }
        let got = out.logps_vec()?[r] as f64;
        assert!((got - logp).abs() < 1e-4, "row {r}: logp {got} vs {logp}");
        assert!(
            (out.mean_logit_sums[r] - mean).abs() < 1e-4,
            "row {r}: mean logit"
        );
        assert!(
            (out.entropy_sums[r] - entropy).abs() < 1e-4,
            "row {r}: entropy"
        );
    }
    Ok(())
}

#[test]
fn every_lora_tensor_gets_a_gradient_and_no_grad_passes_record_none() -> Result<()> {
    let ids: Vec<Vec<u32>> = fixture_input_ids()?.to_vec2()?;
    let batch = batch_from_rows(&[(ids[0].clone(), 2), (ids[1][..7].to_vec(), 4)], 8, 2);
    let model = fixture_model_with_adapter()?;
    let out = model.sequence_logps(&batch, AdapterChoice::Policy)?;
    let grads = (out.logps.get(0)? - (out.logps.get(1)? * 0.5)?)?.backward()?;
    let vars = model.policy_adapter().unwrap().trainable_vars();
    assert_eq!(vars.len(), 2 * 7 * 2);
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm² {norm}"
        );
    }
    // The gradient store holds nothing the size of a frozen base weight (no weight gradients computed).
    let base_shapes = [[64usize, 64], [32, 64], [160, 64], [64, 160], [128, 64]];
    for id in grads.get_ids() {
        let dims = grads.get_id(*id).unwrap().dims().to_vec();
        assert!(
            !base_shapes.iter().any(|s| dims == s),
            "a gradient of shape {dims:?} was computed"
        );
    }
    assert!(out.logps.track_op());
    for choice in [AdapterChoice::PolicyNoGrad, AdapterChoice::Reference] {
        let out = model.sequence_logps(&batch, choice)?;
        assert!(!out.logps.track_op(), "{choice:?} recorded a graph");
    }
    Ok(())
}

#[test]
fn chunked_log_probs_equal_unchunked_in_value_and_gradient() -> Result<()> {
    let ids: Vec<Vec<u32>> = fixture_input_ids()?.to_vec2()?;
    // 7 + 4 scored tokens.
    let batch = batch_from_rows(&[(ids[0].clone(), 1), (ids[1][..6].to_vec(), 2)], 8, 2);
    let mut model = fixture_model_with_adapter()?;
    let whole = model.sequence_logps(&batch, AdapterChoice::Policy)?;
    let whole_grads = whole.logps.sum_all()?.backward()?;
    model.set_options(ModelOptions {
        logits_chunk_elements: 128 * 3, // chunks of 3, 3, 3 and 2 tokens
        ..ModelOptions::default()
    });
    let chunked = model.sequence_logps(&batch, AdapterChoice::Policy)?;
    let chunked_grads = chunked.logps.sum_all()?.backward()?;
    assert!(max_abs_diff(&whole.logps, &chunked.logps)? < 1e-5);
    assert!((whole.entropy_sums[1] - chunked.entropy_sums[1]).abs() < 1e-5);
    for (name, var) in model.trainable_vars() {
        let (a, b) = (
            whole_grads.get(var.as_tensor()).unwrap(),
            chunked_grads.get(var.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, b)? < 1e-5, "{name}");
    }
    Ok(())
}

#[test]
fn lora_gradients_match_finite_differences() -> Result<()> {
    let ids: Vec<Vec<u32>> = fixture_input_ids()?.to_vec2()?;
    let batch = batch_from_rows(&[(ids[0].clone(), 2), (ids[1][..7].to_vec(), 4)], 8, 2);
    let model = fixture_model_with_adapter()?;
    let loss = |model: &LlamaModel, choice| -> Result<Tensor> {
        let out = model.sequence_logps(&batch, choice)?;
        Ok((out.logps.get(0)? * 0.7 - (out.logps.get(1)? * 0.3)?)?)
    };
    let grads = loss(&model, AdapterChoice::Policy)?.backward()?;
    let vars = model.policy_adapter().unwrap().trainable_vars();
    let eps = 1e-2f32;
    let mut checked = 0;
    for name in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight",
        "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight",
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight",
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
    ] {
        let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        let grad = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        // The entry with the largest gradient, where f32 differences are most reliable.
        let (index, &analytic) = grad
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let original = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let at = |delta: f32| -> Result<f32> {
            let mut values = original.clone();
            values[index] += delta;
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
            Ok(loss(&model, AdapterChoice::PolicyNoGrad)?.to_scalar::<f32>()?)
        };
        let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
        var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu)?)?;
        let tolerance = 1e-3 + 5e-3 * analytic.abs();
        assert!(
            (numeric - analytic).abs() < tolerance,
            "{name}[{index}]: analytic {analytic}, numeric {numeric}"
        );
        checked += 1;
    }
    assert_eq!(checked, 7);
    Ok(())
}

#[test]
fn padded_batch_equals_rows_run_alone() -> Result<()> {
    let ids: Vec<Vec<u32>> = fixture_input_ids()?.to_vec2()?;
    let rows = vec![
        (ids[0][..5].to_vec(), 2),
        (ids[1].clone(), 6),
        (ids[0][2..].to_vec(), 0),
        (ids[1][..3].to_vec(), 3),
    ];
    let model = fixture_model_with_adapter()?;
    let batch = batch_from_rows(&rows, 8, 2);
    let together = model.sequence_logps(&batch, AdapterChoice::Policy)?;
    let together_logps = together.logps_vec()?;
    for (r, row) in rows.iter().enumerate() {
        let alone = model.sequence_logps(
            &batch_from_rows(std::slice::from_ref(row), row.0.len(), 2),
            AdapterChoice::Policy,
        )?;
        assert_eq!(alone.token_counts[0], together.token_counts[r]);
        let (a, b) = (alone.logps_vec()?[0], together_logps[r]);
        assert!((a - b).abs() < 1e-5, "row {r}: alone {a}, in batch {b}");
        assert!((alone.mean_logit_sums[0] - together.mean_logit_sums[r]).abs() < 1e-4);
        assert!((alone.entropy_sums[0] - together.entropy_sums[r]).abs() < 1e-4);
    }
    // A completion starting at 0 scores from position 1; an empty completion scores nothing.
    assert_eq!(together.token_counts, vec![3, 2, 5, 0]);
    assert_eq!(together_logps[3], 0.0);
    Ok(())
}

#[test]
fn dropout_applies_to_adapter_passes_in_training_only() -> Result<()> {
    let ids: Vec<Vec<u32>> = fixture_input_ids()?.to_vec2()?;
    let batch = batch_from_rows(&[(ids[0].clone(), 2)], 8, 2);
    let mut model = fixture_model()?;
    let adapter = load_adapter(
        &trl_fixture().join("adapter_init"),
        model.config(),
        &Device::Cpu,
    )?;
    let mut config = adapter.config().clone();
    config.dropout = 0.3;
    let pairs = adapter
        .sites()
        .map(|s| {
            let p = adapter.pair(s).unwrap();
            (s, (p.a.as_tensor().clone(), p.b.as_tensor().clone()))
        })
        .collect();
    model.set_policy_adapter(Some(LoraAdapter::from_pairs(
        config,
        model.config(),
        pairs,
        &Device::Cpu,
    )?))?;
    let logp = |model: &LlamaModel, choice| -> Result<f32> {
        Ok(model.sequence_logps(&batch, choice)?.logps_vec()?[0])
    };
    let eval = logp(&model, AdapterChoice::Policy)?;
    let base = logp(&model, AdapterChoice::Reference)?;
    assert_eq!(eval, logp(&model, AdapterChoice::PolicyNoGrad)?);
    model.set_training(true, 5)?;
    let train1 = logp(&model, AdapterChoice::Policy)?;
    let train2 = logp(&model, AdapterChoice::PolicyNoGrad)?;
    assert!(
        train1 != eval && train2 != eval && train1 != train2,
        "dropout must change every policy pass"
    );
    // The base model (adapter disabled) has no LoRA dropout to apply.
    assert_eq!(logp(&model, AdapterChoice::Reference)?, base);
    model.set_training(true, 5)?;
    assert_eq!(
        logp(&model, AdapterChoice::Policy)?,
        train1,
        "seeded dropout"
    );
    model.set_training(false, 5)?;
    assert_eq!(logp(&model, AdapterChoice::Policy)?, eval);
    Ok(())
}

#[test]
fn peft_round_trip() -> Result<()> {
    let model = fixture_model()?;
    let dir = tempfile::tempdir()?;
    let original = load_adapter(
        &trl_fixture().join("adapter_init"),
        model.config(),
        &Device::Cpu,
    )?;
    save_adapter(&original, dir.path(), "/tmp/fx/model")?;
    let reloaded = load_adapter(dir.path(), model.config(), &Device::Cpu)?;
    assert_eq!(original.config(), reloaded.config());
    let (a, b) = (original.trainable_vars(), reloaded.trainable_vars());
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(max_abs_diff(va.as_tensor(), vb.as_tensor())?, 0.0, "{na}");
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("adapter_config.json"),
    )?)?;
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8.0);
    assert_eq!(json["lora_dropout"], 0.0);
    assert_eq!(json["base_model_name_or_path"], "/tmp/fx/model");
    assert_eq!(json["target_modules"].as_array().unwrap().len(), 7);
    // Fresh PEFT-style adapters round-trip too, and start equal to the base model (B = 0).
    let config = LoraConfig::new(2, 4.0, 0.0, true, &[LoraTarget::Q, LoraTarget::Down])?;
    let fresh = LoraAdapter::init(config, model.config(), 1, &Device::Cpu)?;
    let dir2 = tempfile::tempdir()?;
    save_adapter(&fresh, dir2.path(), "base")?;
    let again = load_adapter(dir2.path(), model.config(), &Device::Cpu)?;
    assert_eq!(again.trainable_vars().len(), 2 * 2 * 2);
    assert!(again.config().use_rslora);
    Ok(())
}

#[test]
fn sharded_and_hub_cache_checkpoints_load() -> Result<()> {
    let tiny = TinyModel::default();
    let tmp = tempfile::tempdir()?;
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    tiny.write(&single, 11, 1)?;
    tiny.write(&sharded, 11, 3)?;
    let ckpt = ModelFiles::from_dir(&sharded)?;
    assert_eq!(ckpt.weight_files.len(), 3);
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu)?;
    let a = LlamaModel::load(&ModelFiles::from_dir(&single)?, DType::F32, &Device::Cpu)?
        .forward_logits(&ids, &[6], AdapterChoice::Reference)?;
    let b = LlamaModel::load(&ckpt, DType::F32, &Device::Cpu)?.forward_logits(
        &ids,
        &[6],
        AdapterChoice::Reference,
    )?;
    assert_eq!(max_abs_diff(&a, &b)?, 0.0);

    let cache = tmp.path().join("hub");
    tiny.write_to_hub_cache(&cache, "org/tiny", 11)?;
    let cached = ModelFiles::locate_with_cache("org/tiny", &cache)?;
    let c = LlamaModel::load(&cached, DType::F32, &Device::Cpu)?.forward_logits(
        &ids,
        &[6],
        AdapterChoice::Reference,
    )?;
    assert_eq!(max_abs_diff(&a, &c)?, 0.0);
    // A folder path wins over the cache.
    assert_eq!(
        ModelFiles::locate_with_cache(single.to_str().unwrap(), &cache)?.dir,
        single
    );

    let err = format!(
        "{:#}",
        ModelFiles::locate_with_cache("org/absent", &cache).unwrap_err()
    );
    assert!(
        err.contains("models--org--absent") && err.contains("hf download org/absent"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bf16_and_qwen2_and_tied_models_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu)?;
    let batch = batch_from_rows(&[(vec![1, 5, 9, 3, 7, 2], 3)], 6, 0);
    for (name, tiny) in [
        (
            "qwen2",
            TinyModel {
                model_type: "qwen2",
                ..TinyModel::default()
            },
        ),
        (
            "tied",
            TinyModel {
                tie_word_embeddings: true,
                ..TinyModel::default()
            },
        ),
        (
            "mistral",
            TinyModel {
                model_type: "mistral",
                ..TinyModel::default()
            },
        ),
    ] {
        let dir = tmp.path().join(name);
        tiny.write(&dir, 3, 1)?;
        let ckpt = ModelFiles::from_dir(&dir)?;
        let f32_model = LlamaModel::load(&ckpt, DType::F32, &Device::Cpu)?;
        let bf16_model = LlamaModel::load(&ckpt, DType::BF16, &Device::Cpu)?;
        let a = f32_model.forward_logits(&ids, &[6], AdapterChoice::Reference)?;
        let b = bf16_model.forward_logits(&ids, &[6], AdapterChoice::Reference)?;
        assert!(
            max_abs_diff(&a, &b)? < 0.1,
            "{name}: bf16 logits far from f32"
        );
        let la = f32_model
            .sequence_logps(&batch, AdapterChoice::Reference)?
            .logps_vec()?[0];
        let lb = bf16_model
            .sequence_logps(&batch, AdapterChoice::Reference)?
            .logps_vec()?[0];
        assert!(
            (la - lb).abs() < 0.1,
            "{name}: bf16 log-prob {lb} vs f32 {la}"
        );
    }
    Ok(())
}

#[test]
fn bad_checkpoints_and_adapters_are_clear_errors() -> Result<()> {
    let tiny = TinyModel::default();
    let tmp = tempfile::tempdir()?;
    let err = |r: Result<LlamaModel>| format!("{:#}", r.err().expect("an error"));
    let load = |dir: &Path| -> Result<LlamaModel> {
        LlamaModel::load(&ModelFiles::from_dir(dir)?, DType::F32, &Device::Cpu)
    };

    // Missing files.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    assert!(err(load(&empty)).contains("missing config.json"));
    let no_weights = tmp.path().join("no_weights");
    tiny.write(&no_weights, 1, 1)?;
    std::fs::remove_file(no_weights.join("model.safetensors"))?;
    assert!(err(load(&no_weights))
        .contains("expected model.safetensors or model.safetensors.index.json"));
    let missing_shard = tmp.path().join("missing_shard");
    tiny.write(&missing_shard, 1, 2)?;
    std::fs::remove_file(missing_shard.join("model-00002-of-00002.safetensors"))?;
    assert!(
        err(load(&missing_shard)).contains("shard `model-00002-of-00002.safetensors` is missing")
    );

    // Wrong shape: the config promises a wider MLP than the weights have.
    let wrong = tmp.path().join("wrong_shape");
    tiny.write(&wrong, 1, 1)?;
    let mut cfg = tiny.config_json();
    cfg["intermediate_size"] = 20.into();
    std::fs::write(wrong.join("config.json"), cfg.to_string())?;
    let e = err(load(&wrong));
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("shape"),
        "{e}"
    );

    // Unknown model type.
    let gpt = tmp.path().join("gpt");
    tiny.write(&gpt, 1, 1)?;
    let mut cfg = tiny.config_json();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(gpt.join("config.json"), cfg.to_string())?;
    let e = err(load(&gpt));
    assert!(
        e.contains("config.json")
            && e.contains("`model_type` \"gpt2\"")
            && e.contains("llama, mistral, qwen2"),
        "{e}"
    );

    // The fixture's adapter on a model of another shape: the error names the tensor.
    let small = tmp.path().join("small");
    tiny.write(&small, 1, 1)?;
    let small_cfg = ModelFiles::from_dir(&small)?.config;
    let e = format!(
        "{:#}",
        load_adapter(
            &trl_fixture().join("adapter_init"),
            &small_cfg,
            &Device::Cpu
        )
        .unwrap_err()
    );
    assert!(
        e.contains("base_model.model.model.layers.0.") && e.contains("shape"),
        "{e}"
    );

    // An adapter with more layers than the model.
    let deep = TinyModel {
        num_hidden_layers: 3,
        ..tiny.clone()
    };
    let deep_dir = tmp.path().join("deep");
    deep.write(&deep_dir, 1, 1)?;
    let deep_cfg = ModelFiles::from_dir(&deep_dir)?.config;
    let adapter = LoraAdapter::init(
        LoraConfig::new(2, 2.0, 0.0, false, &[LoraTarget::Q])?,
        &deep_cfg,
        0,
        &Device::Cpu,
    )?;
    let adir = tmp.path().join("deep_adapter");
    save_adapter(&adapter, &adir, "deep")?;
    let e = format!(
        "{:#}",
        load_adapter(&adir, &small_cfg, &Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains("base_model.model.model.layers.2.self_attn.q_proj")
            && e.contains("does not fit"),
        "{e}"
    );
    Ok(())
}

#[test]
fn gradient_checkpointing_gives_the_same_values_and_gradients() -> Result<()> {
    let ids: Vec<Vec<u32>> = fixture_input_ids()?.to_vec2()?;
    let batch = batch_from_rows(&[(ids[0].clone(), 2), (ids[1][..7].to_vec(), 4)], 8, 2);
    let mut model = fixture_model_with_adapter()?;
    let loss_of = |model: &LlamaModel| -> Result<Tensor> {
        let out = model.sequence_logps(&batch, AdapterChoice::Policy)?;
        Ok((out.logps.get(0)? - (out.logps.get(1)? * 0.5)?)?)
    };
    let plain_loss = loss_of(&model)?;
    let plain = model.backward(&plain_loss)?;
    model.set_options(ModelOptions {
        gradient_checkpointing: true,
        ..ModelOptions::default()
    });
    let ckpt_loss = loss_of(&model)?;
    assert!(max_abs_diff(&plain_loss, &ckpt_loss)? < 1e-6);
    let ckpt = model.backward(&ckpt_loss)?;
    for (name, var) in model.trainable_vars() {
        let a = plain.get(var.as_tensor()).unwrap();
        let b = ckpt
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no checkpointed gradient"));
        let diff = max_abs_diff(a, b)?;
        assert!(
            diff < 1e-5,
            "{name}: checkpointed gradient differs by {diff}"
        );
    }
    // Forgetting LlamaModel::backward is caught at the next checkpointed forward, not silently ignored.
    loss_of(&model)?.backward()?;
    let err = format!("{:#}", loss_of(&model).unwrap_err());
    assert!(err.contains("LlamaModel::backward"), "{err}");
    Ok(())
}

#[test]
fn checkpointed_layers_replay_their_dropout_masks() -> Result<()> {
    let ids: Vec<Vec<u32>> = fixture_input_ids()?.to_vec2()?;
    let batch = batch_from_rows(&[(ids[0].clone(), 2)], 8, 2);
    let mut model = fixture_model()?;
    let adapter = load_adapter(
        &trl_fixture().join("adapter_init"),
        model.config(),
        &Device::Cpu,
    )?;
    let mut config = adapter.config().clone();
    config.dropout = 0.2;
    let pairs = adapter
        .sites()
        .map(|s| {
            let p = adapter.pair(s).unwrap();
            (s, (p.a.as_tensor().clone(), p.b.as_tensor().clone()))
        })
        .collect();
    model.set_policy_adapter(Some(LoraAdapter::from_pairs(
        config,
        model.config(),
        pairs,
        &Device::Cpu,
    )?))?;
    model.set_options(ModelOptions {
        gradient_checkpointing: true,
        ..ModelOptions::default()
    });
    // Reseeding before every evaluation makes the loss a deterministic function of the weights.
    let loss_at = |model: &mut LlamaModel| -> Result<Tensor> {
        model.set_training(true, 9)?;
        Ok(model
            .sequence_logps(&batch, AdapterChoice::Policy)?
            .logps
            .get(0)?)
    };
    let loss = loss_at(&mut model)?;
    let grads = model.backward(&loss)?;
    let var = model
        .trainable_vars()
        .into_iter()
        .find(|(n, _)| n.ends_with("layers.0.mlp.up_proj.lora_A.weight"))
        .unwrap()
        .1;
    let grad = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (index, &analytic) = grad
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .unwrap();
    let original = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let eps = 1e-2f32;
    let mut shifted = |delta: f32| -> Result<f32> {
        let mut values = original.clone();
        values[index] += delta;
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        let value = loss_at(&mut model)?.to_scalar::<f32>()?;
        model.backward(&Tensor::new(0f32, &Device::Cpu)?)?; // nothing to collect, keeps the side store empty
        Ok(value)
    };
    let numeric = (shifted(eps)? - shifted(-eps)?) / (2.0 * eps);
    assert!(
        (numeric - analytic).abs() < 1e-3 + 5e-3 * analytic.abs(),
        "analytic {analytic}, numeric {numeric}"
    );
    Ok(())
}

#[test]
fn mistral_sliding_window_masks_distant_keys() -> Result<()> {
    let tiny = TinyModel {
        model_type: "mistral",
        ..TinyModel::default()
    };
    let tmp = tempfile::tempdir()?;
    let logits_with_window = |window: serde_json::Value| -> Result<Tensor> {
        let dir = tmp.path().join(format!("w{window}"));
        tiny.write(&dir, 4, 1)?;
        let mut cfg = tiny.config_json();
        cfg["sliding_window"] = window;
        std::fs::write(dir.join("config.json"), cfg.to_string())?;
        let model = LlamaModel::load(&ModelFiles::from_dir(&dir)?, DType::F32, &Device::Cpu)?;
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu)?;
        model.forward_logits(&ids, &[6], AdapterChoice::Reference)
    };
    let full = logits_with_window(serde_json::Value::Null)?;
    assert_eq!(
        max_abs_diff(&full, &logits_with_window(6.into())?)?,
        0.0,
        "a window covering everything is no window"
    );
    let narrow = logits_with_window(2.into())?;
    // Positions 0 and 1 see at most 2 keys either way; later ones lose their distant keys.
    assert_eq!(
        max_abs_diff(&full.narrow(1, 0, 2)?, &narrow.narrow(1, 0, 2)?)?,
        0.0
    );
    assert!(max_abs_diff(&full.narrow(1, 2, 4)?, &narrow.narrow(1, 2, 4)?)? > 1e-4);
    Ok(())
}

#[test]
fn bf16_log_probs_and_gradients_track_f32() -> Result<()> {
    let ids: Vec<Vec<u32>> = fixture_input_ids()?.to_vec2()?;
    let batch = batch_from_rows(&[(ids[0].clone(), 2), (ids[1][..7].to_vec(), 4)], 8, 2);
    let ckpt = ModelFiles::from_dir(&trl_fixture().join("model"))?;
    let run = |dtype: DType| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let mut model = LlamaModel::load(&ckpt, dtype, &Device::Cpu)?;
        let adapter = load_adapter(
            &trl_fixture().join("adapter_init"),
            model.config(),
            &Device::Cpu,
        )?;
        model.set_policy_adapter(Some(adapter))?;
        let out = model.sequence_logps(&batch, AdapterChoice::Policy)?;
        assert_eq!(out.logps.dtype(), DType::F32);
        let grads = model.backward(&out.logps.sum_all()?)?;
        let grads = model
            .trainable_vars()
            .iter()
            .map(|(_, v)| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()?
                    .to_vec1::<f32>()
            })
            .collect::<candle_core::Result<_>>()?;
        Ok((out.logps_vec()?, grads))
    };
    let (logps32, grads32) = run(DType::F32)?;
    let (logps16, grads16) = run(DType::BF16)?;
    for (a, b) in logps32.iter().zip(&logps16) {
        assert!(
            (a - b).abs() < 0.02 * a.abs().max(1.0),
            "bf16 log-prob {b} vs f32 {a}"
        );
    }
    for (g32, g16) in grads32.iter().zip(&grads16) {
        assert!(g16.iter().all(|v| v.is_finite()));
        let dot: f64 = g32
            .iter()
            .zip(g16)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        let norm = |g: &[f32]| g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (norm(g32) * norm(g16));
        assert!(
            cosine > 0.99,
            "bf16 gradient direction off: cosine {cosine}"
        );
    }
    let empty = SequenceBatch {
        input_ids: vec![],
        rows: 0,
        width: 0,
        lengths: vec![],
        completion_starts: vec![],
        pad_id: 0,
    };
    assert_eq!(
        fixture_model()?
            .sequence_logps(&empty, AdapterChoice::Reference)?
            .logps
            .dims(),
        [0]
    );
    Ok(())
}
