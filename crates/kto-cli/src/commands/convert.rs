//! `kto convert`: a GGUF checkpoint as a Hugging Face folder that transformers (and kto) load.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kto_model::ModelFiles;

const EXAMPLES: &str = "\
Examples:
  # SmolLM2-135M-Instruct (scripts/get-smollm2.sh) as an HF folder, weights dequantized to f32
  kto convert --gguf ~/.cache/kto/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m

  # ... stored as bf16
  kto convert --gguf model.gguf --out models/model-bf16 --dtype bf16

  # transformers loads it: AutoModelForCausalLM.from_pretrained(\"models/smollm2-135m\")";

/// Convert a GGUF file (llama architecture) into a Hugging Face checkpoint folder: config.json, model.safetensors,
/// tokenizer.json and tokenizer_config.json (with the chat template).
///
/// Weights are dequantized with Q/K rows in transformers' order; the tokenizer is rebuilt from the GGUF metadata as
/// kto uses it. The folder is written under a temporary name and renamed into place, so an interrupted conversion
/// leaves nothing half-written.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ConvertArgs {
    /// The .gguf file.
    #[arg(long)]
    pub gguf: PathBuf,
    /// The folder to write; must not exist or be empty.
    #[arg(long)]
    pub out: PathBuf,
    /// Store the weights as f32, bf16 or f16 [default: f32, what dequantization gives].
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    if !args.gguf.is_file() {
        bail!("--gguf {}: no such file", args.gguf.display());
    }
    if args.out.exists() && std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "--out {} already exists and is not empty: choose a new folder or remove it",
            args.out.display()
        );
    }
    let checkpoint = ModelFiles::from_gguf(&args.gguf)?;
    let dtype = args
        .dtype
        .as_deref()
        .map(kto_model::parse_dtype)
        .transpose()?;
    tracing::info!("converting {}", args.gguf.display());
    kto_model::convert_to_checkpoint(&checkpoint, kto_model::Quantization::None, &args.out, dtype)
        .with_context(|| format!("converting to {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}
