//! Test helper: tiny random checkpoints in the Hugging Face layout (single file, sharded, or in a hub cache).

use crate::files::{pt_metadata, write_safetensors};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};

pub mod gguf;

/// The shape of a tiny model.
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
        }
    }
}

impl TinyModel {
    pub fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": "float32",
        })
    }

    /// Every weight with its Hugging Face name, random with a seeded generator, f32.
    pub fn random_weights(&self, seed: u64) -> Result<Vec<(String, Tensor)>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensor = |dims: &[usize], center: f32, spread: f32| -> Result<Tensor> {
            let n: usize = dims.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| center + spread * rng.random_range(-1.0f32..1.0))
                .collect();
            Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
        };
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let head_dim = h / self.num_attention_heads;
        let (q, kv) = (
            self.num_attention_heads * head_dim,
            self.num_key_value_heads * head_dim,
        );
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            tensor(&[v, h], 0.0, 1.0)?,
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let scale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
            out.push((
                format!("{p}.input_layernorm.weight"),
                tensor(&[h], 1.0, 0.2)?,
            ));
            out.push((
                format!("{p}.self_attn.q_proj.weight"),
                tensor(&[q, h], 0.0, scale(h))?,
            ));
            out.push((
                format!("{p}.self_attn.k_proj.weight"),
                tensor(&[kv, h], 0.0, scale(h))?,
            ));
            out.push((
                format!("{p}.self_attn.v_proj.weight"),
                tensor(&[kv, h], 0.0, scale(h))?,
            ));
            out.push((
                format!("{p}.self_attn.o_proj.weight"),
                tensor(&[h, q], 0.0, scale(q))?,
            ));
            if self.model_type == "qwen2" {
                out.push((
                    format!("{p}.self_attn.q_proj.bias"),
                    tensor(&[q], 0.0, 0.1)?,
                ));
                out.push((
                    format!("{p}.self_attn.k_proj.bias"),
                    tensor(&[kv], 0.0, 0.1)?,
                ));
                out.push((
                    format!("{p}.self_attn.v_proj.bias"),
                    tensor(&[kv], 0.0, 0.1)?,
                ));
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                tensor(&[h], 1.0, 0.2)?,
            ));
            out.push((
                format!("{p}.mlp.gate_proj.weight"),
                tensor(&[i, h], 0.0, scale(h))?,
            ));
            out.push((
                format!("{p}.mlp.up_proj.weight"),
                tensor(&[i, h], 0.0, scale(h))?,
            ));
            out.push((
                format!("{p}.mlp.down_proj.weight"),
                tensor(&[h, i], 0.0, scale(i))?,
            ));
        }
        out.push(("model.norm.weight".to_string(), tensor(&[h], 1.0, 0.2)?));
        if !self.tie_word_embeddings {
            out.push((
                "lm_head.weight".to_string(),
                tensor(&[v, h], 0.0, scale_of(h))?,
            ));
        }
        Ok(out)
    }

    /// Writes `config.json` and the weights into `dir`: one `model.safetensors`, or `shards` files with an index.
    pub fn write(&self, dir: &Path, seed: u64, shards: usize) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config_json())?,
        )?;
        let weights = self.random_weights(seed)?;
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

/// The TRL parity fixture of this checkout (`tests/fixtures/trl-kto-parity`: a tiny Llama, its initial adapter, the
/// data and TRL's numbers).
pub fn trl_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl-kto-parity")
}

/// `checkpoint` in f32 on the CPU with the fixture's initial (non-zero) adapter as the policy.
pub fn with_fixture_adapter(checkpoint: &crate::Checkpoint) -> Result<crate::LlamaModel> {
    let mut model = crate::LlamaModel::load(checkpoint, candle_core::DType::F32, &Device::Cpu)?;
    let adapter = crate::peft::load_adapter(
        &trl_fixture().join("adapter_init"),
        model.config(),
        &Device::Cpu,
    )?;
    model.set_policy_adapter(Some(adapter))?;
    Ok(model)
}
