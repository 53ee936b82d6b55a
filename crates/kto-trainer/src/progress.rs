//! Progress of the long-running parts (training steps, the reference precompute, evaluation), reported to the
//! [`Observer`] the caller passes in its [`crate::hooks::Hooks`]: the loop says what happened, the binary decides
//! how to show it (a terminal bar, log lines, or nothing). The default observer shows nothing, which keeps library
//! users and tests quiet.

use std::sync::Arc;

use serde_json::{Map, Value};

/// A pass over a data set that is not a training step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataPass {
    /// Reference log-probs computed once before training (`precompute_ref_log_probs`), of one dataset.
    ReferencePrecompute { dataset: String },
    /// The held-out evaluation.
    Evaluation,
}

impl std::fmt::Display for DataPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataPass::ReferencePrecompute { dataset } => {
                write!(f, "reference log-probs ({dataset})")
            }
            DataPass::Evaluation => write!(f, "evaluation"),
        }
    }
}

/// Receives progress events. Every method has an empty default so an observer implements what it shows.
pub trait Observer: Send + Sync {
    /// Training begins (or resumes) at `first_step` completed steps out of `max_steps`.
    fn training_started(&self, _first_step: usize, _max_steps: usize) {}
    /// Optimizer step `step` is done; it consumed `samples` training samples.
    fn step_finished(&self, _step: usize, _samples: usize) {}
    /// A metrics.jsonl row was written: a training row (`loss`, `rewards/*`, `kl`, ...) or an `eval_*` row.
    fn metrics_logged(&self, _row: &Map<String, Value>) {}
    /// Training stopped (finished, interrupted by `stop_after_step`, or failed).
    fn training_finished(&self) {}
    /// A pass over `samples` samples begins.
    fn pass_started(&self, _pass: &DataPass, _samples: usize) {}
    /// `samples` more samples of the current pass are done.
    fn pass_advanced(&self, _samples: usize) {}
    /// The current pass ended (done or failed).
    fn pass_finished(&self, _pass: &DataPass) {}
}

/// Shows nothing.
pub struct Silent;
impl Observer for Silent {}

/// Reports a training run; tells the observer that training ended when dropped, on every exit path.
pub struct TrainingProgress {
    observer: Arc<dyn Observer>,
}

impl TrainingProgress {
    pub fn start(observer: &Arc<dyn Observer>, first_step: usize, max_steps: usize) -> Self {
        observer.training_started(first_step, max_steps);
        Self {
            observer: observer.clone(),
        }
    }

    pub fn step_finished(&self, step: usize, samples: usize) {
        self.observer.step_finished(step, samples);
    }

    pub fn metrics_logged(&self, row: &Map<String, Value>) {
        self.observer.metrics_logged(row);
    }
}

impl Drop for TrainingProgress {
    fn drop(&mut self) {
        self.observer.training_finished();
    }
}

/// Reports one pass; tells the observer that it ended when dropped, on every exit path.
pub struct PassProgress {
    observer: Arc<dyn Observer>,
    pass: DataPass,
}

impl PassProgress {
    pub fn start(observer: &Arc<dyn Observer>, pass: DataPass, samples: usize) -> Self {
        observer.pass_started(&pass, samples);
        Self {
            observer: observer.clone(),
            pass,
        }
    }

    pub fn advance(&self, samples: usize) {
        self.observer.pass_advanced(samples);
    }
}

impl Drop for PassProgress {
    fn drop(&mut self) {
        self.observer.pass_finished(&self.pass);
    }
}
