//! Writes a random Llama checkpoint of any shape (transformers' N(0, 0.02) initialisation) with the tokenizer of
//! `assets/tiny-llama`: the models of memory and speed measurements (docs/PERFORMANCE.md).
//!
//! ```text
//! cargo run -p kto-model --features testing --example random_llama -- OUT_DIR HIDDEN INTERMEDIATE LAYERS HEADS KV_HEADS VOCAB
//! ```

use anyhow::{bail, Context, Result};
use kto_model::testing::{TinyModel, WeightInit};
use std::path::{Path, PathBuf};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 7 {
        bail!("usage: random_llama OUT_DIR HIDDEN INTERMEDIATE LAYERS HEADS KV_HEADS VOCAB");
    }
    let number = |i: usize| -> Result<usize> {
        args[i]
            .parse()
            .with_context(|| format!("argument {i}: {:?} is not a number", args[i]))
    };
    let out = PathBuf::from(&args[0]);
    let model = TinyModel {
        hidden_size: number(1)?,
        intermediate_size: number(2)?,
        num_hidden_layers: number(3)?,
        num_attention_heads: number(4)?,
        num_key_value_heads: number(5)?,
        vocab_size: number(6)?,
        max_position_embeddings: 2048,
        init: WeightInit::Normal { std: 0.02 },
        ..TinyModel::default()
    };
    model.write(&out, 0, 1)?;
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-llama");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(assets.join(file), out.join(file))
            .with_context(|| format!("copying {file} from {}", assets.display()))?;
    }
    println!(
        "{}: {} parameters ({:.2} GB in f32)",
        out.display(),
        model.parameter_count(),
        model.parameter_count() as f64 * 4.0 / 1e9
    );
    Ok(())
}
