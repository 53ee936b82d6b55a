//! The catalogue of bad input (docs/RELIABILITY.md): each case is refused with one clear error that names the file,
//! line, key or tensor, a non-zero exit, and no partial output (`output_dir` is not created; an earlier run's files
//! are left exactly as they were).
//!
//! Every case starts from a working setup (a copy of the TRL fixture's tiny model and data) and breaks one thing.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{kto_warn, stderr};
use kto_data::testing::trl_fixture;

const CONFIG: &str = "[model]\npath = \"model\"\n[data]\ntrain_file = \"data.jsonl\"\nmax_length = 64\n\
                      [kto]\nbeta = 0.1\n[train]\noutput_dir = \"out\"\nper_device_train_batch_size = 4\n\
                      max_steps = 2\nsave_steps = 1\n";

/// A working setup in a temporary folder: `model/`, `adapter_init/`, `data.jsonl`, `kto.toml`.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fx = trl_fixture();
        for sub in ["model", "adapter_init"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            for entry in std::fs::read_dir(fx.join(sub)).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), dir.path().join(sub).join(entry.file_name())).unwrap();
            }
        }
        std::fs::copy(fx.join("data.jsonl"), dir.path().join("data.jsonl")).unwrap();
        std::fs::write(dir.path().join("kto.toml"), CONFIG).unwrap();
        Setup { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> &Self {
        std::fs::write(self.path(rel), bytes).unwrap();
        self
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    /// Replaces `from` (which must occur) by `to` in a text file.
    fn edit(&self, rel: &str, from: &str, to: &str) -> &Self {
        let text = self.read(rel);
        assert!(text.contains(from), "{rel} has no {from:?}");
        self.write(rel, text.replacen(from, to, 1))
    }

    /// Replaces line `n` (1-based) of a text file.
    fn set_line(&self, rel: &str, n: usize, line: &str) -> &Self {
        let mut lines: Vec<String> = self.read(rel).lines().map(String::from).collect();
        lines[n - 1] = line.to_string();
        self.write(rel, lines.join("\n") + "\n")
    }

    fn remove(&self, rel: &str) -> &Self {
        std::fs::remove_file(self.path(rel)).unwrap();
        self
    }

    /// Every file under `out/` with its contents.
    fn output_snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut stack = vec![self.path("out")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    files.insert(path.clone(), std::fs::read(&path).unwrap());
                }
            }
        }
        files
    }

    /// `kto train` (plus `extra` arguments) fails with one error holding every fragment, and writes nothing.
    fn refused(&self, extra: &[&str], fragments: &[&str]) {
        let before = self.output_snapshot();
        let existed = self.path("out").exists();
        let mut args = vec!["train", "--config", "kto.toml"];
        args.extend_from_slice(extra);
        let out = kto_warn(self.dir.path(), &args);
        let log = stderr(&out);
        assert!(!out.status.success(), "accepted: {log}");
        assert!(!log.contains("panicked"), "{log}");
        assert_eq!(log.matches("error:").count(), 1, "one error: {log}");
        for fragment in fragments {
            assert!(log.contains(fragment), "no {fragment:?} in: {log}");
        }
        assert_eq!(
            self.path("out").exists(),
            existed,
            "output_dir created: {log}"
        );
        assert!(
            self.output_snapshot() == before,
            "output_dir changed: {log}"
        );
    }

    /// A real 2-step run in `out/` (checkpoints 1 and 2).
    fn trained(&self) -> &Self {
        let out = kto_warn(self.dir.path(), &["train", "--config", "kto.toml"]);
        assert!(out.status.success(), "{}", stderr(&out));
        self
    }
}

// ---- data ----

#[test]
fn data_malformed_json_names_line_and_column() {
    let s = Setup::new();
    s.set_line("data.jsonl", 3, r#"{"prompt": "w1","#);
    s.refused(&[], &["data.jsonl:3:", "malformed JSON at column 16"]);
}

#[test]
fn data_row_not_an_object() {
    let s = Setup::new();
    s.set_line("data.jsonl", 4, r#"["w1", " w2 </s>", true]"#);
    s.refused(
        &[],
        &["data.jsonl:4:", "expected a JSON object, got a list"],
    );
}

#[test]
fn data_missing_field() {
    let s = Setup::new();
    s.set_line(
        "data.jsonl",
        2,
        r#"{"prompt": "w1", "completion": " w2 </s>"}"#,
    );
    s.refused(&[], &["data.jsonl:2:", "missing field `label`"]);
}

#[test]
fn data_mistyped_label() {
    let s = Setup::new();
    s.set_line(
        "data.jsonl",
        2,
        r#"{"prompt": "w1", "completion": " w2 </s>", "label": "no"}"#,
    );
    s.refused(
        &[],
        &[
            "data.jsonl:2:",
            "field `label` must be true/false",
            "got \"no\"",
        ],
    );
}

#[test]
fn data_mistyped_prompt() {
    let s = Setup::new();
    s.set_line(
        "data.jsonl",
        5,
        r#"{"prompt": 5, "completion": " w2 </s>", "label": true}"#,
    );
    s.refused(
        &[],
        &[
            "data.jsonl:5:",
            "field `prompt` must be a string, got a number",
        ],
    );
}

#[test]
fn data_empty_completion() {
    let s = Setup::new();
    s.set_line(
        "data.jsonl",
        2,
        r#"{"prompt": "w1", "completion": "", "label": false}"#,
    );
    s.refused(&[], &["data.jsonl:2:", "field `completion` is empty"]);
}

#[test]
fn data_one_class_only() {
    let s = Setup::new();
    let text = s
        .read("data.jsonl")
        .replace("\"label\": false", "\"label\": true");
    s.write("data.jsonl", text);
    s.refused(
        &[],
        &[
            "data.jsonl",
            "all 12 samples are desirable",
            "none is undesirable",
            "both classes",
        ],
    );
}

#[test]
fn data_every_row_too_long() {
    let s = Setup::new();
    s.edit("kto.toml", "max_length = 64", "max_length = 3");
    s.refused(
        &[],
        &[
            "data.jsonl",
            "no samples left",
            "[data] max_length = 3",
            "raise max_length",
        ],
    );
}

#[test]
fn data_invalid_utf8_names_line() {
    let s = Setup::new();
    let mut bytes = std::fs::read(s.path("data.jsonl")).unwrap();
    bytes.extend_from_slice(
        b"{\"prompt\": \"w1\xff\", \"completion\": \" w2 </s>\", \"label\": true}\n",
    );
    s.write("data.jsonl", bytes);
    s.refused(
        &[],
        &[
            "data.jsonl:13:",
            "not valid UTF-8",
            "0xFF",
            "save the file as UTF-8",
        ],
    );
}

#[test]
fn data_utf16_with_bom() {
    let s = Setup::new();
    let mut bytes = vec![0xFF, 0xFE];
    for unit in s.read("data.jsonl").encode_utf16() {
        bytes.extend_from_slice(&unit.to_le_bytes());
    }
    s.write("data.jsonl", bytes);
    s.refused(&[], &["data.jsonl", "UTF-16LE", "save it as UTF-8"]);
}

#[test]
fn data_empty_file() {
    let s = Setup::new();
    s.write("data.jsonl", "\n\n");
    s.refused(&[], &["data.jsonl", "no rows (the file is empty)"]);
}

#[test]
fn data_unknown_format() {
    let s = Setup::new();
    s.set_line("data.jsonl", 1, r#"{"question": "w1", "answer": "w2"}"#);
    s.refused(&[], &["data.jsonl:1", "question", "prompt"]);
}

#[test]
fn data_file_missing() {
    let s = Setup::new();
    s.remove("data.jsonl");
    s.refused(&[], &["data.jsonl", "No such file"]);
}

// ---- config ----

#[test]
fn config_unknown_key_lists_allowed_keys() {
    let s = Setup::new();
    s.edit(
        "kto.toml",
        "max_steps = 2",
        "max_steps = 2\nlernig_rate = 1",
    );
    s.refused(
        &[],
        &[
            "kto.toml",
            "unknown key `lernig_rate` in [train]",
            "learning_rate",
        ],
    );
}

#[test]
fn config_unknown_section() {
    let s = Setup::new();
    s.edit("kto.toml", "[train]", "[optim]\nlr = 1\n[train]");
    s.refused(
        &[],
        &["kto.toml", "unknown section [optim]", "[kto], [train]"],
    );
}

#[test]
fn config_wrong_type() {
    let s = Setup::new();
    s.edit("kto.toml", "beta = 0.1", "beta = \"high\"");
    s.refused(
        &[],
        &["kto.toml", "[kto] beta", "invalid type: string \"high\""],
    );
}

#[test]
fn config_unknown_enum_value_lists_allowed() {
    let s = Setup::new();
    s.edit("kto.toml", "beta = 0.1", "beta = 0.1\nloss_type = \"dpo\"");
    s.refused(
        &[],
        &["[kto] loss_type", "`dpo`", "`kto` or `apo_zero_unpaired`"],
    );
}

#[test]
fn config_beta_out_of_range() {
    let s = Setup::new();
    s.edit("kto.toml", "beta = 0.1", "beta = 0");
    s.refused(&[], &["[kto] beta = 0", "must be a positive number"]);
}

#[test]
fn config_negative_learning_rate() {
    let s = Setup::new();
    s.refused(
        &["--set", "train.learning_rate=-1e-3"],
        &["[train] learning_rate = -0.001", "must be >= 0"],
    );
}

#[test]
fn config_negative_weight() {
    let s = Setup::new();
    s.edit(
        "kto.toml",
        "beta = 0.1",
        "beta = 0.1\nundesirable_weight = -1",
    );
    s.refused(
        &[],
        &["[kto] undesirable_weight = -1", "must be a positive number"],
    );
}

#[test]
fn config_batch_of_one_with_kto() {
    let s = Setup::new();
    s.refused(
        &["--set", "train.per_device_train_batch_size=1"],
        &[
            "[train] per_device_train_batch_size = 1",
            "loss_type \"kto\" needs >= 2",
        ],
    );
}

#[test]
fn config_toml_syntax_names_line() {
    let s = Setup::new();
    s.edit("kto.toml", "max_steps = 2", "max_steps = 2 2");
    s.refused(&[], &["kto.toml", "TOML parse error at line 11"]);
}

#[test]
fn config_file_missing() {
    let s = Setup::new();
    s.remove("kto.toml");
    s.refused(&[], &["reading config kto.toml", "No such file"]);
}

#[test]
fn config_required_key_missing() {
    let s = Setup::new();
    s.edit("kto.toml", "train_file = \"data.jsonl\"\n", "");
    s.refused(&[], &["[data] train_file is not set"]);
}

// ---- model ----

#[test]
fn model_folder_missing() {
    let s = Setup::new();
    s.edit("kto.toml", "path = \"model\"", "path = \"nowhere/model\"");
    s.refused(&[], &["model `nowhere/model` not found", "no folder"]);
}

#[test]
fn model_config_missing() {
    let s = Setup::new();
    s.remove("model/config.json");
    s.refused(&[], &["model", "missing config.json"]);
}

#[test]
fn model_config_malformed() {
    let s = Setup::new();
    s.write("model/config.json", "{\n");
    s.refused(&[], &["model/config.json", "invalid JSON"]);
}

#[test]
fn model_weights_missing() {
    let s = Setup::new();
    s.remove("model/model.safetensors");
    s.refused(&[], &["no weights", "model.safetensors"]);
}

#[test]
fn model_weights_truncated() {
    let s = Setup::new();
    let bytes = std::fs::read(s.path("model/model.safetensors")).unwrap();
    s.write("model/model.safetensors", &bytes[..1000]);
    s.refused(&[], &["model/model.safetensors"]);
}

#[test]
fn model_unknown_model_type() {
    let s = Setup::new();
    s.edit(
        "model/config.json",
        "\"model_type\": \"llama\"",
        "\"model_type\": \"gpt2\"",
    );
    s.refused(
        &[],
        &[
            "model/config.json",
            "unsupported `model_type` \"gpt2\"",
            "llama, mistral, qwen2",
        ],
    );
}

#[test]
fn model_shape_mismatch_names_tensor() {
    let s = Setup::new();
    s.edit(
        "model/config.json",
        "\"intermediate_size\": 160",
        "\"intermediate_size\": 128",
    );
    s.refused(
        &[],
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "has shape [160, 64], the model config needs [128, 64]",
            "[160, 64]",
        ],
    );
}

#[test]
fn model_tokenizer_missing() {
    let s = Setup::new();
    s.remove("model/tokenizer.json");
    s.refused(&[], &["model/tokenizer.json"]);
}

#[test]
fn adapter_for_another_base_names_tensor() {
    let s = Setup::new();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-llama");
    let tiny = tiny.canonicalize().unwrap();
    s.edit(
        "kto.toml",
        "path = \"model\"",
        &format!(
            "path = \"{}\"\n[lora]\ninit_adapter = \"adapter_init\"",
            tiny.display()
        ),
    );
    s.refused(
        &[],
        &[
            "init_adapter",
            "adapter_init/adapter_model.safetensors",
            "q_proj.lora_A.weight",
            "[4, 64]",
            "[4, 128]",
        ],
    );
}

// ---- run state ----

#[test]
fn output_dir_holds_another_run() {
    let s = Setup::new();
    std::fs::create_dir_all(s.path("out/checkpoint-3")).unwrap();
    s.write("out/metrics.jsonl", "{\"step\": 1}\n");
    s.refused(
        &[],
        &[
            "out holds an earlier run",
            "checkpoint-3",
            "metrics.jsonl",
            "--resume",
            "--overwrite",
        ],
    );
}

/// A finished run (its adapter written) has nothing to resume: the refusal offers the other two ways only.
#[test]
fn output_dir_holds_a_finished_run() {
    let s = Setup::new();
    s.trained();
    let fragments = [
        "out holds a finished run (adapter, checkpoint-",
        "there is nothing to resume",
        "--overwrite",
        "choose another [train] output_dir",
    ];
    s.refused(&[], &fragments);
    let stderr = stderr(&kto_warn(s.dir.path(), &["train", "--config", "kto.toml"]));
    assert!(!stderr.contains("--resume"), "{stderr}");
}

#[test]
fn resume_with_changed_config_names_key() {
    let s = Setup::new();
    s.trained();
    std::fs::remove_dir_all(s.path("out/adapter")).unwrap();
    s.refused(
        &["--resume", "--set", "kto.beta=0.2"],
        &[
            "cannot resume from out/checkpoint-2",
            "kto.beta was 0.1 and is now 0.2",
        ],
    );
}

#[test]
fn resume_from_a_missing_folder() {
    let s = Setup::new();
    s.refused(
        &["--resume", "nowhere"],
        &["--resume nowhere: no such folder"],
    );
}

#[test]
fn resume_from_an_incomplete_checkpoint_folder() {
    let s = Setup::new();
    s.trained();
    s.remove("out/checkpoint-2/manifest.json");
    s.refused(
        &["--resume", "out/checkpoint-2"],
        &[
            "out/checkpoint-2",
            "no manifest.json",
            "incomplete checkpoint",
        ],
    );
}
