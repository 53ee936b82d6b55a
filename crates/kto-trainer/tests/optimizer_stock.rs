//! The trainer's optimizer (fused AdamW, clipping coefficient applied inside the step) against the stock candle-op
//! chain it replaced (`kto_kernels::testing::stock_adamw`): parameters, moments, norms and the clipped gradients the
//! gradient hook sees, bit for bit over several steps, with a save/load round trip of the state mid-way.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use kto_kernels::testing::stock_adamw::{stock_clip_grad_norm, StockAdamW};
use kto_kernels::testing::Normal;
use kto_trainer::optimizer::{measure_grad_norm, scale_grads, AdamW, AdamWSettings};

const STEPS: usize = 6;
const SAVE_AFTER: usize = 3;

/// Fails at the first element whose bits differ.
fn assert_bits(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let (got, want) = (
        got.flatten_all()?.to_vec1::<f32>()?,
        want.flatten_all()?.to_vec1::<f32>()?,
    );
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} is {:e}, the stock ops give {:e}",
            got[i], want[i]
        );
    }
    Ok(())
}

fn vars(rng: &mut Normal, shapes: &[(&str, &[usize])], dev: &Device) -> Result<Vec<(String, Var)>> {
    shapes
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            Ok((
                name.to_string(),
                Var::from_vec(rng.vec(n, 0.5), *shape, dev)?,
            ))
        })
        .collect()
}

/// Step `k`'s gradients: magnitudes that clip at some steps and not at others, one transposed (strided) gradient,
/// and one parameter that has no gradient at the first step (its moments start a step later).
fn gradients(
    rng: &mut Normal,
    shapes: &[(&str, &[usize])],
    k: usize,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut grads = HashMap::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let values = rng.vec(n, if k.is_multiple_of(2) { 2.0 } else { 0.01 });
        let g = if shape.len() == 2 && i == 1 {
            Tensor::from_vec(values, (shape[1], shape[0]), dev)?.t()?
        } else {
            Tensor::from_vec(values, *shape, dev)?
        };
        if !(k == 0 && *name == "late") {
            grads.insert(name.to_string(), g);
        }
    }
    Ok(grads)
}

fn trainer_equals_stock(weight_decay: f64, beta1: f64, max_norm: f64) -> Result<()> {
    let dev = Device::Cpu;
    let shapes: [(&str, &[usize]); 5] = [
        ("layers.0.q_proj.lora_A", &[8, 64]),
        ("layers.0.q_proj.lora_B", &[64, 8]),
        ("late", &[7, 3]),
        ("bias", &[1]),
        ("long", &[4097]),
    ];
    let params = vars(&mut Normal::new(5), &shapes, &dev)?;
    let stock_params = vars(&mut Normal::new(5), &shapes, &dev)?;
    let settings = AdamWSettings {
        beta1,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
    };
    let mut trainer = AdamW::new(settings);
    let mut stock = StockAdamW::new(beta1, 0.999, 1e-8, weight_decay);
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("optimizer.safetensors");
    let mut rng = Normal::new(11);
    let mut clipped_steps = 0;
    for k in 0..STEPS {
        let lr = 1e-3 * (k + 1) as f64;
        let grads = gradients(&mut rng, &shapes, k, &dev)?;

        let mut stock_grads = grads.clone();
        let stock_norm = stock_clip_grad_norm(&mut stock_grads, max_norm)?;
        stock.step(&stock_params, &stock_grads, lr)?;

        let clipping = measure_grad_norm(&grads, max_norm)?;
        assert_eq!(
            clipping.norm.to_bits(),
            stock_norm.to_bits(),
            "step {k}: norm {} vs stock {stock_norm}",
            clipping.norm
        );
        clipped_steps += (clipping.coefficient < 1.0) as usize;
        let hooked = scale_grads(&grads, clipping.coefficient)?;
        for (name, g) in &stock_grads {
            assert_bits(&format!("step {k}: clipped {name}"), &hooked[name], g)?;
        }
        trainer.step_scaled(&params, &grads, lr, clipping.coefficient)?;

        for ((name, got), (_, want)) in params.iter().zip(&stock_params) {
            assert_bits(
                &format!("step {k}: {name} (wd {weight_decay}, β1 {beta1}, max_norm {max_norm})"),
                got.as_tensor(),
                want.as_tensor(),
            )?;
        }
        if k + 1 == SAVE_AFTER {
            trainer.save(&state)?;
            trainer = AdamW::load(&state, settings, &params)?;
            assert_eq!(trainer.step_count(), SAVE_AFTER as u64);
        }
    }
    trainer.save(&state)?;
    let saved = candle_core::safetensors::load(&state, &dev)?;
    for (name, _) in &params {
        let (m, v) = stock.moments(name).expect("stock moments");
        for (suffix, want) in [("exp_avg", m), ("exp_avg_sq", v)] {
            let key = format!("{name}.{suffix}");
            assert_bits(&key, &saved[&key], want)?;
        }
    }
    assert_eq!(trainer.step_count(), stock.step_count());
    if max_norm.is_finite() {
        assert!(
            clipped_steps > 0 && clipped_steps < STEPS,
            "some steps clip, some do not"
        );
    }
    Ok(())
}

#[test]
fn trainer_optimizer_equals_the_stock_candle_ops_bit_for_bit() -> Result<()> {
    trainer_equals_stock(0.0, 0.9, f64::INFINITY)?;
    trainer_equals_stock(0.01, 0.9, 1.0)?;
    // β1 = 0.3: torch's lerp from the end.
    trainer_equals_stock(0.01, 0.3, 1.0)
}
