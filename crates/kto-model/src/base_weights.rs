//! The frozen base's weights as the model loads them: read one tensor at a time, and held dense in the model dtype
//! or as quantized blocks, as [`Quantization`] (`[model] quantize`) says.
//!
//! Safetensors files are read tensor by tensor with plain positioned reads, not memory-mapped: a mapping kept while
//! the model loads leaves every page it touched resident and counted in the process's memory until it is dropped,
//! so the base was held twice at the end of every load (the file's pages and the tensors copied out of them). A GGUF
//! file is read the same way, tensor by tensor, so that no dequantized copy of the whole file waits beside the model.

use crate::config::ModelConfig;
use crate::frozen_linear::{dequantize_cpu, FrozenWeight, SLICE_ELEMENTS};
use crate::gguf::GgufFile;
use crate::model_files::{ModelFiles, ModelFormat};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How the frozen base's matrices (attention and MLP projections, embedding, LM head) are held in memory.
/// Norms and biases stay dense in the model dtype whatever this is; so do the LoRA weights (f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Dense in the model dtype (a GGUF file is dequantized at load).
    #[default]
    None,
    /// A GGUF base keeps the block types of its file.
    Keep,
    /// Quantized to this block type at load (a safetensors or GGUF base), as `load_in_4bit` does for TRL users.
    To(GgmlDType),
}

/// The block types `[model] quantize` offers, with their names.
const QUANTIZE_TYPES: &[(&str, GgmlDType)] = &[
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

impl Quantization {
    /// Every value `[model] quantize` accepts, in the order the messages list them.
    pub fn names() -> Vec<&'static str> {
        let mut names = vec!["none", "keep"];
        names.extend(QUANTIZE_TYPES.iter().map(|(name, _)| *name));
        names
    }

    pub fn name(&self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Keep => "keep",
            Quantization::To(dtype) => QUANTIZE_TYPES
                .iter()
                .find(|(_, d)| d == dtype)
                .map_or("unsupported", |(name, _)| name),
        }
    }
}

impl Quantization {
    /// Refuses `keep` on a safetensors checkpoint (it has no blocks to keep).
    pub(crate) fn check_format(&self, checkpoint: &ModelFiles) -> Result<()> {
        if *self == Quantization::Keep && matches!(checkpoint.format, ModelFormat::Safetensors) {
            bail!(
                "[model] quantize = \"keep\" keeps a GGUF file's own block types, but {} is a safetensors \
                 checkpoint; choose a type to quantize it to ({}) or \"none\"",
                checkpoint.source().display(),
                QUANTIZE_TYPES
                    .iter()
                    .map(|(n, _)| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }

    /// `dense` (the f32 values of `checkpoint`'s matrix `name`) quantized to `block_type` on `device`; rows that
    /// are not whole blocks are an error naming the tensor.
    fn quantize_matrix(
        &self,
        checkpoint: &Path,
        name: &str,
        dense: &Tensor,
        block_type: GgmlDType,
        device: &Device,
    ) -> Result<QTensor> {
        let row = *dense.dims().last().unwrap_or(&0);
        let block = block_type.block_size();
        if !row.is_multiple_of(block) {
            bail!(
                "{}: tensor `{name}` has rows of {row} values, which {self}'s blocks of {block} do not divide; \
                 choose a type with blocks of 32 (\"q8_0\", \"q4_0\") or [model] quantize = \"none\"",
                checkpoint.display(),
            );
        }
        QTensor::quantize_onto(dense, block_type, device)
            .with_context(|| format!("quantizing `{name}` to {self}"))
    }

    /// The values a base held with this setting computes with, for `checkpoint`'s tensor `name` as
    /// [`ModelFiles::tensors`] reads it (`stored`): a matrix (2-D) quantized to the block type and dequantized back,
    /// in f32, for a type quantized at load; `stored` as it is otherwise (`keep`: a GGUF file's tensors are read as
    /// its blocks dequantized). What `kto export` merges an adapter into.
    pub fn values_as_held(
        &self,
        checkpoint: &ModelFiles,
        name: &str,
        stored: Tensor,
    ) -> Result<Tensor> {
        self.check_format(checkpoint)?;
        match self {
            Quantization::To(block_type) if stored.rank() == 2 => {
                let dense = stored.to_dtype(DType::F32)?;
                let blocks = self.quantize_matrix(
                    checkpoint.source(),
                    name,
                    &dense,
                    *block_type,
                    &Device::Cpu,
                )?;
                Ok(blocks.dequantize(&Device::Cpu)?)
            }
            _ => Ok(stored),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantization {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Quantization::None),
            "keep" => Ok(Quantization::Keep),
            _ => QUANTIZE_TYPES
                .iter()
                .find(|(name, _)| *name == s)
                .map(|&(_, dtype)| Quantization::To(dtype))
                .ok_or_else(|| {
                    anyhow!(
                        "quantize = {s:?} is not one of {}",
                        Quantization::names()
                            .iter()
                            .map(|n| format!("\"{n}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
        }
    }
}

impl serde::Serialize for Quantization {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Quantization {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the tensors come from.
enum Source {
    Safetensors(SafetensorsFiles),
    Gguf {
        file: Arc<GgufFile>,
        config: ModelConfig,
    },
}

/// A checkpoint's base weights under their Hugging Face names, read when the model asks for one; a prefix scopes
/// the names as `VarBuilder::pp` does.
#[derive(Clone)]
pub(crate) struct BaseWeights {
    source: Arc<Source>,
    origin: PathBuf,
    prefix: String,
    dtype: DType,
    device: Device,
    quantization: Quantization,
}

impl BaseWeights {
    pub(crate) fn open(
        checkpoint: &ModelFiles,
        dtype: DType,
        device: &Device,
        quantization: Quantization,
    ) -> Result<Self> {
        quantization.check_format(checkpoint)?;
        let source = match &checkpoint.format {
            ModelFormat::Safetensors => {
                Source::Safetensors(SafetensorsFiles::open(&checkpoint.weight_files)?)
            }
            ModelFormat::Gguf(file) => Source::Gguf {
                file: file.clone(),
                config: checkpoint.config.clone(),
            },
        };
        Ok(Self {
            source: Arc::new(source),
            origin: checkpoint.source().to_path_buf(),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            quantization,
        })
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// The same weights, names under `prefix.`.
    pub(crate) fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}.{prefix}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        let name = self.full_name(name);
        match &*self.source {
            Source::Safetensors(files) => files.tensors.contains_key(&name),
            Source::Gguf { file, config } => file.has_hf_tensor(&name, config),
        }
    }

    /// The tensor on the CPU as stored (GGUF: dequantized to f32), its shape checked.
    fn read_stored(&self, name: &str, shape: &Shape) -> Result<Tensor> {
        let full = self.full_name(name);
        let tensor = match &*self.source {
            Source::Safetensors(files) => files.read(&full)?,
            Source::Gguf { file, config } => file.hf_tensor(&full, config)?,
        };
        self.check_shape(&full, tensor.shape(), shape)?;
        Ok(tensor)
    }

    fn check_shape(&self, name: &str, found: &Shape, expected: &Shape) -> Result<()> {
        if found != expected {
            bail!(
                "{}: tensor `{name}` has shape {:?}, the model config needs {:?}",
                self.origin.display(),
                found.dims(),
                expected.dims()
            );
        }
        Ok(())
    }

    /// A weight kept dense in the model dtype on the model's device (norms, biases).
    pub(crate) fn dense(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        let tensor = self.read_stored(name, &shape.into())?;
        Ok(tensor.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// A frozen matrix ([out, in] for a linear, [vocab, hidden] for the embedding) held as `[model] quantize` says.
    pub(crate) fn matrix(&self, name: &str, shape: impl Into<Shape>) -> Result<FrozenWeight> {
        let shape = shape.into();
        let full = self.full_name(name);
        let quantized = match self.quantization {
            Quantization::None => return Ok(FrozenWeight::Dense(self.dense(name, shape)?)),
            Quantization::Keep => {
                let Source::Gguf { file, config } = &*self.source else {
                    unreachable!("BaseWeights::open refuses keep on a safetensors checkpoint");
                };
                let blocks = file.hf_quantized_tensor(&full, config)?;
                self.check_shape(&full, blocks.shape(), &shape)?;
                to_device(blocks, &self.device)?
            }
            // Read and quantized a slice of rows at a time (a row is whole blocks), so that the dense f32 of the
            // largest matrix (embedding, LM head) is never whole in memory beside the blocks already made.
            Quantization::To(block_type) => {
                let (rows, cols) = shape.dims2()?;
                let mut read_rows: Box<dyn FnMut(Range<usize>) -> Result<Tensor>> =
                    match &*self.source {
                        Source::Safetensors(files) => {
                            let stored = Shape::from(files.stored(&full)?.shape.clone());
                            self.check_shape(&full, &stored, &shape)?;
                            Box::new(|range| files.read_rows(&full, range))
                        }
                        // The file's own blocks (smaller than the result's f32) are read whole.
                        Source::Gguf { file, config } => {
                            let blocks = file.hf_quantized_tensor(&full, config)?;
                            self.check_shape(&full, blocks.shape(), &shape)?;
                            let mut slice = Vec::new();
                            Box::new(move |range: Range<usize>| {
                                slice.resize(range.len() * cols, 0.0);
                                dequantize_cpu(&blocks, range.clone(), &mut slice)?;
                                Ok(Tensor::from_slice(
                                    &slice,
                                    (range.len(), cols),
                                    &Device::Cpu,
                                )?)
                            })
                        }
                    };
                let step = (SLICE_ELEMENTS / cols.max(1)).clamp(1, rows.max(1));
                let mut bytes = Vec::with_capacity(
                    rows * cols / block_type.block_size() * block_type.type_size(),
                );
                for first in (0..rows).step_by(step) {
                    let dense = read_rows(first..(first + step).min(rows))?.to_dtype(DType::F32)?;
                    let blocks = self.quantization.quantize_matrix(
                        &self.origin,
                        &full,
                        &dense,
                        block_type,
                        &Device::Cpu,
                    )?;
                    bytes.extend_from_slice(&blocks.data()?);
                }
                let storage = QStorage::from_data(Cow::Owned(bytes), &self.device, block_type)?;
                QTensor::new(storage, shape)?
            }
        };
        Ok(FrozenWeight::quantized(
            vec![Arc::new(quantized)],
            self.dtype,
        )?)
    }
}

/// `blocks` (read on the CPU) on `device`, as the same block type.
fn to_device(blocks: QTensor, device: &Device) -> Result<QTensor> {
    if device.is_cpu() {
        return Ok(blocks);
    }
    let storage =
        candle_core::quantized::QStorage::from_data(blocks.data()?, device, blocks.dtype())?;
    Ok(QTensor::new(storage, blocks.shape().clone())?)
}

/// The tensors of one or more safetensors files: where each one's bytes are, read on demand.
struct SafetensorsFiles {
    tensors: HashMap<String, StoredTensor>,
}

struct StoredTensor {
    file: Arc<Mutex<File>>,
    path: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset of the data in the file.
    start: u64,
}

impl SafetensorsFiles {
    fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            let mut file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let file_len = file.metadata()?.len();
            let mut len = [0u8; 8];
            file.read_exact(&mut len).with_context(|| {
                format!("{}: not a safetensors file (too short)", path.display())
            })?;
            let header_len = u64::from_le_bytes(len);
            if header_len.saturating_add(8) > file_len {
                bail!(
                    "{}: not a safetensors file (a header of {header_len} bytes in a file of {file_len})",
                    path.display()
                );
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact(&mut header)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .with_context(|| {
                    format!("{}: the safetensors header is not JSON", path.display())
                })?;
            let file = Arc::new(Mutex::new(file));
            for (name, entry) in header {
                if name == "__metadata__" {
                    continue;
                }
                let stored =
                    StoredTensor::from_header(&entry, path, &file, 8 + header_len, file_len)
                        .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
                tensors.insert(name, stored);
            }
        }
        Ok(Self { tensors })
    }

    /// The tensor on the CPU in its stored dtype.
    fn read(&self, name: &str) -> Result<Tensor> {
        let stored = self.stored(name)?;
        stored
            .read()
            .with_context(|| format!("{}: reading tensor `{name}`", stored.path.display()))
    }

    /// Rows `rows` of the 2-D tensor `name` on the CPU in its stored dtype.
    fn read_rows(&self, name: &str, rows: Range<usize>) -> Result<Tensor> {
        let stored = self.stored(name)?;
        stored
            .read_rows(rows)
            .with_context(|| format!("{}: reading tensor `{name}`", stored.path.display()))
    }

    fn stored(&self, name: &str) -> Result<&StoredTensor> {
        self.tensors.get(name).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` is not in {}",
                self.paths()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    fn paths(&self) -> Vec<&Path> {
        let mut paths: Vec<&Path> = self.tensors.values().map(|t| t.path.as_path()).collect();
        paths.sort();
        paths.dedup();
        paths
    }
}

impl StoredTensor {
    fn from_header(
        entry: &serde_json::Value,
        path: &Path,
        file: &Arc<Mutex<File>>,
        data_start: u64,
        file_len: u64,
    ) -> Result<Self> {
        let dtype = match entry.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("U8") => DType::U8,
            Some("U32") => DType::U32,
            Some("I64") => DType::I64,
            other => {
                bail!("dtype {other:?} is not one kto reads (F32, F16, BF16, F64, U8, U32, I64)")
            }
        };
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| {
                s.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .context("no `shape` list of sizes")?;
        let offsets = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|o| o.len() == 2)
            .context("no `data_offsets` pair")?;
        let bytes = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if offsets[1] < offsets[0] || offsets[1] - offsets[0] != bytes {
            bail!(
                "data_offsets {:?} hold {} bytes; shape {shape:?} in {dtype:?} needs {bytes}",
                offsets,
                offsets[1].saturating_sub(offsets[0])
            );
        }
        if data_start + offsets[1] > file_len {
            bail!("its data ends past the end of the file (truncated?)");
        }
        Ok(Self {
            file: file.clone(),
            path: path.to_path_buf(),
            dtype,
            shape,
            start: data_start + offsets[0],
        })
    }

    fn read(&self) -> Result<Tensor> {
        let count: usize = self.shape.iter().product();
        self.read_values(0, count, self.shape.as_slice())
    }

    /// Rows `rows` of a 2-D tensor (contiguous in the file), as [rows, columns] in the stored dtype.
    fn read_rows(&self, rows: Range<usize>) -> Result<Tensor> {
        let &[total, cols] = self.shape.as_slice() else {
            bail!("a tensor of shape {:?} has no rows to slice", self.shape);
        };
        if rows.end > total {
            bail!("rows {rows:?} of a tensor of {total} rows");
        }
        self.read_values(rows.start * cols, rows.len() * cols, (rows.len(), cols))
    }

    /// `count` values from the `first` one, as a tensor of `shape`.
    fn read_values(&self, first: usize, count: usize, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        Ok(match self.dtype {
            DType::F32 => {
                Tensor::from_vec(self.read_raw::<f32>(first, count)?, shape, &Device::Cpu)?
            }
            DType::F16 => Tensor::from_vec(
                self.read_raw::<half::f16>(first, count)?,
                shape,
                &Device::Cpu,
            )?,
            DType::BF16 => Tensor::from_vec(
                self.read_raw::<half::bf16>(first, count)?,
                shape,
                &Device::Cpu,
            )?,
            DType::F64 => {
                Tensor::from_vec(self.read_raw::<f64>(first, count)?, shape, &Device::Cpu)?
            }
            DType::U8 => Tensor::from_vec(self.read_raw::<u8>(first, count)?, shape, &Device::Cpu)?,
            DType::U32 => {
                Tensor::from_vec(self.read_raw::<u32>(first, count)?, shape, &Device::Cpu)?
            }
            DType::I64 => {
                Tensor::from_vec(self.read_raw::<i64>(first, count)?, shape, &Device::Cpu)?
            }
            other => bail!("dtype {other:?} cannot be read"),
        })
    }

    /// `count` little-endian values of `T` from the `first` one, read straight into their final buffer (one copy,
    /// no staging bytes).
    fn read_raw<T: candle_core::WithDType>(&self, first: usize, count: usize) -> Result<Vec<T>> {
        if cfg!(target_endian = "big") {
            bail!("safetensors files are little-endian; this machine is big-endian");
        }
        let mut values = vec![T::from_f64(0.0); count];
        // SAFETY: T is one of candle's plain numeric types (no padding, every bit pattern a value), so its buffer
        // may be viewed as bytes and filled from the file.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                values.as_mut_ptr() as *mut u8,
                count * std::mem::size_of::<T>(),
            )
        };
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.seek(SeekFrom::Start(
            self.start + (first * std::mem::size_of::<T>()) as u64,
        ))?;
        file.read_exact(bytes)?;
        Ok(values)
    }
}
