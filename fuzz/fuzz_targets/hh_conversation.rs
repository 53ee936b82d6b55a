//! The Anthropic HH-RLHF conversation parser: any text either parses into alternating turns (and then renders a
//! prompt ending in the Assistant cue) or is dropped with a reason; it never panics.
#![no_main]
use kto_data::hh::{convert_pair, parse_turns, split_conversation, Speaker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(turns) = parse_turns(text) {
        assert!(turns.len() % 2 == 0 && !turns.is_empty());
        assert_eq!(turns[0].speaker, Speaker::Human);
        assert_eq!(turns.last().unwrap().speaker, Speaker::Assistant);
    }
    if let Ok(split) = split_conversation(text) {
        assert!(split.prompt.ends_with("Assistant:\n"), "{split:?}");
        assert!(!split.response.is_empty());
    }
    // A row's two conversations: the input split at its first NUL.
    let (chosen, rejected) = text.split_once('\0').unwrap_or((text, text));
    if let Ok(pair) = convert_pair(chosen, rejected) {
        assert_eq!(Ok(pair.prompt.clone()), split_conversation(rejected).map(|s| s.prompt));
    }
});
