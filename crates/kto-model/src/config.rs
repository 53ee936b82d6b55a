//! `config.json` of a Hugging Face Llama-family checkpoint → [`ModelConfig`].
//!
//! Two steps: serde reads the keys the model uses into `HfConfig` (every key optional, null as absent, a wrong type
//! an error naming the file, the key and what was expected), then `HfConfig::resolve` applies transformers' defaults
//! and derives what the architecture implies (Qwen2's q/k/v bias, Mistral's window). Reads both the transformers-5
//! layout (`rope_parameters`) and the older one (`rope_theta` + `rope_scaling`). Anything the model code does not
//! implement is an error naming the key and the allowed values, never silently ignored.

use anyhow::{bail, Context, Result};
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
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

    /// `origin` names the file in error messages: a value of the wrong type names its key (`rope_scaling.factor`)
    /// and what was expected, a value the model code does not implement names its key and the allowed values.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let raw: HfConfig =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(|e| {
                    let key = e.path().to_string();
                    let e = e.into_inner();
                    match e.classify() {
                        serde_json::error::Category::Data if key != "." => {
                            anyhow::anyhow!("{origin}: key `{key}`: {e}")
                        }
                        serde_json::error::Category::Data => anyhow::anyhow!("{origin}: {e}"),
                        _ => anyhow::Error::new(e).context(format!("{origin}: invalid JSON")),
                    }
                })?;
        raw.resolve()
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

/// `config.json` as transformers writes it, as far as this crate reads it: every key optional (absent or `null`
/// takes transformers' default, or is an error in [`HfConfig::resolve`] when there is none); unknown keys are
/// ignored. The keys and their spellings across the architectures:
/// - Llama (TinyLlama, SmolLM2, Llama 3): `attention_bias` (bias on q, k, v and o), `mlp_bias`, `pretraining_tp`,
///   `rope_scaling` with `rope_type` (or the older `type`) "linear" or "llama3"; `eos_token_id` a number or a list.
/// - Mistral: `sliding_window` (a number or null); no biases.
/// - Qwen2: bias on q, k, v whatever the config says; `use_sliding_window` must be false.
/// - transformers 5 writes `rope_parameters` (with `rope_theta` inside); older configs `rope_theta` and
///   `rope_scaling` at the top level. `rope_parameters` wins when both are there.
#[derive(Debug, Default, Deserialize)]
#[serde(default, expecting = "a JSON object at the top level")]
struct HfConfig {
    model_type: Option<String>,
    #[serde(deserialize_with = "count")]
    vocab_size: Option<usize>,
    #[serde(deserialize_with = "count")]
    hidden_size: Option<usize>,
    #[serde(deserialize_with = "count")]
    intermediate_size: Option<usize>,
    #[serde(deserialize_with = "count")]
    num_hidden_layers: Option<usize>,
    #[serde(deserialize_with = "count")]
    num_attention_heads: Option<usize>,
    /// Absent: as many as the attention heads (no GQA).
    #[serde(deserialize_with = "count")]
    num_key_value_heads: Option<usize>,
    /// Absent: `hidden_size / num_attention_heads`.
    #[serde(deserialize_with = "count")]
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    #[serde(deserialize_with = "count")]
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_parameters: Option<RopeTable>,
    rope_scaling: Option<RopeTable>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    #[serde(deserialize_with = "count")]
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    #[serde(deserialize_with = "count")]
    pretraining_tp: Option<usize>,
    quantization_config: Option<IgnoredAny>,
    #[serde(deserialize_with = "token_ids")]
    bos_token_id: Vec<u32>,
    #[serde(deserialize_with = "token_ids")]
    eos_token_id: Vec<u32>,
    #[serde(deserialize_with = "token_ids")]
    pad_token_id: Vec<u32>,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (older configs).
#[derive(Debug, Default, Deserialize)]
#[serde(default, expecting = "an object")]
struct RopeTable {
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// A non-negative integer, or null.
fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as usize))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    deserializer.deserialize_any(Count)
}

/// One token id, a list of them (`eos_token_id` may be either), or null.
fn token_ids<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
    struct Ids;
    impl<'de> Visitor<'de> for Ids {
        type Value = Vec<u32>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a token id or a list of token ids")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            u32::try_from(v)
                .map(|id| vec![id])
                .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(vec![])
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut ids = Vec::new();
            while let Some(id) = seq.next_element::<u32>()? {
                ids.push(id);
            }
            Ok(ids)
        }
    }
    deserializer.deserialize_any(Ids)
}

/// `value`, or an error naming the missing key.
fn required<T>(value: Option<T>, key: &str) -> Result<T> {
    value.with_context(|| format!("missing key `{key}`"))
}

impl HfConfig {
    /// Checks what the model code implements and applies transformers' defaults; errors name the key (without the
    /// file: the caller adds it).
    fn resolve(self) -> Result<ModelConfig> {
        let model_type = match self.model_type.as_deref() {
            Some("llama") => ModelType::Llama,
            Some("mistral") => ModelType::Mistral,
            Some("qwen2") => ModelType::Qwen2,
            Some(other) => bail!(
                "unsupported `model_type` \"{other}\" (allowed: {})",
                ModelType::ALLOWED
            ),
            None => bail!("missing key `model_type` (allowed: {})", ModelType::ALLOWED),
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("unsupported `hidden_act` \"{act}\" (allowed: silu)");
            }
        }
        if self.quantization_config.is_some() {
            bail!("unsupported key `quantization_config`: quantized checkpoints are not supported");
        }
        if let Some(tp) = self.pretraining_tp {
            if tp != 1 {
                bail!("unsupported `pretraining_tp` {tp} (allowed: 1)");
            }
        }
        let hidden_size = required(self.hidden_size, "hidden_size")?;
        let num_attention_heads = required(self.num_attention_heads, "num_attention_heads")?;
        if num_attention_heads == 0 {
            bail!("key `num_attention_heads` must be positive");
        }
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "key `num_key_value_heads` ({num_key_value_heads}) must divide `num_attention_heads` ({num_attention_heads})"
            );
        }
        let head_dim = self.head_dim.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("key `head_dim` must be a positive even number, got {head_dim}");
        }
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(2048);
        let (rope_theta, rope_scaling) = self.rope(max_position_embeddings)?;

        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match model_type {
            // Qwen2 hard-codes bias on q, k, v and none on o, whatever the config says.
            ModelType::Qwen2 => (true, false),
            ModelType::Llama => (attention_bias, attention_bias),
            ModelType::Mistral => (false, false),
        };
        let mlp_bias = match model_type {
            ModelType::Llama => self.mlp_bias.unwrap_or(false),
            _ => false,
        };
        let sliding_window = match model_type {
            ModelType::Mistral => self.sliding_window,
            ModelType::Qwen2 => {
                if self.use_sliding_window.unwrap_or(false) {
                    bail!("unsupported `use_sliding_window` true (allowed: false)");
                }
                None
            }
            ModelType::Llama => None,
        };

        Ok(ModelConfig {
            model_type,
            vocab_size: required(self.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: required(self.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(self.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: self.bos_token_id.first().copied(),
            eos_token_ids: self.eos_token_id,
            pad_token_id: self.pad_token_id.first().copied(),
        })
    }

    /// `rope_parameters` (transformers 5) takes precedence over `rope_theta` + `rope_scaling` (older configs).
    fn rope(&self, max_position_embeddings: usize) -> Result<(f64, RopeScaling)> {
        let (table_key, table) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(table), _) => ("rope_parameters", table),
            (None, Some(table)) => ("rope_scaling", table),
            (None, None) => ("rope_parameters", &RopeTable::default()),
        };
        let theta = table.rope_theta.or(self.rope_theta).unwrap_or(10_000.0);
        if theta <= 0.0 {
            bail!("key `rope_theta` must be positive, got {theta}");
        }
        if let Some(f) = table.partial_rotary_factor.or(self.partial_rotary_factor) {
            if f != 1.0 {
                bail!("unsupported `partial_rotary_factor` {f} (allowed: 1.0)");
            }
        }
        let (type_key, rope_type) = match (&table.rope_type, &table.legacy_type) {
            (Some(t), _) => ("rope_type", t.as_str()),
            (None, Some(t)) => ("type", t.as_str()),
            (None, None) => ("rope_type", "default"),
        };
        let factor = |value: Option<f64>, key: &str| {
            value.with_context(|| format!("missing key `{table_key}.{key}`"))
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: factor(table.factor, "factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: factor(table.factor, "factor")?,
                low_freq_factor: factor(table.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: factor(table.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: table
                    .original_max_position_embeddings
                    .unwrap_or(max_position_embeddings as f64),
            },
            other => bail!(
                "unsupported `{table_key}.{type_key}` \"{other}\" (allowed: default, linear, llama3)"
            ),
        };
        Ok((theta, scaling))
    }
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

    #[test]
    fn type_errors_name_the_key_and_what_was_expected() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("hidden_size", "64".into(), "key `hidden_size`: invalid type: string \"64\", expected a non-negative integer"),
            ("num_hidden_layers", (-1).into(), "key `num_hidden_layers`: invalid type: integer `-1`, expected a non-negative integer"),
            ("eos_token_id", serde_json::json!([2, "x"]), "key `eos_token_id[1]`"),
            ("eos_token_id", "x".into(), "expected a token id or a list of token ids"),
            ("rope_scaling", serde_json::json!({"rope_type": "linear", "factor": "2"}), "key `rope_scaling.factor`"),
            ("rope_scaling", "linear".into(), "key `rope_scaling`: invalid type: string \"linear\", expected an object"),
            ("tie_word_embeddings", 1.into(), "key `tie_word_embeddings`"),
        ];
        for (key, value, expected) in cases {
            let mut v = base();
            v[key] = value;
            let err = format!("{:#}", parse_value(&v).unwrap_err());
            assert!(err.starts_with("config.json: "), "{err}");
            assert!(err.contains(expected), "{key}: {err}");
        }
        let err = format!(
            "{:#}",
            parse_value(&serde_json::json!("llama")).unwrap_err()
        );
        assert!(
            err.contains("expected a JSON object at the top level"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            ModelConfig::from_json_str("{", "config.json").unwrap_err()
        );
        assert!(err.starts_with("config.json: invalid JSON"), "{err}");
    }

    #[test]
    fn null_is_absent_and_unknown_keys_are_ignored() {
        let mut v = base();
        for key in [
            "num_key_value_heads",
            "head_dim",
            "rope_scaling",
            "sliding_window",
            "pad_token_id",
        ] {
            v[key] = serde_json::Value::Null;
        }
        v["torch_dtype"] = "bfloat16".into();
        v["some_future_key"] = serde_json::json!({"nested": [1, 2]});
        let cfg = parse_value(&v).unwrap();
        assert_eq!((cfg.num_key_value_heads, cfg.head_dim), (4, 16));
        assert_eq!(cfg.pad_token_id, None);
        let mut v = base();
        v["eos_token_id"] = 7.into();
        assert_eq!(parse_value(&v).unwrap().eos_token_ids, vec![7]);
    }
}
