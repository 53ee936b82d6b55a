//! Each op's CPU twin against the stock candle-op chain it replaces, forward + backward, on the SmolLM2-135M shape
//! (2048 tokens, hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64, vocabulary 49152), f32:
//! median wall time and the peak heap memory above the inputs (counted by this binary's allocator).
//!
//!   cargo run --release -p kto-kernels --example twin_bench [-- REPEATS [OP]]
//!
//! The stock chains are the formulas kto-model runs today, written here with plain candle ops.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use kto_kernels::testing::Normal;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

/// Counts the bytes live on the heap and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(live, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new);
        if !q.is_null() {
            if new > layout.size() {
                let live = LIVE.fetch_add(new - layout.size(), Relaxed) + new - layout.size();
                PEAK.fetch_max(live, Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const TOKENS: usize = 2048;
const HIDDEN: usize = 576;
const INTERMEDIATE: usize = 1536;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 49152;

fn tensor(seed: u64, shape: &[usize], scale: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(Normal::new(seed).vec(n, scale), shape, &Device::Cpu)
}

/// Σ probe ⊙ f(x) backward: the forward and the input gradient, as a training step needs them.
fn forward_backward(x: &Var, probe: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    forward_backward_all(std::slice::from_ref(x), probe, &|xs| f(&xs[0]))
}

/// The same with several inputs, every one of which gets its gradient. The output's gradient is `probe` itself,
/// handed to the backward by [`Seed`] as the next layer would hand it over (contiguous, no broadcast or product to pay
/// for), so the times are the op's and candle's gradient bookkeeping, nothing of the measuring.
fn forward_backward_all(
    xs: &[Var],
    probe: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let inputs: Vec<Tensor> = xs.iter().map(|x| x.as_tensor().clone()).collect();
    let y = f(&inputs)?;
    let grads = y.apply_op1(Seed(probe.to_dtype(y.dtype())?))?.backward()?;
    for x in &inputs {
        grads.get(x).expect("a gradient");
    }
    Ok(())
}

/// A scalar whose gradient with respect to its input is a given tensor.
struct Seed(Tensor);

impl candle_core::CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "seed"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((
            candle_core::CpuStorage::F32(vec![0.0]),
            candle_core::Shape::from(()),
        ))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// Median seconds and peak extra heap bytes of `run`.
fn measure(repeats: usize, run: &dyn Fn() -> Result<()>) -> Result<(f64, usize)> {
    run()?; // warm-up (thread pool, lazily built tables)
    let mut times = Vec::new();
    let mut peak = 0;
    for _ in 0..repeats {
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64());
        peak = peak.max(PEAK.load(Relaxed) - base);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], peak))
}

struct Case {
    name: &'static str,
    stock: Box<dyn Fn() -> Result<()>>,
    fused: Box<dyn Fn() -> Result<()>>,
}

fn stock_rms_norm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(variance + 1e-5)?.sqrt()?)?;
    normed.to_dtype(x.dtype())?.broadcast_mul(w)
}

fn rms_norm_case() -> Result<Case> {
    let x = Var::from_tensor(&tensor(1, &[TOKENS, HIDDEN], 1.0)?)?;
    let w = tensor(2, &[HIDDEN], 1.0)?;
    let probe = tensor(3, &[TOKENS, HIDDEN], 1.0)?;
    let (x2, w2, p2) = (x.clone(), w.clone(), probe.clone());
    Ok(Case {
        name: "rms_norm [2048×576]",
        stock: Box::new(move || forward_backward(&x, &probe, &|x| stock_rms_norm(x, &w))),
        fused: Box::new(move || {
            forward_backward(&x2, &p2, &|x| kto_kernels::rmsnorm::rms_norm(x, &w2, 1e-5))
        }),
    })
}

/// The benchmark's batch: 8 rows of 256 tokens (issue 13's CPU benchmark shape).
const ROWS: usize = 8;
const SEQ: usize = TOKENS / ROWS;

fn inv_freq() -> Vec<f32> {
    (0..HEAD_DIM / 2)
        .map(|i| 1.0 / 100_000f32.powf(2.0 * i as f32 / HEAD_DIM as f32))
        .collect()
}

/// kto-model's stock RoPE: transpose to [rows, heads, tokens, d], `x cos + rotate_half(x) sin`.
fn stock_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.transpose(1, 2)?.contiguous()?;
    let half = HEAD_DIM / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

fn rope_case() -> Result<Case> {
    let x = Var::from_tensor(&tensor(4, &[ROWS, SEQ, HEADS, HEAD_DIM], 1.0)?)?;
    let probe = tensor(5, &[ROWS, HEADS, SEQ, HEAD_DIM], 1.0)?;
    let inv = Tensor::new(inv_freq(), &Device::Cpu)?;
    let positions: Vec<u32> = (0..ROWS).flat_map(|_| 0..SEQ as u32).collect();
    let positions = Tensor::from_vec(positions, (ROWS, SEQ), &Device::Cpu)?;
    let (x2, p2) = (x.clone(), probe.clone());
    Ok(Case {
        name: "rope q [8×256×9×64] → [8×9×256×64]",
        stock: Box::new(move || {
            forward_backward(&x, &probe, &|x| {
                // the tables are rebuilt per call, as kto-model does per forward
                let pos = Tensor::arange(0f32, SEQ as f32, &Device::Cpu)?.unsqueeze(1)?;
                let freqs = pos.broadcast_mul(&inv.unsqueeze(0)?)?;
                let emb = Tensor::cat(&[&freqs, &freqs], 1)?;
                stock_rope(x, &emb.cos()?, &emb.sin()?)
            })
        }),
        fused: Box::new(move || {
            let inv = Tensor::new(inv_freq(), &Device::Cpu)?;
            forward_backward(&x2, &p2, &|x| kto_kernels::rope::rope(x, &positions, &inv))
        }),
    })
}

/// kto-model's stock attention chain: K/V repeated for the query heads, scores, additive mask, f32 softmax, · V.
fn stock_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let n_rep = HEADS / KV_HEADS;
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let (r, kv, n, d) = t.dims4()?;
        Tensor::cat(&vec![t; n_rep], 2)?.reshape((r, kv * n_rep, n, d))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let scores = (q.matmul(&k.t()?)? * scale)?
        .to_dtype(DType::F32)?
        .broadcast_add(mask)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.to_dtype(v.dtype())?.matmul(&v)
}

fn attention_case() -> Result<Case> {
    // rows of different lengths, right-padded to SEQ, as a KTO micro-batch
    let lengths: Vec<usize> = (0..ROWS).map(|r| SEQ - 16 * r).collect();
    let qkv = vec![
        Var::from_tensor(&tensor(6, &[ROWS, HEADS, SEQ, HEAD_DIM], 1.0)?)?,
        Var::from_tensor(&tensor(7, &[ROWS, KV_HEADS, SEQ, HEAD_DIM], 1.0)?)?,
        Var::from_tensor(&tensor(8, &[ROWS, KV_HEADS, SEQ, HEAD_DIM], 1.0)?)?,
    ];
    let probe = tensor(9, &[ROWS, HEADS, SEQ, HEAD_DIM], 1.0)?;
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let mut dense = Vec::with_capacity(ROWS * SEQ * SEQ);
    for &len in &lengths {
        for i in 0..SEQ {
            for j in 0..SEQ {
                dense.push(if j <= i && j < len.max(1) {
                    0f32
                } else {
                    f32::NEG_INFINITY
                });
            }
        }
    }
    let mask = Tensor::from_vec(dense, (ROWS, 1, SEQ, SEQ), &Device::Cpu)?;
    let ranges =
        kto_kernels::attention::AttentionMask::causal(&lengths, SEQ, 0, None, &Device::Cpu)?;
    let (qkv2, p2) = (qkv.clone(), probe.clone());
    Ok(Case {
        name: "attention GQA 9/3 heads, 8 rows × 256",
        stock: Box::new(move || {
            forward_backward_all(&qkv, &probe, &|t| {
                stock_attention(&t[0], &t[1], &t[2], &mask, scale)
            })
        }),
        fused: Box::new(move || {
            forward_backward_all(&qkv2, &p2, &|t| {
                kto_kernels::attention::attention(&t[0], &t[1], &t[2], &ranges, scale)
            })
        }),
    })
}

/// What the measuring itself costs (the probe product, its sum and their backward) on the rms_norm shape: `stock`
/// is the identity, `fused` only the forward of the fused op (no backward).
fn harness_case() -> Result<Case> {
    let x = Var::from_tensor(&tensor(1, &[TOKENS, HIDDEN], 1.0)?)?;
    let w = tensor(2, &[HIDDEN], 1.0)?;
    let probe = tensor(3, &[TOKENS, HIDDEN], 1.0)?;
    let x2 = x.clone();
    Ok(Case {
        name: "(floor: an identity op through the same autograd / rms_norm forward alone)",
        stock: Box::new(move || forward_backward(&x, &probe, &|x| Ok(x.clone()))),
        fused: Box::new(move || {
            kto_kernels::rmsnorm::rms_norm(&x2.as_tensor().detach(), &w, 1e-5).map(|_| ())
        }),
    })
}

fn swiglu_case() -> Result<Case> {
    let gate_up = Var::from_tensor(&tensor(10, &[TOKENS, 2 * INTERMEDIATE], 2.0)?)?;
    let probe = tensor(11, &[TOKENS, INTERMEDIATE], 1.0)?;
    let (g2, p2) = (gate_up.clone(), probe.clone());
    Ok(Case {
        name: "swiglu [2048×3072] → [2048×1536]",
        stock: Box::new(move || {
            forward_backward(&gate_up, &probe, &|x| {
                x.narrow(1, 0, INTERMEDIATE)?.silu()? * x.narrow(1, INTERMEDIATE, INTERMEDIATE)?
            })
        }),
        fused: Box::new(move || forward_backward(&g2, &p2, &|x| kto_kernels::swiglu::swiglu(x))),
    })
}

/// gate_proj's LoRA (576 → 1536, r 8): kto-model's `(f32(y) + (h·Bᵀ)·scale).to(dtype)` against the epilogue.
fn lora_case() -> Result<Case> {
    let rank = 8;
    let vars = vec![
        Var::from_tensor(&tensor(12, &[TOKENS, INTERMEDIATE], 1.0)?)?,
        Var::from_tensor(&tensor(13, &[TOKENS, rank], 1.0)?)?,
        Var::from_tensor(&tensor(14, &[INTERMEDIATE, rank], 0.1)?)?,
    ];
    let probe = tensor(15, &[TOKENS, INTERMEDIATE], 1.0)?;
    let (v2, p2) = (vars.clone(), probe.clone());
    Ok(Case {
        name: "lora epilogue [2048×1536], r 8",
        stock: Box::new(move || {
            forward_backward_all(&vars, &probe, &|t| {
                let delta = (t[1].matmul(&t[2].t()?)? * 2.0)?;
                (t[0].to_dtype(DType::F32)? + delta)?.to_dtype(t[0].dtype())
            })
        }),
        fused: Box::new(move || {
            forward_backward_all(&v2, &p2, &|t| {
                kto_kernels::lora::lora_epilogue(&t[0], &t[1], &t[2], &[0], 2.0)
            })
        }),
    })
}

/// Tokens per log-prob chunk: kto-model's budget of 16 Mi logits.
const LOGITS_CHUNK: usize = 16 * 1024 * 1024 / VOCAB;

/// kto-model's per-chunk log-prob math (log-softmax, gather, entropy, mean logit, and the gradient onehot − softmax)
/// over 2048 tokens, against the fused stats + backward; the logits are given (the LM-head GEMM is the same in both).
fn logprobs_case() -> Result<Case> {
    let logits = tensor(16, &[LOGITS_CHUNK, VOCAB], 3.0)?;
    let targets: Vec<u32> = (0..LOGITS_CHUNK as u32)
        .map(|i| (i * 7919) % VOCAB as u32)
        .collect();
    let targets = Tensor::from_vec(targets, (LOGITS_CHUNK, 1), &Device::Cpu)?;
    let chunks = TOKENS.div_ceil(LOGITS_CHUNK);
    let (l2, t2) = (logits.clone(), targets.flatten_all()?);
    Ok(Case {
        name: "log-probs 2048 tokens × 49152 (chunks of 341)",
        stock: Box::new(move || {
            let vocab_ids = Tensor::arange(0u32, VOCAB as u32, &Device::Cpu)?.unsqueeze(0)?;
            for _ in 0..chunks {
                let max = logits.max_keepdim(D::Minus1)?;
                let sum_exp = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
                let log_z = (max + sum_exp.log()?)?;
                let log_probs = logits.broadcast_sub(&log_z)?;
                let probs = log_probs.exp()?;
                let _target = log_probs.gather(&targets, 1)?;
                let _entropy =
                    ((probs.mul(&logits)?.sum(D::Minus1)? * -1.0)? + log_z.squeeze(1)?)?;
                let _mean = logits.mean(D::Minus1)?;
                let onehot = targets.broadcast_eq(&vocab_ids)?.to_dtype(DType::F32)?;
                let _grad = (onehot - probs)?;
            }
            Ok(())
        }),
        fused: Box::new(move || {
            let ones = Tensor::ones(LOGITS_CHUNK, DType::F32, &Device::Cpu)?;
            for _ in 0..chunks {
                let stats = kto_kernels::logprobs::logprob_stats(&l2, &t2)?;
                let lse = stats
                    .narrow(1, kto_kernels::logprobs::LSE, 1)?
                    .squeeze(1)?
                    .contiguous()?;
                let _grad = kto_kernels::logprobs::logprob_backward(&l2, &t2, &lse, &ones)?;
            }
            Ok(())
        }),
    })
}

/// One optimizer step over SmolLM2's LoRA tensors (r 8 on all seven linears of 30 layers, 4.9 M parameters),
/// clipping included: the stock per-tensor candle ops (kto-trainer's former optimizer) against one fused pass.
fn adamw_case() -> Result<Case> {
    use kto_kernels::testing::stock_adamw::{stock_clip_grad_norm, StockAdamW};
    let shapes = [
        (HIDDEN, HIDDEN),
        (HIDDEN, 192),
        (HIDDEN, 192),
        (HIDDEN, HIDDEN),
        (HIDDEN, INTERMEDIATE),
        (HIDDEN, INTERMEDIATE),
        (INTERMEDIATE, HIDDEN),
    ];
    let mut params = Vec::new();
    let mut grads = std::collections::HashMap::new();
    for layer in 0..30 {
        for (m, &(fan_in, fan_out)) in shapes.iter().enumerate() {
            for (ab, shape) in [("A", (8, fan_in)), ("B", (fan_out, 8))] {
                let name = format!("{layer}.{m}.{ab}");
                let seed = (layer * 100 + m * 2) as u64 + (ab == "B") as u64;
                params.push((
                    name.clone(),
                    Var::from_tensor(&tensor(seed, &[shape.0, shape.1], 0.02)?)?,
                ));
                grads.insert(name, tensor(seed + 7, &[shape.0, shape.1], 1e-3)?);
            }
        }
    }
    let (p2, g2) = (params.clone(), grads.clone());
    let moments = |p: &[(String, Var)]| -> Result<Vec<(Tensor, Tensor)>> {
        p.iter()
            .map(|(_, v)| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect()
    };
    let m2 = moments(&p2)?;
    let optimizer = std::cell::RefCell::new(StockAdamW::new(0.9, 0.999, 1e-8, 0.0));
    Ok(Case {
        name: "adamw + clip, 420 LoRA tensors (4.9 M)",
        stock: Box::new(move || {
            let mut g = grads.clone();
            stock_clip_grad_norm(&mut g, 1.0)?;
            optimizer.borrow_mut().step(&params, &g, 1e-4)
        }),
        fused: Box::new(move || {
            use kto_kernels::adamw::{adamw_step, clip_coefficient, global_grad_norm, AdamWHyper};
            let mut names: Vec<&String> = g2.keys().collect();
            names.sort();
            let grad_refs: Vec<&Tensor> = names.iter().map(|n| &g2[*n]).collect();
            let norm = global_grad_norm(&grad_refs)?;
            let vars: Vec<&Var> = p2.iter().map(|(_, v)| v).collect();
            let grads: Vec<&Tensor> = p2.iter().map(|(n, _)| &g2[n]).collect();
            let exp_avg: Vec<&Tensor> = m2.iter().map(|m| &m.0).collect();
            let exp_avg_sq: Vec<&Tensor> = m2.iter().map(|m| &m.1).collect();
            let hyper = AdamWHyper {
                lr: 1e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                step: 1,
                grad_scale: clip_coefficient(norm, 1.0),
            };
            adamw_step(&vars, &grads, &exp_avg, &exp_avg_sq, &hyper)
        }),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let repeats: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let only = args.get(2).cloned();
    let cases: Vec<fn() -> Result<Case>> = vec![
        harness_case,
        rms_norm_case,
        rope_case,
        attention_case,
        swiglu_case,
        lora_case,
        logprobs_case,
        adamw_case,
    ];
    println!(
        "| op (fwd+bwd, f32, {} threads) | stock ms | twin ms | speed-up | stock peak MiB | twin peak MiB |",
        rayon::current_num_threads()
    );
    println!("|---|---|---|---|---|---|");
    for make in cases {
        let case = make()?;
        if only.as_deref().is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        let (stock_s, stock_mem) = measure(repeats, &*case.stock)?;
        let (fused_s, fused_mem) = measure(repeats, &*case.fused)?;
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        println!(
            "| {} | {:.2} | {:.2} | {:.1}× | {:.1} | {:.1} |",
            case.name,
            stock_s * 1e3,
            fused_s * 1e3,
            stock_s / fused_s,
            mib(stock_mem),
            mib(fused_mem)
        );
    }
    Ok(())
}
