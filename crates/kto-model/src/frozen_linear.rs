//! Frozen base weights and their products: a linear layer whose backward computes only the input gradient, over a
//! weight held dense or as quantized blocks ([`FrozenWeight`]).
//!
//! candle's `matmul` backward always computes both operand gradients, so `x.matmul(&w.t())` on the training path
//! would spend one extra GEMM per linear per step on a weight gradient nobody reads (and hold it in memory).
//! [`FrozenMatmul`] is a custom op over the input only: the weight is captured by the op, the forward calls the
//! backend's own GEMM (cuBLAS on CUDA, gemm on CPU), and the backward returns `grad · W`.
//!
//! A quantized weight is dequantized for each product (forward, input gradient) and never held dense: on the CPU
//! the product runs over slices of its rows (a quantized row is whole blocks, so a slice is a byte range of the
//! blocks), each dequantized into a buffer of at most [`SLICE_ELEMENTS`] values, so the largest weight (the LM head)
//! costs a few MB of f32 at a time instead of its whole dense size. The values are the dense twin's: the forward
//! writes each slice's exact columns, the input gradient sums the slices' partial products in f32 — and a dense
//! weight on the CPU sums over the same slices in the same order, so the two agree to the bit (one GEMM's order
//! differs from the slices' by rounding, which AdamW amplified into 7e-4 differences in the adapter of 3 steps on
//! the real SmolLM2 file, whose LM head is 14 slices). Elsewhere (CUDA, Metal) the whole weight is dequantized for each product.

use crate::block_decode;
use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, MetalStorage, Result,
    Shape, Storage, Tensor, WithDType,
};
use kto_kernels::lora::LoraEpilogue;
use std::ops::Range;
use std::sync::Arc;

/// At most this many values of a quantized weight are dense at a time on the CPU (8 MiB of f32): rows per slice are
/// this divided by the row length, and at least one row.
pub const SLICE_ELEMENTS: usize = 2 * 1024 * 1024;

/// A frozen base matrix ([out, in] for a linear, [vocab, hidden] for an embedding).
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// In the model dtype.
    Dense(Tensor),
    /// Quantized blocks, read as `dtype`: `parts` stacked along the rows (the fused q|k|v or gate|up weights when
    /// their block types differ; one part otherwise).
    Quantized {
        parts: Vec<Arc<QTensor>>,
        dtype: DType,
        shape: (usize, usize),
    },
}

impl FrozenWeight {
    /// `parts` (each [rows, in], same `in`) stacked along the rows, dequantized to `dtype` where used.
    pub fn quantized(parts: Vec<Arc<QTensor>>, dtype: DType) -> Result<Self> {
        let mut rows = 0;
        let mut cols = None;
        for part in &parts {
            let (r, c) = part.shape().dims2()?;
            if cols.is_some_and(|cols| cols != c) {
                bail!("stacked quantized weights differ in row length: {c} and {cols:?}");
            }
            cols = Some(c);
            rows += r;
        }
        let Some(cols) = cols else {
            bail!("a quantized weight needs at least one part");
        };
        Ok(Self::Quantized {
            parts,
            dtype,
            shape: (rows, cols),
        })
    }

    /// `weights` stacked along the rows, as one weight: dense ones concatenated, quantized ones of one block type
    /// concatenated block for block (a row is whole blocks, so that is their bytes end to end), others kept as parts.
    pub fn stack_rows(weights: Vec<FrozenWeight>) -> Result<Self> {
        if weights.len() == 1 {
            return Ok(weights.into_iter().next().expect("one weight"));
        }
        if weights.iter().all(|w| matches!(w, FrozenWeight::Dense(_))) {
            let dense: Vec<Tensor> = weights
                .into_iter()
                .map(|w| match w {
                    FrozenWeight::Dense(t) => t,
                    FrozenWeight::Quantized { .. } => unreachable!("all dense"),
                })
                .collect();
            return Ok(FrozenWeight::Dense(Tensor::cat(&dense, 0)?));
        }
        let mut parts = Vec::new();
        let mut dtype = None;
        for weight in weights {
            match weight {
                FrozenWeight::Quantized {
                    parts: p, dtype: d, ..
                } => {
                    dtype = Some(d);
                    parts.extend(p);
                }
                FrozenWeight::Dense(_) => bail!("cannot stack a dense weight with quantized ones"),
            }
        }
        let dtype = dtype.expect("at least one quantized weight");
        let block_type = parts[0].dtype();
        if parts.iter().all(|p| p.dtype() == block_type) {
            let device = parts[0].device();
            let mut bytes = Vec::new();
            for part in &parts {
                bytes.extend_from_slice(&part.data()?);
            }
            let rows: usize = parts.iter().map(|p| p.shape().dims()[0]).sum();
            let cols = parts[0].shape().dims()[1];
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Owned(bytes),
                &device,
                block_type,
            )?;
            parts = vec![Arc::new(QTensor::new(storage, (rows, cols))?)];
        }
        Self::quantized(parts, dtype)
    }

    /// (rows, columns).
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(t) => t.dims2(),
            FrozenWeight::Quantized { shape, .. } => Ok(*shape),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            FrozenWeight::Dense(t) => t.dtype(),
            FrozenWeight::Quantized { dtype, .. } => *dtype,
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, FrozenWeight::Quantized { .. })
    }

    /// Bytes held in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Quantized { parts, .. } => {
                parts.iter().map(|p| p.storage_size_in_bytes()).sum()
            }
        }
    }

    /// The weight as a dense tensor in its dtype: the held tensor, or a fresh dequantized one (contiguous).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => Ok(t.clone()),
            FrozenWeight::Quantized {
                parts,
                dtype,
                shape,
            } if parts.iter().all(|p| p.device().is_cpu()) => {
                // The parts dequantized straight into their rows of one buffer, in parallel (candle's own
                // `dequantize` is one thread, and a concatenation would copy the weight once more).
                let mut dense = vec![0f32; shape.0 * shape.1];
                let mut rest = dense.as_mut_slice();
                for part in parts {
                    let (rows, others) = rest.split_at_mut(part.shape().elem_count());
                    dequantize_cpu(part, 0..part.shape().dims()[0], rows)?;
                    rest = others;
                }
                Tensor::from_vec(dense, *shape, &candle_core::Device::Cpu)?.to_dtype(*dtype)
            }
            FrozenWeight::Quantized { parts, dtype, .. } => {
                let dense = parts
                    .iter()
                    .map(|p| p.dequantize(&p.device()))
                    .collect::<Result<Vec<_>>>()?;
                let dense = if dense.len() == 1 {
                    dense.into_iter().next().expect("one part")
                } else {
                    Tensor::cat(&dense, 0)?
                };
                dense.to_dtype(*dtype)
            }
        }
    }

    /// `grad` [m, rows] · `W` [rows, columns] in the weight's dtype: the input gradient of `x Wᵀ`.
    pub fn input_gradient(&self, grad: &Tensor) -> Result<Tensor> {
        self.input_gradient_in_slices(grad, SLICE_ELEMENTS)
    }

    /// [`Self::input_gradient`], a quantized weight on the CPU dequantized `slice_elements` values at a time.
    pub(crate) fn input_gradient_in_slices(
        &self,
        grad: &Tensor,
        slice_elements: usize,
    ) -> Result<Tensor> {
        let grad = grad.to_dtype(self.dtype())?;
        let Some(parts) = self.quantized_cpu_parts() else {
            return match self {
                // f32 only: that is where a run and its quantized twin must agree to the bit; a bf16 GEMM per
                // slice would round each partial product to bf16.
                FrozenWeight::Dense(w) if w.device().is_cpu() && w.dtype() == DType::F32 => {
                    dense_input_gradient(&grad, w, slice_elements)
                }
                _ => grad.matmul(&self.dense()?),
            };
        };
        let (n, k) = self.dims2()?;
        let grad = grad.contiguous()?;
        let m = grad.dim(0)?;
        if grad.dims() != [m, n] {
            bail!(
                "frozen-linear: gradient of shape {:?} for a weight of {n} rows",
                grad.dims()
            );
        }
        let (storage, layout) = grad.storage_and_layout();
        let Storage::Cpu(g) = &*storage else {
            bail!(
                "frozen-linear: gradient on {:?}, weight on the CPU",
                grad.device().location()
            );
        };
        let slices = RowSlices::new(parts, k, slice_elements);
        match g {
            CpuStorage::F32(_) => slices.input_gradient::<f32>(g, layout, m),
            CpuStorage::F16(_) => slices.input_gradient::<half::f16>(g, layout, m),
            CpuStorage::BF16(_) => slices.input_gradient::<half::bf16>(g, layout, m),
            other => bail!(
                "frozen-linear: no product in {:?} over quantized blocks",
                other.dtype()
            ),
        }
    }

    /// The parts of a quantized weight held on the CPU (the sliced products); `None` for a dense weight or another
    /// device.
    fn quantized_cpu_parts(&self) -> Option<&[Arc<QTensor>]> {
        match self {
            FrozenWeight::Quantized { parts, .. } if parts.iter().all(|p| p.device().is_cpu()) => {
                Some(parts)
            }
            _ => None,
        }
    }

    /// Rows `ids` (u32, any shape) → [..ids, columns] in the weight's dtype: an embedding lookup; a quantized weight
    /// dequantizes only the rows gathered.
    pub fn gather_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => {
                let flat = t.index_select(&ids.flatten_all()?, 0)?;
                let mut dims = ids.dims().to_vec();
                dims.push(t.dim(1)?);
                flat.reshape(dims)
            }
            FrozenWeight::Quantized { parts, dtype, .. } => match parts.as_slice() {
                [blocks] => blocks.embedding(ids)?.to_dtype(*dtype),
                _ => bail!(
                    "an embedding is one quantized tensor, not {} parts",
                    parts.len()
                ),
            },
        }
    }
}

/// A quantized weight on the CPU (its parts stacked by rows, each row `cols` values) walked in slices of rows.
/// Rows per slice of a [rows, cols] weight whose slices hold at most `slice_elements` values (at least one row).
fn slice_rows(rows: usize, cols: usize, slice_elements: usize) -> usize {
    (slice_elements / cols.max(1)).clamp(1, rows.max(1))
}

/// `grad · W` for a dense weight on the CPU over the same row slices, summed in the same f32 order, as
/// [`RowSlices::input_gradient`] does for quantized blocks: so a quantized base and its dense twin give the same
/// bits, not values that differ by the summation order (which AdamW turns into whole-step differences in
/// near-zero gradient components). One GEMM when the weight is one slice.
fn dense_input_gradient(grad: &Tensor, w: &Tensor, slice_elements: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let step = slice_rows(rows, cols, slice_elements);
    if step >= rows {
        return grad.matmul(w);
    }
    let mut sum: Option<Tensor> = None;
    for r0 in (0..rows).step_by(step) {
        let s = step.min(rows - r0);
        let part = grad
            .narrow(1, r0, s)?
            .matmul(&w.narrow(0, r0, s)?)?
            .to_dtype(DType::F32)?;
        sum = Some(match sum {
            Some(sum) => (sum + part)?,
            None => part,
        });
    }
    sum.expect("at least two slices").to_dtype(w.dtype())
}

struct RowSlices<'a> {
    parts: &'a [Arc<QTensor>],
    cols: usize,
    rows: usize,
    /// Rows per slice.
    step: usize,
}

impl<'a> RowSlices<'a> {
    fn new(parts: &'a [Arc<QTensor>], cols: usize, slice_elements: usize) -> Self {
        let rows: usize = parts.iter().map(|p| p.shape().dims()[0]).sum();
        let step = slice_rows(rows, cols, slice_elements);
        Self {
            parts,
            cols,
            rows,
            step,
        }
    }

    /// Each slice's rows, in order.
    fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.rows)
            .step_by(self.step)
            .map(|r0| r0..(r0 + self.step).min(self.rows))
    }

    /// Rows `range` (of the stacked weight: a slice may cross from one part into the next) dequantized into `out`,
    /// as `T`'s storage: f32 is `out` itself, lent until [`RowSlices::give_back`] (no copy, and the next slice
    /// reuses its pages); others are rounded once from it, as `to_dtype` rounds the dense twin.
    fn dense<T: WithDType>(&self, range: Range<usize>, out: &mut Vec<f32>) -> Result<CpuStorage> {
        use rayon::prelude::*;
        out.resize(range.len() * self.cols, 0.0);
        let mut first = 0;
        let mut filled = 0;
        for part in self.parts {
            let rows = part.shape().dims()[0];
            let (start, end) = (range.start.max(first), range.end.min(first + rows));
            if start < end {
                let values = (end - start) * self.cols;
                dequantize_cpu(
                    part,
                    start - first..end - first,
                    &mut out[filled..filled + values],
                )?;
                filled += values;
            }
            first += rows;
        }
        if T::DTYPE == candle_core::DType::F32 {
            return Ok(CpuStorage::F32(std::mem::take(out)));
        }
        Ok(T::to_cpu_storage_owned(
            out.par_iter().map(|&v| T::from_f64(v as f64)).collect(),
        ))
    }

    /// The buffer [`RowSlices::dense`] lent as an f32 slice's storage, back for the next slice.
    fn give_back(w: CpuStorage, out: &mut Vec<f32>) {
        if let CpuStorage::F32(values) = w {
            *out = values;
        }
    }

    /// `x` [m, cols] (`x_layout`, row-major) · `Wᵀ` → [m, rows]: each slice's GEMM written into its columns.
    fn forward<T: WithDType>(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        m: usize,
    ) -> Result<CpuStorage> {
        use rayon::prelude::*;
        let (n, k) = (self.rows, self.cols);
        let mut y = vec![T::zero(); m * n];
        let mut buffer = Vec::new();
        for range in self.ranges() {
            let s = range.len();
            let w = self.dense::<T>(range.clone(), &mut buffer)?;
            let w_t = Layout::new(Shape::from((k, s)), vec![1, k], 0);
            let part = x.matmul(&w, (1, m, s, k), x_layout, &w_t)?;
            Self::give_back(w, &mut buffer);
            let part = part.as_slice::<T>()?;
            y.par_chunks_exact_mut(n)
                .zip(part.par_chunks_exact(s))
                .for_each(|(row, values)| row[range.clone()].copy_from_slice(values));
        }
        Ok(T::to_cpu_storage_owned(y))
    }

    /// `grad` [m, rows] (`layout`, row-major) · `W` → [m, cols]: Σ over slices of `grad[:, slice] · W[slice]`,
    /// summed in f32 and rounded once to `T`.
    fn input_gradient<T: WithDType>(
        &self,
        grad: &CpuStorage,
        layout: &Layout,
        m: usize,
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        let (n, k) = (self.rows, self.cols);
        let mut sum = vec![0f32; m * k];
        let mut buffer = Vec::new();
        for range in self.ranges() {
            let s = range.len();
            let w = self.dense::<T>(range.clone(), &mut buffer)?;
            let g = Layout::new(
                Shape::from((m, s)),
                vec![n, 1],
                layout.start_offset() + range.start,
            );
            let part = grad.matmul(&w, (1, m, k, s), &g, &Layout::contiguous((s, k)))?;
            Self::give_back(w, &mut buffer);
            let part = part.as_slice::<T>()?;
            sum.par_iter_mut()
                .zip(part.par_iter())
                .for_each(|(a, b)| *a += b.to_f64() as f32);
        }
        let out: Vec<T> = sum.into_par_iter().map(|v| T::from_f64(v as f64)).collect();
        Tensor::from_vec(out, (m, k), &candle_core::Device::Cpu)
    }
}

/// Rows `rows` of `blocks` (on the CPU) dequantized into `out` (their element count) in chunks of whole blocks on
/// rayon's threads: a row is whole blocks, so the rows are a byte range; each block is decoded by
/// [`block_decode`]'s vectorized decoder for its type, else by candle's own `to_float`: the values are
/// `QTensor::dequantize`'s either way.
pub(crate) fn dequantize_cpu(blocks: &QTensor, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
    use candle_core::quantized::k_quants::*;
    use candle_core::quantized::GgmlDType as G;
    let all = blocks.data()?;
    let block_type = blocks.dtype();
    let cols = blocks.shape().dims()[1];
    let row_bytes = cols / block_type.block_size() * block_type.type_size();
    let bytes = all
        .get(rows.start * row_bytes..rows.end * row_bytes)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "rows {rows:?} of {block_type:?} blocks {:?} out of range",
                blocks.shape()
            ))
        })?;
    if let Some(decoder) = block_decode::decoder(block_type) {
        return decode_with(decoder, block_type, bytes, out);
    }
    match block_type {
        G::F32 => decode::<f32>(bytes, out),
        G::F16 => decode::<half::f16>(bytes, out),
        G::BF16 => decode::<half::bf16>(bytes, out),
        G::Q4_0 => decode::<BlockQ4_0>(bytes, out),
        G::Q4_1 => decode::<BlockQ4_1>(bytes, out),
        G::Q5_0 => decode::<BlockQ5_0>(bytes, out),
        G::Q5_1 => decode::<BlockQ5_1>(bytes, out),
        G::Q8_0 => decode::<BlockQ8_0>(bytes, out),
        G::Q8_1 => decode::<BlockQ8_1>(bytes, out),
        G::Q2K => decode::<BlockQ2K>(bytes, out),
        G::Q3K => decode::<BlockQ3K>(bytes, out),
        G::Q4K => decode::<BlockQ4K>(bytes, out),
        G::Q5K => decode::<BlockQ5K>(bytes, out),
        G::Q6K => decode::<BlockQ6K>(bytes, out),
        G::Q8K => decode::<BlockQ8K>(bytes, out),
    }
}

/// Blocks of `block_type` through this crate's vectorized `decoder` (candle's values), in tasks of about 64 KiB of
/// output on rayon's threads.
fn decode_with(
    decoder: block_decode::Decoder,
    block_type: candle_core::quantized::GgmlDType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<()> {
    use rayon::prelude::*;
    let (size, values) = (block_type.type_size(), block_type.block_size());
    if !bytes.len().is_multiple_of(size) || bytes.len() / size * values != out.len() {
        bail!(
            "{block_type:?} blocks: {} bytes do not decode to {} values",
            bytes.len(),
            out.len()
        );
    }
    let per_task = (16 * 1024 / values).max(1);
    bytes
        .par_chunks(per_task * size)
        .zip(out.par_chunks_mut(per_task * values))
        .for_each(|(bytes, out)| decoder(bytes, out));
    Ok(())
}

fn decode<T: candle_core::quantized::GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    use rayon::prelude::*;
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || bytes.len() / size * T::BLCK_SIZE != out.len()
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        bail!(
            "{:?} blocks: {} bytes at {:p} do not decode to {} values",
            T::DTYPE,
            bytes.len(),
            bytes.as_ptr(),
            out.len()
        );
    }
    // SAFETY: the bytes are a CPU QTensor's storage, a `Vec<T>` viewed as bytes (length and alignment checked).
    let blocks =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) };
    // About 64 KiB of output per task.
    let per_task = (16 * 1024 / T::BLCK_SIZE).max(1);
    blocks
        .par_chunks(per_task)
        .zip(out.par_chunks_mut(per_task * T::BLCK_SIZE))
        .for_each(|(blocks, out)| T::to_float(blocks, out));
    Ok(())
}

/// `y = x Wᵀ (+ b)` with frozen `W` [out, in] and optional frozen `b` [out].
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    /// [`SLICE_ELEMENTS`]; smaller in tests, so that tiny weights have several slices.
    slice_elements: usize,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.rank() != 2 {
            bail!("a linear weight must be 2-D, got {:?}", weight.shape());
        }
        Self::from_weight(FrozenWeight::Dense(weight.detach().contiguous()?), bias)
    }

    /// A linear over a dense or quantized weight.
    pub fn from_weight(weight: FrozenWeight, bias: Option<Tensor>) -> Result<Self> {
        let weight = match weight {
            FrozenWeight::Dense(t) => FrozenWeight::Dense(t.detach().contiguous()?),
            quantized => quantized,
        };
        let bias = bias.map(|b| b.detach());
        Ok(Self {
            weight,
            bias,
            slice_elements: SLICE_ELEMENTS,
        })
    }

    /// The same linear with products over slices of at most `slice_elements` values of a quantized weight.
    #[cfg(test)]
    pub(crate) fn with_slice_elements(mut self, slice_elements: usize) -> Self {
        self.slice_elements = slice_elements;
        self
    }

    /// [out, in].
    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims2().map_or(0, |(_, i)| i)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims2().map_or(0, |(o, _)| o)
    }

    /// `x` [..., in] → [..., out], in the weight's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.contiguous()?.apply_op1(self.matmul())?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The op of this linear's product `x Wᵀ`.
    fn matmul(&self) -> FrozenMatmul {
        FrozenMatmul {
            weight: self.weight.clone(),
            slice_elements: self.slice_elements,
        }
    }

    /// `x` [..., in] → [..., out]: `x Wᵀ (+ b)` followed by the LoRA epilogue `+ scale · h Bᵀ`
    /// ([`kto_kernels::lora::lora_epilogue`], `h` [M, S·r] and `B` [out, r] in f32, segments as there), the same
    /// values as the two ops one after the other. Without a bias both run in one op, so the base output is never a
    /// tensor of the graph: backward needs only `W`, `h` and `B`, and a kept base output would be one more
    /// activation per linear for nothing (a third of a layer's). With a bias, the two ops.
    pub fn forward_with_lora(
        &self,
        x: &Tensor,
        h: &Tensor,
        b: &Tensor,
        segment_starts: &[usize],
        scale: f64,
    ) -> Result<Tensor> {
        if self.bias.is_some() {
            let y = self.forward(x)?;
            return kto_kernels::lora::lora_epilogue(&y, h, b, segment_starts, scale);
        }
        let x = x.contiguous()?;
        let mut base_dims = x.dims().to_vec();
        if let Some(last) = base_dims.last_mut() {
            *last = self.out_features();
        }
        let epilogue = LoraEpilogue::new(&Shape::from(base_dims), h, b, segment_starts, scale)?;
        x.apply_op3(
            &h.contiguous()?,
            &b.contiguous()?,
            FrozenMatmulWithLora {
                matmul: self.matmul(),
                epilogue,
            },
        )
    }

    /// `grad` [m, out] · `W` [out, in] → [m, in] in the weight's dtype: the input gradient of the product, without
    /// a graph (the LM head's log-prob gradient, [`FrozenMatmul`]'s backward).
    pub fn input_gradient(&self, grad: &Tensor) -> Result<Tensor> {
        self.weight
            .input_gradient_in_slices(grad, self.slice_elements)
    }
}

/// The custom op behind [`FrozenLinear`]: `x` [..., in] ↦ `x Wᵀ` [..., out].
pub struct FrozenMatmul {
    weight: FrozenWeight,
    slice_elements: usize,
}

/// GEMM shapes and layouts: `x` viewed as [m, k] and `W` as the transposed view [k, n].
struct Plan {
    m: usize,
    k: usize,
    n: usize,
    lhs: Layout,
    rhs: Layout,
    out_shape: Shape,
}

impl FrozenMatmul {
    fn plan(&self, x_layout: &Layout, w_layout: &Layout) -> Result<Plan> {
        if !x_layout.is_contiguous() {
            bail!("frozen-linear: input must be contiguous");
        }
        let dims = x_layout.dims();
        let (n, k_w) = (w_layout.dims()[0], w_layout.dims()[1]);
        let k = *dims.last().unwrap_or(&0);
        if k != k_w {
            bail!(
                "frozen-linear: input has {k} features, the weight expects {k_w} ({:?})",
                w_layout.shape()
            );
        }
        let m = dims[..dims.len() - 1].iter().product::<usize>();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = n;
        Ok(Plan {
            m,
            k,
            n,
            lhs: Layout::new(Shape::from((m, k)), vec![k, 1], x_layout.start_offset()),
            rhs: Layout::new(Shape::from((k, n)), vec![1, k], w_layout.start_offset()),
            out_shape: Shape::from(out_dims),
        })
    }

    /// The forward over a quantized weight on the CPU, `slice_elements` values dequantized at a time.
    fn cpu_fwd_in_slices(
        &self,
        parts: &[Arc<QTensor>],
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.weight.dims2()?;
        // The plan only reads the weight layout's dims and offset.
        let p = self.plan(x_layout, &Layout::contiguous((n, k)))?;
        let slices = RowSlices::new(parts, k, self.slice_elements);
        let y = match x {
            CpuStorage::F32(_) => slices.forward::<f32>(x, &p.lhs, p.m)?,
            CpuStorage::F16(_) => slices.forward::<half::f16>(x, &p.lhs, p.m)?,
            CpuStorage::BF16(_) => slices.forward::<half::bf16>(x, &p.lhs, p.m)?,
            other => bail!(
                "frozen-linear: no product in {:?} over quantized blocks",
                other.dtype()
            ),
        };
        Ok((y, p.out_shape))
    }

    fn check_dtype(&self, x: DType) -> Result<()> {
        if x != self.weight.dtype() {
            bail!(
                "frozen-linear: input dtype {x:?} differs from weight dtype {:?}",
                self.weight.dtype()
            );
        }
        Ok(())
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check_dtype(x.dtype())?;
        if let Some(parts) = self.weight.quantized_cpu_parts() {
            return self.cpu_fwd_in_slices(parts, x, x_layout);
        }
        let weight = self.weight.dense()?;
        let (w_storage, w_layout) = weight.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            bail!(
                "frozen-linear: input on the CPU, weight on {:?}",
                weight.device().location()
            );
        };
        let p = self.plan(x_layout, w_layout)?;
        let out = x.matmul(w, (1, p.m, p.n, p.k), &p.lhs, &p.rhs)?;
        Ok((out, p.out_shape))
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.check_dtype(x.dtype())?;
        let weight = self.weight.dense()?;
        let (w_storage, w_layout) = weight.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            bail!(
                "frozen-linear: input on CUDA, weight on {:?}",
                weight.device().location()
            );
        };
        let p = self.plan(x_layout, w_layout)?;
        let out = x.matmul(w, (1, p.m, p.n, p.k), &p.lhs, &p.rhs)?;
        Ok((out, p.out_shape))
    }

    fn metal_fwd(&self, x: &MetalStorage, x_layout: &Layout) -> Result<(MetalStorage, Shape)> {
        self.check_dtype(x.dtype())?;
        let weight = self.weight.dense()?;
        let (w_storage, w_layout) = weight.storage_and_layout();
        let Storage::Metal(w) = &*w_storage else {
            bail!(
                "frozen-linear: input on Metal, weight on {:?}",
                weight.device().location()
            );
        };
        let p = self.plan(x_layout, w_layout)?;
        let out = x.matmul(w, (1, p.m, p.n, p.k), &p.lhs, &p.rhs)?;
        Ok((out, p.out_shape))
    }

    /// Only the input gradient: `grad` [..., out] · `W` [out, in]. The weight is frozen, so no weight gradient.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, _) = self.weight.dims2()?;
        let m = grad_res.elem_count() / n.max(1);
        let grad = grad_res.contiguous()?.reshape((m, n))?;
        let grad_in = self
            .weight
            .input_gradient_in_slices(&grad, self.slice_elements)?;
        Ok(Some(grad_in.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

/// The op behind [`FrozenLinear::forward_with_lora`]: (`x`, `h`, `B`) ↦ the epilogue of `x Wᵀ`, with the product's
/// output a buffer inside the op, dropped before the op returns.
struct FrozenMatmulWithLora {
    matmul: FrozenMatmul,
    epilogue: LoraEpilogue,
}

impl CustomOp3 for FrozenMatmulWithLora {
    fn name(&self) -> &'static str {
        "frozen-linear-lora"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        h: &CpuStorage,
        h_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (base, shape) = self.matmul.cpu_fwd(x, x_layout)?;
        self.epilogue
            .cpu_fwd(&base, &Layout::contiguous(shape), h, h_layout, b, b_layout)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        h: &CudaStorage,
        h_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (base, shape) = self.matmul.cuda_fwd(x, x_layout)?;
        self.epilogue
            .cuda_fwd(&base, &Layout::contiguous(shape), h, h_layout, b, b_layout)
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_x = self.matmul.bwd(x, res, grad)?;
        let (dh, db) = self.epilogue.backward(grad, h, b)?;
        Ok((grad_x, Some(dh), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_plain_matmul_in_value_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 3), &dev)?;
        let b = Tensor::randn(0f32, 1., 5, &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 4, 3), &dev)?)?;
        let lin = FrozenLinear::new(w.clone(), Some(b.clone()))?;

        let y = lin.forward(x.as_tensor())?;
        let y_ref = x.as_tensor().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");

        // A non-uniform upstream gradient, so a wrong transpose would show.
        let probe = Tensor::randn(0f32, 1., (2, 4, 5), &dev)?;
        let g = (&y * &probe)?.sum_all()?.backward()?;
        let g_ref = (&y_ref * &probe)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("input gradient");
        let gx_ref = g_ref.get(x.as_tensor()).expect("reference input gradient");
        let diff = (gx - gx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "input gradient differs by {diff}");
        // candle's matmul backward computes a gradient for the (untracked) transposed weight; ours computes none.
        let has_weight_grad = |g: &candle_core::backprop::GradStore| {
            g.get_ids().any(|id| matches!(g.get_id(*id).map(|t| t.dims().to_vec()), Some(d) if d == [3, 5] || d == [5, 3]))
        };
        assert!(has_weight_grad(&g_ref));
        assert!(!has_weight_grad(&g));
        Ok(())
    }

    #[test]
    fn works_on_a_narrowed_input_and_in_bf16() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 4), &dev)?;
        let x = Tensor::randn(0f32, 1., (3, 8), &dev)?.narrow(1, 2, 4)?;
        let y = FrozenLinear::new(w.clone(), None)?.forward(&x)?;
        let y_ref = x.matmul(&w.t()?)?;
        assert!((&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);

        let lin16 = FrozenLinear::new(w.to_dtype(DType::BF16)?, None)?;
        let y16 = lin16
            .forward(&x.to_dtype(DType::BF16)?)?
            .to_dtype(DType::F32)?;
        assert!((&y16 - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()? < 0.1);
        assert!(
            lin16.forward(&x).is_err(),
            "dtype mismatch must be an error"
        );
        Ok(())
    }

    /// The base product and the LoRA epilogue in one op give the two ops' output and gradients (of `x`, of the `A`
    /// behind `h`, of `B`) bit for bit, over a dense weight and a quantized one in slices, with three segments as
    /// q|k|v has.
    #[test]
    fn a_linear_and_its_lora_epilogue_in_one_op_are_the_two_ops_to_the_bit() -> Result<()> {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let (cols, rows, r, starts) = (256, 12, 2, [0, 5, 8]);
        let w = Tensor::randn(0f32, 1., (rows, cols), &dev)?;
        let quantized = FrozenWeight::quantized(
            vec![Arc::new(QTensor::quantize(&w, GgmlDType::Q4K)?)],
            DType::F32,
        )?;
        for weight in [FrozenWeight::Dense(w.clone()), quantized] {
            let lin = FrozenLinear::from_weight(weight, None)?.with_slice_elements(5 * cols);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, cols), &dev)?)?;
            let a = Var::from_tensor(&Tensor::randn(0f32, 0.1, (starts.len() * r, cols), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, (rows, r), &dev)?)?;
            let probe = Tensor::randn(0f32, 1., (2, 3, rows), &dev)?;
            let run = |one_op: bool| -> Result<Vec<Vec<f32>>> {
                let h = x
                    .as_tensor()
                    .reshape((6, cols))?
                    .matmul(&a.as_tensor().t()?)?;
                let y = if one_op {
                    lin.forward_with_lora(x.as_tensor(), &h, b.as_tensor(), &starts, 2.0)?
                } else {
                    let base = lin.forward(x.as_tensor())?;
                    kto_kernels::lora::lora_epilogue(&base, &h, b.as_tensor(), &starts, 2.0)?
                };
                assert_eq!(y.dims(), [2, 3, rows]);
                let grads = (&y * &probe)?.sum_all()?.backward()?;
                let mut values = vec![y.flatten_all()?.to_vec1::<f32>()?];
                for v in [&x, &a, &b] {
                    let g = grads.get(v.as_tensor()).expect("a gradient");
                    values.push(g.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(values)
            };
            assert_eq!(run(true)?, run(false)?);
        }
        Ok(())
    }

    /// A quantized weight walked in slices (several per product, some crossing from one part into the next, one
    /// row, all rows) gives the forward and input gradient of a plain matmul over its dequantized twin.
    #[test]
    fn quantized_products_over_row_slices_are_the_dense_twins() -> Result<()> {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let cols = 256; // one K-quant block per row
        let quantize = |rows: usize, block_type: GgmlDType| -> Result<Arc<QTensor>> {
            let w = Tensor::randn(0f32, 1., (rows, cols), &dev)?;
            Ok(Arc::new(QTensor::quantize(&w, block_type)?))
        };
        // q|k|v with three block types, kept as parts (rows 0..5, 5..8, 8..12).
        let mixed = FrozenWeight::stack_rows(vec![
            FrozenWeight::quantized(vec![quantize(5, GgmlDType::Q4K)?], DType::F32)?,
            FrozenWeight::quantized(vec![quantize(3, GgmlDType::Q8_0)?], DType::F32)?,
            FrozenWeight::quantized(vec![quantize(4, GgmlDType::Q6K)?], DType::F32)?,
        ])?;
        assert!(matches!(&mixed, FrozenWeight::Quantized { parts, .. } if parts.len() == 3));
        // gate|up of one block type, byte-concatenated into one part.
        let same = FrozenWeight::stack_rows(vec![
            FrozenWeight::quantized(vec![quantize(7, GgmlDType::Q4_0)?], DType::F32)?,
            FrozenWeight::quantized(vec![quantize(6, GgmlDType::Q4_0)?], DType::F32)?,
        ])?;
        assert!(matches!(&same, FrozenWeight::Quantized { parts, .. } if parts.len() == 1));

        for weight in [mixed, same] {
            let dense = weight.dense()?;
            let rows = dense.dim(0)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, cols), &dev)?)?;
            let probe = Tensor::randn(0f32, 1., (2, 3, rows), &dev)?;
            let y_ref = x.as_tensor().broadcast_matmul(&dense.t()?)?;
            let g_ref = (&y_ref * &probe)?.sum_all()?.backward()?;
            let gx_ref = g_ref.get(x.as_tensor()).expect("reference input gradient");
            // Rows per slice: 1; 5 (slices 0..5, 5..10, 10..: one crosses from k into v); 7; all at once.
            // Relative to the largest value: the input gradient sums the slices' partial products in another order.
            let close = |got: &Tensor, want: &Tensor, what: &str| -> Result<()> {
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                assert!(
                    diff <= 1e-5 * scale,
                    "{what} differs by {diff} (largest value {scale})"
                );
                Ok(())
            };
            for slice_rows in [1, 5, 7, rows] {
                let lin = FrozenLinear::from_weight(weight.clone(), None)?
                    .with_slice_elements(slice_rows * cols);
                let y = lin.forward(x.as_tensor())?;
                close(&y, &y_ref, &format!("{slice_rows} rows per slice: forward"))?;
                let g = (&y * &probe)?.sum_all()?.backward()?;
                let gx = g.get(x.as_tensor()).expect("input gradient");
                close(
                    gx,
                    gx_ref,
                    &format!("{slice_rows} rows per slice: input gradient"),
                )?;
                // The gradient straight from the linear (the LM head's log-prob path).
                let grad = probe.reshape((6, rows))?;
                let direct = lin.input_gradient(&grad)?;
                close(
                    &direct,
                    &grad.matmul(&dense)?,
                    &format!("{slice_rows} rows per slice: input_gradient"),
                )?;
                // The dense twin over the same slices: the same bits, as a training run and its twin need.
                let twin = FrozenLinear::from_weight(FrozenWeight::Dense(dense.clone()), None)?
                    .with_slice_elements(slice_rows * cols);
                let bits = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                let y_twin = twin.forward(x.as_tensor())?;
                let g_twin = (&y_twin * &probe)?.sum_all()?.backward()?;
                let gx_twin = g_twin.get(x.as_tensor()).expect("twin input gradient");
                assert_eq!(bits(gx)?, bits(gx_twin)?, "{slice_rows} rows per slice");
                assert_eq!(
                    bits(&direct)?,
                    bits(&twin.input_gradient(&grad)?)?,
                    "{slice_rows} rows per slice"
                );
            }
        }
        Ok(())
    }
}
