//! Batches for the forward pass: right-padded sequences, KL pairing, batch order.
//!
//! KL pairing is TRL's `add_kl_completion_ids`: after dropping, in dataset order, the completions are rotated by one
//! inside each chunk of `per_device_train_batch_size` samples (the eval set is chunked by the *train* batch size
//! too): sample i takes the completion of sample i-1, the first of a chunk the chunk's last. The last chunk may be
//! shorter; one of a single sample pairs the sample with its own completion, as TRL does.
//!
//! Order: [`BatchOrder::Sequential`] takes micro-batches in dataset order: TRL's `train_sampling_strategy =
//! "sequential"`, the order of the parity fixtures. (TRL 1.16 forced it whenever the loss had a KL term only on
//! transformers < 5.2; on 5.17 its default is "random", torch's generator, which no other program reproduces.)
//! [`BatchOrder::Shuffled`] permutes the samples anew each epoch from the seed and rotates the completions within
//! each shuffled micro-batch, so the KL sequences still pair every prompt with a completion of its own micro-batch.
//! With several processes, each trains on its [`Shard`] of every epoch, as accelerate deals batches.
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::tokenize::TokenizedSample;

/// Right-padded token sequences for one forward pass.
///
/// Row `r` holds `lengths[r]` real tokens followed by `pad_id`; its completion (the tokens whose log-probs are
/// scored) is `input_ids[r * width + completion_starts[r] .. r * width + lengths[r]]`, each token predicted from the
/// logits one position earlier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceBatch {
    /// `rows × width` token ids, row-major.
    pub input_ids: Vec<u32>,
    pub rows: usize,
    pub width: usize,
    pub lengths: Vec<usize>,
    pub completion_starts: Vec<usize>,
    pub pad_id: u32,
}

impl SequenceBatch {
    /// TRL's `DataCollatorForUnpairedPreference`: each row is `prompt ++ completion` cut to `max_length` from the
    /// right, then right-padded with `pad_id` to the longest row.
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = (&'a [u32], &'a [u32])>,
        max_length: Option<usize>,
        pad_id: u32,
    ) -> Self {
        let sequences: Vec<(Vec<u32>, usize)> = rows
            .into_iter()
            .map(|(prompt, completion)| {
                let mut ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
                if let Some(max_length) = max_length {
                    ids.truncate(max_length);
                }
                let completion_start = prompt.len().min(ids.len());
                (ids, completion_start)
            })
            .collect();
        let width = sequences
            .iter()
            .map(|(ids, _)| ids.len())
            .max()
            .unwrap_or(0);
        let mut input_ids = Vec::with_capacity(sequences.len() * width);
        for (ids, _) in &sequences {
            input_ids.extend_from_slice(ids);
            input_ids.resize(input_ids.len() + width - ids.len(), pad_id);
        }
        Self {
            input_ids,
            rows: sequences.len(),
            width,
            lengths: sequences.iter().map(|(ids, _)| ids.len()).collect(),
            completion_starts: sequences.iter().map(|(_, start)| *start).collect(),
            pad_id,
        }
    }

    /// The real (unpadded) tokens of row `r`.
    pub fn row(&self, r: usize) -> &[u32] {
        &self.input_ids[r * self.width..r * self.width + self.lengths[r]]
    }

    /// The scored tokens of row `r`.
    pub fn completion(&self, r: usize) -> &[u32] {
        &self.input_ids
            [r * self.width + self.completion_starts[r]..r * self.width + self.lengths[r]]
    }

    /// Real tokens over all rows: the attention-mask sum TRL adds to its `num_tokens` metric.
    pub fn num_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }
}

/// For each sample, the index of the sample whose completion forms its KL sequence: TRL's rotation by one within
/// each chunk of `chunk_size` consecutive samples.
pub fn kl_partners(num_samples: usize, chunk_size: usize) -> Vec<usize> {
    let chunk_size = chunk_size.max(1);
    (0..num_samples)
        .map(|i| {
            let chunk_start = i - i % chunk_size;
            let chunk_len = chunk_size.min(num_samples - chunk_start);
            if i == chunk_start {
                chunk_start + chunk_len - 1
            } else {
                i - 1
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOrder {
    /// Dataset order every epoch (TRL's default, which its KL pairing relies on).
    Sequential,
    /// A new permutation each epoch, from `seed` and the epoch number.
    Shuffled { seed: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlPairing {
    /// No KL sequences (loss_type apo_zero_unpaired).
    Off,
    /// Rotate completions within chunks of `chunk_size` (= per_device_train_batch_size) in dataset order, or within
    /// each micro-batch when shuffled.
    Rotate { chunk_size: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Samples per micro-batch (per_device_train_batch_size, or per_device_eval_batch_size for the eval set).
    pub batch_size: usize,
    pub order: BatchOrder,
    pub kl: KlPairing,
    pub max_length: Option<usize>,
    pub pad_id: u32,
}

/// The part of every epoch one process trains on when N processes train together: accelerate's
/// `BatchSamplerShard` with its defaults (`split_batches = False`, `even_batches = True`, `drop_last = False`), as
/// `accelerate launch` / `torchrun` give TRL. The epoch's micro-batches are dealt in turn, micro-batch k to rank
/// k mod N; the last one, when short, is completed with the epoch's first samples, and more micro-batches made of
/// the epoch's first samples (cycling on) follow until every rank has the same count. With one process nothing is
/// dealt: the micro-batches stay as they are, the last one short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world_size: usize,
}

impl Shard {
    /// One process training alone.
    pub const WHOLE: Shard = Shard {
        rank: 0,
        world_size: 1,
    };

    /// The micro-batches (sample indices) of `order`, cut into `batch_size`, that this rank trains on, in order.
    pub fn deal(&self, order: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
        let batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
        let (rank, n) = (self.rank, self.world_size);
        if n == 1 || batches.is_empty() {
            return batches;
        }
        // accelerate's `_iter_with_no_split`, step for step.
        let mut dealt = Vec::new();
        let mut first_samples: Vec<usize> = batches.iter().take(n).flatten().copied().collect();
        let mut mine: Option<&Vec<usize>> = None;
        for (i, batch) in batches.iter().enumerate() {
            if i % n == rank {
                mine = Some(batch);
            }
            if i % n == n - 1 && batch.len() == batch_size {
                dealt.extend(mine.take().cloned());
            }
        }
        dealt.extend(mine.filter(|b| b.len() == batch_size).cloned());
        while first_samples.len() < n * batch_size {
            first_samples.extend_from_within(..);
        }
        let last = batches.last().expect("not empty");
        let (mut index, mut batch) = if last.len() == batch_size {
            (batches.len(), Vec::new())
        } else {
            (batches.len() - 1, last.clone())
        };
        let mut cycle = 0;
        while index % n != 0 || !batch.is_empty() {
            let end = cycle + batch_size - batch.len();
            batch.extend_from_slice(&first_samples[cycle..end]);
            if index % n == rank {
                dealt.push(std::mem::take(&mut batch));
            }
            (cycle, batch, index) = (end, Vec::new(), index + 1);
        }
        dealt
    }
}

/// One micro-batch: which samples, and the sequences to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Indices into the tokenized dataset.
    pub indices: Vec<usize>,
    pub labels: Vec<bool>,
    pub pairs: Vec<Option<u64>>,
    /// prompt ++ completion of each sample.
    pub target: SequenceBatch,
    /// prompt ++ KL partner's completion of each sample; `None` without a KL term.
    pub kl: Option<SequenceBatch>,
    /// Real tokens of `target` (what TRL adds to `num_tokens`).
    pub num_tokens: usize,
}

/// The micro-batches of one tokenized dataset, epoch by epoch.
#[derive(Debug, Clone)]
pub struct MicroBatches<'a> {
    samples: &'a [TokenizedSample],
    config: BatchConfig,
    /// Dataset-order KL partners (TRL's chunked rotation), used when sequential.
    kl_partners: Vec<usize>,
}

/// Why `per_device_train_batch_size = 1` is refused when the loss has a KL term.
pub const SINGLE_SAMPLE_KL_MESSAGE: &str = "per_device_train_batch_size = 1 cannot be used with loss_type \"kto\": \
the KL term pairs each prompt with the completion of another sample of its micro-batch, and a micro-batch of one \
sample has only its own completion, so the KL term would equal the implied reward. Use \
per_device_train_batch_size >= 2 (gradient_accumulation_steps keeps the effective batch size), or loss_type \
\"apo_zero_unpaired\", which has no KL term";

impl<'a> MicroBatches<'a> {
    pub fn new(samples: &'a [TokenizedSample], config: BatchConfig) -> Result<Self> {
        if config.batch_size == 0 {
            bail!("the batch size must be at least 1");
        }
        let kl_partners = match config.kl {
            KlPairing::Off => Vec::new(),
            KlPairing::Rotate { chunk_size } => {
                let shuffled_single =
                    matches!(config.order, BatchOrder::Shuffled { .. }) && config.batch_size == 1;
                if chunk_size <= 1 || shuffled_single {
                    bail!(SINGLE_SAMPLE_KL_MESSAGE);
                }
                kl_partners(samples.len(), chunk_size)
            }
        };
        Ok(Self {
            samples,
            config,
            kl_partners,
        })
    }

    /// Micro-batches per epoch (the last may be smaller).
    pub fn len(&self) -> usize {
        self.samples.len().div_ceil(self.config.batch_size)
    }

    /// Samples of an epoch.
    pub fn num_samples(&self) -> usize {
        self.samples.len()
    }

    /// Samples per micro-batch (the last of an epoch may hold fewer).
    pub fn batch_size(&self) -> usize {
        self.config.batch_size
    }

    /// Micro-batches per epoch that `shard`'s rank trains on (the same for every rank).
    pub fn len_of(&self, shard: Shard) -> usize {
        self.len().div_ceil(shard.world_size)
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The sample order of an epoch (epochs count from 0).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        if let BatchOrder::Shuffled { seed } = self.config.order {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(epoch);
            order.shuffle(&mut rng);
        }
        order
    }

    /// All micro-batches of an epoch, in order.
    pub fn epoch(&self, epoch: u64) -> impl Iterator<Item = MicroBatch> + '_ {
        self.epoch_of(epoch, Shard::WHOLE)
    }

    /// The micro-batches of an epoch that `shard`'s rank trains on, in order.
    pub fn epoch_of(&self, epoch: u64, shard: Shard) -> impl Iterator<Item = MicroBatch> + '_ {
        let dealt = shard.deal(&self.epoch_order(epoch), self.config.batch_size);
        dealt.into_iter().map(move |indices| self.build(indices))
    }

    /// Micro-batch `index` of an epoch (for resuming mid-epoch).
    pub fn batch(&self, epoch: u64, index: usize) -> Option<MicroBatch> {
        let order = self.epoch_order(epoch);
        let chunk = order.chunks(self.config.batch_size).nth(index)?;
        Some(self.build(chunk.to_vec()))
    }

    fn build(&self, indices: Vec<usize>) -> MicroBatch {
        let samples: Vec<&TokenizedSample> = indices.iter().map(|&i| &self.samples[i]).collect();
        let target = SequenceBatch::from_rows(
            samples
                .iter()
                .map(|s| (s.prompt_ids.as_slice(), s.completion_ids.as_slice())),
            self.config.max_length,
            self.config.pad_id,
        );
        let kl = match self.config.kl {
            KlPairing::Off => None,
            KlPairing::Rotate { .. } => {
                let partners: Vec<usize> = match self.config.order {
                    BatchOrder::Sequential => {
                        indices.iter().map(|&i| self.kl_partners[i]).collect()
                    }
                    BatchOrder::Shuffled { .. } => {
                        let n = indices.len();
                        (0..n).map(|j| indices[(j + n - 1) % n]).collect()
                    }
                };
                Some(SequenceBatch::from_rows(
                    samples.iter().zip(&partners).map(|(s, &partner)| {
                        (
                            s.prompt_ids.as_slice(),
                            self.samples[partner].completion_ids.as_slice(),
                        )
                    }),
                    self.config.max_length,
                    self.config.pad_id,
                ))
            }
        };
        MicroBatch {
            labels: samples.iter().map(|s| s.label).collect(),
            pairs: samples.iter().map(|s| s.pair).collect(),
            num_tokens: target.num_tokens(),
            indices,
            target,
            kl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prompt: &[u32], completion: &[u32], label: bool) -> TokenizedSample {
        TokenizedSample {
            prompt_ids: prompt.to_vec(),
            completion_ids: completion.to_vec(),
            label,
            pair: None,
        }
    }

    /// Sample i has prompt [10 + i] and completion [100 + i].
    fn numbered(n: usize) -> Vec<TokenizedSample> {
        (0..n)
            .map(|i| sample(&[10 + i as u32], &[100 + i as u32], i % 2 == 0))
            .collect()
    }

    fn config(batch_size: usize, order: BatchOrder, kl: KlPairing) -> BatchConfig {
        BatchConfig {
            batch_size,
            order,
            kl,
            max_length: None,
            pad_id: 0,
        }
    }

    #[test]
    fn collates_like_trl() {
        // The example of DataCollatorForUnpairedPreference's docstring.
        let batch = SequenceBatch::from_rows(
            [(&[1, 2, 3][..], &[4, 5][..]), (&[7, 8][..], &[9][..])],
            None,
            0,
        );
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 5, 7, 8, 9, 0, 0]);
        assert_eq!((batch.rows, batch.width), (2, 5));
        assert_eq!(batch.lengths, vec![5, 3]);
        assert_eq!(batch.completion_starts, vec![3, 2]);
        assert_eq!(batch.completion(0), &[4, 5]);
        assert_eq!(batch.num_tokens(), 8);
    }

    #[test]
    fn max_length_cuts_from_the_right() {
        let batch = SequenceBatch::from_rows(
            [(&[1, 2, 3][..], &[4, 5, 6][..]), (&[7][..], &[8][..])],
            Some(4),
            9,
        );
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 7, 8, 9, 9]);
        assert_eq!(batch.completion(0), &[4]);
        assert_eq!(batch.lengths, vec![4, 2]);
    }

    /// accelerate's own deal (`scripts/make-accelerate-shard-fixture.py`) for short last batches, short last
    /// groups, fewer samples than one global batch and up to four processes.
    #[test]
    fn shards_deal_as_accelerate_does() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/accelerate-shards/cases.json"
        ))
        .unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 8);
        for case in cases {
            let field = |key: &str| case[key].as_u64().unwrap() as usize;
            let (samples, batch_size, world_size) =
                (field("samples"), field("batch_size"), field("processes"));
            let order: Vec<usize> = (0..samples).collect();
            let tokenized = numbered(samples);
            let expected: Vec<Vec<Vec<usize>>> =
                serde_json::from_value(case["batches_of_rank"].clone()).unwrap();
            for (rank, expected) in expected.iter().enumerate() {
                let shard = Shard { rank, world_size };
                assert_eq!(
                    &shard.deal(&order, batch_size),
                    expected,
                    "{samples} samples, batch {batch_size}, rank {rank} of {world_size}"
                );
                let batches = MicroBatches::new(
                    &tokenized,
                    config(batch_size, BatchOrder::Sequential, KlPairing::Off),
                )
                .unwrap();
                assert_eq!(batches.len_of(shard), expected.len());
            }
        }
        // One process: nothing dealt, the last batch stays short.
        assert_eq!(
            Shard::WHOLE.deal(&[0, 1, 2, 3, 4], 2),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
    }

    #[test]
    fn kl_partners_rotate_within_chunks() {
        assert_eq!(kl_partners(6, 2), vec![1, 0, 3, 2, 5, 4]);
        assert_eq!(kl_partners(7, 3), vec![2, 0, 1, 5, 3, 4, 6]);
        assert_eq!(kl_partners(10, 4), vec![3, 0, 1, 2, 7, 4, 5, 6, 9, 8]);
    }

    #[test]
    fn sequential_kl_batches_for_sizes_2_3_4() {
        let samples = numbered(6);
        for (size, expected) in [
            (2, vec![vec![101, 100], vec![103, 102], vec![105, 104]]),
            (3, vec![vec![102, 100, 101], vec![105, 103, 104]]),
            (4, vec![vec![103, 100, 101, 102], vec![105, 104]]),
        ] {
            let batches = MicroBatches::new(
                &samples,
                config(
                    size,
                    BatchOrder::Sequential,
                    KlPairing::Rotate { chunk_size: size },
                ),
            )
            .unwrap();
            let kl_completions: Vec<Vec<u32>> = batches
                .epoch(0)
                .map(|b| {
                    let kl = b.kl.unwrap();
                    (0..kl.rows)
                        .flat_map(|r| kl.completion(r).to_vec())
                        .collect()
                })
                .collect();
            assert_eq!(kl_completions, expected, "batch size {size}");
            // The KL rows keep their own prompts.
            let first = batches.batch(0, 0).unwrap();
            assert_eq!(first.kl.unwrap().row(0)[0], 10);
        }
    }

    #[test]
    fn eval_batches_keep_the_train_chunk_pairing() {
        let samples = numbered(4);
        let batches = MicroBatches::new(
            &samples,
            config(
                3,
                BatchOrder::Sequential,
                KlPairing::Rotate { chunk_size: 2 },
            ),
        )
        .unwrap();
        let kl: Vec<u32> = batches
            .epoch(0)
            .flat_map(|b| {
                b.kl.unwrap()
                    .input_ids
                    .chunks(2)
                    .map(|r| r[1])
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(kl, vec![101, 100, 103, 102]);
    }

    #[test]
    fn shuffled_epochs_differ_are_seeded_and_rotate_within_batches() {
        let samples = numbered(12);
        let shuffled = config(
            4,
            BatchOrder::Shuffled { seed: 7 },
            KlPairing::Rotate { chunk_size: 4 },
        );
        let batches = MicroBatches::new(&samples, shuffled).unwrap();
        let epoch0 = batches.epoch_order(0);
        assert_ne!(epoch0, (0..12).collect::<Vec<_>>());
        assert_ne!(epoch0, batches.epoch_order(1));
        assert_eq!(
            epoch0,
            MicroBatches::new(&samples, shuffled)
                .unwrap()
                .epoch_order(0)
        );
        let mut sorted = epoch0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>());
        for batch in batches.epoch(0) {
            let kl = batch.kl.unwrap();
            let n = batch.indices.len();
            for j in 0..n {
                let partner = batch.indices[(j + n - 1) % n];
                assert_eq!(kl.completion(j), &[100 + partner as u32]);
                assert_eq!(kl.row(j)[0], 10 + batch.indices[j] as u32);
            }
        }
        assert_eq!(
            batches.batch(1, 2).unwrap(),
            batches.epoch(1).nth(2).unwrap()
        );
    }

    #[test]
    fn no_kl_without_kl_term() {
        let samples = numbered(3);
        let batches =
            MicroBatches::new(&samples, config(1, BatchOrder::Sequential, KlPairing::Off)).unwrap();
        assert_eq!(batches.len(), 3);
        let all: Vec<MicroBatch> = batches.epoch(0).collect();
        assert!(all.iter().all(|b| b.kl.is_none()));
        assert_eq!(all[1].labels, vec![false]);
    }

    #[test]
    fn batch_size_one_with_kl_is_refused() {
        let samples = numbered(3);
        for config in [
            config(
                1,
                BatchOrder::Sequential,
                KlPairing::Rotate { chunk_size: 1 },
            ),
            config(
                1,
                BatchOrder::Shuffled { seed: 0 },
                KlPairing::Rotate { chunk_size: 1 },
            ),
        ] {
            let error = MicroBatches::new(&samples, config).unwrap_err().to_string();
            assert!(error.contains("per_device_train_batch_size = 1"), "{error}");
            assert!(
                error.contains("KL term would equal the implied reward"),
                "{error}"
            );
        }
    }
}
