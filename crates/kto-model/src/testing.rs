//! Tiny random checkpoints in the Hugging Face layout (single file, sharded, or in a hub cache): the tests' models
//! and the weights and config of `assets/tiny-llama` (kto-cli's `make_tiny_llama` example).

use crate::files::{pt_metadata, write_atomic, write_safetensors};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};

pub mod gguf;
pub mod tiny_llama;

/// A tiny random Llama-family checkpoint in the Hugging Face layout: the tests' models (the default, uniform
/// weights) and `assets/tiny-llama` (`examples/make_tiny_llama.rs` of kto-cli: transformers' initialisation).
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub model_type: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub init: WeightInit,
}

/// How [`TinyModel::random_weights`] fills the tensors from its seeded generator, tensor by tensor in module order
/// (embeddings; per layer input norm, q, k, v, o, q/k/v biases for qwen2, post-attention norm, gate, up, down; final
/// norm; LM head).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightInit {
    /// `center + spread · U(-1, 1)` for every tensor: embeddings 0 ± 1, norms 1 ± 0.2, linears 0 ± 1/√fan_in,
    /// biases 0 ± 0.1. Norms that are not all ones and large embeddings make differences between code paths show.
    Uniform,
    /// transformers' `_init_weights`: linears and embeddings N(0, std²) (Box-Muller), norms 1 and biases 0
    /// (drawing nothing).
    Normal { std: f64 },
}

/// What a tensor is, for its initialisation.
#[derive(Debug, Clone, Copy)]
enum Role {
    Embedding,
    Linear { fan_in: usize },
    Norm,
    Bias,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            model_type: "llama",
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            tie_word_embeddings: false,
            max_position_embeddings: 128,
            init: WeightInit::Uniform,
        }
    }
}

impl TinyModel {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// `config.json` as transformers 5 writes it for a Llama (BOS 1, EOS 2, rope_theta 1e4, RMSNorm eps 1e-5).
    pub fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": "float32",
            "torch_dtype": "float32",
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": match self.init {
                WeightInit::Normal { std } => std,
                WeightInit::Uniform => 0.02,
            },
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": false,
            "model_type": self.model_type,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            // Both spellings: transformers 5 reads `rope_parameters`, older readers `rope_theta`.
            "rope_theta": 10000.0,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": true,
            "vocab_size": self.vocab_size,
        })
    }

    /// Every tensor with its Hugging Face name and shape (`[out, in]` for linears), in module order.
    fn tensor_specs(&self) -> Vec<(String, Vec<usize>, Role)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim(),
            self.num_key_value_heads * self.head_dim(),
        );
        let linear = |fan_in| Role::Linear { fan_in };
        let mut specs = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![v, h],
            Role::Embedding,
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut layer = vec![
                ("input_layernorm.weight", vec![h], Role::Norm),
                ("self_attn.q_proj.weight", vec![q, h], linear(h)),
                ("self_attn.k_proj.weight", vec![kv, h], linear(h)),
                ("self_attn.v_proj.weight", vec![kv, h], linear(h)),
                ("self_attn.o_proj.weight", vec![h, q], linear(q)),
            ];
            if self.model_type == "qwen2" {
                layer.extend([
                    ("self_attn.q_proj.bias", vec![q], Role::Bias),
                    ("self_attn.k_proj.bias", vec![kv], Role::Bias),
                    ("self_attn.v_proj.bias", vec![kv], Role::Bias),
                ]);
            }
            layer.extend([
                ("post_attention_layernorm.weight", vec![h], Role::Norm),
                ("mlp.gate_proj.weight", vec![i, h], linear(h)),
                ("mlp.up_proj.weight", vec![i, h], linear(h)),
                ("mlp.down_proj.weight", vec![h, i], linear(i)),
            ]);
            specs.extend(
                layer
                    .into_iter()
                    .map(|(name, shape, role)| (format!("{p}.{name}"), shape, role)),
            );
        }
        specs.push(("model.norm.weight".to_string(), vec![h], Role::Norm));
        if !self.tie_word_embeddings {
            specs.push(("lm_head.weight".to_string(), vec![v, h], linear(h)));
        }
        specs
    }

    /// The number of weights.
    pub fn parameter_count(&self) -> usize {
        self.tensor_specs()
            .iter()
            .map(|(_, shape, _)| shape.iter().product::<usize>())
            .sum()
    }

    /// Every weight with its Hugging Face name, random with a seeded generator ([`WeightInit`]), f32.
    pub fn random_weights(&self, seed: u64) -> Result<Vec<(String, Tensor)>> {
        let mut rng = StdRng::seed_from_u64(seed);
        self.tensor_specs()
            .into_iter()
            .map(|(name, shape, role)| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match self.init {
                    WeightInit::Uniform => {
                        let (center, spread) = match role {
                            Role::Embedding => (0.0, 1.0),
                            Role::Linear { fan_in } => (0.0, scale_of(fan_in)),
                            Role::Norm => (1.0, 0.2),
                            Role::Bias => (0.0, 0.1),
                        };
                        (0..n)
                            .map(|_| center + spread * rng.random_range(-1.0f32..1.0))
                            .collect()
                    }
                    WeightInit::Normal { std } => match role {
                        Role::Embedding | Role::Linear { .. } => (0..n)
                            .map(|_| standard_normal(&mut rng) * std as f32)
                            .collect(),
                        Role::Norm => vec![1.0; n],
                        Role::Bias => vec![0.0; n],
                    },
                };
                Ok((name, Tensor::from_vec(data, shape, &Device::Cpu)?))
            })
            .collect()
    }

    /// Writes `config.json` and the weights into `dir`: one `model.safetensors`, or `shards` files with an index.
    pub fn write(&self, dir: &Path, seed: u64, shards: usize) -> Result<()> {
        self.write_weights(dir, &self.random_weights(seed)?, shards)
    }

    /// Writes `config.json` and `weights` (this model's tensors, e.g. [`dequantized_twin`]s of its random ones)
    /// into `dir`, as [`TinyModel::write`] does.
    pub fn write_weights(
        &self,
        dir: &Path,
        weights: &[(String, Tensor)],
        shards: usize,
    ) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut config = serde_json::to_string_pretty(&self.config_json())?;
        config.push('\n');
        write_atomic(&dir.join("config.json"), config.as_bytes())?;
        let weights = weights.to_vec();
        if shards <= 1 {
            return write_safetensors(&dir.join("model.safetensors"), &weights, pt_metadata());
        }
        let per_shard = weights.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        for (index, chunk) in weights.chunks(per_shard).enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", index + 1, shards);
            for (tensor, _) in chunk {
                weight_map.insert(tensor.clone(), json!(name));
            }
            write_safetensors(&dir.join(&name), chunk, pt_metadata())?;
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?,
        )?;
        Ok(())
    }

    /// Writes the model into a hub cache at `cache_dir` as `repo_id` (`models--org--name/refs/main`,
    /// `snapshots/<commit>/`), returning the snapshot folder.
    pub fn write_to_hub_cache(
        &self,
        cache_dir: &Path,
        repo_id: &str,
        seed: u64,
    ) -> Result<PathBuf> {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache_dir.join(format!("models--{}", repo_id.replace('/', "--")));
        std::fs::create_dir_all(repo.join("refs"))?;
        std::fs::write(repo.join("refs/main"), commit)?;
        let snapshot = repo.join("snapshots").join(commit);
        self.write(&snapshot, seed, 1)?;
        Ok(snapshot)
    }
}

fn scale_of(fan_in: usize) -> f32 {
    1.0 / (fan_in as f32).sqrt()
}

/// N(0, 1) by Box-Muller on the seeded generator: portable, no extra dependency.
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1], so ln is finite
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// `checkpoint` in f32 on the CPU with the fixture's initial (non-zero) adapter as the policy.
pub fn with_fixture_adapter(checkpoint: &crate::ModelFiles) -> Result<crate::LlamaModel> {
    let mut model = crate::LlamaModel::load(checkpoint, candle_core::DType::F32, &Device::Cpu)?;
    let adapter = crate::peft::load_adapter(
        &kto_data::testing::trl_fixture().join("adapter_init"),
        model.config(),
        &Device::Cpu,
    )?;
    model.set_policy_adapter(Some(adapter))?;
    Ok(model)
}

/// `weights` with every matrix (2-D tensor) quantized to `block_type` and dequantized back, vectors as they are:
/// the dense twin of a base that `[model] quantize` holds in `block_type`.
pub fn dequantized_twin(
    weights: &[(String, Tensor)],
    block_type: candle_core::quantized::GgmlDType,
) -> Result<Vec<(String, Tensor)>> {
    weights
        .iter()
        .map(|(name, tensor)| {
            let tensor = if tensor.rank() == 2 {
                candle_core::quantized::QTensor::quantize(tensor, block_type)?
                    .dequantize(&Device::Cpu)?
            } else {
                tensor.clone()
            };
            Ok((name.clone(), tensor))
        })
        .collect()
}

/// An adapter on every linear of `model` with seeded random A and B (normal, std 0.1; B non-zero, unlike a fresh
/// PEFT init, so that it changes the model), r = 8, alpha = 16: what GGUF export tests write and read back.
pub fn random_adapter(
    model: &crate::ModelConfig,
    use_rslora: bool,
    seed: u64,
) -> Result<crate::LoraAdapter> {
    use crate::lora::{LoraConfig, LoraTarget};
    let r = 8;
    let config = LoraConfig::new(r, 16.0, 0.0, use_rslora, &LoraTarget::ALL)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut randn = |rows: usize, cols: usize| -> Result<Tensor> {
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| 0.1 * standard_normal(&mut rng))
            .collect();
        Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)
    };
    let mut pairs = std::collections::BTreeMap::new();
    for layer in 0..model.num_hidden_layers {
        for target in LoraTarget::ALL {
            let (fan_in, fan_out) = target.shape(model);
            pairs.insert((layer, target), (randn(r, fan_in)?, randn(fan_out, r)?));
        }
    }
    crate::LoraAdapter::from_pairs(config, model, pairs, &Device::Cpu)
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (93 MB, not in the repository: `scripts/get-smollm2.sh` puts it in
/// ~/.cache/kto/), or `None` with a skip line when it is absent. `KTO_SMOLLM2_GGUF` naming no file fails the test
/// instead: a test asked for must not pass by skipping.
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KTO_SMOLLM2_GGUF") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "KTO_SMOLLM2_GGUF={} is not a file (run scripts/get-smollm2.sh)",
            path.display()
        );
        return Some(path);
    }
    let path = PathBuf::from(std::env::var_os("HOME")?)
        .join(".cache/kto")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        println!(
            "skipped: {} not found (run scripts/get-smollm2.sh)",
            path.display()
        );
        None
    }
}
