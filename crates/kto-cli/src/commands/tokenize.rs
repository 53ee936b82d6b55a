//! `kto tokenize`: the token ids kto's tokenizer gives a text, for checking against transformers.
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;

use super::model_source::ConfigSource;

const EXAMPLES: &str = "\
Examples:
  kto tokenize --config configs/smollm2-hh.toml --text 'Hello world'
  kto tokenize --config configs/tiny.toml --file prompt.txt --json

  # the same ids in transformers: AutoTokenizer.from_pretrained(...)(text).input_ids";

/// Tokenize a text with the tokenizer of the config's model, as TRL tokenizes a prompt: with the tokenizer's own
/// special tokens (a BOS when the tokenizer adds one); special-token text such as <|im_end|> is one token.
///
/// Prints the ids and the tokens, one `id<TAB>token` line each, or with --json `{"ids": [...], "tokens": [...]}`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// The text to tokenize.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub text: Option<String>,
    /// A file whose whole contents (UTF-8, kept byte for byte) are the text.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Print `{"ids": [...], "tokens": [...]}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let text = match (&args.text, &args.file) {
        (Some(text), _) => text.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("--file {}: cannot read it as UTF-8 text", file.display()))?,
        (None, None) => unreachable!("clap requires --text or --file"),
    };
    let (_, checkpoint) = args.source.load()?;
    let bundle = checkpoint.tokenizer()?;
    let encoding = bundle
        .tokenizer
        .encode(text.as_str(), true)
        .map_err(|e| anyhow!("tokenizing: {e}"))?;
    if args.json {
        let value = serde_json::json!({"ids": encoding.get_ids(), "tokens": encoding.get_tokens()});
        println!("{value}");
    } else {
        for (id, token) in encoding.get_ids().iter().zip(encoding.get_tokens()) {
            println!("{id}\t{token}");
        }
    }
    Ok(())
}
