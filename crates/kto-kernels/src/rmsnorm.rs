//! RMSNorm with a frozen weight, as transformers' `LlamaRMSNorm`: `w · round(x · rsqrt(mean(x²) + eps))`, the
//! statistics in f32 and one rounding to the input dtype before the weight. Backward gives the input gradient only.

use crate::float::{round_to, Float};
use crate::kernel::{Arg, Launch};
use crate::{kernels, with_float};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

kernels! {
    module "rmsnorm";
    /// One block per row: `y = w · round(x · rstd)`.
    pub RMSNORM_FWD = rmsnorm_fwd [F32 f32, BF16 bf16, F16 f16]
        (x: Ptr, weight: Ptr, y: Ptr, rows: I32, dim: I32, eps: F32) max_threads 1024, shared 0;
    /// One block per row: `dx = rstd · (g·w − n · mean(g·w·n))`.
    pub RMSNORM_BWD = rmsnorm_bwd [F32 f32, BF16 bf16, F16 f16]
        (x: Ptr, weight: Ptr, grad: Ptr, dx: Ptr, rows: I32, dim: I32, eps: F32) max_threads 1024, shared 0;
}

/// Threads per row: about four elements each, whole warps, at most 1024.
fn block_threads(dim: usize) -> u32 {
    (dim.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32
}

fn check_rows(rows: usize, dim: usize) -> Result<()> {
    if rows > i32::MAX as usize || dim > i32::MAX as usize || dim == 0 {
        bail!("rms-norm: {rows} rows of {dim} elements are out of range");
    }
    Ok(())
}

/// The forward launch over `rows` rows of `dim` elements.
pub fn forward_launch(
    dtype: DType,
    rows: usize,
    dim: usize,
    eps: f32,
    x: Arg,
    weight: Arg,
    y: Arg,
) -> Result<Launch> {
    check_rows(rows, dim)?;
    let args = vec![
        x,
        weight,
        y,
        Arg::I32(rows as i32),
        Arg::I32(dim as i32),
        Arg::F32(eps),
    ];
    Launch::new(
        &RMSNORM_FWD,
        dtype,
        [rows as u32, 1, 1],
        [block_threads(dim), 1, 1],
        0,
        args,
    )
}

/// The backward launch: `dx` from `x` and the output gradient `grad`.
#[allow(clippy::too_many_arguments)]
pub fn backward_launch(
    dtype: DType,
    rows: usize,
    dim: usize,
    eps: f32,
    x: Arg,
    weight: Arg,
    grad: Arg,
    dx: Arg,
) -> Result<Launch> {
    check_rows(rows, dim)?;
    let args = vec![
        x,
        weight,
        grad,
        dx,
        Arg::I32(rows as i32),
        Arg::I32(dim as i32),
        Arg::F32(eps),
    ];
    Launch::new(
        &RMSNORM_BWD,
        dtype,
        [rows as u32, 1, 1],
        [block_threads(dim), 1, 1],
        0,
        args,
    )
}

/// CPU twin of the forward: rows of `weight.len()` elements.
pub fn forward_twin<T: Float>(x: &[T], weight: &[T], y: &mut [T], eps: f32) {
    let dim = weight.len();
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(yr, xr)| {
            let squares: f32 = xr.iter().map(|v| v.to_f32() * v.to_f32()).sum();
            let rstd = 1.0 / (squares / dim as f32 + eps).sqrt();
            for ((y, x), w) in yr.iter_mut().zip(xr).zip(weight) {
                *y = T::from_f32(w.to_f32() * round_to::<T>(x.to_f32() * rstd));
            }
        });
}

/// CPU twin of the backward.
pub fn backward_twin<T: Float>(x: &[T], weight: &[T], grad: &[T], dx: &mut [T], eps: f32) {
    let dim = weight.len();
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(grad.par_chunks(dim)))
        .for_each(|(dr, (xr, gr))| {
            let mut squares = 0f32;
            let mut dot = 0f32;
            for ((x, g), w) in xr.iter().zip(gr).zip(weight) {
                let v = x.to_f32();
                squares += v * v;
                dot += g.to_f32() * w.to_f32() * v;
            }
            let rstd = 1.0 / (squares / dim as f32 + eps).sqrt();
            let mean_gn = dot * rstd / dim as f32;
            for (((d, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(weight) {
                let n = x.to_f32() * rstd;
                *d = T::from_f32(rstd * (g.to_f32() * w.to_f32() - n * mean_gn));
            }
        });
}

/// RMSNorm of `x` [..., dim] with the frozen `weight` [dim] (same dtype); differentiable in `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [dim] {
        bail!(
            "rms-norm: weight {:?} for an input of {dim} features",
            weight.shape()
        );
    }
    if weight.dtype() != x.dtype() {
        bail!(
            "rms-norm: weight is {:?}, input {:?}",
            weight.dtype(),
            x.dtype()
        );
    }
    x.contiguous()?.apply_op1(RmsNorm {
        weight: weight.detach().contiguous()?,
        eps: eps as f32,
    })
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

/// The input gradient of [`rms_norm`] for the output gradient `grad`.
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, grad: &Tensor, eps: f64) -> Result<Tensor> {
    let grad = grad.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(
        &grad,
        &RmsNormBackward {
            weight: weight.detach().contiguous()?,
            eps: eps as f32,
        },
    )
}

struct RmsNormBackward {
    weight: Tensor,
    eps: f32,
}

#[cfg(feature = "cuda")]
fn rows_of(layout: &Layout, weight: &Tensor) -> (usize, usize) {
    let dim = weight.elem_count();
    (layout.shape().elem_count() / dim, dim)
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "kto-rms-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            bail!("rms-norm: weight not on the CPU")
        };
        with_float!(x.dtype(), "rms-norm", |T| {
            let xs = T::slice(x, layout, "rms-norm input")?;
            let ws = T::slice(w, w_layout, "rms-norm weight")?;
            let mut y = vec![T::default(); xs.len()];
            forward_twin(xs, ws, &mut y, self.eps);
            Ok((T::storage(y), layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, w_layout) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w else {
            bail!("rms-norm: weight not on the GPU")
        };
        let (rows, dim) = rows_of(layout, &self.weight);
        let out = crate::cuda::output(
            &x.device,
            x.dtype(),
            layout.shape().elem_count(),
            |stream, y| {
                let xa = crate::cuda::address("rms_norm x", x, layout, stream)?;
                let wa = crate::cuda::address("rms_norm weight", w, w_layout, stream)?;
                let launch = forward_launch(x.dtype(), rows, dim, self.eps, xa.arg(), wa.arg(), y)?;
                crate::cuda::run(&x.device, &launch)
            },
        )?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rms_norm_backward(
            x,
            &self.weight,
            grad,
            self.eps as f64,
        )?))
    }
}

impl CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "kto-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            bail!("rms-norm: weight not on the CPU")
        };
        with_float!(x.dtype(), "rms-norm backward", |T| {
            let xs = T::slice(x, x_layout, "rms-norm input")?;
            let ws = T::slice(w, w_layout, "rms-norm weight")?;
            let gs = T::slice(g, g_layout, "rms-norm gradient")?;
            let mut dx = vec![T::default(); xs.len()];
            backward_twin(xs, ws, gs, &mut dx, self.eps);
            Ok((T::storage(dx), x_layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        g: &candle_core::CudaStorage,
        g_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, w_layout) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w else {
            bail!("rms-norm: weight not on the GPU")
        };
        let (rows, dim) = rows_of(x_layout, &self.weight);
        let out = crate::cuda::output(
            &x.device,
            x.dtype(),
            x_layout.shape().elem_count(),
            |stream, dx| {
                let xa = crate::cuda::address("rms_norm backward x", x, x_layout, stream)?;
                let wa = crate::cuda::address("rms_norm weight", w, w_layout, stream)?;
                let ga = crate::cuda::address("rms_norm backward gradient", g, g_layout, stream)?;
                let launch = backward_launch(
                    x.dtype(),
                    rows,
                    dim,
                    self.eps,
                    xa.arg(),
                    wa.arg(),
                    ga.arg(),
                    dx,
                )?;
                crate::cuda::run(&x.device, &launch)
            },
        )?;
        Ok((out, x_layout.shape().clone()))
    }
}
