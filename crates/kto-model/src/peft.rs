//! PEFT's LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors`.

use crate::config::ModelConfig;
use crate::files::{pt_metadata, write_atomic, write_safetensors};
use crate::gguf::is_gguf_path;
use crate::lora::{parse_peft_key, LoraAdapter, LoraConfig, LoraMatrix, LoraSite, LoraTarget};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Reads `adapter_config.json`; options this crate does not implement are errors naming the key.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    parse_adapter_config(&text).with_context(|| format!("{}", path.display()))
}

fn parse_adapter_config(text: &str) -> Result<LoraConfig> {
    let v: Value = serde_json::from_str(text).context("invalid JSON")?;
    let get = |key: &str| v.get(key).filter(|x| !x.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => bail!("`peft_type` is {other:?}; only \"LORA\" is supported"),
    }
    if let Some(task) = get("task_type") {
        if task.as_str() != Some("CAUSAL_LM") {
            bail!("`task_type` is {task}; only \"CAUSAL_LM\" is supported");
        }
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .context("key `r` must be a positive integer")? as usize;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .context("key `lora_alpha` must be a number")?;
    let dropout = get("lora_dropout")
        .map_or(Some(0.0), Value::as_f64)
        .context("key `lora_dropout` must be a number")?;
    let use_rslora = get("use_rslora")
        .map_or(Some(false), Value::as_bool)
        .context("key `use_rslora` must be a boolean")?;
    let flag_off = |key: &str| -> Result<()> {
        match get(key) {
            None | Some(Value::Bool(false)) => Ok(()),
            Some(v) => bail!("unsupported `{key}` {v} (allowed: false)"),
        }
    };
    for key in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
        flag_off(key)?;
    }
    match get("bias").map(|b| b.as_str()) {
        None | Some(Some("none")) => {}
        Some(other) => bail!("unsupported `bias` {other:?} (allowed: \"none\")"),
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if let Some(p) = get(key) {
            if p.as_object().is_none_or(|m| !m.is_empty()) {
                bail!("unsupported `{key}` {p} (allowed: {{}})");
            }
        }
    }
    for key in [
        "layers_to_transform",
        "modules_to_save",
        "trainable_token_indices",
        "target_parameters",
    ] {
        if let Some(x) = get(key) {
            bail!("unsupported `{key}` {x} (allowed: null)");
        }
    }
    let targets = match get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => LoraTarget::ALL.to_vec(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|m| {
                m.as_str()
                    .context("`target_modules` entries must be strings")
                    .and_then(|name| LoraTarget::parse(name).context("in `target_modules`"))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => bail!(
            "unsupported `target_modules` {other} (allowed: a list of {} or \"all-linear\")",
            LoraTarget::ALLOWED
        ),
        None => bail!("missing key `target_modules`"),
    };
    LoraConfig::new(r, alpha, dropout, use_rslora, &targets)
}

/// Loads a PEFT adapter folder, or a llama.cpp adapter `.gguf` file ([`crate::lora_gguf`]), for a model with
/// `model` config; every tensor must fit the model.
pub fn load_adapter(dir: &Path, model: &ModelConfig, device: &Device) -> Result<LoraAdapter> {
    if is_gguf_path(dir) && dir.is_file() {
        return crate::lora_gguf::load_adapter_gguf(dir, model, device);
    }
    let config = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    if !path.is_file() {
        bail!(
            "{}: missing (PyTorch adapter_model.bin is not supported)",
            path.display()
        );
    }
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut halves = LoraHalves::new();
    for (key, tensor) in tensors {
        let Some((site, matrix)) = parse_peft_key(&key) else {
            bail!(
                "{}: tensor `{key}` is not a LoRA A/B weight of a Llama decoder layer (expected keys like \
                 base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)",
                path.display()
            );
        };
        if !config.targets.contains(&site.1) {
            bail!(
                "{}: tensor `{key}` is for {}, which is not in `target_modules`",
                path.display(),
                site.1.module_name()
            );
        }
        let slot = halves.entry(site).or_default();
        match matrix {
            LoraMatrix::A => slot.0 = Some(tensor),
            LoraMatrix::B => slot.1 = Some(tensor),
        }
    }
    let pairs = complete_pairs(halves, &path, crate::lora::peft_key)?;
    LoraAdapter::from_pairs(config, model, pairs, device)
        .with_context(|| format!("{}", path.display()))
}

/// The A and B read so far of each adapted linear of an adapter file.
pub(crate) type LoraHalves = BTreeMap<LoraSite, (Option<Tensor>, Option<Tensor>)>;

/// Every linear's (A, B); a missing half is an error naming `file` and the tensor, as `tensor_name` names it in that
/// file's format (PEFT keys, or llama.cpp's GGUF names).
pub(crate) fn complete_pairs(
    halves: LoraHalves,
    file: &Path,
    tensor_name: impl Fn(LoraSite, LoraMatrix) -> String,
) -> Result<BTreeMap<LoraSite, (Tensor, Tensor)>> {
    halves
        .into_iter()
        .map(|(site, (a, b))| {
            let missing = |m| {
                format!(
                    "{}: missing tensor `{}`",
                    file.display(),
                    tensor_name(site, m)
                )
            };
            Ok((
                site,
                (
                    a.with_context(|| missing(LoraMatrix::A))?,
                    b.with_context(|| missing(LoraMatrix::B))?,
                ),
            ))
        })
        .collect()
}

/// Writes `adapter` as a PEFT folder that `PeftModel.from_pretrained(base, dir)` loads.
pub fn save_adapter(
    adapter: &LoraAdapter,
    dir: &Path,
    base_model_name_or_path: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let c = adapter.config();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": c.r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "use_rslora": c.use_rslora,
        "target_modules": c.targets.iter().map(|t| t.module_name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "use_dora": false,
        "lora_bias": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let tensors: Vec<(String, Tensor)> = adapter
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().detach()))
        .collect();
    write_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), &tensors, pt_metadata())?;
    write_atomic(
        &dir.join(ADAPTER_CONFIG_FILE),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> String {
        format!(
            r#"{{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"lora_dropout":0.05,
                "target_modules":["q_proj","v_proj"],"bias":"none"{extra}}}"#
        )
    }

    #[test]
    fn parses_and_rejects_options() {
        let c = parse_adapter_config(&cfg("")).unwrap();
        assert_eq!((c.r, c.alpha, c.dropout), (4, 8.0, 0.05));
        assert_eq!(c.targets, vec![LoraTarget::Q, LoraTarget::V]);
        let all = parse_adapter_config(&cfg(r#","target_modules":"all-linear""#)).unwrap();
        assert_eq!(all.targets.len(), 7);
        for (extra, key) in [
            (r#","use_dora":true"#, "`use_dora`"),
            (r#","bias":"all""#, "`bias`"),
            (r#","target_modules":["lm_head"]"#, "lm_head"),
            (r#","rank_pattern":{"q_proj":8}"#, "`rank_pattern`"),
            (r#","peft_type":"IA3""#, "`peft_type`"),
            (r#","layers_to_transform":[0]"#, "`layers_to_transform`"),
        ] {
            let err = format!("{:#}", parse_adapter_config(&cfg(extra)).unwrap_err());
            assert!(err.contains(key), "{extra}: {err}");
        }
    }
}
