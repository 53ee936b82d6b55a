//! How many optimizer steps and epochs a run takes, and which micro-batches make up each step, as transformers
//! 5.17's `Trainer.set_initial_training_values` and `_run_epoch` compute them.
//!
//! - an epoch is `ceil(samples / batch_size)` micro-batches (the last, partial batch is kept: `drop_last = false`);
//!   with N processes each trains on `ceil(that / N)` of them (accelerate's `even_batches`, see
//!   `kto_data::batch::Shard`), and everything below counts one process's micro-batches;
//! - an epoch has `max(ceil(micro_batches / accumulation), 1)` optimizer steps; its last step accumulates the
//!   remaining `micro_batches % accumulation` micro-batches (or a full group when that is 0), and the loss of each
//!   micro-batch is divided by the size of its own group (`current_gradient_accumulation_steps`);
//! - `max_steps > 0` wins over `num_train_epochs`; otherwise `max_steps = ceil(num_train_epochs * steps_per_epoch)`,
//!   and training stops as soon as `global_step >= max_steps`, possibly inside an epoch;
//! - the logged `epoch` after a step is `epoch_index + micro_batches_done_in_epoch / micro_batches_per_epoch`.

use anyhow::{ensure, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingPlan {
    pub micro_batches_per_epoch: usize,
    pub gradient_accumulation_steps: usize,
    pub steps_per_epoch: usize,
    pub max_steps: usize,
    pub num_epochs: usize,
}

impl TrainingPlan {
    /// The plan of a process training alone.
    pub fn new(
        num_samples: usize,
        batch_size: usize,
        gradient_accumulation_steps: usize,
        max_steps: i64,
        num_train_epochs: f64,
    ) -> Result<Self> {
        Self::for_world(
            num_samples,
            batch_size,
            1,
            gradient_accumulation_steps,
            max_steps,
            num_train_epochs,
        )
    }

    /// The plan of each of `world_size` processes training together.
    pub fn for_world(
        num_samples: usize,
        batch_size: usize,
        world_size: usize,
        gradient_accumulation_steps: usize,
        max_steps: i64,
        num_train_epochs: f64,
    ) -> Result<Self> {
        ensure!(
            num_samples > 0,
            "the training set has no samples left after tokenization"
        );
        ensure!(
            batch_size > 0 && gradient_accumulation_steps > 0,
            "batch size and accumulation must be >= 1"
        );
        ensure!(world_size > 0, "a world of no processes");
        let micro_batches_per_epoch = num_samples.div_ceil(batch_size).div_ceil(world_size);
        let steps_per_epoch = micro_batches_per_epoch
            .div_ceil(gradient_accumulation_steps)
            .max(1);
        let (max_steps, num_epochs) = if max_steps > 0 {
            let max_steps = max_steps as usize;
            (max_steps, max_steps.div_ceil(steps_per_epoch))
        } else {
            (
                (num_train_epochs * steps_per_epoch as f64).ceil() as usize,
                num_train_epochs.ceil() as usize,
            )
        };
        Ok(Self {
            micro_batches_per_epoch,
            gradient_accumulation_steps,
            steps_per_epoch,
            max_steps,
            num_epochs,
        })
    }

    /// The micro-batch range (indices into the epoch's batches) that optimizer step `step_in_epoch` accumulates.
    pub fn micro_batches_of_step(&self, step_in_epoch: usize) -> std::ops::Range<usize> {
        let start = step_in_epoch * self.gradient_accumulation_steps;
        let end = (start + self.gradient_accumulation_steps).min(self.micro_batches_per_epoch);
        start..end
    }

    /// Where global step `global_step` (0-based count of steps already taken) starts: (epoch, step in that epoch).
    pub fn position_of_step(&self, global_step: usize) -> (usize, usize) {
        (
            global_step / self.steps_per_epoch,
            global_step % self.steps_per_epoch,
        )
    }

    /// transformers' `state.epoch` after a step that ended with micro-batch `last_micro_batch` (0-based) of epoch
    /// `epoch_index`.
    pub fn epoch_progress(&self, epoch_index: usize, last_micro_batch: usize) -> f64 {
        epoch_index as f64 + (last_micro_batch + 1) as f64 / self.micro_batches_per_epoch as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_run_has_three_steps_per_epoch() -> Result<()> {
        let plan = TrainingPlan::new(12, 4, 1, 3, 3.0)?;
        assert_eq!(
            (plan.steps_per_epoch, plan.max_steps, plan.num_epochs),
            (3, 3, 1)
        );
        assert_eq!(plan.epoch_progress(0, 0), 1.0 / 3.0);
        assert_eq!(plan.epoch_progress(0, 2), 1.0);
        Ok(())
    }

    #[test]
    fn partial_last_batch_and_partial_accumulation() -> Result<()> {
        // 10 samples, batch 4 -> 3 micro-batches (4, 4, 2); accumulation 2 -> steps of 2 and 1 micro-batches.
        let plan = TrainingPlan::new(10, 4, 2, -1, 2.0)?;
        assert_eq!(plan.micro_batches_per_epoch, 3);
        assert_eq!(plan.steps_per_epoch, 2);
        assert_eq!(plan.max_steps, 4);
        assert_eq!(plan.num_epochs, 2);
        assert_eq!(plan.micro_batches_of_step(0), 0..2);
        assert_eq!(plan.micro_batches_of_step(1), 2..3);
        assert_eq!(plan.position_of_step(3), (1, 1));
        assert_eq!(plan.epoch_progress(1, 1), 1.0 + 2.0 / 3.0);
        Ok(())
    }

    #[test]
    fn fractional_epochs_and_max_steps() -> Result<()> {
        let plan = TrainingPlan::new(100, 10, 1, -1, 0.25)?;
        assert_eq!((plan.max_steps, plan.num_epochs), (3, 1));
        let plan = TrainingPlan::new(100, 10, 1, 25, 3.0)?;
        assert_eq!((plan.max_steps, plan.num_epochs), (25, 3));
        assert!(TrainingPlan::new(0, 10, 1, 25, 3.0).is_err());
        Ok(())
    }
}
