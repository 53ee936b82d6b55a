//! Rotate-half RoPE as transformers' Llama computes it, `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [−x2, x1]`
//! and angles `position · inv_freq[i mod head_dim/2]` in f32, fused with the layout change attention wants: it reads
//! x [rows, tokens, heads, head_dim] through its strides (a narrow of a fused q|k|v projection needs no copy) and
//! writes contiguous [rows, heads, tokens, head_dim]. The backward is the inverse rotation and the reverse layout
//! change. In bf16/f16, cos and sin are rounded to the dtype, and so is each product and the sum, as transformers'
//! tensor ops round them.

use crate::float::{round_to, Float};
use crate::kernel::{Arg, Launch};
use crate::{kernels, with_float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

kernels! {
    module "rope";
    /// One thread per (row, token, pair i): rotates the pair (i, i + half) of every head by +angle.
    pub ROPE_FWD = rope_fwd [F32 f32, BF16 bf16, F16 f16]
        (input: Ptr, positions: Ptr, inv_freq: Ptr, out: Ptr, rows: I32, tokens: I32, heads: I32, head_dim: I32,
         in_row_stride: I32, in_token_stride: I32, in_head_stride: I32,
         out_row_stride: I32, out_token_stride: I32, out_head_stride: I32) max_threads 256, shared 0;
    /// The same launch rotating by −angle: the input gradient from the output gradient.
    pub ROPE_BWD = rope_bwd [F32 f32, BF16 bf16, F16 f16]
        (input: Ptr, positions: Ptr, inv_freq: Ptr, out: Ptr, rows: I32, tokens: I32, heads: I32, head_dim: I32,
         in_row_stride: I32, in_token_stride: I32, in_head_stride: I32,
         out_row_stride: I32, out_token_stride: I32, out_head_stride: I32) max_threads 256, shared 0;
}

/// The extents of a rotation: x is [rows, tokens, heads, head_dim].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeDims {
    pub rows: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Element strides of one (row, token, head) vector of head_dim contiguous elements, whatever the dimension order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    pub row: usize,
    pub token: usize,
    pub head: usize,
}

impl RopeDims {
    pub fn len(&self) -> usize {
        self.rows * self.tokens * self.heads * self.head_dim
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The strides of contiguous [rows, heads, tokens, head_dim]: the forward's output, the backward's input.
    pub fn heads_major(&self) -> Strides {
        Strides {
            row: self.heads * self.tokens * self.head_dim,
            token: self.head_dim,
            head: self.tokens * self.head_dim,
        }
    }

    /// The strides of contiguous [rows, tokens, heads, head_dim]: the backward's output.
    pub fn tokens_major(&self) -> Strides {
        Strides {
            row: self.tokens * self.heads * self.head_dim,
            token: self.heads * self.head_dim,
            head: self.head_dim,
        }
    }

    /// Elements from the first to one past the last of a view with `strides` (0 when empty).
    pub fn span(&self, strides: Strides) -> usize {
        if self.is_empty() {
            return 0;
        }
        1 + (self.rows - 1) * strides.row
            + (self.tokens - 1) * strides.token
            + (self.heads - 1) * strides.head
            + (self.head_dim - 1)
    }
}

const BLOCK_THREADS: usize = 256;

fn to_i32(v: usize, what: &str) -> Result<Arg> {
    match i32::try_from(v) {
        Ok(v) => Ok(Arg::I32(v)),
        Err(_) => bail!("rope: {what} {v} is out of range"),
    }
}

#[allow(clippy::too_many_arguments)]
fn launch(
    kernel: &'static crate::kernel::Kernel,
    dtype: DType,
    dims: RopeDims,
    input: Arg,
    in_strides: Strides,
    positions: Arg,
    inv_freq: Arg,
    out: Arg,
    out_strides: Strides,
) -> Result<Launch> {
    if dims.head_dim == 0 || !dims.head_dim.is_multiple_of(2) {
        bail!("rope: head_dim {} must be even", dims.head_dim);
    }
    let pairs = dims.rows * dims.tokens * (dims.head_dim / 2);
    let block = pairs.next_multiple_of(32).clamp(32, BLOCK_THREADS);
    let grid = pairs.div_ceil(block);
    if grid > i32::MAX as usize {
        bail!("rope: {pairs} (row, token, pair) items are too many for one launch");
    }
    let args = vec![
        input,
        positions,
        inv_freq,
        out,
        to_i32(dims.rows, "rows")?,
        to_i32(dims.tokens, "tokens")?,
        to_i32(dims.heads, "heads")?,
        to_i32(dims.head_dim, "head_dim")?,
        to_i32(in_strides.row, "input row stride")?,
        to_i32(in_strides.token, "input token stride")?,
        to_i32(in_strides.head, "input head stride")?,
        to_i32(out_strides.row, "output row stride")?,
        to_i32(out_strides.token, "output token stride")?,
        to_i32(out_strides.head, "output head stride")?,
    ];
    Launch::new(
        kernel,
        dtype,
        [grid as u32, 1, 1],
        [block as u32, 1, 1],
        0,
        args,
    )
}

/// The forward launch: `x` (the address of its first element) read through `x_strides`, `out` contiguous
/// [rows, heads, tokens, head_dim]; `positions` u32 [rows, tokens], `inv_freq` f32 [head_dim / 2].
pub fn forward_launch(
    dtype: DType,
    dims: RopeDims,
    x: Arg,
    x_strides: Strides,
    positions: Arg,
    inv_freq: Arg,
    out: Arg,
) -> Result<Launch> {
    launch(
        &ROPE_FWD,
        dtype,
        dims,
        x,
        x_strides,
        positions,
        inv_freq,
        out,
        dims.heads_major(),
    )
}

/// The backward launch: `grad` [rows, heads, tokens, head_dim] read through `grad_strides`, `dx` contiguous
/// [rows, tokens, heads, head_dim].
pub fn backward_launch(
    dtype: DType,
    dims: RopeDims,
    grad: Arg,
    grad_strides: Strides,
    positions: Arg,
    inv_freq: Arg,
    dx: Arg,
) -> Result<Launch> {
    launch(
        &ROPE_BWD,
        dtype,
        dims,
        grad,
        grad_strides,
        positions,
        inv_freq,
        dx,
        dims.tokens_major(),
    )
}

/// (cos, sin) of `position · inv_freq[i]` for every (row, token) and pair i, computed in f32 and rounded to T.
fn angles<T: Float>(positions: &[u32], inv_freq: &[f32]) -> Vec<(f32, f32)> {
    let half = inv_freq.len();
    let mut table = vec![(0f32, 0f32); positions.len() * half];
    if half > 0 {
        table
            .par_chunks_mut(half)
            .zip(positions.par_iter())
            .for_each(|(row, &p)| {
                for (cs, &f) in row.iter_mut().zip(inv_freq) {
                    let angle = p as f32 * f;
                    *cs = (round_to::<T>(angle.cos()), round_to::<T>(angle.sin()));
                }
            });
    }
    table
}

/// Rotates one head vector: `dst = src·c − rotate_half(src)·(sin_sign·s)` pair by pair, with the dtype's roundings.
fn rotate<T: Float>(src: &[T], dst: &mut [T], angles: &[(f32, f32)], sin_sign: f32) {
    let half = dst.len() / 2;
    let (lo, hi) = dst.split_at_mut(half);
    for (i, &(c, s)) in angles.iter().enumerate() {
        let s = sin_sign * s;
        let (a, b) = (src[i].to_f32(), src[i + half].to_f32());
        lo[i] = T::from_f32(round_to::<T>(a * c) - round_to::<T>(b * s));
        hi[i] = T::from_f32(round_to::<T>(b * c) + round_to::<T>(a * s));
    }
}

/// CPU twin of the forward: `x` starts at the view's first element and is read through `x_strides`; `out` is
/// contiguous [rows, heads, tokens, head_dim]. Parallel over (row, head).
pub fn forward_twin<T: Float>(
    dims: RopeDims,
    x: &[T],
    x_strides: Strides,
    positions: &[u32],
    inv_freq: &[f32],
    out: &mut [T],
) {
    if dims.is_empty() {
        return;
    }
    let (d, half) = (dims.head_dim, dims.head_dim / 2);
    let table = angles::<T>(positions, inv_freq);
    out.par_chunks_mut(dims.tokens * d)
        .enumerate()
        .for_each(|(k, block)| {
            let (row, head) = (k / dims.heads, k % dims.heads);
            for (token, dst) in block.chunks_mut(d).enumerate() {
                let at = row * x_strides.row + token * x_strides.token + head * x_strides.head;
                let cs = &table[(row * dims.tokens + token) * half..][..half];
                rotate(&x[at..at + d], dst, cs, 1.0);
            }
        });
}

/// CPU twin of the backward: `grad` [rows, heads, tokens, head_dim] read through `grad_strides`; `dx` is contiguous
/// [rows, tokens, heads, head_dim]. Parallel over (row, token).
pub fn backward_twin<T: Float>(
    dims: RopeDims,
    grad: &[T],
    grad_strides: Strides,
    positions: &[u32],
    inv_freq: &[f32],
    dx: &mut [T],
) {
    if dims.is_empty() {
        return;
    }
    let (d, half) = (dims.head_dim, dims.head_dim / 2);
    let table = angles::<T>(positions, inv_freq);
    dx.par_chunks_mut(dims.heads * d)
        .enumerate()
        .for_each(|(row_token, block)| {
            let (row, token) = (row_token / dims.tokens, row_token % dims.tokens);
            let cs = &table[row_token * half..][..half];
            for (head, dst) in block.chunks_mut(d).enumerate() {
                let at =
                    row * grad_strides.row + token * grad_strides.token + head * grad_strides.head;
                rotate(&grad[at..at + d], dst, cs, -1.0);
            }
        });
}

/// RoPE of `x` [rows, tokens, heads, head_dim] (any strides with head_dim contiguous, e.g. a narrow of a fused
/// projection) at `positions` u32 [rows, tokens], with `inv_freq` f32 [head_dim / 2] (rope scaling folded in).
/// Returns contiguous [rows, heads, tokens, head_dim]; differentiable in `x`.
pub fn rope(x: &Tensor, positions: &Tensor, inv_freq: &Tensor) -> Result<Tensor> {
    let (rows, tokens, _, head_dim) = x.dims4()?;
    let x = if x.stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op1(Rotation::new(
        Direction::Forward,
        rows,
        tokens,
        head_dim,
        positions,
        inv_freq,
        x.device(),
    )?)
}

/// The input gradient of [`rope`]: `grad` [rows, heads, tokens, head_dim] (head_dim contiguous) rotated back, as
/// contiguous [rows, tokens, heads, head_dim].
pub fn rope_backward(grad: &Tensor, positions: &Tensor, inv_freq: &Tensor) -> Result<Tensor> {
    let (rows, _, tokens, head_dim) = grad.dims4()?;
    let grad = if grad.stride()[3] == 1 {
        grad.clone()
    } else {
        grad.contiguous()?
    };
    let op = Rotation::new(
        Direction::Backward,
        rows,
        tokens,
        head_dim,
        positions,
        inv_freq,
        grad.device(),
    )?;
    grad.apply_op1_no_bwd(&op)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// [rows, tokens, heads, d] → [rows, heads, tokens, d], rotating by +angle.
    Forward,
    /// [rows, heads, tokens, d] → [rows, tokens, heads, d], rotating by −angle.
    Backward,
}

/// The op either way: positions and inv_freq travel with it (neither takes a gradient).
struct Rotation {
    direction: Direction,
    positions: Tensor,
    inv_freq: Tensor,
}

impl Rotation {
    fn new(
        direction: Direction,
        rows: usize,
        tokens: usize,
        head_dim: usize,
        positions: &Tensor,
        inv_freq: &Tensor,
        device: &candle_core::Device,
    ) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("rope: head_dim {head_dim} must be even");
        }
        if positions.dims() != [rows, tokens] || positions.dtype() != DType::U32 {
            bail!(
                "rope: positions must be u32 [{rows}, {tokens}], got {:?} {:?}",
                positions.dtype(),
                positions.shape()
            );
        }
        if inv_freq.dims() != [head_dim / 2] || inv_freq.dtype() != DType::F32 {
            bail!(
                "rope: inv_freq must be f32 [{}], got {:?} {:?}",
                head_dim / 2,
                inv_freq.dtype(),
                inv_freq.shape()
            );
        }
        if !positions.device().same_device(device) || !inv_freq.device().same_device(device) {
            bail!("rope: positions and inv_freq must be on the input's device");
        }
        Ok(Self {
            direction,
            positions: positions.detach().contiguous()?,
            inv_freq: inv_freq.detach().contiguous()?,
        })
    }

    /// The rotation's extents, the input's strides and the output's shape, from the input layout.
    fn view(&self, layout: &Layout) -> Result<(RopeDims, Strides, Shape)> {
        let (dims, stride) = (layout.dims(), layout.stride());
        if dims.len() != 4 || stride[3] != 1 {
            bail!("rope: input must be 4-d with a contiguous last dimension (layout {layout:?})");
        }
        // a size-1 dimension's stride is never used: 0 keeps a meaningless large one from failing the range check
        let s = |k: usize| if dims[k] == 1 { 0 } else { stride[k] };
        Ok(match self.direction {
            Direction::Forward => (
                RopeDims {
                    rows: dims[0],
                    tokens: dims[1],
                    heads: dims[2],
                    head_dim: dims[3],
                },
                Strides {
                    row: s(0),
                    token: s(1),
                    head: s(2),
                },
                Shape::from((dims[0], dims[2], dims[1], dims[3])),
            ),
            Direction::Backward => (
                RopeDims {
                    rows: dims[0],
                    tokens: dims[2],
                    heads: dims[1],
                    head_dim: dims[3],
                },
                Strides {
                    row: s(0),
                    token: s(2),
                    head: s(1),
                },
                Shape::from((dims[0], dims[2], dims[1], dims[3])),
            ),
        })
    }
}

/// The run of storage elements a strided view reads, from its first element to its last: what both faces require
/// to be inside the storage (the kernel and the twin read the view through its strides).
fn covering_run(layout: &Layout, dims: RopeDims, strides: Strides) -> Layout {
    Layout::contiguous_with_offset(dims.span(strides), layout.start_offset())
}

impl CustomOp1 for Rotation {
    fn name(&self) -> &'static str {
        match self.direction {
            Direction::Forward => "kto-rope",
            Direction::Backward => "kto-rope-backward",
        }
    }

    fn cpu_fwd(&self, input: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (dims, strides, shape) = self.view(layout)?;
        let (p, p_layout) = self.positions.storage_and_layout();
        let Storage::Cpu(p) = &*p else {
            bail!("rope: positions not on the CPU")
        };
        let (f, f_layout) = self.inv_freq.storage_and_layout();
        let Storage::Cpu(f) = &*f else {
            bail!("rope: inv_freq not on the CPU")
        };
        let positions = crate::float::u32_slice(p, p_layout, "rope positions")?;
        let inv_freq = <f32 as Float>::slice(f, f_layout, "rope inv_freq")?;
        with_float!(input.dtype(), "rope", |T| {
            let xs = T::slice(input, &covering_run(layout, dims, strides), "rope input")?;
            let mut out = vec![T::default(); dims.len()];
            match self.direction {
                Direction::Forward => {
                    forward_twin(dims, xs, strides, positions, inv_freq, &mut out)
                }
                Direction::Backward => {
                    backward_twin(dims, xs, strides, positions, inv_freq, &mut out)
                }
            }
            Ok((T::storage(out), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        input: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, strides, shape) = self.view(layout)?;
        let (p, p_layout) = self.positions.storage_and_layout();
        let Storage::Cuda(p) = &*p else {
            bail!("rope: positions not on the GPU")
        };
        let (f, f_layout) = self.inv_freq.storage_and_layout();
        let Storage::Cuda(f) = &*f else {
            bail!("rope: inv_freq not on the GPU")
        };
        let dtype = input.dtype();
        let out = crate::cuda::output(&input.device, dtype, dims.len(), |stream, out| {
            let run = covering_run(layout, dims, strides);
            let xa = crate::cuda::address("rope input", input, &run, stream)?;
            let pa = crate::cuda::address("rope positions", p, p_layout, stream)?;
            let fa = crate::cuda::address("rope inv_freq", f, f_layout, stream)?;
            let launch = match self.direction {
                Direction::Forward => {
                    forward_launch(dtype, dims, xa.arg(), strides, pa.arg(), fa.arg(), out)?
                }
                Direction::Backward => {
                    backward_launch(dtype, dims, xa.arg(), strides, pa.arg(), fa.arg(), out)?
                }
            };
            crate::cuda::run(&input.device, &launch)
        })?;
        Ok((out, shape))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        match self.direction {
            Direction::Forward => Ok(Some(rope_backward(grad, &self.positions, &self.inv_freq)?)),
            Direction::Backward => bail!("rope: the backward rotation is not differentiated"),
        }
    }
}
