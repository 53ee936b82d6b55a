//! Edge cases of the data readers, found by hand and by the fuzzers in `fuzz/` (scripts/fuzz.sh): each input that
//! once misbehaved, or that sits on a boundary the fuzzers explore, stays here as a regression test.
use kto_data::formats::{decode_text, parse_str, Format, ReadOptions};
use kto_data::hh::{convert_pair, parse_turns, split_conversation, HhDropReason};

fn read(text: &str, format: Format) -> anyhow::Result<kto_data::formats::ReadOutput> {
    parse_str(
        "data.jsonl",
        text,
        &ReadOptions {
            format,
            skip_invalid: false,
        },
    )
}

fn error(text: &str) -> String {
    format!("{:#}", read(text, Format::Auto).unwrap_err())
}

const ROW: &str = r#"{"prompt": "Q", "completion": "A", "label": true}"#;

#[test]
fn utf16_and_utf32_files_are_refused_by_name() {
    for (bom, name) in [
        (&[0xFF, 0xFE][..], "UTF-16LE"),
        (&[0xFE, 0xFF][..], "UTF-16BE"),
        (&[0xFF, 0xFE, 0, 0][..], "UTF-32LE"),
        (&[0, 0, 0xFE, 0xFF][..], "UTF-32BE"),
    ] {
        let mut bytes = bom.to_vec();
        bytes.extend_from_slice(b"{\0}\0");
        let message = decode_text("data.jsonl", bytes).unwrap_err().to_string();
        assert!(
            message.starts_with("data.jsonl: the file is ") && message.contains(name),
            "{message}"
        );
    }
}

#[test]
fn invalid_utf8_names_line_and_column() {
    let bytes = format!("{ROW}\n{ROW}\n{{\"prompt\": \"")
        .into_bytes()
        .into_iter()
        .chain([0xC3, 0x28]) // a truncated two-byte sequence
        .collect();
    let message = decode_text("data.jsonl", bytes).unwrap_err().to_string();
    assert_eq!(
        message,
        "data.jsonl:3: not valid UTF-8 (byte 0xC3 at column 13); save the file as UTF-8"
    );
}

#[test]
fn utf8_byte_order_mark_is_skipped() {
    let bytes = format!("\u{feff}{ROW}\n").into_bytes();
    let text = decode_text("data.jsonl", bytes).unwrap();
    let output = read(&text, Format::Auto).unwrap();
    assert_eq!(output.samples.len(), 1);
    // also before a JSON array
    let output = read(&format!("\u{feff}[{ROW}]"), Format::Auto).unwrap();
    assert_eq!(output.samples.len(), 1);
}

#[test]
fn empty_and_blank_files_are_refused() {
    for text in ["", "\n", "  \n\t\n", "\u{feff}"] {
        assert_eq!(error(text), "data.jsonl: no rows (the file is empty)");
    }
    assert!(error("[]").contains("no rows"), "{}", error("[]"));
}

#[test]
fn malformed_rows_name_the_line_and_column() {
    assert_eq!(
        error(&format!("{ROW}\n{ROW}\n{{\"prompt\" \"Q\"}}")),
        "data.jsonl:3: malformed JSON at column 11: expected `:`"
    );
    assert!(error("[{\"prompt\": ").starts_with("data.jsonl:1:"));
}

#[test]
fn rows_of_every_json_type_are_refused_not_panicked() {
    for row in [
        "1", "\"x\"", "null", "true", "[]", "[1, [2]]", "-0", "1e999",
    ] {
        let message = error(&format!("{ROW}\n{row}\n"));
        assert!(message.starts_with("data.jsonl:2: "), "{row}: {message}");
    }
    for format in [
        Format::Unpaired,
        Format::Paired,
        Format::Conversational,
        Format::Hh,
        Format::Nemo,
    ] {
        assert!(read("{}", format).is_err(), "{format:?}");
    }
}

#[test]
fn hh_conversation_boundaries() {
    // bare markers, empty bodies, markers glued together, text before the first marker
    assert_eq!(
        split_conversation("\n\nHuman:\n\nAssistant:"),
        Err(HhDropReason::EmptyResponse)
    );
    assert_eq!(
        split_conversation("\n\nHuman:\n\nAssistant: x")
            .unwrap()
            .prompt,
        "Human:\n\nAssistant:\n"
    );
    assert!(parse_turns("").is_err());
    assert!(parse_turns("\n\nAssistant: x").is_err());
    assert!(parse_turns("hello\n\nHuman: a\n\nAssistant: b").is_err());
    assert!(parse_turns("\n\nHuman: a\n\nHuman: b\n\nAssistant: c").is_err());
    assert!(parse_turns("\n\nHuman: a\n\nAssistant: b\n\nHuman: c").is_err());
    // markers inside a multi-byte neighbourhood: slicing stays on char boundaries
    let pair = convert_pair(
        "\n\nHuman:é\n\nAssistant:ü\u{1F600}",
        " \u{3000}\n\nHuman: é\n\nAssistant: no",
    );
    assert_eq!(pair.unwrap().chosen, "ü\u{1F600}");
    assert_eq!(
        convert_pair(
            "\n\nHuman: a\n\nAssistant: b",
            "\n\nHuman: c\n\nAssistant: d"
        ),
        Err(HhDropReason::PromptsDiffer)
    );
}
