//! `kto export`: the base model with the adapter merged in, as a standalone Hugging Face checkpoint or a GGUF file,
//! or the adapter alone as llama.cpp's GGUF adapter.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use kto_model::gguf::is_gguf_path;
use kto_model::GgufDType;
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
  # ... and in transformers: AutoModelForCausalLM.from_pretrained(\"runs/tiny/merged\")

  # for llama.cpp: the adapter alone as a GGUF LoRA (what its convert_lora_to_gguf.py writes) ...
  kto export --config configs/tiny.toml --out runs/tiny/adapter.gguf --adapter-only
  llama-cli -m base-f32.gguf --lora runs/tiny/adapter.gguf -p 'Hi'
  # ... the merged model as one GGUF file with tokenizer and chat template (q8_0: 8-bit blocks) ...
  kto export --config configs/tiny.toml --out runs/tiny/merged.gguf --dtype q8_0
  # ... or the base model alone, e.g. as the f32 base for the adapter
  kto export --config configs/tiny.toml --no-adapter --out base-f32.gguf --dtype f32

  # both load back in kto: [model] path = \"runs/tiny/merged.gguf\", [lora] init_adapter = \"runs/tiny/adapter.gguf\"";

/// Merge a LoRA adapter into the base model and write it as an HF checkpoint folder (config.json, model.safetensors
/// and the tokenizer files) that kto and transformers load without PEFT, or, when --out ends in .gguf, as one GGUF
/// file for llama.cpp; with --adapter-only, write the adapter alone as llama.cpp's GGUF LoRA adapter.
///
/// GGUF files are written as llama.cpp's converters write them: the merged model as convert_hf_to_gguf.py does
/// (llama architecture, llama.* metadata, q/k rows permuted, tokenizer.ggml.* and tokenizer.chat_template), the
/// adapter as convert_lora_to_gguf.py does (blk.N.attn_q.weight.lora_a / .lora_b, adapter.lora.alpha).
/// The base is merged into as training held it: with [model] quantize set to a type, its blocks dequantized (not
/// the file's original values). Safetensors weights keep their Hugging Face names and stored dtypes unless --dtype
/// is given. Every output is written under a temporary name and renamed into place, so an interrupted export leaves
/// nothing half-written.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ExportArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// Where to write: a folder (must not exist or be empty) for an HF checkpoint, or a file ending in .gguf.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the adapter alone as a llama.cpp GGUF LoRA adapter (--out must end in .gguf).
    #[arg(long, conflicts_with = "no_adapter")]
    pub adapter_only: bool,
    /// Write the base model without an adapter (e.g. a GGUF base for llama.cpp to apply the adapter to).
    #[arg(long)]
    pub no_adapter: bool,
    /// How weights are stored. HF folder: f32, bf16 or f16 [default: the base model's dtypes]. GGUF, as llama.cpp's
    /// --outtype: f32, f16, bf16 or q8_0 (norms stay f32; rows that are no whole Q8_0 block fall back to f16)
    /// [default: merged model bf16 for a bf16 base, else f16; adapter f32].
    #[arg(long, value_parser = ["f32", "bf16", "f16", "q8_0"])]
    pub dtype: Option<String>,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let gguf_out = is_gguf_path(&args.out);
    if args.adapter_only && !gguf_out {
        bail!(
            "--adapter-only writes llama.cpp's GGUF adapter: --out must end in .gguf (the PEFT adapter folder is \
             already the Hugging Face form), got {}",
            args.out.display()
        );
    }
    if gguf_out && args.out.exists() {
        bail!(
            "--out {} already exists: choose a new file name or remove it",
            args.out.display()
        );
    }
    if !gguf_out && args.out.exists() && !is_empty_dir(&args.out) {
        bail!(
            "--out {} already exists and is not empty: choose a new folder or remove it",
            args.out.display()
        );
    }
    let (config, adapter_dir) = args.source.load(args.no_adapter)?;
    let adapter_dir = match adapter_dir {
        Some(dir) => Some(dir),
        None if args.no_adapter => None,
        None => {
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
                "no adapter to export ({expected}): train first with `kto train --config {}`, pass --adapter DIR, \
                 or --no-adapter for the base model alone",
                args.source.config.display()
            );
        }
    };
    let checkpoint = args.source.base_model(&config)?;
    // The adapter was trained over the base as `[model] quantize` held it: merge into those values.
    let quantize = config.model.quantize;
    // Merging touches every weight once: the CPU does it without an accelerator.
    let adapter = adapter_dir
        .as_ref()
        .map(|dir| {
            kto_model::peft::load_adapter(dir, &checkpoint.config, &Device::Cpu)
                .with_context(|| format!("adapter {}", dir.display()))
        })
        .transpose()?;
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let what = match &adapter_dir {
        Some(dir) => format!(
            "{} merged into {}",
            dir.display(),
            checkpoint.source().display()
        ),
        None => checkpoint.source().display().to_string(),
    };
    if gguf_out {
        let dtype = args.dtype.as_deref().map(GgufDType::parse).transpose()?;
        let written = match (&adapter, args.adapter_only) {
            (Some(adapter), true) => {
                let dir = adapter_dir.as_deref().unwrap_or(Path::new("adapter"));
                tracing::info!("writing {} as a GGUF adapter", dir.display());
                kto_model::lora_gguf::save_adapter_gguf(
                    adapter,
                    &checkpoint.config,
                    &args.out,
                    dtype.unwrap_or(GgufDType::F32),
                    &adapter_name(dir),
                )
            }
            _ => {
                tracing::info!("writing {what} as GGUF");
                kto_model::merge_to_gguf(&checkpoint, quantize, adapter.as_ref(), &args.out, dtype)
            }
        };
        written.with_context(|| format!("exporting to {}", args.out.display()))?;
    } else {
        let dtype = match args.dtype.as_deref() {
            Some("q8_0") => bail!(
                "--dtype q8_0 is a GGUF type: give --out a .gguf file name, or f32/bf16/f16 for an HF folder"
            ),
            other => other.map(kto_model::parse_dtype).transpose()?,
        };
        tracing::info!("writing {what}");
        let written = match &adapter {
            Some(adapter) => {
                kto_model::merge_to_checkpoint(&checkpoint, quantize, adapter, &args.out, dtype)
            }
            None => kto_model::convert_to_checkpoint(&checkpoint, quantize, &args.out, dtype),
        };
        written.with_context(|| format!("exporting to {}", args.out.display()))?;
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `general.name` of an adapter: its folder's name, as convert_lora_to_gguf.py names it.
fn adapter_name(dir: &Path) -> String {
    let folder = dir
        .file_name()
        .map_or_else(|| "adapter".into(), |n| n.to_string_lossy().into_owned());
    kto_model::lora_gguf::gguf_general_name(&folder)
}

fn is_empty_dir(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}
