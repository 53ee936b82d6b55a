//! Builds `assets/tiny-llama/`: a tiny, randomly initialised Llama checkpoint in the Hugging Face layout with a
//! real byte-level BPE tokenizer trained on `data/hh-sample`, so the whole pipeline (prepare, train, eval,
//! generate, export) can run end to end on a CPU in seconds.
//!
//! Deterministic: the tokenizer training, the JSON files and the seeded weights are identical on every run.
//!
//! ```text
//! cargo run -p kto-cli --example make_tiny_llama [-- --data-dir data/hh-sample --out-dir assets/tiny-llama]
//! ```

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

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

/// The architecture of the tiny model.
struct Architecture {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    max_position_embeddings: usize,
}

impl Architecture {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn config_json(&self) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "dtype": "float32",
            "torch_dtype": "float32",
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": INITIALIZER_RANGE,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            // Both spellings: transformers 5 reads `rope_parameters`, older readers `rope_theta`.
            "rope_theta": 10000.0,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": false,
            "use_cache": true,
            "vocab_size": self.vocab_size,
        })
    }

    /// Every tensor with its HF name and shape (`[out, in]` for linears), in module order.
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>, Init)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q_out = self.num_attention_heads * self.head_dim();
        let kv_out = self.num_key_value_heads * self.head_dim();
        let mut tensors = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
            Init::Normal,
        )];
        for layer in 0..self.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            tensors.extend([
                (
                    format!("{p}.self_attn.q_proj.weight"),
                    vec![q_out, h],
                    Init::Normal,
                ),
                (
                    format!("{p}.self_attn.k_proj.weight"),
                    vec![kv_out, h],
                    Init::Normal,
                ),
                (
                    format!("{p}.self_attn.v_proj.weight"),
                    vec![kv_out, h],
                    Init::Normal,
                ),
                (
                    format!("{p}.self_attn.o_proj.weight"),
                    vec![h, q_out],
                    Init::Normal,
                ),
                (
                    format!("{p}.mlp.gate_proj.weight"),
                    vec![i, h],
                    Init::Normal,
                ),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h], Init::Normal),
                (
                    format!("{p}.mlp.down_proj.weight"),
                    vec![h, i],
                    Init::Normal,
                ),
                (format!("{p}.input_layernorm.weight"), vec![h], Init::Ones),
                (
                    format!("{p}.post_attention_layernorm.weight"),
                    vec![h],
                    Init::Ones,
                ),
            ]);
        }
        tensors.push(("model.norm.weight".to_string(), vec![h], Init::Ones));
        tensors.push((
            "lm_head.weight".to_string(),
            vec![self.vocab_size, h],
            Init::Normal,
        ));
        tensors
    }
}

/// How transformers' `_init_weights` fills a tensor: linears and embeddings N(0, 0.02), RMSNorm weights 1.
#[derive(Clone, Copy)]
enum Init {
    Normal,
    Ones,
}

#[derive(Parser)]
#[command(
    about = "Build assets/tiny-llama: BPE tokenizer trained on the HH sample + random tiny Llama"
)]
struct Args {
    /// Folder with the HH-style `*.jsonl` files the tokenizer is trained on.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/hh-sample"))]
    data_dir: PathBuf,
    /// Output folder.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/tiny-llama"))]
    out_dir: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let texts = read_hh_texts(&args.data_dir)?;
    fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;

    let tokenizer = train_tokenizer(&texts)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    ensure!(
        vocab_size == VOCAB_SIZE,
        "the BPE trainer stopped at {vocab_size} tokens, wanted {VOCAB_SIZE}"
    );
    let tokenizer_json = tokenizer.to_string(true).map_err(anyhow::Error::msg)?;
    write_atomically(
        &args.out_dir.join("tokenizer.json"),
        tokenizer_json.as_bytes(),
    )?;

    let architecture = Architecture {
        vocab_size,
        hidden_size: 128,
        intermediate_size: 344,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 512,
    };
    write_json(
        &args.out_dir.join("tokenizer_config.json"),
        &tokenizer_config_json(&architecture),
    )?;
    write_json(
        &args.out_dir.join("config.json"),
        &architecture.config_json(),
    )?;
    write_atomically(
        &args.out_dir.join("model.safetensors"),
        &random_weights(&architecture)?,
    )?;

    verify_tokenizer(&args.out_dir.join("tokenizer.json"), &texts)?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "model.safetensors",
    ] {
        let path = args.out_dir.join(name);
        let size = fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        println!("{:>10} bytes  {}", size, path.display());
    }
    println!(
        "vocab {vocab_size}, {} parameters",
        parameter_count(&architecture)
    );
    Ok(())
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

fn tokenizer_config_json(architecture: &Architecture) -> Value {
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
        "model_max_length": architecture.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

/// Seeded f32 weights initialised as transformers does, serialised as safetensors with HF names.
fn random_weights(architecture: &Architecture) -> Result<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(WEIGHT_SEED);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = architecture
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape, init)| {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = match init {
                Init::Normal => (0..count)
                    .map(|_| standard_normal(&mut rng) * INITIALIZER_RANGE as f32)
                    .collect(),
                Init::Ones => vec![1.0; count],
            };
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    Ok(safetensors::serialize(views, metadata)?)
}

/// Box-Muller on the seeded generator: portable, no extra dependency.
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1], so ln is finite
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn parameter_count(architecture: &Architecture) -> usize {
    architecture
        .tensor_shapes()
        .iter()
        .map(|(_, shape, _)| shape.iter().product::<usize>())
        .sum()
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
    write_atomically(path, text.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("output path has no parent folder")?;
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("temp file in {}", dir.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    // Temp files are created 0600; these are shared assets.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))?;
    }
    file.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
