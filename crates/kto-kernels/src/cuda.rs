//! Launching our PTX on candle's CUDA device (the `cuda` feature).
//!
//! build.rs compiles each `kernels/<module>.cu` to PTX; the module is loaded once per device with candle's
//! `get_or_load_custom_func` (named `kto_<module>` so it cannot clash with candle's own modules) and a [`Launch`]
//! pushes its arguments in declaration order.

use crate::kernel::{Arg, Launch};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result};

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

/// The PTX of `module`.
pub fn ptx(module: &str) -> Result<&'static str> {
    match PTX.iter().find(|(m, _)| *m == module) {
        Some((_, ptx)) => Ok(ptx),
        None => bail!("no PTX module {module}"),
    }
}

/// Runs `launch` on `device`'s stream (asynchronously, like any candle op).
pub fn run(device: &CudaDevice, launch: &Launch) -> Result<()> {
    let kernel = launch.kernel;
    let func = device.get_or_load_custom_func(
        &launch.entry_name(),
        &format!("kto_{}", kernel.module),
        ptx(kernel.module)?,
    )?;
    let mut builder = func.builder();
    for arg in &launch.args {
        match arg {
            Arg::Ptr(v) | Arg::U64(v) => builder.arg(v),
            Arg::I32(v) => builder.arg(v),
            Arg::U32(v) => builder.arg(v),
            Arg::F32(v) => builder.arg(v),
            Arg::I64(v) => builder.arg(v),
        };
    }
    let config = LaunchConfig {
        grid_dim: (launch.grid[0], launch.grid[1], launch.grid[2]),
        block_dim: (launch.block[0], launch.block[1], launch.block[2]),
        shared_mem_bytes: launch.shared_bytes,
    };
    // SAFETY: the argument list was checked against the kernel's declaration when the launch was built, and
    // tests/ptx.rs checks the declaration against the PTX entry.
    unsafe { builder.launch(config) }.w()?;
    Ok(())
}

/// A device address held for the duration of a launch (the guard orders the stream after earlier writes).
pub struct DeviceAddress<'a> {
    pub address: u64,
    _guard: SyncOnDrop<'a>,
}

impl DeviceAddress<'_> {
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.address)
    }
}

/// The stream every launch on `device` goes to (candle uses one per device).
pub type Stream = std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>;

/// The address of the first element of `layout` in `storage` (any dtype), for a kernel that reads the operand
/// packed row-major from there: any other layout, or one past the storage, is refused naming `what` (the op and the
/// operand) and the layout ([`crate::operand::packed`]).
pub fn address<'a>(
    what: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
    stream: &'a Stream,
) -> Result<DeviceAddress<'a>> {
    use candle_core::cuda_backend::CudaStorageSlice as S;
    fn at<'a, T: DeviceRepr>(
        what: &str,
        slice: &'a CudaSlice<T>,
        layout: &Layout,
        stream: &'a Stream,
    ) -> Result<DeviceAddress<'a>> {
        let elements = crate::operand::packed(what, layout, slice.len())?;
        let (ptr, guard) = slice.device_ptr(stream);
        Ok(DeviceAddress {
            address: ptr + (elements.start * std::mem::size_of::<T>()) as u64,
            _guard: guard,
        })
    }
    match &storage.slice {
        S::F32(s) => at(what, s, layout, stream),
        S::BF16(s) => at(what, s, layout, stream),
        S::F16(s) => at(what, s, layout, stream),
        S::F64(s) => at(what, s, layout, stream),
        S::U32(s) => at(what, s, layout, stream),
        S::I32(s) => at(what, s, layout, stream),
        S::I64(s) => at(what, s, layout, stream),
        S::U8(s) => at(what, s, layout, stream),
        _ => bail!("{what}: unsupported dtype {:?}", storage.dtype()),
    }
}

/// The address of a slice a kernel writes (typically freshly allocated).
pub fn address_mut<'a, T: DeviceRepr>(
    slice: &'a mut CudaSlice<T>,
    stream: &'a Stream,
) -> DeviceAddress<'a> {
    let (ptr, guard) = slice.device_ptr_mut(stream);
    DeviceAddress {
        address: ptr,
        _guard: guard,
    }
}

/// Allocates `len` elements of `dtype` on `device`, lets `write` launch the kernels that fill them (given their
/// address) and returns them as candle storage. Nothing is launched for an empty output.
pub fn output(
    device: &CudaDevice,
    dtype: candle_core::DType,
    len: usize,
    write: impl FnOnce(&Stream, Arg) -> Result<()>,
) -> Result<CudaStorage> {
    use candle_core::DType;
    let stream = device.cuda_stream();
    macro_rules! fill {
        ($t:ty) => {{
            // SAFETY: every element is written by the launch before the storage is read.
            let mut slice = unsafe { device.alloc::<$t>(len)? };
            if len > 0 {
                let address = address_mut(&mut slice, &stream);
                write(&stream, address.arg())?;
            }
            CudaStorage::wrap_cuda_slice(slice, device.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => fill!(f32),
        DType::BF16 => fill!(half::bf16),
        DType::F16 => fill!(half::f16),
        DType::U32 => fill!(u32),
        DType::I32 => fill!(i32),
        other => bail!("cannot allocate a {other:?} output"),
    })
}
