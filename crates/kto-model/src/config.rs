//! `config.json` of a Hugging Face Llama-family checkpoint → [`ModelConfig`].
//!
//! Reads both the transformers-5 layout (`rope_parameters`) and the older one (`rope_theta` + `rope_scaling`).
//! Anything the model code does not implement is an error naming the key, never silently ignored.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};
use std::path::Path;

/// Architectures this crate runs; they share one decoder and differ only in biases and attention windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Llama,
    Mistral,
    Qwen2,
}

impl ModelType {
    pub const ALLOWED: &'static str = "llama, mistral, qwen2";

    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
        }
    }
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (transformers' "linear").
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v (qwen2 always; llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate, up, down (llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Keys further back than this are masked (mistral's `sliding_window`).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// `origin` names the file in error messages.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).with_context(|| format!("{origin}: invalid JSON"))?;
        let Value::Object(map) = value else {
            bail!("{origin}: expected a JSON object at the top level");
        };
        parse(&Keys {
            map: &map,
            origin,
            prefix: "",
        })
        .map_err(|e| anyhow::anyhow!("{origin}: {e:#}"))
    }

    /// The `config.json` transformers 5.17 writes for this config (`kto convert` of a GGUF file). Only llama
    /// configs without Llama 3.1 rope scaling come from GGUF, but every variant is written faithfully.
    pub fn to_hf_json(&self) -> Value {
        let mut rope = serde_json::json!({ "rope_theta": self.rope_theta });
        match &self.rope_scaling {
            RopeScaling::Default => rope["rope_type"] = "default".into(),
            RopeScaling::Linear { factor } => {
                rope["rope_type"] = "linear".into();
                rope["factor"] = (*factor).into();
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope["rope_type"] = "llama3".into();
                rope["factor"] = (*factor).into();
                rope["low_freq_factor"] = (*low_freq_factor).into();
                rope["high_freq_factor"] = (*high_freq_factor).into();
                rope["original_max_position_embeddings"] =
                    (*original_max_position_embeddings).into();
            }
        }
        let architecture = match self.model_type {
            ModelType::Llama => "LlamaForCausalLM",
            ModelType::Mistral => "MistralForCausalLM",
            ModelType::Qwen2 => "Qwen2ForCausalLM",
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.into(),
        };
        serde_json::json!({
            "architectures": [architecture],
            "model_type": self.model_type.as_str(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": "float32",
        })
    }

    /// Rotary inverse frequencies, one per pair of head dimensions, as transformers computes them (f32).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| {
                // torch: 1 / base ** (arange(0, dim, 2).float() / dim), the exponent in f32
                let exponent = (i as f32) / (dim as f32);
                1.0 / (self.rope_theta as f32).powf(exponent)
            })
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => inv_freq,
            // transformers divides the frequencies (not the positions) by the factor.
            RopeScaling::Linear { factor } => {
                inv_freq.into_iter().map(|f| f / *factor as f32).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high, old_ctx) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let low_freq_wavelen = old_ctx / low;
                let high_freq_wavelen = old_ctx / high;
                inv_freq
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            f
                        };
                        // Between the two wavelengths (inclusive), as transformers' `~(w < high) * ~(w > low)`.
                        let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        if is_medium {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// A JSON object plus where it came from, for error messages that name the full key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    origin: &'a str,
    prefix: &'a str,
}

impl Keys<'_> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A present, non-null value.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).with_context(|| {
                format!(
                    "key `{}` must be a non-negative integer, got {v}",
                    self.name(key)
                )
            }),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .with_context(|| format!("missing key `{}`", self.name(key)))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .with_context(|| format!("key `{}` must be a number, got {v}", self.name(key))),
        }
    }

    fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?
            .with_context(|| format!("missing key `{}`", self.name(key)))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).with_context(|| {
                format!("key `{}` must be true or false, got {v}", self.name(key))
            }),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .with_context(|| format!("key `{}` must be a string, got {v}", self.name(key))),
        }
    }

    /// One id, or a list of ids (`eos_token_id` may be either).
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || {
            format!(
                "key `{}` must be a token id or a list of token ids",
                self.name(key)
            )
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).with_context(bad))
                .collect(),
            Some(v) => Ok(vec![v.as_u64().with_context(bad)? as u32]),
        }
    }
}

fn parse(keys: &Keys) -> Result<ModelConfig> {
    let model_type = match keys.str_opt("model_type")? {
        Some("llama") => ModelType::Llama,
        Some("mistral") => ModelType::Mistral,
        Some("qwen2") => ModelType::Qwen2,
        Some(other) => bail!(
            "unsupported `model_type` \"{other}\" (allowed: {})",
            ModelType::ALLOWED
        ),
        None => bail!("missing key `model_type` (allowed: {})", ModelType::ALLOWED),
    };
    if let Some(act) = keys.str_opt("hidden_act")? {
        if act != "silu" {
            bail!("unsupported `hidden_act` \"{act}\" (allowed: silu)");
        }
    }
    if keys.get("quantization_config").is_some() {
        bail!("unsupported key `quantization_config`: quantized checkpoints are not supported");
    }
    if let Some(tp) = keys.usize_opt("pretraining_tp")? {
        if tp != 1 {
            bail!("unsupported `pretraining_tp` {tp} (allowed: 1)");
        }
    }
    let hidden_size = keys.usize_req("hidden_size")?;
    let num_attention_heads = keys.usize_req("num_attention_heads")?;
    if num_attention_heads == 0 {
        bail!("key `num_attention_heads` must be positive");
    }
    let num_key_value_heads = keys
        .usize_opt("num_key_value_heads")?
        .unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        bail!(
            "key `num_key_value_heads` ({num_key_value_heads}) must divide `num_attention_heads` ({num_attention_heads})"
        );
    }
    let head_dim = keys
        .usize_opt("head_dim")?
        .unwrap_or(hidden_size / num_attention_heads);
    if head_dim == 0 || head_dim % 2 != 0 {
        bail!("key `head_dim` must be a positive even number, got {head_dim}");
    }
    let max_position_embeddings = keys.usize_opt("max_position_embeddings")?.unwrap_or(2048);
    let (rope_theta, rope_scaling) = parse_rope(keys, max_position_embeddings)?;

    let attention_bias = keys.bool_opt("attention_bias")?.unwrap_or(false);
    let (qkv_bias, o_bias) = match model_type {
        // Qwen2 hard-codes bias on q, k, v and none on o, whatever the config says.
        ModelType::Qwen2 => (true, false),
        ModelType::Llama => (attention_bias, attention_bias),
        ModelType::Mistral => (false, false),
    };
    let mlp_bias = match model_type {
        ModelType::Llama => keys.bool_opt("mlp_bias")?.unwrap_or(false),
        _ => false,
    };
    let sliding_window = match model_type {
        ModelType::Mistral => keys.usize_opt("sliding_window")?,
        ModelType::Qwen2 => {
            if keys.bool_opt("use_sliding_window")?.unwrap_or(false) {
                bail!("unsupported `use_sliding_window` true (allowed: false)");
            }
            None
        }
        ModelType::Llama => None,
    };

    Ok(ModelConfig {
        model_type,
        vocab_size: keys.usize_req("vocab_size")?,
        hidden_size,
        intermediate_size: keys.usize_req("intermediate_size")?,
        num_hidden_layers: keys.usize_req("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rope_theta,
        rope_scaling,
        rms_norm_eps: keys.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
        max_position_embeddings,
        tie_word_embeddings: keys.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        o_bias,
        mlp_bias,
        sliding_window,
        bos_token_id: keys.ids("bos_token_id")?.first().copied(),
        eos_token_ids: keys.ids("eos_token_id")?,
        pad_token_id: keys.ids("pad_token_id")?.first().copied(),
    })
}

/// `rope_parameters` (transformers 5) takes precedence over `rope_theta` + `rope_scaling` (older configs).
fn parse_rope(keys: &Keys, max_position_embeddings: usize) -> Result<(f64, RopeScaling)> {
    let (table_key, table) = match (keys.get("rope_parameters"), keys.get("rope_scaling")) {
        (Some(v), _) => ("rope_parameters", Some(v)),
        (None, Some(v)) => ("rope_scaling", Some(v)),
        (None, None) => ("rope_parameters", None),
    };
    let empty = Map::new();
    let map = match table {
        None => &empty,
        Some(Value::Object(map)) => map,
        Some(v) => bail!("key `{table_key}` must be an object, got {v}"),
    };
    let prefix = format!("{table_key}.");
    let rope = Keys {
        map,
        origin: keys.origin,
        prefix: &prefix,
    };
    let theta = match rope.f64_opt("rope_theta")? {
        Some(t) => t,
        None => keys.f64_opt("rope_theta")?.unwrap_or(10_000.0),
    };
    if theta <= 0.0 {
        bail!("key `rope_theta` must be positive, got {theta}");
    }
    if let Some(f) = rope
        .f64_opt("partial_rotary_factor")?
        .or(keys.f64_opt("partial_rotary_factor")?)
    {
        if f != 1.0 {
            bail!("unsupported `partial_rotary_factor` {f} (allowed: 1.0)");
        }
    }
    let (type_key, rope_type) = match (rope.str_opt("rope_type")?, rope.str_opt("type")?) {
        (Some(t), _) => ("rope_type", t),
        (None, Some(t)) => ("type", t),
        (None, None) => ("rope_type", "default"),
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: rope.f64_req("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: rope.f64_req("factor")?,
            low_freq_factor: rope.f64_req("low_freq_factor")?,
            high_freq_factor: rope.f64_req("high_freq_factor")?,
            original_max_position_embeddings: rope
                .f64_opt("original_max_position_embeddings")?
                .unwrap_or(max_position_embeddings as f64),
        },
        other => bail!(
            "unsupported `{table_key}.{type_key}` \"{other}\" (allowed: default, linear, llama3)"
        ),
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "eos_token_id": [2, 3], "bos_token_id": 1
        })
    }

    fn parse_value(v: &serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::from_json_str(&v.to_string(), "config.json")
    }

    #[test]
    fn fixture_config_reads_rope_parameters() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/trl-kto-parity/model/config.json");
        let cfg = ModelConfig::from_file(&path).unwrap();
        assert_eq!(cfg.model_type, ModelType::Llama);
        assert_eq!(
            (cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size),
            (16, 2, 128)
        );
        assert_eq!(cfg.rope_theta, 10_000.0);
        assert_eq!(cfg.rope_scaling, RopeScaling::Default);
        assert_eq!(cfg.eos_token_ids, vec![2]);
        assert!(!cfg.tie_word_embeddings);
    }

    #[test]
    fn defaults_and_eos_list() {
        let cfg = parse_value(&base()).unwrap();
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.eos_token_ids, vec![2, 3]);
        assert_eq!(cfg.bos_token_id, Some(1));
        assert_eq!(cfg.rope_theta, 10_000.0);
    }

    #[test]
    fn legacy_rope_scaling_llama3() {
        let mut v = base();
        v["rope_theta"] = 500000.0.into();
        v["head_dim"] = 128.into();
        v["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192
        });
        let cfg = parse_value(&v).unwrap();
        assert_eq!(cfg.rope_theta, 500000.0);
        let freqs = cfg.rope_inv_freq();
        assert_eq!(freqs.len(), 64);
        // High frequencies are untouched, the lowest ones are divided by the factor.
        assert_eq!(freqs[0], 1.0);
        let plain = 1.0 / 500000f32.powf(126.0 / 128.0);
        assert!((freqs[63] - plain / 8.0).abs() < 1e-12);
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let mut v = base();
        v["model_type"] = "qwen2".into();
        let cfg = parse_value(&v).unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("model_type", "gpt2".into(), "`model_type`"),
            ("hidden_act", "gelu".into(), "`hidden_act`"),
            ("num_key_value_heads", 3.into(), "`num_key_value_heads`"),
            ("hidden_size", "64".into(), "`hidden_size`"),
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "yarn", "factor": 2.0}),
                "`rope_parameters.rope_type`",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "llama3", "factor": 8.0}),
                "`rope_scaling.low_freq_factor`",
            ),
        ];
        for (key, value, expected) in cases {
            let mut v = base();
            v[key] = value;
            let err = format!("{:#}", parse_value(&v).unwrap_err());
            assert!(err.contains(expected), "{key}: {err}");
            assert!(err.starts_with("config.json:"), "{err}");
        }
        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        let err = format!("{:#}", parse_value(&v).unwrap_err());
        assert!(err.contains("missing key `vocab_size`"), "{err}");
    }
}
