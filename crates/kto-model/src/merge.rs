//! Merging a LoRA adapter into its base weights and writing a standalone Hugging Face checkpoint folder (also the
//! plain conversion of a GGUF checkpoint, without an adapter).

use crate::device::torch_dtype_name;
use crate::files::{pt_metadata, write_safetensors};
use crate::lora::{LoraAdapter, LoraTarget};
use crate::model_files::{ModelFiles, CONFIG_FILE, SINGLE_WEIGHTS_FILE};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// `W + scale · B A` for every adapted linear of `checkpoint`, written with its config and tokenizer files to
/// `out_dir` (which must not exist or be empty). `dtype` converts every weight; `None` keeps the stored dtypes.
/// The folder is assembled under a temporary name and renamed into place, so a failure leaves nothing behind.
pub fn merge_to_checkpoint(
    checkpoint: &ModelFiles,
    adapter: &LoraAdapter,
    out_dir: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    write_checkpoint(checkpoint, Some(adapter), out_dir, dtype)
}

/// `checkpoint` as a Hugging Face folder at `out_dir` (`kto convert` of a GGUF file), written as atomically as
/// [`merge_to_checkpoint`] writes.
pub fn convert_to_checkpoint(
    checkpoint: &ModelFiles,
    out_dir: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    write_checkpoint(checkpoint, None, out_dir, dtype)
}

fn write_checkpoint(
    checkpoint: &ModelFiles,
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
    kto_data::atomic::write_dir(out_dir, |tmp| write_merged(checkpoint, adapter, tmp, dtype))
}

fn write_merged(
    checkpoint: &ModelFiles,
    adapter: Option<&LoraAdapter>,
    dir: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    let scale = adapter.map_or(0.0, |a| a.config().scale());
    let mut merged_sites = 0;
    let mut tensors = Vec::new();
    for (name, stored) in checkpoint.tensors()? {
        let out_dtype = dtype.unwrap_or(stored.dtype());
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
