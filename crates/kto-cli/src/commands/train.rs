//! `kto train`: KTO training of a LoRA adapter from a TOML config.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use kto_trainer::config::{Config, Override};
use kto_trainer::hooks::Hooks;
use kto_trainer::progress::Observer;
use kto_trainer::run_dir::{Begin, RunLock, Start};
use kto_trainer::stop::StopRequest;
use kto_trainer::train::TrainSummary;
use serde_json::{Map, Value};

use crate::plot::PlotOutputs;

const EXAMPLES: &str = "\
Examples:
  # the embedded tiny Llama on the bundled HH sample: ends with a summary of the held-out figures
  kto train --config configs/tiny.toml

  # override any key: plain values, paths, numbers, booleans, TOML arrays
  kto train --config configs/tiny.toml --set train.output_dir=runs/try2 --set kto.beta=0.2 \\
            --set 'lora.target_modules=[\"q_proj\", \"v_proj\"]'

  # other data: Parquet shards (a glob, read in name order), a save_to_disk folder, .jsonl.gz, .csv, ...
  kto train --config configs/tiny.toml --set 'data.train_file=data/train-*.parquet'
  # a data set already in the local Hugging Face cache (hf download --repo-type dataset trl-lib/kto-mix-14k):
  # replaces the config's train_file and eval_file; its test split is evaluated
  kto train --config configs/tiny.toml --set data.dataset_name=trl-lib/kto-mix-14k

  # watch it live in TensorBoard (event files in output_dir/runs/<date>_<host>; report_to = \"none\" turns them off)
  tensorboard --logdir runs/tiny/runs

  # every key with its default, as the run would use it
  kto train --config configs/tiny.toml --print-config

  # checkpoints every 20 steps; after an interruption, continue exactly where it stopped
  kto train --config configs/tiny.toml --set train.save_steps=20
  kto train --config configs/tiny.toml --set train.save_steps=20 --resume

  # Ctrl-C (or SIGTERM) once: finishes the step, saves a checkpoint, exits; --resume continues it

  # start over in the same output_dir, removing the earlier run's files
  kto train --config configs/tiny.toml --overwrite";

/// Train a LoRA adapter with KTO, numerically as TRL 1.16's KTOTrainer.
///
/// Writes `output_dir/metrics.jsonl`, `output_dir/checkpoint-N/` every save_steps, `output_dir/adapter/` and the
/// learning curves `output_dir/curves.{svg,png}`, then prints a summary. On a terminal a progress bar shows the
/// steps, loss, reward margin, KL, samples/s and the time left; elsewhere, one log line per logged step.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
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
    /// Remove an earlier run's files from output_dir (checkpoints, metrics, adapter, curves) before training; as
    /// [train] overwrite_output_dir = true.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Print the resolved config, every default included, and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(args: TrainArgs, progress: Arc<dyn Observer>) -> Result<()> {
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
    kto_data::faults::check_environment()?;
    let world = crate::world::join()?;
    let world = world.as_ref();
    // Before the lock: a Ctrl-C while the model loads already stops gracefully. Rank 0 alone shows progress.
    let hooks = Hooks {
        progress: match world.is_main() {
            true => progress,
            false => Arc::new(kto_trainer::progress::Silent),
        },
        stop: StopRequest::on_signals()?,
        ..Hooks::default()
    };
    let begin = match &args.resume {
        Some(from) => Ok(Begin::Resume(from.clone())),
        None if args.overwrite || config.train.overwrite_output_dir => Ok(Begin::Overwrite),
        None => Ok(Begin::Fresh),
    };
    // Rank 0 alone takes the lock (held until the process ends; nothing is written to output_dir before it is
    // taken) and begins the run there; every rank learns whether it could.
    let begun = match world.is_main() {
        true => begin.and_then(|begin| {
            let lock = RunLock::acquire(&output_dir)?;
            let start = lock.begin(begin)?;
            Ok((Some(lock), start))
        }),
        false => begin.map(|_| (None, Start::Fresh)),
    };
    let (lock, start) = crate::world::all_ok(world, begun)?;
    let start = crate::world::shared_start(world, start)?;
    match &start {
        Start::Overwrote(removed) if !removed.is_empty() => eprintln!(
            "--overwrite: removed the earlier run's {} from {}",
            removed.join(", "),
            output_dir.display()
        ),
        Start::NothingToResume => eprintln!(
            "--resume: no checkpoint in {} yet: starting from the beginning",
            output_dir.display()
        ),
        _ => {}
    }
    let summary =
        kto_trainer::from_config::run_training(&config, lock.as_ref(), &start, world, &hooks)?;
    // Every rank waits for rank 0's last write: a launcher ends all ranks when one exits with an error status (a
    // stop's 143), which must not cut rank 0's checkpoint short.
    world.barrier()?;
    let Some(lock) = lock else {
        // Ranks other than 0 end here: rank 0 reports, plots and summarizes.
        return match summary.stopped_by {
            Some(signal) => std::process::exit(kto_trainer::stop::exit_status(signal)),
            None => Ok(()),
        };
    };
    if let Some(signal) = summary.stopped_by {
        eprintln!(
            "stopped at step {} of {}; continue with --resume",
            summary.global_step, summary.max_steps
        );
        drop(lock);
        std::process::exit(kto_trainer::stop::exit_status(signal));
    }
    // The learning curves; a plotting failure does not fail the finished training.
    let run_dir = lock.run_dir();
    let plots = match crate::plot::plot_run(run_dir, None) {
        Ok(plots) => {
            eprintln!(
                "learning curves: {} and {}",
                plots.svg.display(),
                plots.png.display()
            );
            Some(plots)
        }
        Err(err) => {
            tracing::warn!("could not plot the learning curves: {err:#}");
            None
        }
    };
    let rows = run_dir.read_metrics()?;
    let logging_dir = lock.logging_dir();
    print!(
        "{}",
        summary_table(&summary, &rows, plots.as_ref(), logging_dir.as_deref())
    );
    Ok(())
}

/// The end-of-training table: the last logged training figures, the last held-out figures, where things are.
fn summary_table(
    summary: &TrainSummary,
    rows: &[Map<String, Value>],
    plots: Option<&PlotOutputs>,
    logging_dir: Option<&Path>,
) -> String {
    let last_with = |key: &str| rows.iter().rev().find(|r| r.contains_key(key));
    let number = |row: &Map<String, Value>, key: &str| -> Option<String> {
        match row.get(key)? {
            Value::Null => Some("nan".into()),
            value => value.as_f64().map(|v| format!("{v:.4}")),
        }
    };
    let mut lines: Vec<(String, String)> = vec![(
        "steps".into(),
        format!("{} / {}", summary.global_step, summary.max_steps),
    )];
    let sections = [
        (
            last_with("loss"),
            &[
                "loss",
                "rewards/chosen",
                "rewards/rejected",
                "rewards/margins",
                "kl",
            ][..],
        ),
        (
            last_with("eval_loss"),
            &[
                "eval_loss",
                "eval_reward_accuracy",
                "eval_reward_auroc",
                "eval_pair_accuracy",
            ][..],
        ),
    ];
    for (row, keys) in sections {
        for (key, row) in keys.iter().filter_map(|k| row.map(|r| (k, r))) {
            if let Some(v) = number(row, key) {
                lines.push((key.to_string(), v));
            }
        }
    }
    let adapter = match &summary.final_adapter {
        Some(dir) => dir.display().to_string(),
        None => {
            "not written: training stopped before its last step (continue with --resume)".into()
        }
    };
    lines.push(("adapter".into(), adapter));
    if let Some(plots) = plots {
        lines.push(("learning curves".into(), plots.png.display().to_string()));
    }
    if let Some(dir) = logging_dir {
        let command = format!("tensorboard --logdir {}", dir.display());
        lines.push(("tensorboard".into(), command));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut table = String::from("\ntraining summary\n");
    for (key, value) in lines {
        table.push_str(&format!("  {key:width$}  {value}\n"));
    }
    table
}
