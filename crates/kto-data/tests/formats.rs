//! Every input format, detected and forced, and one clear error per kind of bad input.
use kto_data::formats::{parse_str, read_file, read_files, ReadOptions, ReadOutput};
use kto_data::hh::HhDropReason;
use kto_data::{Format, Message, Sample, Text};

fn read(text: &str) -> ReadOutput {
    parse_str("data.jsonl", text, &ReadOptions::default()).unwrap()
}

fn read_as(format: Format, text: &str) -> anyhow::Result<ReadOutput> {
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
    format!(
        "{:#}",
        parse_str("data.jsonl", text, &ReadOptions::default()).unwrap_err()
    )
}

#[test]
fn unpaired_trl_rows() {
    let out = read(concat!(
        r#"{"prompt": "Q1", "completion": "A1", "label": true}"#,
        "\n",
        "\n",
        r#"{"prompt": "Q2", "completion": "A2", "label": false, "pair": 4, "extra": 1}"#,
        "\n",
    ));
    assert_eq!(out.report.files[0].1, Format::Unpaired);
    assert_eq!(
        out.samples,
        vec![
            Sample::new("Q1", "A1", true),
            Sample::new("Q2", "A2", false).with_pair(4)
        ]
    );
    assert_eq!(
        (
            out.report.rows,
            out.report.pairs,
            out.report.desirable,
            out.report.undesirable
        ),
        (2, 0, 1, 1)
    );
}

#[test]
fn nemo_rows() {
    let out = read(concat!(
        r#"{"prompt": "Q", "response": "good", "preference": "chosen"}"#,
        "\n",
        r#"{"prompt": "Q", "response": "bad", "preference": "rejected"}"#,
    ));
    assert_eq!(out.report.files[0].1, Format::Nemo);
    assert_eq!(
        out.samples,
        vec![
            Sample::new("Q", "good", true),
            Sample::new("Q", "bad", false)
        ]
    );
}

#[test]
fn paired_rows_unpair_in_trls_order() {
    let out = read(concat!(
        r#"{"prompt": "Q1", "chosen": "C1", "rejected": "R1"}"#,
        "\n",
        r#"{"prompt": "Q2", "chosen": "C2", "rejected": "R2"}"#,
    ));
    assert_eq!(out.report.files[0].1, Format::Paired);
    assert_eq!(
        out.samples,
        vec![
            Sample::new("Q1", "C1", true).with_pair(0),
            Sample::new("Q2", "C2", true).with_pair(1),
            Sample::new("Q1", "R1", false).with_pair(0),
            Sample::new("Q2", "R2", false).with_pair(1),
        ]
    );
    assert_eq!((out.report.rows, out.report.pairs), (2, 2));
}

#[test]
fn paired_rows_unpair_in_chunks_of_1000() {
    let rows: Vec<String> = (0..1001)
        .map(|i| format!(r#"{{"prompt": "Q{i}", "chosen": "C", "rejected": "R"}}"#))
        .collect();
    let out = read(&rows.join("\n"));
    let labels: Vec<bool> = out.samples.iter().map(|s| s.label).collect();
    assert!(labels[..1000].iter().all(|&l| l) && labels[1000..2000].iter().all(|&l| !l));
    assert_eq!((labels[2000], labels[2001]), (true, false));
    assert_eq!(out.samples[2000].pair, Some(1000));
}

#[test]
fn conversational_rows() {
    let out = read(concat!(
        r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "#,
        r#""completion": [{"role": "assistant", "content": "Hello."}], "label": true}"#,
    ));
    assert_eq!(out.report.files[0].1, Format::Conversational);
    assert_eq!(
        out.samples[0].prompt,
        Text::Messages(vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi")
        ])
    );
    assert_eq!(
        out.samples[0].completion,
        Text::Messages(vec![Message::new("assistant", "Hello.")])
    );
    // Conversational preference pairs too.
    let out = read(concat!(
        r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}], "#,
        r#""rejected": [{"role": "assistant", "content": "Go."}]}"#,
    ));
    assert!(out.samples.iter().all(Sample::is_conversational));
    assert_eq!(out.samples.len(), 2);
}

#[test]
fn hh_rows_with_drops_counted_by_reason() {
    let out = read(concat!(
        r#"{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?", "rejected": "\n\nHuman: Hi\n\nAssistant: What."}"#,
        "\n",
        r#"{"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: Other\n\nAssistant: B"}"#,
        "\n",
        r#"{"chosen": "\n\nAssistant: B", "rejected": "\n\nHuman: A\n\nAssistant: B"}"#,
        "\n",
        r#"{"chosen": "\n\nHuman: A\n\nAssistant:", "rejected": "\n\nHuman: A\n\nAssistant: B"}"#,
    ));
    assert_eq!(out.report.files[0].1, Format::Hh);
    assert_eq!(
        out.samples,
        vec![
            Sample::new("Human:\nHi\nAssistant:\n", "Hello, how can I help?", true).with_pair(0),
            Sample::new("Human:\nHi\nAssistant:\n", "What.", false).with_pair(0),
        ]
    );
    assert_eq!((out.report.rows, out.report.pairs), (4, 4));
    assert_eq!(out.report.drops.get(HhDropReason::PromptsDiffer), 1);
    assert_eq!(out.report.drops.get(HhDropReason::NotAlternatingTurns), 1);
    assert_eq!(out.report.drops.get(HhDropReason::EmptyResponse), 1);
}

#[test]
fn json_array_files() {
    let out = read("[\n  {\"prompt\": \"Q\", \"completion\": \"A\", \"label\": true},\n  {\"prompt\": \"Q\", \"completion\": \"B\", \"label\": false}\n]");
    assert_eq!(out.samples.len(), 2);
    let message = error("[\n  {\"prompt\": \"Q\", \"completion\": \"A\", \"label\": true},\n  {\"prompt\": \"Q\", \"completion\": \"B\"}\n]");
    assert_eq!(message, "data.jsonl:3: missing field `label`");
    assert!(
        error("[\n {\"prompt\": 1,\n").starts_with("data.jsonl:3:"),
        "{}",
        error("[\n {\"prompt\": 1,\n")
    );
}

#[test]
fn forced_formats() {
    let nemo_keys = r#"{"prompt": "Q", "completion": "A", "label": true}"#;
    assert_eq!(
        format!("{:#}", read_as(Format::Nemo, nemo_keys).unwrap_err()),
        "data.jsonl:1: missing field `response`"
    );
    let plain = read_as(Format::Unpaired, nemo_keys).unwrap();
    assert_eq!(plain.report.files[0].1, Format::Unpaired);
    assert_eq!(
        format!("{:#}", read_as(Format::Conversational, nemo_keys).unwrap_err()),
        "data.jsonl:1: field `prompt` must be a list of {role, content} messages (format conversational), got a string"
    );
    let chat = r#"{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}], "label": true}"#;
    assert_eq!(
        format!("{:#}", read_as(Format::Unpaired, chat).unwrap_err()),
        "data.jsonl:1: field `prompt` must be a string in format unpaired, got a list (lists of messages are format conversational)"
    );
}

#[test]
fn format_names() {
    for (name, format) in [
        ("auto", Format::Auto),
        ("unpaired", Format::Unpaired),
        ("trl", Format::Unpaired),
        ("nemo", Format::Nemo),
        ("paired", Format::Paired),
        ("hh", Format::Hh),
        ("conversational", Format::Conversational),
    ] {
        assert_eq!(name.parse::<Format>().unwrap(), format);
    }
    assert_eq!(
        "jsonl".parse::<Format>().unwrap_err().to_string(),
        "unknown data format \"jsonl\": expected one of auto, unpaired, trl, nemo, paired, hh, conversational"
    );
    #[derive(serde::Deserialize)]
    struct Config {
        #[allow(dead_code)]
        format: Format,
    }
    let error = toml_like(r#"{"format": "csv"}"#);
    assert!(error.contains("unknown data format \"csv\""), "{error}");
    fn toml_like(json: &str) -> String {
        serde_json::from_str::<Config>(json)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }
}

#[test]
fn bad_input_errors_name_file_line_and_field() {
    let good = r#"{"prompt": "Q", "completion": "A", "label": true}"#;
    let cases = [
        ("{\"prompt\": \"Q\", \"completion\": ", "data.jsonl:2: malformed JSON at column 30: EOF while parsing a value"),
        (r#"["Q", "A", true]"#, "data.jsonl:2: expected a JSON object, got a list"),
        (r#"{"prompt": "Q", "label": true, "completion": null}"#, "data.jsonl:2: field `completion` must be a string, got null"),
        (r#"{"prompt": "Q", "label": true}"#, "data.jsonl:2: missing field `completion`"),
        (r#"{"prompt": 3, "completion": "A", "label": true}"#, "data.jsonl:2: field `prompt` must be a string, got a number"),
        (r#"{"prompt": "  ", "completion": "A", "label": true}"#, "data.jsonl:2: field `prompt` is empty"),
        (r#"{"prompt": "Q", "completion": "", "label": true}"#, "data.jsonl:2: field `completion` is empty"),
        (r#"{"prompt": "Q", "completion": "A", "label": "yes"}"#, "data.jsonl:2: field `label` must be true/false or \"chosen\"/\"rejected\", got \"yes\""),
        (r#"{"prompt": "Q", "completion": "A", "label": 1}"#, "data.jsonl:2: field `label` must be true/false or \"chosen\"/\"rejected\", got 1"),
        (r#"{"prompt": "Q", "completion": "A", "label": true, "pair": -1}"#, "data.jsonl:2: field `pair` must be a non-negative integer, got -1"),
    ];
    for (bad, expected) in cases {
        assert_eq!(error(&format!("{good}\n{bad}\n")), expected);
    }
    let nemo = r#"{"prompt": "Q", "response": "A", "preference": "good"}"#;
    assert_eq!(error(nemo), "data.jsonl:1: field `preference` must be true/false or \"chosen\"/\"rejected\", got \"good\"");
    let chat = r#"{"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "x"}], "label": true}"#;
    assert_eq!(
        error(chat),
        "data.jsonl:1: field `prompt`: message 0 must be an object with string `role` and `content`, got {\"role\":\"user\"}"
    );
    let paired = r#"{"prompt": "Q", "chosen": "", "rejected": "R"}"#;
    assert_eq!(error(paired), "data.jsonl:1: field `chosen` is empty");
    let unknown = error(r#"{"question": "Q", "answer": "A"}"#);
    assert!(
        unknown.starts_with(
            "data.jsonl:1: cannot detect the data format from the keys [answer, question]"
        ),
        "{unknown}"
    );
    assert!(
        unknown.contains("nemo (prompt, response, preference)"),
        "{unknown}"
    );
}

#[test]
fn skip_invalid_counts_and_keeps_going() {
    let text = concat!(
        r#"{"prompt": "Q", "completion": "A", "label": true}"#,
        "\n",
        r#"{"prompt": "Q", "completion": "A", "label": "maybe"}"#,
        "\n",
        "not json\n",
        r#"{"prompt": "Q", "completion": "B", "label": false}"#,
    );
    let out = parse_str(
        "data.jsonl",
        text,
        &ReadOptions {
            format: Format::Auto,
            skip_invalid: true,
        },
    )
    .unwrap();
    assert_eq!(out.samples.len(), 2);
    assert_eq!((out.report.rows, out.report.skipped_invalid), (4, 2));
    assert!(out.report.to_string().contains("invalid rows skipped: 2"));
}

#[test]
fn files_keep_pair_ids_apart() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.json");
    std::fs::write(&a, r#"{"prompt": "Q", "chosen": "C", "rejected": "R"}"#).unwrap();
    std::fs::write(
        &b,
        r#"[{"prompt": "Q2", "chosen": "C2", "rejected": "R2"}]"#,
    )
    .unwrap();
    let out = read_files(&[&a, &b], &ReadOptions::default()).unwrap();
    let pairs: Vec<Option<u64>> = out.samples.iter().map(|s| s.pair).collect();
    assert_eq!(pairs, vec![Some(0), Some(0), Some(1), Some(1)]);
    assert_eq!(
        out.report.files,
        vec![(a.clone(), Format::Paired), (b, Format::Paired)]
    );
    let missing = format!(
        "{:#}",
        read_file(&dir.path().join("none.jsonl"), &ReadOptions::default()).unwrap_err()
    );
    assert!(
        missing.starts_with("cannot read ") && missing.contains("none.jsonl"),
        "{missing}"
    );
}
