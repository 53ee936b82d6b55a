//! Tokenization exactly as TRL 1.16's `KTOTrainer._prepare_dataset` does it, plus the older length options.
//!
//! Per sample (TRL):
//! - plain text: the completion gets the tokenizer's `eos_token` appended unless it already ends with it;
//!   `prompt_ids = tok(prompt)` and `full = tok(prompt + completion)`, both with the tokenizer's own special tokens
//!   (its post-processor, e.g. a Llama BOS);
//! - conversational: `prompt_ids` = the chat template of the prompt with `add_generation_prompt`, `full` = the chat
//!   template of prompt ++ completion, both tokenized without added special tokens; no EOS is appended;
//! - the completion starts at the common prefix length of `prompt_ids` and `full` (TRL's `common_prefix_length`):
//!   `prompt_ids = full[..p]`, `completion_ids = full[p..]`.
//!
//! Then, in this order:
//! 1. `max_prompt_length` (legacy): a longer prompt keeps its end (`truncation_mode = "keep_end"`, the default) or
//!    its start (`"keep_start"`). With keep_end a leading BOS is kept in front of the prompt's end, since the model
//!    always saw one at position 0.
//! 2. `max_completion_length` (legacy): a longer completion keeps its start.
//! 3. `max_length` (TRL): a sample whose prompt alone has `>= max_length` tokens is dropped and counted. The
//!    remaining sequences are cut to `max_length` from the right when batched ([`crate::batch`]); completions are
//!    stored whole because the KL sequences pair them with other prompts.
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat_template::{ChatTemplate, SpecialTokens};
use crate::drops::DropCounts;
use crate::sample::{Message, Sample, Text};

/// A tokenizer with what TRL reads from `tokenizer_config.json` beside it.
#[derive(Debug)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub special_tokens: SpecialTokens,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
    /// `pad_token`'s id, or `eos_token`'s when there is no pad token (as TRL sets it).
    pub pad_id: u32,
    pub chat_template: Option<ChatTemplate>,
}

impl TokenizerBundle {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (and `special_tokens_map.json`, `chat_template.jinja` when
    /// present) from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("cannot load {}: {e}", tokenizer_path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let mut config = read_json_object(&config_path)?;
        // Older checkpoints keep the special tokens in special_tokens_map.json; tokenizer_config.json wins.
        let map_path = dir.join("special_tokens_map.json");
        if map_path.exists() {
            for (key, value) in read_json_object(&map_path)? {
                config.entry(key).or_insert(value);
            }
        }
        let template_path = dir.join("chat_template.jinja");
        let template_file = if template_path.exists() {
            Some(
                std::fs::read_to_string(&template_path)
                    .with_context(|| format!("cannot read {}", template_path.display()))?,
            )
        } else {
            None
        };
        Self::from_parts(tokenizer, &Value::Object(config), template_file)
            .with_context(|| format!("tokenizer in {}", dir.display()))
    }

    /// Builds a bundle from a loaded tokenizer and the contents of its `tokenizer_config.json`; `chat_template`
    /// (a `chat_template.jinja` file) takes precedence over the config's.
    ///
    /// tokenizer.json's post-processor is used as it is: transformers 5.17 (checked with `AutoTokenizer`) ignores
    /// tokenizer_config.json's `add_bos_token`/`add_eos_token` when it loads a tokenizer.json.
    pub fn from_parts(
        tokenizer: Tokenizer,
        config: &Value,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let token = |key: &str| -> Result<Option<String>> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(token)) => Ok(Some(token.clone())),
                Some(Value::Object(added)) => match added.get("content") {
                    Some(Value::String(token)) => Ok(Some(token.clone())),
                    _ => bail!("tokenizer_config.json: `{key}` has no string `content`"),
                },
                Some(other) => {
                    bail!("tokenizer_config.json: `{key}` must be a string, got {other}")
                }
            }
        };
        let special_tokens = SpecialTokens {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            unk_token: token("unk_token")?,
            pad_token: token("pad_token")?,
        };
        let id_of = |name: &str, token: &str| -> Result<u32> {
            tokenizer.token_to_id(token).ok_or_else(|| {
                anyhow!(
                    "tokenizer_config.json: {name} {token:?} is not in tokenizer.json's vocabulary"
                )
            })
        };
        let eos = special_tokens.eos_token.as_deref().ok_or_else(|| {
            anyhow!("tokenizer_config.json has no `eos_token` (TRL appends it to completions)")
        })?;
        let eos_id = id_of("eos_token", eos)?;
        let bos_id = special_tokens
            .bos_token
            .as_deref()
            .map(|bos| id_of("bos_token", bos))
            .transpose()?;
        let pad_id = match special_tokens.pad_token.as_deref() {
            Some(pad) => id_of("pad_token", pad)?,
            None => eos_id,
        };
        let template_source = match chat_template {
            Some(source) => Some(source),
            None => config_chat_template(config)?,
        };
        let chat_template = template_source
            .map(|source| ChatTemplate::new(source, special_tokens.clone()))
            .transpose()
            .context("tokenizer_config.json: chat_template")?;
        Ok(Self {
            tokenizer,
            special_tokens,
            eos_id,
            bos_id,
            pad_id,
            chat_template,
        })
    }

    pub fn eos_token(&self) -> &str {
        self.special_tokens
            .eos_token
            .as_deref()
            .expect("checked when the bundle was built")
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// The chat template rendered to text, as `apply_chat_template(..., tokenize=False)`.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            anyhow!("conversational data needs a chat_template, but the tokenizer has none (tokenizer_config.json)")
        })?;
        template.render(messages, add_generation_prompt)
    }

    /// `apply_chat_template(messages, tokenize=True)`: the rendered text, tokenized without added special tokens.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, false)
    }
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", path.display()))?
    {
        Value::Object(object) => Ok(object),
        _ => bail!("{}: expected a JSON object", path.display()),
    }
}

fn config_chat_template(config: &Value) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(source.clone())),
        // Older configs hold a list of named templates; "default" is the one apply_chat_template uses.
        Some(Value::Array(named)) => {
            let template_of = |entry: &Value| {
                entry
                    .get("template")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let default = named
                .iter()
                .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"));
            Ok(default.or(named.first()).and_then(template_of))
        }
        Some(other) => {
            bail!("tokenizer_config.json: `chat_template` must be a string, got {other}")
        }
    }
}

/// Which end of a prompt longer than `max_prompt_length` is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TruncationMode {
    #[default]
    KeepEnd,
    KeepStart,
}

impl TruncationMode {
    pub const NAMES: [&'static str; 2] = ["keep_end", "keep_start"];
}

impl fmt::Display for TruncationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TruncationMode::KeepEnd => "keep_end",
            TruncationMode::KeepStart => "keep_start",
        })
    }
}

impl FromStr for TruncationMode {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "keep_end" => Ok(TruncationMode::KeepEnd),
            "keep_start" => Ok(TruncationMode::KeepStart),
            _ => bail!(
                "unknown truncation_mode {name:?}: expected one of {}",
                Self::NAMES.join(", ")
            ),
        }
    }
}

impl<'de> serde::Deserialize<'de> for TruncationMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TruncationMode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizationConfig {
    /// TRL's `max_length` (default 1024): drop samples whose prompt reaches it; cut sequences to it when batched.
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: Option<usize>,
    pub truncation_mode: TruncationMode,
}

impl Default for TokenizationConfig {
    fn default() -> Self {
        Self {
            max_length: Some(1024),
            max_prompt_length: None,
            max_completion_length: None,
            truncation_mode: TruncationMode::KeepEnd,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSample {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub label: bool,
    pub pair: Option<u64>,
}

/// Why a sample was left out at tokenization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizeDropReason {
    PromptReachesMaxLength,
}

impl fmt::Display for TokenizeDropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizeDropReason::PromptReachesMaxLength => {
                f.write_str("samples whose prompt alone reaches max_length")
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizeReport {
    pub samples: usize,
    pub kept: usize,
    pub drops: DropCounts,
    /// Samples whose tokenized prompt is not a prefix of the tokenized prompt+completion (TRL warns once).
    pub prompt_not_prefix: usize,
    pub prompts_truncated: usize,
    pub completions_truncated: usize,
}

impl fmt::Display for TokenizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tokenized {} samples, kept {}, dropped: {}",
            self.samples, self.kept, self.drops
        )?;
        if self.prompts_truncated + self.completions_truncated > 0 {
            write!(
                f,
                "; truncated {} prompts (max_prompt_length), {} completions (max_completion_length)",
                self.prompts_truncated, self.completions_truncated
            )?;
        }
        Ok(())
    }
}

/// The (prompt ids, completion ids) of one sample before any length option.
pub fn tokenize_pair(bundle: &TokenizerBundle, sample: &Sample) -> Result<(Vec<u32>, Vec<u32>)> {
    tokenize_split(bundle, sample).map(|split| (split.prompt_ids, split.completion_ids))
}

struct Split {
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
    /// Whether tok(prompt) is a prefix of tok(prompt + completion) (TRL warns once when it is not).
    prompt_is_prefix: bool,
}

fn tokenize_split(bundle: &TokenizerBundle, sample: &Sample) -> Result<Split> {
    let (prompt_ids, full_ids) = match (&sample.prompt, &sample.completion) {
        (Text::Plain(prompt), Text::Plain(completion)) => {
            let eos = bundle.eos_token();
            let completion = if completion.ends_with(eos) {
                completion.clone()
            } else {
                format!("{completion}{eos}")
            };
            (
                bundle.encode(prompt, true)?,
                bundle.encode(&format!("{prompt}{completion}"), true)?,
            )
        }
        (Text::Messages(prompt), Text::Messages(completion)) => {
            let conversation: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
            (
                bundle.encode_chat(prompt, true)?,
                bundle.encode_chat(&conversation, false)?,
            )
        }
        _ => {
            bail!("a sample's prompt and completion must both be text or both be lists of messages")
        }
    };
    let split = common_prefix_length(&prompt_ids, &full_ids);
    let mut full_ids = full_ids;
    let completion_ids = full_ids.split_off(split);
    Ok(Split {
        prompt_is_prefix: split == prompt_ids.len(),
        prompt_ids: full_ids,
        completion_ids,
    })
}

pub fn common_prefix_length(ids: &[u32], other_ids: &[u32]) -> usize {
    ids.iter()
        .zip(other_ids)
        .take_while(|(a, b)| a == b)
        .count()
}

/// Tokenizes one sample and applies the length options; `Err(reason)` in the outer `Ok` when it is dropped.
pub fn tokenize_sample(
    bundle: &TokenizerBundle,
    sample: &Sample,
    config: &TokenizationConfig,
) -> Result<Result<TokenizedSample, TokenizeDropReason>> {
    let mut report = TokenizeReport::default();
    tokenize_one(bundle, sample, config, &mut report)
}

fn tokenize_one(
    bundle: &TokenizerBundle,
    sample: &Sample,
    config: &TokenizationConfig,
    report: &mut TokenizeReport,
) -> Result<Result<TokenizedSample, TokenizeDropReason>> {
    let split = tokenize_split(bundle, sample)?;
    if !split.prompt_is_prefix {
        report.prompt_not_prefix += 1;
    }
    let (mut prompt_ids, mut completion_ids) = (split.prompt_ids, split.completion_ids);
    if let Some(limit) = config.max_prompt_length {
        if prompt_ids.len() > limit {
            report.prompts_truncated += 1;
            prompt_ids = truncate_prompt(prompt_ids, limit, config.truncation_mode, bundle.bos_id);
        }
    }
    if let Some(limit) = config.max_completion_length {
        if completion_ids.len() > limit {
            report.completions_truncated += 1;
            completion_ids.truncate(limit);
        }
    }
    if config
        .max_length
        .is_some_and(|max_length| prompt_ids.len() >= max_length)
    {
        return Ok(Err(TokenizeDropReason::PromptReachesMaxLength));
    }
    Ok(Ok(TokenizedSample {
        prompt_ids,
        completion_ids,
        label: sample.label,
        pair: sample.pair,
    }))
}

fn truncate_prompt(
    prompt_ids: Vec<u32>,
    limit: usize,
    mode: TruncationMode,
    bos_id: Option<u32>,
) -> Vec<u32> {
    match mode {
        TruncationMode::KeepStart => prompt_ids[..limit].to_vec(),
        TruncationMode::KeepEnd => {
            let starts_with_bos = bos_id.is_some() && prompt_ids.first().copied() == bos_id;
            if starts_with_bos && limit > 0 {
                let mut kept = vec![prompt_ids[0]];
                kept.extend_from_slice(&prompt_ids[prompt_ids.len() - (limit - 1)..]);
                kept
            } else {
                prompt_ids[prompt_ids.len() - limit..].to_vec()
            }
        }
    }
}

/// Tokenizes every sample in order; dropped samples are counted, the rest keep their order.
pub fn tokenize_dataset(
    bundle: &TokenizerBundle,
    samples: &[Sample],
    config: &TokenizationConfig,
) -> Result<(Vec<TokenizedSample>, TokenizeReport)> {
    let mut report = TokenizeReport {
        samples: samples.len(),
        ..Default::default()
    };
    let mut kept = Vec::with_capacity(samples.len());
    for (index, sample) in samples.iter().enumerate() {
        match tokenize_one(bundle, sample, config, &mut report)
            .with_context(|| format!("sample {index}"))?
        {
            Ok(tokenized) => kept.push(tokenized),
            Err(reason) => report.drops.add(reason),
        }
    }
    if report.prompt_not_prefix > 0 {
        tracing::warn!(
            "{} samples: the tokenized prompt is not a prefix of the tokenized prompt+completion (the chat template \
             renders the prompt alone differently, or tokens merge across the boundary); their completion starts \
             where the two diverge, as in TRL",
            report.prompt_not_prefix
        );
    }
    report.kept = kept.len();
    Ok((kept, report))
}
