//! Writing GGUF files as llama.cpp's converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`) write them:
//! their `--outtype` choices, their per-tensor storage types, GGUF version 3, written durably and atomically.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

/// `general.quantization_version`: the ggml quantization format llama.cpp's converters record.
pub const QUANTIZATION_VERSION: u32 = 2;

/// The `--outtype` of llama.cpp's converters that kto writes: what the matrices are stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDType {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl GgufDType {
    pub const ALLOWED: &'static str = "f32, f16, bf16, q8_0";

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            other => bail!("unknown GGUF type {other:?} (allowed: {})", Self::ALLOWED),
        })
    }

    /// llama.cpp's `--outtype auto`: bf16 when the checkpoint's matrices are bf16, else f16.
    pub fn auto(stored: DType) -> Self {
        if stored == DType::BF16 {
            Self::BF16
        } else {
            Self::F16
        }
    }

    /// `general.file_type`, llama.cpp's `LlamaFileType` (ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::BF16 => 32,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

/// The type llama.cpp's converter stores the tensor `name` (GGUF name) of `dims` in for `dtype`: vectors and norms
/// stay f32; a Q8_0 tensor whose rows are not whole 32-value blocks falls back to f16, as gguf-py's `QuantError`
/// makes the converter do.
pub fn storage_type(name: &str, dims: &[usize], dtype: GgufDType) -> GgmlDType {
    if dims.len() <= 1 || name.ends_with("_norm.weight") {
        return GgmlDType::F32;
    }
    let row = dims.last().copied().unwrap_or(0);
    if dtype == GgufDType::Q8_0 && !row.is_multiple_of(GgmlDType::Q8_0.block_size()) {
        return GgmlDType::F16;
    }
    dtype.ggml()
}

/// `tensor` (any float dtype, any device) stored as llama.cpp stores `name` for `dtype`.
pub fn quantize(name: &str, tensor: &Tensor, dtype: GgufDType) -> Result<QTensor> {
    let f32 = tensor
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let ggml = storage_type(name, f32.dims(), dtype);
    QTensor::quantize(&f32, ggml).with_context(|| format!("tensor `{name}`: storing as {ggml:?}"))
}

/// Writes a GGUF file at `path` atomically and durably (a temporary sibling renamed into place, see
/// [`kto_data::atomic`]), metadata and tensors in the order given.
pub fn write_file(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    kto_data::atomic::write_file_with(path, |tmp| {
        let file = std::fs::File::create(tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut writer = BufWriter::new(file);
        candle_core::quantized::gguf_file::write(&mut writer, &metadata, &tensors)?;
        // candle writes version 2; llama.cpp writes 3, which differs only for big-endian files, so a little-endian
        // file is a valid version 3 file once the number says so.
        writer.seek(SeekFrom::Start(4))?;
        writer.write_all(&3u32.to_le_bytes())?;
        writer.flush()?;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_types_follow_llama_cpp() {
        assert_eq!(
            storage_type("blk.0.attn_norm.weight", &[64], GgufDType::F16),
            GgmlDType::F32
        );
        assert_eq!(
            storage_type("output_norm.weight", &[64], GgufDType::Q8_0),
            GgmlDType::F32
        );
        assert_eq!(
            storage_type("blk.0.attn_q.weight", &[64, 64], GgufDType::Q8_0),
            GgmlDType::Q8_0
        );
        // LoRA B of rank 8: rows of 8 values are no Q8_0 block.
        assert_eq!(
            storage_type("blk.0.attn_q.weight.lora_b", &[64, 8], GgufDType::Q8_0),
            GgmlDType::F16
        );
        assert_eq!(
            storage_type("blk.0.attn_q.weight.lora_a", &[8, 64], GgufDType::BF16),
            GgmlDType::BF16
        );
        assert!(GgufDType::parse("q4_0").is_err());
        assert_eq!(GgufDType::auto(DType::BF16), GgufDType::BF16);
        assert_eq!(GgufDType::auto(DType::F32), GgufDType::F16);
    }
}
