//! Fused AdamW and the global gradient norm: the kernels (emulated) against the CPU twins, the candle API against
//! the stock candle-op optimizer (`testing::stock_adamw`, kto-trainer's former one) bit for bit, and a first step
//! on a quadratic loss.

use candle_core::{DType, Device, Tensor, Var};
use kto_kernels::adamw::{
    adamw_element, adamw_launch, adamw_step, adamw_table, adamw_twin, clip_coefficient,
    global_grad_norm, grad_norm_twin, grad_sumsq_launch, grad_sumsq_table, norm_from_partials,
    AdamWHyper, AdamWScalars, AdamWTensor, CHUNK,
};
use kto_kernels::emulation::{run, GuardedBuffer, Order};
use kto_kernels::testing::stock_adamw::{stock_clip_grad_norm, StockAdamW};
use kto_kernels::testing::{Normal, Tolerance, LARGE_RANK, MODEL_SHAPES};
use std::collections::HashMap;

type Error = Box<dyn std::error::Error>;
type R = Result<(), Error>;

/// The sizes the spec names: one element, below a warp, past one, a block's worth, more than two chunks.
const SIZES: [usize; 5] = [1, 7, 33, 1000, 4097];
/// Seven tensors of mixed sizes in one launch.
const MIXED: [usize; 7] = [4097, 1, 33, 2048, 7, 1000, 64];

fn hyper(weight_decay: f64, grad_scale: f32, step: u64) -> AdamWHyper {
    AdamWHyper {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
        step,
        grad_scale,
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} is {:e}, the twin {:e} ({} elements)",
            got[i],
            want[i],
            got.len()
        );
    }
}

/// One tensor's state, on the host for the twin and in guarded buffers for the kernel.
struct State {
    param: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// Runs `steps` AdamW steps over tensors of `sizes` with the twin and with the emulated kernel (one launch per
/// step for all tensors), and checks every parameter and moment bit for bit after each step.
fn kernel_matches_twin(
    sizes: &[usize],
    weight_decay: f64,
    grad_scale: f32,
    beta1: f64,
    steps: u64,
) -> R {
    let mut rng = Normal::new(sizes.iter().sum::<usize>() as u64 ^ steps);
    let initial: Vec<State> = sizes
        .iter()
        .map(|&n| State {
            param: rng.vec(n, 1.0),
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
        })
        .collect();
    for order in Order::BOTH {
        let mut twin: Vec<State> = initial
            .iter()
            .map(|s| State {
                param: s.param.clone(),
                exp_avg: s.exp_avg.clone(),
                exp_avg_sq: s.exp_avg_sq.clone(),
            })
            .collect();
        let mut buffers: Vec<[GuardedBuffer<f32>; 3]> = initial
            .iter()
            .map(|s| {
                [
                    GuardedBuffer::from_slice(&s.param),
                    GuardedBuffer::from_slice(&s.exp_avg),
                    GuardedBuffer::from_slice(&s.exp_avg_sq),
                ]
            })
            .collect();
        let mut grad_rng = Normal::new(99);
        for step in 1..=steps {
            let mut h = hyper(weight_decay, grad_scale, step);
            h.beta1 = beta1;
            let scalars = AdamWScalars::new(&h)?;
            // Gradients of several magnitudes, exact zeros and negative zeros among them.
            let grads: Vec<GuardedBuffer<f32>> = sizes
                .iter()
                .map(|&n| {
                    let mut g = grad_rng.vec(n, 10f32.powi(step as i32 % 3 - 2));
                    for (i, v) in g.iter_mut().enumerate() {
                        match i % 11 {
                            3 => *v = 0.0,
                            5 => *v = -0.0,
                            _ => {}
                        }
                    }
                    GuardedBuffer::from_slice(&g)
                })
                .collect();
            for (s, g) in twin.iter_mut().zip(&grads) {
                adamw_twin(
                    &scalars,
                    &mut s.param,
                    g.as_slice(),
                    &mut s.exp_avg,
                    &mut s.exp_avg_sq,
                );
            }
            let tensors: Vec<AdamWTensor> = buffers
                .iter()
                .zip(&grads)
                .map(|([p, m, v], g)| AdamWTensor {
                    numel: p.len(),
                    param: address(p),
                    grad: address(g),
                    exp_avg: address(m),
                    exp_avg_sq: address(v),
                })
                .collect();
            let table = adamw_table(&tensors)?;
            let words = GuardedBuffer::from_slice(&table.words);
            run(&adamw_launch(words.arg(), &table, &scalars)?, order)?;
            words.check()?;
            for (i, ([p, m, v], s)) in buffers.iter_mut().zip(&twin).enumerate() {
                let what = |name: &str| {
                    format!(
                        "{name} of tensor {i} ({} elements) step {step} wd {weight_decay} scale {grad_scale} \
                         β1 {beta1} {order:?}",
                        s.param.len()
                    )
                };
                assert_bits(&what("param"), p.as_slice(), &s.param);
                assert_bits(&what("exp_avg"), m.as_slice(), &s.exp_avg);
                assert_bits(&what("exp_avg_sq"), v.as_slice(), &s.exp_avg_sq);
                for b in [&*p, &*m, &*v] {
                    b.check()?;
                }
            }
            for g in &grads {
                g.check()?;
            }
        }
    }
    Ok(())
}

fn address(b: &GuardedBuffer<f32>) -> u64 {
    match b.arg() {
        kto_kernels::kernel::Arg::Ptr(a) => a,
        other => panic!("not an address: {other:?}"),
    }
}

#[test]
fn emulated_adamw_matches_the_twin_bit_for_bit() -> R {
    for weight_decay in [0.0, 0.01] {
        for grad_scale in [1.0, 0.37] {
            for size in SIZES {
                kernel_matches_twin(&[size], weight_decay, grad_scale, 0.9, 5)?;
            }
            kernel_matches_twin(&MIXED, weight_decay, grad_scale, 0.9, 5)?;
        }
    }
    Ok(())
}

/// The LoRA factors of one TinyLlama-1.1B layer at rank 128 (A of q_proj, B of up_proj, A of down_proj).
fn real_lora_sizes() -> Vec<usize> {
    let m = MODEL_SHAPES[0];
    vec![
        LARGE_RANK * m.hidden,
        m.intermediate * LARGE_RANK,
        LARGE_RANK * m.intermediate,
    ]
}

#[test]
fn emulated_adamw_matches_the_twin_at_a_real_lora_size() -> R {
    kernel_matches_twin(&real_lora_sizes(), 0.01, 0.37, 0.9, 2)
}

#[test]
fn emulated_adamw_takes_torch_lerp_from_the_end_for_small_beta1() -> R {
    // β1 = 0.3: the lerp weight 0.7 ≥ 0.5, torch's other formula.
    kernel_matches_twin(&MIXED, 0.01, 0.37, 0.3, 2)
}

#[test]
fn empty_tensors_get_no_row_and_no_block() -> R {
    let sizes = [0, 5, 0, 2 * CHUNK + 1, 0];
    let tensors: Vec<AdamWTensor> = sizes
        .iter()
        .map(|&numel| AdamWTensor {
            numel,
            param: 0,
            grad: 0,
            exp_avg: 0,
            exp_avg_sq: 0,
        })
        .collect();
    let table = adamw_table(&tensors)?;
    assert_eq!(
        table
            .rows
            .iter()
            .map(|r| (r.tensor, r.first_block, r.blocks))
            .collect::<Vec<_>>(),
        [(1, 0, 1), (3, 1, 3)]
    );
    assert_eq!(table.blocks, 4);
    assert_eq!(table.words.len(), 2 * 6);
    // Every tensor empty: nothing to launch.
    let empty = adamw_table(&tensors[..1])?;
    assert!(adamw_launch(
        kto_kernels::kernel::Arg::Ptr(0),
        &empty,
        &AdamWScalars::new(&hyper(0.0, 1.0, 1))?
    )
    .is_err());
    // Through the API, with an empty tensor among others.
    let dev = Device::Cpu;
    let params = [
        Var::zeros(0, DType::F32, &dev)?,
        Var::new(&[1f32, -2.0], &dev)?,
    ];
    let grads = [
        Tensor::zeros(0, DType::F32, &dev)?,
        Tensor::new(&[0.5f32, 0.5], &dev)?,
    ];
    let m: Vec<Tensor> = grads
        .iter()
        .map(|g| g.zeros_like())
        .collect::<candle_core::Result<_>>()?;
    let v: Vec<Tensor> = grads
        .iter()
        .map(|g| g.zeros_like())
        .collect::<candle_core::Result<_>>()?;
    adamw_step(
        &refs(&params),
        &grads.iter().collect::<Vec<_>>(),
        &m.iter().collect::<Vec<_>>(),
        &v.iter().collect::<Vec<_>>(),
        &hyper(0.0, 1.0, 1),
    )?;
    assert_eq!(
        global_grad_norm(&grads.iter().collect::<Vec<_>>())?,
        (0.5f32 * 0.5 * 2.0).sqrt()
    );
    Ok(())
}

fn refs(vars: &[Var]) -> Vec<&Var> {
    vars.iter().collect()
}

/// The global norm in f64 over every element, for reference.
fn f64_norm(grads: &[Vec<f32>]) -> f64 {
    grads
        .iter()
        .flatten()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt()
}

#[test]
fn emulated_grad_norm_matches_the_twin_and_f64() -> R {
    let mut rng = Normal::new(17);
    let mut cases: Vec<Vec<usize>> = SIZES.iter().map(|&n| vec![n]).collect();
    cases.push(MIXED.to_vec());
    cases.push(vec![0, 33, 0]);
    cases.push(real_lora_sizes());
    let mut worst = 0f64;
    for sizes in cases {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, 0.1)).collect();
        let slices: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let twin = grad_norm_twin(&slices);
        let reference = f64_norm(&grads);
        let buffers: Vec<GuardedBuffer<f32>> =
            grads.iter().map(|g| GuardedBuffer::from_slice(g)).collect();
        let entries: Vec<(usize, u64)> = buffers.iter().map(|b| (b.len(), address(b))).collect();
        let table = grad_sumsq_table(&entries)?;
        let words = GuardedBuffer::from_slice(&table.words);
        let mut results = Vec::new();
        for order in Order::BOTH {
            let partials = GuardedBuffer::filled(table.blocks as usize, f32::NAN);
            run(
                &grad_sumsq_launch(words.arg(), &table, partials.arg())?,
                order,
            )?;
            partials.check()?;
            assert!(
                partials.as_slice().iter().all(|p| p.is_finite()),
                "every block writes its partial"
            );
            results.push(norm_from_partials(&table, sizes.len(), partials.as_slice()));
        }
        assert_eq!(
            results[0].to_bits(),
            results[1].to_bits(),
            "{sizes:?}: the same in both orders"
        );
        let kernel = results[0];
        // Each block sums up to 2048 squares in f32 (eight per thread, then a tree): a few ulp from the f64 sums.
        let tol = Tolerance {
            rel: 1e-6,
            abs: 0.0,
        };
        for (what, want) in [("twin", twin as f64), ("f64", reference)] {
            let diff = (kernel as f64 - want).abs();
            worst = worst.max(diff / want);
            assert!(
                diff <= tol.rel as f64 * want,
                "{sizes:?}: kernel norm {kernel} vs {what} {want} (diff {diff:e})"
            );
        }
        assert!(
            ((twin as f64) - reference).abs() <= 1e-6 * reference,
            "{sizes:?}: twin {twin} vs f64 {reference}"
        );
    }
    eprintln!("grad norm: kernel vs twin/f64, worst relative difference {worst:e}");
    Ok(())
}

/// Named parameters, and each step's gradients.
type ApiCase = (Vec<(String, Var)>, Vec<Vec<Tensor>>);

/// Parameters of mixed shapes with gradients, for the API tests; one gradient is a transposed (strided) view.
fn api_case(rng: &mut Normal, dev: &Device) -> Result<ApiCase, Error> {
    let shapes: [&[usize]; 5] = [&[16, 40], &[40, 16], &[1], &[7, 3], &[4097]];
    let params: Vec<(String, Var)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product();
            Ok((
                format!("layer.{i}.lora"),
                Var::from_vec(rng.vec(n, 0.5), *s, dev)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let mut steps = Vec::new();
    for step in 0..5 {
        let grads = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: usize = s.iter().product();
                let g = rng.vec(n, if step == 2 { 3.0 } else { 0.05 });
                Ok(if i == 3 {
                    Tensor::from_vec(g, (s[1], s[0]), dev)?.t()?
                } else {
                    Tensor::from_vec(g, *s, dev)?
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        steps.push(grads);
    }
    Ok((params, steps))
}

fn flat(t: &Tensor) -> Result<Vec<f32>, Error> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// `adamw_step` (after `global_grad_norm` and the clip coefficient) against `stock_clip_grad_norm` +
/// `StockAdamW::step`, five steps, parameters and both moments bit for bit.
fn api_matches_stock(weight_decay: f64, beta1: f64, max_norm: f64) -> R {
    let dev = Device::Cpu;
    let mut rng = Normal::new(23);
    let (params, steps) = api_case(&mut rng, &dev)?;
    let fused: Vec<Var> = params
        .iter()
        .map(|(_, v)| Var::from_tensor(&v.as_tensor().copy()?))
        .collect::<candle_core::Result<_>>()?;
    let mut reference = StockAdamW::new(beta1, 0.999, 1e-8, weight_decay);
    let zeros = |v: &Var| v.as_tensor().zeros_like();
    let exp_avg: Vec<Tensor> = fused
        .iter()
        .map(zeros)
        .collect::<candle_core::Result<_>>()?;
    let exp_avg_sq: Vec<Tensor> = fused
        .iter()
        .map(zeros)
        .collect::<candle_core::Result<_>>()?;
    let mut clipped_steps = 0;
    for (k, grads) in steps.iter().enumerate() {
        let lr = 1e-3 * (k + 1) as f64;
        // The stock clipping sorts the names for the norm; these are sorted already.
        let mut by_name: HashMap<String, Tensor> = params
            .iter()
            .zip(grads)
            .map(|((n, _), g)| (n.clone(), g.clone()))
            .collect();
        let stock_norm = stock_clip_grad_norm(&mut by_name, max_norm)?;
        reference.step(&params, &by_name, lr)?;

        let grad_refs: Vec<&Tensor> = grads.iter().collect();
        let norm = global_grad_norm(&grad_refs)?;
        assert_eq!(
            norm.to_bits(),
            stock_norm.to_bits(),
            "step {k}: global norm {norm} vs stock {stock_norm}"
        );
        let coefficient = clip_coefficient(norm, max_norm);
        clipped_steps += (coefficient < 1.0) as usize;
        let h = AdamWHyper {
            lr,
            beta1,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: k as u64 + 1,
            grad_scale: coefficient,
        };
        let m: Vec<&Tensor> = exp_avg.iter().collect();
        let v: Vec<&Tensor> = exp_avg_sq.iter().collect();
        adamw_step(&refs(&fused), &grad_refs, &m, &v, &h)?;

        for ((name, want), got) in params.iter().zip(&fused) {
            assert_bits(
                &format!("{name} step {k}"),
                &flat(got.as_tensor())?,
                &flat(want.as_tensor())?,
            );
        }
        for (i, (name, _)) in params.iter().enumerate() {
            let (m, v) = reference.moments(name).expect("moments after a step");
            assert_bits(
                &format!("{name}.exp_avg step {k}"),
                &flat(&exp_avg[i])?,
                &flat(m)?,
            );
            assert_bits(
                &format!("{name}.exp_avg_sq step {k}"),
                &flat(&exp_avg_sq[i])?,
                &flat(v)?,
            );
        }
    }
    if max_norm.is_finite() {
        assert!(clipped_steps > 0, "the case clips at least one step");
    }
    Ok(())
}

#[test]
fn adamw_step_equals_the_stock_optimizer_bit_for_bit() -> R {
    for weight_decay in [0.0, 0.01] {
        api_matches_stock(weight_decay, 0.9, 1.0)?;
        api_matches_stock(weight_decay, 0.9, f64::INFINITY)?;
    }
    api_matches_stock(0.01, 0.3, 1.0)
}

#[test]
fn first_step_on_a_quadratic_moves_each_weight_by_lr_against_the_gradient() -> R {
    let dev = Device::Cpu;
    let mut rng = Normal::new(31);
    let n = 300;
    let target = Tensor::from_vec(rng.vec(n, 1.0), n, &dev)?;
    let curvature = Tensor::from_vec(
        rng.vec(n, 1.0)
            .iter()
            .map(|c| c.abs() + 0.1)
            .collect::<Vec<_>>(),
        n,
        &dev,
    )?;
    let p = Var::from_vec(rng.vec(n, 1.0), n, &dev)?;
    let loss = |p: &Tensor| -> candle_core::Result<Tensor> {
        ((p - &target)?.sqr()? * &curvature)?.sum_all()? * 0.5
    };
    let before = p.as_tensor().copy()?;
    let loss_before = loss(&before)?.to_scalar::<f32>()?;
    let grads = loss(p.as_tensor())?.backward()?;
    let g = grads.get(p.as_tensor()).expect("a gradient").clone();
    let (m, v) = (g.zeros_like()?, g.zeros_like()?);
    let lr = 1e-2;
    adamw_step(
        &[&p],
        &[&g],
        &[&m],
        &[&v],
        &AdamWHyper {
            lr,
            ..hyper(0.0, 1.0, 1)
        },
    )?;
    let (b, a, gs) = (flat(&before)?, flat(p.as_tensor())?, flat(&g)?);
    for i in 0..n {
        // Adam's first step: m̂ = g, v̂ = g², so Δp = −lr · g / (|g| + eps) = −lr · sign(g) for |g| ≫ eps.
        let want = -(lr as f32) * gs[i].signum();
        let moved = a[i] - b[i];
        assert!(
            (moved - want).abs() <= 1e-6,
            "weight {i}: moved {moved}, expected {want} (g = {})",
            gs[i]
        );
    }
    assert!(
        loss(p.as_tensor())?.to_scalar::<f32>()? < loss_before,
        "the step lowers the loss"
    );
    Ok(())
}

#[test]
fn element_rounds_like_the_candle_ops() {
    // A hand-checkable element: every operation rounded to f32 in order (β1 = 0.9, β2 = 0.999, step 1).
    let s = AdamWScalars::new(&hyper(0.01, 0.37, 1)).unwrap();
    let (mut p, mut m, mut v) = (0.75f32, 0.0f32, 0.0f32);
    adamw_element(&s, &mut p, -2.5, &mut m, &mut v);
    let g = -2.5f32 * 0.37f32;
    let decayed = 0.75f32 * (1.0 - 3e-3 * 0.01f64) as f32;
    let m_want = 0.0f32 + (g - 0.0) * (1.0 - 0.9f64) as f32;
    let v_want = 0.0f32 * 0.999f32 + g * (1.0 - 0.999f64) as f32 * g;
    let denom = v_want.sqrt() / ((1.0 - 0.999f64).sqrt() as f32) + 1e-8f32;
    let p_want = decayed + m_want * (-3e-3 / (1.0 - 0.9f64)) as f32 / denom;
    assert_eq!(bits(&[p, m, v]), bits(&[p_want, m_want, v_want]));
}

#[test]
fn aliased_or_mismatched_tensors_are_refused() -> R {
    let dev = Device::Cpu;
    let p = Var::new(&[1f32, 2.0], &dev)?;
    let g = Tensor::new(&[0.1f32, 0.2], &dev)?;
    let m = g.zeros_like()?;
    let h = hyper(0.0, 1.0, 1);
    // The same tensor as both moments would deadlock the storage locks: refused instead.
    assert!(adamw_step(&[&p], &[&g], &[&m], &[&m], &h).is_err());
    assert!(adamw_step(&[&p], &[&g], &[&m], &[&g], &h).is_err());
    let short = Tensor::new(&[0f32], &dev)?;
    assert!(adamw_step(&[&p], &[&g], &[&short], &[&m.zeros_like()?], &h).is_err());
    let wide = m.to_dtype(DType::F64)?;
    assert!(adamw_step(&[&p], &[&g], &[&wide], &[&m.zeros_like()?], &h).is_err());
    assert!(adamw_step(
        &[&p],
        &[&g],
        &[&m],
        &[&m.zeros_like()?],
        &hyper(0.0, 1.0, 0)
    )
    .is_err());
    assert!(global_grad_norm(&[&wide]).is_err());
    Ok(())
}
