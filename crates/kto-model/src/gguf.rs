//! GGUF checkpoints (llama.cpp's single-file format, llama architecture): the config from the metadata, the weights
//! dequantized once with candle's GGUF reader and renamed to the Hugging Face names, with llama.cpp's Q/K row
//! permutation undone so every tensor equals the one transformers' own GGUF loading produces.
//!
//! Errors name the file and the metadata key or tensor at fault.

use crate::config::{ModelConfig, ModelType, RopeScaling};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The GGUF architecture kto runs (`general.architecture`).
pub const ARCHITECTURE: &str = "llama";

/// An open GGUF file: its header (metadata and tensor directory), tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish()
    }
}

/// Whether `path` names a GGUF file (by its extension, as llama.cpp and transformers do).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl GgufFile {
    /// Reads the header of `path`; an architecture other than llama is an error here, before any tensor is read.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let content = match Content::read(&mut reader) {
            Ok(content) => content,
            Err(error) => {
                // candle's reader stops at an unknown tensor type without naming the tensor: find it.
                if let Some((tensor, code)) = header::unsupported_tensor_type(path) {
                    bail!(
                        "{}: tensor `{tensor}` has GGML type {code}, which candle's GGUF reader does not support \
                         (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q6_K, Q8_K)",
                        path.display()
                    );
                }
                return Err(anyhow!(error)).with_context(|| {
                    format!(
                        "{}: not a readable GGUF file (truncated or corrupt?)",
                        path.display()
                    )
                });
            }
        };
        let gguf = Self {
            path: path.to_path_buf(),
            content,
        };
        let architecture = gguf.string("general.architecture")?;
        if architecture != ARCHITECTURE {
            bail!(
                "{}: `general.architecture` is {architecture:?}; kto loads GGUF files of the {ARCHITECTURE:?} \
                 architecture only (convert other models from their Hugging Face safetensors folder)",
                path.display()
            );
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A metadata value that must be present.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: missing metadata key `{key}`", self.path.display()))
    }

    pub fn string(&self, key: &str) -> Result<&str> {
        self.require(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| self.bad_key(key, e))
    }

    /// An integer of any GGUF width.
    pub fn integer(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|value| value_to_u64(value).ok_or_else(|| self.bad_key(key, "not an integer")))
            .transpose()
    }

    fn required_integer(&self, key: &str) -> Result<usize> {
        self.integer(key)?
            .map(|v| v as usize)
            .ok_or_else(|| anyhow!("{}: missing metadata key `{key}`", self.path.display()))
    }

    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|value| match value {
                Value::F32(v) => Ok(*v as f64),
                Value::F64(v) => Ok(*v),
                other => value_to_u64(other)
                    .map(|v| v as f64)
                    .ok_or_else(|| self.bad_key(key, "not a number")),
            })
            .transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|value| value.to_bool().map_err(|e| self.bad_key(key, e)))
            .transpose()
    }

    /// An array metadata value (tokens, merges, scores, ...).
    pub fn array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        self.get(key)
            .map(|value| value.to_vec().map_err(|e| self.bad_key(key, e)))
            .transpose()
    }

    pub fn bad_key(&self, key: &str, error: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: metadata key `{key}`: {error}", self.path.display())
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The model config, as transformers' GGUF loading derives `LlamaConfig` from the `llama.*` keys.
    pub fn config(&self) -> Result<ModelConfig> {
        let key = |name: &str| format!("{ARCHITECTURE}.{name}");
        let hidden_size = self.required_integer(&key("embedding_length"))?;
        let num_attention_heads = self.required_integer(&key("attention.head_count"))?;
        let num_key_value_heads = self
            .integer(&key("attention.head_count_kv"))?
            .map_or(num_attention_heads, |v| v as usize);
        let head_dim = match self.integer(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => hidden_size / num_attention_heads.max(1),
        };
        let vocab_size = match self.integer(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => self
                .array("tokenizer.ggml.tokens")?
                .map(Vec::len)
                .or_else(|| self.tensor_shape("token_embd.weight").map(|s| s[0]))
                .ok_or_else(|| {
                    anyhow!(
                        "{}: missing metadata key `{}`",
                        self.path.display(),
                        key("vocab_size")
                    )
                })?,
        };
        let rope_scaling = match self.get(&key("rope.scaling.type")) {
            None => RopeScaling::Default,
            Some(_) => match self.string(&key("rope.scaling.type"))? {
                "none" => RopeScaling::Default,
                "linear" => RopeScaling::Linear {
                    factor: self.float(&key("rope.scaling.factor"))?.ok_or_else(|| {
                        anyhow!(
                            "{}: missing metadata key `{}`",
                            self.path.display(),
                            key("rope.scaling.factor")
                        )
                    })?,
                },
                other => bail!(
                    "{}: metadata key `{}` is {other:?}; kto supports \"none\" and \"linear\"",
                    self.path.display(),
                    key("rope.scaling.type")
                ),
            },
        };
        if self.has_tensor("rope_freqs.weight") {
            bail!(
                "{}: tensor `rope_freqs.weight` (Llama 3.1 frequency scaling stored as a tensor) is not supported",
                self.path.display()
            );
        }
        let token_id = |name: &str| -> Result<Option<u32>> {
            Ok(self
                .integer(&format!("tokenizer.ggml.{name}"))?
                .map(|v| v as u32))
        };
        let config = ModelConfig {
            model_type: ModelType::Llama,
            vocab_size,
            hidden_size,
            intermediate_size: self.required_integer(&key("feed_forward_length"))?,
            num_hidden_layers: self.required_integer(&key("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta: self.float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: self
                .float(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            max_position_embeddings: self.integer(&key("context_length"))?.unwrap_or(2048) as usize,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            qkv_bias: self.has_tensor("blk.0.attn_q.bias"),
            o_bias: self.has_tensor("blk.0.attn_output.bias"),
            mlp_bias: self.has_tensor("blk.0.ffn_up.bias"),
            sliding_window: None,
            bos_token_id: token_id("bos_token_id")?,
            eos_token_ids: token_id("eos_token_id")?.into_iter().collect(),
            pad_token_id: token_id("padding_token_id")?,
        };
        if config.qkv_bias != config.o_bias {
            // Llama's `attention_bias` puts a bias on q, k, v and o together.
            bail!(
                "{}: tensor `blk.0.attn_q.bias` {} but `blk.0.attn_output.bias` {}: not a llama layout",
                self.path.display(),
                if config.qkv_bias { "exists" } else { "is missing" },
                if config.o_bias { "exists" } else { "is missing" },
            );
        }
        Ok(config)
    }

    fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims().to_vec())
    }

    /// Every metadata key and value.
    pub fn metadata(&self) -> &std::collections::HashMap<String, Value> {
        &self.content.metadata
    }

    /// The names of the tensors in the file, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// One tensor as stored (GGUF name and layout), dequantized to f32 on the CPU.
    pub fn dequantized(&self, name: &str) -> Result<Tensor> {
        let file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        self.content
            .tensor(&mut BufReader::new(file), name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))
    }

    /// Every tensor dequantized to f32 on the CPU, under its Hugging Face name, q/k un-permuted. Names sorted.
    pub fn hf_tensors(&self, config: &ModelConfig) -> Result<Vec<(String, Tensor)>> {
        let file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let mut reader = BufReader::new(file);
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors = Vec::with_capacity(names.len());
        for name in names {
            let (hf_name, permute_heads) = hf_name(name, config).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{name}` has no counterpart in a Hugging Face Llama checkpoint",
                    self.path.display()
                )
            })?;
            let tensor = self
                .content
                .tensor(&mut reader, name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))?;
            let tensor = match permute_heads {
                Some(heads) => unpermute_rows(&tensor, heads)
                    .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?,
                None => tensor,
            };
            tensors.push((hf_name, tensor));
        }
        Ok(tensors)
    }

    /// The GGUF tensor stored for Hugging Face name `hf`, with the head count its rows are permuted by (q, k).
    fn gguf_source(&self, hf: &str, config: &ModelConfig) -> Option<(&str, Option<usize>)> {
        self.content.tensor_infos.keys().find_map(|name| {
            hf_name(name, config)
                .filter(|(h, _)| h == hf)
                .map(|(_, heads)| (name.as_str(), heads))
        })
    }

    /// Whether the file stores a tensor that becomes Hugging Face tensor `hf`.
    pub fn has_hf_tensor(&self, hf: &str, config: &ModelConfig) -> bool {
        self.gguf_source(hf, config).is_some()
    }

    /// Hugging Face tensor `hf` in the file's own block type on the CPU, q/k rows un-permuted (rows are whole
    /// blocks, so that moves bytes and changes no value).
    pub fn hf_quantized_tensor(&self, hf: &str, config: &ModelConfig) -> Result<QTensor> {
        let (name, heads) = self.gguf_source(hf, config).ok_or_else(|| {
            anyhow!(
                "{}: no tensor for `{hf}` (GGUF names: llama.cpp's convert_hf_to_gguf.py mapping)",
                self.path.display()
            )
        })?;
        let file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let blocks = self
            .content
            .tensor(&mut BufReader::new(file), name, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))?;
        match heads {
            Some(heads) => unpermute_block_rows(&blocks, heads)
                .with_context(|| format!("{}: tensor `{name}`", self.path.display())),
            None => Ok(blocks),
        }
    }

    /// Hugging Face tensor `hf` dequantized to f32 on the CPU, q/k rows un-permuted (one tensor of
    /// [`GgufFile::hf_tensors`], read alone).
    pub fn hf_tensor(&self, hf: &str, config: &ModelConfig) -> Result<Tensor> {
        self.hf_quantized_tensor(hf, config)?
            .dequantize(&Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor `{hf}`: {e}", self.path.display()))
    }
}

/// [`unpermute_rows`] on quantized rows: each row's bytes move whole.
fn unpermute_block_rows(blocks: &QTensor, heads: usize) -> Result<QTensor> {
    let rows = blocks.shape().dims()[0];
    // Where each output row comes from: the permutation applied to the row indices themselves.
    let order = unpermute_rows(
        &Tensor::arange(0u32, rows as u32, &Device::Cpu)?
            .to_dtype(candle_core::DType::F64)?
            .reshape((rows, 1))?,
        heads,
    )?
    .flatten_all()?
    .to_vec1::<f64>()?;
    let data = blocks.data()?;
    let row_bytes = data.len() / rows.max(1);
    let mut permuted = Vec::with_capacity(data.len());
    for source in order {
        let source = source as usize;
        permuted.extend_from_slice(&data[source * row_bytes..(source + 1) * row_bytes]);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(permuted),
        &Device::Cpu,
        blocks.dtype(),
    )?;
    Ok(QTensor::new(storage, blocks.shape().clone())?)
}

/// Tensors outside the decoder layers: (GGUF name, Hugging Face name), llama.cpp's `convert_hf_to_gguf.py` mapping.
const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// A decoder layer's modules: (GGUF name, Hugging Face name below `model.layers.N.`), the same mapping.
pub const LAYER_MODULES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The heads whose rows llama.cpp permutes in a GGUF module (`attn_q`: every head; `attn_k`: the key/value heads).
pub fn permuted_heads(gguf_module: &str, config: &ModelConfig) -> Option<usize> {
    match gguf_module {
        "attn_q" => Some(config.num_attention_heads),
        "attn_k" => Some(config.num_key_value_heads),
        _ => None,
    }
}

/// The Hugging Face name of a GGUF tensor, and the head count to un-permute its rows with (q and k only).
fn hf_name(name: &str, config: &ModelConfig) -> Option<(String, Option<usize>)> {
    if let Some((_, hf)) = GLOBAL_TENSORS.iter().find(|(gguf, _)| *gguf == name) {
        return Some((hf.to_string(), None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, hf_module) = LAYER_MODULES.iter().find(|(gguf, _)| *gguf == module)?;
    Some((
        format!("model.layers.{layer}.{hf_module}.{kind}"),
        permuted_heads(module, config),
    ))
}

/// The GGUF name of a Hugging Face Llama tensor (the inverse of the mapping kto reads with), and the heads to permute
/// its rows with (q and k only); `None` for a name llama.cpp's llama architecture has no tensor for.
pub fn gguf_name(hf_name: &str, config: &ModelConfig) -> Option<(String, Option<usize>)> {
    if let Some((gguf, _)) = GLOBAL_TENSORS.iter().find(|(_, hf)| *hf == hf_name) {
        return Some((gguf.to_string(), None));
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (gguf_module, _) = LAYER_MODULES.iter().find(|(_, hf)| *hf == module)?;
    Some((
        format!("blk.{layer}.{gguf_module}.{kind}"),
        permuted_heads(gguf_module, config),
    ))
}

/// llama.cpp's converter stores q/k rows per head as [all even rotary dims, all odd ones] (its RoPE pairs adjacent
/// values); transformers' rotate-half RoPE wants them [first half, second half]. This is transformers'
/// `reverse_permute_weights`: rows `(heads, 2, d/2)` read as `(heads, d/2, 2)`.
pub fn unpermute_rows(tensor: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        bail!("{rows} rows do not split into {heads} heads of even size");
    }
    let rest: usize = dims[1..].iter().product();
    Ok(tensor
        .reshape((heads, rows / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The inverse of [`unpermute_rows`]: what llama.cpp's converter does to q/k (used to write GGUF files in tests).
pub fn permute_rows(tensor: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    Ok(tensor
        .reshape((heads, 2, rows / heads / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

fn value_to_u64(value: &Value) -> Option<u64> {
    match value {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// A walk over the GGUF header (v2/v3) that only looks for the first tensor whose GGML type candle does not know,
/// so the error can name it.
mod header {
    use super::*;

    /// GGML type codes candle's reader accepts.
    const KNOWN_TYPES: &[u32] = &[0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

    pub fn unsupported_tensor_type(path: &Path) -> Option<(String, u32)> {
        let mut reader = BufReader::new(File::open(path).ok()?);
        let magic = read_u32(&mut reader)?;
        let version = read_u32(&mut reader)?;
        if magic != 0x4655_4747 || version < 2 {
            return None;
        }
        let tensors = read_u64(&mut reader)?;
        let entries = read_u64(&mut reader)?;
        for _ in 0..entries {
            skip_string(&mut reader)?;
            let kind = read_u32(&mut reader)?;
            skip_value(&mut reader, kind)?;
        }
        for _ in 0..tensors {
            let name = read_string(&mut reader)?;
            let dims = read_u32(&mut reader)?;
            reader.seek(SeekFrom::Current(8 * dims as i64)).ok()?;
            let code = read_u32(&mut reader)?;
            read_u64(&mut reader)?;
            if !KNOWN_TYPES.contains(&code) {
                return Some((name, code));
            }
        }
        None
    }

    fn read_u32(r: &mut impl Read) -> Option<u32> {
        let mut b = [0; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    fn read_u64(r: &mut impl Read) -> Option<u64> {
        let mut b = [0; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }

    fn read_string(r: &mut impl Read) -> Option<String> {
        let len = read_u64(r)?;
        let mut bytes = vec![0; usize::try_from(len).ok().filter(|&l| l < 1 << 20)?];
        r.read_exact(&mut bytes).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn skip_string<R: Read + Seek>(r: &mut R) -> Option<()> {
        let len = read_u64(r)?;
        r.seek(SeekFrom::Current(i64::try_from(len).ok()?)).ok()?;
        Some(())
    }

    fn skip_value<R: Read + Seek>(r: &mut R, kind: u32) -> Option<()> {
        let size: i64 = match kind {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => return skip_string(r),
            9 => {
                let inner = read_u32(r)?;
                let count = read_u64(r)?;
                for _ in 0..count {
                    skip_value(r, inner)?;
                }
                return Some(());
            }
            _ => return None,
        };
        r.seek(SeekFrom::Current(size)).ok()?;
        Some(())
    }
}
