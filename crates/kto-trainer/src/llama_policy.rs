//! `kto-model`'s LoRA Llama as the trainer's [`PolicyModel`].

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Var;
use kto_data::batch::SequenceBatch;
use kto_model::{AdapterChoice, LlamaModel, SequenceLogps};

use crate::forward::{PolicyModel, RowLogps, Weights};

/// A Llama with its trained (policy) adapter and, optionally, a frozen reference adapter.
pub struct LoraPolicy {
    pub model: LlamaModel,
    /// Written into the saved adapter's `base_model_name_or_path`.
    pub base_model_name: String,
    /// LoRA dropout draws random masks: on only when dropout is not disabled (TRL's `disable_dropout`).
    pub dropout_active: bool,
}

fn adapter_choice(weights: Weights) -> AdapterChoice {
    match weights {
        Weights::Policy => AdapterChoice::Policy,
        Weights::PolicyNoGrad => AdapterChoice::PolicyNoGrad,
        Weights::Reference => AdapterChoice::Reference,
    }
}

fn row_logps(out: SequenceLogps) -> RowLogps {
    RowLogps {
        logps: out.logps,
        token_counts: out.token_counts,
        mean_logit_sums: out.mean_logit_sums,
        entropy_sums: out.entropy_sums,
        forward_tokens: out.forward_tokens,
    }
}

impl PolicyModel for LoraPolicy {
    fn sequence_logps(&self, batch: &SequenceBatch, weights: Weights) -> Result<RowLogps> {
        Ok(row_logps(
            self.model.sequence_logps(batch, adapter_choice(weights))?,
        ))
    }

    fn sequence_logps_with_kl(
        &self,
        target: &SequenceBatch,
        kl: &SequenceBatch,
        weights: Weights,
    ) -> Result<(RowLogps, RowLogps)> {
        let (target, kl) =
            self.model
                .sequence_logps_with_kl(target, kl, adapter_choice(weights))?;
        Ok((row_logps(target), row_logps(kl)))
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
