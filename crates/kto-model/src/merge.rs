//! Merging a LoRA adapter into its base weights and writing a standalone Hugging Face checkpoint folder (also the
//! plain conversion of a GGUF checkpoint, without an adapter), or a llama-architecture GGUF file as llama.cpp's
//! converter writes one.

use crate::base_weights::Quantization;
use crate::config::{ModelConfig, RopeScaling};
use crate::device::torch_dtype_name;
use crate::files::{pt_metadata, write_safetensors};
use crate::gguf::{gguf_name, permute_rows, ARCHITECTURE};
use crate::gguf_vocab::tokenizer_metadata;
use crate::gguf_write::{quantize, write_file, GgufDType, QUANTIZATION_VERSION};
use crate::lora::{LoraAdapter, LoraTarget};
use crate::lora_gguf::{check_llama_architecture, gguf_general_name};
use crate::model_files::{ModelFiles, CONFIG_FILE, SINGLE_WEIGHTS_FILE};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// `W + scale · B A` for every adapted linear of `checkpoint`, written with its config and tokenizer files to
/// `out_dir` (which must not exist or be empty). `W` is the base as `quantization` held it in training (a type
/// quantized at load: the dequantized blocks, not the file's values). `dtype` converts every weight; `None` keeps
/// the stored dtypes. The folder is assembled under a temporary name and renamed into place, so a failure leaves
/// nothing behind.
pub fn merge_to_checkpoint(
    checkpoint: &ModelFiles,
    quantization: Quantization,
    adapter: &LoraAdapter,
    out_dir: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    write_checkpoint(checkpoint, quantization, Some(adapter), out_dir, dtype)
}

/// `checkpoint` (its values as `quantization` holds them) as a Hugging Face folder at `out_dir` (`kto convert` of a
/// GGUF file), written as atomically as [`merge_to_checkpoint`] writes.
pub fn convert_to_checkpoint(
    checkpoint: &ModelFiles,
    quantization: Quantization,
    out_dir: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    write_checkpoint(checkpoint, quantization, None, out_dir, dtype)
}

fn write_checkpoint(
    checkpoint: &ModelFiles,
    quantization: Quantization,
    adapter: Option<&LoraAdapter>,
    out_dir: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    if out_dir.exists() {
        let empty = std::fs::read_dir(out_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            bail!("{} already exists and is not empty", out_dir.display());
        }
    }
    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    kto_data::atomic::write_dir(out_dir, |tmp| {
        write_merged(checkpoint, quantization, adapter, tmp, dtype)
    })
}

fn write_merged(
    checkpoint: &ModelFiles,
    quantization: Quantization,
    adapter: Option<&LoraAdapter>,
    dir: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    let tensors = merged_weights(checkpoint, quantization, adapter, dtype)?;
    write_safetensors(&dir.join(SINGLE_WEIGHTS_FILE), &tensors, pt_metadata())?;

    let mut config = checkpoint.hf_config_json()?;
    if let (Some(dtype), Some(map)) = (dtype, config.as_object_mut()) {
        let key = if map.contains_key("torch_dtype") {
            "torch_dtype"
        } else {
            "dtype"
        };
        map.insert(key.to_string(), torch_dtype_name(dtype).into());
    }
    std::fs::write(
        dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)?,
    )?;
    checkpoint.write_tokenizer_files(dir)
}

/// Every weight of `checkpoint` under its Hugging Face name, sorted, with its values as `quantization` holds them
/// in training and `W + scale · B A` for each linear the adapter adapts (computed in f32), converted to `dtype`
/// (`None`: each weight's stored dtype).
fn merged_weights(
    checkpoint: &ModelFiles,
    quantization: Quantization,
    adapter: Option<&LoraAdapter>,
    dtype: Option<DType>,
) -> Result<Vec<(String, Tensor)>> {
    let scale = adapter.map_or(0.0, |a| a.config().scale());
    let mut merged_sites = 0;
    let mut tensors = Vec::new();
    for (name, stored) in checkpoint.tensors()? {
        let out_dtype = dtype.unwrap_or(stored.dtype());
        let stored = quantization.values_as_held(checkpoint, &name, stored)?;
        let pair = adapter.and_then(|adapter| {
            adapted_site(&name).and_then(|site| adapter.pair(site).map(|p| (site, p)))
        });
        let tensor = match pair {
            Some((site, pair)) => {
                let delta = pair
                    .b
                    .as_tensor()
                    .to_device(&Device::Cpu)?
                    .matmul(&pair.a.as_tensor().to_device(&Device::Cpu)?)?;
                if delta.dims() != stored.dims() {
                    bail!(
                        "adapter for {name} (layer {}) has shape {:?}, the weight {:?}",
                        site.0,
                        delta.dims(),
                        stored.dims()
                    );
                }
                merged_sites += 1;
                (stored.to_dtype(DType::F32)? + (delta * scale)?)?.to_dtype(out_dtype)?
            }
            None => stored.to_dtype(out_dtype)?,
        };
        tensors.push((name, tensor));
    }
    let expected = adapter.map_or(0, |a| a.sites().count());
    if merged_sites != expected {
        bail!("merged {merged_sites} of the adapter's {expected} linears: the checkpoint lacks some adapted weights");
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// `checkpoint` with `adapter` merged in (or alone), written to the file `out` as a llama-architecture GGUF the way
/// llama.cpp's `convert_hf_to_gguf.py` writes one: `llama.*` hyperparameters, GGUF tensor names, q/k rows permuted,
/// matrices in `dtype` (`None`: its `--outtype auto`, bf16 for a bf16 checkpoint, else f16), norms in f32, and the
/// tokenizer and chat template as `tokenizer.*` metadata. The base's values are those `quantization` holds in
/// training, as for [`merge_to_checkpoint`]. Written under a temporary name and renamed into place.
pub fn merge_to_gguf(
    checkpoint: &ModelFiles,
    quantization: Quantization,
    adapter: Option<&LoraAdapter>,
    out: &Path,
    dtype: Option<GgufDType>,
) -> Result<()> {
    let config = &checkpoint.config;
    check_llama_architecture(config)?;
    if let RopeScaling::Llama3 { .. } = config.rope_scaling {
        bail!(
            "{}: Llama 3.1 rope scaling (llama.cpp stores it as a `rope_freqs.weight` tensor) is not written to GGUF \
             by kto yet",
            checkpoint.source().display()
        );
    }
    let tensors = merged_weights(checkpoint, quantization, adapter, None)?;
    let dtype = dtype.unwrap_or_else(|| {
        let first_matrix = tensors.iter().find(|(_, t)| t.rank() == 2);
        GgufDType::auto(first_matrix.map_or(DType::F32, |(_, t)| t.dtype()))
    });
    let hf_config = checkpoint.hf_config_json()?;
    let name = gguf_general_name(
        &out.file_stem()
            .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned()),
    );
    let mut metadata = model_metadata(config, &hf_config, &name, dtype);
    metadata.extend(tokenizer_metadata(checkpoint, config.vocab_size)?);
    let mut stored = Vec::with_capacity(tensors.len());
    for (hf_name, tensor) in tensors {
        let (name, heads) = gguf_name(&hf_name, config).ok_or_else(|| {
            anyhow!(
                "{}: tensor `{hf_name}` has no counterpart in llama.cpp's llama architecture",
                checkpoint.source().display()
            )
        })?;
        let tensor = match heads {
            Some(heads) => permute_rows(&tensor, heads)?,
            None => tensor,
        };
        stored.push((name.clone(), quantize(&name, &tensor, dtype)?));
    }
    write_file(out, &metadata, &stored)
}

/// The general and `llama.*` metadata `convert_hf_to_gguf.py` writes for a Llama model (`TextModel` and
/// `LlamaModel.set_gguf_parameters`), in its order.
fn model_metadata(
    config: &ModelConfig,
    hf_config: &serde_json::Value,
    name: &str,
    dtype: GgufDType,
) -> Vec<(String, Value)> {
    let count = |n: usize| Value::U32(n as u32);
    let key = |k: &str| format!("{ARCHITECTURE}.{k}");
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(ARCHITECTURE.into()),
        ),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        (key("block_count"), count(config.num_hidden_layers)),
        (key("context_length"), count(config.max_position_embeddings)),
        (key("embedding_length"), count(config.hidden_size)),
        (key("feed_forward_length"), count(config.intermediate_size)),
        (
            key("attention.head_count"),
            count(config.num_attention_heads),
        ),
        (
            key("attention.head_count_kv"),
            count(config.num_key_value_heads),
        ),
    ];
    if let RopeScaling::Linear { factor } = config.rope_scaling {
        metadata.push((key("rope.scaling.type"), Value::String("linear".into())));
        metadata.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    metadata.push((key("rope.freq_base"), Value::F32(config.rope_theta as f32)));
    metadata.push((
        key("attention.layer_norm_rms_epsilon"),
        Value::F32(config.rms_norm_eps as f32),
    ));
    // llama.cpp records the head size only where config.json states it.
    if !hf_config["head_dim"].is_null() {
        metadata.push((key("attention.key_length"), count(config.head_dim)));
        metadata.push((key("attention.value_length"), count(config.head_dim)));
    }
    metadata.push(("general.file_type".into(), Value::U32(dtype.file_type())));
    metadata.push((key("vocab_size"), count(config.vocab_size)));
    metadata.push((key("rope.dimension_count"), count(config.head_dim)));
    metadata.push((
        "general.quantization_version".into(),
        Value::U32(QUANTIZATION_VERSION),
    ));
    metadata
}

/// `model.layers.N.<block>.<module>.weight` → (N, target).
fn adapted_site(name: &str) -> Option<(usize, LoraTarget)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [block, module, "weight"] = parts[..] else {
        return None;
    };
    let target = LoraTarget::ALL
        .into_iter()
        .find(|t| t.module_name() == module && t.block() == block)?;
    Some((layer.parse().ok()?, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_adapted_weights() {
        assert_eq!(
            adapted_site("model.layers.3.mlp.down_proj.weight"),
            Some((3, LoraTarget::Down))
        );
        assert_eq!(
            adapted_site("model.layers.0.self_attn.q_proj.weight"),
            Some((0, LoraTarget::Q))
        );
        assert_eq!(adapted_site("model.layers.0.self_attn.q_proj.bias"), None);
        assert_eq!(adapted_site("model.layers.0.input_layernorm.weight"), None);
        assert_eq!(adapted_site("lm_head.weight"), None);
    }
}
