//! Counts of examples left out, by reason: every drop is counted and reported, never silent.
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounts(BTreeMap<String, usize>);

impl DropCounts {
    pub fn add(&mut self, reason: impl fmt::Display) {
        *self.0.entry(reason.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &DropCounts) {
        for (reason, count) in &other.0 {
            *self.0.entry(reason.clone()).or_default() += count;
        }
    }

    pub fn get(&self, reason: impl fmt::Display) -> usize {
        self.0.get(&reason.to_string()).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, usize)> {
        self.0
            .iter()
            .map(|(reason, count)| (reason.as_str(), *count))
    }
}

impl fmt::Display for DropCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "none");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(reason, count)| format!("{count} {reason}"))
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}
