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

/// The micro-batch's KL estimate before TRL gathers it over processes: the mean over the KL pairs of policy −
/// reference (f32, no gradient); `None` when the loss uses no KL.
pub fn kl_estimate(inputs: &LossInputs, settings: &LossSettings) -> Result<Option<f32>> {
    let rows = inputs.labels.len();
    match (
        settings.loss_type.uses_kl(),
        inputs.policy_kl_logps,
        inputs.reference_kl_logps,
    ) {
        (false, _, _) => Ok(None),
        (true, Some(p), Some(r)) => {
            ensure!(
                p.dims() == [rows] && r.dims() == [rows],
                "KL log-prob tensors must have shape [{rows}]"
            );
            let diff = (p.to_dtype(DType::F32)?.detach() - r.to_dtype(DType::F32)?.detach())?;
            Ok(Some(diff.mean_all()?.to_scalar::<f32>()?))
        }
        (true, _, _) => {
            anyhow::bail!("loss_type kto needs the policy and reference log-probs of the KL pairs")
        }
    }
}

/// The KL reference point from the (gathered) mean estimate: clamped at 0 as TRL's `clamp(min=0)` (which also maps
/// -0.0 to 0.0 and keeps NaN).
pub fn reference_point(mean: f32) -> f32 {
    if mean.is_nan() {
        f32::NAN
    } else {
        mean.max(0.0)
    }
}

/// TRL's `_compute_loss`: losses of the desirable samples, then of the undesirable ones, each weighted, averaged;
/// `kl` is the reference point (0 for apo_zero_unpaired).
pub fn kto_loss_at(inputs: &LossInputs, settings: &LossSettings, kl: f32) -> Result<LossOutput> {
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

/// One process's sums and counts for a micro-batch's metrics, which TRL adds over processes
/// (`gather_for_metrics(x).sum()`) before dividing. f32 sums (TRL's `nansum` on the device) are kept as f32 values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricSums {
    pub entropy_sum: f64,
    pub completion_tokens: f64,
    pub num_tokens: f64,
    pub forward_tokens: f64,
    pub chosen_logits: f64,
    pub chosen_tokens: f64,
    pub rejected_logits: f64,
    pub rejected_tokens: f64,
    pub num_chosen: f64,
    pub num_rejected: f64,
    pub chosen_rewards: f64,
    pub chosen_logps: f64,
    pub rejected_rewards: f64,
    pub rejected_logps: f64,
}

impl MetricSums {
    pub const LEN: usize = 14;

    /// As one buffer for a collective sum.
    pub fn to_array(&self) -> [f64; Self::LEN] {
        [
            self.entropy_sum,
            self.completion_tokens,
            self.num_tokens,
            self.forward_tokens,
            self.chosen_logits,
            self.chosen_tokens,
            self.rejected_logits,
            self.rejected_tokens,
            self.num_chosen,
            self.num_rejected,
            self.chosen_rewards,
            self.chosen_logps,
            self.rejected_rewards,
            self.rejected_logps,
        ]
    }

    pub fn from_array(a: [f64; Self::LEN]) -> Self {
        Self {
            entropy_sum: a[0],
            completion_tokens: a[1],
            num_tokens: a[2],
            forward_tokens: a[3],
            chosen_logits: a[4],
            chosen_tokens: a[5],
            rejected_logits: a[6],
            rejected_tokens: a[7],
            num_chosen: a[8],
            num_rejected: a[9],
            chosen_rewards: a[10],
            chosen_logps: a[11],
            rejected_rewards: a[12],
            rejected_logps: a[13],
        }
    }
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

/// This process's sums and counts of a micro-batch, from its loss output and the policy's row statistics.
pub fn batch_sums(labels: &[bool], out: &LossOutput, rows: &RowStats) -> MetricSums {
    let n = labels.len();
    debug_assert!(rows.completion_tokens.len() == n && rows.entropy_sums.len() == n);
    let of_class = |want: bool| (0..n).filter(move |&i| labels[i] == want);
    // nansum in f32, as TRL sums on the device.
    let nansum = |want: bool, values: &[f32]| -> f64 {
        of_class(want)
            .map(|i| values[i])
            .filter(|v| !v.is_nan())
            .sum::<f32>() as f64
    };
    let tokens = |want: bool| {
        of_class(want)
            .map(|i| rows.completion_tokens[i])
            .sum::<usize>() as f64
    };
    let logits = |want: bool| of_class(want).map(|i| rows.mean_logit_sums[i]).sum::<f64>();
    MetricSums {
        entropy_sum: rows.entropy_sums.iter().sum(),
        completion_tokens: rows.completion_tokens.iter().sum::<usize>() as f64,
        num_tokens: rows.sequence_tokens.iter().sum::<usize>() as f64,
        forward_tokens: 0.0,
        chosen_logits: logits(true),
        chosen_tokens: tokens(true),
        rejected_logits: logits(false),
        rejected_tokens: tokens(false),
        num_chosen: of_class(true).count() as f64,
        num_rejected: of_class(false).count() as f64,
        chosen_rewards: nansum(true, &out.rewards),
        chosen_logps: nansum(true, &out.policy_logps),
        rejected_rewards: nansum(false, &out.rewards),
        rejected_logps: nansum(false, &out.policy_logps),
    }
}

impl MicroBatchMetrics {
    /// TRL's metrics from the sums and counts (gathered over processes) and the KL reference point.
    pub fn from_sums(kl: f32, s: &MetricSums) -> Self {
        let ratio = |sum: f64, count: f64| (count > 0.0).then(|| sum / count);
        // The f32 sums of the processes add up in f32 on the device.
        let f32_sum = |sum: f64| sum as f32 as f64;
        let rewards_chosen = ratio(f32_sum(s.chosen_rewards), s.num_chosen);
        let rewards_rejected = ratio(f32_sum(s.rejected_rewards), s.num_rejected);
        MicroBatchMetrics {
            kl: kl as f64,
            // TRL: entropy_sum / total_tokens over every completion token.
            entropy: ratio(s.entropy_sum, s.completion_tokens).unwrap_or(0.0),
            num_tokens: s.num_tokens as u64,
            forward_tokens: s.forward_tokens as u64,
            logits_chosen: ratio(s.chosen_logits, s.chosen_tokens),
            logits_rejected: ratio(s.rejected_logits, s.rejected_tokens),
            rewards_chosen,
            rewards_rejected,
            logps_chosen: ratio(f32_sum(s.chosen_logps), s.num_chosen),
            logps_rejected: ratio(f32_sum(s.rejected_logps), s.num_rejected),
            rewards_margins: match (rewards_chosen, rewards_rejected) {
                (Some(c), Some(r)) => Some(c - r),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One process alone: the KL reference point of this micro-batch, then the loss (what `score_micro_batch` does
    /// with nothing to gather).
    fn kto_loss(inputs: &LossInputs, settings: &LossSettings) -> Result<LossOutput> {
        let kl = kl_estimate(inputs, settings)?.map_or(0.0, reference_point);
        kto_loss_at(inputs, settings, kl)
    }

    fn batch_metrics(labels: &[bool], out: &LossOutput, rows: &RowStats) -> MicroBatchMetrics {
        MicroBatchMetrics::from_sums(out.kl, &batch_sums(labels, out, rows))
    }
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
