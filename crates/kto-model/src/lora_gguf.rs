//! LoRA adapters in llama.cpp's GGUF adapter format, as its `convert_lora_to_gguf.py` writes them from a PEFT
//! folder (`llama-cli --lora FILE` applies them), and read back (`[lora] init_adapter = "x.gguf"`).
//!
//! The file: `general.architecture = llama`, `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`;
//! per adapted linear `blk.N.<module>.weight.lora_a` (PEFT's A, `[r, in]`) and `.lora_b` (PEFT's B, `[out, r]`), with
//! B's rows of `attn_q` / `attn_k` permuted as llama.cpp permutes the base weights' q/k rows, so `B·A` lines up with
//! the permuted base weight. llama.cpp scales by `alpha / r` and stores no dropout, no rsLoRA flag and no targets: the
//! targets come back from the tensor names, the dropout as 0.

use crate::config::{ModelConfig, ModelType};
use crate::gguf::{
    permute_rows, permuted_heads, unpermute_rows, GgufFile, ARCHITECTURE, LAYER_MODULES,
};
use crate::gguf_write::{quantize, write_file, GgufDType, QUANTIZATION_VERSION};
use crate::lora::{peft_key, LoraAdapter, LoraConfig, LoraMatrix, LoraSite, LoraTarget};
use crate::peft::{complete_pairs, LoraHalves};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::Device;
use std::path::Path;

/// The GGUF module of an adapted linear (`attn_q`, ..., `ffn_down`).
fn gguf_module(target: LoraTarget) -> &'static str {
    let hf = format!("{}.{}", target.block(), target.module_name());
    LAYER_MODULES
        .iter()
        .find(|(_, hf_module)| *hf_module == hf)
        .map(|(gguf, _)| *gguf)
        .expect("every LoRA target is a llama linear")
}

/// `blk.N.<module>.weight.lora_a` / `.lora_b`.
pub fn tensor_name((layer, target): LoraSite, matrix: LoraMatrix) -> String {
    let suffix = match matrix {
        LoraMatrix::A => "lora_a",
        LoraMatrix::B => "lora_b",
    };
    format!("blk.{layer}.{}.weight.{suffix}", gguf_module(target))
}

fn parse_tensor_name(name: &str) -> Option<(LoraSite, LoraMatrix)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, matrix) = rest.split_once(".weight.")?;
    let matrix = match matrix {
        "lora_a" => LoraMatrix::A,
        "lora_b" => LoraMatrix::B,
        _ => return None,
    };
    let target = LoraTarget::ALL
        .into_iter()
        .find(|&t| gguf_module(t) == module)?;
    Some(((layer.parse().ok()?, target), matrix))
}

/// `general.name` as llama.cpp's converters derive it from a folder name (gguf-py's `Metadata`): `-` as a space, and
/// every lowercase word title-cased (Python's `str.title`) unless it is a version (`v2`) or starts with a digit.
pub fn gguf_general_name(folder_name: &str) -> String {
    let title = |word: &str| -> String {
        let mut after_letter = false;
        word.chars()
            .map(|c| {
                let out = if after_letter {
                    c.to_lowercase().collect::<String>()
                } else {
                    c.to_uppercase().collect()
                };
                after_letter = c.is_alphabetic();
                out
            })
            .collect()
    };
    let is_version_or_number = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_digit())
            || w.strip_prefix('v').is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .split('.')
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            })
    };
    folder_name
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            let lowercase =
                w.chars().any(char::is_alphabetic) && !w.chars().any(char::is_uppercase);
            if lowercase && !is_version_or_number(w) {
                title(w)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Models whose GGUF architecture is llama (the one llama.cpp permutes q/k for, and the one kto reads).
pub fn check_llama_architecture(model: &ModelConfig) -> Result<()> {
    if model.model_type == ModelType::Qwen2 || model.sliding_window.is_some() {
        bail!(
            "a {} model{} has no llama-architecture GGUF form; kto writes GGUF for Llama (and Mistral without a \
             sliding window) models",
            model.model_type.as_str(),
            if model.sliding_window.is_some() {
                " with a sliding window"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Writes `adapter` (for a model with config `model`) to `path` as llama.cpp's adapter GGUF, matrices in `dtype`
/// (its `--outtype`; llama.cpp's default is f32). `name` becomes `general.name`.
pub fn save_adapter_gguf(
    adapter: &LoraAdapter,
    model: &ModelConfig,
    path: &Path,
    dtype: GgufDType,
    name: &str,
) -> Result<()> {
    check_llama_architecture(model)?;
    let config = adapter.config();
    // llama.cpp scales by alpha / r; an rsLoRA adapter (alpha / sqrt(r)) keeps its scale through an equivalent alpha.
    let alpha = config.scale() * config.r as f64;
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(ARCHITECTURE.into()),
        ),
        ("general.type".into(), Value::String("adapter".into())),
        ("adapter.type".into(), Value::String("lora".into())),
        ("general.name".into(), Value::String(name.into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha as f32)),
        (
            "general.quantization_version".into(),
            Value::U32(QUANTIZATION_VERSION),
        ),
    ];
    // The converter's order: PEFT's tensors sorted by name (as safetensors stores them), A before B of each linear.
    let mut sites: Vec<LoraSite> = adapter.sites().collect();
    sites.sort_by_key(|&site| peft_key(site, LoraMatrix::A));
    let mut tensors = Vec::with_capacity(2 * sites.len());
    for site in sites {
        let pair = adapter.pair(site).expect("a site of the adapter");
        let b = pair.b.as_tensor().to_device(&Device::Cpu)?;
        let b = match permuted_heads(gguf_module(site.1), model) {
            Some(heads) => permute_rows(&b, heads)?,
            None => b,
        };
        for (matrix, tensor) in [
            (LoraMatrix::A, pair.a.as_tensor().clone()),
            (LoraMatrix::B, b),
        ] {
            let name = tensor_name(site, matrix);
            tensors.push((name.clone(), quantize(&name, &tensor, dtype)?));
        }
    }
    write_file(path, &metadata, &tensors)
}

/// Reads a llama.cpp LoRA adapter GGUF for a model with config `model`: every tensor must be a `lora_a`/`lora_b` of
/// a llama linear and fit the model. Errors name the file and the key or tensor.
pub fn load_adapter_gguf(path: &Path, model: &ModelConfig, device: &Device) -> Result<LoraAdapter> {
    let gguf = GgufFile::open(path)?;
    match gguf.get("general.type") {
        Some(_) if gguf.string("general.type")? == "adapter" => {}
        _ => bail!(
            "{}: not a LoRA adapter (metadata key `general.type` is not \"adapter\"); a GGUF model goes in [model] \
             path",
            path.display()
        ),
    }
    let kind = gguf.string("adapter.type")?;
    if kind != "lora" {
        bail!(
            "{}: metadata key `adapter.type` is {kind:?}; kto reads \"lora\" adapters",
            path.display()
        );
    }
    let alpha = gguf.float("adapter.lora.alpha")?.ok_or_else(|| {
        anyhow!(
            "{}: missing metadata key `adapter.lora.alpha`",
            path.display()
        )
    })?;
    let mut halves = LoraHalves::new();
    for name in gguf.tensor_names() {
        let Some((site, matrix)) = parse_tensor_name(name) else {
            bail!(
                "{}: tensor `{name}` is not the lora_a/lora_b of a llama linear (expected names like \
                 blk.0.attn_q.weight.lora_a)",
                path.display()
            );
        };
        let tensor = gguf.dequantized(name)?;
        let slot = halves.entry(site).or_default();
        match matrix {
            LoraMatrix::A => slot.0 = Some(tensor),
            LoraMatrix::B => {
                let tensor = match permuted_heads(gguf_module(site.1), model) {
                    Some(heads) => unpermute_rows(&tensor, heads)
                        .with_context(|| format!("{}: tensor `{name}`", path.display()))?,
                    None => tensor,
                };
                slot.1 = Some(tensor);
            }
        }
    }
    let pairs = complete_pairs(halves, path, tensor_name)?;
    let Some((first, (a, _))) = pairs.iter().next() else {
        bail!("{}: no LoRA tensors", path.display());
    };
    let r = a.dims()[0];
    if let Some((site, _)) = pairs.iter().find(|(_, (a, _))| a.dims()[0] != r) {
        bail!(
            "{}: tensor `{}` has rank {}, `{}` rank {r}: kto reads adapters of one rank",
            path.display(),
            tensor_name(*site, LoraMatrix::A),
            pairs[site].0.dims()[0],
            tensor_name(*first, LoraMatrix::A),
        );
    }
    let mut targets: Vec<LoraTarget> = pairs.keys().map(|&(_, target)| target).collect();
    targets.sort_unstable();
    targets.dedup();
    let config = LoraConfig::new(r, alpha, 0.0, false, &targets)
        .with_context(|| format!("{}", path.display()))?;
    LoraAdapter::from_pairs(config, model, pairs, device)
        .with_context(|| format!("{}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_round_trip() {
        for target in LoraTarget::ALL {
            for matrix in [LoraMatrix::A, LoraMatrix::B] {
                let name = tensor_name((3, target), matrix);
                assert_eq!(parse_tensor_name(&name), Some(((3, target), matrix)));
            }
        }
        assert_eq!(
            tensor_name((0, LoraTarget::Q), LoraMatrix::B),
            "blk.0.attn_q.weight.lora_b"
        );
        assert_eq!(
            tensor_name((12, LoraTarget::Down), LoraMatrix::A),
            "blk.12.ffn_down.weight.lora_a"
        );
        assert_eq!(parse_tensor_name("blk.0.attn_norm.weight"), None);
        // gguf-py's names for these folders.
        assert_eq!(gguf_general_name("adapter"), "Adapter");
        assert_eq!(gguf_general_name("adapter_init"), "Adapter_Init");
        assert_eq!(gguf_general_name("my-run"), "My Run");
        assert_eq!(gguf_general_name("tiny-v2-8b"), "Tiny v2 8b");
        assert_eq!(parse_tensor_name("token_embd.weight.lora_a"), None);
    }
}
