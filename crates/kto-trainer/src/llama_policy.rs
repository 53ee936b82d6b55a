//! `kto-model`'s LoRA Llama as the trainer's [`PolicyModel`].

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use kto_data::batch::SequenceBatch;
use kto_model::{AdapterChoice, LlamaModel, SequenceLogps};

use crate::policy::PolicyModel;

/// A Llama with its trained (policy) adapter and, optionally, a frozen reference adapter.
pub struct LoraPolicy {
    pub model: LlamaModel,
    /// Written into the saved adapter's `base_model_name_or_path`.
    pub base_model_name: String,
    /// LoRA dropout draws random masks: on only when dropout is not disabled (TRL's `disable_dropout`).
    pub dropout_active: bool,
}

impl PolicyModel for LoraPolicy {
    fn sequence_logps(
        &self,
        batch: &SequenceBatch,
        choice: AdapterChoice,
    ) -> Result<SequenceLogps> {
        self.model.sequence_logps(batch, choice)
    }

    fn sequence_logps_with_kl(
        &self,
        target: &SequenceBatch,
        kl: &SequenceBatch,
        choice: AdapterChoice,
    ) -> Result<(SequenceLogps, SequenceLogps)> {
        self.model.sequence_logps_with_kl(target, kl, choice)
    }

    /// [`LlamaModel::backward`]: with gradient checkpointing on, the checkpointed layers are recomputed here and
    /// their LoRA gradients merged in.
    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.model.backward(loss)
    }

    fn trainable_parameters(&self) -> Vec<(String, Var)> {
        self.model
            .policy_adapter()
            .map(|a| a.trainable_vars())
            .unwrap_or_default()
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let adapter = self
            .model
            .policy_adapter()
            .context("no policy adapter to save")?;
        kto_model::peft::save_adapter(adapter, dir, &self.base_model_name)
    }

    fn begin_step(&mut self, step_seed: u64) -> Result<()> {
        self.model.set_training(self.dropout_active, step_seed)
    }

    fn begin_evaluation(&mut self) -> Result<()> {
        self.model.set_training(false, 0)
    }
}
