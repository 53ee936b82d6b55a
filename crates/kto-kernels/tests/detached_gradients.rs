//! Every op's backward returns gradients that carry no graph. candle hands a leaf `Var` the gradient exactly as the op
//! returned it; one built from the op's tracked inputs would keep the whole forward graph alive for as long as the
//! gradient (or an optimizer moment made from it) lives — a leak of one graph per training step.

use candle_core::{DType, Device, Result, Tensor, Var};
use kto_kernels::attention::{attention, masked_softmax, AttentionMask};
use kto_kernels::testing::Normal;

fn var(seed: u64, shape: &[usize]) -> Result<Var> {
    let n = shape.iter().product();
    Var::from_vec(Normal::new(seed).vec(n, 1.0), shape, &Device::Cpu)
}

/// Backpropagates `Σ y` and checks that every input got an untracked gradient.
fn check(name: &str, y: &Tensor, inputs: &[&Var]) -> Result<()> {
    let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
    for (i, v) in inputs.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: input {i} has no gradient"));
        assert!(
            !g.track_op(),
            "{name}: the gradient of input {i} carries a graph"
        );
    }
    Ok(())
}

#[test]
fn no_op_returns_a_gradient_with_a_graph() -> Result<()> {
    let x = var(1, &[3, 16])?;
    let w = Tensor::ones(16, DType::F32, &Device::Cpu)?;
    check(
        "rms_norm",
        &kto_kernels::rmsnorm::rms_norm(x.as_tensor(), &w, 1e-5)?,
        &[&x],
    )?;

    let qkv = var(2, &[1, 5, 4, 8])?;
    let positions = Tensor::arange(0u32, 5, &Device::Cpu)?.unsqueeze(0)?;
    let inv = Tensor::new(&[1f32, 0.1, 0.01, 0.001], &Device::Cpu)?;
    let y = kto_kernels::rope::rope(&qkv.as_tensor().narrow(2, 1, 2)?, &positions, &inv)?;
    check("rope", &y, &[&qkv])?;

    let gate_up = var(3, &[4, 10])?;
    check(
        "swiglu",
        &kto_kernels::swiglu::swiglu(gate_up.as_tensor())?,
        &[&gate_up],
    )?;

    let mask = AttentionMask::causal(&[5, 3], 5, 0, None, &Device::Cpu)?;
    let scores = var(4, &[2, 1, 5, 5])?;
    check(
        "masked_softmax",
        &masked_softmax(scores.as_tensor(), &mask, 0.5)?,
        &[&scores],
    )?;
    let (q, k, v) = (
        var(5, &[2, 4, 5, 8])?,
        var(6, &[2, 2, 5, 8])?,
        var(7, &[2, 2, 5, 8])?,
    );
    let y = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.35)?;
    check("attention", &y, &[&q, &k, &v])?;

    let logits = var(8, &[3, 50])?;
    let targets = Tensor::new(&[1u32, 7, 49], &Device::Cpu)?;
    let (logp, _) = kto_kernels::logprobs::token_logprobs(logits.as_tensor(), &targets)?;
    check("token_logprobs", &logp, &[&logits])?;

    let (base, h, b) = (var(9, &[6, 12])?, var(10, &[6, 8])?, var(11, &[12, 4])?);
    let y = kto_kernels::lora::lora_epilogue(
        base.as_tensor(),
        h.as_tensor(),
        b.as_tensor(),
        &[0, 5],
        2.0,
    )?;
    check("lora_epilogue", &y, &[&base, &h, &b])
}
