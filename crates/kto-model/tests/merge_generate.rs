//! Merging an adapter into an HF checkpoint, and KV-cache generation.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kto_data::testing::trl_fixture;
use kto_model::{
    generate, load_adapter, merge_to_checkpoint, AdapterChoice, GenerationOptions, LlamaModel,
    ModelFiles, Quantization, StopReason,
};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn fixture_with_adapter() -> Result<LlamaModel> {
    kto_model::testing::with_fixture_adapter(&ModelFiles::from_dir(&trl_fixture().join("model"))?)
}

#[test]
fn merged_checkpoint_reproduces_the_adapted_model() -> Result<()> {
    let golden =
        candle_core::safetensors::load(trl_fixture().join("logits.safetensors"), &Device::Cpu)?;
    let ids = golden["input_ids"].to_dtype(DType::U32)?;
    let ckpt = ModelFiles::from_dir(&trl_fixture().join("model"))?;
    let adapter = load_adapter(
        &trl_fixture().join("adapter_init"),
        &ckpt.config,
        &Device::Cpu,
    )?;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("export/merged");
    merge_to_checkpoint(&ckpt, Quantization::None, &adapter, &out, None)?;
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing from the export");
    }
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())?
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
    let merged = LlamaModel::load(&ModelFiles::from_dir(&out)?, DType::F32, &Device::Cpu)?;
    let logits = merged.forward_logits(&ids, &[8, 8], AdapterChoice::Reference)?;
    let diff = max_abs_diff(&logits, &golden["lora_logits"])?;
    assert!(diff < 1e-4, "merged logits differ by {diff}");

    // A non-empty destination is refused; bf16 export records its dtype.
    assert!(format!(
        "{:#}",
        merge_to_checkpoint(&ckpt, Quantization::None, &adapter, &out, None).unwrap_err()
    )
    .contains("not empty"));
    let out16 = tmp.path().join("bf16");
    merge_to_checkpoint(
        &ckpt,
        Quantization::None,
        &adapter,
        &out16,
        Some(DType::BF16),
    )?;
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out16.join("config.json"))?)?;
    assert_eq!(cfg["dtype"], "bfloat16");
    let stored = candle_core::safetensors::load(out16.join("model.safetensors"), &Device::Cpu)?;
    assert!(stored.values().all(|t| t.dtype() == DType::BF16));
    Ok(())
}

#[test]
fn cached_greedy_generation_matches_full_recomputation() -> Result<()> {
    let model = fixture_with_adapter()?;
    let prompt = vec![1u32, 17, 42, 9];
    let options = GenerationOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let generated = generate(&model, &prompt, &options, AdapterChoice::PolicyNoGrad)?;
    assert_eq!(generated.stop, StopReason::MaxTokens);
    assert_eq!(generated.tokens.len(), 6);

    let mut sequence = prompt.clone();
    for _ in 0..6 {
        let ids = Tensor::from_slice(&sequence, (1, sequence.len()), &Device::Cpu)?;
        let logits = model.forward_logits(&ids, &[sequence.len()], AdapterChoice::PolicyNoGrad)?;
        let last = logits.get(0)?.get(sequence.len() - 1)?;
        sequence.push(last.argmax(0)?.to_scalar::<u32>()?);
    }
    assert_eq!(&sequence[prompt.len()..], &generated.tokens[..]);

    // Stopping at a stop token, which is not returned.
    let stop = GenerationOptions {
        stop_tokens: vec![generated.tokens[2]],
        ..options.clone()
    };
    let first_stop = generated
        .tokens
        .iter()
        .position(|t| *t == generated.tokens[2])
        .unwrap();
    let stopped = generate(&model, &prompt, &stop, AdapterChoice::PolicyNoGrad)?;
    assert_eq!(stopped.stop, StopReason::StopToken(generated.tokens[2]));
    assert_eq!(stopped.tokens, generated.tokens[..first_stop]);
    assert!(
        generate(&model, &prompt, &options, AdapterChoice::Policy).is_err(),
        "generation never records a graph"
    );
    Ok(())
}

#[test]
fn sampling_is_seeded() -> Result<()> {
    let model = fixture_with_adapter()?;
    let prompt = vec![1u32, 5, 6];
    let sample = |seed| {
        let options = GenerationOptions {
            max_new_tokens: 12,
            temperature: 1.5,
            top_p: 0.95,
            seed,
            stop_tokens: vec![],
        };
        generate(&model, &prompt, &options, AdapterChoice::PolicyNoGrad).map(|g| g.tokens)
    };
    assert_eq!(sample(1)?, sample(1)?);
    let distinct: std::collections::HashSet<Vec<u32>> =
        (0..4).map(sample).collect::<Result<_>>()?;
    assert!(distinct.len() > 1, "different seeds gave the same samples");
    Ok(())
}
