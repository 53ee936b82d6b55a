//! The tokenizer stored in a GGUF file's `tokenizer.*` metadata, rebuilt as a Hugging Face `tokenizer.json` and
//! `tokenizer_config.json` (what `kto convert` writes and what kto tokenizes with).
//!
//! Two kinds (`tokenizer.ggml.model`):
//! - `gpt2`: byte-level BPE from `tokens` and `merges`, pre-tokenized as llama.cpp does for `tokenizer.ggml.pre`
//!   (`smollm`: single digits, then the GPT-2 regex; `llama-bpe`: Llama 3's regex; `default`/`gpt2`/absent: the
//!   GPT-2 regex). An unknown pre-tokenizer is an error, never a silent fallback.
//! - `llama`: SentencePiece BPE; the merges are derived from the `scores` as transformers does, with byte fallback.
//!
//! Tokens of type 3 (control) are special tokens; BOS is added when `tokenizer.ggml.add_bos_token` says so.
//! Deviation from transformers 5.17's GGUF loading, on purpose: its converter sets both `bos_token` and `eos_token`
//! to the token of `bos_token_id` (for SmolLM2 `<|im_start|>`); kto takes `eos_token` from `eos_token_id`
//! (`<|im_end|>`), the token the model ends its turns with, which TRL appends to completions and generation stops at.
//! And transformers 5.17 adds no BOS for a SentencePiece GGUF whose `add_bos_token` is true; kto adds it, as llama.cpp
//! and HF's own Llama tokenizers do.

use crate::gguf::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value as GgufValue;
use kto_data::tokenize::TokenizerBundle;
use serde_json::{json, Map, Value};
use std::str::FromStr;
use tokenizers::Tokenizer;

/// llama.cpp's token type for control (special) tokens.
const CONTROL_TOKEN: i64 = 3;

/// Llama 3's pre-tokenizer regex (HF tokenizer.json of Meta-Llama-3; llama.cpp's `llama-bpe`).
pub(crate) const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizers kto rebuilds, by their `tokenizer.ggml.pre` name.
pub const SUPPORTED_PRE_TOKENIZERS: &str = "smollm, llama-bpe, default, gpt2";

/// A GGUF tokenizer as Hugging Face files.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The `tokenizer.json` document.
    pub tokenizer_json: Value,
    /// The `tokenizer_config.json` document: special tokens, `add_bos_token`, `chat_template`.
    pub tokenizer_config: Value,
}

impl GgufTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.string("tokenizer.ggml.model")?;
        let tokens = strings(gguf, "tokenizer.ggml.tokens")?.ok_or_else(|| {
            anyhow!(
                "{}: missing metadata key `tokenizer.ggml.tokens`",
                gguf.path().display()
            )
        })?;
        let token_types = integers(gguf, "tokenizer.ggml.token_type")?;
        let token_at = |key: &str| -> Result<Option<String>> {
            let full = format!("tokenizer.ggml.{key}");
            match gguf.integer(&full)? {
                None => Ok(None),
                Some(id) => tokens.get(id as usize).cloned().map(Some).ok_or_else(|| {
                    gguf.bad_key(
                        &full,
                        format!("id {id} is outside the {} tokens", tokens.len()),
                    )
                }),
            }
        };
        let bos = token_at("bos_token_id")?;
        let eos = token_at("eos_token_id")?;
        let unk = token_at("unknown_token_id")?;
        let pad = token_at("padding_token_id")?;
        let add_bos = gguf
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(model == "llama");
        let add_eos = gguf.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

        let vocab: Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), json!(id)))
            .collect();
        let (model_json, normalizer, pre_tokenizer, decoder) = match model {
            "gpt2" => {
                let merges = strings(gguf, "tokenizer.ggml.merges")?.ok_or_else(|| {
                    anyhow!(
                        "{}: a `gpt2` tokenizer without metadata key `tokenizer.ggml.merges` (BPE needs its merges)",
                        gguf.path().display()
                    )
                })?;
                let merges = merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ').map(|(a, b)| json!([a, b])).ok_or_else(|| {
                            gguf.bad_key("tokenizer.ggml.merges", format!("merge {m:?} is not two tokens"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                (
                    bpe_json(vocab, merges, unk.as_deref()),
                    Value::Null,
                    byte_level_pre_tokenizer(gguf)?,
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                )
            }
            "llama" => {
                let scores = floats(gguf, "tokenizer.ggml.scores")?.ok_or_else(|| {
                    anyhow!(
                        "{}: a `llama` (SentencePiece) tokenizer without metadata key `tokenizer.ggml.scores`",
                        gguf.path().display()
                    )
                })?;
                if scores.len() != tokens.len() {
                    bail!(
                        "{}: `tokenizer.ggml.scores` has {} entries for {} tokens",
                        gguf.path().display(),
                        scores.len(),
                        tokens.len()
                    );
                }
                let merges = merges_from_scores(&tokens, &scores);
                let add_space_prefix = gguf.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let mut normalizers = Vec::new();
                if add_space_prefix {
                    normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
                }
                normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if add_space_prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                (
                    bpe_json(vocab, merges, unk.as_deref()),
                    json!({"type": "Sequence", "normalizers": normalizers}),
                    Value::Null,
                    json!({"type": "Sequence", "decoders": decoders}),
                )
            }
            other => bail!(
                "{}: metadata key `tokenizer.ggml.model` is {other:?}; kto rebuilds \"gpt2\" (BPE) and \"llama\" \
                 (SentencePiece) tokenizers",
                gguf.path().display()
            ),
        };

        let added_tokens: Vec<Value> = match &token_types {
            Some(types) => types
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == CONTROL_TOKEN)
                .map(|(id, _)| added_token(id, &tokens[id]))
                .collect(),
            None => [&unk, &bos, &eos]
                .into_iter()
                .flatten()
                .filter_map(|t| {
                    tokens
                        .iter()
                        .position(|x| x == t)
                        .map(|id| added_token(id, t))
                })
                .collect(),
        };
        let post_processor = post_processor(
            &tokens,
            bos.as_deref().filter(|_| add_bos),
            eos.as_deref().filter(|_| add_eos),
        );
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": decoder,
            "model": model_json,
        });
        let mut config = Map::new();
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (key, token) in [
            ("bos_token", &bos),
            ("eos_token", &eos),
            ("unk_token", &unk),
            ("pad_token", &pad),
        ] {
            config.insert(key.into(), token.clone().map_or(Value::Null, Value::String));
        }
        config.insert("add_bos_token".into(), json!(add_bos));
        config.insert("add_eos_token".into(), json!(add_eos));
        if let Some(n) = gguf.integer("llama.context_length")? {
            config.insert("model_max_length".into(), json!(n));
        }
        if gguf.get("tokenizer.chat_template").is_some() {
            config.insert(
                "chat_template".into(),
                json!(gguf.string("tokenizer.chat_template")?),
            );
        }
        Ok(Self {
            tokenizer_json,
            tokenizer_config: Value::Object(config),
        })
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_str(&self.tokenizer_json.to_string())
            .map_err(|e| anyhow!("the tokenizer rebuilt from the GGUF metadata does not load: {e}"))
    }

    /// The tokenizer with its special tokens and chat template, as kto's data pipeline uses it.
    pub fn bundle(&self) -> Result<TokenizerBundle> {
        TokenizerBundle::from_parts(self.tokenizer()?, &self.tokenizer_config, None)
    }
}

/// The pre-tokenizer of a byte-level BPE tokenizer, chosen by `tokenizer.ggml.pre` as llama.cpp chooses its regexes.
fn byte_level_pre_tokenizer(gguf: &GgufFile) -> Result<Value> {
    let pre = match gguf.get("tokenizer.ggml.pre") {
        None => "default",
        Some(_) => gguf.string("tokenizer.ggml.pre")?,
    };
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
        other => bail!(
            "{}: metadata key `tokenizer.ggml.pre` is {other:?}, a pre-tokenizer kto does not rebuild \
             (supported: {SUPPORTED_PRE_TOKENIZERS}); convert the model from its Hugging Face folder instead",
            gguf.path().display()
        ),
    })
}

/// transformers' BPE for GGUF tokenizers (`GGUFLlamaConverter`): unknown pieces fall back to bytes.
fn bpe_json(vocab: Map<String, Value>, merges: Vec<Value>, unk: Option<&str>) -> Value {
    json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": unk,
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": true,
        "byte_fallback": true,
        "ignore_merges": false,
        "vocab": vocab,
        "merges": merges,
    })
}

fn added_token(id: usize, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

/// BOS/EOS around each sequence as `add_bos_token`/`add_eos_token` ask (transformers' `update_post_processor`).
fn post_processor(tokens: &[String], bos: Option<&str>, eos: Option<&str>) -> Value {
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let mut single = Vec::new();
    let mut specials = Map::new();
    for token in [bos, eos].into_iter().flatten() {
        let id = tokens.iter().position(|t| t == token).unwrap_or_default();
        specials.insert(
            token.into(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
    }
    if let Some(bos) = bos {
        single.push(special(bos));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some(eos) = eos {
        single.push(special(eos));
    }
    let mut pair = single.clone();
    pair.extend(single.iter().map(|piece| {
        let mut piece = piece.clone();
        if let Some(seq) = piece.get_mut("Sequence") {
            seq["id"] = json!("B");
        }
        for kind in ["Sequence", "SpecialToken"] {
            if let Some(inner) = piece.get_mut(kind) {
                inner["type_id"] = json!(1);
            }
        }
        piece
    }));
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// SentencePiece merges from token scores, as transformers' `GGUFTokenizerSkeleton` builds them: every split of a
/// token into two tokens, higher-scoring results first (ties: the better-scoring left, then right piece).
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<Value> {
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Python's dict keeps the last score of a duplicated token.
    let score_of = |t: &str| scores[ids[t]];
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for token in tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&token[..i], &token[i..]))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score_of(token)))
            .collect();
        local.sort_by(|a, b| {
            (score_of(b.0), score_of(b.1))
                .partial_cmp(&(score_of(a.0), score_of(a.1)))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        merges.extend(local);
    }
    // A stable sort, as Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(l, r, _)| json!([l, r])).collect()
}

fn array<'a>(gguf: &'a GgufFile, key: &str) -> Result<Option<&'a Vec<GgufValue>>> {
    gguf.array(key)
}

fn strings(gguf: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    array(gguf, key)?
        .map(|values| {
            values
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| gguf.bad_key(key, e)))
                .collect()
        })
        .transpose()
}

fn integers(gguf: &GgufFile, key: &str) -> Result<Option<Vec<i64>>> {
    array(gguf, key)?
        .map(|values| {
            values
                .iter()
                .map(|v| match v {
                    GgufValue::I32(x) => Ok(*x as i64),
                    GgufValue::U32(x) => Ok(*x as i64),
                    GgufValue::I64(x) => Ok(*x),
                    GgufValue::U8(x) => Ok(*x as i64),
                    GgufValue::I8(x) => Ok(*x as i64),
                    other => Err(gguf.bad_key(key, format!("{other:?} is not an integer"))),
                })
                .collect()
        })
        .transpose()
}

fn floats(gguf: &GgufFile, key: &str) -> Result<Option<Vec<f64>>> {
    array(gguf, key)?
        .map(|values| {
            values
                .iter()
                .map(|v| v.to_f32().map(f64::from).map_err(|e| gguf.bad_key(key, e)))
                .collect()
        })
        .transpose()
        .context("reading the token scores")
}
