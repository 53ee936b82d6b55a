//! Builds `assets/tiny-llama/`: a tiny, randomly initialised Llama checkpoint in the Hugging Face layout with a
//! real byte-level BPE tokenizer trained on `data/hh-sample` (`kto_model::testing::tiny_llama`, which says what and
//! how; this is its command line). Deterministic: identical files on every run.
//!
//! ```text
//! cargo run -p kto-cli --example make_tiny_llama [-- --data-dir data/hh-sample --out-dir assets/tiny-llama]
//! ```

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kto_model::testing::tiny_llama::{write_tiny_llama, FILES};

#[derive(Parser)]
#[command(
    about = "Build assets/tiny-llama: BPE tokenizer trained on the HH sample + random tiny Llama"
)]
struct Args {
    /// Folder with the HH-style `*.jsonl` files the tokenizer is trained on.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/hh-sample"))]
    data_dir: PathBuf,
    /// Output folder.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/tiny-llama"))]
    out_dir: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = write_tiny_llama(&args.data_dir, &args.out_dir)?;
    for name in FILES {
        let path = args.out_dir.join(name);
        let size = fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        println!("{:>10} bytes  {}", size, path.display());
    }
    println!(
        "vocab {}, {} parameters",
        model.vocab_size,
        model.parameter_count()
    );
    Ok(())
}
