//! GGUF checkpoints made in the test from a tiny model's safetensors weights: every tensor type round-trips to the
//! weights it was quantized from, the model computes the same logits as from the safetensors folder, both tokenizer
//! kinds tokenize as their definitions say, and bad files fail with an error naming the file and the key or tensor.

use anyhow::Result;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use kto_model::testing::gguf::{gguf_metadata, gguf_tensors, write_gguf, TestVocab, QUANT_TYPES};
use kto_model::testing::TinyModel;
use kto_model::{AdapterChoice, LlamaModel, ModelFiles};
use std::path::{Path, PathBuf};

const BYTE_LEVEL_MERGES: &[&str] = &["Ġ t", "h e", "Ġt he", "1 2", ". h", "Ġ 1"];

/// K-quants need rows of 256 values: hidden and intermediate sizes are multiples of 256.
fn tiny(vocab: &TestVocab, tie: bool) -> TinyModel {
    TinyModel {
        vocab_size: vocab.tokens.len(),
        hidden_size: 256,
        intermediate_size: 256,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        tie_word_embeddings: tie,
        ..TinyModel::default()
    }
}

fn write_model(dir: &Path, vocab: &TestVocab, tie: bool, quant: GgmlDType) -> Result<PathBuf> {
    let model = tiny(vocab, tie);
    let weights = model.random_weights(7)?;
    let path = dir.join(format!("tiny-{quant:?}.gguf"));
    write_gguf(
        &path,
        &gguf_metadata(&model, vocab),
        &gguf_tensors(&model, &weights, quant)?,
    )?;
    Ok(path)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn logits(checkpoint: &ModelFiles, ids: &[u32]) -> Result<Tensor> {
    let model = LlamaModel::load(checkpoint, DType::F32, &Device::Cpu)?;
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    model.forward_logits(&input, &[ids.len()], AdapterChoice::Reference)
}

#[test]
fn every_tensor_type_dequantizes_to_the_weights_it_was_made_from() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vocab = TestVocab::byte_level("smollm", BYTE_LEVEL_MERGES);
    let model = tiny(&vocab, false);
    let source = model.random_weights(7)?;
    for &(name, quant) in QUANT_TYPES {
        let path = write_model(dir.path(), &vocab, false, quant)?;
        let checkpoint = ModelFiles::locate(path.to_str().unwrap())?;
        assert_eq!(checkpoint.config.vocab_size, vocab.tokens.len());
        assert!(!checkpoint.config.tie_word_embeddings);
        let loaded = checkpoint.tensors()?;
        assert_eq!(loaded.len(), source.len(), "{name}: tensor count");
        for (hf_name, original) in &source {
            let (_, tensor) = loaded
                .iter()
                .find(|(n, _)| n == hf_name)
                .unwrap_or_else(|| panic!("{name}: {hf_name} missing"));
            assert_eq!(tensor.dims(), original.dims(), "{name}: {hf_name}");
            // Blocks run along rows and the permutation moves whole rows: un-permuting gives exactly the
            // quantization of the original layout.
            let dtype = if original.rank() == 2 {
                quant
            } else {
                GgmlDType::F32
            };
            let expected = QTensor::quantize(original, dtype)?.dequantize(&Device::Cpu)?;
            assert_eq!(max_abs_diff(tensor, &expected)?, 0.0, "{name}: {hf_name}");
            // ... and that is close to the original (Q2_K keeps 2 bits: a loose bound).
            let spread = original.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                max_abs_diff(tensor, original)? <= 0.6 * spread,
                "{name}: {hf_name}"
            );
        }
    }
    Ok(())
}

#[test]
fn f32_gguf_computes_the_logits_of_the_safetensors_folder() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vocab = TestVocab::byte_level("smollm", BYTE_LEVEL_MERGES);
    for tie in [false, true] {
        let model = tiny(&vocab, tie);
        let folder = dir.path().join(format!("hf-{tie}"));
        model.write(&folder, 7, 1)?;
        let gguf = write_model(dir.path(), &vocab, tie, GgmlDType::F32)?;
        let from_gguf = ModelFiles::locate(gguf.to_str().unwrap())?;
        assert_eq!(from_gguf.config.tie_word_embeddings, tie);
        let ids = [1u32, 40, 41, 42, 200, 7, 2];
        let expected = logits(&ModelFiles::from_dir(&folder)?, &ids)?;
        let got = logits(&from_gguf, &ids)?;
        assert!(max_abs_diff(&got, &expected)? < 1e-5, "tie={tie}");
    }
    Ok(())
}

#[test]
fn convert_writes_a_folder_that_loads_with_the_same_logits_and_tokenizer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vocab = TestVocab::byte_level("smollm", BYTE_LEVEL_MERGES);
    let gguf = ModelFiles::locate(
        write_model(dir.path(), &vocab, true, GgmlDType::Q8_0)?
            .to_str()
            .unwrap(),
    )?;
    let out = dir.path().join("converted");
    kto_model::convert_to_checkpoint(&gguf, kto_model::Quantization::None, &out, None)?;
    let folder = ModelFiles::from_dir(&out)?;
    assert_eq!(folder.config, gguf.config);
    let ids = [1u32, 50, 60, 70, 2];
    assert_eq!(
        max_abs_diff(&logits(&folder, &ids)?, &logits(&gguf, &ids)?)?,
        0.0
    );
    let text = "x 12 the .he <|im_end|>";
    let (a, b) = (folder.tokenizer()?, gguf.tokenizer()?);
    assert_eq!(
        a.tokenizer.encode(text, true).unwrap().get_ids(),
        b.tokenizer.encode(text, true).unwrap().get_ids()
    );
    assert_eq!(
        (a.eos_id, a.bos_id, a.pad_id),
        (b.eos_id, b.bos_id, b.pad_id)
    );
    assert!(a.chat_template.is_some());
    Ok(())
}

fn tokenizer(dir: &Path, vocab: &TestVocab) -> Result<kto_data::tokenize::TokenizerBundle> {
    let model = tiny(vocab, true);
    let path = dir.join(format!("tok-{}-{:?}.gguf", vocab.model, vocab.pre));
    // The tokenizer does not read the weights: a zero-layer model keeps the file small.
    let model = TinyModel {
        num_hidden_layers: 0,
        ..model
    };
    write_gguf(
        &path,
        &gguf_metadata(&model, vocab),
        &gguf_tensors(&model, &model.random_weights(1)?, GgmlDType::F32)?,
    )?;
    ModelFiles::locate(path.to_str().unwrap())?.tokenizer()
}

fn pieces(bundle: &kto_data::tokenize::TokenizerBundle, text: &str) -> Vec<String> {
    bundle
        .tokenizer
        .encode(text, true)
        .unwrap()
        .get_tokens()
        .to_vec()
}

#[test]
fn byte_level_tokenizer_follows_the_named_pre_tokenizer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let smollm = tokenizer(
        dir.path(),
        &TestVocab::byte_level("smollm", BYTE_LEVEL_MERGES),
    )?;
    let default = tokenizer(
        dir.path(),
        &TestVocab::byte_level("default", BYTE_LEVEL_MERGES),
    )?;
    let llama3 = tokenizer(
        dir.path(),
        &TestVocab::byte_level("llama-bpe", BYTE_LEVEL_MERGES),
    )?;
    // smollm splits digits one by one before BPE: the merge "1 2" never applies.
    assert_eq!(pieces(&smollm, "x 12"), ["x", "Ġ", "1", "2"]);
    assert_eq!(pieces(&default, "x 12"), ["x", "Ġ", "12"]);
    // Llama 3's regex keeps a leading punctuation mark with the word: ". h" merges.
    assert_eq!(pieces(&llama3, ".h"), [".h"]);
    assert_eq!(pieces(&default, ".h"), [".", "h"]);
    assert_eq!(pieces(&smollm, " the"), ["Ġthe"]);
    // Special-token text is one special token; no BOS is added (add_bos_token = false).
    let ids = smollm
        .tokenizer
        .encode("<|im_start|>the<|im_end|>", true)
        .unwrap();
    assert_eq!(ids.get_ids()[0], 1);
    assert_eq!(*ids.get_ids().last().unwrap(), 2);
    // BOS/EOS/pad from their ids; eos is `eos_token_id`'s token (not transformers' copy of BOS).
    assert_eq!(
        (smollm.bos_id, smollm.eos_id, smollm.pad_id),
        (Some(1), 2, 2)
    );
    assert_eq!(smollm.eos_token(), "<|im_end|>");
    let template = smollm.chat_template.as_ref().expect("chat template");
    let message = kto_data::sample::Message {
        role: "user".into(),
        content: "hi".into(),
    };
    assert_eq!(
        template.render(&[message], true)?,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        smollm
            .tokenizer
            .decode(
                smollm.tokenizer.encode("x 12 the", true).unwrap().get_ids(),
                false
            )
            .unwrap(),
        "x 12 the"
    );
    Ok(())
}

#[test]
fn sentencepiece_tokenizer_merges_by_score_and_falls_back_to_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vocab = TestVocab::sentencepiece(&[
        "▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "▁hell", "▁hello",
    ]);
    let id = |t: &str| vocab.tokens.iter().position(|x| x == t).unwrap() as u32;
    let bundle = tokenizer(dir.path(), &vocab)?;
    let encoding = bundle.tokenizer.encode("hello", true).unwrap();
    assert_eq!(encoding.get_ids(), [1, id("▁hello")]);
    let encoding = bundle.tokenizer.encode("hello é", true).unwrap();
    assert_eq!(
        encoding.get_ids(),
        [1, id("▁hello"), id("▁"), id("<0xC3>"), id("<0xA9>")]
    );
    assert_eq!(
        bundle.tokenizer.decode(encoding.get_ids(), true).unwrap(),
        "hello é"
    );
    Ok(())
}

fn error_of(result: Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", result.unwrap_err())
}

#[test]
fn bad_files_name_the_file_and_the_key_or_tensor() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vocab = TestVocab::byte_level("smollm", BYTE_LEVEL_MERGES);
    let model = tiny(&vocab, true);
    let tensors = gguf_tensors(&model, &model.random_weights(3)?, GgmlDType::F32)?;
    type Metadata = Vec<(String, Value)>;
    let write = |name: &str, edit: &dyn Fn(&mut Metadata)| -> Result<PathBuf> {
        let mut metadata = gguf_metadata(&model, &vocab);
        edit(&mut metadata);
        let path = dir.path().join(name);
        write_gguf(&path, &metadata, &tensors)?;
        Ok(path)
    };
    let set = |key: &str, value: Value| {
        let key = key.to_string();
        move |m: &mut Metadata| {
            m.retain(|(k, _)| *k != key);
            m.push((key.clone(), value.clone()));
        }
    };

    let qwen = write(
        "qwen.gguf",
        &set("general.architecture", Value::String("qwen2".into())),
    )?;
    let error = error_of(ModelFiles::from_gguf(&qwen));
    assert!(
        error.contains("qwen.gguf")
            && error.contains("general.architecture")
            && error.contains("qwen2"),
        "{error}"
    );

    let no_merges = write("no-merges.gguf", &|m| {
        m.retain(|(k, _)| k != "tokenizer.ggml.merges")
    })?;
    let error = error_of(ModelFiles::from_gguf(&no_merges)?.tokenizer());
    assert!(
        error.contains("no-merges.gguf") && error.contains("tokenizer.ggml.merges"),
        "{error}"
    );

    let unknown_pre = write(
        "pre.gguf",
        &set("tokenizer.ggml.pre", Value::String("deepseek-coder".into())),
    )?;
    let error = error_of(ModelFiles::from_gguf(&unknown_pre)?.tokenizer());
    assert!(
        error.contains("pre.gguf")
            && error.contains("tokenizer.ggml.pre")
            && error.contains("deepseek-coder"),
        "{error}"
    );

    // Truncated in the tensor data: the header reads, the tensor does not.
    let good = write("good.gguf", &|_| {})?;
    let bytes = std::fs::read(&good)?;
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000])?;
    let error = error_of(ModelFiles::from_gguf(&truncated)?.tensors());
    assert!(
        error.contains("truncated.gguf") && error.contains("tensor `"),
        "{error}"
    );
    // Truncated in the header.
    std::fs::write(&truncated, &bytes[..4000])?;
    let error = error_of(ModelFiles::from_gguf(&truncated));
    assert!(
        error.contains("truncated.gguf") && error.contains("truncated or corrupt"),
        "{error}"
    );

    // A tensor type candle does not read (20 = IQ4_NL): patch the type of `output_norm.weight` in the directory.
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into()?) as usize;
    let type_at = at + 4 + 8 * dims;
    let mut patched = bytes.clone();
    patched[type_at..type_at + 4].copy_from_slice(&20u32.to_le_bytes());
    let iq4 = dir.path().join("iq4.gguf");
    std::fs::write(&iq4, &patched)?;
    let error = error_of(ModelFiles::from_gguf(&iq4));
    assert!(
        error.contains("iq4.gguf")
            && error.contains("`output_norm.weight`")
            && error.contains("type 20"),
        "{error}"
    );
    Ok(())
}

/// transformers 5.17's GGUF tokenizer on a SentencePiece vocabulary (`tests/fixtures/gguf-parity/sentencepiece.json`,
/// made by `scripts/make-gguf-parity-fixture.py --sentencepiece`): the same ids for every stress string, after the
/// BOS that kto adds for `tokenizer.ggml.add_bos_token = true` (as llama.cpp and HF's own Llama tokenizers do) and
/// transformers' GGUF loading leaves out.
#[test]
fn sentencepiece_tokenizer_matches_transformers() -> Result<()> {
    let path = kto_data::testing::fixture("gguf-parity/sentencepiece.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let vocab = TestVocab {
        model: "llama".into(),
        pre: None,
        tokens: serde_json::from_value(fixture["tokens"].clone())?,
        token_types: serde_json::from_value(fixture["token_types"].clone())?,
        scores: Some(serde_json::from_value(fixture["scores"].clone())?),
        merges: None,
        add_bos: true,
    };
    let dir = tempfile::tempdir()?;
    let bundle = tokenizer(dir.path(), &vocab)?;
    assert_eq!(bundle.bos_id, Some(1));
    for case in fixture["stress"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let ids = bundle
            .tokenizer
            .encode(text, true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids[0], 1, "{text:?}: BOS first");
        assert_eq!(ids[1..], expected, "{text:?}");
    }
    Ok(())
}
