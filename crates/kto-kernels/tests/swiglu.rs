//! SwiGLU: the CUDA kernels (emulated) against the CPU twin, the twin's backward against finite differences, and the
//! candle op against the stock-op formula it replaces (`gate.silu() * up` on two halves of the fused projection).

use candle_core::{DType, Device, Tensor, Var, D};
use kto_kernels::emulation::{run, GuardedBuffer, Order};
use kto_kernels::float::Float;
use kto_kernels::swiglu::{
    backward_launch, backward_twin, forward_launch, forward_twin, swiglu, swiglu_backward,
    MAX_ROW_BLOCKS,
};
use kto_kernels::testing::emulated::assert_emulated_matches_twin;
use kto_kernels::testing::{
    assert_close, cast, check_gradient, flat, probe_gradients, probe_loss, widen, Normal,
    Tolerance, MODEL_SHAPES, STOCK_F32,
};
use kto_kernels::tests_per_dtype;

/// Awkward widths of the output row: one element, below a warp, not multiples of 32 or 128, several blocks per row.
const INNER: [usize; 5] = [1, 7, 33, 100, 1536];
const ROWS: [usize; 3] = [1, 3, 17];
/// Gates where σ saturates (±30) or e^−x overflows f32 (−100), planted among the normal ones.
const LARGE_GATES: [f32; 5] = [30.0, -30.0, 100.0, -100.0, -88.5];

/// `rows` rows of [gate | up]: gates ~ N(0, 3²) with the large ones planted at the start of each row's gate half,
/// ups ~ N(0, 1).
fn gate_up(rng: &mut Normal, rows: usize, inner: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(rows * 2 * inner);
    for row in 0..rows {
        let mut gate = rng.vec(inner, 3.0);
        let planted = LARGE_GATES.len().min(inner);
        for (i, g) in gate.iter_mut().take(planted).enumerate() {
            *g = LARGE_GATES[(row + i) % LARGE_GATES.len()];
        }
        values.extend(gate);
        values.extend(rng.vec(inner, 1.0));
    }
    values
}

fn assert_finite(what: &str, values: &[f32]) {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {}", values[i]);
    }
}

/// Bit for bit. The kernels evaluate the twin's expressions in the same order, and under emulation `expf` is the
/// same libm function Rust's `f32::exp` calls, so any difference is a different rounding sequence, which a tolerance
/// of one bf16 step (`Tolerance::for_dtype`) could not see. (On a GPU, CUDA's `expf` may differ by 2 ulp.)
const EXACT: Tolerance = Tolerance { rel: 0.0, abs: 0.0 };

fn emulated_matches_twin<T: Float>() -> candle_core::Result<()> {
    let mut rng = Normal::new(7);
    let tol = EXACT;
    // and the intermediate sizes of the real models
    for inner in INNER
        .into_iter()
        .chain(MODEL_SHAPES.map(|m| m.intermediate))
    {
        for rows in ROWS {
            let x: Vec<T> = cast(&gate_up(&mut rng, rows, inner));
            let g: Vec<T> = cast(&rng.vec(rows * inner, 1.0));
            let mut out_twin = vec![T::default(); rows * inner];
            forward_twin(&x, &mut out_twin, inner);
            let mut dx_twin = vec![T::default(); rows * 2 * inner];
            backward_twin(&x, &g, &mut dx_twin, inner);
            let (out_twin, dx_twin) = (widen(&out_twin), widen(&dx_twin));
            if T::DTYPE == DType::F32 {
                assert_finite("swiglu twin forward", &out_twin);
                assert_finite("swiglu twin backward", &dx_twin);
            }
            let (xb, gb) = (GuardedBuffer::from_slice(&x), GuardedBuffer::from_slice(&g));
            let case = format!("{:?} {rows}×{inner}", T::DTYPE);
            assert_emulated_matches_twin::<T>(
                &format!("swiglu forward {case}"),
                &out_twin,
                tol,
                |out| forward_launch(T::DTYPE, rows, inner, xb.arg(), out),
            )?;
            assert_emulated_matches_twin::<T>(
                &format!("swiglu backward {case}"),
                &dx_twin,
                tol,
                |dx| backward_launch(T::DTYPE, rows, inner, xb.arg(), gb.arg(), dx),
            )?;
        }
    }
    Ok(())
}

tests_per_dtype!(emulated_kernels_match_the_twin, emulated_matches_twin);

/// More rows than the launch gives block rows: the kernels' row stride must cover the rest.
#[test]
fn emulated_kernels_stride_over_rows_beyond_the_grid() -> candle_core::Result<()> {
    let mut rng = Normal::new(13);
    for inner in [1, 33] {
        let rows = MAX_ROW_BLOCKS + 5;
        let x = gate_up(&mut rng, rows, inner);
        let g = rng.vec(rows * inner, 1.0);
        let mut out_twin = vec![0f32; rows * inner];
        forward_twin(&x, &mut out_twin, inner);
        let mut dx_twin = vec![0f32; rows * 2 * inner];
        backward_twin(&x, &g, &mut dx_twin, inner);
        let (xb, gb) = (GuardedBuffer::from_slice(&x), GuardedBuffer::from_slice(&g));
        let out = GuardedBuffer::filled(rows * inner, f32::NAN);
        let launch = forward_launch(DType::F32, rows, inner, xb.arg(), out.arg())?;
        assert_eq!(launch.grid[1] as usize, MAX_ROW_BLOCKS);
        run(&launch, Order::Descending)?;
        assert_close(
            "swiglu forward, strided rows",
            out.as_slice(),
            &out_twin,
            EXACT,
        )?;
        let dx = GuardedBuffer::filled(rows * 2 * inner, f32::NAN);
        run(
            &backward_launch(DType::F32, rows, inner, xb.arg(), gb.arg(), dx.arg())?,
            Order::Ascending,
        )?;
        assert_close(
            "swiglu backward, strided rows",
            dx.as_slice(),
            &dx_twin,
            EXACT,
        )?;
        out.check()?;
        dx.check()?;
    }
    Ok(())
}

#[test]
fn twin_backward_matches_finite_differences() -> candle_core::Result<()> {
    let mut rng = Normal::new(11);
    for inner in [1, 7, 33] {
        let rows = 3;
        let x = gate_up(&mut rng, rows, inner);
        let probe = rng.vec(rows * inner, 1.0);
        let mut dx = vec![0f32; rows * 2 * inner];
        backward_twin(&x, &probe, &mut dx, inner);
        let loss = |x: &[f32]| {
            let mut y = vec![0f32; rows * inner];
            forward_twin(x, &mut y, inner);
            probe_loss(&y, &probe)
        };
        check_gradient(
            &format!("swiglu inner {inner}"),
            &x,
            &dx,
            loss,
            1e-2,
            2e-3,
            256,
        )?;
    }
    Ok(())
}

/// The formula the op replaces, from stock candle ops (what kto-model's Llama MLP computes today).
fn stock_swiglu(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let inner = gate_up.dim(D::Minus1)? / 2;
    let gate = gate_up.narrow(D::Minus1, 0, inner)?;
    let up = gate_up.narrow(D::Minus1, inner, inner)?;
    gate.silu()? * up
}

#[test]
fn op_matches_the_stock_formula_in_value_and_gradient() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(3);
    let (batch, tokens, inner) = (2, 5, 33);
    let x = Var::from_vec(
        gate_up(&mut rng, batch * tokens, inner),
        (batch, tokens, 2 * inner),
        &dev,
    )?;
    let probe = Tensor::from_vec(
        rng.vec(batch * tokens * inner, 1.0),
        (batch, tokens, inner),
        &dev,
    )?;
    let fused = swiglu(x.as_tensor())?;
    let stock = stock_swiglu(x.as_tensor())?;
    assert_eq!(fused.dims(), &[batch, tokens, inner]);
    assert_finite("swiglu op forward", &flat(&fused)?);
    assert_close(
        "swiglu op forward",
        &flat(&fused)?,
        &flat(&stock)?,
        Tolerance::for_dtype(DType::F32),
    )?;
    let [a] = probe_gradients(&fused, &probe, [x.as_tensor()])?;
    let [b] = probe_gradients(&stock, &probe, [x.as_tensor()])?;
    assert_finite("swiglu op gradient", &flat(&a)?);
    assert_close("swiglu op gradient", &flat(&a)?, &flat(&b)?, STOCK_F32)?;
    // the op is one node over gate_up: no silu, narrow or product intermediates in the graph
    assert_eq!(fused.sorted_nodes().len(), 2);
    Ok(())
}

/// A transposed (non-contiguous) input gives what its contiguous copy gives, and its gradient reaches the variable.
#[test]
fn op_takes_a_non_contiguous_input() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(17);
    let (rows, inner) = (6, 7);
    let columns = Var::from_vec(rng.vec(2 * inner * rows, 2.0), (2 * inner, rows), &dev)?;
    let x = columns.as_tensor().t()?;
    assert!(!x.is_contiguous());
    let probe = Tensor::from_vec(rng.vec(rows * inner, 1.0), (rows, inner), &dev)?;
    let fused = swiglu(&x)?;
    let tol = Tolerance::for_dtype(DType::F32);
    assert_close(
        "swiglu transposed forward",
        &flat(&fused)?,
        &flat(&swiglu(&x.contiguous()?)?)?,
        tol,
    )?;
    let stock = stock_swiglu(&x)?;
    let [a] = probe_gradients(&fused, &probe, [columns.as_tensor()])?;
    let [b] = probe_gradients(&stock, &probe, [columns.as_tensor()])?;
    assert_close(
        "swiglu transposed gradient",
        &flat(&a)?,
        &flat(&b)?,
        STOCK_F32,
    )
}

/// transformers' rounding from stock ops: torch's silu on a bf16/f16 tensor (f32 math, one rounding), then the
/// product of the two dtype tensors (f32 math, one rounding).
fn torch_rounded_swiglu(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let inner = gate_up.dim(D::Minus1)? / 2;
    let dtype = gate_up.dtype();
    let gate = gate_up.narrow(D::Minus1, 0, inner)?.to_dtype(DType::F32)?;
    let up = gate_up
        .narrow(D::Minus1, inner, inner)?
        .to_dtype(DType::F32)?;
    let silu = gate.silu()?.to_dtype(dtype)?.to_dtype(DType::F32)?;
    (silu * up)?.to_dtype(dtype)
}

/// In bf16 and f16 the op rounds exactly where torch does (the same f32 silu expression, so bit for bit).
#[test]
fn op_rounds_as_torch_does() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(19);
    let (rows, inner) = (17, 100);
    let x = Tensor::from_vec(gate_up(&mut rng, rows, inner), (rows, 2 * inner), &dev)?;
    for dtype in [DType::BF16, DType::F16] {
        let x = x.to_dtype(dtype)?;
        let what = format!("swiglu {dtype:?} vs torch's rounding");
        assert_close(
            &what,
            &flat(&swiglu(&x)?)?,
            &flat(&torch_rounded_swiglu(&x)?)?,
            EXACT,
        )?;
    }
    Ok(())
}

/// In bf16 the op (f32 math, torch's two roundings) stays within bf16 tolerance of candle's stock bf16 path, and
/// its gradient within bf16 tolerance of the f32 op's on the same inputs.
#[test]
fn op_in_bf16_stays_close_to_the_stock_bf16_path() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(5);
    let (rows, inner) = (17, 100);
    let x = Tensor::from_vec(gate_up(&mut rng, rows, inner), (rows, 2 * inner), &dev)?
        .to_dtype(DType::BF16)?;
    let grad =
        Tensor::from_vec(rng.vec(rows * inner, 1.0), (rows, inner), &dev)?.to_dtype(DType::BF16)?;
    let fused = swiglu(&x)?;
    assert_eq!(fused.dtype(), DType::BF16);
    let tol = Tolerance::for_dtype(DType::BF16);
    assert_close(
        "swiglu bf16 vs stock bf16",
        &flat(&fused)?,
        &flat(&stock_swiglu(&x)?)?,
        tol,
    )?;
    let dx = swiglu_backward(&x, &grad)?;
    assert_eq!(dx.dtype(), DType::BF16);
    let dx_f32 = swiglu_backward(&x.to_dtype(DType::F32)?, &grad.to_dtype(DType::F32)?)?;
    assert_close(
        "swiglu bf16 gradient vs f32",
        &flat(&dx)?,
        &flat(&dx_f32)?,
        tol,
    )
}

#[test]
fn op_rejects_malformed_shapes() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    assert!(swiglu(&Tensor::zeros((2, 7), DType::F32, &dev)?).is_err());
    assert!(swiglu(&Tensor::zeros((2, 0), DType::F32, &dev)?).is_err());
    let x = Tensor::zeros((2, 8), DType::F32, &dev)?;
    assert!(swiglu_backward(&x, &Tensor::zeros((2, 8), DType::F32, &dev)?).is_err());
    assert!(swiglu_backward(&x, &Tensor::zeros((2, 4), DType::F32, &dev)?).is_ok());
    Ok(())
}
