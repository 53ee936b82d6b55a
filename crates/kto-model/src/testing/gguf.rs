//! Test helper: GGUF files written the way llama.cpp's converter writes them (tensor names, Q/K row permutation,
//! `llama.*` and `tokenizer.ggml.*` metadata) from a tiny model's Hugging Face weights, with a byte-level BPE or a
//! SentencePiece vocabulary. Tests edit the metadata or the tensors before writing to make bad files.

use super::TinyModel;
use crate::gguf::permute_rows;
use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use std::path::Path;

/// Every tensor type kto reads, as named in the GGUF spec.
pub const QUANT_TYPES: &[(&str, GgmlDType)] = &[
    ("F32", GgmlDType::F32),
    ("F16", GgmlDType::F16),
    ("BF16", GgmlDType::BF16),
    ("Q4_0", GgmlDType::Q4_0),
    ("Q4_1", GgmlDType::Q4_1),
    ("Q5_0", GgmlDType::Q5_0),
    ("Q5_1", GgmlDType::Q5_1),
    ("Q8_0", GgmlDType::Q8_0),
    ("Q2_K", GgmlDType::Q2K),
    ("Q3_K", GgmlDType::Q3K),
    ("Q4_K", GgmlDType::Q4K),
    ("Q5_K", GgmlDType::Q5K),
    ("Q6_K", GgmlDType::Q6K),
];

/// The special tokens every test vocabulary starts with (ids 0, 1, 2), SmolLM2's.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A ChatML template like SmolLM2's.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
     message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A tokenizer as GGUF metadata.
#[derive(Debug, Clone)]
pub struct TestVocab {
    /// `tokenizer.ggml.model`: "gpt2" or "llama".
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub scores: Option<Vec<f32>>,
    pub merges: Option<Vec<String>>,
    pub add_bos: bool,
}

impl TestVocab {
    /// Byte-level BPE: the special tokens, the 256 byte symbols, then one token per merge (`"a b"` → `"ab"`).
    pub fn byte_level(pre: &str, merges: &[&str]) -> Self {
        let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        alphabet.sort_unstable();
        let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|t| t.to_string()).collect();
        tokens.extend(alphabet.iter().map(char::to_string));
        tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
        let mut token_types = vec![1; tokens.len()];
        token_types[..SPECIAL_TOKENS.len()].fill(3);
        Self {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types,
            scores: None,
            merges: Some(merges.iter().map(|m| m.to_string()).collect()),
            add_bos: false,
        }
    }

    /// SentencePiece: the special tokens, byte tokens `<0x00>`..`<0xFF>` (type 6), then `pieces` with descending
    /// scores (earlier pieces merge first).
    pub fn sentencepiece(pieces: &[&str]) -> Self {
        let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|t| t.to_string()).collect();
        let mut token_types = vec![3; SPECIAL_TOKENS.len()];
        let mut scores = vec![0.0; SPECIAL_TOKENS.len()];
        for byte in 0..=255u8 {
            tokens.push(format!("<0x{byte:02X}>"));
            token_types.push(6);
            scores.push(0.0);
        }
        for (rank, piece) in pieces.iter().enumerate() {
            tokens.push(piece.to_string());
            token_types.push(1);
            scores.push(-(rank as f32));
        }
        Self {
            model: "llama".into(),
            pre: None,
            tokens,
            token_types,
            scores: Some(scores),
            merges: None,
            add_bos: true,
        }
    }
}

/// The metadata llama.cpp writes for `tiny` (which must have `vocab.tokens.len()` as its vocabulary) and `vocab`.
pub fn gguf_metadata(tiny: &TinyModel, vocab: &TestVocab) -> Vec<(String, Value)> {
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("general.name".into(), Value::String("tiny".into())),
        (
            "llama.block_count".into(),
            Value::U32(tiny.num_hidden_layers as u32),
        ),
        (
            "llama.context_length".into(),
            Value::U32(tiny.max_position_embeddings as u32),
        ),
        (
            "llama.embedding_length".into(),
            Value::U32(tiny.hidden_size as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(tiny.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(tiny.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(tiny.num_key_value_heads as u32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        (
            "llama.vocab_size".into(),
            Value::U32(tiny.vocab_size as u32),
        ),
        (
            "tokenizer.ggml.model".into(),
            Value::String(vocab.model.clone()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(&vocab.tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.token_types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(vocab.add_bos),
        ),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ];
    if let Some(pre) = &vocab.pre {
        metadata.push(("tokenizer.ggml.pre".into(), Value::String(pre.clone())));
    }
    if let Some(merges) = &vocab.merges {
        metadata.push(("tokenizer.ggml.merges".into(), strings(merges)));
    }
    if let Some(scores) = &vocab.scores {
        metadata.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
        ));
    }
    metadata
}

/// The GGUF name of a Hugging Face tensor (llama.cpp's `convert_hf_to_gguf.py` mapping).
pub fn gguf_name(hf_name: &str) -> String {
    let name = hf_name
        .replace("model.embed_tokens", "token_embd")
        .replace("model.norm", "output_norm")
        .replace("lm_head", "output")
        .replace("model.layers.", "blk.");
    [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]
    .into_iter()
    .fold(name, |name, (hf, gguf)| name.replace(hf, gguf))
}

/// `weights` (HF names, f32) as llama.cpp stores them: GGUF names, q/k rows permuted, matrices in `quant`, vectors
/// (norms, biases) in f32.
pub fn gguf_tensors(
    tiny: &TinyModel,
    weights: &[(String, Tensor)],
    quant: GgmlDType,
) -> Result<Vec<(String, QTensor)>> {
    weights
        .iter()
        .map(|(name, tensor)| {
            let tensor = if name.contains("q_proj") {
                permute_rows(tensor, tiny.num_attention_heads)?
            } else if name.contains("k_proj") {
                permute_rows(tensor, tiny.num_key_value_heads)?
            } else {
                tensor.clone()
            };
            let dtype = if tensor.rank() == 2 {
                quant
            } else {
                GgmlDType::F32
            };
            let q =
                QTensor::quantize(&tensor, dtype).with_context(|| format!("quantizing {name}"))?;
            Ok((gguf_name(name), q))
        })
        .collect()
}

pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let mut file = std::fs::File::create(path)?;
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut file, &metadata, &tensors)?;
    Ok(())
}
