//! `kto generate`: continue a prompt with the base model and (by default) the trained adapter.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use kto_data::tokenize::TokenizerBundle;
use kto_model::{AdapterChoice, GenerationOptions, LlamaModel};
use kto_trainer::base_model::BaseModel;

use super::model_source::ModelSource;

const EXAMPLES: &str = "\
Examples:
  # the adapter that `kto train --config configs/tiny.toml` wrote (output_dir/adapter), greedy
  kto generate --config configs/tiny.toml --prompt $'\\n\\nHuman: How do I boil an egg?\\n\\nAssistant:'

  # sampled, reproducible with --seed; compare with the base model (--no-adapter)
  kto generate --config configs/tiny.toml --prompt 'Once upon a time' --temperature 0.7 --top-p 0.9 --seed 1
  kto generate --config configs/tiny.toml --prompt 'Once upon a time' --no-adapter

  # a merged export (`kto export`) is a model of its own
  kto generate --config configs/tiny.toml --set model.path=runs/tiny/merged --no-adapter --prompt 'Hi'";

/// Continue a prompt: prints only the generated text on stdout.
///
/// The prompt is used verbatim (tokenized with the tokenizer's special tokens, e.g. a Llama BOS); use `kto chat`
/// for a conversation rendered with the chat template.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Which model and adapter to load (shared by `kto generate` and `kto chat`).
#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// Use the base model alone, even when a trained adapter exists.
    #[arg(long, conflicts_with = "adapter")]
    pub no_adapter: bool,
}

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// The most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature, >= 0; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0, value_parser = parse_temperature)]
    pub temperature: f64,
    /// Nucleus sampling, in (0, 1]: sample among the most likely tokens that make up this much probability (1
    /// keeps all).
    #[arg(long, default_value_t = 1.0, value_parser = parse_top_p)]
    pub top_p: f64,
    /// Seed of the sampler (same seed, same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn parse_temperature(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if t >= 0.0 && t.is_finite() => Ok(t),
        _ => Err(format!(
            "expected a number >= 0 (0 = greedy, 0.7 = a common choice), got {text}"
        )),
    }
}

fn parse_top_p(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!(
            "expected a number in (0, 1] (1 keeps every token, 0.9 a common choice), got {text}"
        )),
    }
}

/// A model ready to generate: weights, optional adapter, tokenizer, stop tokens.
pub struct Generator {
    pub model: LlamaModel,
    pub tokenizer: TokenizerBundle,
    choice: AdapterChoice,
    stop_tokens: Vec<u32>,
}

impl Generator {
    /// Loads the config's model and the adapter chosen by `args` (saying which on the log).
    pub fn load(args: &ModelArgs) -> Result<Self> {
        let (config, adapter) = args.source.load(args.no_adapter)?;
        let mut base = BaseModel::from_checkpoint(&config, args.source.base_model(&config)?)?;
        let source = base.checkpoint.source().display().to_string();
        let choice = match &adapter {
            Some(dir) => {
                let lora = base
                    .load_adapter(dir)
                    .with_context(|| format!("adapter {}", dir.display()))?;
                base.model.set_policy_adapter(Some(lora))?;
                tracing::info!("model {source} with adapter {}", dir.display());
                AdapterChoice::PolicyNoGrad
            }
            None => {
                tracing::info!("model {source} without adapter");
                AdapterChoice::Reference
            }
        };
        base.model.set_training(false, 0)?;
        let mut stop_tokens = base.checkpoint.config.eos_token_ids.clone();
        if !stop_tokens.contains(&base.tokenizer.eos_id) {
            stop_tokens.push(base.tokenizer.eos_id);
        }
        Ok(Self {
            model: base.model,
            tokenizer: base.tokenizer,
            choice,
            stop_tokens,
        })
    }

    /// The room left for new tokens after `prompt_tokens` (the model's `max_position_embeddings`).
    pub fn room_after(&self, prompt_tokens: usize) -> usize {
        self.model
            .config()
            .max_position_embeddings
            .saturating_sub(prompt_tokens)
    }

    /// Generates after the token ids `prompt`; returns the new tokens' text.
    pub fn continue_ids(&self, prompt: &[u32], sampling: &SamplingArgs) -> Result<String> {
        let room = self.room_after(prompt.len());
        if room == 0 {
            bail!(
                "the prompt has {} tokens, as many as the model's max_position_embeddings ({}): shorten it",
                prompt.len(),
                self.model.config().max_position_embeddings
            );
        }
        if sampling.max_new_tokens > room {
            tracing::warn!(
                "--max-new-tokens {} lowered to {room}: the model handles {} positions and the prompt takes {}",
                sampling.max_new_tokens,
                self.model.config().max_position_embeddings,
                prompt.len()
            );
        }
        let options = GenerationOptions {
            max_new_tokens: sampling.max_new_tokens.min(room),
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            seed: sampling.seed,
            stop_tokens: self.stop_tokens.clone(),
        };
        let started = Instant::now();
        let generation = kto_model::generate(&self.model, prompt, &options, self.choice)?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::debug!(
            "{} tokens in {seconds:.2} s ({:.1} tokens/s), stopped by {:?}",
            generation.tokens.len(),
            generation.tokens.len() as f64 / seconds.max(1e-9),
            generation.stop
        );
        self.tokenizer.decode(&generation.tokens)
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let generator = Generator::load(&args.model)?;
    let prompt = generator.tokenizer.encode(&args.prompt, true)?;
    if prompt.is_empty() {
        bail!("--prompt is empty: give some text to continue");
    }
    let text = generator.continue_ids(&prompt, &args.sampling)?;
    println!("{text}");
    Ok(())
}
