//! A data file's raw bytes (any encoding, any garbage) through decoding and reading: never a panic, and every
//! error names the file.
#![no_main]
use kto_data::formats::{decode_text, parse_str, ReadOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let result = decode_text("fuzz.jsonl", data.to_vec())
        .and_then(|text| parse_str("fuzz.jsonl", &text, &ReadOptions::default()));
    if let Err(error) = result {
        let message = format!("{error:#}");
        assert!(message.contains("fuzz.jsonl"), "error without the file: {message}");
    }
});
