//! The comparison every kernel test makes: the kernel, run under the CPU emulation of CUDA ([`crate::emulation`]),
//! against its CPU twin's output.

use super::{assert_close, widen, Tolerance};
use crate::emulation::{run, GuardedBuffer, Order};
use crate::float::Float;
use crate::kernel::{Arg, Launch};
use candle_core::Result;

/// One output of an emulated kernel: `launch` is given a fresh guarded buffer of `len` NaN (so an element the kernel
/// does not write shows) and run with its threads and blocks in `order`; the buffer's guards are checked and its
/// values returned widened to f32.
pub fn emulated_output<T: Float>(
    len: usize,
    order: Order,
    launch: impl FnOnce(Arg) -> Result<Launch>,
) -> Result<Vec<f32>> {
    let out = GuardedBuffer::filled(len, T::from_f32(f32::NAN));
    run(&launch(out.arg())?, order)?;
    out.check()?;
    Ok(widen(out.as_slice()))
}

/// The kernel of `launch` writes what its twin wrote (`twin`, widened to f32) to within `tol`, in both thread
/// orders ([`Order::BOTH`]); `what` names the comparison, followed by the order.
pub fn assert_emulated_matches_twin<T: Float>(
    what: &str,
    twin: &[f32],
    tol: Tolerance,
    launch: impl Fn(Arg) -> Result<Launch>,
) -> Result<()> {
    for order in Order::BOTH {
        let got = emulated_output::<T>(twin.len(), order, &launch)?;
        assert_close(&format!("{what} {order:?}"), &got, twin, tol)?;
    }
    Ok(())
}

/// The three tests `$name_f32`, `$name_bf16` and `$name_f16`, each running the generic `$body::<dtype>()`: an
/// emulated kernel is checked in every dtype kto trains in.
#[macro_export]
macro_rules! tests_per_dtype {
    ($name:ident, $body:ident) => {
        $crate::testing::emulated::__private::paste! {
            #[test]
            fn [<$name _f32>]() -> $crate::testing::emulated::__private::Result<()> {
                $body::<f32>()
            }

            #[test]
            fn [<$name _bf16>]() -> $crate::testing::emulated::__private::Result<()> {
                $body::<$crate::testing::emulated::__private::bf16>()
            }

            #[test]
            fn [<$name _f16>]() -> $crate::testing::emulated::__private::Result<()> {
                $body::<$crate::testing::emulated::__private::f16>()
            }
        }
    };
}

/// What [`tests_per_dtype!`](crate::tests_per_dtype) names in the crate that calls it.
#[doc(hidden)]
pub mod __private {
    pub use candle_core::Result;
    pub use half::{bf16, f16};
    pub use paste::paste;
}
