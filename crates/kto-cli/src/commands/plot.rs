//! `kto plot`: learning curves of a training run, from its `metrics.jsonl`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use kto_trainer::run_dir::RunDir;

use crate::plot::plot_run;

const EXAMPLES: &str = "\
Examples:
  # runs/tiny/curves.svg and runs/tiny/curves.png (kto train draws them too, at its end)
  kto plot runs/tiny

  # elsewhere: report.svg and report.png
  kto plot runs/tiny --out report.png";

/// Draw the learning curves of a run (loss, rewards, KL, held-out accuracy, learning rate, gradient norm) as SVG
/// and PNG.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct PlotArgs {
    /// The run's output_dir: the folder where `kto train` wrote metrics.jsonl.
    pub run_dir: PathBuf,
    /// Output file: FILE.svg / FILE.png, or FILE itself when it ends in .svg or .png (the other format takes the
    /// same stem) [default: RUN_DIR/curves.svg and RUN_DIR/curves.png].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let outputs = plot_run(&RunDir::new(&args.run_dir), args.out.as_deref())?;
    println!(
        "wrote {} and {}",
        outputs.svg.display(),
        outputs.png.display()
    );
    Ok(())
}
