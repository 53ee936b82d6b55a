//! AdamW over every trainable tensor in one launch, and the global gradient norm in one pass: kto-trainer's
//! optimizer. Numerically torch's single-tensor `AdamW` after `clip_grad_norm_` as the stock candle ops compute it
//! one op at a time (`testing::stock_adamw`, a test build's, kto-trainer's former implementation), fused.
//!
//! - [`adamw_step`] updates parameters and both moments **in place**: one `adamw_f32` launch for all tensors on
//!   CUDA, the twin ([`adamw_twin`], rayon over tensors and chunks) on the CPU. The clipping coefficient is applied
//!   inside the step (`g · grad_scale`, rounded as `clip_grad_norm_`'s `mul_` rounds it), so the gradients are
//!   read once and never rewritten.
//! - [`global_grad_norm`] is `clip_grad_norm_`'s total norm: one `grad_sumsq_f32` launch writes an f32 partial
//!   Σg² per block; the host adds each tensor's partials in block order (f64), takes the tensor's norm, and combines
//!   the norms in f32 in the order given, as the stock clipping does. The CPU path is its computation exactly.
//!
//! Every f32 rounding of the update happens where the stock candle ops round (one op, one rounding, no fused
//! multiply-add), and the scalars are rounded on the host the way it rounds them ([`AdamWScalars::new`]), so the
//! twin, the emulated kernel and the stock optimizer agree bit for bit.

use crate::float::Float;
use crate::kernel::{Arg, Launch};
use crate::kernels;
use candle_core::{
    bail, CpuStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor, Var,
};
use rayon::prelude::*;
use std::cell::Cell;

kernels! {
    module "adamw";
    /// One AdamW step of every tensor of the descriptor table; block b updates one chunk of one tensor.
    pub ADAMW = adamw [F32 f32]
        (table: Ptr, tensors: I32, chunk: I32, grad_scale: F32, apply_decay: I32, decay: F32, lerp_from_end: I32,
         lerp_weight: F32, beta2: F32, one_minus_beta2: F32, bias_correction2_sqrt: F32, eps: F32,
         neg_step_size: F32) max_threads 256, shared 0;
    /// Σ g² of one chunk of one gradient per block, written to `partials[block]`.
    pub GRAD_SUMSQ = grad_sumsq [F32 f32]
        (table: Ptr, tensors: I32, chunk: I32, partials: Ptr) max_threads 256, shared 0;
}

/// Threads per block of both kernels.
pub const BLOCK_THREADS: u32 = 256;
/// Elements per block: eight per thread, so a block of a large tensor has enough work and a tiny tensor one block.
pub const CHUNK: usize = 2048;
/// Elements per rayon task of the twin.
const TWIN_CHUNK: usize = 1 << 14;

/// One optimizer step's settings, as kto-trainer holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The step being taken, from 1 (the bias corrections use it).
    pub step: u64,
    /// The clipping coefficient the gradients are multiplied by first ([`clip_coefficient`]; 1 without clipping).
    pub grad_scale: f32,
}

/// The per-launch scalars, rounded to f32 on the host exactly as the stock optimizer rounds them (f64 arithmetic, then
/// one cast: torch's Python-float scalars).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub grad_scale: f32,
    /// `1 − lr · weight_decay`, or `None` when weight decay is off (the stock optimizer skips the multiplication
    /// then).
    pub decay: Option<f32>,
    /// torch's `lerp` with weight `w = 1 − β1` computes `m + (g − m)·w` for |w| < 0.5, else `g − (g − m)·(1 − w)`.
    pub lerp_from_end: bool,
    pub lerp_weight: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    /// `−lr / (1 − β1^t)`.
    pub neg_step_size: f32,
}

impl AdamWScalars {
    pub fn new(h: &AdamWHyper) -> Result<Self> {
        if h.step == 0 || h.step > i32::MAX as u64 {
            bail!("adamw: step {} out of range (steps count from 1)", h.step);
        }
        let t = h.step as i32;
        let bias_correction1 = 1.0 - h.beta1.powi(t);
        let bias_correction2 = 1.0 - h.beta2.powi(t);
        let step_size = h.lr / bias_correction1;
        let weight = 1.0 - h.beta1;
        let (lerp_from_end, lerp_weight) = if weight.abs() < 0.5 {
            (false, weight as f32)
        } else {
            (true, (1.0 - weight) as f32)
        };
        Ok(Self {
            grad_scale: h.grad_scale,
            decay: (h.weight_decay != 0.0).then_some((1.0 - h.lr * h.weight_decay) as f32),
            lerp_from_end,
            lerp_weight,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: h.eps as f32,
            neg_step_size: (-step_size) as f32,
        })
    }
}

/// candle's `affine(x, s, 0.0)`: `x · s + 0` (the `+ 0` turns −0 into +0, so it is kept).
#[inline(always)]
fn scale(x: f32, s: f32) -> f32 {
    x * s + 0.0
}

/// One element of one step, in the stock optimizer's op order (see `kernels/adamw.cu`).
#[inline(always)]
pub fn adamw_element(s: &AdamWScalars, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
    let g = scale(g, s.grad_scale);
    let param = match s.decay {
        Some(decay) => scale(*p, decay),
        None => *p,
    };
    let step = scale(g - *m, s.lerp_weight);
    *m = if s.lerp_from_end { g - step } else { *m + step };
    *v = scale(*v, s.beta2) + scale(g, s.one_minus_beta2) * g;
    let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
    *p = param + scale(*m, s.neg_step_size) / denom;
}

/// CPU twin of `adamw_f32` for one tensor: updates `param`, `exp_avg` and `exp_avg_sq` in place.
pub fn adamw_twin(
    s: &AdamWScalars,
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
) {
    let n = param.len();
    assert!(
        grad.len() == n && exp_avg.len() == n && exp_avg_sq.len() == n,
        "adamw twin: slices of different lengths"
    );
    param
        .par_chunks_mut(TWIN_CHUNK)
        .zip(grad.par_chunks(TWIN_CHUNK))
        .zip(exp_avg.par_chunks_mut(TWIN_CHUNK))
        .zip(exp_avg_sq.par_chunks_mut(TWIN_CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                adamw_element(s, &mut p[i], g[i], &mut m[i], &mut v[i]);
            }
        });
}

/// torch's `clip_grad_norm_` total: the 2-norm of the per-tensor norms, accumulated in f32 in the order given.
pub fn combine_norms(norms: impl IntoIterator<Item = f32>) -> f32 {
    let mut sum_sq = 0f32;
    for norm in norms {
        sum_sq += norm * norm;
    }
    sum_sq.sqrt()
}

/// A tensor's norm from its sum of squares in f64, rounded to f32 as torch's `vector_norm` returns it.
fn tensor_norm(sum_sq: f64) -> f32 {
    sum_sq.sqrt() as f32
}

/// CPU twin of the global norm, the stock clipping's computation exactly: each tensor's Σg² in f64 (in element
/// order, as candle's `sum_all` adds), its norm rounded to f32, then [`combine_norms`].
pub fn grad_norm_twin(grads: &[&[f32]]) -> f32 {
    let norms: Vec<f32> = grads
        .par_iter()
        .map(|g| tensor_norm(g.iter().fold(0f64, |acc, &x| acc + x as f64 * x as f64)))
        .collect();
    combine_norms(norms)
}

/// `clip_grad_norm_`'s coefficient for the total `norm`: `min(max_norm / (norm + 1e-6), 1)` in f32
/// (`max_norm = ∞` gives 1: measuring only).
pub fn clip_coefficient(norm: f32, max_norm: f64) -> f32 {
    (max_norm as f32 / (norm + 1e-6)).min(1.0)
}

/// One row of a descriptor table: which tensor (index among those given) and its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRow {
    pub tensor: usize,
    pub first_block: u32,
    pub blocks: u32,
}

/// The descriptor table of a multi-tensor launch: a row `[numel, first_block, addresses…]` of u64 words per
/// non-empty tensor (empty tensors get none), in the order given.
#[derive(Debug, Clone)]
pub struct DescriptorTable {
    pub words: Vec<u64>,
    /// Words per row.
    pub stride: usize,
    pub rows: Vec<TableRow>,
    /// The grid: every row's blocks.
    pub blocks: u32,
}

impl DescriptorTable {
    fn new<const A: usize>(tensors: impl IntoIterator<Item = (usize, [u64; A])>) -> Result<Self> {
        let stride = 2 + A;
        let (mut words, mut rows, mut blocks) = (Vec::new(), Vec::new(), 0u64);
        for (tensor, (numel, addresses)) in tensors.into_iter().enumerate() {
            if numel == 0 {
                continue;
            }
            let count = numel.div_ceil(CHUNK) as u64;
            words.extend([numel as u64, blocks]);
            words.extend(addresses);
            rows.push(TableRow {
                tensor,
                first_block: blocks as u32,
                blocks: count as u32,
            });
            blocks += count;
            if blocks > i32::MAX as u64 {
                bail!("adamw: {blocks} blocks exceed one grid");
            }
        }
        Ok(Self {
            words,
            stride,
            rows,
            blocks: blocks as u32,
        })
    }
}

/// The addresses one tensor's AdamW step reads and writes (device addresses on CUDA, host ones under emulation).
#[derive(Debug, Clone, Copy)]
pub struct AdamWTensor {
    pub numel: usize,
    pub param: u64,
    pub grad: u64,
    pub exp_avg: u64,
    pub exp_avg_sq: u64,
}

/// The table of an `adamw_f32` launch.
pub fn adamw_table(tensors: &[AdamWTensor]) -> Result<DescriptorTable> {
    DescriptorTable::new(
        tensors
            .iter()
            .map(|t| (t.numel, [t.param, t.grad, t.exp_avg, t.exp_avg_sq])),
    )
}

/// The table of a `grad_sumsq_f32` launch over gradients given as (element count, address).
pub fn grad_sumsq_table(grads: &[(usize, u64)]) -> Result<DescriptorTable> {
    DescriptorTable::new(grads.iter().map(|&(numel, address)| (numel, [address])))
}

fn check_table(kernel: &str, table: &DescriptorTable, stride: usize) -> Result<()> {
    if table.stride != stride {
        bail!(
            "{kernel}: a table of {} words per row, expected {stride}",
            table.stride
        );
    }
    if table.blocks == 0 {
        bail!("{kernel}: nothing to launch (every tensor is empty)");
    }
    Ok(())
}

/// The `adamw_f32` launch over `table` (at address `table_address`): one block per chunk of every tensor.
pub fn adamw_launch(
    table_address: Arg,
    table: &DescriptorTable,
    s: &AdamWScalars,
) -> Result<Launch> {
    check_table("adamw", table, 6)?;
    let args = vec![
        table_address,
        Arg::I32(table.rows.len() as i32),
        Arg::I32(CHUNK as i32),
        Arg::F32(s.grad_scale),
        Arg::I32(s.decay.is_some() as i32),
        Arg::F32(s.decay.unwrap_or(1.0)),
        Arg::I32(s.lerp_from_end as i32),
        Arg::F32(s.lerp_weight),
        Arg::F32(s.beta2),
        Arg::F32(s.one_minus_beta2),
        Arg::F32(s.bias_correction2_sqrt),
        Arg::F32(s.eps),
        Arg::F32(s.neg_step_size),
    ];
    Launch::new(
        &ADAMW,
        DType::F32,
        [table.blocks, 1, 1],
        [BLOCK_THREADS, 1, 1],
        0,
        args,
    )
}

/// The `grad_sumsq_f32` launch over `table`, writing `table.blocks` partial sums to `partials`.
pub fn grad_sumsq_launch(
    table_address: Arg,
    table: &DescriptorTable,
    partials: Arg,
) -> Result<Launch> {
    check_table("grad_sumsq", table, 3)?;
    let args = vec![
        table_address,
        Arg::I32(table.rows.len() as i32),
        Arg::I32(CHUNK as i32),
        partials,
    ];
    Launch::new(
        &GRAD_SUMSQ,
        DType::F32,
        [table.blocks, 1, 1],
        [BLOCK_THREADS, 1, 1],
        0,
        args,
    )
}

/// The global norm of `tensors` gradients from the partials of a `grad_sumsq_f32` launch over `table`: each
/// tensor's partials added in block order in f64, then as [`grad_norm_twin`].
pub fn norm_from_partials(table: &DescriptorTable, tensors: usize, partials: &[f32]) -> f32 {
    let mut sums = vec![0f64; tensors];
    for row in &table.rows {
        let first = row.first_block as usize;
        sums[row.tensor] = partials[first..first + row.blocks as usize]
            .iter()
            .fold(0f64, |acc, &p| acc + p as f64);
    }
    combine_norms(sums.into_iter().map(tensor_norm))
}

fn check_f32(what: &str, t: &Tensor, device: &Device) -> Result<()> {
    if t.dtype() != DType::F32 {
        bail!(
            "adamw: {what} is {:?}; the fused optimizer takes f32 tensors",
            t.dtype()
        );
    }
    if !t.device().same_device(device) {
        bail!(
            "adamw: {what} is on {:?}, the others on {device:?}",
            t.device()
        );
    }
    Ok(())
}

/// The identity of a tensor's storage (tensors that share an allocation have the same).
fn storage_identity(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const Storage as usize
}

/// Fails unless every tensor the step writes has a storage of its own: shared with another written or read tensor,
/// the writes would race on the GPU and the storage locks would deadlock on the CPU. Gradients may share.
fn check_distinct(written: &[&Tensor], read: &[Tensor]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for t in written {
        if !seen.insert(storage_identity(t)) {
            bail!("adamw: a parameter or moment shares its storage with another one");
        }
    }
    if read.iter().any(|g| seen.contains(&storage_identity(g))) {
        bail!("adamw: a gradient shares its storage with a parameter or moment");
    }
    Ok(())
}

/// One AdamW step of every `params[i]` with gradient `grads[i]` and moments `exp_avg[i]`, `exp_avg_sq[i]`
/// (created as zeros before the first step, like torch's lazy state), all f32 on one device, updated in
/// place. Bit for bit `StockAdamW::step` (`testing::stock_adamw`) on gradients multiplied by
/// `hyper.grad_scale` first.
pub fn adamw_step(
    params: &[&Var],
    grads: &[&Tensor],
    exp_avg: &[&Tensor],
    exp_avg_sq: &[&Tensor],
    hyper: &AdamWHyper,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || exp_avg.len() != n || exp_avg_sq.len() != n {
        bail!(
            "adamw: {n} parameters, {} gradients, {} and {} moments",
            grads.len(),
            exp_avg.len(),
            exp_avg_sq.len()
        );
    }
    let scalars = AdamWScalars::new(hyper)?;
    let Some(first) = params.first() else {
        return Ok(());
    };
    let device = first.device().clone();
    let params: Vec<&Tensor> = params.iter().map(|v| v.as_tensor()).collect();
    for i in 0..n {
        let shape = params[i].shape();
        for (what, t) in [
            ("gradient", grads[i]),
            ("exp_avg", exp_avg[i]),
            ("exp_avg_sq", exp_avg_sq[i]),
        ] {
            if t.shape() != shape {
                bail!(
                    "adamw: the {what} of parameter {i} has shape {:?}, the parameter {shape:?}",
                    t.shape()
                );
            }
        }
        for (what, t) in [
            ("a parameter", params[i]),
            ("a gradient", grads[i]),
            ("a moment", exp_avg[i]),
            ("a moment", exp_avg_sq[i]),
        ] {
            check_f32(what, t, &device)?;
        }
    }
    let grads: Vec<Tensor> = grads
        .iter()
        .map(|g| g.contiguous())
        .collect::<Result<_>>()?;
    let written: Vec<&Tensor> = params
        .iter()
        .chain(exp_avg)
        .chain(exp_avg_sq)
        .copied()
        .collect();
    check_distinct(&written, &grads)?;
    match &device {
        Device::Cpu => (0..n).into_par_iter().try_for_each(|i| {
            with_elements_mut(params[i], |p| {
                with_elements_mut(exp_avg[i], |m| {
                    with_elements_mut(exp_avg_sq[i], |v| {
                        let (g, layout) = grads[i].storage_and_layout();
                        let Storage::Cpu(g) = &*g else {
                            bail!("adamw: a gradient left the CPU")
                        };
                        adamw_twin(&scalars, p, f32::slice(g, layout, "adamw gradient")?, m, v);
                        Ok(())
                    })
                })
            })
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => adamw_step_cuda(cuda, &scalars, &params, &grads, exp_avg, exp_avg_sq),
        other => bail!("adamw: no implementation on {other:?}"),
    }
}

/// Runs `f` on the f32 elements of `t` (contiguous, on the CPU) with its storage write-locked.
fn with_elements_mut(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    t.inplace_op1(&WithElements(Cell::new(Some(f))))
}

/// An in-place op that hands the elements to a closure (candle's only public way to write a storage).
struct WithElements<F>(Cell<Option<F>>);

impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for WithElements<F> {
    fn name(&self) -> &'static str {
        "kto-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(values) = storage else {
            bail!("adamw: expected f32 storage")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("adamw: parameters and moments must be contiguous (layout {layout:?})")
        };
        let Some(f) = self.0.take() else {
            bail!("adamw: in-place op applied twice")
        };
        f(&mut values[start..end])
    }
}

#[cfg(feature = "cuda")]
fn adamw_step_cuda(
    device: &candle_core::CudaDevice,
    scalars: &AdamWScalars,
    params: &[&Tensor],
    grads: &[Tensor],
    exp_avg: &[&Tensor],
    exp_avg_sq: &[&Tensor],
) -> Result<()> {
    for t in params.iter().chain(exp_avg).chain(exp_avg_sq) {
        if !t.is_contiguous() {
            bail!(
                "adamw: parameters and moments must be contiguous (layout {:?})",
                t.layout()
            );
        }
    }
    let stream = device.cuda_stream();
    // The kernel writes the parameters and moments through these addresses: in place, like `Var::set`, ordered
    // after earlier work and before later work by candle's single stream.
    let locked: Vec<_> = (0..params.len())
        .flat_map(|i| [params[i], &grads[i], exp_avg[i], exp_avg_sq[i]])
        .map(|t| t.storage_and_layout())
        .collect();
    let mut addresses = Vec::with_capacity(locked.len());
    for (storage, layout) in &locked {
        let Storage::Cuda(s) = &**storage else {
            bail!("adamw: a tensor left the GPU")
        };
        addresses.push(crate::cuda::address(
            "adamw parameter/gradient/moment",
            s,
            layout,
            &stream,
        )?);
    }
    let tensors: Vec<AdamWTensor> = addresses
        .chunks(4)
        .zip(params)
        .map(|(a, p)| AdamWTensor {
            numel: p.elem_count(),
            param: a[0].address,
            grad: a[1].address,
            exp_avg: a[2].address,
            exp_avg_sq: a[3].address,
        })
        .collect();
    let table = adamw_table(&tensors)?;
    if table.blocks == 0 {
        return Ok(());
    }
    let mut words = device.clone_htod(table.words.as_slice())?;
    let words_address = crate::cuda::address_mut(&mut words, &stream);
    crate::cuda::run(device, &adamw_launch(words_address.arg(), &table, scalars)?)
}

/// torch's `clip_grad_norm_` total norm of f32 gradients on one device (the norm of the per-tensor norms,
/// combined in the order given: kto-trainer sorts by parameter name). On the CPU exactly the stock value; on
/// CUDA one launch, each block's Σg² accumulated in f32 (a few ulp apart).
pub fn global_grad_norm(grads: &[&Tensor]) -> Result<f32> {
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let device = first.device().clone();
    for g in grads {
        check_f32("a gradient", g, &device)?;
    }
    let grads: Vec<Tensor> = grads
        .iter()
        .map(|g| g.contiguous())
        .collect::<Result<_>>()?;
    let locked: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    match &device {
        Device::Cpu => {
            let mut slices = Vec::with_capacity(locked.len());
            for (storage, layout) in &locked {
                let Storage::Cpu(s) = &**storage else {
                    bail!("adamw: a gradient left the CPU")
                };
                slices.push(f32::slice(s, layout, "gradient")?);
            }
            Ok(grad_norm_twin(&slices))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let stream = cuda.cuda_stream();
            let mut addresses = Vec::with_capacity(locked.len());
            for (storage, layout) in &locked {
                let Storage::Cuda(s) = &**storage else {
                    bail!("adamw: a gradient left the GPU")
                };
                addresses.push((
                    layout.shape().elem_count(),
                    crate::cuda::address("grad norm gradient", s, layout, &stream)?,
                ));
            }
            let entries: Vec<(usize, u64)> =
                addresses.iter().map(|(n, a)| (*n, a.address)).collect();
            let table = grad_sumsq_table(&entries)?;
            if table.blocks == 0 {
                return Ok(0.0);
            }
            let mut words = cuda.clone_htod(table.words.as_slice())?;
            // SAFETY: every block writes its partial.
            let mut partials = unsafe { cuda.alloc::<f32>(table.blocks as usize)? };
            {
                let words_address = crate::cuda::address_mut(&mut words, &stream);
                let partials_address = crate::cuda::address_mut(&mut partials, &stream);
                let launch =
                    grad_sumsq_launch(words_address.arg(), &table, partials_address.arg())?;
                crate::cuda::run(cuda, &launch)?;
            }
            let partials = cuda.clone_dtoh(&partials)?;
            Ok(norm_from_partials(&table, grads.len(), &partials))
        }
        other => bail!("adamw: no implementation on {other:?}"),
    }
}
