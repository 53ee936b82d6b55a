//! One unpaired KTO example: a prompt, a completion, and whether the completion is desirable.
use serde::{Deserialize, Serialize};

/// One chat message, as HF chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A prompt or a completion: plain text, or (conversational data) a list of messages rendered by the chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Text {
    Plain(String),
    Messages(Vec<Message>),
}

impl Text {
    pub fn is_messages(&self) -> bool {
        matches!(self, Text::Messages(_))
    }

    pub fn as_plain(&self) -> Option<&str> {
        match self {
            Text::Plain(text) => Some(text),
            Text::Messages(_) => None,
        }
    }

    /// Empty text, an empty message list, or messages whose contents are all blank.
    pub fn is_blank(&self) -> bool {
        match self {
            Text::Plain(text) => text.trim().is_empty(),
            Text::Messages(messages) => messages.iter().all(|m| m.content.trim().is_empty()),
        }
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Text::Plain(text.to_owned())
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Text::Plain(text)
    }
}

/// One unpaired example. `label` is true for a desirable completion. Samples made from one preference pair (the
/// chosen and the rejected answer to one prompt) share a `pair` id, so that pair accuracy can be measured later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: Text,
    pub completion: Text,
    pub label: bool,
    pub pair: Option<u64>,
}

impl Sample {
    pub fn new(prompt: impl Into<Text>, completion: impl Into<Text>, label: bool) -> Self {
        Self {
            prompt: prompt.into(),
            completion: completion.into(),
            label,
            pair: None,
        }
    }

    pub fn with_pair(mut self, pair: u64) -> Self {
        self.pair = Some(pair);
        self
    }

    pub fn is_conversational(&self) -> bool {
        self.prompt.is_messages() || self.completion.is_messages()
    }
}
