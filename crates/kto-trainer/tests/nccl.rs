//! The NCCL gradient sum (`kto_trainer::nccl`) on the GPU, with one rank: the communicator is made on candle's
//! stream from a unique id, one all-reduce runs device to device, and a sum over one rank returns the buffer bit for
//! bit. Built with `--features nccl`; runs in scripts/gpu-check.sh. Without a CUDA device it prints a SKIPPED line
//! and passes, unless `KTO_REQUIRE_GPU=1` (as the GPU check sets it): then it fails.
#![cfg(feature = "nccl")]

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use kto_trainer::world::World;

#[test]
fn one_rank_all_reduce_returns_its_buffer() -> Result<()> {
    let gpu = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) if std::env::var("KTO_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            bail!("KTO_REQUIRE_GPU=1, but no CUDA device could be opened: {e}")
        }
        Err(e) => {
            println!(
                "SKIPPED NCCL test: no CUDA device ({e}); KTO_REQUIRE_GPU=1 makes this a failure"
            );
            return Ok(());
        }
    };
    let world = kto_trainer::nccl::alone();
    // LoRA r 8 on every linear of TinyLlama-1.1B: 6.3 M gradients, one flat buffer as the step sends it; then a
    // second sum on the same communicator.
    for len in [6_307_840usize, 1000] {
        let flat = Tensor::randn(0f32, 1.0, len, &gpu)?;
        let summed = world.sum_f32_tensor(&flat)?;
        assert!(summed.device().is_cuda(), "the sum stays on the GPU");
        let (want, got) = (flat.to_vec1::<f32>()?, summed.to_vec1::<f32>()?);
        assert!(want == got, "a sum over one rank is the buffer itself");
        println!("NCCL all-reduce of {len} floats on one rank: ok");
    }
    // A CPU tensor goes through the host world.
    let cpu = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
    assert_eq!(world.sum_f32_tensor(&cpu)?.to_vec1::<f32>()?, [1.0, 2.0]);
    Ok(())
}
