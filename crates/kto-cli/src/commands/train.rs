//! `kto train`: KTO training of a LoRA adapter from a TOML config.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use kto_trainer::checkpoint::{latest_verified, MANIFEST};
use kto_trainer::config::{Config, Override};
use kto_trainer::train::{FINAL_ADAPTER_DIR, METRICS_FILE};

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
    let output_dir = config
        .train
        .output_dir
        .clone()
        .expect("checked by require_for_training");
    let resume = match &args.resume {
        None => {
            refuse_earlier_run(&output_dir)?;
            None
        }
        Some(dir) => resolve_checkpoint(dir.as_deref().unwrap_or(&output_dir))?,
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

/// A checkpoint folder itself (checked in full by the trainer), or the newest intact one inside `dir`: newer ones
/// that are incomplete or damaged are reported and skipped. `None` (start from the beginning, said on stderr) when
/// `dir` holds no checkpoint at all, e.g. a run killed before its first save.
fn resolve_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    if dir.join(MANIFEST).is_file() {
        return Ok(Some(dir.to_path_buf()));
    }
    let named_checkpoint = dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"));
    if named_checkpoint && dir.is_dir() {
        bail!(
            "--resume {}: no {MANIFEST}, an incomplete checkpoint; resume from the folder holding the \
             checkpoints to use the newest complete one",
            dir.display()
        );
    }
    match latest_verified(dir)? {
        Some(checkpoint) => Ok(Some(checkpoint)),
        None if has_checkpoint_folders(dir) => bail!(
            "--resume: no intact checkpoint-N folder in {} (every one is incomplete or damaged, see above)",
            dir.display()
        ),
        None => {
            eprintln!(
                "--resume: no checkpoint in {} yet: starting from the beginning",
                dir.display()
            );
            Ok(None)
        }
    }
}

fn has_checkpoint_folders(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("checkpoint-") && e.path().is_dir()
        })
    })
}

/// A fresh run never writes over another run's files: its metrics, checkpoints or final adapter.
fn refuse_earlier_run(output_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(());
    };
    let mut found: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name == METRICS_FILE
                || name == FINAL_ADAPTER_DIR
                || name == "config.toml"
                || name.starts_with("checkpoint-")
        })
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    found.sort();
    bail!(
        "{} holds an earlier run ({}): continue it with --resume, or choose another [train] output_dir",
        output_dir.display(),
        found.join(", ")
    )
}
