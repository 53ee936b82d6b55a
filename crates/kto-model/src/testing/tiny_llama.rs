//! `assets/tiny-llama/`: the tiny random Llama ([`TinyModel`] with transformers' initialisation) plus a real
//! byte-level BPE tokenizer trained on HH-style conversations (`data/hh-sample`), so the whole pipeline (prepare,
//! train, eval, generate, export) can run end to end on a CPU in seconds. kto-cli's `make_tiny_llama` example is the
//! command line over [`write_tiny_llama`].
//!
//! Deterministic: the tokenizer training, the JSON files and the seeded weights are identical on every run.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::{TinyModel, WeightInit};
use crate::files::write_atomic;

const UNK: &str = "<unk>";
const BOS: &str = "<s>";
const EOS: &str = "</s>";
const BOS_ID: u32 = 1;
const EOS_ID: u32 = 2;
const VOCAB_SIZE: usize = 1024;
const WEIGHT_SEED: u64 = 1234;
const INITIALIZER_RANGE: f64 = 0.02;

/// HH-style chat template: turns rendered exactly as in the HH-RLHF data. It starts with `bos_token` because
/// TRL tokenizes rendered chats with `add_special_tokens=False`, so this is where a Llama chat gets its BOS.
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{% if message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}\
{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] }}\
{% else %}{{ raise_exception('Only user and assistant roles are supported, got: ' + message['role']) }}\
{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}";

/// The files [`write_tiny_llama`] writes, in writing order.
pub const FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "model.safetensors",
];

/// Trains the tokenizer on the `*.jsonl` files of `data_dir` and writes [`FILES`] into `out_dir` (created if
/// needed); returns the model written.
pub fn write_tiny_llama(data_dir: &Path, out_dir: &Path) -> Result<TinyModel> {
    let texts = read_hh_texts(data_dir)?;
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let tokenizer = train_tokenizer(&texts)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    ensure!(
        vocab_size == VOCAB_SIZE,
        "the BPE trainer stopped at {vocab_size} tokens, wanted {VOCAB_SIZE}"
    );
    let tokenizer_json = tokenizer.to_string(true).map_err(anyhow::Error::msg)?;
    write_atomic(&out_dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;

    let model = TinyModel {
        model_type: "llama",
        vocab_size,
        hidden_size: 128,
        intermediate_size: 344,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        tie_word_embeddings: false,
        max_position_embeddings: 512,
        init: WeightInit::Normal {
            std: INITIALIZER_RANGE,
        },
    };
    write_json(
        &out_dir.join("tokenizer_config.json"),
        &tokenizer_config_json(&model),
    )?;
    // config.json and model.safetensors.
    model.write(out_dir, WEIGHT_SEED, 1)?;
    // The safetensors writer creates its file 0600; these are shared assets.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let weights = out_dir.join("model.safetensors");
        fs::set_permissions(&weights, fs::Permissions::from_mode(0o644))
            .with_context(|| format!("chmod 644 {}", weights.display()))?;
    }

    verify_tokenizer(&out_dir.join("tokenizer.json"), &texts)?;
    Ok(model)
}

/// Every distinct conversation text (chosen and rejected) of the `*.jsonl` files, in file order.
fn read_hh_texts(data_dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<PathBuf> = fs::read_dir(data_dir)
        .with_context(|| format!("reading {}", data_dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|ext| ext == "jsonl"));
    files.sort();
    ensure!(
        !files.is_empty(),
        "no *.jsonl files in {}",
        data_dir.display()
    );

    let mut seen = HashSet::new();
    let mut texts = Vec::new();
    for file in &files {
        let reader = BufReader::new(
            fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
        );
        for (index, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", file.display()))?;
            let at = || format!("{}:{}", file.display(), index + 1);
            let row: Value =
                serde_json::from_str(&line).with_context(|| format!("{}: invalid JSON", at()))?;
            for key in ["chosen", "rejected"] {
                let Some(text) = row.get(key).and_then(Value::as_str) else {
                    bail!("{}: missing string key \"{key}\" (HH rows have \"chosen\" and \"rejected\")", at());
                };
                if seen.insert(text.to_string()) {
                    texts.push(text.to_string());
                }
            }
        }
    }
    Ok(texts)
}

/// A Llama-3-style byte-level BPE whose special tokens and BOS post-processor follow Llama 2 (`<unk>`, `<s>`, `</s>`).
fn train_tokenizer(texts: &[String]) -> Result<Tokenizer> {
    let special = |content: &str| AddedToken::from(content.to_string(), true);
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(VOCAB_SIZE)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![special(UNK), special(BOS), special(EOS)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let model = BPE::builder()
        .unk_token(UNK.to_string())
        .build()
        .map_err(anyhow::Error::msg)?;
    let mut tokenizer = Tokenizer::new(model);
    // No prefix space, so decode(encode(text)) == text.
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single(format!("{BOS}:0 $A:0"))
            .map_err(anyhow::Error::msg)?
            .try_pair(format!("{BOS}:0 $A:0 {BOS}:1 $B:1"))
            .map_err(anyhow::Error::msg)?
            .special_tokens(vec![(BOS, BOS_ID)])
            .build()?,
    ));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(anyhow::Error::msg)?;
    // Training registers the special tokens as added tokens; they must sit at ids 0, 1, 2.
    for (content, id) in [(UNK, 0), (BOS, BOS_ID), (EOS, EOS_ID)] {
        ensure!(
            tokenizer.token_to_id(content) == Some(id),
            "special token {content} is not at id {id}"
        );
    }
    Ok(tokenizer)
}

fn tokenizer_config_json(model: &TinyModel) -> Value {
    let added = |content: &str| {
        json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
               "single_word": false, "special": true})
    };
    json!({
        "added_tokens_decoder": {"0": added(UNK), "1": added(BOS), "2": added(EOS)},
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

/// Reloads the written tokenizer and checks what the rest of the project relies on.
fn verify_tokenizer(path: &Path, texts: &[String]) -> Result<()> {
    let tokenizer = Tokenizer::from_file(path).map_err(anyhow::Error::msg)?;
    for text in texts {
        let encoding = tokenizer
            .encode(text.as_str(), true)
            .map_err(anyhow::Error::msg)?;
        let ids = encoding.get_ids();
        ensure!(
            ids.first() == Some(&BOS_ID),
            "encoding does not start with BOS: {text:?}"
        );
        ensure!(
            !ids[1..].contains(&0),
            "a sample text produced <unk>: {text:?}"
        );
        let decoded = tokenizer.decode(ids, true).map_err(anyhow::Error::msg)?;
        ensure!(
            &decoded == text,
            "round trip failed:\n  in:  {text:?}\n  out: {decoded:?}"
        );
    }
    let with_eos = tokenizer
        .encode("Hello there.</s>", false)
        .map_err(anyhow::Error::msg)?;
    ensure!(
        with_eos.get_ids().last() == Some(&EOS_ID),
        "the text </s> does not encode to the EOS id"
    );
    let unseen = "Ünïcödé and emoji 🦀 still round-trip.";
    let encoding = tokenizer
        .encode(unseen, false)
        .map_err(anyhow::Error::msg)?;
    ensure!(
        tokenizer
            .decode(encoding.get_ids(), true)
            .map_err(anyhow::Error::msg)?
            == unseen,
        "byte fallback"
    );
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}
