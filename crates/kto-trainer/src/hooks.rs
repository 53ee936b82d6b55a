//! How a caller watches and steers a run, in one value passed to [`crate::from_config::run_training`],
//! [`crate::train::train`] and [`crate::from_config::run_evaluation`]: where progress goes, what asks the run to stop, and
//! the probes tests use. Nothing of this is global; the default shows nothing and never stops early. (Faults for
//! the crash and stop tests are injected elsewhere, by the process under test: [`kto_data::faults`].)

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use candle_core::Tensor;

use crate::progress::{Observer, Silent};
use crate::stop::StopRequest;

/// Sees a step's gradients after clipping (step number, gradients by parameter name).
pub type GradientHook<'a> = &'a dyn Fn(usize, &HashMap<String, Tensor>) -> Result<()>;

#[derive(Clone)]
pub struct Hooks<'a> {
    /// Receives the progress of steps, the reference precompute and evaluation.
    pub progress: Arc<dyn Observer>,
    /// Asked between steps and between batches of evaluation and the reference precompute; once it is requested,
    /// the step in progress finishes, a checkpoint of it is saved, and the run ends.
    pub stop: StopRequest,
    /// Stop (as if requested, but without saving an extra checkpoint) once this many optimizer steps are done.
    pub stop_after_step: Option<usize>,
    /// Sees every step's gradients after clipping, before the optimizer uses them.
    pub gradients: Option<GradientHook<'a>>,
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Self {
            progress: Arc::new(Silent),
            stop: StopRequest::new(),
            stop_after_step: None,
            gradients: None,
        }
    }
}
