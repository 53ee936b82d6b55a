//! TRL's tokenization on a tiny BPE tokenizer with a Llama-style BOS post-processor, written by hand.
use std::path::Path;

use kto_data::batch::SequenceBatch;
use kto_data::tokenize::{
    tokenize_dataset, tokenize_sample, TokenizationConfig, TokenizeDropReason, TokenizerBundle,
    TruncationMode,
};
use kto_data::{Message, Sample, Text};
use serde_json::{json, Value};

const UNK: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;

/// Letters a..z are ids 3..=28; "ab" is 29 and "abc" 30 (merges "a b", "ab c"); whitespace separates words.
fn letter(c: char) -> u32 {
    3 + (c as u32 - 'a' as u32)
}
const AB: u32 = 29;
const ABC: u32 = 30;

fn tokenizer_json() -> Value {
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let mut vocab = serde_json::Map::new();
    for (token, id) in [
        ("<unk>", UNK),
        ("<s>", BOS),
        ("</s>", EOS),
        ("ab", AB),
        ("abc", ABC),
    ] {
        vocab.insert(token.into(), json!(id));
    }
    for c in 'a'..='z' {
        vocab.insert(c.to_string(), json!(letter(c)));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(UNK, "<unk>"), special(BOS, "<s>"), special(EOS, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": ["a b", "ab c"]
        }
    })
}

fn base_config() -> Value {
    json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
}

fn bundle_with(dir: &Path, config: Value) -> TokenizerBundle {
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    TokenizerBundle::from_dir(dir).unwrap()
}

fn bundle() -> (tempfile::TempDir, TokenizerBundle) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_with(dir.path(), base_config());
    (dir, bundle)
}

fn ids(words: &str) -> Vec<u32> {
    words
        .split_whitespace()
        .map(|w| letter(w.chars().next().unwrap()))
        .collect()
}

fn no_limits() -> TokenizationConfig {
    TokenizationConfig {
        max_length: None,
        ..Default::default()
    }
}

fn tokenize(
    bundle: &TokenizerBundle,
    sample: &Sample,
    config: &TokenizationConfig,
) -> (Vec<u32>, Vec<u32>) {
    let tokenized = tokenize_sample(bundle, sample, config).unwrap().unwrap();
    (tokenized.prompt_ids, tokenized.completion_ids)
}

#[test]
fn bos_from_the_post_processor_and_eos_appended_once() {
    let (_dir, bundle) = bundle();
    assert_eq!(
        (bundle.bos_id, bundle.eos_id, bundle.pad_id),
        (Some(BOS), EOS, EOS)
    );
    let (prompt, completion) = tokenize(&bundle, &Sample::new("x y", " z", true), &no_limits());
    assert_eq!(prompt, [vec![BOS], ids("x y")].concat());
    assert_eq!(completion, [ids("z"), vec![EOS]].concat());
    // A completion already ending with the EOS text gets no second one.
    let (_, completion) = tokenize(&bundle, &Sample::new("x y", " z</s>", true), &no_limits());
    assert_eq!(completion, [ids("z"), vec![EOS]].concat());
}

#[test]
fn completion_starts_where_the_tokenizations_diverge() {
    let (_dir, bundle) = bundle();
    // tok("ab") = [<s>, ab] but tok("abc</s>") = [<s>, abc, </s>]: the common prefix is [<s>].
    let samples = [Sample::new("ab", "c", true), Sample::new("x", " y", false)];
    let (tokenized, report) = tokenize_dataset(&bundle, &samples, &no_limits()).unwrap();
    assert_eq!(tokenized[0].prompt_ids, vec![BOS]);
    assert_eq!(tokenized[0].completion_ids, vec![ABC, EOS]);
    assert_eq!(report.prompt_not_prefix, 1);
    assert!(!tokenized[1].label);
}

#[test]
fn max_length_drops_prompts_that_reach_it_and_cuts_batches() {
    let (_dir, bundle) = bundle();
    // Prompts of 3, 4 and 5 tokens (with BOS); max_length 4 drops the last two.
    let samples = [
        Sample::new("p q", " r s t", true),
        Sample::new("p q r", " s", false).with_pair(3),
        Sample::new("p q r s", " t", true),
    ];
    let config = TokenizationConfig {
        max_length: Some(4),
        ..Default::default()
    };
    let (tokenized, report) = tokenize_dataset(&bundle, &samples, &config).unwrap();
    assert_eq!(tokenized.len(), 1);
    assert_eq!(
        report.drops.get(TokenizeDropReason::PromptReachesMaxLength),
        2
    );
    assert_eq!(
        report.to_string(),
        "tokenized 3 samples, kept 1, dropped: 2 samples whose prompt alone reaches max_length"
    );
    // The kept sample is stored whole; the batch cuts prompt ++ completion to max_length from the right.
    assert_eq!(
        tokenized[0].completion_ids,
        [ids("r s t"), vec![EOS]].concat()
    );
    let batch = SequenceBatch::from_rows(
        [(
            tokenized[0].prompt_ids.as_slice(),
            tokenized[0].completion_ids.as_slice(),
        )],
        config.max_length,
        bundle.pad_id,
    );
    assert_eq!(batch.row(0), [vec![BOS], ids("p q r")].concat());
    assert_eq!(batch.completion(0), ids("r"));
}

#[test]
fn max_prompt_length_keep_end_keeps_the_bos() {
    let (_dir, bundle) = bundle();
    let sample = Sample::new("q r s t u", " v", true);
    let keep_end = TokenizationConfig {
        max_length: None,
        max_prompt_length: Some(3),
        ..Default::default()
    };
    assert_eq!(
        tokenize(&bundle, &sample, &keep_end).0,
        [vec![BOS], ids("t u")].concat()
    );
    let keep_start = TokenizationConfig {
        truncation_mode: TruncationMode::KeepStart,
        ..keep_end
    };
    assert_eq!(
        tokenize(&bundle, &sample, &keep_start).0,
        [vec![BOS], ids("q r")].concat()
    );
    // Shorter prompts are untouched.
    let loose = TokenizationConfig {
        max_prompt_length: Some(6),
        ..keep_end
    };
    assert_eq!(
        tokenize(&bundle, &sample, &loose).0,
        [vec![BOS], ids("q r s t u")].concat()
    );
}

#[test]
fn max_completion_length_keeps_the_start() {
    let (_dir, bundle) = bundle();
    let config = TokenizationConfig {
        max_length: None,
        max_completion_length: Some(2),
        ..Default::default()
    };
    let (_, completion) = tokenize(&bundle, &Sample::new("x", " a z c d", true), &config);
    assert_eq!(completion, ids("a z"));
}

#[test]
fn legacy_options_apply_before_the_max_length_drop() {
    let (_dir, bundle) = bundle();
    let samples = [Sample::new("q r s t u", " v", true)];
    let config = TokenizationConfig {
        max_length: Some(4),
        max_prompt_length: Some(3),
        max_completion_length: Some(1),
        truncation_mode: TruncationMode::KeepEnd,
    };
    let (tokenized, report) = tokenize_dataset(&bundle, &samples, &config).unwrap();
    assert_eq!(report.drops.total(), 0);
    assert_eq!(
        (report.prompts_truncated, report.completions_truncated),
        (1, 1)
    );
    assert_eq!(tokenized[0].prompt_ids, [vec![BOS], ids("t u")].concat());
    assert_eq!(tokenized[0].completion_ids, ids("v"));
    assert_eq!(
        "truncation_mode"
            .parse::<TruncationMode>()
            .unwrap_err()
            .to_string(),
        "unknown truncation_mode \"truncation_mode\": expected one of keep_end, keep_start"
    );
}

/// transformers 5.17 ignores these flags when tokenizer.json is there (checked with AutoTokenizer: `tok("x")` gives
/// `[<s>, x]` with add_bos_token false, and no EOS with add_eos_token true).
#[test]
fn add_bos_and_eos_flags_are_ignored_as_transformers_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config();
    config["add_bos_token"] = json!(false);
    let bundle = bundle_with(dir.path(), config.clone());
    assert_eq!(bundle.encode("x", true).unwrap(), vec![BOS, letter('x')]);
    config["add_bos_token"] = json!(true);
    config["add_eos_token"] = json!(true);
    let bundle = bundle_with(dir.path(), config);
    assert_eq!(bundle.encode("x", true).unwrap(), vec![BOS, letter('x')]);
}

#[test]
fn pad_token_and_special_token_objects() {
    let dir = tempfile::tempdir().unwrap();
    let config = json!({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": "<unk>"});
    let bundle = bundle_with(dir.path(), config);
    assert_eq!(bundle.pad_id, UNK);
    assert_eq!(bundle.special_tokens.bos_token.as_deref(), Some("<s>"));
}

#[test]
fn bad_tokenizer_configs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        tokenizer_json().to_string(),
    )
    .unwrap();
    for (config, expected) in [
        (json!({"bos_token": "<s>"}), "has no `eos_token`"),
        (
            json!({"eos_token": "<end>"}),
            "eos_token \"<end>\" is not in tokenizer.json's vocabulary",
        ),
        (json!({"eos_token": 5}), "`eos_token` must be a string"),
    ] {
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let error = format!("{:#}", TokenizerBundle::from_dir(dir.path()).unwrap_err());
        assert!(error.contains(expected), "{error}");
    }
}

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m.role }} {{ m.content.strip() }} {{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}";

#[test]
fn conversational_samples_use_the_chat_template_without_eos() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config();
    config["chat_template"] = json!(TEMPLATE);
    let bundle = bundle_with(dir.path(), config);
    let prompt = vec![Message::new("user", " x ")];
    let completion = vec![Message::new("assistant", "y")];
    assert_eq!(
        bundle.render_chat(&prompt, true).unwrap(),
        "<s>user x </s> assistant "
    );
    let sample = Sample {
        prompt: Text::Messages(prompt),
        completion: Text::Messages(completion),
        label: true,
        pair: None,
    };
    let (prompt_ids, completion_ids) = tokenize(&bundle, &sample, &no_limits());
    let role = |word: &str| word.chars().map(letter).collect::<Vec<_>>();
    // One BOS (from the template; apply_chat_template adds no special tokens), no EOS appended by TRL.
    assert_eq!(
        prompt_ids,
        [
            vec![BOS],
            role("user"),
            ids("x"),
            vec![EOS],
            role("assistant")
        ]
        .concat()
    );
    assert_eq!(completion_ids, [ids("y"), vec![EOS]].concat());
}

#[test]
fn chat_template_jinja_file_wins_and_missing_template_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }} {% endfor %}",
    )
    .unwrap();
    let mut config = base_config();
    config["chat_template"] = json!(TEMPLATE);
    let with_file = bundle_with(dir.path(), config);
    assert_eq!(
        with_file
            .render_chat(&[Message::new("user", "x")], false)
            .unwrap(),
        "x "
    );

    let (_dir, plain) = bundle();
    let sample = Sample {
        prompt: Text::Messages(vec![Message::new("user", "x")]),
        completion: Text::Messages(vec![Message::new("assistant", "y")]),
        label: true,
        pair: None,
    };
    let error = format!(
        "{:#}",
        tokenize_dataset(&plain, &[sample], &no_limits()).unwrap_err()
    );
    assert!(
        error.contains("sample 0") && error.contains("needs a chat_template"),
        "{error}"
    );
}
