//! The processes that train one run together (data parallelism): how many, which one this is, and the one
//! collective the step needs, a sum over ranks. A run alone is [`Alone`]; `mpirun -n N kto train` gives an MPI
//! world (`kto-cli`'s `mpi` feature). Every rank calls the same collectives in the same order.
//!
//! accelerate's `gather_for_metrics`, which TRL uses for the KL reference point and every logged metric, drops the
//! values of the padding that `even_batches` added to a data set's last global batch; for a per-rank scalar that
//! means it keeps only the first `remainder` ranks' values at the data loader's last batch (remainder = samples mod
//! global batch, when not 0). [`Counted`] says which ranks a sum counts.

use anyhow::Result;
use kto_data::batch::Shard;

/// Which ranks' values a reduction counts: all, or the first `n` (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    All,
    First(usize),
}

impl Counted {
    /// What `gather_for_metrics` counts at micro-batch `index` (0-based) of a data loader of `batches` micro-batches
    /// per rank over `samples` samples in global batches of `global_batch`.
    pub fn at(index: usize, batches: usize, samples: usize, global_batch: usize) -> Counted {
        let remainder = samples % global_batch;
        if index + 1 == batches && remainder > 0 {
            Counted::First(remainder)
        } else {
            Counted::All
        }
    }

    /// How many of `world_size` ranks are counted.
    pub fn ranks(self, world_size: usize) -> usize {
        match self {
            Counted::All => world_size,
            Counted::First(n) => n.min(world_size),
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

pub trait World {
    /// This process's rank and the number of ranks.
    fn shard(&self) -> Shard;

    /// Replaces `values` by their element-wise sum over every rank.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;

    /// Replaces `values` by their element-wise sum over the ranks `counted` names (the others contribute nothing).
    fn sum_f64(&self, values: &mut [f64], counted: Counted) -> Result<()>;

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
    use mpi::traits::CommunicatorCollectives;

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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_for_metrics_counts_the_first_remainder_ranks_at_the_last_batch() {
        // 7 samples in global batches of 6 (3 per rank, 2 ranks): 2 batches per rank, remainder 1.
        assert_eq!(Counted::at(0, 2, 7, 6), Counted::All);
        assert_eq!(Counted::at(1, 2, 7, 6), Counted::First(1));
        assert_eq!(Counted::First(1).ranks(2), 1);
        // A remainder of at least the world size counts every rank.
        assert_eq!(Counted::at(4, 5, 29, 6).ranks(2), 2);
        assert_eq!(Counted::at(2, 3, 12, 4), Counted::All);
        assert_eq!(Alone.mean(2.5, Counted::All).unwrap(), 2.5);
    }
}
