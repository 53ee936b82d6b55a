//! `kto export`: the base model with the adapter merged in, as a standalone Hugging Face checkpoint.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use kto_trainer::run_dir::RunDir;

use super::model_source::ModelSource;

const EXAMPLES: &str = "\
Examples:
  # merge the adapter `kto train --config configs/tiny.toml` wrote (output_dir/adapter)
  kto export --config configs/tiny.toml --out runs/tiny/merged

  # a checkpoint's adapter, stored as bf16
  kto export --config configs/tiny.toml --adapter runs/tiny/checkpoint-40/adapter --out merged-40 --dtype bf16

  # the export loads like any model: in kto ...
  kto generate --config configs/tiny.toml --set model.path=runs/tiny/merged --no-adapter --prompt 'Hi'
  # ... and in transformers: AutoModelForCausalLM.from_pretrained(\"runs/tiny/merged\")";

/// Merge a LoRA adapter into the base model and write an HF checkpoint folder (config.json, model.safetensors and
/// the tokenizer files) that kto and transformers load without PEFT.
///
/// Weights keep their Hugging Face names and stored dtypes unless --dtype is given. The folder is written under a
/// temporary name and renamed into place, so an interrupted export leaves nothing half-written.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ExportArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// The folder to write; must not exist or be empty.
    #[arg(long)]
    pub out: PathBuf,
    /// Store every weight as f32, bf16 or f16 [default: the base model's dtypes].
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let (config, adapter_dir) = args.source.load(false)?;
    let Some(adapter_dir) = adapter_dir else {
        let expected = config.train.output_dir.as_ref().map_or_else(
            || "[train] output_dir is not set".to_string(),
            |d| {
                format!(
                    "{} does not exist",
                    RunDir::new(d).final_adapter().display()
                )
            },
        );
        bail!(
            "no adapter to merge ({expected}): train first with `kto train --config {}` or pass --adapter DIR",
            args.source.config.display()
        );
    };
    if args.out.exists() && !is_empty_dir(&args.out) {
        bail!(
            "--out {} already exists and is not empty: choose a new folder or remove it",
            args.out.display()
        );
    }
    let checkpoint = args.source.base_model(&config)?;
    // Merging touches every weight once: the CPU does it without an accelerator.
    let adapter = kto_model::peft::load_adapter(&adapter_dir, &checkpoint.config, &Device::Cpu)
        .with_context(|| format!("adapter {}", adapter_dir.display()))?;
    let dtype = args
        .dtype
        .as_deref()
        .map(kto_model::parse_dtype)
        .transpose()?;
    tracing::info!(
        "merging {} into {}",
        adapter_dir.display(),
        checkpoint.source().display()
    );
    kto_model::merge_to_checkpoint(&checkpoint, &adapter, &args.out, dtype)
        .with_context(|| format!("exporting to {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn is_empty_dir(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}
