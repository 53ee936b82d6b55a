//! Fused training ops for kto, each a candle custom op with three faces:
//! - a **CPU twin** in plain Rust (rayon over rows, f32 accumulation): the reference every other face is checked
//!   against, and the fast CPU path;
//! - a **CUDA kernel** in `kernels/<op>.cu`, compiled to PTX by build.rs under the `cuda` feature and launched
//!   through candle's `CudaDevice::get_or_load_custom_func`;
//! - a **backward** built from this crate's own ops (never from a stock candle op that drops gradients).
//!
//! The same `.cu` sources also compile as C++ against `kernels/simt.hpp` and run on the CPU under a deterministic
//! emulation of CUDA threads ([`emulation`], test builds), so CI checks every kernel against its twin without a GPU;
//! `tests/ptx.rs` checks the PTX itself (ptxas, spills, shared memory, entry parameters) wherever nvcc is present.
//! [`kernel`] describes kernels and launches the same way for all of them.

pub mod adamw;
pub mod attention;
pub mod attention_cpu;
pub mod float;
mod handover;
pub mod kernel;
pub mod logprobs;
pub mod lora;
pub mod operand;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
/// Test and benchmark helpers: compiled for tests only (the `testing` feature, which dev-dependencies enable).
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
/// Where nvcc is and the flags the kernels are compiled with (build.rs includes the same file).
pub mod toolchain;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emulation")]
pub mod emulation;

/// Which kernels this build carries: "cpu only", or "cuda: PTX compute_80, CUDA 13.0" (the PTX target of
/// `kernels/nvcc.flags` and the release of the nvcc that compiled them; build.rs).
pub const BUILD: &str = env!("KTO_KERNELS_BUILD");

/// Every kernel of the crate (for the PTX checks and the launch-declaration tests).
pub fn all_kernels() -> Vec<&'static kernel::Kernel> {
    vec![
        &rmsnorm::RMSNORM_FWD,
        &rmsnorm::RMSNORM_BWD,
        &rope::ROPE_FWD,
        &rope::ROPE_BWD,
        &attention::MASKED_SOFTMAX_FWD,
        &attention::MASKED_SOFTMAX_BWD,
        &lora::LORA_EPILOGUE,
        &adamw::ADAMW,
        &adamw::GRAD_SUMSQ,
        &swiglu::SWIGLU_FWD,
        &swiglu::SWIGLU_BWD,
        &logprobs::LOGPROB_FWD,
        &logprobs::LOGPROB_BWD,
    ]
}
