//! A checkpoint's tokenizer as GGUF `tokenizer.*` metadata, the inverse of [`crate::gguf_tokenizer`]: what llama.cpp's
//! `convert_hf_to_gguf.py` (`_set_vocab_gpt2` and gguf-py's `SpecialVocab`) writes for a byte-level BPE tokenizer,
//! or the source file's own keys when the checkpoint is a GGUF file already.
//!
//! Only tokenizers that both llama.cpp and kto's reader rebuild the same way are written: byte-level BPE whose
//! pre-tokenizer is GPT-2's (`gpt-2`), SmolLM's (`smollm`) or Llama 3's (`llama-bpe`). Anything else is an error
//! naming tokenizer.json and what it has, never a file that would tokenize differently.

use crate::gguf_tokenizer::LLAMA3_REGEX;
use crate::model_files::{ModelFiles, ModelFormat};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::path::Path;

/// llama.cpp's token types (`gguf.TokenType`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.*` metadata of `checkpoint` for a GGUF file of `vocab_size` tokens.
pub fn tokenizer_metadata(
    checkpoint: &ModelFiles,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    match &checkpoint.format {
        ModelFormat::Gguf(gguf) => {
            let mut keys: Vec<(String, Value)> = gguf
                .metadata()
                .iter()
                .filter(|(key, _)| key.starts_with("tokenizer."))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            keys.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(keys)
        }
        ModelFormat::Safetensors => from_hf_folder(&checkpoint.dir, vocab_size),
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn from_hf_folder(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = read_json(&tokenizer_path)?;
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        Json::Null
    };
    let model = &tokenizer["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        bail!(
            "{}: a {} tokenizer{}; kto writes GGUF tokenizers for byte-level BPE (tokenizer.ggml.model \"gpt2\") only",
            tokenizer_path.display(),
            model["type"].as_str().unwrap_or("non-BPE"),
            if model["byte_fallback"] == true {
                " with byte fallback (SentencePiece style)"
            } else {
                ""
            }
        );
    }
    let pre = pre_tokenizer_name(&tokenizer["pre_tokenizer"]).ok_or_else(|| {
        anyhow!(
            "{}: pre_tokenizer {} is none that llama.cpp and kto both rebuild (GPT-2's byte-level regex, SmolLM's \
             digits + byte-level, Llama 3's split + byte-level)",
            tokenizer_path.display(),
            tokenizer["pre_tokenizer"]
        )
    })?;

    // Every id below vocab_size: the model's vocabulary and the added tokens; holes as llama.cpp fills them.
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let vocab = model["vocab"].as_object().ok_or_else(|| {
        anyhow!(
            "{}: `model.vocab` is not an object",
            tokenizer_path.display()
        )
    })?;
    let mut place = |token: &str, id: u64, kind: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            anyhow!(
                "{}: token {token:?} has id {id}, outside the model's {vocab_size} embeddings",
                tokenizer_path.display()
            )
        })?;
        *slot = Some((token.to_string(), kind));
        Ok(())
    };
    for (token, id) in vocab {
        let id = id.as_u64().ok_or_else(|| {
            anyhow!(
                "{}: `model.vocab.{token}` is not an id",
                tokenizer_path.display()
            )
        })?;
        place(token, id, NORMAL)?;
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            bail!(
                "{}: an `added_tokens` entry without id or content",
                tokenizer_path.display()
            );
        };
        let kind = if added["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(content, id, kind)?;
    }
    let (names, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| {
            let (text, kind) = token.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
            (Value::String(text), Value::I32(kind))
        })
        .unzip();
    let id_of = |text: &str| -> Option<u32> {
        names
            .iter()
            .position(|v| matches!(v, Value::String(t) if t == text))
            .map(|id| id as u32)
    };

    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: a BPE model without `merges`", tokenizer_path.display()))?
        .iter()
        .map(|merge| match merge {
            Json::String(pair) => Ok(Value::String(pair.clone())),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(Value::String(format!("{a} {b}"))),
                _ => bail!(
                    "{}: merge {merge} is not two tokens",
                    tokenizer_path.display()
                ),
            },
            _ => bail!(
                "{}: merge {merge} is not two tokens",
                tokenizer_path.display()
            ),
        })
        .collect::<Result<Vec<_>>>()?;

    let mut metadata = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(names.clone())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    // gguf-py's SpecialVocab: the ids of the special tokens tokenizer_config.json names.
    let special = |key: &str| -> Option<String> {
        match &config[key] {
            Json::String(text) => Some(text.clone()),
            Json::Object(token) => token["content"].as_str().map(str::to_string),
            _ => None,
        }
    };
    for kind in ["bos", "eos", "unk", "sep", "pad", "cls", "mask"] {
        let key = format!("{kind}_token");
        if let Some(text) = special(&key) {
            let id = id_of(&text).ok_or_else(|| {
                anyhow!(
                    "{}: `{key}` {text:?} is not in tokenizer.json's vocabulary",
                    config_path.display()
                )
            })?;
            let gguf_key = match kind {
                "unk" => "unknown".to_string(),
                "pad" => "padding".to_string(),
                "sep" => "seperator".to_string(), // sic: llama.cpp's key
                other => other.to_string(),
            };
            metadata.push((
                format!("tokenizer.ggml.{gguf_key}_token_id"),
                Value::U32(id),
            ));
        }
    }
    let (add_bos, add_eos) = added_specials(
        &tokenizer["post_processor"],
        &special("bos_token"),
        &special("eos_token"),
    );
    for (kind, from_template) in [("bos", add_bos), ("eos", add_eos)] {
        let explicit = config[format!("add_{kind}_token")].as_bool();
        if let Some(add) = explicit.or(from_template) {
            metadata.push((format!("tokenizer.ggml.add_{kind}_token"), Value::Bool(add)));
        }
    }
    if let Some(template) = chat_template(dir, &config, &config_path)? {
        metadata.push(("tokenizer.chat_template".into(), Value::String(template)));
    }
    Ok(metadata)
}

/// The `tokenizer.ggml.pre` name of a byte-level pre-tokenizer, by the shapes kto's reader rebuilds per name.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let byte_level = |p: &Json, regex: bool| p["type"] == "ByteLevel" && p["use_regex"] == regex;
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array()?;
    match parts.as_slice() {
        [digits, bl]
            if digits["type"] == "Digits"
                && digits["individual_digits"] == true
                && byte_level(bl, true) =>
        {
            Some("smollm")
        }
        [split, bl]
            if split["type"] == "Split"
                && split["pattern"]["Regex"] == LLAMA3_REGEX
                && byte_level(bl, false) =>
        {
            Some("llama-bpe")
        }
        _ => None,
    }
}

/// Whether the post-processor puts BOS first / EOS last in a single sequence (gguf-py's reading of a
/// `TemplateProcessing`; `None` where it says nothing).
fn added_specials(
    post: &Json,
    bos: &Option<String>,
    eos: &Option<String>,
) -> (Option<bool>, Option<bool>) {
    let processors = match post["processors"].as_array() {
        Some(list) => list.iter().collect::<Vec<_>>(),
        None => vec![post],
    };
    let mut result = (None, None);
    for processor in processors {
        let single = processor["single"].as_array();
        let Some(single) =
            single.filter(|s| processor["type"] == "TemplateProcessing" && s.len() > 1)
        else {
            continue;
        };
        if let Some(first) = single[0]["SpecialToken"]["id"].as_str() {
            result.0 = Some(bos.as_deref() == Some(first));
        }
        if let Some(last) = single[single.len() - 1]["SpecialToken"]["id"].as_str() {
            result.1 = Some(eos.as_deref() == Some(last));
        }
    }
    result
}

/// `chat_template.jinja` when present (transformers' precedence), else tokenizer_config.json's `chat_template`
/// (a string, or the `default` entry of a list of named templates).
fn chat_template(dir: &Path, config: &Json, config_path: &Path) -> Result<Option<String>> {
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .with_context(|| format!("cannot read {}", file.display()));
    }
    match &config["chat_template"] {
        Json::Null => Ok(None),
        Json::String(template) => Ok(Some(template.clone())),
        Json::Array(named) => Ok(named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string)),
        other => bail!(
            "{}: `chat_template` must be a string or a list of named templates, got {other}",
            config_path.display()
        ),
    }
}
