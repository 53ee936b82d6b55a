//! Helpers for the kernel tests and benchmarks: seeded data, dtype-aware closeness, finite differences, the
//! emulated-kernel-against-twin comparison ([`emulated`]), and the stock candle-op optimizer the fused AdamW is
//! checked against ([`stock_adamw`]).

use crate::float::Float;
use candle_core::{bail, DType, Result, Tensor};

#[cfg(feature = "emulation")]
pub mod emulated;
pub mod stock_adamw;

/// The dimensions of a model the kernels serve, for one emulated case of realistic size per kernel.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

/// TinyLlama-1.1B (the GPU benchmark's shape) and SmolLM2-135M (the CPU recipe's).
pub const MODEL_SHAPES: [ModelShape; 2] = [
    ModelShape {
        name: "TinyLlama-1.1B",
        hidden: 2048,
        intermediate: 5632,
        heads: 32,
        kv_heads: 4,
        head_dim: 64,
        vocab: 32000,
    },
    ModelShape {
        name: "SmolLM2-135M",
        hidden: 576,
        intermediate: 1536,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        vocab: 49152,
    },
];
/// Keys of a long sequence (TinyLlama's context length).
pub const LONG_KEYS: usize = 2048;
/// A large LoRA rank of common use (two 64-step chunks of the epilogue's tiles).
pub const LARGE_RANK: usize = 128;

/// A seeded stream of normal numbers (splitmix64 + Box-Muller): the same data on every machine.
pub struct Normal(u64);

impl Normal {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn sample(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.sample() * scale).collect()
    }

    /// Integers in `0..bound`.
    pub fn below(&mut self, bound: u32) -> u32 {
        (self.uniform() * bound as f64) as u32 % bound.max(1)
    }
}

pub fn cast<T: Float>(values: &[f32]) -> Vec<T> {
    values.iter().map(|&v| T::from_f32(v)).collect()
}

pub fn widen<T: Float>(values: &[T]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// How far two results of the same computation may be apart: `|got − want| ≤ abs + rel · |want|`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub rel: f32,
    pub abs: f32,
}

impl Tolerance {
    /// Two f32 computations that differ only in the order of their sums; in bf16/f16 one rounding step apart.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::BF16 => Tolerance {
                rel: 1.0 / 64.0,
                abs: 1e-3,
            },
            DType::F16 => Tolerance {
                rel: 1.0 / 512.0,
                abs: 1e-4,
            },
            _ => Tolerance {
                rel: 2e-5,
                abs: 2e-6,
            },
        }
    }
}

/// An op against the stock-op formula it replaces, in f32, where the two sum in different orders: every op's gradient
/// ([`probe_gradients`] of each), attention's output.
pub const STOCK_F32: Tolerance = Tolerance {
    rel: 1e-4,
    abs: 1e-5,
};

/// Fails with the worst element when `got` and `want` differ by more than `tol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tolerance) -> Result<()> {
    compare_close(what, got, want, tol).map(|_| ())
}

/// The element of a comparison nearest to (or furthest past) its tolerance.
#[derive(Debug, Clone, Copy)]
pub struct Worst {
    pub index: usize,
    /// |got − want| there (infinite where exactly one of them is NaN).
    pub error: f32,
    /// What the tolerance allows there: `abs + rel · |want|`.
    pub allowed: f32,
}

impl Worst {
    /// error / allowed: below 1 passes.
    pub fn ratio(&self) -> f32 {
        if self.error == 0.0 {
            0.0
        } else {
            self.error / self.allowed
        }
    }
}

impl std::fmt::Display for Worst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "worst |Δ| {:.3e} at element {} (allowed {:.3e}: {:.1} % of the tolerance)",
            self.error,
            self.index,
            self.allowed,
            100.0 * self.ratio()
        )
    }
}

/// [`assert_close`] that also returns the worst element, so a caller can show how near a pass came to failing.
pub fn compare_close(what: &str, got: &[f32], want: &[f32], tol: Tolerance) -> Result<Worst> {
    if got.len() != want.len() {
        bail!("{what}: {} values, expected {}", got.len(), want.len());
    }
    let mut worst = Worst {
        index: 0,
        error: 0.0,
        allowed: tol.abs,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let error = if g.is_nan() || w.is_nan() {
            if g.is_nan() && w.is_nan() {
                0.0
            } else {
                f32::INFINITY
            }
        } else if g == w {
            0.0
        } else {
            (g - w).abs()
        };
        let here = Worst {
            index: i,
            error,
            allowed: tol.abs + tol.rel * w.abs(),
        };
        if here.ratio() > worst.ratio() {
            worst = here;
        }
    }
    if worst.error > worst.allowed {
        let i = worst.index;
        bail!(
            "{what}: element {i} is {} but should be {} (tolerance {:?}; {} elements)",
            got[i],
            want[i],
            tol,
            got.len()
        );
    }
    Ok(worst)
}

/// The GEMM formulation of attention (what the GPU runs) against the CPU twin: f32 differs by summation order; in
/// bf16/f16 the probabilities are rounded to the dtype before P·V, so outputs and gradients move by a few of its
/// steps. One value for the CPU test of the formulation and the GPU comparison.
pub fn gemm_attention_tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F32 => Tolerance {
            rel: 1e-4,
            abs: 1e-5,
        },
        _ => Tolerance {
            rel: 0.02,
            abs: 0.02,
        },
    }
}

/// A tensor's values, flattened and widened to f32 (for comparing tensors of any shape and float dtype).
pub fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// `Σ y · probe` in f64: the loss whose gradient with respect to an op's output `y` is `probe`. A backward given
/// `probe` as the output's gradient is checked by [`check_gradient`] of this loss of the forward.
pub fn probe_loss(y: &[f32], probe: &[f32]) -> f64 {
    assert_eq!(y.len(), probe.len(), "an output and its probe");
    y.iter()
        .zip(probe)
        .map(|(&y, &p)| y as f64 * p as f64)
        .sum()
}

/// The gradients of `Σ probe ⊙ y` (y's backward given `probe` as its gradient) with respect to each of `xs`, for
/// checking an op's backward against the stock-op formula's on the same inputs.
pub fn probe_gradients<const N: usize>(
    y: &Tensor,
    probe: &Tensor,
    xs: [&Tensor; N],
) -> Result<[Tensor; N]> {
    let grads = (y * probe)?.sum_all()?.backward()?;
    let mut out = Vec::with_capacity(N);
    for (i, x) in xs.into_iter().enumerate() {
        match grads.get(x) {
            Some(g) => out.push(g.clone()),
            None => bail!("input {i} gets no gradient"),
        }
    }
    Ok(out.try_into().expect("one gradient per input"))
}

/// Checks an analytic gradient against central differences of `loss` (evaluated in f32, summed in f64) at up to
/// `samples` coordinates spread over `x`: `|fd − analytic| ≤ tol · max(1, max |analytic|)`.
pub fn check_gradient(
    what: &str,
    x: &[f32],
    analytic: &[f32],
    loss: impl Fn(&[f32]) -> f64,
    step: f32,
    tol: f64,
    samples: usize,
) -> Result<()> {
    if x.len() != analytic.len() {
        bail!(
            "{what}: gradient has {} values for {} inputs",
            analytic.len(),
            x.len()
        );
    }
    let scale = analytic.iter().fold(1f64, |m, &g| m.max(g.abs() as f64));
    let stride = (x.len() / samples.max(1)).max(1);
    let mut probe = x.to_vec();
    for i in (0..x.len()).step_by(stride) {
        probe[i] = x[i] + step;
        let up = loss(&probe);
        probe[i] = x[i] - step;
        let down = loss(&probe);
        probe[i] = x[i];
        let fd = (up - down) / (2.0 * step as f64);
        if (fd - analytic[i] as f64).abs() > tol * scale {
            bail!(
                "{what}: d/dx[{i}] is {} analytically, {fd} by finite differences (tolerance {tol} × {scale})",
                analytic[i]
            );
        }
    }
    Ok(())
}
