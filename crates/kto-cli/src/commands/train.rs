//! `kto train`: KTO training of a LoRA adapter from a TOML config.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use kto_trainer::checkpoint::{latest_complete, MANIFEST};
use kto_trainer::config::{Config, Override};

/// Train a LoRA adapter with KTO, numerically as TRL 1.16's KTOTrainer.
///
/// Writes `output_dir/metrics.jsonl`, `output_dir/checkpoint-N/` every save_steps and `output_dir/adapter/`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The TOML config (sections [model] [lora] [data] [kto] [train]).
    #[arg(long)]
    pub config: PathBuf,
    /// Override one config key, e.g. --set train.learning_rate=1e-5 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<Override>,
    /// Continue from the latest complete checkpoint in output_dir, or from DIR (a checkpoint-N folder, or a folder
    /// holding them).
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Print the resolved config, every default included, and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let config = Config::load(&args.config, &args.sets)?;
    if args.print_config {
        print!("{}", config.to_toml_string());
        return Ok(());
    }
    config.require_for_training()?;
    let resume = match &args.resume {
        None => None,
        Some(dir) => {
            let dir = dir
                .clone()
                .or_else(|| config.train.output_dir.clone())
                .expect("checked by require_for_training");
            Some(resolve_checkpoint(&dir)?)
        }
    };
    let summary = kto_trainer::run::run_training(&config, resume.as_deref(), None)?;
    if let Some(adapter) = &summary.final_adapter {
        eprintln!(
            "trained {} steps; adapter in {}",
            summary.global_step,
            adapter.display()
        );
    }
    // The learning curves; a plotting failure does not fail the finished training.
    if let Some(output_dir) = &config.train.output_dir {
        match crate::plot::plot_run(output_dir, None) {
            Ok(plots) => eprintln!(
                "learning curves: {} and {}",
                plots.svg.display(),
                plots.png.display()
            ),
            Err(err) => tracing::warn!("could not plot the learning curves: {err:#}"),
        }
    }
    Ok(())
}

/// A checkpoint folder itself, or the newest complete one inside `dir`.
fn resolve_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(MANIFEST).is_file() {
        return Ok(dir.to_path_buf());
    }
    match latest_complete(dir)? {
        Some(checkpoint) => Ok(checkpoint),
        None => bail!(
            "--resume: no complete checkpoint-N folder in {}",
            dir.display()
        ),
    }
}
