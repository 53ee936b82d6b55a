//! The KTO and APO-zero-unpaired losses and the per-micro-batch metrics, as TRL 1.16's `KTOTrainer._compute_loss`.
//!
//! The loss is a candle graph in f32 (it carries the LoRA gradient through the policy log-probs); the metrics are
//! host values computed the way TRL reduces them: f32 sums on the device, then `.item()` and a division in f64.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use crate::config::LossType;

/// The loss hyper-parameters, with both weights resolved to numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSettings {
    pub loss_type: LossType,
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// The log-probs a micro-batch's loss needs. All are `[rows]` f32 tensors of summed completion log-probs.
pub struct LossInputs<'a> {
    /// Policy log-probs of the targets; carries the gradient.
    pub policy_logps: &'a Tensor,
    pub reference_logps: &'a Tensor,
    /// Policy and reference log-probs of the KL pairs (prompt i with completion i-1); `None` for apo_zero_unpaired.
    pub policy_kl_logps: Option<&'a Tensor>,
    pub reference_kl_logps: Option<&'a Tensor>,
    /// `true` = desirable (TRL's "chosen").
    pub labels: &'a [bool],
}

/// The loss of one micro-batch and what the metrics need from it.
#[derive(Debug)]
pub struct LossOutput {
    /// Mean over the micro-batch of the weighted per-sample losses (scalar f32, differentiable).
    pub loss: Tensor,
    /// The KL estimate: mean(policy − reference) over the KL pairs, clamped at 0; 0 when the loss uses no KL.
    pub kl: f32,
    /// Per sample, in batch order: the implied reward β·(policy − reference) in f32.
    pub rewards: Vec<f32>,
    /// Per sample, in batch order: the policy log-prob (detached).
    pub policy_logps: Vec<f32>,
}

/// TRL's `_compute_loss`: losses of the desirable samples, then of the undesirable ones, each weighted, averaged.
pub fn kto_loss(inputs: &LossInputs, settings: &LossSettings) -> Result<LossOutput> {
    let rows = inputs.labels.len();
    ensure!(rows > 0, "empty micro-batch");
    ensure!(
        inputs.policy_logps.dims() == [rows] && inputs.reference_logps.dims() == [rows],
        "log-prob tensors must have shape [{rows}], got {:?} and {:?}",
        inputs.policy_logps.dims(),
        inputs.reference_logps.dims()
    );
    let device = inputs.policy_logps.device();
    let policy = inputs.policy_logps.to_dtype(DType::F32)?;
    let reference = inputs.reference_logps.to_dtype(DType::F32)?.detach();

    let kl = match (
        settings.loss_type.uses_kl(),
        inputs.policy_kl_logps,
        inputs.reference_kl_logps,
    ) {
        (false, _, _) => 0.0f32,
        (true, Some(p), Some(r)) => {
            ensure!(
                p.dims() == [rows] && r.dims() == [rows],
                "KL log-prob tensors must have shape [{rows}]"
            );
            let diff = (p.to_dtype(DType::F32)?.detach() - r.to_dtype(DType::F32)?.detach())?;
            // mean() in f32, then clamp(min=0), as TRL (the clamp also maps -0.0 to 0.0 there: max(x, 0)).
            let mean = diff.mean_all()?.to_scalar::<f32>()?;
            if mean.is_nan() {
                f32::NAN
            } else {
                mean.max(0.0)
            }
        }
        (true, _, _) => {
            anyhow::bail!("loss_type kto needs the policy and reference log-probs of the KL pairs")
        }
    };

    let logratios = (&policy - &reference)?;
    let chosen_idx: Vec<u32> = (0..rows as u32)
        .filter(|&i| inputs.labels[i as usize])
        .collect();
    let rejected_idx: Vec<u32> = (0..rows as u32)
        .filter(|&i| !inputs.labels[i as usize])
        .collect();
    let beta = settings.beta;
    let mut parts = Vec::with_capacity(2);
    if !chosen_idx.is_empty() {
        let idx = Tensor::new(chosen_idx.as_slice(), device)?;
        let lr = logratios.index_select(&idx, 0)?;
        let losses = match settings.loss_type {
            // Eq. (7) of the KTO paper: 1 - sigmoid(beta * (logratio - KL))
            LossType::Kto => {
                one_minus(&candle_nn::ops::sigmoid(&scale(&shift(&lr, -kl)?, beta)?)?)?
            }
            LossType::ApoZeroUnpaired => one_minus(&candle_nn::ops::sigmoid(&scale(&lr, beta)?)?)?,
        };
        parts.push(scale(&losses, settings.desirable_weight)?);
    }
    if !rejected_idx.is_empty() {
        let idx = Tensor::new(rejected_idx.as_slice(), device)?;
        let lr = logratios.index_select(&idx, 0)?;
        let losses = match settings.loss_type {
            // 1 - sigmoid(beta * (KL - logratio))
            LossType::Kto => one_minus(&candle_nn::ops::sigmoid(&scale(
                &shift(&lr.neg()?, kl)?,
                beta,
            )?)?)?,
            LossType::ApoZeroUnpaired => candle_nn::ops::sigmoid(&scale(&lr, beta)?)?,
        };
        parts.push(scale(&losses, settings.undesirable_weight)?);
    }
    let losses = Tensor::cat(&parts, 0)?;
    let loss = losses.mean_all()?;

    let rewards = scale(&logratios.detach(), beta)?.to_vec1::<f32>()?;
    let policy_logps = policy.detach().to_vec1::<f32>()?;
    Ok(LossOutput {
        loss,
        kl,
        rewards,
        policy_logps,
    })
}

/// `x * factor` with the factor rounded to f32 first, as torch multiplies an f32 tensor by a Python float.
fn scale(x: &Tensor, factor: f64) -> Result<Tensor> {
    Ok(x.affine(factor as f32 as f64, 0.0)?)
}

/// `x + offset` (offset already f32).
fn shift(x: &Tensor, offset: f32) -> Result<Tensor> {
    Ok(x.affine(1.0, offset as f64)?)
}

fn one_minus(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(-1.0, 1.0)?)
}

/// Per-row figures of the policy forward pass over the targets (from `kto-model`'s `SequenceLogps`).
#[derive(Debug, Clone, Default)]
pub struct RowStats {
    /// Completion tokens scored per row.
    pub completion_tokens: Vec<usize>,
    /// Per row, the sum over completion positions of the vocabulary-mean logit.
    pub mean_logit_sums: Vec<f64>,
    /// Per row, the sum over completion positions of the entropy of the next-token distribution.
    pub entropy_sums: Vec<f64>,
    /// Real (non-pad) tokens per row of the target sequences (TRL's `attention_mask.sum()`).
    pub sequence_tokens: Vec<usize>,
}

/// What TRL appends to its `_metrics` lists for one micro-batch. `None` where TRL appends nothing (no desirable
/// samples: no `rewards/chosen`; margins only when both classes are present).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MicroBatchMetrics {
    pub kl: f64,
    pub entropy: f64,
    /// Tokens of this micro-batch's target sequences (TRL logs the running total).
    pub num_tokens: u64,
    /// Tokens every forward pass of this micro-batch pushed through the model (policy and reference, targets and
    /// KL sequences, padding included).
    pub forward_tokens: u64,
    pub logits_chosen: Option<f64>,
    pub logits_rejected: Option<f64>,
    pub rewards_chosen: Option<f64>,
    pub rewards_rejected: Option<f64>,
    pub logps_chosen: Option<f64>,
    pub logps_rejected: Option<f64>,
    pub rewards_margins: Option<f64>,
}

/// The metrics of one micro-batch from its loss output and the policy's row statistics.
pub fn batch_metrics(labels: &[bool], out: &LossOutput, rows: &RowStats) -> MicroBatchMetrics {
    let n = labels.len();
    debug_assert!(rows.completion_tokens.len() == n && rows.entropy_sums.len() == n);
    // TRL: entropy_sum / total_tokens over every completion token of the micro-batch.
    let entropy_sum: f64 = rows.entropy_sums.iter().sum();
    let total_tokens: usize = rows.completion_tokens.iter().sum();
    let entropy = if total_tokens > 0 {
        entropy_sum / total_tokens as f64
    } else {
        0.0
    };

    let class_mean = |want: bool, values: &[f32]| -> Option<f64> {
        let count = labels.iter().filter(|&&l| l == want).count();
        (count > 0).then(|| {
            // nansum in f32, then `.item() / count` in f64.
            let sum: f32 = (0..n)
                .filter(|&i| labels[i] == want && !values[i].is_nan())
                .map(|i| values[i])
                .sum();
            sum as f64 / count as f64
        })
    };
    let logits_mean = |want: bool| -> Option<f64> {
        let tokens: usize = (0..n)
            .filter(|&i| labels[i] == want)
            .map(|i| rows.completion_tokens[i])
            .sum();
        (tokens > 0).then(|| {
            let sum: f64 = (0..n)
                .filter(|&i| labels[i] == want)
                .map(|i| rows.mean_logit_sums[i])
                .sum();
            sum / tokens as f64
        })
    };
    let rewards_chosen = class_mean(true, &out.rewards);
    let rewards_rejected = class_mean(false, &out.rewards);
    MicroBatchMetrics {
        kl: out.kl as f64,
        entropy,
        num_tokens: rows.sequence_tokens.iter().sum::<usize>() as u64,
        forward_tokens: 0,
        logits_chosen: logits_mean(true),
        logits_rejected: logits_mean(false),
        rewards_chosen,
        rewards_rejected,
        logps_chosen: class_mean(true, &out.policy_logps),
        logps_rejected: class_mean(false, &out.policy_logps),
        rewards_margins: match (rewards_chosen, rewards_rejected) {
            (Some(c), Some(r)) => Some(c - r),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn settings(loss_type: LossType, beta: f64, wd: f64, wu: f64) -> LossSettings {
        LossSettings {
            loss_type,
            beta,
            desirable_weight: wd,
            undesirable_weight: wu,
        }
    }

    #[test]
    fn kto_loss_matches_formula_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let policy = Var::new(&[-10.0f32, -20.0, -5.0], &dev)?;
        let reference = Tensor::new(&[-11.0f32, -18.0, -5.5], &dev)?;
        let pkl = Tensor::new(&[-12.0f32, -30.0, -7.0], &dev)?;
        let rkl = Tensor::new(&[-12.5f32, -29.0, -6.0], &dev)?;
        let labels = [true, false, true];
        let s = settings(LossType::Kto, 0.5, 1.0, 1.5);
        let inputs = LossInputs {
            policy_logps: policy.as_tensor(),
            reference_logps: &reference,
            policy_kl_logps: Some(&pkl),
            reference_kl_logps: Some(&rkl),
            labels: &labels,
        };
        let out = kto_loss(&inputs, &s)?;
        // KL = mean(0.5, -1, -1) < 0 -> clamped to 0
        assert_eq!(out.kl, 0.0);
        let lr = [1.0f64, -2.0, 0.5];
        let expected = ((1.0 - sigmoid(0.5 * lr[0]))
            + (1.0 - sigmoid(0.5 * lr[2]))
            + 1.5 * (1.0 - sigmoid(-0.5 * lr[1])))
            / 3.0;
        let got = out.loss.to_scalar::<f32>()? as f64;
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        assert_eq!(out.rewards, vec![0.5, -1.0, 0.25]);

        // d/dx (1 - sigmoid(b x)) = -b s (1 - s); rejected: d/dx 1.5 (1 - sigmoid(-b x)) = 1.5 b s' (1 - s')
        let grads = out.loss.backward()?;
        let g = grads.get(policy.as_tensor()).unwrap().to_vec1::<f32>()?;
        let d = |x: f64| -0.5 * sigmoid(0.5 * x) * (1.0 - sigmoid(0.5 * x)) / 3.0;
        let sr = sigmoid(-0.5 * lr[1]);
        let expected_g = [d(lr[0]), 1.5 * 0.5 * sr * (1.0 - sr) / 3.0, d(lr[2])];
        for (a, b) in g.iter().zip(expected_g) {
            assert!((*a as f64 - b).abs() < 1e-6, "{g:?} vs {expected_g:?}");
        }
        Ok(())
    }

    #[test]
    fn kl_is_subtracted_when_positive() -> Result<()> {
        let dev = Device::Cpu;
        let policy = Tensor::new(&[-10.0f32, -20.0], &dev)?;
        let reference = Tensor::new(&[-10.0f32, -20.0], &dev)?;
        let pkl = Tensor::new(&[-1.0f32, -2.0], &dev)?;
        let rkl = Tensor::new(&[-2.0f32, -4.0], &dev)?;
        let labels = [true, false];
        let out = kto_loss(
            &LossInputs {
                policy_logps: &policy,
                reference_logps: &reference,
                policy_kl_logps: Some(&pkl),
                reference_kl_logps: Some(&rkl),
                labels: &labels,
            },
            &settings(LossType::Kto, 0.1, 1.0, 1.0),
        )?;
        assert_eq!(out.kl, 1.5);
        let expected = ((1.0 - sigmoid(0.1 * -1.5)) + (1.0 - sigmoid(0.1 * 1.5))) / 2.0;
        assert!((out.loss.to_scalar::<f32>()? as f64 - expected).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn apo_zero_unpaired_ignores_kl() -> Result<()> {
        let dev = Device::Cpu;
        let policy = Tensor::new(&[-9.0f32, -19.0], &dev)?;
        let reference = Tensor::new(&[-10.0f32, -20.0], &dev)?;
        let labels = [true, false];
        let out = kto_loss(
            &LossInputs {
                policy_logps: &policy,
                reference_logps: &reference,
                policy_kl_logps: None,
                reference_kl_logps: None,
                labels: &labels,
            },
            &settings(LossType::ApoZeroUnpaired, 0.1, 1.0, 1.0),
        )?;
        assert_eq!(out.kl, 0.0);
        let expected = ((1.0 - sigmoid(0.1)) + sigmoid(0.1)) / 2.0;
        assert!((out.loss.to_scalar::<f32>()? as f64 - expected).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn metrics_follow_trl_presence_rules() -> Result<()> {
        let dev = Device::Cpu;
        let policy = Tensor::new(&[-4.0f32, -6.0, -8.0], &dev)?;
        let reference = Tensor::new(&[-5.0f32, -6.0, -6.0], &dev)?;
        let labels = [true, true, false];
        let out = kto_loss(
            &LossInputs {
                policy_logps: &policy,
                reference_logps: &reference,
                policy_kl_logps: Some(&policy),
                reference_kl_logps: Some(&reference),
                labels: &labels,
            },
            &settings(LossType::Kto, 0.1, 1.0, 1.0),
        )?;
        let rows = RowStats {
            completion_tokens: vec![2, 3, 5],
            mean_logit_sums: vec![1.0, 2.0, -5.0],
            entropy_sums: vec![2.0, 3.0, 5.0],
            sequence_tokens: vec![4, 6, 9],
        };
        let m = batch_metrics(&labels, &out, &rows);
        assert_eq!(m.num_tokens, 19);
        assert!((m.entropy - 1.0).abs() < 1e-7);
        assert!((m.logits_chosen.unwrap() - 3.0 / 5.0).abs() < 1e-7);
        assert!((m.logits_rejected.unwrap() + 1.0).abs() < 1e-7);
        assert!((m.rewards_chosen.unwrap() - 0.05).abs() < 1e-7);
        assert!((m.rewards_rejected.unwrap() + 0.2).abs() < 1e-7);
        assert!((m.logps_chosen.unwrap() + 5.0).abs() < 1e-7);
        assert!((m.rewards_margins.unwrap() - 0.25).abs() < 1e-7);
        // KL = mean(1, 0, -2) < 0
        assert_eq!(m.kl, 0.0);

        let only_chosen = [true, true, true];
        let m = batch_metrics(&only_chosen, &out, &rows);
        assert!(
            m.rewards_rejected.is_none()
                && m.rewards_margins.is_none()
                && m.logits_rejected.is_none()
        );
        Ok(())
    }
}
