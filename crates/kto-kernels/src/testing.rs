//! Helpers for the kernel tests and benchmarks: seeded data, dtype-aware closeness, finite differences, and the
//! stock candle-op optimizer the fused AdamW is checked against ([`stock_adamw`]).

use crate::float::Float;
use candle_core::{bail, DType, Result};

pub mod stock_adamw;

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

/// Fails with the worst element when `got` and `want` differ by more than `tol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tolerance) -> Result<()> {
    if got.len() != want.len() {
        bail!("{what}: {} values, expected {}", got.len(), want.len());
    }
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = if g.is_nan() || w.is_nan() {
            if g.is_nan() && w.is_nan() {
                0.0
            } else {
                f32::INFINITY
            }
        } else if g == w {
            0.0
        } else {
            (g - w).abs() - (tol.abs + tol.rel * w.abs())
        };
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        bail!(
            "{what}: element {i} is {} but should be {} (tolerance {:?}; {} elements)",
            got[i],
            want[i],
            tol,
            got.len()
        );
    }
    Ok(())
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
