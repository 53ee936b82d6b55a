//! Held-out evaluation figures that TRL does not report: reward accuracy, reward AUROC and pair accuracy.
//!
//! Each sample has an implied reward `r = β·(log π(y|x) − log π_ref(y|x))` and, through its evaluation batch, a
//! reference point `β·KL` (0 for apo_zero_unpaired). KTO's value is `σ(r − β·KL)` for a desirable sample and
//! `σ(β·KL − r)` for an undesirable one, so a sample is on the right side when `r − β·KL` is > 0 (desirable) or
//! < 0 (undesirable).

use std::collections::BTreeMap;

use anyhow::Result;
use kto_data::batch::MicroBatch;
use serde_json::{Map, Value};

use crate::loss::LossSettings;
use crate::metrics::{json_f64, MetricsAccumulator};
use crate::policy::{score_micro_batch, PolicyModel, Reference};
use crate::world::{Counted, Dealt, Gather, SampleSlots, World};

/// Evaluates the policy on `batches` (this rank's share of the held-out set, in dataset order, dealt as `dealt`
/// says): TRL's `eval_*` metrics (each averaged over batches, `eval_loss` weighted by batch size as transformers'
/// evaluation loop does) plus reward accuracy, AUROC and, when samples carry pair ids, pair accuracy. `train_tokens`
/// is the training token count TRL repeats as `eval_num_tokens`.
///
/// With several ranks every figure is over the whole set, gathered as accelerate's `gather_for_metrics` gathers
/// it: transformers repeats each rank's batch loss once per row, gathers, and drops `even_batches`' padding rows;
/// TRL's metric sums and the KL reference point go through [`Gather`]; the samples behind the extra figures are
/// gathered by index, each kept row from the rank that scored it.
pub fn evaluate_batches<M: PolicyModel>(
    model: &M,
    batches: impl Iterator<Item = MicroBatch>,
    world: &dyn World,
    dealt: Dealt,
    reference: Reference,
    settings: &LossSettings,
    train_tokens: u64,
) -> Result<Map<String, Value>> {
    let rank = world.shard().rank;
    let mut acc = MetricsAccumulator::default();
    let mut scored = ScoredSlots::new(dealt.samples);
    // Σ loss × kept rows and Σ kept rows.
    let mut loss = [0.0f64; 2];
    for (index, batch) in batches.enumerate() {
        let gather = Gather {
            world,
            counted: dealt.counted(index),
        };
        let out = score_micro_batch(model, &batch, reference, settings, false, gather)?;
        let kept = dealt.kept_rows(index, rank, batch.labels.len());
        loss[0] += out.loss.loss.to_scalar::<f32>()? as f64 * kept as f64;
        loss[1] += kept as f64;
        acc.add_eval_batch(&out.metrics);
        let reference_point = settings.beta * out.loss.kl as f64;
        for i in 0..kept {
            scored.fill(
                batch.indices[i],
                ScoredSample {
                    desirable: batch.labels[i],
                    reward: out.loss.rewards[i] as f64,
                    reference_point,
                    pair_id: batch.pairs[i],
                },
            );
        }
    }
    world.sum_f64(&mut loss, Counted::All)?;
    let scored = scored.gathered(world)?;
    let mut row = Map::new();
    row.insert(
        "eval_loss".into(),
        json_f64(if loss[1] > 0.0 {
            loss[0] / loss[1]
        } else {
            f64::NAN
        }),
    );
    row.extend(acc.take_eval_metrics(train_tokens));
    let figures = [
        ("eval_reward_accuracy", reward_accuracy(&scored)),
        ("eval_reward_auroc", reward_auroc(&scored)),
        ("eval_pair_accuracy", pair_accuracy(&scored)),
    ];
    for (name, value) in figures {
        if let Some(v) = value {
            row.insert(name.into(), json_f64(v));
        }
    }
    row.insert("eval_samples".into(), Value::from(scored.len()));
    Ok(row)
}

/// The scored samples of a data set by sample index, each filled by the rank that scored it.
struct ScoredSlots(SampleSlots);

impl ScoredSlots {
    fn new(samples: usize) -> Self {
        // Desirable, reward, reference point, pair id + 1 (0: none).
        Self(SampleSlots::new(samples, 4))
    }

    fn fill(&mut self, index: usize, sample: ScoredSample) {
        let pair = sample.pair_id.map_or(0.0, |id| {
            // Pair ids are row numbers of the data set, far below f64's exact integers.
            debug_assert!(id < 1 << 52);
            id as f64 + 1.0
        });
        self.0.fill(
            index,
            &[
                sample.desirable as u8 as f64,
                sample.reward,
                sample.reference_point,
                pair,
            ],
        );
    }

    fn gathered(self, world: &dyn World) -> Result<Vec<ScoredSample>> {
        Ok(self
            .0
            .gathered(world)?
            .into_iter()
            .flatten()
            .map(|slot| ScoredSample {
                desirable: slot[0] > 0.0,
                reward: slot[1],
                reference_point: slot[2],
                pair_id: (slot[3] > 0.0).then(|| slot[3] as u64 - 1),
            })
            .collect())
    }
}

/// One evaluated sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredSample {
    pub desirable: bool,
    /// Implied reward β·logratio.
    pub reward: f64,
    /// β·KL of the sample's evaluation batch (0 when the loss has no KL term).
    pub reference_point: f64,
    /// Samples from one preference pair share an id.
    pub pair_id: Option<u64>,
}

/// Fraction of samples on the right side of their reference point. `None` without samples.
pub fn reward_accuracy(samples: &[ScoredSample]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let right = samples
        .iter()
        .filter(|s| {
            let margin = s.reward - s.reference_point;
            if s.desirable {
                margin > 0.0
            } else {
                margin < 0.0
            }
        })
        .count();
    Some(right as f64 / samples.len() as f64)
}

/// AUROC of the implied reward as a score for "desirable": the probability that a random desirable sample has a
/// higher reward than a random undesirable one, ties counting half (Mann–Whitney U / (n₊·n₋)). `None` unless both
/// classes are present.
pub fn reward_auroc(samples: &[ScoredSample]) -> Option<f64> {
    let positives = samples.iter().filter(|s| s.desirable).count();
    let negatives = samples.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut sorted: Vec<(f64, bool)> = samples.iter().map(|s| (s.reward, s.desirable)).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Walk groups of equal scores: each positive beats every negative below the group and ties with the group's.
    let mut negatives_below = 0usize;
    let mut wins = 0.0f64;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let group_pos = sorted[i..j].iter().filter(|s| s.1).count();
        let group_neg = (j - i) - group_pos;
        wins += group_pos as f64 * (negatives_below as f64 + 0.5 * group_neg as f64);
        negatives_below += group_neg;
        i = j;
    }
    Some(wins / (positives as f64 * negatives as f64))
}

/// Fraction of (chosen, rejected) combinations inside each pair with `reward(chosen) > reward(rejected)`. Pairs
/// that lost a side (e.g. dropped for length) are skipped. `None` when no complete pair exists.
pub fn pair_accuracy(samples: &[ScoredSample]) -> Option<f64> {
    let mut pairs: BTreeMap<u64, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for s in samples {
        if let Some(id) = s.pair_id {
            let entry = pairs.entry(id).or_default();
            if s.desirable {
                entry.0.push(s.reward);
            } else {
                entry.1.push(s.reward);
            }
        }
    }
    let (mut right, mut total) = (0usize, 0usize);
    for (chosen, rejected) in pairs.values() {
        for c in chosen {
            for r in rejected {
                total += 1;
                if c > r {
                    right += 1;
                }
            }
        }
    }
    (total > 0).then(|| right as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(desirable: bool, reward: f64) -> ScoredSample {
        ScoredSample {
            desirable,
            reward,
            reference_point: 0.0,
            pair_id: None,
        }
    }

    #[test]
    fn accuracy_uses_the_reference_point() {
        let samples = [
            s(true, 0.3),
            s(true, -0.1),
            s(false, -0.2),
            s(false, 0.4),
            ScoredSample {
                desirable: true,
                reward: 0.3,
                reference_point: 0.5,
                pair_id: None,
            },
        ];
        assert_eq!(reward_accuracy(&samples), Some(2.0 / 5.0));
        assert_eq!(
            reward_accuracy(&[s(true, 0.0)]),
            Some(0.0),
            "zero margin is not on the right side"
        );
        assert_eq!(reward_accuracy(&[]), None);
    }

    #[test]
    fn auroc_hand_computed() {
        // positives 3, 1; negatives 2, 0: pairs (3>2, 3>0, 1<2, 1>0) = 3/4
        let samples = [s(true, 3.0), s(true, 1.0), s(false, 2.0), s(false, 0.0)];
        assert_eq!(reward_auroc(&samples), Some(0.75));
        // perfect separation and its reverse
        assert_eq!(reward_auroc(&[s(true, 2.0), s(false, 1.0)]), Some(1.0));
        assert_eq!(reward_auroc(&[s(true, 1.0), s(false, 2.0)]), Some(0.0));
        // ties count half: positive 1 ties negative 1, beats negative 0 -> (0.5 + 1) / 2
        assert_eq!(
            reward_auroc(&[s(true, 1.0), s(false, 1.0), s(false, 0.0)]),
            Some(0.75)
        );
        assert_eq!(reward_auroc(&[s(true, 1.0), s(true, 1.0)]), None);
    }

    #[test]
    fn pair_accuracy_hand_computed() {
        let p = |desirable, reward, id| ScoredSample {
            desirable,
            reward,
            reference_point: 0.0,
            pair_id: Some(id),
        };
        let samples = [
            p(true, 0.5, 1),
            p(false, 0.1, 1),
            p(true, -0.3, 2),
            p(false, 0.2, 2),
            p(true, 0.9, 3), // lost its rejected side: skipped
            s(false, 5.0),
        ];
        assert_eq!(pair_accuracy(&samples), Some(0.5));
        assert_eq!(pair_accuracy(&[s(true, 1.0)]), None);
        assert_eq!(
            pair_accuracy(&[p(true, 1.0, 7), p(false, 1.0, 7)]),
            Some(0.0),
            "a tie is not a win"
        );
    }
}
