//! GGUF out: a LoRA adapter written as llama.cpp's adapter GGUF reads back to the same tensors (and scale), and the
//! merged model written as a llama GGUF loads as a base model that computes the logits and greedy tokens of base +
//! adapter, with the tokenizer and chat template of the Hugging Face folder. Bad adapter files are refused naming
//! the file and the key or tensor.

use anyhow::Result;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use kto_model::gguf_write::{quantize, write_file, GgufDType};
use kto_model::lora::LoraMatrix;
use kto_model::lora_gguf::{save_adapter_gguf, tensor_name};
use kto_model::{
    generate, load_adapter, merge_to_gguf, AdapterChoice, GenerationOptions, LlamaModel,
    LoraTarget, ModelFiles, Quantization,
};
use std::path::{Path, PathBuf};

fn tiny_llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-llama")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn adapter_gguf_reads_back_to_the_same_tensors() -> Result<()> {
    let checkpoint = ModelFiles::from_dir(&tiny_llama())?;
    let model = &checkpoint.config;
    let dir = tempfile::tempdir()?;
    for (use_rslora, dtype, tolerance) in [
        (false, GgufDType::F32, 0.0),
        (true, GgufDType::F32, 0.0),
        (false, GgufDType::BF16, 2e-3),
        (false, GgufDType::Q8_0, 2e-3),
    ] {
        let adapter = kto_model::testing::random_adapter(model, use_rslora, 3)?;
        let path = dir
            .path()
            .join(format!("adapter-{use_rslora}-{dtype:?}.gguf"));
        save_adapter_gguf(&adapter, model, &path, dtype, "Adapter")?;
        let back = load_adapter(&path, model, &Device::Cpu)?;
        let what = format!("rslora={use_rslora} {dtype:?}");
        assert_eq!(back.config().r, 8, "{what}");
        assert_eq!(back.config().targets, LoraTarget::ALL.to_vec(), "{what}");
        // llama.cpp has no rsLoRA: the alpha it reads gives the same alpha / r.
        assert!(
            (back.config().scale() - adapter.config().scale()).abs() < 1e-6,
            "{what}: scale {} vs {}",
            back.config().scale(),
            adapter.config().scale()
        );
        for site in adapter.sites() {
            let (ours, theirs) = (adapter.pair(site).unwrap(), back.pair(site).unwrap());
            for (matrix, a, b) in [
                (LoraMatrix::A, &ours.a, &theirs.a),
                (LoraMatrix::B, &ours.b, &theirs.b),
            ] {
                let diff = max_abs_diff(a.as_tensor(), b.as_tensor())?;
                assert!(
                    diff <= tolerance,
                    "{what}: {} differs by {diff}",
                    tensor_name(site, matrix)
                );
            }
        }
    }
    Ok(())
}

#[test]
fn merged_gguf_generates_as_base_plus_adapter() -> Result<()> {
    let checkpoint = ModelFiles::from_dir(&tiny_llama())?;
    let adapter = kto_model::testing::random_adapter(&checkpoint.config, false, 11)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("merged.gguf");
    merge_to_gguf(
        &checkpoint,
        Quantization::None,
        Some(&adapter),
        &path,
        Some(GgufDType::F32),
    )?;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");

    let mut adapted = LlamaModel::load(&checkpoint, DType::F32, &Device::Cpu)?;
    adapted.set_policy_adapter(Some(adapter))?;
    let merged_files = ModelFiles::locate(path.to_str().unwrap())?;
    assert_eq!(merged_files.config.vocab_size, checkpoint.config.vocab_size);
    assert_eq!(merged_files.config.head_dim, checkpoint.config.head_dim);
    let merged = LlamaModel::load(&merged_files, DType::F32, &Device::Cpu)?;

    let tokenizer = checkpoint.tokenizer()?;
    let from_gguf = merged_files.tokenizer()?;
    let prompt = "The quick brown fox, 123 <s> jumps\n\tover été 🦙";
    let ids = tokenizer.tokenizer.encode(prompt, true).unwrap();
    assert_eq!(
        from_gguf.tokenizer.encode(prompt, true).unwrap().get_ids(),
        ids.get_ids(),
        "the GGUF's tokenizer tokenizes as tokenizer.json"
    );
    assert_eq!(
        (from_gguf.eos_id, from_gguf.bos_id, from_gguf.pad_id),
        (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id)
    );
    let messages = [kto_data::sample::Message::new("user", "Hi")];
    let render = |t: &kto_data::tokenize::TokenizerBundle| {
        t.chat_template
            .as_ref()
            .unwrap()
            .render(&messages, true)
            .unwrap()
    };
    assert_eq!(render(&from_gguf), render(&tokenizer), "chat template");

    let input = Tensor::new(ids.get_ids(), &Device::Cpu)?.unsqueeze(0)?;
    let n = ids.get_ids().len();
    let expected = adapted.forward_logits(&input, &[n], AdapterChoice::PolicyNoGrad)?;
    let base = adapted.forward_logits(&input, &[n], AdapterChoice::Reference)?;
    let got = merged.forward_logits(&input, &[n], AdapterChoice::Reference)?;
    let diff = max_abs_diff(&got, &expected)?;
    assert!(diff < 1e-4, "merged GGUF logits differ by {diff}");
    assert!(
        max_abs_diff(&base, &expected)? > 1e-2,
        "the adapter changes nothing: a vacuous test"
    );
    let options = GenerationOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let greedy_adapted = generate(
        &adapted,
        ids.get_ids(),
        &options,
        AdapterChoice::PolicyNoGrad,
    )?;
    let greedy_merged = generate(&merged, ids.get_ids(), &options, AdapterChoice::Reference)?;
    assert_eq!(greedy_merged.tokens, greedy_adapted.tokens);

    // The base alone in q8_0: norms f32, the 344-wide rows of ffn_down no whole Q8_0 block (f16), the rest Q8_0.
    let q8 = dir.path().join("base-q8_0.gguf");
    merge_to_gguf(
        &checkpoint,
        Quantization::None,
        None,
        &q8,
        Some(GgufDType::Q8_0),
    )?;
    let q8_files = ModelFiles::locate(q8.to_str().unwrap())?;
    let q8_model = LlamaModel::load(&q8_files, DType::F32, &Device::Cpu)?;
    let q8_logits = q8_model.forward_logits(&input, &[n], AdapterChoice::Reference)?;
    let diff = max_abs_diff(&q8_logits, &base)?;
    assert!(diff < 0.05, "q8_0 base logits differ by {diff}");
    Ok(())
}

#[test]
fn bad_adapter_files_are_refused_naming_the_file_and_what_is_wrong() -> Result<()> {
    let checkpoint = ModelFiles::from_dir(&tiny_llama())?;
    let model = &checkpoint.config;
    let dir = tempfile::tempdir()?;
    let err = |path: &Path| format!("{:#}", load_adapter(path, model, &Device::Cpu).unwrap_err());

    // A model GGUF is no adapter.
    let base = dir.path().join("base.gguf");
    merge_to_gguf(
        &checkpoint,
        Quantization::None,
        None,
        &base,
        Some(GgufDType::F32),
    )?;
    let message = err(&base);
    assert!(
        message.contains("base.gguf") && message.contains("general.type"),
        "{message}"
    );

    let adapter = kto_model::testing::random_adapter(model, false, 5)?;
    let metadata = |alpha: bool| {
        let mut m = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("general.type".into(), Value::String("adapter".into())),
            ("adapter.type".into(), Value::String("lora".into())),
        ];
        if alpha {
            m.push(("adapter.lora.alpha".into(), Value::F32(16.0)));
        }
        m
    };
    let pair = adapter.pair((0, LoraTarget::Q)).unwrap();
    let a = ("blk.0.attn_q.weight.lora_a", pair.a.as_tensor());
    let b = ("blk.0.attn_q.weight.lora_b", pair.b.as_tensor());
    let stray = ("blk.0.attn_q.weight", pair.b.as_tensor());
    // (file, with alpha, tensors, what the error names)
    let cases = [
        ("no-alpha", false, vec![a, b], "adapter.lora.alpha"),
        ("stray", true, vec![a, b, stray], "blk.0.attn_q.weight`"),
        ("half", true, vec![a], "blk.0.attn_q.weight.lora_b"),
    ];
    for (name, alpha, tensors, expected) in cases {
        let path = dir.path().join(format!("{name}.gguf"));
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| Ok((n.to_string(), quantize(n, t, GgufDType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        write_file(&path, &metadata(alpha), &tensors)?;
        let message = err(&path);
        assert!(
            message.contains(&format!("{name}.gguf")) && message.contains(expected),
            "{name}: {message}"
        );
    }
    Ok(())
}
