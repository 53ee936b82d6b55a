//! Completion log-probs: the CUDA kernels (emulated) against the CPU twins, the backward twin against finite
//! differences, and the candle op against the stock-op formula of kto-model's `logprobs.rs`.
//!
//! Tolerances. The stats are f32 results computed from identical inputs whatever the logits' dtype, so they are
//! compared at f32 tolerance (rel 2e-5) in every dtype, with an absolute term of 2e-6 · max(1, |lse|) per row:
//! lse and logp = x_t − lse are sums over the vocabulary whose rounding scales with |lse| (a saturated row with
//! lse ≈ 120 has logp ≈ 0 known to about 1e-5). The backward is compared at `Tolerance::for_dtype` of its dtype.

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use half::bf16;
use kto_kernels::emulation::{run, GuardedBuffer, Order};
use kto_kernels::float::Float;
use kto_kernels::logprobs::{
    backward_launch, backward_twin, forward_launch, forward_twin, logprob_backward, logprob_stats,
    token_logprobs, ENTROPY, LOGP, LSE, MEAN_LOGIT, STATS,
};
use kto_kernels::testing::emulated::{assert_emulated_matches_twin, emulated_output};
use kto_kernels::testing::{
    assert_close, cast, check_gradient, flat, probe_gradients, probe_loss, widen, Normal,
    Tolerance, MODEL_SHAPES,
};
use kto_kernels::tests_per_dtype;

/// Vocabularies of one logit, under a warp, and not multiples of the block sizes (forward 128..512 threads, four
/// logits in flight each; backward 32..256 threads × 4).
const VOCABS: [usize; 5] = [1, 7, 1000, 1025, 4099];

#[derive(Debug, Clone, Copy)]
enum Rows {
    /// N(0, 3²) logits.
    Random,
    /// N(20, 1) logits and one at 120: the softmax saturates (p ≈ 1, entropy ≈ 0, other log-probs ≈ −100).
    Saturated,
    /// Every logit 2.5: entropy = ln V, logp = −ln V, mean 2.5.
    Equal,
    /// N(0, 3²) with every fifth logit -inf (a masked entry: no probability, no NaN).
    Masked,
}

const KINDS: [Rows; 4] = [Rows::Random, Rows::Saturated, Rows::Equal, Rows::Masked];

/// Targets at both ends of the vocabulary: [V−1] for one row, [0, random, V−1] for three.
fn targets(rows: usize, vocab: usize, rng: &mut Normal) -> Vec<u32> {
    let last = vocab as u32 - 1;
    match rows {
        1 => vec![last],
        _ => (0..rows)
            .map(|r| match r {
                0 => 0,
                r if r == rows - 1 => last,
                _ => rng.below(vocab as u32),
            })
            .collect(),
    }
}

fn logits(kind: Rows, targets: &[u32], vocab: usize, rng: &mut Normal) -> Vec<f32> {
    let mut x = Vec::with_capacity(targets.len() * vocab);
    for (r, &t) in targets.iter().enumerate() {
        let mut row = match kind {
            Rows::Random | Rows::Masked => rng.vec(vocab, 3.0),
            Rows::Saturated => rng.vec(vocab, 1.0).iter().map(|v| v + 20.0).collect(),
            Rows::Equal => vec![2.5; vocab],
        };
        match kind {
            // the huge logit is the target in row 0 (logp ≈ 0) and elsewhere in the others (logp ≈ −100)
            Rows::Saturated => row[if r == 0 { t as usize } else { vocab / 2 }] = 120.0,
            Rows::Masked => {
                for (i, v) in row.iter_mut().enumerate() {
                    if i % 5 == 3 && i != t as usize {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
            _ => {}
        }
        x.extend(row);
    }
    x
}

/// Compares [rows, 4] stats row by row at f32 tolerance scaled by the row's |lse| (see the header).
fn assert_stats_close(what: &str, got: &[f32], want: &[f32]) -> candle_core::Result<()> {
    for (r, (g, w)) in got.chunks(STATS).zip(want.chunks(STATS)).enumerate() {
        let scale = if w[LSE].is_finite() {
            w[LSE].abs().max(1.0)
        } else {
            1.0
        };
        let tol = Tolerance {
            rel: 2e-5,
            abs: 2e-6 * scale,
        };
        assert_close(
            &format!("{what} row {r} (logp, entropy, mean, lse)"),
            g,
            w,
            tol,
        )?;
    }
    Ok(())
}

fn emulated_matches_twin<T: Float>() -> candle_core::Result<()> {
    let mut rng = Normal::new(17);
    // and the vocabularies of the real models, over a few tokens
    for vocab in VOCABS.into_iter().chain(MODEL_SHAPES.map(|m| m.vocab)) {
        for rows in [1, 3] {
            for kind in KINDS {
                let t = targets(rows, vocab, &mut rng);
                let x: Vec<T> = cast(&logits(kind, &t, vocab, &mut rng));
                let grad = rng.vec(rows, 1.0);
                let mut stats_twin = vec![0f32; rows * STATS];
                forward_twin(&x, &t, &mut stats_twin)?;
                if let Rows::Equal = kind {
                    // the closed form, so the twin itself is checked too
                    let ln_v = (vocab as f32).ln();
                    let want: Vec<f32> = (0..rows)
                        .flat_map(|_| [-ln_v, ln_v, 2.5, 2.5 + ln_v])
                        .collect();
                    assert_stats_close(&format!("equal logits {vocab}"), &stats_twin, &want)?;
                }
                let lse: Vec<f32> = stats_twin.chunks(STATS).map(|s| s[LSE]).collect();
                let mut dx_twin = vec![T::default(); rows * vocab];
                backward_twin(&x, &t, &lse, &grad, &mut dx_twin)?;
                let xb = GuardedBuffer::from_slice(&x);
                let tb = GuardedBuffer::from_slice(&t);
                let lb = GuardedBuffer::from_slice(&lse);
                let gb = GuardedBuffer::from_slice(&grad);
                let case = format!("{:?} {rows}×{vocab} {kind:?}", T::DTYPE);
                // the stats are f32 whatever the logits' dtype, compared row by row (see the header)
                for order in Order::BOTH {
                    let stats = emulated_output::<f32>(rows * STATS, order, |stats| {
                        forward_launch(T::DTYPE, rows, vocab, xb.arg(), tb.arg(), stats)
                    })?;
                    assert_stats_close(&format!("forward {case} {order:?}"), &stats, &stats_twin)?;
                }
                assert_emulated_matches_twin::<T>(
                    &format!("backward {case}"),
                    &widen(&dx_twin),
                    Tolerance::for_dtype(T::DTYPE),
                    |dx| {
                        backward_launch(
                            T::DTYPE,
                            rows,
                            vocab,
                            xb.arg(),
                            tb.arg(),
                            lb.arg(),
                            gb.arg(),
                            dx,
                        )
                    },
                )?;
            }
        }
    }
    Ok(())
}

tests_per_dtype!(emulated_kernels_match_the_twin, emulated_matches_twin);

#[test]
fn out_of_range_targets_are_errors_on_the_host_and_nan_rows_in_the_kernels(
) -> candle_core::Result<()> {
    let (rows, vocab) = (3, 7);
    let mut rng = Normal::new(23);
    let x = rng.vec(rows * vocab, 2.0);
    let bad = [2u32, 7, 0];
    let mut stats = vec![0f32; rows * STATS];
    let message = forward_twin(&x, &bad, &mut stats).unwrap_err().to_string();
    assert!(message.contains("target 7 of row 1"), "{message}");
    let mut dx = vec![0f32; rows * vocab];
    let message = backward_twin(&x, &bad, &[0.0; 3], &[1.0; 3], &mut dx)
        .unwrap_err()
        .to_string();
    assert!(message.contains("target 7 of row 1"), "{message}");
    let logits = Tensor::from_vec(x.clone(), (rows, vocab), &Device::Cpu)?;
    let targets = Tensor::new(&bad, &Device::Cpu)?;
    let message = logprob_stats(&logits, &targets).unwrap_err().to_string();
    assert!(message.contains("target 7 of row 1"), "{message}");
    let message = token_logprobs(Var::from_tensor(&logits)?.as_tensor(), &targets)
        .unwrap_err()
        .to_string();
    assert!(message.contains("target 7 of row 1"), "{message}");

    // The kernels: row 1 (and a row with u32::MAX) all NaN, the valid row as the twin has it.
    let bad = [2u32, 7, u32::MAX];
    let mut want = vec![0f32; STATS];
    forward_twin(&x[..vocab], &bad[..1], &mut want)?;
    let (xb, tb) = (
        GuardedBuffer::from_slice(&x),
        GuardedBuffer::from_slice(&bad),
    );
    let (lb, gb) = (
        GuardedBuffer::from_slice(&[want[LSE]; 3]),
        GuardedBuffer::from_slice(&[1f32; 3]),
    );
    for order in Order::BOTH {
        let stats = GuardedBuffer::filled(rows * STATS, 0f32);
        run(
            &forward_launch(DType::F32, rows, vocab, xb.arg(), tb.arg(), stats.arg())?,
            order,
        )?;
        assert_stats_close(
            "valid row beside bad ones",
            &stats.as_slice()[..STATS],
            &want,
        )?;
        assert!(
            stats.as_slice()[STATS..].iter().all(|v| v.is_nan()),
            "{:?}",
            stats.as_slice()
        );
        let dx = GuardedBuffer::filled(rows * vocab, 0f32);
        run(
            &backward_launch(
                DType::F32,
                rows,
                vocab,
                xb.arg(),
                tb.arg(),
                lb.arg(),
                gb.arg(),
                dx.arg(),
            )?,
            order,
        )?;
        assert!(dx.as_slice()[..vocab].iter().all(|v| v.is_finite()));
        assert!(
            dx.as_slice()[vocab..].iter().all(|v| v.is_nan()),
            "{:?}",
            dx.as_slice()
        );
        stats.check()?;
        dx.check()?;
    }
    Ok(())
}

#[test]
fn twin_backward_matches_finite_differences() -> candle_core::Result<()> {
    let mut rng = Normal::new(29);
    for vocab in [1, 7, 50] {
        let rows = 2;
        let t = targets(rows, vocab, &mut rng);
        let x = rng.vec(rows * vocab, 2.0);
        let probe = rng.vec(rows, 1.0);
        let mut stats = vec![0f32; rows * STATS];
        forward_twin(&x, &t, &mut stats)?;
        let lse: Vec<f32> = stats.chunks(STATS).map(|s| s[LSE]).collect();
        let mut dx = vec![0f32; rows * vocab];
        backward_twin(&x, &t, &lse, &probe, &mut dx)?;
        let loss = |x: &[f32]| {
            let mut stats = vec![0f32; rows * STATS];
            forward_twin(x, &t, &mut stats).unwrap();
            let logp: Vec<f32> = stats.chunks(STATS).map(|s| s[LOGP]).collect();
            probe_loss(&logp, &probe)
        };
        check_gradient(
            &format!("d logp / d logits, vocab {vocab}"),
            &x,
            &dx,
            loss,
            2e-2,
            1e-4,
            100,
        )?;
    }
    Ok(())
}

/// The formula kto-model's `sequence_logps` computes today with stock ops, on f32 logits [n, V] and targets [n]:
/// (logp, entropy, mean logit).
fn stock_logprobs(
    logits: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?;
    let log_z = (max + sum_exp.log()?)?;
    let log_probs = logits.broadcast_sub(&log_z)?;
    let probs = log_probs.exp()?;
    let logp = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let entropy = ((probs.mul(&logits)?.sum(D::Minus1)? * -1.0)? + log_z.squeeze(1)?)?;
    let mean = logits.mean(D::Minus1)?;
    Ok((logp, entropy, mean))
}

#[test]
fn op_matches_the_stock_formula_in_value_and_gradient() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(31);
    let (rows, vocab) = (5, 1000);
    let t = targets(rows, vocab, &mut rng);
    let logits = Var::from_vec(rng.vec(rows * vocab, 3.0), (rows, vocab), &dev)?;
    let targets = Tensor::new(t.as_slice(), &dev)?;
    let probe = Tensor::from_vec(rng.vec(rows, 1.0), rows, &dev)?;
    let (logp, stats) = token_logprobs(logits.as_tensor(), &targets)?;
    let (stock_logp, stock_entropy, stock_mean) = stock_logprobs(logits.as_tensor(), &targets)?;
    // |lse| ≈ 10 here: rel 2e-5 plus 2e-6 · 10 absolute (see the header).
    let tol = Tolerance {
        rel: 2e-5,
        abs: 2e-5,
    };
    assert_close("logp", &flat(&logp)?, &flat(&stock_logp)?, tol)?;
    assert_close(
        "stats logp",
        &flat(&stats.i((.., LOGP))?)?,
        &flat(&stock_logp)?,
        tol,
    )?;
    assert_close(
        "entropy",
        &flat(&stats.i((.., ENTROPY))?)?,
        &flat(&stock_entropy)?,
        tol,
    )?;
    assert_close(
        "mean logit",
        &flat(&stats.i((.., MEAN_LOGIT))?)?,
        &flat(&stock_mean)?,
        tol,
    )?;

    let [a] = probe_gradients(&logp, &probe, [logits.as_tensor()])?;
    let [b] = probe_gradients(&stock_logp, &probe, [logits.as_tensor()])?;
    assert_close(
        "d logp / d logits",
        &flat(&a)?,
        &flat(&b)?,
        Tolerance {
            rel: 1e-4,
            abs: 1e-6,
        },
    )?;
    // logp is one node over the logits: no [n, V] intermediates in the graph; the stats carry none
    assert_eq!(logp.sorted_nodes().len(), 2);
    assert!(!stats.track_op());
    Ok(())
}

#[test]
fn untracked_logits_give_the_stats_column_without_a_graph() -> candle_core::Result<()> {
    let mut rng = Normal::new(37);
    let logits = Tensor::from_vec(rng.vec(3 * 33, 2.0), (3, 33), &Device::Cpu)?;
    let targets = Tensor::new(&[0u32, 17, 32], &Device::Cpu)?;
    let (logp, stats) = token_logprobs(&logits, &targets)?;
    assert!(!logp.track_op());
    assert_eq!(flat(&logp)?, flat(&stats.i((.., LOGP))?)?);
    Ok(())
}

#[test]
fn backward_api_matches_the_twin() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(41);
    let (rows, vocab) = (3, 129);
    let t = targets(rows, vocab, &mut rng);
    let x: Vec<bf16> = cast(&rng.vec(rows * vocab, 3.0));
    let grad = rng.vec(rows, 1.0);
    let logits = Tensor::from_vec(x.clone(), (rows, vocab), &dev)?;
    let targets = Tensor::new(t.as_slice(), &dev)?;
    let stats = logprob_stats(&logits, &targets)?;
    let lse = stats.i((.., LSE))?;
    let d = logprob_backward(
        &logits,
        &targets,
        &lse,
        &Tensor::new(grad.as_slice(), &dev)?,
    )?;
    assert_eq!(d.dtype(), DType::BF16);
    assert_eq!(d.dims(), [rows, vocab]);
    let mut want = vec![bf16::default(); rows * vocab];
    backward_twin(&x, &t, &flat(&lse)?, &grad, &mut want)?;
    assert_close(
        "backward op",
        &flat(&d)?,
        &widen(&want),
        Tolerance::for_dtype(DType::BF16),
    )
}

#[test]
fn op_in_bf16_stays_close_to_f32() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(43);
    let (rows, vocab) = (4, 777);
    let t = targets(rows, vocab, &mut rng);
    let targets = Tensor::new(t.as_slice(), &dev)?;
    let x = Tensor::from_vec(rng.vec(rows * vocab, 3.0), (rows, vocab), &dev)?;
    let probe = Tensor::from_vec(rng.vec(rows, 1.0), rows, &dev)?;
    let x_bf16 = Var::from_tensor(&x.to_dtype(DType::BF16)?)?;
    let (logp_bf16, stats_bf16) = token_logprobs(x_bf16.as_tensor(), &targets)?;
    let grad_bf16 = (&logp_bf16 * &probe)?.sum_all()?.backward()?;
    let grad_bf16 = grad_bf16.get(x_bf16.as_tensor()).unwrap();
    assert_eq!(grad_bf16.dtype(), DType::BF16);

    // The same (rounded) logits in f32: identical f32 arithmetic, so f32 tolerance for the stats.
    let widened = Var::from_tensor(&x_bf16.to_dtype(DType::F32)?)?;
    let (logp_wide, stats_wide) = token_logprobs(widened.as_tensor(), &targets)?;
    assert_stats_close(
        "bf16 vs widened f32",
        &flat(&stats_bf16)?,
        &flat(&stats_wide)?,
    )?;
    let grad_wide = (&logp_wide * &probe)?.sum_all()?.backward()?;
    let grad_wide = grad_wide.get(widened.as_tensor()).unwrap();
    assert_close(
        "bf16 gradient",
        &flat(grad_bf16)?,
        &flat(grad_wide)?,
        Tolerance::for_dtype(DType::BF16),
    )?;

    // The unrounded f32 logits: bf16 moves each logit by up to 2⁻⁹ of its size (~0.02 at |x| ≈ 10).
    let (_, stats_f32) = token_logprobs(&x, &targets)?;
    assert_close(
        "bf16 vs f32 stats",
        &flat(&stats_bf16)?,
        &flat(&stats_f32)?,
        Tolerance {
            rel: 0.01,
            abs: 0.05,
        },
    )?;
    Ok(())
}
