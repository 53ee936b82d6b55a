//! Anthropic HH-RLHF conversations → (prompt, response), rendered as NeMo Aligner's KTO preparation does, but
//! keeping every earlier turn.
//!
//! A raw HH-RLHF row holds `chosen` and `rejected`, each a whole conversation: `"\n\nHuman: …\n\nAssistant: …"`,
//! repeated. The last Assistant turn is the response; every turn before it forms the prompt, each Human turn
//! rendered `Human:\n{body}\n` and each Assistant turn `Assistant:\n{body}\n`, ending with `Assistant:\n`:
//!
//! ```text
//! "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine."
//!   → prompt "Human:\nHi\nAssistant:\nHello!\nHuman:\nHow are you?\nAssistant:\n", response "Fine."
//! ```
//!
//! Turn bodies are trimmed of surrounding whitespace. A pair is dropped (and counted by [`HhDropReason`]) when a
//! conversation does not parse into alternating turns that start with Human and end with Assistant, when its final
//! response is empty, or when the chosen and rejected prompts differ.
use std::fmt;

const HUMAN_MARKER: &str = "\n\nHuman:";
const ASSISTANT_MARKER: &str = "\n\nAssistant:";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    Human,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub speaker: Speaker,
    pub body: String,
}

/// Why an HH-RLHF pair was left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HhDropReason {
    /// Not a sequence of Human/Assistant turns that alternate, start with Human and end with Assistant.
    NotAlternatingTurns,
    /// The last Assistant turn is empty: there is no response to learn from.
    EmptyResponse,
    /// The chosen and rejected conversations do not share the same prompt.
    PromptsDiffer,
}

impl fmt::Display for HhDropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HhDropReason::NotAlternatingTurns => {
                "HH pairs whose text does not parse into alternating turns"
            }
            HhDropReason::EmptyResponse => "HH pairs with an empty final response",
            HhDropReason::PromptsDiffer => "HH pairs whose chosen and rejected prompts differ",
        })
    }
}

/// A conversation split into the rendered prompt and the final Assistant response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptResponse {
    pub prompt: String,
    pub response: String,
}

/// One HH-RLHF row converted: a shared prompt and the two responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HhPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Splits a raw conversation into its turns. Leading whitespace before the first marker is allowed (some copies
/// of the data set lose the initial "\n\n"); any other text before it is not.
pub fn parse_turns(conversation: &str) -> Result<Vec<Turn>, HhDropReason> {
    let text = format!("\n\n{}", conversation.trim_start());
    let mut markers: Vec<(usize, Speaker, usize)> = Vec::new();
    for (marker, speaker) in [
        (HUMAN_MARKER, Speaker::Human),
        (ASSISTANT_MARKER, Speaker::Assistant),
    ] {
        markers.extend(
            text.match_indices(marker)
                .map(|(at, m)| (at, speaker, m.len())),
        );
    }
    markers.sort_by_key(|(at, _, _)| *at);
    if markers.first().map(|(at, _, _)| *at) != Some(0) {
        return Err(HhDropReason::NotAlternatingTurns);
    }
    let turns: Vec<Turn> = markers
        .iter()
        .enumerate()
        .map(|(i, &(at, speaker, len))| {
            let end = markers.get(i + 1).map_or(text.len(), |(next, _, _)| *next);
            Turn {
                speaker,
                body: text[at + len..end].trim().to_owned(),
            }
        })
        .collect();
    let alternates = turns.iter().enumerate().all(|(i, turn)| {
        turn.speaker
            == if i % 2 == 0 {
                Speaker::Human
            } else {
                Speaker::Assistant
            }
    });
    if !alternates || !turns.len().is_multiple_of(2) {
        return Err(HhDropReason::NotAlternatingTurns);
    }
    Ok(turns)
}

/// Renders every turn but the last as the prompt; the last (Assistant) turn is the response.
pub fn split_conversation(conversation: &str) -> Result<PromptResponse, HhDropReason> {
    let turns = parse_turns(conversation)?;
    let (last, earlier) = turns
        .split_last()
        .ok_or(HhDropReason::NotAlternatingTurns)?;
    if last.body.is_empty() {
        return Err(HhDropReason::EmptyResponse);
    }
    let mut prompt = String::new();
    for turn in earlier {
        let name = match turn.speaker {
            Speaker::Human => "Human",
            Speaker::Assistant => "Assistant",
        };
        prompt.push_str(&format!("{name}:\n{}\n", turn.body));
    }
    prompt.push_str("Assistant:\n");
    Ok(PromptResponse {
        prompt,
        response: last.body.clone(),
    })
}

/// Converts one HH-RLHF row. The chosen conversation's failure is reported first.
pub fn convert_pair(chosen: &str, rejected: &str) -> Result<HhPair, HhDropReason> {
    let chosen = split_conversation(chosen)?;
    let rejected = split_conversation(rejected)?;
    if chosen.prompt != rejected.prompt {
        return Err(HhDropReason::PromptsDiffer);
    }
    Ok(HhPair {
        prompt: chosen.prompt,
        chosen: chosen.response,
        rejected: rejected.response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_turn() {
        let pair = convert_pair(
            "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
            "\n\nHuman: What is 2+2?\n\nAssistant: Go away.",
        )
        .unwrap();
        assert_eq!(
            pair,
            HhPair {
                prompt: "Human:\nWhat is 2+2?\nAssistant:\n".into(),
                chosen: "It is 4.".into(),
                rejected: "Go away.".into(),
            }
        );
    }

    #[test]
    fn multi_turn_keeps_earlier_turns() {
        let chosen = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An apple.";
        let rejected = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: No.";
        let pair = convert_pair(chosen, rejected).unwrap();
        assert_eq!(pair.prompt, "Human:\nHi there\nAssistant:\nHello! How can I help?\nHuman:\nName a fruit.\nAssistant:\n");
        assert_eq!(pair.chosen, "An apple.");
        assert_eq!(pair.rejected, "No.");
    }

    #[test]
    fn bodies_are_trimmed_and_leading_newlines_optional() {
        let split = split_conversation("Human:   Hello  \n\n\nAssistant:  Hi.  \n").unwrap();
        assert_eq!(
            split,
            PromptResponse {
                prompt: "Human:\nHello\nAssistant:\n".into(),
                response: "Hi.".into()
            }
        );
        // A body may mention "Human:" without the "\n\n" that marks a turn.
        let split =
            split_conversation("\n\nHuman: Say Human: twice\n\nAssistant: Human: Human:").unwrap();
        assert_eq!(split.prompt, "Human:\nSay Human: twice\nAssistant:\n");
        assert_eq!(split.response, "Human: Human:");
    }

    #[test]
    fn malformed_conversations() {
        let cases = [
            "no markers at all",
            "preamble\n\nHuman: Hi\n\nAssistant: Hello",
            "\n\nAssistant: I speak first\n\nHuman: Hi",
            "\n\nHuman: Hi\n\nHuman: Anyone?\n\nAssistant: Yes",
            "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye",
            "",
        ];
        for case in cases {
            assert_eq!(
                split_conversation(case),
                Err(HhDropReason::NotAlternatingTurns),
                "{case:?}"
            );
        }
        assert_eq!(
            split_conversation("\n\nHuman: Hi\n\nAssistant:"),
            Err(HhDropReason::EmptyResponse)
        );
        assert_eq!(
            split_conversation("\n\nHuman: Hi\n\nAssistant:   "),
            Err(HhDropReason::EmptyResponse)
        );
    }

    #[test]
    fn prompts_that_differ_are_dropped() {
        let result = convert_pair(
            "\n\nHuman: Hi\n\nAssistant: Hello",
            "\n\nHuman: Hey\n\nAssistant: Hello",
        );
        assert_eq!(result, Err(HhDropReason::PromptsDiffer));
        let result = convert_pair(
            "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Q\n\nAssistant: A",
            "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Q\n\nAssistant: B",
        );
        assert_eq!(result, Err(HhDropReason::PromptsDiffer));
    }
}
