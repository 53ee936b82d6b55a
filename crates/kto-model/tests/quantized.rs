//! A base held quantized (`[model] quantize`) computes what its dense twin computes: for every block type, a tiny
//! safetensors model quantized at load gives the same logits, log-probs and LoRA gradients as the same model whose
//! weights were quantized and dequantized before being written; a GGUF base kept in its own block types gives those
//! of the same file dequantized at load. Bad settings fail with one clear error.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use kto_model::testing::gguf::{gguf_metadata, gguf_tensors, write_gguf, TestVocab};
use kto_model::testing::{dequantized_twin, TinyModel};
use kto_model::{
    merge_to_checkpoint, AdapterChoice, LlamaModel, LoraAdapter, LoraConfig, LoraTarget,
    ModelFiles, Quantization, SequenceBatch,
};
use std::path::Path;

/// K-quants need rows of 256 values: hidden and intermediate sizes are multiples of 256.
/// `weights` as llama.cpp's Q4_K mixes store them: v and down in Q6_K, the other matrices in Q4_K.
fn llama_cpp_q4_k_mix(
    model: &TinyModel,
    weights: &[(String, Tensor)],
) -> Result<Vec<(String, candle_core::quantized::QTensor)>> {
    let q6_k = gguf_tensors(model, weights, GgmlDType::Q6K)?;
    Ok(gguf_tensors(model, weights, GgmlDType::Q4K)?
        .into_iter()
        .zip(q6_k)
        .map(|((name, q4_k), (_, q6_k))| {
            let blocks = if name.contains("attn_v") || name.contains("ffn_down") {
                q6_k
            } else {
                q4_k
            };
            (name, blocks)
        })
        .collect())
}

fn tiny(vocab_size: usize, tie: bool) -> TinyModel {
    TinyModel {
        vocab_size,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        tie_word_embeddings: tie,
        ..TinyModel::default()
    }
}

fn batch(vocab: u32) -> SequenceBatch {
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 + 3) % vocab).collect();
    SequenceBatch {
        input_ids: ids,
        rows: 2,
        width: 9,
        lengths: vec![9, 6],
        completion_starts: vec![4, 2],
        pad_id: 0,
    }
}

/// What the comparisons look at: the base's logits, the policy's log-probs and every LoRA gradient.
struct Outputs {
    logits: Tensor,
    logps: Vec<f32>,
    grads: Vec<(String, Tensor)>,
    base_bytes: usize,
}

fn outputs(model: &mut LlamaModel) -> Result<Outputs> {
    let vocab = model.config().vocab_size as u32;
    let ids = Tensor::new(&[1u32, 5, 9, 2, 7][..], &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward_logits(&ids, &[5], AdapterChoice::Reference)?;
    let lora = LoraConfig::new(4, 8.0, 0.0, false, &LoraTarget::ALL)?;
    let adapter = LoraAdapter::init(lora, model.config(), 3, &Device::Cpu)?;
    model.set_policy_adapter(Some(adapter))?;
    let out = model.sequence_logps(&batch(vocab), AdapterChoice::Policy)?;
    let grads = model.backward(&out.logps.sum_all()?)?;
    let grads = model
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .cloned()
                .unwrap_or(var.as_tensor().zeros_like()?);
            Ok((name, g))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Outputs {
        logits,
        logps: out.logps_vec()?,
        grads,
        base_bytes: model.base_weight_bytes(),
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn assert_same(got: &Outputs, twin: &Outputs, what: &str) -> Result<()> {
    let d = max_abs_diff(&got.logits, &twin.logits)?;
    assert!(d <= 1e-5, "{what}: logits differ from the twin's by {d}");
    for (a, b) in got.logps.iter().zip(&twin.logps) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what}: log-prob {a} vs {b}"
        );
    }
    assert_eq!(got.grads.len(), twin.grads.len());
    let mut nonzero = 0;
    for ((name, a), (_, b)) in got.grads.iter().zip(&twin.grads) {
        let d = max_abs_diff(a, b)?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "{what}: gradient of {name} differs by {d}"
        );
        nonzero += usize::from(scale > 0.0);
    }
    assert!(nonzero > 0, "{what}: no gradient reached the adapter");
    Ok(())
}

fn write_pair(
    dir: &Path,
    model: &TinyModel,
    block_type: GgmlDType,
) -> Result<(ModelFiles, ModelFiles)> {
    let weights = model.random_weights(11)?;
    let source = dir.join("source");
    let twin = dir.join("twin");
    model.write_weights(&source, &weights, 1)?;
    model.write_weights(&twin, &dequantized_twin(&weights, block_type)?, 1)?;
    Ok((ModelFiles::from_dir(&source)?, ModelFiles::from_dir(&twin)?))
}

#[test]
fn quantized_at_load_computes_what_its_dequantized_twin_computes() -> Result<()> {
    for (name, block_type) in [
        ("q8_0", GgmlDType::Q8_0),
        ("q4_0", GgmlDType::Q4_0),
        ("q4_k", GgmlDType::Q4K),
        ("q5_k", GgmlDType::Q5K),
        ("q6_k", GgmlDType::Q6K),
    ] {
        // Tied and untied heads: the tied head shares the embedding's blocks.
        for tie in [false, true] {
            let dir = tempfile::tempdir()?;
            let model = tiny(64, tie);
            let (source, twin) = write_pair(dir.path(), &model, block_type)?;
            let quantization: Quantization = name.parse()?;
            assert_eq!(quantization, Quantization::To(block_type));
            let mut quantized =
                LlamaModel::load_quantized(&source, DType::F32, &Device::Cpu, quantization)?;
            let mut dense = LlamaModel::load(&twin, DType::F32, &Device::Cpu)?;
            let (got, want) = (outputs(&mut quantized)?, outputs(&mut dense)?);
            assert_same(&got, &want, &format!("{name}, tied {tie}"))?;
            assert!(
                got.base_bytes * 3 < want.base_bytes,
                "{name}: {} bytes quantized against {} dense",
                got.base_bytes,
                want.base_bytes
            );
        }
    }
    Ok(())
}

#[test]
fn a_gguf_base_kept_in_its_block_types_computes_what_it_does_dequantized() -> Result<()> {
    let vocab = TestVocab::byte_level("smollm", &["Ġ t", "h e"]);
    for block_type in [
        GgmlDType::Q4K,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::F16,
    ] {
        let dir = tempfile::tempdir()?;
        let model = tiny(vocab.tokens.len(), false);
        let weights = model.random_weights(5)?;
        let tensors = if block_type == GgmlDType::Q4K {
            llama_cpp_q4_k_mix(&model, &weights)?
        } else {
            gguf_tensors(&model, &weights, block_type)?
        };
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &gguf_metadata(&model, &vocab), &tensors)?;
        let checkpoint = ModelFiles::locate(path.to_str().unwrap())?;
        let mut kept =
            LlamaModel::load_quantized(&checkpoint, DType::F32, &Device::Cpu, Quantization::Keep)?;
        let mut dense = LlamaModel::load(&checkpoint, DType::F32, &Device::Cpu)?;
        let (got, want) = (outputs(&mut kept)?, outputs(&mut dense)?);
        assert_same(&got, &want, &format!("keep {block_type:?}"))?;
        assert!(
            got.base_bytes < want.base_bytes,
            "{block_type:?}: kept blocks are smaller"
        );
    }
    Ok(())
}

/// A matrix quantized at load is read a slice of rows (2 M values) at a time: with an intermediate size of 33 × 256,
/// gate and up (8448 × 256) are two slices and down (256 × 8448) is two, so the slices' blocks must join into the
/// whole tensor's, from a safetensors file and from a GGUF file (its own blocks dequantized slice by slice first).
#[test]
fn a_base_quantized_at_load_slice_by_slice_holds_the_whole_tensors_blocks() -> Result<()> {
    let vocab = TestVocab::byte_level("smollm", &["Ġ t", "h e"]);
    let model = TinyModel {
        intermediate_size: 33 * 256,
        ..tiny(vocab.tokens.len(), false)
    };
    let q4_k = Quantization::To(GgmlDType::Q4K);
    let weights = model.random_weights(13)?;
    let dir = tempfile::tempdir()?;

    let (source, twin) = (dir.path().join("source"), dir.path().join("twin"));
    model.write_weights(&source, &weights, 1)?;
    model.write_weights(&twin, &dequantized_twin(&weights, GgmlDType::Q4K)?, 1)?;
    let source = ModelFiles::from_dir(&source)?;
    let mut quantized = LlamaModel::load_quantized(&source, DType::F32, &Device::Cpu, q4_k)?;
    let mut dense = LlamaModel::load(&ModelFiles::from_dir(&twin)?, DType::F32, &Device::Cpu)?;
    assert_same(
        &outputs(&mut quantized)?,
        &outputs(&mut dense)?,
        "safetensors to q4_k",
    )?;

    // A Q8_0 GGUF re-quantized to Q4_K: the twin is the file's values (Q8_0 dequantized) through Q4_K.
    let path = dir.path().join("q8_0.gguf");
    let tensors = gguf_tensors(&model, &weights, GgmlDType::Q8_0)?;
    write_gguf(&path, &gguf_metadata(&model, &vocab), &tensors)?;
    let file_values = dequantized_twin(&weights, GgmlDType::Q8_0)?;
    let gguf_twin = dir.path().join("gguf-twin");
    model.write_weights(
        &gguf_twin,
        &dequantized_twin(&file_values, GgmlDType::Q4K)?,
        1,
    )?;
    let checkpoint = ModelFiles::locate(path.to_str().unwrap())?;
    let mut requantized = LlamaModel::load_quantized(&checkpoint, DType::F32, &Device::Cpu, q4_k)?;
    let mut dense = LlamaModel::load(&ModelFiles::from_dir(&gguf_twin)?, DType::F32, &Device::Cpu)?;
    assert_same(
        &outputs(&mut requantized)?,
        &outputs(&mut dense)?,
        "Q8_0 GGUF to q4_k",
    )?;
    Ok(())
}

#[test]
fn bad_quantize_settings_fail_with_one_clear_error() -> Result<()> {
    let error = "q3_k".parse::<Quantization>().unwrap_err().to_string();
    assert!(
        error.contains("\"q3_k\"")
            && error
                .contains("\"none\", \"keep\", \"q8_0\", \"q4_0\", \"q4_k\", \"q5_k\", \"q6_k\""),
        "{error}"
    );

    let dir = tempfile::tempdir()?;
    let model = tiny(64, false);
    let (source, _) = write_pair(dir.path(), &model, GgmlDType::Q8_0)?;
    let error = LlamaModel::load_quantized(&source, DType::F32, &Device::Cpu, Quantization::Keep)
        .err()
        .expect("keep on safetensors is refused")
        .to_string();
    assert!(
        error.contains("quantize = \"keep\"")
            && error.contains("safetensors")
            && error.contains("\"q4_k\""),
        "{error}"
    );

    // Rows of 128 values: fine for q8_0's blocks of 32, not for q4_k's of 256; the error names the tensor.
    let narrow = TinyModel {
        hidden_size: 128,
        intermediate_size: 256,
        ..tiny(64, false)
    };
    let dir = tempfile::tempdir()?;
    let (source, _) = write_pair(dir.path(), &narrow, GgmlDType::Q8_0)?;
    LlamaModel::load_quantized(
        &source,
        DType::F32,
        &Device::Cpu,
        Quantization::To(GgmlDType::Q8_0),
    )?;
    let error = format!(
        "{:#}",
        LlamaModel::load_quantized(
            &source,
            DType::F32,
            &Device::Cpu,
            Quantization::To(GgmlDType::Q4K)
        )
        .err()
        .expect("rows of 128 do not hold q4_k blocks")
    );
    assert!(
        error.contains("model.embed_tokens.weight")
            && error.contains("rows of 128")
            && error.contains("256")
            && error.contains("q8_0"),
        "{error}"
    );
    Ok(())
}

#[test]
fn the_f32_base_is_read_once_without_a_mapping() -> Result<()> {
    // A sharded checkpoint reads the same as a single file, and the weights counted are the file's.
    let dir = tempfile::tempdir()?;
    let model = tiny(64, false);
    let weights = model.random_weights(2)?;
    model.write_weights(&dir.path().join("one"), &weights, 1)?;
    model.write_weights(&dir.path().join("three"), &weights, 3)?;
    let mut one = LlamaModel::load(
        &ModelFiles::from_dir(&dir.path().join("one"))?,
        DType::F32,
        &Device::Cpu,
    )?;
    let mut three = LlamaModel::load(
        &ModelFiles::from_dir(&dir.path().join("three"))?,
        DType::F32,
        &Device::Cpu,
    )?;
    let (a, b) = (outputs(&mut one)?, outputs(&mut three)?);
    assert_same(&a, &b, "sharded")?;
    assert_eq!(a.base_bytes, model.parameter_count() * 4);
    Ok(())
}

/// Logits of `checkpoint` (f32, as `quantization` holds it) with `adapter` as the policy, or the bare base.
fn logits_of(
    checkpoint: &ModelFiles,
    quantization: Quantization,
    adapter: Option<LoraAdapter>,
) -> Result<Tensor> {
    let mut model = LlamaModel::load_quantized(checkpoint, DType::F32, &Device::Cpu, quantization)?;
    let choice = match adapter {
        Some(_) => AdapterChoice::Policy,
        None => AdapterChoice::Reference,
    };
    model.set_policy_adapter(adapter)?;
    let ids = Tensor::new(&[1u32, 5, 9, 2, 7, 3, 11][..], &Device::Cpu)?.unsqueeze(0)?;
    model.forward_logits(&ids, &[7], choice)
}

#[test]
fn export_merges_into_the_base_values_training_saw() -> Result<()> {
    use kto_model::testing::random_adapter;
    // Quantized at load: the merge is into the dequantized blocks (the twin), not into the file's values.
    for tie in [false, true] {
        let dir = tempfile::tempdir()?;
        let model = tiny(64, tie);
        let (source, twin) = write_pair(dir.path(), &model, GgmlDType::Q8_0)?;
        let q8_0 = Quantization::To(GgmlDType::Q8_0);
        let adapter = || random_adapter(&source.config, false, 7);
        let merged = dir.path().join("merged");
        merge_to_checkpoint(&source, q8_0, &adapter()?, &merged, None)?;
        let got = logits_of(&ModelFiles::from_dir(&merged)?, Quantization::None, None)?;
        let want = logits_of(&twin, Quantization::None, Some(adapter()?))?;
        let d = max_abs_diff(&got, &want)?;
        assert!(
            d <= 1e-4,
            "tied {tie}: merged logits differ from twin + adapter by {d}"
        );
        // The same run quantized at load gives the twin's numbers, so the merged model is what training ran.
        let trained = logits_of(&source, q8_0, Some(adapter()?))?;
        assert!(max_abs_diff(&trained, &want)? <= 1e-5, "tied {tie}");
        // Merging into the file's own values would be another model: the test tells the two apart.
        let file_values = dir.path().join("file-values");
        merge_to_checkpoint(&source, Quantization::None, &adapter()?, &file_values, None)?;
        let other = logits_of(
            &ModelFiles::from_dir(&file_values)?,
            Quantization::None,
            None,
        )?;
        let d = max_abs_diff(&other, &want)?;
        assert!(
            d > 1e-3,
            "tied {tie}: q8_0's rounding should show in the logits ({d})"
        );
    }

    // keep on a GGUF base: the file's blocks dequantized, as training held them (Q4_K with Q6_K v/down).
    let vocab = TestVocab::byte_level("smollm", &["Ġ t", "h e"]);
    let dir = tempfile::tempdir()?;
    let model = tiny(vocab.tokens.len(), false);
    let tensors = llama_cpp_q4_k_mix(&model, &model.random_weights(5)?)?;
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &gguf_metadata(&model, &vocab), &tensors)?;
    let checkpoint = ModelFiles::locate(path.to_str().unwrap())?;
    let adapter = || random_adapter(&checkpoint.config, false, 9);
    let merged = dir.path().join("merged");
    merge_to_checkpoint(&checkpoint, Quantization::Keep, &adapter()?, &merged, None)?;
    let got = logits_of(&ModelFiles::from_dir(&merged)?, Quantization::None, None)?;
    let want = logits_of(&checkpoint, Quantization::Keep, Some(adapter()?))?;
    let d = max_abs_diff(&got, &want)?;
    assert!(
        d <= 1e-4,
        "keep: merged logits differ from the kept base + adapter by {d}"
    );

    // keep on a safetensors base is refused at export as at load.
    let folder = dir.path().join("safetensors");
    tiny(64, false).write(&folder, 1, 1)?;
    let safetensors = ModelFiles::from_dir(&folder)?;
    let adapter = random_adapter(&safetensors.config, false, 1)?;
    let refused = dir.path().join("refused");
    let error = merge_to_checkpoint(&safetensors, Quantization::Keep, &adapter, &refused, None)
        .unwrap_err();
    assert!(format!("{error:#}").contains("safetensors"), "{error:#}");
    Ok(())
}
