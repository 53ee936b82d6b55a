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
    let y = f(x.as_tensor())?;
    let grads = (y.to_dtype(DType::F32)? * probe)?.sum_all()?.backward()?;
    grads.get(x.as_tensor()).expect("a gradient");
    Ok(())
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
        fused: Box::new(move || forward_backward(&x2, &p2, &|x| kto_kernels::rmsnorm::rms_norm(x, &w2, 1e-5))),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let repeats: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let only = args.get(2).cloned();
    let _ = (INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB);
    let cases: Vec<fn() -> Result<Case>> = vec![rms_norm_case];
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
