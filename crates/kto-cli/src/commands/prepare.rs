//! `kto prepare`: preference data in any supported format → `DIR/train.jsonl` and `DIR/test.jsonl`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use kto_data::formats::ReadOptions;
use kto_data::prepare::{prepare, OutputStyle, PrepareOptions, DEFAULT_SEED};
use kto_data::Format;

const EXAMPLES: &str = "\
Examples:
  # raw Anthropic HH-RLHF (chosen/rejected conversations) to unpaired prompt/completion/label rows
  kto prepare --input data/hh-sample/train.jsonl --out data/prepared
  #   -> data/prepared/train.jsonl, data/prepared/test.jsonl (10% of the pairs), a report of drops

  # NeMo Aligner field names, 20% held out, reproducible split
  kto prepare --input pairs.jsonl --out data/nemo --style nemo --test-fraction 0.2 --seed 7

  # the files a TRL user has: Parquet shards (a quoted glob, read in name order), gzipped JSONL, a save_to_disk
  # folder, a datasets cache file, CSV
  kto prepare --input 'kto-mix-14k/data/train-*.parquet' --out data/mix
  kto prepare --input hh-rlhf/harmless-base/train.jsonl.gz hh-rlhf/harmless-base/test.jsonl.gz --out data/hh
  kto prepare --input my_dataset/train --out data/mine      # Dataset.save_to_disk(\"my_dataset/train\")
  kto prepare --input prefs.csv --out data/csv

Files: .jsonl, .json (also .gz, .zst), .parquet, .arrow, .csv, a folder or a glob of shards.
One example of each input format (one JSON object per line; the same columns in Parquet, Arrow or CSV):
  unpaired (TRL)   {\"prompt\": \"Hi\", \"completion\": \" Hello!\", \"label\": true}
  nemo             {\"prompt\": \"Hi\", \"response\": \" Hello!\", \"preference\": \"chosen\"}
  paired           {\"prompt\": \"Hi\", \"chosen\": \" Hello!\", \"rejected\": \" Go away.\"}
  hh               {\"chosen\": \"\\n\\nHuman: Hi\\n\\nAssistant: Hello!\", \"rejected\": \"...\"}
  conversational   {\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}],
                    \"completion\": [{\"role\": \"assistant\", \"content\": \"Hello!\"}], \"label\": true}";

/// Read preference data, split it into train and test, and write unpaired JSONL files.
///
/// Inputs may be TRL unpaired, NeMo, paired, raw Anthropic HH-RLHF or conversational data (JSONL or a JSON array,
/// gzip/zstd JSON, Parquet, Arrow, CSV; a folder or glob of shards is one input), detected per input. Inputs already named as a train and a test file keep their split.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct PrepareArgs {
    /// Input data: files (.jsonl, .json, .jsonl.gz, .json.gz, .jsonl.zst, .parquet, .arrow, .csv), folders, globs.
    #[arg(long = "input", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Output folder for train.jsonl and test.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// Field names to write: trl (prompt, completion, label) or nemo (prompt, response, preference).
    #[arg(long, default_value = "trl", value_parser = parse_style)]
    pub style: OutputStyle,
    /// Fraction of the pairs that goes to test.jsonl [default: 0.1, unless the inputs are already split].
    #[arg(long)]
    pub test_fraction: Option<f64>,
    /// Seed of the split and of the order of the written samples.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Input format: auto, unpaired (trl), nemo, paired, hh, conversational.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    pub format: Format,
    /// Skip rows with bad input (warning and count) instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
}

fn parse_style(name: &str) -> Result<OutputStyle, String> {
    name.parse().map_err(|e: anyhow::Error| e.to_string())
}

fn parse_format(name: &str) -> Result<Format, String> {
    name.parse()
        .map_err(|e: kto_data::formats::UnknownFormat| e.to_string())
}

pub fn run(args: PrepareArgs) -> Result<()> {
    let report = prepare(&PrepareOptions {
        inputs: args.inputs,
        out_dir: args.out,
        style: args.style,
        test_fraction: args.test_fraction,
        seed: args.seed,
        read: ReadOptions {
            format: args.format,
            skip_invalid: args.skip_invalid,
        },
    })?;
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    println!("{report}");
    Ok(())
}
