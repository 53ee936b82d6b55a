//! Every op on the GPU against its CPU twin, through the candle API (forward and backward), in f32, bf16 and f16
//! (kto trains in all three). Built with `--features cuda`. Without a CUDA device each test prints a SKIPPED line
//! and passes, unless `KTO_REQUIRE_GPU=1` (as scripts/gpu-check.sh sets it): then it fails. Every comparison prints
//! its worst error against its tolerance, so a near miss shows in a passing run.
//!
//! f32 results differ only by summation order and CUDA's approximate `rsqrtf`/`expf` (tolerance 1e-4 relative);
//! bf16/f16 results may differ by one rounding of the output dtype (`Tolerance::for_dtype`); attention runs as GEMMs
//! around the masked softmax on the GPU, judged as its CPU test judges that formulation
//! (`gemm_attention_tolerance`).
#![cfg(feature = "cuda")]

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use kto_kernels::testing::{
    compare_close, gemm_attention_tolerance, Normal, Tolerance, LARGE_RANK, MODEL_SHAPES,
};

/// The GPU, or None (a SKIPPED line) when there is none — an error instead when `KTO_REQUIRE_GPU=1`.
fn gpu() -> Result<Option<Device>> {
    match Device::new_cuda(0) {
        Ok(device) => Ok(Some(device)),
        Err(e) => {
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or("");
            if std::env::var("KTO_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                bail!("KTO_REQUIRE_GPU=1, but no CUDA device could be opened: {reason}");
            }
            println!(
                "SKIPPED GPU comparison: no CUDA device ({reason}); KTO_REQUIRE_GPU=1 makes this a failure"
            );
            Ok(None)
        }
    }
}

/// GPU vs CPU twin: f32 differs by summation order and CUDA's approximate math; bf16 may differ by one rounding.
fn tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F32 => Tolerance {
            rel: 1e-4,
            abs: 1e-5,
        },
        other => Tolerance::for_dtype(other),
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()
}

/// Runs `op` on the CPU and on `gpu` (same inputs) and compares every tensor it returns.
fn compare(
    gpu: &Device,
    name: &str,
    tol: Tolerance,
    op: impl Fn(&Device) -> Result<Vec<Tensor>>,
) -> Result<()> {
    let cpu_out = op(&Device::Cpu)?;
    let gpu_out = op(gpu)?;
    assert_eq!(cpu_out.len(), gpu_out.len());
    for (i, (c, g)) in cpu_out.iter().zip(&gpu_out).enumerate() {
        let what = format!("{name} output {i}");
        let worst = compare_close(&what, &values(g)?, &values(c)?, tol)?;
        println!("{what}: GPU matches the CPU twin, {worst}");
    }
    Ok(())
}

/// A seeded tensor made on the CPU in f32, then moved and cast.
fn input(seed: u64, shape: &[usize], scale: f32, device: &Device, dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(Normal::new(seed).vec(n, scale), shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// f(xs) and the gradient of `Σ probe ⊙ f(xs)` with respect to every x.
fn value_and_grads(
    xs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    probe: &Tensor,
) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = xs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&inputs)?;
    let grads = (y.to_dtype(DType::F32)? * probe.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;
    let mut out = vec![y];
    for x in &inputs {
        out.push(grads.get(x).expect("every input gets a gradient").clone());
    }
    Ok(out)
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
fn rms_norm() -> Result<()> {
    let Some(gpu) = gpu()? else {
        return Ok(());
    };
    for dtype in DTYPES {
        for dim in [7, 576, 2048] {
            compare(
                &gpu,
                &format!("rms_norm {dtype:?} dim {dim}"),
                tolerance(dtype),
                |dev| {
                    let x = input(1, &[3, 5, dim], 1.0, dev, dtype)?;
                    let w = input(2, &[dim], 1.0, dev, dtype)?;
                    let probe = input(3, &[3, 5, dim], 1.0, dev, dtype)?;
                    value_and_grads(
                        &[x],
                        |t| kto_kernels::rmsnorm::rms_norm(&t[0], &w, 1e-5),
                        &probe,
                    )
                },
            )?;
        }
    }
    Ok(())
}

#[test]
fn rope_from_a_fused_projection() -> Result<()> {
    let Some(gpu) = gpu()? else {
        return Ok(());
    };
    for dtype in DTYPES {
        for (rows, tokens, q_heads, kv_heads, head_dim) in
            [(2, 37, 3, 1, 80), (3, 300, 9, 3, 64), (1, 1, 4, 2, 128)]
        {
            let name =
                format!("rope {dtype:?} {rows}×{tokens} heads {q_heads}/{kv_heads} d {head_dim}");
            // cosf/sinf on the GPU are within 2 ulp of the CPU's: a bf16 table entry may round the other way
            compare(&gpu, &name, tolerance(dtype), |dev| {
                let fused = q_heads + 2 * kv_heads;
                let qkv = input(4, &[rows, tokens, fused, head_dim], 1.0, dev, dtype)?;
                let positions: Vec<u32> = (0..rows * tokens)
                    .map(|i| (i % tokens + 1000 * (i / tokens)) as u32)
                    .collect();
                let positions = Tensor::from_vec(positions, (rows, tokens), dev)?;
                let inv: Vec<f32> = (0..head_dim / 2)
                    .map(|i| 500_000f32.powf(-2.0 * i as f32 / head_dim as f32))
                    .collect();
                let inv = Tensor::from_vec(inv, head_dim / 2, dev)?;
                let probe = input(5, &[rows, kv_heads, tokens, head_dim], 1.0, dev, dtype)?;
                let k = |t: &[Tensor]| {
                    kto_kernels::rope::rope(&t[0].narrow(2, q_heads, kv_heads)?, &positions, &inv)
                };
                value_and_grads(&[qkv], k, &probe)
            })?;
        }
    }
    Ok(())
}

#[test]
fn swiglu() -> Result<()> {
    let Some(gpu) = gpu()? else {
        return Ok(());
    };
    for dtype in DTYPES {
        for inner in [1, 33, 1536, 5632] {
            compare(
                &gpu,
                &format!("swiglu {dtype:?} I {inner}"),
                tolerance(dtype),
                |dev| {
                    let gate_up = input(6, &[17, 2 * inner], 3.0, dev, dtype)?;
                    let probe = input(7, &[17, inner], 1.0, dev, dtype)?;
                    value_and_grads(&[gate_up], |t| kto_kernels::swiglu::swiglu(&t[0]), &probe)
                },
            )?;
        }
    }
    Ok(())
}

#[test]
fn gqa_attention_with_padding() -> Result<()> {
    use kto_kernels::attention::{attention, AttentionMask};
    let Some(gpu) = gpu()? else {
        return Ok(());
    };
    for dtype in DTYPES {
        // 37 keys take the warp-per-row path, 300 the block-per-row path
        for tokens in [37, 300] {
            let (rows, heads, kv_heads, d) = (2, 9, 3, 64);
            let lengths = [tokens, tokens - 5];
            let name = format!("attention {dtype:?} {rows}×{tokens} heads {heads}/{kv_heads}");
            compare(&gpu, &name, gemm_attention_tolerance(dtype), |dev| {
                let mask = AttentionMask::causal(&lengths, tokens, 0, None, dev)?;
                let q = input(8, &[rows, heads, tokens, d], 1.0, dev, dtype)?;
                let k = input(9, &[rows, kv_heads, tokens, d], 1.0, dev, dtype)?;
                let v = input(10, &[rows, kv_heads, tokens, d], 1.0, dev, dtype)?;
                let probe = input(11, &[rows, heads, tokens, d], 1.0, dev, dtype)?;
                value_and_grads(
                    &[q, k, v],
                    |t| attention(&t[0], &t[1], &t[2], &mask, 0.125),
                    &probe,
                )
            })?;
        }
    }
    Ok(())
}

#[test]
fn lora_epilogue_with_segments() -> Result<()> {
    let Some(gpu) = gpu()? else {
        return Ok(());
    };
    for dtype in DTYPES {
        let mut cases = vec![
            (37, 130, 8, vec![0]),
            (300, 576 + 2 * 192, 16, vec![0, 576, 768]),
            (37, 130, 256, vec![0]),
        ];
        for s in MODEL_SHAPES {
            // the fused q|k|v projection at rank 128 (two chunks of the kernel's shared tiles)
            let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
            cases.push((200, q + 2 * kv, LARGE_RANK, vec![0, q, q + kv]));
        }
        for (m, n, rank, starts) in cases {
            let name = format!(
                "lora_epilogue {dtype:?} {m}×{n} r {rank} segments {}",
                starts.len()
            );
            compare(&gpu, &name, tolerance(dtype), |dev| {
                let base = input(12, &[m, n], 1.0, dev, dtype)?;
                let h = input(13, &[m, starts.len() * rank], 1.0, dev, DType::F32)?;
                let b = input(14, &[n, rank], 0.1, dev, DType::F32)?;
                let probe = input(15, &[m, n], 1.0, dev, dtype)?;
                let f = |t: &[Tensor]| {
                    kto_kernels::lora::lora_epilogue(&t[0], &t[1], &t[2], &starts, 2.0)
                };
                value_and_grads(&[base, h, b], f, &probe)
            })?;
        }
    }
    Ok(())
}

#[test]
fn adamw_and_grad_norm() -> Result<()> {
    use kto_kernels::adamw::{adamw_step, clip_coefficient, global_grad_norm, AdamWHyper};
    let Some(gpu) = gpu()? else {
        return Ok(());
    };
    let sizes = [1usize, 33, 4097, 8 * 576, 1536 * 8];
    let run = |dev: &Device| -> Result<Vec<Tensor>> {
        let params: Vec<Var> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Var::from_tensor(&input(20 + i as u64, &[n], 0.1, dev, DType::F32)?))
            .collect::<Result<_>>()?;
        let m: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::zeros(n, DType::F32, dev))
            .collect::<Result<_>>()?;
        let v: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::zeros(n, DType::F32, dev))
            .collect::<Result<_>>()?;
        let mut norms = Vec::new();
        for step in 1..=3u64 {
            let grads: Vec<Tensor> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| input(100 * step + i as u64, &[n], 1.0, dev, DType::F32))
                .collect::<Result<_>>()?;
            let grad_refs: Vec<&Tensor> = grads.iter().collect();
            let norm = global_grad_norm(&grad_refs)?;
            norms.push(norm);
            let hyper = AdamWHyper {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step,
                grad_scale: clip_coefficient(norm, 1.0),
            };
            let (p, mr, vr): (Vec<&Var>, Vec<&Tensor>, Vec<&Tensor>) = (
                params.iter().collect(),
                m.iter().collect(),
                v.iter().collect(),
            );
            adamw_step(&p, &grad_refs, &mr, &vr, &hyper)?;
        }
        let mut out = vec![Tensor::new(norms, &Device::Cpu)?];
        out.extend(params.iter().map(|p| p.as_tensor().clone()));
        out.extend(m);
        out.extend(v);
        Ok(out)
    };
    // The norm differs by summation order only; the update is IEEE-exact elementwise (no FMA on either side), but
    // the clipping coefficient comes from the norm, so parameters are compared to f32 rounding.
    compare(
        &gpu,
        "adamw + grad norm",
        Tolerance {
            rel: 1e-6,
            abs: 1e-7,
        },
        run,
    )
}

#[test]
fn completion_logprobs() -> Result<()> {
    use kto_kernels::logprobs::token_logprobs;
    let Some(gpu) = gpu()? else {
        return Ok(());
    };
    for dtype in DTYPES {
        for vocab in [7usize, 1025, 32000, 49152] {
            let n = 13;
            // log p and the stats are sums over the vocabulary: compare to f32 rounding of |lse| ~ 10
            let tol = match dtype {
                DType::F32 => Tolerance {
                    rel: 1e-4,
                    abs: 1e-4,
                },
                other => Tolerance::for_dtype(other),
            };
            compare(
                &gpu,
                &format!("token_logprobs {dtype:?} V {vocab}"),
                tol,
                |dev| {
                    let logits = input(30, &[n, vocab], 3.0, dev, dtype)?;
                    let targets: Vec<u32> =
                        (0..n as u32).map(|i| (i * 7919) % vocab as u32).collect();
                    let targets = Tensor::from_vec(targets, n, dev)?;
                    let var = Var::from_tensor(&logits)?;
                    let (logp, stats) = token_logprobs(var.as_tensor(), &targets)?;
                    let probe = input(31, &[n], 1.0, dev, DType::F32)?;
                    let grads = (&logp * &probe)?.sum_all()?.backward()?;
                    let grad = grads.get(var.as_tensor()).expect("a gradient").clone();
                    Ok(vec![logp, stats, grad])
                },
            )?;
        }
    }
    Ok(())
}
