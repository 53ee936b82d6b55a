//! `kto chat`: a conversation with the model on stdin/stdout, rendered with the tokenizer's chat template, or as
//! Anthropic HH text ("\n\nHuman: ...\n\nAssistant:") when the tokenizer has none.
use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result};
use clap::Args;
use kto_data::sample::Message;
use kto_data::tokenize::TokenizerBundle;

use super::generate::{Generator, ModelArgs, SamplingArgs};

const EXAMPLES: &str = "\
Examples:
  # talk to the adapter `kto train --config configs/tiny.toml` wrote; /reset starts over, /exit quits
  kto chat --config configs/tiny.toml --temperature 0.7 --top-p 0.9

  # scripted: one user message per line on stdin, one reply per turn on stdout
  printf 'How do I boil an egg?\\nAnd poach one?\\n' | kto chat --config configs/tiny.toml --quiet";

/// Chat with the model: one user message per line, the conversation kept between turns.
///
/// Commands: `/reset` forgets the conversation, `/exit` (or end of input) quits. When the conversation outgrows the
/// model's context, the oldest exchanges are forgotten.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Where a reply ends when the model goes on to write the user's next turn itself.
const STOP_TEXTS: &[&str] = &["\n\nHuman:"];

pub fn run(args: ChatArgs) -> Result<()> {
    let generator = Generator::load(&args.model)?;
    let template = if generator.tokenizer.chat_template.is_some() {
        "the tokenizer's chat template"
    } else {
        "the HH template (\\n\\nHuman: ... \\n\\nAssistant:)"
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chat using {template}; /reset starts over, /exit quits");
    } else {
        tracing::info!("chat using {template}");
    }
    let mut conversation: Vec<Message> = Vec::new();
    let mut lines = std::io::stdin().lock().lines();
    let mut stdout = std::io::stdout();
    for turn in 0u64.. {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                conversation.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        conversation.push(Message::new("user", text));
        let prompt = fit_to_context(&generator, &mut conversation, args.sampling.max_new_tokens)?;
        let sampling = SamplingArgs {
            seed: args.sampling.seed.wrapping_add(turn),
            ..args.sampling
        };
        let reply = cut_at_stop_text(&generator.continue_ids(&prompt, &sampling)?);
        writeln!(stdout, "{reply}")?;
        stdout.flush()?;
        conversation.push(Message::new("assistant", reply));
    }
    Ok(())
}

/// The prompt ids of the conversation, forgetting the oldest exchanges while there is no room for
/// `max_new_tokens` (the last user message is always kept).
fn fit_to_context(
    generator: &Generator,
    conversation: &mut Vec<Message>,
    max_new_tokens: usize,
) -> Result<Vec<u32>> {
    loop {
        let ids = render(&generator.tokenizer, conversation)?;
        if generator.room_after(ids.len()) >= max_new_tokens || conversation.len() <= 1 {
            return Ok(ids);
        }
        conversation.drain(..2.min(conversation.len() - 1));
        tracing::warn!("the conversation outgrew the model's context: forgot the oldest exchange");
    }
}

/// The conversation as prompt ids ending where the assistant's reply starts.
fn render(tokenizer: &TokenizerBundle, conversation: &[Message]) -> Result<Vec<u32>> {
    match &tokenizer.chat_template {
        Some(_) => tokenizer.encode_chat(conversation, true),
        None => tokenizer.encode(&hh_text(conversation), true),
    }
}

/// Anthropic HH rendering: "\n\nHuman: ...\n\nAssistant: ..." and a final "\n\nAssistant:".
fn hh_text(conversation: &[Message]) -> String {
    let mut text = String::new();
    for message in conversation {
        let speaker = if message.role == "assistant" {
            "Assistant"
        } else {
            "Human"
        };
        text.push_str(&format!("\n\n{speaker}: {}", message.content));
    }
    text.push_str("\n\nAssistant:");
    text
}

fn cut_at_stop_text(reply: &str) -> String {
    let end = STOP_TEXTS
        .iter()
        .filter_map(|stop| reply.find(stop))
        .min()
        .unwrap_or(reply.len());
    reply[..end].trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_rendering_and_stop_text() {
        let conversation = [
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello."),
            Message::new("user", "Bye"),
        ];
        assert_eq!(
            hh_text(&conversation),
            "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:"
        );
        assert_eq!(
            cut_at_stop_text(" Sure.\n\nHuman: thanks\n\nAssistant: ok"),
            "Sure."
        );
        assert_eq!(cut_at_stop_text(" no stop "), "no stop");
    }
}
