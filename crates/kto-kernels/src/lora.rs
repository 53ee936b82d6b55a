//! The LoRA epilogue: `out = round(base + scale · h · Bᵀ)`, the last step of a LoRA linear whose base output `base`
//! is in the model dtype while `h = x · Aᵀ` [M, r] and `B` [N, r] are f32 (PEFT's semantics: the adapter runs in
//! f32, the sum is taken in f32 and cast back once). Fusing it avoids the [M, N] f32 delta and the passes that add
//! and cast it.
//!
//! Segments serve a fused projection (q|k|v) whose adapters share one `x · Aᵀ` GEMM: `h` is [M, S·r] and output
//! column n belongs to the last segment s with `segment_starts[s] ≤ n`, using `h[:, s·r .. (s+1)·r]` and row n of B.
//!
//! Backward: `d base = g`; per segment `dh_s = scale · g_s · B_s` and `dB_s = scale · g_sᵀ · h_s` with `g` cast to f32
//! (as PEFT's autograd does) — GEMMs, so candle's matmul (cuBLAS on the GPU) does them.

use crate::float::Float;
use crate::kernel::{Arg, Launch};
use crate::{kernels, with_float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The most segments one call takes (q|k|v needs three).
pub const MAX_SEGMENTS: usize = 4;
/// Rank steps the kernel's shared-memory tiles hold at once (`kRankChunk` in lora.cu); a larger rank is taken in
/// chunks of this many.
pub const RANK_CHUNK: usize = 64;

/// Output tile of one block, threads per block: as `kTileRows`, `kTileCols` and the 16 × 16 threads in lora.cu.
const TILE_ROWS: usize = 64;
const TILE_COLS: usize = 64;
const BLOCK_THREADS: u32 = 256;

/// Dynamic shared memory of a launch: the transposed h and B tiles of one rank chunk, each padded by one word per
/// rank step.
const fn shared_bytes(rank: usize) -> usize {
    let chunk = if rank < RANK_CHUNK { rank } else { RANK_CHUNK };
    chunk * ((TILE_ROWS + 1) + (TILE_COLS + 1)) * std::mem::size_of::<f32>()
}

kernels! {
    module "lora";
    /// 64×64 output tiles, 256 threads of 4×4 outputs: `out = round(base + scale · h_seg · Bᵀ)`.
    pub LORA_EPILOGUE = lora_epilogue [F32 f32, BF16 bf16, F16 f16]
        (base: Ptr, h: Ptr, b: Ptr, out: Ptr, rows: I32, cols: I32, rank: I32, segments: I32, start1: I32,
         start2: I32, start3: I32, scale: F32) max_threads 256, shared 33280;
}
// The declared bound is the largest launch's: every rank from RANK_CHUNK up.
const _: () = assert!(shared_bytes(RANK_CHUNK) == 33280 && shared_bytes(4 * RANK_CHUNK) == 33280);

/// Fails unless the segments are 1..=[`MAX_SEGMENTS`] strictly increasing starts beginning at 0, all below `cols`.
fn check_segments(cols: usize, segment_starts: &[usize]) -> Result<()> {
    let valid = !segment_starts.is_empty()
        && segment_starts.len() <= MAX_SEGMENTS
        && segment_starts[0] == 0
        && segment_starts.windows(2).all(|w| w[0] < w[1])
        && segment_starts.iter().all(|&s| s < cols);
    if !valid {
        bail!(
            "lora epilogue: segment starts {segment_starts:?} for {cols} columns (1 to {MAX_SEGMENTS} strictly \
             increasing starts, the first 0, all below the column count)"
        );
    }
    Ok(())
}

/// The launch over `rows` × `cols` outputs: `base` and `out` [rows, cols] in `dtype`, `h` [rows, S·rank] and `b`
/// [cols, rank] f32, S = `segment_starts.len()`.
#[allow(clippy::too_many_arguments)]
pub fn epilogue_launch(
    dtype: DType,
    rows: usize,
    cols: usize,
    rank: usize,
    segment_starts: &[usize],
    scale: f32,
    base: Arg,
    h: Arg,
    b: Arg,
    out: Arg,
) -> Result<Launch> {
    check_segments(cols, segment_starts)?;
    if rank == 0 || rank > i32::MAX as usize / MAX_SEGMENTS {
        bail!("lora epilogue: rank {rank} is out of range");
    }
    let row_tiles = rows.div_ceil(TILE_ROWS);
    let col_tiles = cols.div_ceil(TILE_COLS);
    if rows > i32::MAX as usize || cols > i32::MAX as usize || col_tiles > 65535 {
        bail!("lora epilogue: {rows} × {cols} outputs are out of range");
    }
    // Starts of segments 1..3; `cols` (never reached) for those that do not exist.
    let start = |s: usize| Arg::I32(segment_starts.get(s).copied().unwrap_or(cols) as i32);
    let args = vec![
        base,
        h,
        b,
        out,
        Arg::I32(rows as i32),
        Arg::I32(cols as i32),
        Arg::I32(rank as i32),
        Arg::I32(segment_starts.len() as i32),
        start(1),
        start(2),
        start(3),
        Arg::F32(scale),
    ];
    let grid = [row_tiles as u32, col_tiles as u32, 1];
    Launch::new(
        &LORA_EPILOGUE,
        dtype,
        grid,
        [BLOCK_THREADS, 1, 1],
        shared_bytes(rank) as u32,
        args,
    )
}

/// Enough rows per rayon task that each does at least ~64K multiply-adds.
fn rows_per_task(cols: usize, rank: usize) -> usize {
    (65536 / (cols * rank).max(1)).max(1)
}

/// `out[c..c+W] = round(base + scale · Σ_k h[k] · bt[k, c..c+W])`, the sum in registers, k ascending (the kernel's
/// order).
#[inline(always)]
fn twin_chunk<T: Float, const W: usize>(
    base: &[T],
    out: &mut [T],
    h: &[f32],
    bt: &[f32],
    cols: usize,
    c: usize,
    scale: f32,
) {
    let mut acc = [0f32; W];
    for (k, &hk) in h.iter().enumerate() {
        let row: &[f32; W] = bt[k * cols + c..][..W].try_into().unwrap();
        for (a, &bv) in acc.iter_mut().zip(row) {
            *a += hk * bv;
        }
    }
    for ((o, b), a) in out[c..c + W].iter_mut().zip(&base[c..c + W]).zip(acc) {
        *o = T::from_f32(b.to_f32() + scale * a);
    }
}

/// What a twin task needs besides its rows.
struct TwinShape<'a> {
    /// B transposed, [rank, cols].
    bt: &'a [f32],
    cols: usize,
    rank: usize,
    /// (first column, end) of each segment.
    segments: &'a [(usize, usize)],
    scale: f32,
}

/// Rows of `out` from rows of `base` and `h`, in column chunks of `W` summed in registers.
#[inline(always)]
fn twin_rows<T: Float, const W: usize>(base: &[T], h: &[f32], out: &mut [T], shape: &TwinShape) {
    let TwinShape {
        bt,
        cols,
        rank,
        segments,
        scale,
    } = *shape;
    let h_stride = segments.len() * rank;
    for ((out, base), h) in out
        .chunks_exact_mut(cols)
        .zip(base.chunks_exact(cols))
        .zip(h.chunks_exact(h_stride))
    {
        for (s, &(start, end)) in segments.iter().enumerate() {
            let h = &h[s * rank..(s + 1) * rank];
            let mut c = start;
            while c + W <= end {
                twin_chunk::<T, W>(base, out, h, bt, cols, c, scale);
                c += W;
            }
            while c + 4 <= end {
                twin_chunk::<T, 4>(base, out, h, bt, cols, c, scale);
                c += 4;
            }
            while c < end {
                twin_chunk::<T, 1>(base, out, h, bt, cols, c, scale);
                c += 1;
            }
        }
    }
}

/// [`twin_rows`] compiled for AVX2: 8-wide multiplies and adds, still separate (no FMA), so the results are the
/// same bits as the baseline build's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn twin_rows_avx2<T: Float>(base: &[T], h: &[f32], out: &mut [T], shape: &TwinShape) {
    twin_rows::<T, 64>(base, h, out, shape)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// CPU twin: `base`/`out` [rows, cols], `h` [rows, S·rank], `b` [cols, rank] (any rank), S =
/// `segment_starts.len()` (checked by the callers).
pub fn forward_twin<T: Float>(
    base: &[T],
    h: &[f32],
    b: &[f32],
    out: &mut [T],
    cols: usize,
    segment_starts: &[usize],
    scale: f32,
) {
    if cols == 0 || base.is_empty() {
        return;
    }
    let rank = b.len() / cols;
    // B transposed once, [rank, cols], so the loop over columns reads contiguous memory.
    let mut bt = vec![0f32; rank * cols];
    for (n, row) in b.chunks_exact(rank).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            bt[k * cols + n] = v;
        }
    }
    let segments: Vec<(usize, usize)> = segment_starts
        .iter()
        .enumerate()
        .map(|(s, &start)| (start, segment_starts.get(s + 1).copied().unwrap_or(cols)))
        .collect();
    let shape = TwinShape {
        bt: &bt,
        cols,
        rank,
        segments: &segments,
        scale,
    };
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let avx2 = has_avx2();
    let task = rows_per_task(cols, rank);
    out.par_chunks_mut(cols * task)
        .zip(base.par_chunks(cols * task))
        .zip(h.par_chunks(segments.len() * rank * task))
        .for_each(|((out, base), h)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 (checked above).
                return unsafe { twin_rows_avx2(base, h, out, &shape) };
            }
            twin_rows::<T, 32>(base, h, out, &shape)
        });
}

/// `round(base + scale · h · Bᵀ)` per segment: `base` [.., N] (f32, bf16 or f16), `h` [.., S·r] f32 with as many rows,
/// `b` [N, r] f32, `segment_starts` S ≤ [`MAX_SEGMENTS`] strictly increasing column starts (the first 0). Returns
/// base's shape and dtype; differentiable in all three inputs. Any rank, on both faces.
pub fn lora_epilogue(
    base: &Tensor,
    h: &Tensor,
    b: &Tensor,
    segment_starts: &[usize],
    scale: f64,
) -> Result<Tensor> {
    let op = LoraEpilogue::new(base.shape(), h, b, segment_starts, scale)?;
    base.contiguous()?
        .apply_op3(&h.contiguous()?, &b.contiguous()?, op)
}

/// The gradients of `h` and `B` for the output gradient `grad` ([M, N], any float dtype; cast to f32):
/// `dh[:, seg s] = scale · g[:, cols s] · B[cols s]`, `dB[cols s] = scale · g[:, cols s]ᵀ · h[:, seg s]`.
/// `h` is [M, S·r]; returns (dh [M, S·r], dB [N, r]), f32.
pub fn lora_epilogue_backward(
    grad: &Tensor,
    h: &Tensor,
    b: &Tensor,
    segment_starts: &[usize],
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (_, cols) = grad.dims2()?;
    let rank = b.dim(1)?;
    let g = grad.to_dtype(DType::F32)?.contiguous()?;
    if segment_starts.len() == 1 {
        let dh = (g.matmul(b)? * scale)?;
        let db = (g.t()?.matmul(h)? * scale)?;
        return Ok((dh, db));
    }
    let mut dh = Vec::with_capacity(segment_starts.len());
    let mut db = Vec::with_capacity(segment_starts.len());
    for (s, &start) in segment_starts.iter().enumerate() {
        let width = segment_starts.get(s + 1).copied().unwrap_or(cols) - start;
        // cuBLAS takes only packed operands: copy the segment's columns out.
        let g_s = g.narrow(1, start, width)?.contiguous()?;
        let b_s = b.narrow(0, start, width)?;
        let h_s = h.narrow(1, s * rank, rank)?.contiguous()?;
        dh.push((g_s.matmul(&b_s)? * scale)?);
        db.push((g_s.t()?.matmul(&h_s)? * scale)?);
    }
    Ok((Tensor::cat(&dh, 1)?, Tensor::cat(&db, 0)?))
}

/// The epilogue as a candle op over (base, h, B). Public so that a caller can run it inside an op of its own right
/// after the product that makes `base` (kto-model's frozen linear), which then never exists as a tensor of the
/// graph: this backward needs only `h` and `B`, so a separate `base` tensor would be kept for nothing.
pub struct LoraEpilogue {
    segment_starts: Vec<usize>,
    scale: f64,
}

impl LoraEpilogue {
    /// The epilogue of a base output of `base_shape` ([..., N]) with `h` [M, S·r] and `B` [N, r], both f32; fails
    /// on any other shapes or segments.
    pub fn new(
        base_shape: &Shape,
        h: &Tensor,
        b: &Tensor,
        segment_starts: &[usize],
        scale: f64,
    ) -> Result<Self> {
        let cols = base_shape.dims().last().copied().unwrap_or(1);
        let (b_rows, rank) = b.dims2()?;
        check_segments(cols, segment_starts)?;
        if b_rows != cols || rank == 0 {
            bail!("lora epilogue: B {:?} for {cols} output columns", b.shape());
        }
        if h.dtype() != DType::F32 || b.dtype() != DType::F32 {
            bail!(
                "lora epilogue: h is {:?} and B {:?}, both must be f32",
                h.dtype(),
                b.dtype()
            );
        }
        let h_cols = h.dim(D::Minus1)?;
        let rows = base_shape.elem_count() / cols;
        if h_cols != segment_starts.len() * rank || h.elem_count() != rows * h_cols {
            bail!(
                "lora epilogue: h {:?} for a base {:?} with {} segments of rank {rank}",
                h.shape(),
                base_shape,
                segment_starts.len()
            );
        }
        Ok(Self {
            segment_starts: segment_starts.to_vec(),
            scale,
        })
    }

    /// (dh in `h`'s shape, dB) for the output gradient `grad` ([..., N]), without a graph.
    pub fn backward(&self, grad: &Tensor, h: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let cols = grad.dim(D::Minus1)?;
        let rows = grad.elem_count() / cols;
        let g = grad.reshape((rows, cols))?;
        // Detached: the gradients must not carry a graph back into the forward (a leaf's gradient is kept as it is
        // returned, and an optimizer state built from it would hold every step's graph alive).
        let h2 = h.detach().reshape((rows, h.dim(D::Minus1)?))?;
        let (dh, db) =
            lora_epilogue_backward(&g, &h2, &b.detach(), &self.segment_starts, self.scale)?;
        Ok((dh.reshape(h.shape())?, db))
    }
}

impl CustomOp3 for LoraEpilogue {
    fn name(&self) -> &'static str {
        "kto-lora-epilogue"
    }

    fn cpu_fwd(
        &self,
        base: &CpuStorage,
        base_layout: &Layout,
        h: &CpuStorage,
        h_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = base_layout.shape().dims().last().copied().unwrap_or(1);
        let hs = f32::slice(h, h_layout, "lora epilogue h")?;
        let bs = f32::slice(b, b_layout, "lora epilogue B")?;
        with_float!(base.dtype(), "lora epilogue", |T| {
            let base = T::slice(base, base_layout, "lora epilogue base")?;
            let mut out = vec![T::default(); base.len()];
            forward_twin(
                base,
                hs,
                bs,
                &mut out,
                cols,
                &self.segment_starts,
                self.scale as f32,
            );
            Ok((T::storage(out), base_layout.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        base: &candle_core::CudaStorage,
        base_layout: &Layout,
        h: &candle_core::CudaStorage,
        h_layout: &Layout,
        b: &candle_core::CudaStorage,
        b_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = base_layout.shape();
        let cols = shape.dims().last().copied().unwrap_or(1);
        let rank = b_layout.shape().dims().last().copied().unwrap_or(1);
        let rows = shape.elem_count() / cols.max(1);
        let out = crate::cuda::output(
            &base.device,
            base.dtype(),
            shape.elem_count(),
            |stream, out| {
                let base_a = crate::cuda::address("lora epilogue base", base, base_layout, stream)?;
                let ha = crate::cuda::address("lora epilogue h", h, h_layout, stream)?;
                let ba = crate::cuda::address("lora epilogue B", b, b_layout, stream)?;
                let launch = epilogue_launch(
                    base.dtype(),
                    rows,
                    cols,
                    rank,
                    &self.segment_starts,
                    self.scale as f32,
                    base_a.arg(),
                    ha.arg(),
                    ba.arg(),
                    out,
                )?;
                crate::cuda::run(&base.device, &launch)
            },
        )?;
        Ok((out, shape.clone()))
    }

    fn bwd(
        &self,
        _base: &Tensor,
        h: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dh, db) = self.backward(grad, h, b)?;
        Ok((Some(grad.clone()), Some(dh), Some(db)))
    }
}
