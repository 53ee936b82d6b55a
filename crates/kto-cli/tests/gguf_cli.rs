//! A GGUF model through the `kto` binary: tokenize (GGUF and safetensors alike), convert, a short conversational
//! training run and generation, and the clear error of a tokenizer kto does not rebuild.
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use kto_model::testing::gguf::{gguf_metadata, gguf_tensors, write_gguf, TestVocab};
use kto_model::testing::TinyModel;
use kto_model::ModelFiles;

mod common;

use common::kto;

/// [`common::kto_ok`]'s standard output as text.
fn kto_ok(dir: &Path, args: &[&str]) -> String {
    String::from_utf8(common::kto_ok(dir, args).stdout).unwrap()
}

/// A tiny byte-level GGUF model (`pre` names its pre-tokenizer) and a config naming it.
fn setup(dir: &Path, pre: &str) -> PathBuf {
    let vocab = TestVocab::byte_level(pre, &["Ġ t", "h e", "Ġt he", "1 2"]);
    let model = TinyModel {
        vocab_size: vocab.tokens.len(),
        hidden_size: 64,
        intermediate_size: 96,
        tie_word_embeddings: true,
        ..TinyModel::default()
    };
    let path = dir.join("tiny.gguf");
    let tensors = gguf_tensors(&model, &model.random_weights(5).unwrap(), GgmlDType::Q8_0).unwrap();
    let mut metadata = gguf_metadata(&model, &vocab);
    metadata.push(("general.alignment".into(), Value::U32(32)));
    write_gguf(&path, &metadata, &tensors).unwrap();
    let rows: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({
                "prompt": [{"role": "user", "content": format!("question {i} about the tea")}],
                "completion": [{"role": "assistant", "content": if i % 2 == 0 { "the answer" } else { "no" }}],
                "label": i % 2 == 0,
            })
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("data.jsonl"), rows.join("\n") + "\n").unwrap();
    let config =
        "[model]\npath = \"tiny.gguf\"\n[data]\ntrain_file = \"data.jsonl\"\nmax_length = 64\n\
                  [train]\noutput_dir = \"out\"\nper_device_train_batch_size = 4\nmax_steps = 2\n";
    std::fs::write(dir.join("kto.toml"), config).unwrap();
    path
}

fn tokenize_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&kto_ok(dir, args)).unwrap()
}

#[test]
fn tokenize_convert_train_and_generate_from_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = setup(dir.path(), "smollm");
    let text = "x 12 the <|im_end|>";
    let tokens = tokenize_json(
        dir.path(),
        &["tokenize", "--config", "kto.toml", "--text", text, "--json"],
    );
    let expected = ModelFiles::from_gguf(&gguf).unwrap().tokenizer().unwrap();
    let encoding = expected.tokenizer.encode(text, true).unwrap();
    assert_eq!(tokens["ids"], serde_json::json!(encoding.get_ids()));
    assert_eq!(
        tokens["tokens"],
        serde_json::json!(["x", "Ġ", "1", "2", "Ġthe", "Ġ", "<|im_end|>"])
    );
    // --file reads the text byte for byte; the plain output is one `id<TAB>token` line per token.
    std::fs::write(dir.path().join("text.txt"), text).unwrap();
    let plain = kto_ok(
        dir.path(),
        &["tokenize", "--config", "kto.toml", "--file", "text.txt"],
    );
    let ids: Vec<u32> = plain
        .lines()
        .map(|l| l.split('\t').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, encoding.get_ids());

    // convert: an HF folder; the same tokens from it through a safetensors config.
    kto_ok(
        dir.path(),
        &["convert", "--gguf", "tiny.gguf", "--out", "hf"],
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.path().join("hf").join(file).is_file(), "{file}");
    }
    let from_folder = tokenize_json(
        dir.path(),
        &[
            "tokenize",
            "--config",
            "kto.toml",
            "--set",
            "model.path=hf",
            "--text",
            text,
            "--json",
        ],
    );
    assert_eq!(from_folder, tokens);
    let again = kto(
        dir.path(),
        &["convert", "--gguf", "tiny.gguf", "--out", "hf"],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    // Training on conversational data, then generation with the trained adapter.
    kto_ok(dir.path(), &["train", "--config", "kto.toml"]);
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"loss\""), "{metrics}");
    assert!(dir
        .path()
        .join("out/adapter/adapter_model.safetensors")
        .is_file());
    let generated = kto(
        dir.path(),
        &[
            "generate",
            "--config",
            "kto.toml",
            "--prompt",
            "the",
            "--max-new-tokens",
            "4",
        ],
    );
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
}

#[test]
fn an_unknown_pre_tokenizer_is_refused_naming_the_file_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "qwen2");
    let out = kto(
        dir.path(),
        &["tokenize", "--config", "kto.toml", "--text", "hi"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tiny.gguf")
            && stderr.contains("tokenizer.ggml.pre")
            && stderr.contains("\"qwen2\""),
        "{stderr}"
    );
}
