//! SwiGLU over one fused gate/up projection, as transformers' Llama MLP computes `act(gate) * up` in bf16/f16:
//! `out = round(round(silu(gate)) · up)`, silu in f32 rounded to the dtype, the product in f32 rounded once more.
//! `gate_up` [..., 2·I] holds gate in columns `[0, I)` and up in `[I, 2I)` of each row; `out` is [..., I].
//! Backward gives `d gate_up` [..., 2I] in f32 math with one rounding per element.

use crate::float::{round_to, Float};
use crate::kernel::{Arg, Launch};
use crate::{kernels, with_float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

kernels! {
    module "swiglu";
    /// Columns over x, rows strided over y: `out = round(silu(gate)) · up`.
    pub SWIGLU_FWD = swiglu_fwd [F32 f32, BF16 bf16, F16 f16]
        (gate_up: Ptr, out: Ptr, rows: I32, inner: I32) max_threads 256, shared 0;
    /// Columns over x, rows strided over y: `d gate_up` from `gate_up` and the output gradient.
    pub SWIGLU_BWD = swiglu_bwd [F32 f32, BF16 bf16, F16 f16]
        (gate_up: Ptr, grad: Ptr, d_gate_up: Ptr, rows: I32, inner: I32) max_threads 256, shared 0;
}

/// Block rows at most: 4096 × the column blocks fill any GPU, and stay below CUDA's 65535 limit on the y grid;
/// beyond it each thread strides over several rows.
pub const MAX_ROW_BLOCKS: usize = 4096;

/// The grid and block for `rows` rows of `inner` outputs: up to 256 threads over the columns (whole warps), one
/// block row per row up to [`MAX_ROW_BLOCKS`].
fn launch_shape(rows: usize, inner: usize) -> Result<([u32; 3], [u32; 3])> {
    if rows > i32::MAX as usize || inner == 0 || 2 * inner > i32::MAX as usize {
        bail!("swiglu: {rows} rows of {inner} outputs are out of range");
    }
    let threads = inner.next_multiple_of(32).min(256);
    let grid = [
        inner.div_ceil(threads) as u32,
        rows.min(MAX_ROW_BLOCKS) as u32,
        1,
    ];
    Ok((grid, [threads as u32, 1, 1]))
}

/// The forward launch over `rows` rows: `gate_up` [rows, 2·inner] → `out` [rows, inner].
pub fn forward_launch(
    dtype: DType,
    rows: usize,
    inner: usize,
    gate_up: Arg,
    out: Arg,
) -> Result<Launch> {
    let (grid, block) = launch_shape(rows, inner)?;
    let args = vec![gate_up, out, Arg::I32(rows as i32), Arg::I32(inner as i32)];
    Launch::new(&SWIGLU_FWD, dtype, grid, block, 0, args)
}

/// The backward launch: `d_gate_up` [rows, 2·inner] from `gate_up` and the output gradient `grad` [rows, inner].
pub fn backward_launch(
    dtype: DType,
    rows: usize,
    inner: usize,
    gate_up: Arg,
    grad: Arg,
    d_gate_up: Arg,
) -> Result<Launch> {
    let (grid, block) = launch_shape(rows, inner)?;
    let args = vec![
        gate_up,
        grad,
        d_gate_up,
        Arg::I32(rows as i32),
        Arg::I32(inner as i32),
    ];
    Launch::new(&SWIGLU_BWD, dtype, grid, block, 0, args)
}

/// Rows per rayon task: about 16k outputs each, so short rows do not drown in scheduling.
fn rows_per_task(inner: usize) -> usize {
    (16_384 / inner.max(1)).max(1)
}

/// σ(x); e^−x overflows to inf below −88, which gives 0 (not NaN).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The kernel's (and torch's) expression, so f32 results agree bit for bit with the emulation.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// CPU twin of the forward: `gate_up` rows of `2·inner`, `out` rows of `inner`.
pub fn forward_twin<T: Float>(gate_up: &[T], out: &mut [T], inner: usize) {
    let rows = rows_per_task(inner);
    out.par_chunks_mut(rows * inner)
        .zip(gate_up.par_chunks(rows * 2 * inner))
        .for_each(|(out, gate_up)| {
            for (out, row) in out
                .chunks_exact_mut(inner)
                .zip(gate_up.chunks_exact(2 * inner))
            {
                let (gate, up) = row.split_at(inner);
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = T::from_f32(round_to::<T>(silu(g.to_f32())) * u.to_f32());
                }
            }
        });
}

/// CPU twin of the backward: `d_gate_up` (rows of `2·inner`) from `gate_up` and `grad` (rows of `inner`).
pub fn backward_twin<T: Float>(gate_up: &[T], grad: &[T], d_gate_up: &mut [T], inner: usize) {
    let rows = rows_per_task(inner);
    d_gate_up
        .par_chunks_mut(rows * 2 * inner)
        .zip(
            gate_up
                .par_chunks(rows * 2 * inner)
                .zip(grad.par_chunks(rows * inner)),
        )
        .for_each(|(d_gate_up, (gate_up, grad))| {
            let rows = d_gate_up
                .chunks_exact_mut(2 * inner)
                .zip(gate_up.chunks_exact(2 * inner));
            for ((d_row, row), grad) in rows.zip(grad.chunks_exact(inner)) {
                let (gate, up) = row.split_at(inner);
                let (d_gate, d_up) = d_row.split_at_mut(inner);
                for ((((dg, du), g), u), gr) in
                    d_gate.iter_mut().zip(d_up).zip(gate).zip(up).zip(grad)
                {
                    let (gate, up, gr) = (g.to_f32(), u.to_f32(), gr.to_f32());
                    let s = sigmoid(gate);
                    *dg = T::from_f32(gr * up * s * (1.0 + gate * (1.0 - s)));
                    *du = T::from_f32(gr * (gate * s));
                }
            }
        });
}

/// `I` for a fused projection of shape [..., 2·I].
fn inner_of(dims: &[usize]) -> Result<usize> {
    match dims.last() {
        Some(&d) if d > 0 && d % 2 == 0 => Ok(d / 2),
        _ => bail!("swiglu: gate_up {dims:?} must end in an even, non-zero dimension (gate and up side by side)"),
    }
}

/// The output shape [..., I] of a [..., 2·I] input.
fn halved(shape: &Shape) -> Result<Shape> {
    let mut dims = shape.dims().to_vec();
    let inner = inner_of(&dims)?;
    *dims.last_mut().unwrap() = inner;
    Ok(Shape::from(dims))
}

/// `silu(gate) · up` of a fused projection `gate_up` [..., 2·I] (gate first), as [..., I] in its dtype;
/// differentiable in `gate_up`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    inner_of(gate_up.dims())?;
    gate_up.contiguous()?.apply_op1(Swiglu)
}

/// The gradient w.r.t. `gate_up` [..., 2·I] of [`swiglu`] for the output gradient `grad` [..., I].
pub fn swiglu_backward(gate_up: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let out_shape = halved(gate_up.shape())?;
    if grad.shape() != &out_shape {
        bail!(
            "swiglu backward: gradient {:?} for an output {out_shape:?}",
            grad.shape()
        );
    }
    let grad = grad.to_dtype(gate_up.dtype())?.contiguous()?;
    gate_up
        .contiguous()?
        .apply_op2_no_bwd(&grad, &SwigluBackward)
}

struct Swiglu;
struct SwigluBackward;

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "kto-swiglu"
    }

    fn cpu_fwd(&self, gate_up: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = halved(layout.shape())?;
        let inner = inner_of(layout.dims())?;
        with_float!(gate_up.dtype(), "swiglu", |T| {
            let xs = T::slice(gate_up, layout, "swiglu input")?;
            let mut out = vec![T::default(); shape.elem_count()];
            forward_twin(xs, &mut out, inner);
            Ok((T::storage(out), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate_up: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = halved(layout.shape())?;
        let inner = inner_of(layout.dims())?;
        let rows = shape.elem_count() / inner;
        let out = crate::cuda::output(
            &gate_up.device,
            gate_up.dtype(),
            shape.elem_count(),
            |stream, out| {
                let xa = crate::cuda::address("swiglu gate_up", gate_up, layout, stream)?;
                let launch = forward_launch(gate_up.dtype(), rows, inner, xa.arg(), out)?;
                crate::cuda::run(&gate_up.device, &launch)
            },
        )?;
        Ok((out, shape))
    }

    fn bwd(&self, gate_up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(swiglu_backward(gate_up, grad)?))
    }
}

impl CustomOp2 for SwigluBackward {
    fn name(&self) -> &'static str {
        "kto-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gate_up: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inner = inner_of(x_layout.dims())?;
        with_float!(gate_up.dtype(), "swiglu backward", |T| {
            let xs = T::slice(gate_up, x_layout, "swiglu input")?;
            let gs = T::slice(grad, g_layout, "swiglu gradient")?;
            let mut dx = vec![T::default(); xs.len()];
            backward_twin(xs, gs, &mut dx, inner);
            Ok((T::storage(dx), x_layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate_up: &candle_core::CudaStorage,
        x_layout: &Layout,
        grad: &candle_core::CudaStorage,
        g_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let inner = inner_of(x_layout.dims())?;
        let len = x_layout.shape().elem_count();
        let rows = len / (2 * inner);
        let out = crate::cuda::output(&gate_up.device, gate_up.dtype(), len, |stream, dx| {
            let xa = crate::cuda::address("swiglu backward gate_up", gate_up, x_layout, stream)?;
            let ga = crate::cuda::address("swiglu backward gradient", grad, g_layout, stream)?;
            let launch = backward_launch(gate_up.dtype(), rows, inner, xa.arg(), ga.arg(), dx)?;
            crate::cuda::run(&gate_up.device, &launch)
        })?;
        Ok((out, x_layout.shape().clone()))
    }
}
