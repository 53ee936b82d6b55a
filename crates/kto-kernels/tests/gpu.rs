//! Every op on the GPU against its CPU twin, through the candle API (forward and backward), in f32 and bf16.
//! Built with `--features cuda`; prints a skip line and passes when no CUDA device is present.
//!
//! f32 results differ only by summation order and CUDA's approximate `rsqrtf`/`expf` (tolerance 1e-4 relative);
//! bf16 results may differ by one rounding of the output dtype (`Tolerance::for_dtype(BF16)`, 1/64 relative).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use kto_kernels::testing::{assert_close, Normal, Tolerance};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            let reason = e.to_string();
            println!("SKIPPED GPU comparison: no CUDA device ({})", reason.lines().next().unwrap_or(""));
            None
        }
    }
}

fn tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F32 => Tolerance { rel: 1e-4, abs: 1e-5 },
        other => Tolerance::for_dtype(other),
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()
}

/// Runs `op` on the CPU and on the GPU (same inputs) and compares every tensor it returns.
fn compare(name: &str, dtype: DType, op: impl Fn(&Device) -> Result<Vec<Tensor>>) -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let cpu_out = op(&Device::Cpu)?;
    let gpu_out = op(&gpu)?;
    for (i, (c, g)) in cpu_out.iter().zip(&gpu_out).enumerate() {
        assert_close(&format!("{name} {dtype:?} output {i}"), &values(g)?, &values(c)?, tolerance(dtype))?;
    }
    println!("{name} {dtype:?}: GPU matches the CPU twin ({} tensors)", cpu_out.len());
    Ok(())
}

/// A seeded tensor made on the CPU in f32, then moved and cast.
fn input(seed: u64, shape: &[usize], scale: f32, device: &Device, dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(Normal::new(seed).vec(n, scale), shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
}

/// `Σ probe ⊙ f(x)`'s gradient with respect to x, and f(x).
fn value_and_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, probe: &Tensor) -> Result<Vec<Tensor>> {
    let var = Var::from_tensor(x)?;
    let y = f(var.as_tensor())?;
    let grads = (y.to_dtype(DType::F32)? * probe.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
    Ok(vec![y, grads.get(var.as_tensor()).expect("a gradient").clone()])
}

#[test]
fn rms_norm_on_gpu_matches_twin() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for dim in [7, 576, 2048] {
            compare(&format!("rms_norm dim {dim}"), dtype, |dev| {
                let x = input(1, &[3, 5, dim], 1.0, dev, dtype)?;
                let w = input(2, &[dim], 1.0, dev, dtype)?;
                let probe = input(3, &[3, 5, dim], 1.0, dev, dtype)?;
                value_and_grad(&x, |x| kto_kernels::rmsnorm::rms_norm(x, &w, 1e-5), &probe)
            })?;
        }
    }
    Ok(())
}
