//! RoPE: the CUDA kernels (emulated) against the CPU twins on awkward shapes, strided views and unusual positions;
//! the twin's backward against finite differences; the candle op against the stock-op formula it replaces.

use candle_core::{DType, Device, Tensor, Var, D};
use kto_kernels::emulation::GuardedBuffer;
use kto_kernels::float::Float;
use kto_kernels::kernel::Arg;
use kto_kernels::rope::{
    backward_launch, backward_twin, forward_launch, forward_twin, rope, RopeDims, Strides,
};
use kto_kernels::testing::emulated::assert_emulated_matches_twin;
use kto_kernels::testing::{
    assert_close, check_gradient, flat, probe_gradients, probe_loss, widen, Normal, Tolerance,
    MODEL_SHAPES,
};
use kto_kernels::tests_per_dtype;

/// Kernel, twin and stock formula do the same f32 operations in the same order (no sums to reorder, products kept
/// out of FMAs) and take cos/sin from the same libm, so on the CPU they agree bit for bit in every dtype; anything
/// looser would let a missing bf16/f16 rounding step (one ulp) pass.
const EXACT: Tolerance = Tolerance { rel: 0.0, abs: 0.0 };

/// Llama's default frequencies, `base^(−2i/d)` in f32.
fn inv_freq(head_dim: usize, base: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

/// Positions [rows, tokens] in one of three patterns: 0..tokens, offset by 1000 (a KV cache), or restarting every
/// few tokens (packed sequences).
fn positions(rows: usize, tokens: usize, pattern: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(rows * tokens);
    for row in 0..rows {
        for t in 0..tokens {
            out.push(match pattern % 3 {
                0 => t as u32,
                1 => (1000 + 17 * row + t) as u32,
                _ => (t % (3 + row)) as u32,
            });
        }
    }
    out
}

/// A buffer holding a view of `dims` at `offset` with `strides`, every element outside the view NaN (so a read of
/// the wrong element shows); returns the buffer and the view's values in [rows, tokens, heads, d] order.
fn strided_buffer<T: Float>(
    dims: RopeDims,
    strides: Strides,
    offset: usize,
    len: usize,
    rng: &mut Normal,
) -> Vec<T> {
    let mut buf = vec![T::from_f32(f32::NAN); len];
    for r in 0..dims.rows {
        for t in 0..dims.tokens {
            for h in 0..dims.heads {
                let at = offset + r * strides.row + t * strides.token + h * strides.head;
                for (k, v) in rng.vec(dims.head_dim, 1.5).into_iter().enumerate() {
                    buf[at + k] = T::from_f32(v);
                }
            }
        }
    }
    buf
}

/// The address `elements` past the start of a buffer's argument.
fn offset_arg<T>(arg: Arg, elements: usize) -> Arg {
    match arg {
        Arg::Ptr(a) => Arg::Ptr(a + (elements * std::mem::size_of::<T>()) as u64),
        other => other,
    }
}

/// The spec's awkward shapes: head_dim 2, 6, 64, 80 (not a multiple of 32) and 128; 1 or 3 heads; 1, 5 or 37 tokens;
/// 1 or 2 rows.
fn awkward_shapes() -> impl Iterator<Item = RopeDims> {
    [2, 6, 64, 80, 128].into_iter().flat_map(|head_dim| {
        [1, 3].into_iter().flat_map(move |heads| {
            [1, 5, 37].into_iter().flat_map(move |tokens| {
                [1, 2].into_iter().map(move |rows| RopeDims {
                    rows,
                    tokens,
                    heads,
                    head_dim,
                })
            })
        })
    })
}

/// Both kernels against both twins for one shape; `case` picks the frequencies, positions and layouts.
fn emulated_case<T: Float>(
    case: usize,
    dims: RopeDims,
    rng: &mut Normal,
) -> candle_core::Result<()> {
    let RopeDims {
        rows,
        tokens,
        heads,
        head_dim,
    } = dims;
    let freqs = inv_freq(
        head_dim,
        if case.is_multiple_of(2) {
            10_000.0
        } else {
            500_000.0
        },
    );
    let pos = positions(rows, tokens, case / 3);
    // x: a narrow of a fused [rows, tokens, fused_heads, d] projection at its start, at its end (flush against the
    // guard page), or the whole of it
    let (before, after) = [(0, 2), (2, 0), (0, 0)][case % 3];
    let fused = before + heads + after;
    let x_strides = Strides {
        row: tokens * fused * head_dim,
        token: fused * head_dim,
        head: head_dim,
    };
    let x_offset = before * head_dim;
    let x: Vec<T> = strided_buffer(
        dims,
        x_strides,
        x_offset,
        rows * tokens * fused * head_dim,
        rng,
    );
    // grad [rows, heads, tokens, d]: contiguous, or each head's tokens padded by one NaN token
    let padded_tokens = if (case / 2) % 2 == 1 {
        tokens + 1
    } else {
        tokens
    };
    let g_strides = Strides {
        row: heads * padded_tokens * head_dim,
        token: head_dim,
        head: padded_tokens * head_dim,
    };
    let g: Vec<T> = strided_buffer(
        dims,
        g_strides,
        0,
        rows * heads * padded_tokens * head_dim,
        rng,
    );

    let mut y_twin = vec![T::default(); dims.len()];
    forward_twin(dims, &x[x_offset..], x_strides, &pos, &freqs, &mut y_twin);
    let mut dx_twin = vec![T::default(); dims.len()];
    backward_twin(dims, &g, g_strides, &pos, &freqs, &mut dx_twin);

    let (xb, gb) = (GuardedBuffer::from_slice(&x), GuardedBuffer::from_slice(&g));
    let (pb, fb) = (
        GuardedBuffer::from_slice(&pos),
        GuardedBuffer::from_slice(&freqs),
    );
    let x_arg = offset_arg::<T>(xb.arg(), x_offset);
    let what = format!("{:?} {rows}×{tokens}×{heads}×{head_dim}", T::DTYPE);
    assert_emulated_matches_twin::<T>(
        &format!("rope forward {what}"),
        &widen(&y_twin),
        EXACT,
        |y| forward_launch(T::DTYPE, dims, x_arg, x_strides, pb.arg(), fb.arg(), y),
    )?;
    assert_emulated_matches_twin::<T>(
        &format!("rope backward {what}"),
        &widen(&dx_twin),
        EXACT,
        |dx| backward_launch(T::DTYPE, dims, gb.arg(), g_strides, pb.arg(), fb.arg(), dx),
    )
}

fn emulated_matches_twin<T: Float>() -> candle_core::Result<()> {
    let mut rng = Normal::new(17);
    for (case, dims) in awkward_shapes().enumerate() {
        emulated_case::<T>(case, dims, &mut rng)?;
    }
    // The real models' query heads, narrowed from their fused q|k|v projection, over 96 tokens.
    for (case, m) in MODEL_SHAPES.iter().enumerate() {
        let dims = RopeDims {
            rows: 2,
            tokens: 96,
            heads: m.heads,
            head_dim: m.head_dim,
        };
        emulated_case::<T>(case, dims, &mut rng)?;
    }
    Ok(())
}

tests_per_dtype!(emulated_kernels_match_the_twin, emulated_matches_twin);

#[test]
fn twin_backward_matches_finite_differences() -> candle_core::Result<()> {
    let mut rng = Normal::new(23);
    for (case, (rows, tokens, heads, head_dim)) in [(2, 5, 3, 6), (1, 4, 2, 80), (2, 3, 1, 2)]
        .into_iter()
        .enumerate()
    {
        let dims = RopeDims {
            rows,
            tokens,
            heads,
            head_dim,
        };
        let freqs = inv_freq(head_dim, 10_000.0);
        let pos = positions(rows, tokens, case + 1);
        let x = rng.vec(dims.len(), 1.0);
        let probe = rng.vec(dims.len(), 1.0); // [rows, heads, tokens, d], like the forward's output
        let mut dx = vec![0f32; dims.len()];
        backward_twin(dims, &probe, dims.heads_major(), &pos, &freqs, &mut dx);
        let loss = |x: &[f32]| {
            let mut y = vec![0f32; x.len()];
            forward_twin(dims, x, dims.tokens_major(), &pos, &freqs, &mut y);
            probe_loss(&y, &probe)
        };
        check_gradient(&format!("rope {dims:?}"), &x, &dx, loss, 1e-2, 2e-3, 64)?;
    }
    Ok(())
}

/// The stock formula from candle ops (what kto-model's `apply_rope` computes today, with per-row positions):
/// x [rows, tokens, heads, d] → [rows, heads, tokens, d], then `x·cos + rotate_half(x)·sin`.
fn stock_rope(x: &Tensor, positions: &Tensor, inv_freq: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.transpose(1, 2)?;
    let half = x.dim(D::Minus1)? / 2;
    let freqs = positions
        .to_dtype(DType::F32)?
        .unsqueeze(2)?
        .broadcast_mul(&inv_freq.unsqueeze(0)?.unsqueeze(0)?)?;
    let emb = Tensor::cat(&[&freqs, &freqs], 2)?; // [rows, tokens, d]
    let cos = emb.cos()?.to_dtype(x.dtype())?.unsqueeze(1)?;
    let sin = emb.sin()?.to_dtype(x.dtype())?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Value and gradient of the op on k, a narrow of a fused q|k|v projection Var, against the stock formula.
fn op_matches_stock(dtype: DType) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(31);
    let (rows, tokens, q_heads, kv_heads, head_dim) = (2, 7, 3, 2, 10);
    let fused = q_heads + 2 * kv_heads;
    let qkv = Var::from_tensor(
        &Tensor::from_vec(
            rng.vec(rows * tokens * fused * head_dim, 1.0),
            (rows, tokens, fused * head_dim),
            &dev,
        )?
        .to_dtype(dtype)?,
    )?;
    let k = qkv
        .reshape((rows, tokens, fused, head_dim))?
        .narrow(2, q_heads, kv_heads)?;
    assert!(!k.is_contiguous());
    // row 0 at a KV-cache offset, row 1 packed: two sequences restarting at 0
    let pos: Vec<u32> = (1000..1000 + tokens as u32)
        .chain([0, 1, 2, 3, 0, 1, 2])
        .collect();
    let pos = Tensor::from_vec(pos, (rows, tokens), &dev)?;
    let freqs = Tensor::from_vec(inv_freq(head_dim, 10_000.0), head_dim / 2, &dev)?;
    let probe = Tensor::from_vec(
        rng.vec(rows * kv_heads * tokens * head_dim, 1.0),
        (rows, kv_heads, tokens, head_dim),
        &dev,
    )?
    .to_dtype(dtype)?;

    let ours = rope(&k, &pos, &freqs)?;
    let stock = stock_rope(&k, &pos, &freqs)?;
    assert_eq!(ours.dims(), stock.dims());
    assert!(ours.is_contiguous());
    let tol = EXACT;
    assert_close(
        &format!("rope op forward {dtype:?}"),
        &flat(&ours)?,
        &flat(&stock)?,
        tol,
    )?;
    let [a] = probe_gradients(&ours, &probe, [qkv.as_tensor()])?;
    let [b] = probe_gradients(&stock, &probe, [qkv.as_tensor()])?;
    assert_close(
        &format!("rope op gradient {dtype:?}"),
        &flat(&a)?,
        &flat(&b)?,
        tol,
    )?;
    // q and v take no gradient
    let zero = flat(
        &a.reshape((rows, tokens, fused, head_dim))?
            .narrow(2, 0, q_heads)?,
    )?;
    assert!(zero.iter().all(|&v| v == 0.0));
    Ok(())
}

#[test]
fn op_matches_the_stock_formula_in_value_and_gradient_f32() -> candle_core::Result<()> {
    op_matches_stock(DType::F32)
}

#[test]
fn op_matches_the_stock_formula_in_value_and_gradient_bf16() -> candle_core::Result<()> {
    op_matches_stock(DType::BF16)
}

#[test]
fn op_is_one_node_over_x() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(37);
    let x = Var::from_vec(rng.vec(2 * 3 * 4 * 8, 1.0), (2, 3, 4, 8), &dev)?;
    let pos = Tensor::from_vec((0..6u32).collect::<Vec<_>>(), (2, 3), &dev)?;
    let freqs = Tensor::from_vec(inv_freq(8, 10_000.0), 4, &dev)?;
    let y = rope(x.as_tensor(), &pos, &freqs)?;
    // x and the op: no cos/sin tables, transposes or halves in the graph
    assert_eq!(y.sorted_nodes().len(), 2);
    Ok(())
}

#[test]
fn op_rejects_bad_arguments() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 2, 1, 6), DType::F32, &dev)?;
    let pos = Tensor::zeros((1, 2), DType::U32, &dev)?;
    let freqs = Tensor::zeros(3, DType::F32, &dev)?;
    assert!(rope(&x, &pos, &freqs).is_ok());
    assert!(rope(
        &Tensor::zeros((1, 2, 1, 5), DType::F32, &dev)?,
        &pos,
        &freqs
    )
    .is_err()); // odd head_dim
    assert!(rope(&x, &Tensor::zeros((1, 2), DType::F32, &dev)?, &freqs).is_err()); // f32 positions
    assert!(rope(&x, &Tensor::zeros((2, 1), DType::U32, &dev)?, &freqs).is_err()); // wrong shape
    assert!(rope(&x, &pos, &Tensor::zeros(6, DType::F32, &dev)?).is_err()); // inv_freq for the full head_dim
    Ok(())
}
