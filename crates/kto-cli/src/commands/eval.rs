//! `kto eval`: held-out KTO metrics of an adapter: loss, KL, rewards, reward accuracy, AUROC, pair accuracy.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use kto_trainer::hooks::Hooks;
use kto_trainer::progress::Observer;

use super::model_source::ModelSource;

const EXAMPLES: &str = "\
Examples:
  # the adapter `kto train --config configs/tiny.toml` wrote, on its [data] eval_file
  kto eval --config configs/tiny.toml

  # another adapter or test file; the base model alone (its rewards are all 0: accuracy 0, AUROC 0.5)
  kto eval --config configs/tiny.toml --adapter runs/tiny/checkpoint-40/adapter --out ckpt40.json
  kto eval --config configs/tiny.toml --set data.eval_file=data/hh-sample/test.jsonl

Figures: eval_loss and TRL's eval_* metrics, plus eval_reward_accuracy (desirable samples with a reward above
the batch's KL reference point, undesirable below), eval_reward_auroc (how well the implied reward ranks desirable
above undesirable, 0.5 is chance) and eval_pair_accuracy (chosen above rejected within preference pairs).";

/// Evaluate the policy on `[data] eval_file`: prints a table and writes the figures as JSON.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct EvalArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// Where to write the JSON [default: output_dir/eval_results.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: EvalArgs, progress: Arc<dyn Observer>) -> Result<()> {
    let (config, adapter) = args.source.load(false)?;
    let hooks = Hooks {
        progress,
        ..Hooks::default()
    };
    let results = kto_trainer::from_config::run_evaluation(&config, adapter.as_deref(), &hooks)?;
    let width = results.keys().map(String::len).max().unwrap_or(0);
    for (key, value) in &results {
        match value.as_f64() {
            Some(v) if value.is_f64() => println!("{key:width$}  {v:.6}"),
            _ => println!("{key:width$}  {value}"),
        }
    }
    let out = args.out.clone().or_else(|| {
        config
            .train
            .output_dir
            .as_ref()
            .map(|d| kto_trainer::run_dir::RunDir::new(d).eval_results_file())
    });
    if let Some(path) = out {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(&results)? + "\n";
        kto_data::atomic::write_file(&path, text.as_bytes())?;
        tracing::info!("wrote {}", path.display());
    }
    Ok(())
}
