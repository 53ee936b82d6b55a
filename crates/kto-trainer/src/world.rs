//! The processes that train one run together (data parallelism): how many, which one this is, and the one
//! collective the step needs, a sum over ranks. A run alone is [`Alone`]; `mpirun -n N kto train` gives an MPI
//! world (`kto-cli`'s `mpi` feature). Every rank calls the same collectives in the same order.
//!
//! accelerate's `gather_for_metrics`, which TRL uses for the KL reference point and every logged metric (and
//! transformers for the evaluation loss), drops the values of the padding that `even_batches` added to a data set's
//! last global batch: [`Dealt`] says what it keeps, [`Counted`] which ranks a sum counts.

use anyhow::Result;
use candle_core::Tensor;
use kto_data::batch::{MicroBatches, Shard};

/// Which ranks' values a reduction counts: all, or the first `n` (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    All,
    First(usize),
}

impl Counted {
    /// How many of `world_size` ranks are counted.
    pub fn ranks(self, world_size: usize) -> usize {
        match self {
            Counted::All => world_size,
            Counted::First(n) => n.min(world_size),
        }
    }
}

/// A data set of `samples` dealt to `world_size` ranks in micro-batches of `batch_size` ([`Shard::deal`]),
/// `batches_per_rank` each: what `gather_for_metrics` keeps of the values gathered at each micro-batch. At the
/// data loader's last batch it keeps the first `remainder = samples mod (batch_size · world_size)` gathered
/// elements (when not 0): of one value per rank, the first `remainder` ranks'; of one value per sample, the first
/// `remainder` samples in rank order, which are the data set's last real samples (the rest is `even_batches`'
/// padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dealt {
    pub samples: usize,
    pub batch_size: usize,
    pub world_size: usize,
    pub batches_per_rank: usize,
}

impl Dealt {
    /// How `batches`' epochs are dealt to `shard`'s world.
    pub fn of(batches: &MicroBatches, shard: Shard) -> Self {
        Dealt {
            samples: batches.num_samples(),
            batch_size: batches.batch_size(),
            world_size: shard.world_size,
            batches_per_rank: batches.len_of(shard),
        }
    }

    /// The remainder `gather_for_metrics` truncates to at micro-batch `index` (0-based), if it truncates there.
    fn remainder_at(&self, index: usize) -> Option<usize> {
        let remainder = self.samples % (self.batch_size * self.world_size);
        (index + 1 == self.batches_per_rank && remainder > 0).then_some(remainder)
    }

    /// Which ranks' per-rank values count at micro-batch `index`.
    pub fn counted(&self, index: usize) -> Counted {
        self.remainder_at(index)
            .map_or(Counted::All, Counted::First)
    }

    /// How many of the first rows of `rank`'s micro-batch `index` (of `rows`) count as samples.
    pub fn kept_rows(&self, index: usize, rank: usize, rows: usize) -> usize {
        match self.remainder_at(index) {
            Some(remainder) => remainder.saturating_sub(rank * self.batch_size).min(rows),
            None => rows,
        }
    }
}

/// Where a micro-batch's values are gathered: the world and which of its ranks count at this micro-batch.
#[derive(Clone, Copy)]
pub struct Gather<'a> {
    pub world: &'a dyn World,
    pub counted: Counted,
}

impl Gather<'static> {
    /// A process alone: nothing to gather.
    pub fn alone() -> Self {
        Gather {
            world: &Alone,
            counted: Counted::All,
        }
    }
}

/// Per-sample values gathered over the ranks by sample index: each rank fills the samples it kept, and one sum
/// gives every rank all of them, exactly (each slot is one rank's values plus zeros).
pub struct SampleSlots {
    /// Values per sample, after the slot's "filled" flag.
    width: usize,
    slots: Vec<f64>,
}

impl SampleSlots {
    pub fn new(samples: usize, width: usize) -> Self {
        Self {
            width,
            slots: vec![0.0; samples * (width + 1)],
        }
    }

    /// Sample `index`'s `values` (`width` of them), from this rank.
    pub fn fill(&mut self, index: usize, values: &[f64]) {
        let slot = &mut self.slots[index * (self.width + 1)..(index + 1) * (self.width + 1)];
        slot[0] = 1.0;
        slot[1..].copy_from_slice(values);
    }

    /// Every sample's values, summed over the ranks; None for a sample no rank filled. A sample filled by several
    /// ranks is an error.
    pub fn gathered(mut self, world: &dyn World) -> Result<Vec<Option<Vec<f64>>>> {
        world.sum_f64(&mut self.slots, Counted::All)?;
        self.slots
            .chunks_exact(self.width + 1)
            .enumerate()
            .map(|(index, slot)| match slot[0] {
                0.0 => Ok(None),
                1.0 => Ok(Some(slot[1..].to_vec())),
                ranks => anyhow::bail!("sample {index} was gathered from {ranks} ranks"),
            })
            .collect()
    }
}

pub trait World {
    /// This process's rank and the number of ranks.
    fn shard(&self) -> Shard;

    /// Replaces `values` by their element-wise sum over every rank.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;

    /// The element-wise sum over every rank of a flat f32 tensor, on its device: through host memory and
    /// [`World::sum_f32`] unless the world has a collective on the device (NCCL).
    fn sum_f32_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        let mut values = flat.to_vec1::<f32>()?;
        self.sum_f32(&mut values)?;
        Ok(Tensor::from_vec(values, flat.shape(), flat.device())?)
    }

    /// Replaces `values` by their element-wise sum over the ranks `counted` names (the others contribute nothing).
    fn sum_f64(&self, values: &mut [f64], counted: Counted) -> Result<()>;

    /// Replaces `bytes` on every rank by rank 0's.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.sum_f64(&mut [0.0], Counted::All)
    }

    fn is_main(&self) -> bool {
        self.shard().rank == 0
    }

    fn size(&self) -> usize {
        self.shard().world_size
    }

    /// The mean over the counted ranks of one value per rank.
    fn mean(&self, value: f64, counted: Counted) -> Result<f64> {
        let mut sum = [value];
        self.sum_f64(&mut sum, counted)?;
        Ok(sum[0] / counted.ranks(self.size()) as f64)
    }
}

/// A run of one process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Alone;

impl World for Alone {
    fn shard(&self) -> Shard {
        Shard::WHOLE
    }

    fn sum_f32(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn sum_f64(&self, _values: &mut [f64], _counted: Counted) -> Result<()> {
        Ok(())
    }

    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
}

/// How many processes the launcher that started this one says it started, if one did: Open MPI's `mpirun`
/// (`OMPI_COMM_WORLD_SIZE`), MPICH's / Intel MPI's Hydra (`PMI_SIZE`), Slurm's `srun` (`SLURM_STEP_NUM_TASKS`).
pub fn launched_processes() -> Option<(usize, &'static str)> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .into_iter()
        .find_map(|var| Some((std::env::var(var).ok()?.trim().parse().ok()?, var)))
}

/// A world of MPI processes (`mpirun -n N kto train`): rsmpi over the system's MPI library.
#[cfg(feature = "mpi")]
pub mod mpi_world {
    use anyhow::{anyhow, Result};
    use kto_data::batch::Shard;
    use mpi::collective::SystemOperation;
    use mpi::topology::Communicator;
    use mpi::traits::{CommunicatorCollectives, Root};

    use super::{Counted, World};

    pub struct MpiWorld {
        world: mpi::topology::SimpleCommunicator,
        shard: Shard,
        // Finalizes MPI when dropped, after the communicator.
        _universe: mpi::environment::Universe,
    }

    impl MpiWorld {
        /// Joins the launcher's world (initializes MPI once per process).
        pub fn join() -> Result<Self> {
            let universe = mpi::initialize()
                .ok_or_else(|| anyhow!("MPI was already initialized in this process"))?;
            let world = universe.world();
            let shard = Shard {
                rank: world.rank() as usize,
                world_size: world.size() as usize,
            };
            Ok(Self {
                world,
                shard,
                _universe: universe,
            })
        }
    }

    impl World for MpiWorld {
        fn shard(&self) -> Shard {
            self.shard
        }

        fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
            let send = values.to_vec();
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::sum());
            Ok(())
        }

        fn sum_f64(&self, values: &mut [f64], counted: Counted) -> Result<()> {
            let mut send = values.to_vec();
            if self.shard.rank >= counted.ranks(self.shard.world_size) {
                send.fill(0.0);
            }
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::sum());
            Ok(())
        }

        fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
            let root = self.world.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            // Open MPI refuses an empty slice's dangling pointer even for a count of 0.
            if len > 0 {
                root.broadcast_into(&mut bytes[..]);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_for_metrics_keeps_the_first_remainder_elements_at_the_last_batch() {
        let dealt = |samples, batch_size, world_size, batches_per_rank| Dealt {
            samples,
            batch_size,
            world_size,
            batches_per_rank,
        };
        // 7 samples in global batches of 6 (3 per rank, 2 ranks): 2 batches per rank, remainder 1.
        let seven = dealt(7, 3, 2, 2);
        assert_eq!(seven.counted(0), Counted::All);
        assert_eq!(seven.counted(1), Counted::First(1));
        assert_eq!(Counted::First(1).ranks(2), 1);
        // Of the last batch's rows, rank 0 keeps its first (sample 6), rank 1 none (padding); earlier batches all.
        assert_eq!([seven.kept_rows(1, 0, 3), seven.kept_rows(1, 1, 3)], [1, 0]);
        assert_eq!(seven.kept_rows(0, 1, 3), 3);
        // 29 samples, 4 per rank: remainder 5 counts both ranks' values, rank 0's 4 rows and rank 1's first.
        let wrap = dealt(29, 4, 2, 4);
        assert_eq!(wrap.counted(3).ranks(2), 2);
        assert_eq!([wrap.kept_rows(3, 0, 4), wrap.kept_rows(3, 1, 4)], [4, 1]);
        assert_eq!(dealt(12, 2, 2, 3).counted(2), Counted::All);
        // Alone, the last batch is short and keeps all its rows.
        let alone = dealt(7, 3, 1, 3);
        assert_eq!(
            (alone.counted(2).ranks(1), alone.kept_rows(2, 0, 1)),
            (1, 1)
        );
        assert_eq!(Alone.mean(2.5, Counted::All).unwrap(), 2.5);
    }
}
