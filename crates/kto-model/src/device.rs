//! Device and dtype names as the CLI and config files spell them.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// `cpu | cuda | cuda:N | auto`. `cuda` and `auto` mean the GPU of the process's local rank when a launcher started
/// several processes per machine (one GPU each, as accelerate places them), else GPU 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// The first CUDA device when this build has CUDA and one is present, else the CPU.
    Auto,
}

impl DeviceSpec {
    pub const ALLOWED: &'static str = "cpu, cuda, cuda:N, auto";

    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        match text {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(local_rank())),
            "auto" => Ok(Self::Auto),
            _ => match text.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).with_context(|| {
                    format!(
                        "bad device \"{text}\": `{n}` is not a GPU index (allowed: {})",
                        Self::ALLOWED
                    )
                }),
                None => bail!("unknown device \"{text}\" (allowed: {})", Self::ALLOWED),
            },
        }
    }

    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("device cuda:{ordinal} requested, but this build has no CUDA support (rebuild with `--features cuda`)");
                }
                Device::new_cuda(ordinal)
                    .with_context(|| format!("cannot open CUDA device {ordinal}"))
            }
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(device) = Device::new_cuda(local_rank()) {
                        return Ok(device);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// This process's index among the processes a launcher started on its machine (0 without one): Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`, Slurm's `SLURM_LOCALID`, torchrun's `LOCAL_RANK`.
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .into_iter()
    .find_map(|var| std::env::var(var).ok()?.trim().parse().ok())
    .unwrap_or(0)
}

/// Opens a device from its name (`cpu | cuda | cuda:N | auto`).
pub fn open_device(text: &str) -> Result<Device> {
    DeviceSpec::parse(text)?.open()
}

/// `f32 | bf16 | f16` (torch's long names are accepted too).
pub fn parse_dtype(text: &str) -> Result<DType> {
    match text.trim() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        other => bail!("unknown dtype \"{other}\" (allowed: f32, bf16, f16)"),
    }
}

/// The short name used in configs and file metadata.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// transformers' `dtype` string for config.json.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Auto);
        assert!(format!("{:#}", DeviceSpec::parse("cuda:x").unwrap_err())
            .contains("allowed: cpu, cuda, cuda:N, auto"));
        assert!(format!("{:#}", DeviceSpec::parse("tpu").unwrap_err())
            .contains("unknown device \"tpu\""));
        assert!(open_device("cpu").unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            assert!(open_device("auto").unwrap().is_cpu());
            assert!(open_device("cuda").is_err());
        }
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("float16").unwrap(), DType::F16);
        assert_eq!(parse_dtype("f32").unwrap(), DType::F32);
        assert!(
            format!("{:#}", parse_dtype("int8").unwrap_err()).contains("allowed: f32, bf16, f16")
        );
    }
}
