//! The model side of a KTO micro-batch: what the trainer asks of a model, the reference log-probs (online or
//! precomputed), and scoring one micro-batch into its loss and metrics.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{Tensor, Var};
use kto_data::batch::{MicroBatch, SequenceBatch};

use crate::loss::{
    batch_metrics, kto_loss, LossInputs, LossOutput, LossSettings, MicroBatchMetrics, RowStats,
};
use crate::progress::{Pass, PassProgress};
use crate::reference_cache::ReferenceLogps;

/// Which weights a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The trained adapter, recording the graph for its gradient.
    Policy,
    /// The trained adapter, no graph.
    PolicyNoGrad,
    /// The frozen reference: a copy of the initial adapter, or the base model with the adapter disabled.
    Reference,
}

/// Per-row results of a forward pass over a [`SequenceBatch`].
#[derive(Debug, Clone)]
pub struct RowLogps {
    /// Summed completion log-probs, f32 `[rows]`; carries the gradient for [`Weights::Policy`].
    pub logps: Tensor,
    pub token_counts: Vec<usize>,
    pub mean_logit_sums: Vec<f64>,
    pub entropy_sums: Vec<f64>,
}

/// What the training loop needs from a model with a trainable adapter.
pub trait PolicyModel {
    fn sequence_logps(&self, batch: &SequenceBatch, weights: Weights) -> Result<RowLogps>;
    /// The trainable tensors with stable (PEFT) names; the optimizer updates them in place.
    fn trainable_parameters(&self) -> Vec<(String, Var)>;
    /// Writes the trained adapter in PEFT format into `dir`.
    fn save_adapter(&self, dir: &Path) -> Result<()>;
    /// Called before every optimizer step's forward passes with a seed derived from the run seed and the step, so
    /// random layers (LoRA dropout) draw the same numbers whether or not the run was resumed.
    fn begin_step(&mut self, _step_seed: u64) -> Result<()> {
        Ok(())
    }
    /// Called before an evaluation pass: random layers off (torch's `model.eval()`), until the next `begin_step`.
    fn begin_evaluation(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Where the reference log-probs come from.
#[derive(Debug, Clone, Copy)]
pub enum Reference<'a> {
    /// Forward passes with [`Weights::Reference`].
    Online,
    /// Precomputed per sample (indexed by the sample's position in the dataset).
    Precomputed(&'a ReferenceLogps),
}

/// A scored micro-batch.
pub struct ScoredBatch {
    pub loss: LossOutput,
    pub metrics: MicroBatchMetrics,
}

/// Runs the forward passes of one micro-batch and computes its loss and metrics. With `with_grad` the policy pass
/// over the targets records the graph (training); the KL passes never do.
pub fn score_micro_batch<M: PolicyModel>(
    model: &M,
    batch: &MicroBatch,
    reference: Reference,
    settings: &LossSettings,
    with_grad: bool,
) -> Result<ScoredBatch> {
    let device_of = |t: &Tensor| t.device().clone();
    // TRL's order: the policy's KL pass, the policy's target pass, then the reference passes.
    let policy_kl = match &batch.kl {
        Some(kl) if settings.loss_type.uses_kl() => {
            Some(model.sequence_logps(kl, Weights::PolicyNoGrad)?.logps)
        }
        _ => None,
    };
    let policy = model.sequence_logps(
        &batch.target,
        if with_grad {
            Weights::Policy
        } else {
            Weights::PolicyNoGrad
        },
    )?;
    let device = device_of(&policy.logps);
    let (reference_targets, reference_kl) = match reference {
        Reference::Online => {
            let kl = match &batch.kl {
                Some(kl) if settings.loss_type.uses_kl() => {
                    Some(model.sequence_logps(kl, Weights::Reference)?.logps)
                }
                _ => None,
            };
            (
                model
                    .sequence_logps(&batch.target, Weights::Reference)?
                    .logps,
                kl,
            )
        }
        Reference::Precomputed(cache) => {
            let pick = |values: &[f32]| -> Result<Tensor> {
                let picked: Vec<f32> = batch
                    .indices
                    .iter()
                    .map(|&i| {
                        values
                            .get(i)
                            .copied()
                            .with_context(|| format!("no precomputed reference for sample {i}"))
                    })
                    .collect::<Result<_>>()?;
                Ok(Tensor::new(picked.as_slice(), &device)?)
            };
            let kl = match (&cache.kl, settings.loss_type.uses_kl()) {
                (Some(kl), true) => Some(pick(kl)?),
                (None, true) => {
                    anyhow::bail!("the precomputed reference log-probs have no KL pairs")
                }
                (_, false) => None,
            };
            (pick(&cache.targets)?, kl)
        }
    };
    let loss = kto_loss(
        &LossInputs {
            policy_logps: &policy.logps,
            reference_logps: &reference_targets,
            policy_kl_logps: policy_kl.as_ref(),
            reference_kl_logps: reference_kl.as_ref(),
            labels: &batch.labels,
        },
        settings,
    )?;
    let rows = RowStats {
        completion_tokens: policy.token_counts.clone(),
        mean_logit_sums: policy.mean_logit_sums.clone(),
        entropy_sums: policy.entropy_sums.clone(),
        sequence_tokens: batch.target.lengths.clone(),
    };
    let metrics = batch_metrics(&batch.labels, &loss, &rows);
    Ok(ScoredBatch { loss, metrics })
}

/// One pass over `batches` computing the reference log-probs of every sample (targets, and KL pairs when
/// `with_kl`), stored by sample index.
pub fn precompute_reference<M: PolicyModel>(
    model: &M,
    batches: impl Iterator<Item = MicroBatch>,
    num_samples: usize,
    with_kl: bool,
    label: &str,
) -> Result<ReferenceLogps> {
    let mut targets = vec![f32::NAN; num_samples];
    let mut kl = with_kl.then(|| vec![f32::NAN; num_samples]);
    let progress = PassProgress::start(
        Pass::ReferencePrecompute {
            dataset: label.to_string(),
        },
        num_samples,
    );
    for batch in batches {
        let values = model
            .sequence_logps(&batch.target, Weights::Reference)?
            .logps
            .to_vec1::<f32>()?;
        for (&i, v) in batch.indices.iter().zip(values) {
            targets[i] = v;
        }
        if let (Some(kl_out), Some(kl_batch)) = (kl.as_mut(), &batch.kl) {
            let values = model
                .sequence_logps(kl_batch, Weights::Reference)?
                .logps
                .to_vec1::<f32>()?;
            for (&i, v) in batch.indices.iter().zip(values) {
                kl_out[i] = v;
            }
        }
        progress.advance(batch.indices.len());
    }
    drop(progress);
    ensure!(
        targets.iter().all(|v| !v.is_nan()),
        "reference precompute missed samples ({label})"
    );
    Ok(ReferenceLogps { targets, kl })
}
