//! LoRA epilogue: the CUDA kernel (emulated) against the CPU twin, the backward against finite differences of the
//! twin, and the candle op against the stock-op formula it replaces (kto-model's `lora_delta` + add + cast).

use candle_core::{DType, Device, Tensor, Var};
use kto_kernels::emulation::GuardedBuffer;
use kto_kernels::float::Float;
use kto_kernels::lora::{epilogue_launch, forward_twin, lora_epilogue, lora_epilogue_backward};
use kto_kernels::testing::emulated::assert_emulated_matches_twin;
use kto_kernels::testing::{
    assert_close, cast, check_gradient, flat, probe_gradients, probe_loss, widen, Normal,
    Tolerance, LARGE_RANK, MODEL_SHAPES, STOCK_F32,
};
use kto_kernels::tests_per_dtype;

const SCALE: f32 = 2.0;

/// Segment starts for `segments` uneven segments of `cols` columns (None where they do not fit). The three-way split
/// puts segment boundaries inside 64-column tiles, so some tiles take two or three segment passes.
fn starts(cols: usize, segments: usize) -> Option<Vec<usize>> {
    match segments {
        1 => Some(vec![0]),
        3 if cols >= 3 => Some(vec![0, (cols * 11).div_ceil(20), (cols * 4).div_ceil(5)]),
        _ => None,
    }
}

fn emulated_matches_twin<T: Float>() -> candle_core::Result<()> {
    let mut rng = Normal::new(17);
    let mut cases = Vec::new();
    // rows 77 spans two 64-row tiles, columns 100 and 130 two and three 64-column tiles.
    for rows in [1, 5, 37, 77] {
        for cols in [1, 33, 100, 130] {
            for rank in [1, 8, 16] {
                for segments in [1, 3] {
                    cases.push((rows, cols, rank, segments));
                }
            }
        }
    }
    // Ranks around the 64-step chunk of the shared tiles and above it (r = 64…256 is common): one partial chunk, one
    // full, one full and one step, two and four chunks.
    for rank in [1, 63, 64, 65, 128, 256] {
        cases.push((77, 130, rank, 3));
        cases.push((5, 100, rank, 1));
    }
    let mut fused = Vec::new();
    for m in MODEL_SHAPES {
        // the real models' q|k|v projection (segments at the q and k widths) and down projection, rank 128
        let (q, kv) = (m.heads * m.head_dim, m.kv_heads * m.head_dim);
        fused.push((70, q + 2 * kv, LARGE_RANK, vec![0, q, q + kv]));
        fused.push((70, m.hidden, LARGE_RANK, vec![0]));
    }
    let cases = cases
        .into_iter()
        .filter_map(|(rows, cols, rank, segments)| {
            Some((rows, cols, rank, starts(cols, segments)?))
        })
        .chain(fused);
    for (rows, cols, rank, starts) in cases {
        let segments = starts.len();
        let base: Vec<T> = cast(&rng.vec(rows * cols, 1.0));
        let h = rng.vec(rows * segments * rank, 1.0);
        let b = rng.vec(cols * rank, 0.5);
        let mut want = vec![T::default(); rows * cols];
        forward_twin(&base, &h, &b, &mut want, cols, &starts, SCALE);
        let (base_buf, h_buf, b_buf) = (
            GuardedBuffer::from_slice(&base),
            GuardedBuffer::from_slice(&h),
            GuardedBuffer::from_slice(&b),
        );
        let what = format!(
            "lora epilogue {:?} {rows}×{cols} rank {rank} starts {starts:?}",
            T::DTYPE
        );
        assert_emulated_matches_twin::<T>(
            &what,
            &widen(&want),
            Tolerance::for_dtype(T::DTYPE),
            |out| {
                epilogue_launch(
                    T::DTYPE,
                    rows,
                    cols,
                    rank,
                    &starts,
                    SCALE,
                    base_buf.arg(),
                    h_buf.arg(),
                    b_buf.arg(),
                    out,
                )
            },
        )?;
    }
    Ok(())
}

tests_per_dtype!(emulated_kernel_matches_the_twin, emulated_matches_twin);

/// The twin against a plain triple loop (the definition), so the twin is not only checked against the kernel that
/// mirrors it.
#[test]
fn twin_matches_the_definition() -> candle_core::Result<()> {
    let mut rng = Normal::new(19);
    for (rows, cols, rank, segments) in [(3, 1, 2, 1), (4, 37, 5, 1), (2, 70, 8, 3), (3, 200, 3, 3)]
    {
        let starts = starts(cols, segments).unwrap();
        let base = rng.vec(rows * cols, 1.0);
        let h = rng.vec(rows * segments * rank, 1.0);
        let b = rng.vec(cols * rank, 1.0);
        let mut got = vec![0f32; rows * cols];
        forward_twin(&base, &h, &b, &mut got, cols, &starts, SCALE);
        let mut want = vec![0f32; rows * cols];
        for m in 0..rows {
            for n in 0..cols {
                let s = starts.iter().rposition(|&st| st <= n).unwrap();
                let dot: f32 = (0..rank)
                    .map(|k| h[m * segments * rank + s * rank + k] * b[n * rank + k])
                    .sum();
                want[m * cols + n] = base[m * cols + n] + SCALE * dot;
            }
        }
        assert_close(
            &format!("twin {rows}×{cols} rank {rank}"),
            &got,
            &want,
            Tolerance::for_dtype(DType::F32),
        )?;
    }
    Ok(())
}

#[test]
fn backward_matches_finite_differences_of_the_twin() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(23);
    for (rows, cols, rank, segments) in [(3, 7, 2, 1), (4, 40, 4, 3), (1, 33, 3, 3)] {
        let starts = starts(cols, segments).unwrap();
        let h_cols = segments * rank;
        let base = rng.vec(rows * cols, 1.0);
        let h = rng.vec(rows * h_cols, 1.0);
        let b = rng.vec(cols * rank, 1.0);
        let probe = rng.vec(rows * cols, 1.0);
        let loss = |base: &[f32], h: &[f32], b: &[f32]| -> f64 {
            let mut out = vec![0f32; base.len()];
            forward_twin(base, h, b, &mut out, cols, &starts, SCALE);
            probe_loss(&out, &probe)
        };
        let g = Tensor::from_vec(probe.clone(), (rows, cols), &dev)?;
        let h_t = Tensor::from_vec(h.clone(), (rows, h_cols), &dev)?;
        let b_t = Tensor::from_vec(b.clone(), (cols, rank), &dev)?;
        let (dh, db) = lora_epilogue_backward(&g, &h_t, &b_t, &starts, SCALE as f64)?;
        let (dh, db) = (
            dh.flatten_all()?.to_vec1::<f32>()?,
            db.flatten_all()?.to_vec1::<f32>()?,
        );
        let what = format!("{rows}×{cols} rank {rank} starts {starts:?}");
        check_gradient(
            &format!("dh {what}"),
            &h,
            &dh,
            |h| loss(&base, h, &b),
            1e-2,
            2e-3,
            64,
        )?;
        check_gradient(
            &format!("dB {what}"),
            &b,
            &db,
            |b| loss(&base, &h, b),
            1e-2,
            2e-3,
            64,
        )?;
        // d base = g
        check_gradient(
            &format!("d base {what}"),
            &base,
            &probe,
            |base| loss(base, &h, &b),
            1e-2,
            2e-3,
            64,
        )?;
    }
    Ok(())
}

/// kto-model's chain: `(f32(y) + (h · Bᵀ) · scale).to(dtype)`, per segment.
fn stock_epilogue(
    base: &Tensor,
    h: &Tensor,
    b: &Tensor,
    starts: &[usize],
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (rank, cols) = (b.dim(1)?, b.dim(0)?);
    let mut deltas = Vec::new();
    for (s, &start) in starts.iter().enumerate() {
        let width = starts.get(s + 1).copied().unwrap_or(cols) - start;
        let h_s = h.narrow(1, s * rank, rank)?;
        let b_s = b.narrow(0, start, width)?;
        deltas.push((h_s.matmul(&b_s.t()?)? * scale)?);
    }
    let delta = Tensor::cat(&deltas, 1)?.reshape(base.shape())?;
    (base.to_dtype(DType::F32)? + delta)?.to_dtype(base.dtype())
}

/// The op against the stock formula in value and in the gradients of base, h and B, for a base in `dtype`.
fn op_matches_stock(dtype: DType, segments: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(29 + segments as u64);
    let (batch, tokens, cols, rank) = (2, 5, 70, 4);
    let rows = batch * tokens;
    let starts = starts(cols, segments).unwrap();
    let base = Var::from_tensor(
        &Tensor::from_vec(rng.vec(rows * cols, 1.0), (batch, tokens, cols), &dev)?
            .to_dtype(dtype)?,
    )?;
    let h = Var::from_vec(
        rng.vec(rows * segments * rank, 1.0),
        (rows, segments * rank),
        &dev,
    )?;
    let b = Var::from_vec(rng.vec(cols * rank, 0.5), (cols, rank), &dev)?;
    let probe = Tensor::from_vec(rng.vec(rows * cols, 1.0), (batch, tokens, cols), &dev)?
        .to_dtype(dtype)?;
    let fused = lora_epilogue(
        base.as_tensor(),
        h.as_tensor(),
        b.as_tensor(),
        &starts,
        0.75,
    )?;
    let stock = stock_epilogue(
        base.as_tensor(),
        h.as_tensor(),
        b.as_tensor(),
        &starts,
        0.75,
    )?;
    assert_eq!(fused.dims(), [batch, tokens, cols]);
    assert_eq!(fused.dtype(), dtype);
    let what = format!("lora epilogue op {dtype:?} starts {starts:?}");
    assert_close(
        &format!("{what} forward"),
        &flat(&fused)?,
        &flat(&stock)?,
        Tolerance::for_dtype(dtype),
    )?;
    // The op is one node over its three inputs: no [M, N] f32 intermediates in the graph.
    assert_eq!(fused.sorted_nodes().len(), 4);
    let vars = [base.as_tensor(), h.as_tensor(), b.as_tensor()];
    let g_fused = probe_gradients(&fused, &probe, vars)?;
    let g_stock = probe_gradients(&stock, &probe, vars)?;
    for (name, (var, (got, want))) in ["base", "h", "B"]
        .into_iter()
        .zip(vars.into_iter().zip(g_fused.iter().zip(&g_stock)))
    {
        assert_eq!(got.dims(), var.dims(), "{what}: d{name} shape");
        assert_close(
            &format!("{what} d{name}"),
            &flat(got)?,
            &flat(want)?,
            STOCK_F32,
        )?;
    }
    Ok(())
}

#[test]
fn op_matches_the_stock_formula_f32() -> candle_core::Result<()> {
    op_matches_stock(DType::F32, 1)?;
    op_matches_stock(DType::F32, 3)
}

#[test]
fn op_matches_the_stock_formula_bf16() -> candle_core::Result<()> {
    op_matches_stock(DType::BF16, 1)?;
    op_matches_stock(DType::BF16, 3)
}

#[test]
fn op_in_bf16_stays_close_to_f32() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(31);
    let (rows, cols, rank) = (6, 96, 8);
    let base = Tensor::from_vec(rng.vec(rows * cols, 1.0), (rows, cols), &dev)?;
    let h = Tensor::from_vec(rng.vec(rows * rank, 1.0), (rows, rank), &dev)?;
    let b = Tensor::from_vec(rng.vec(cols * rank, 0.5), (cols, rank), &dev)?;
    let f32_out = lora_epilogue(&base, &h, &b, &[0], 0.5)?;
    let bf16_out = lora_epilogue(&base.to_dtype(DType::BF16)?, &h, &b, &[0], 0.5)?;
    assert_close(
        "lora epilogue bf16 vs f32",
        &flat(&bf16_out)?,
        &flat(&f32_out)?,
        Tolerance {
            rel: 0.02,
            abs: 0.02,
        },
    )
}

#[test]
fn bad_arguments_are_rejected() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let base = Tensor::zeros((4, 10), DType::F32, &dev)?;
    let h = Tensor::zeros((4, 4), DType::F32, &dev)?;
    let b = Tensor::zeros((10, 2), DType::F32, &dev)?;
    assert!(lora_epilogue(&base, &h, &b, &[0, 5], 1.0).is_ok());
    for bad in [&[][..], &[1, 5], &[0, 0], &[0, 10], &[5, 0]] {
        assert!(
            lora_epilogue(&base, &h, &b, bad, 1.0).is_err(),
            "segment starts {bad:?} accepted"
        );
    }
    assert!(
        lora_epilogue(&base, &h, &b, &[0], 1.0).is_err(),
        "h of two segments for one"
    );
    assert!(
        lora_epilogue(&base, &h.to_dtype(DType::BF16)?, &b, &[0, 5], 1.0).is_err(),
        "bf16 h"
    );
    assert!(
        lora_epilogue(&base, &h, &b.narrow(0, 0, 9)?, &[0, 5], 1.0).is_err(),
        "B of 9 rows"
    );
    Ok(())
}
