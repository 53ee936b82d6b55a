//! The JSONL / JSON-array readers, every format: any text gives samples or one error naming the source; never a
//! panic. Samples always carry a prompt and a completion.
#![no_main]
use kto_data::formats::{parse_str, Format, ReadOptions};
use libfuzzer_sys::fuzz_target;

const FORMATS: [Format; 6] = [
    Format::Auto,
    Format::Unpaired,
    Format::Paired,
    Format::Conversational,
    Format::Hh,
    Format::Nemo,
];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the format and whether invalid rows are skipped; the rest is the file.
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let options = ReadOptions {
        format: FORMATS[selector as usize % FORMATS.len()],
        skip_invalid: selector & 0x80 != 0,
    };
    match parse_str("fuzz.jsonl", text, &options) {
        Ok(output) => {
            let report = &output.report;
            assert_eq!(report.desirable + report.undesirable, output.samples.len());
        }
        Err(error) => {
            let message = format!("{error:#}");
            assert!(message.contains("fuzz.jsonl"), "error without the file: {message}");
        }
    }
});
