//! The element types the ops take (f32, bf16, f16) as the CPU twins see them: stored in their dtype, computed in f32,
//! rounded to nearest even on the way back, exactly as the kernels' `to_f32` / `from_f32` do.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result};
use half::{bf16, f16};

pub trait Float: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The contiguous elements of `layout` in `storage`, or an error naming `what`.
    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [Self]>;
    fn storage(values: Vec<Self>) -> CpuStorage;
}

/// `v` rounded to `T` and back: the value a tensor of that dtype would hold.
pub fn round_to<T: Float>(v: f32) -> f32 {
    T::from_f32(v).to_f32()
}

fn contiguous<'a, T>(values: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    Ok(&values[crate::operand::packed(what, layout, values.len())?])
}

macro_rules! float_impl {
    ($t:ty, $dtype:ident, $to:expr, $from:expr) => {
        impl Float for $t {
            const DTYPE: DType = DType::$dtype;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            fn slice<'a>(
                storage: &'a CpuStorage,
                layout: &Layout,
                what: &str,
            ) -> Result<&'a [Self]> {
                match storage {
                    CpuStorage::$dtype(values) => contiguous(values, layout, what),
                    other => bail!(
                        "{what} is {:?}, expected {:?}",
                        other.dtype(),
                        DType::$dtype
                    ),
                }
            }
            fn storage(values: Vec<Self>) -> CpuStorage {
                CpuStorage::$dtype(values)
            }
        }
    };
}

float_impl!(f32, F32, |v: f32| v, |v: f32| v);
float_impl!(bf16, BF16, bf16::to_f32, bf16::from_f32);
float_impl!(f16, F16, f16::to_f32, f16::from_f32);

/// The contiguous u32 elements of `layout` in `storage`.
pub fn u32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [u32]> {
    match storage {
        CpuStorage::U32(values) => contiguous(values, layout, what),
        other => bail!("{what} is {:?}, expected U32", other.dtype()),
    }
}

/// Calls `$body` with `$T` bound to the element type of `$dtype` (f32, bf16 or f16).
#[macro_export]
#[doc(hidden)]
macro_rules! with_float {
    ($dtype:expr, $what:expr, |$T:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => {
                candle_core::bail!("{}: unsupported dtype {other:?} (f32, bf16 or f16)", $what)
            }
        }
    };
}
