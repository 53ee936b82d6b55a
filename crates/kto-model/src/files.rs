//! Safetensors and JSON files written atomically and durably, through [`kto_data::atomic`].

use anyhow::Result;
use candle_core::Tensor;
use kto_data::atomic;
use std::collections::HashMap;
use std::path::Path;

/// Writes `bytes` to `path` atomically and durably (see [`kto_data::atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic::write_file(path, bytes)
}

/// Writes `tensors` (any dtype, any device) as one safetensors file with `metadata` (e.g. `format: pt`).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, t)| {
            Ok((
                name.clone(),
                t.to_device(&candle_core::Device::Cpu)?.contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    atomic::write_file_with(path, |tmp| {
        Ok(safetensors::serialize_to_file(
            contiguous.iter().map(|(n, t)| (n.as_str(), t)),
            metadata,
            tmp,
        )?)
    })
}

/// `format: pt`, which PEFT and transformers write and some loaders require.
pub fn pt_metadata() -> Option<HashMap<String, String>> {
    Some(HashMap::from([("format".to_string(), "pt".to_string())]))
}
