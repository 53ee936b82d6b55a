//! The model side of a KTO micro-batch: what the trainer asks of a model, the reference log-probs (online or
//! precomputed), and scoring one micro-batch into its loss and metrics.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use kto_data::batch::{MicroBatch, SequenceBatch};
pub use kto_model::{AdapterChoice, SequenceLogps};

use crate::loss::{
    batch_sums, kl_estimate, kto_loss_at, reference_point, LossInputs, LossOutput, LossSettings,
    MetricSums, MicroBatchMetrics, RowStats,
};
use crate::reference_cache::ReferenceLogps;
use crate::world::{Dealt, Gather, SampleSlots, World};

/// What the training loop needs from a model with a trainable adapter, in kto-model's own terms.
pub trait PolicyModel {
    /// Completion log-probs of every row of `batch` with the weights `choice` selects.
    fn sequence_logps(&self, batch: &SequenceBatch, choice: AdapterChoice)
        -> Result<SequenceLogps>;
    /// The targets' log-probs with `choice`, and the KL sequences' with [`AdapterChoice::for_kl`] (no graph). A
    /// model may share work between the two (the KL sequences repeat the targets' prompts); by default they are two
    /// passes, in TRL's order (KL first).
    fn sequence_logps_with_kl(
        &self,
        target: &SequenceBatch,
        kl: &SequenceBatch,
        choice: AdapterChoice,
    ) -> Result<(SequenceLogps, SequenceLogps)> {
        let kl = self.sequence_logps(kl, choice.for_kl())?;
        Ok((self.sequence_logps(target, choice)?, kl))
    }
    /// The gradients of `loss` (a scalar over [`AdapterChoice::Policy`] passes) with respect to the trainable
    /// tensors. The model decides how: with gradient checkpointing it recomputes layers here.
    fn backward(&self, loss: &Tensor) -> Result<GradStore>;
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
    /// Forward passes with [`AdapterChoice::Reference`].
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
/// over the targets records the graph (training); the KL passes never do. The KL reference point and the metrics
/// are gathered over the processes `gather` names, as TRL's `gather_for_metrics` does (alone: nothing to gather).
pub fn score_micro_batch<M: PolicyModel>(
    model: &M,
    batch: &MicroBatch,
    reference: Reference,
    settings: &LossSettings,
    with_grad: bool,
    gather: Gather,
) -> Result<ScoredBatch> {
    // TRL's order: the policy's passes, then the reference's (each model runs its KL sequences as it sees fit).
    let kl_batch = batch.kl.as_ref().filter(|_| settings.loss_type.uses_kl());
    let policy_choice = if with_grad {
        AdapterChoice::Policy
    } else {
        AdapterChoice::PolicyNoGrad
    };
    let (policy, policy_kl) = target_and_kl(model, &batch.target, kl_batch, policy_choice)?;
    let mut forward_tokens =
        policy.forward_tokens + policy_kl.as_ref().map_or(0, |kl| kl.forward_tokens);
    let policy_kl = policy_kl.map(|kl| kl.logps);
    let device = policy.logps.device().clone();
    let (reference_targets, reference_kl) = match reference {
        Reference::Online => {
            let (targets, kl) =
                target_and_kl(model, &batch.target, kl_batch, AdapterChoice::Reference)?;
            forward_tokens +=
                targets.forward_tokens + kl.as_ref().map_or(0, |kl| kl.forward_tokens);
            (targets.logps, kl.map(|kl| kl.logps))
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
    let inputs = LossInputs {
        policy_logps: &policy.logps,
        reference_logps: &reference_targets,
        policy_kl_logps: policy_kl.as_ref(),
        reference_kl_logps: reference_kl.as_ref(),
        labels: &batch.labels,
    };
    // TRL: `gather_for_metrics(kl).mean().clamp(min=0)`.
    let kl = match kl_estimate(&inputs, settings)? {
        Some(kl) => reference_point(gather.world.mean(kl as f64, gather.counted)? as f32),
        None => 0.0,
    };
    let loss = kto_loss_at(&inputs, settings, kl)?;
    let rows = RowStats {
        completion_tokens: policy.token_counts.clone(),
        mean_logit_sums: policy.mean_logit_sums.clone(),
        entropy_sums: policy.entropy_sums.clone(),
        sequence_tokens: batch.target.lengths.clone(),
    };
    let mut sums = batch_sums(&batch.labels, &loss, &rows);
    sums.forward_tokens = forward_tokens as f64;
    let mut gathered = sums.to_array();
    gather.world.sum_f64(&mut gathered, gather.counted)?;
    let metrics = MicroBatchMetrics::from_sums(kl, &MetricSums::from_array(gathered));
    Ok(ScoredBatch { loss, metrics })
}

/// The targets' log-probs with `choice`, and the KL sequences' when there are any.
fn target_and_kl<M: PolicyModel>(
    model: &M,
    target: &SequenceBatch,
    kl: Option<&SequenceBatch>,
    choice: AdapterChoice,
) -> Result<(SequenceLogps, Option<SequenceLogps>)> {
    Ok(match kl {
        Some(kl) => {
            let (target, kl) = model.sequence_logps_with_kl(target, kl, choice)?;
            (target, Some(kl))
        }
        None => (model.sequence_logps(target, choice)?, None),
    })
}

/// One pass over `batches` (this rank's share of the data set, dealt as `dealt` says) computing the reference
/// log-probs of its samples (targets, and KL pairs when `with_kl`), then gathered by sample index over the ranks as
/// TRL gathers its sharded precompute (`gather_for_metrics`: `even_batches`' padding rows are dropped), so every
/// rank ends with every sample's values, each computed in the micro-batch it has in the whole data set's order.
pub fn precompute_reference<M: PolicyModel>(
    model: &M,
    batches: impl Iterator<Item = MicroBatch>,
    world: &dyn World,
    dealt: Dealt,
    with_kl: bool,
    label: &str,
) -> Result<ReferenceLogps> {
    // Per sample: target, KL.
    let mut slots = SampleSlots::new(dealt.samples, 2);
    let rank = world.shard().rank;
    for (index, batch) in batches.enumerate() {
        let kl_batch = batch.kl.as_ref().filter(|_| with_kl);
        let (target_logps, kl_logps) =
            target_and_kl(model, &batch.target, kl_batch, AdapterChoice::Reference)?;
        let targets = target_logps.logps.to_vec1::<f32>()?;
        let kl = kl_logps.map(|k| k.logps.to_vec1::<f32>()).transpose()?;
        let kept = dealt.kept_rows(index, rank, batch.indices.len());
        for (row, &i) in batch.indices.iter().enumerate().take(kept) {
            let kl = kl.as_ref().map_or(0.0, |kl| kl[row] as f64);
            slots.fill(i, &[targets[row] as f64, kl]);
        }
    }
    let slots = slots
        .gathered(world)?
        .into_iter()
        .collect::<Option<Vec<Vec<f64>>>>()
        .with_context(|| format!("reference precompute missed samples ({label})"))?;
    // Exact: each slot is one rank's f32 plus zeros.
    let column = |k: usize| {
        slots
            .iter()
            .map(|slot| slot[k] as f32)
            .collect::<Vec<f32>>()
    };
    Ok(ReferenceLogps {
        targets: column(0),
        kl: with_kl.then(|| column(1)),
    })
}
