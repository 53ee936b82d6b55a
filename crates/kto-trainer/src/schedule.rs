//! Learning-rate schedules as transformers 5.17's `get_scheduler` builds them (`optimization.py`), and the
//! learning rate the trainer logs for a step.
//!
//! transformers wraps a `LambdaLR`: the rate used by optimizer step `k` (0-based: the first step is `k = 0`) is
//! `learning_rate * lambda(k)`. In `_run_epoch` it reads `_get_learning_rate()` right after `optimizer.step()` and
//! *before* `lr_scheduler.step()`, so the logged `learning_rate` of global step `k + 1` is the rate that step used.
//! Note that transformers' `"constant"` schedule ignores `warmup_steps` (`get_constant_schedule` takes none);
//! `"constant_with_warmup"` honours it.

use crate::config::SchedulerType;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerType,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// `warmup` as in `TrainingArguments.get_warmup_steps`: `>= 1` is a step count, below 1 a ratio of the total
    /// steps, rounded up.
    pub fn new(kind: SchedulerType, learning_rate: f64, warmup: f64, total_steps: usize) -> Self {
        let warmup_steps = if warmup >= 1.0 {
            warmup as usize
        } else {
            (total_steps as f64 * warmup).ceil() as usize
        };
        Self {
            kind,
            learning_rate,
            warmup_steps,
            total_steps,
        }
    }

    /// The multiplier `lambda(step)` of transformers' `LambdaLR`.
    pub fn factor(&self, step: usize) -> f64 {
        let (step_f, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let warming_up = step < self.warmup_steps;
        let warmup_factor = step_f / warmup.max(1.0);
        match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if warming_up {
                    warmup_factor
                } else {
                    1.0
                }
            }
            SchedulerType::Linear => {
                if warming_up {
                    warmup_factor
                } else {
                    // float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps))
                    let remaining = self.total_steps as i64 - step as i64;
                    let span = (self.total_steps as i64 - self.warmup_steps as i64).max(1);
                    (remaining as f64 / span as f64).max(0.0)
                }
            }
            SchedulerType::Cosine => {
                if warming_up {
                    warmup_factor
                } else {
                    let num_cycles = 0.5;
                    let progress = (step_f - warmup) / (total - warmup).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos()))
                        .max(0.0)
                }
            }
        }
    }

    /// The learning rate used by the optimizer step with 0-based index `step`. torch's `LambdaLR` computes
    /// `base_lr * lambda(step)` in Python floats.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        self.learning_rate * self.factor(step)
    }

    /// The `learning_rate` transformers logs for global step `global_step` (1-based): the rate that step used.
    pub fn logged_learning_rate(&self, global_step: usize) -> f64 {
        self.learning_rate_at(global_step.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_with_warmup_matches_transformers() {
        // get_linear_schedule_with_warmup(num_warmup_steps=2, num_training_steps=10), base lr 1.0
        let s = Schedule::new(SchedulerType::Linear, 1.0, 2.0, 10);
        let got: Vec<f64> = (0..11).map(|k| s.learning_rate_at(k)).collect();
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{got:?}");
        }
        // The first logged step reports the rate step 1 used: 0 during warm-up.
        assert_eq!(s.logged_learning_rate(1), 0.0);
        assert_eq!(s.logged_learning_rate(3), 1.0);
    }

    #[test]
    fn linear_without_warmup_starts_at_full_rate() {
        let s = Schedule::new(SchedulerType::Linear, 1e-6, 0.0, 4);
        assert_eq!(s.logged_learning_rate(1), 1e-6);
        assert_eq!(s.logged_learning_rate(2), 1e-6 * 0.75);
        assert_eq!(s.logged_learning_rate(4), 1e-6 * 0.25);
    }

    #[test]
    fn cosine_with_warmup() {
        let s = Schedule::new(SchedulerType::Cosine, 2.0, 1.0, 5);
        assert_eq!(s.learning_rate_at(0), 0.0);
        assert_eq!(s.learning_rate_at(1), 2.0);
        // progress 0.5 -> 0.5 * (1 + cos(pi / 2))
        let mid = s.learning_rate_at(3);
        assert!((mid - 2.0 * 0.5 * (1.0 + (std::f64::consts::PI * 0.5).cos())).abs() < 1e-15);
        assert!(s.learning_rate_at(5).abs() < 1e-15);
    }

    #[test]
    fn constant_ignores_warmup_like_transformers() {
        let s = Schedule::new(SchedulerType::Constant, 0.01, 3.0, 10);
        assert_eq!(s.learning_rate_at(0), 0.01);
        let w = Schedule::new(SchedulerType::ConstantWithWarmup, 0.01, 4.0, 10);
        assert_eq!(w.learning_rate_at(1), 0.01 * 0.25);
        assert_eq!(w.learning_rate_at(4), 0.01);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        assert_eq!(
            Schedule::new(SchedulerType::Linear, 1.0, 0.1, 15).warmup_steps,
            2
        );
        assert_eq!(
            Schedule::new(SchedulerType::Linear, 1.0, 3.0, 15).warmup_steps,
            3
        );
    }
}
