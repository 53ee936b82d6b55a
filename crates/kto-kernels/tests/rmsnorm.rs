//! RMSNorm: the CUDA kernel (emulated) against the CPU twin, the twin's backward against finite differences, and the
//! candle op against the stock-op formula it replaces.

use candle_core::{DType, Device, Tensor, Var, D};
use kto_kernels::emulation::GuardedBuffer;
use kto_kernels::float::Float;
use kto_kernels::rmsnorm::{
    backward_launch, backward_twin, forward_launch, forward_twin, rms_norm,
};
use kto_kernels::testing::emulated::assert_emulated_matches_twin;
use kto_kernels::testing::{
    assert_close, cast, check_gradient, flat, probe_gradients, probe_loss, widen, Normal,
    Tolerance, MODEL_SHAPES, STOCK_F32,
};
use kto_kernels::tests_per_dtype;

const EPS: f32 = 1e-5;
/// Awkward row lengths: one element, below a warp, not multiples of 32 or 128, several elements per thread.
const DIMS: [usize; 7] = [1, 7, 32, 33, 100, 576, 1500];

fn emulated_matches_twin<T: Float>() -> candle_core::Result<()> {
    let mut rng = Normal::new(7);
    let tol = Tolerance::for_dtype(T::DTYPE);
    // and the hidden sizes of the real models
    for dim in DIMS.into_iter().chain(MODEL_SHAPES.map(|m| m.hidden)) {
        for rows in [1, 3] {
            let x: Vec<T> = cast(&rng.vec(rows * dim, 2.0));
            let w: Vec<T> = cast(&rng.vec(dim, 1.0));
            let g: Vec<T> = cast(&rng.vec(rows * dim, 1.0));
            let mut y_twin = vec![T::default(); rows * dim];
            forward_twin(&x, &w, &mut y_twin, EPS);
            let mut dx_twin = vec![T::default(); rows * dim];
            backward_twin(&x, &w, &g, &mut dx_twin, EPS);
            let (xb, wb, gb) = (
                GuardedBuffer::from_slice(&x),
                GuardedBuffer::from_slice(&w),
                GuardedBuffer::from_slice(&g),
            );
            let case = format!("{:?} {rows}×{dim}", T::DTYPE);
            assert_emulated_matches_twin::<T>(
                &format!("rms-norm forward {case}"),
                &widen(&y_twin),
                tol,
                |y| forward_launch(T::DTYPE, rows, dim, EPS, xb.arg(), wb.arg(), y),
            )?;
            assert_emulated_matches_twin::<T>(
                &format!("rms-norm backward {case}"),
                &widen(&dx_twin),
                tol,
                |dx| backward_launch(T::DTYPE, rows, dim, EPS, xb.arg(), wb.arg(), gb.arg(), dx),
            )?;
        }
    }
    Ok(())
}

tests_per_dtype!(emulated_kernels_match_the_twin, emulated_matches_twin);

#[test]
fn twin_backward_matches_finite_differences() -> candle_core::Result<()> {
    let mut rng = Normal::new(11);
    for dim in [1, 5, 64, 77] {
        let rows = 2;
        let x = rng.vec(rows * dim, 1.5);
        let w = rng.vec(dim, 1.0);
        let probe = rng.vec(rows * dim, 1.0);
        let mut dx = vec![0f32; rows * dim];
        backward_twin(&x, &w, &probe, &mut dx, EPS);
        let loss = |x: &[f32]| {
            let mut y = vec![0f32; x.len()];
            forward_twin(x, &w, &mut y, EPS);
            probe_loss(&y, &probe)
        };
        check_gradient(
            &format!("rms-norm dim {dim}"),
            &x,
            &dx,
            loss,
            1e-2,
            2e-3,
            64,
        )?;
    }
    Ok(())
}

/// transformers' formula from stock candle ops (what kto-model's `rms_norm` computes today).
fn stock_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed.to_dtype(x.dtype())?.broadcast_mul(w)
}

#[test]
fn op_matches_the_stock_formula_in_value_and_gradient() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(3);
    let (rows, tokens, dim) = (2, 5, 40);
    let x = Var::from_vec(rng.vec(rows * tokens * dim, 1.0), (rows, tokens, dim), &dev)?;
    let w = Tensor::from_vec(rng.vec(dim, 1.0), dim, &dev)?;
    let probe = Tensor::from_vec(rng.vec(rows * tokens * dim, 1.0), (rows, tokens, dim), &dev)?;
    let fused = rms_norm(x.as_tensor(), &w, 1e-5)?;
    let stock = stock_rms_norm(x.as_tensor(), &w, 1e-5)?;
    assert_close(
        "rms-norm op forward",
        &flat(&fused)?,
        &flat(&stock)?,
        Tolerance::for_dtype(DType::F32),
    )?;
    let [a] = probe_gradients(&fused, &probe, [x.as_tensor()])?;
    let [b] = probe_gradients(&stock, &probe, [x.as_tensor()])?;
    assert_close("rms-norm op gradient", &flat(&a)?, &flat(&b)?, STOCK_F32)?;
    // the op is one node over x: no [rows, tokens, dim] f32 intermediates in the graph
    assert_eq!(fused.sorted_nodes().len(), 2);
    Ok(())
}

#[test]
fn op_in_bf16_stays_close_to_f32() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(5);
    let x = Tensor::from_vec(rng.vec(3 * 96, 1.0), (3, 96), &dev)?;
    let w = Tensor::from_vec(rng.vec(96, 1.0), 96, &dev)?;
    let f32_out = rms_norm(&x, &w, 1e-6)?;
    let bf16_out = rms_norm(&x.to_dtype(DType::BF16)?, &w.to_dtype(DType::BF16)?, 1e-6)?;
    assert_close(
        "rms-norm bf16 vs f32",
        &flat(&bf16_out)?,
        &flat(&f32_out)?,
        Tolerance {
            rel: 0.02,
            abs: 0.02,
        },
    )
}
