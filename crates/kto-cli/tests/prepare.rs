//! `kto prepare` end to end: formats in, train/test JSONL out, report, errors.
mod common;

use std::path::Path;

use common::{kto_warn, stderr, stdout};

fn rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn hh_row(i: usize) -> String {
    serde_json::json!({
        "chosen": format!("\n\nHuman: Question {i}?\n\nAssistant: A helpful answer {i}."),
        "rejected": format!("\n\nHuman: Question {i}?\n\nAssistant: No."),
    })
    .to_string()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "train.jsonl" && name != "test.jsonl")
        .collect()
}

#[test]
fn hh_input_is_split_by_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("hh.jsonl");
    let mut lines: Vec<String> = (0..20).map(hh_row).collect();
    lines.push(
        r#"{"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: B"}"#
            .into(),
    );
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    let output = kto_warn(
        dir.path(),
        &[
            "prepare",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--test-fraction",
            "0.25",
            "--seed",
            "3",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let report = stdout(&output);
    assert!(report.contains("as hh"), "{report}");
    assert!(report.contains("rows read: 21 (21 pairs)"), "{report}");
    assert!(
        report.contains("dropped: 1 HH pairs whose chosen and rejected prompts differ"),
        "{report}"
    );
    assert!(
        report.contains("train.jsonl: 30 samples (15 desirable, 15 undesirable)"),
        "{report}"
    );
    assert!(
        report.contains("test.jsonl: 10 samples (5 desirable, 5 undesirable)"),
        "{report}"
    );

    let train = rows(&out.join("train.jsonl"));
    let test = rows(&out.join("test.jsonl"));
    assert_eq!((train.len(), test.len()), (30, 10));
    let first_line = std::fs::read_to_string(out.join("train.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    assert!(
        first_line.starts_with(r#"{"prompt":"Human:\nQuestion "#),
        "{first_line}"
    );
    assert!(
        first_line.contains(r#"","completion":""#) && first_line.contains(r#","label":"#),
        "{first_line}"
    );
    let test_pairs: Vec<u64> = test.iter().map(|r| r["pair"].as_u64().unwrap()).collect();
    assert!(train
        .iter()
        .all(|r| !test_pairs.contains(&r["pair"].as_u64().unwrap())));
    assert!(train.iter().all(|r| r["prompt"]
        .as_str()
        .unwrap()
        .starts_with("Human:\nQuestion ")));
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));

    // Same seed, same files.
    let again = dir.path().join("again");
    let output = kto_warn(
        dir.path(),
        &[
            "prepare",
            "--input",
            input.to_str().unwrap(),
            "--out",
            again.to_str().unwrap(),
            "--test-fraction",
            "0.25",
            "--seed",
            "3",
        ],
    );
    assert!(output.status.success());
    assert_eq!(
        std::fs::read(out.join("train.jsonl")).unwrap(),
        std::fs::read(again.join("train.jsonl")).unwrap()
    );
}

#[test]
fn train_and_test_inputs_keep_their_split_in_nemo_style() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let test = dir.path().join("test.json");
    std::fs::write(&train, (0..6).map(hh_row).collect::<Vec<_>>().join("\n")).unwrap();
    std::fs::write(&test, format!("[{}, {}]", hh_row(100), hh_row(101))).unwrap();
    let out = dir.path().join("out");
    let output = kto_warn(
        dir.path(),
        &[
            "prepare",
            "--input",
            train.to_str().unwrap(),
            test.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--style",
            "nemo",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("split: kept from the input files"));
    let test_rows = rows(&out.join("test.jsonl"));
    assert_eq!(test_rows.len(), 4);
    assert!(test_rows
        .iter()
        .all(|r| r["prompt"].as_str().unwrap().contains("Question 10")));
    let preferences: Vec<&str> = test_rows
        .iter()
        .map(|r| r["preference"].as_str().unwrap())
        .collect();
    assert_eq!(preferences.iter().filter(|p| **p == "chosen").count(), 2);
    assert!(test_rows[0].get("response").is_some() && test_rows[0].get("completion").is_none());
    assert_eq!(rows(&out.join("train.jsonl")).len(), 12);
}

#[test]
fn bad_input_fails_with_file_and_line_and_leaves_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data.jsonl");
    std::fs::write(&input, "{\"prompt\": \"Q\", \"completion\": \"A\", \"label\": true}\n{\"prompt\": \"Q\", \"completion\": \"A\", \"label\": \"yes\"}\n").unwrap();
    let out = dir.path().join("out");
    let output = kto_warn(
        dir.path(),
        &[
            "prepare",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("data.jsonl:2: field `label` must be true/false or \"chosen\"/\"rejected\", got \"yes\""), "{message}");
    assert!(!out.join("train.jsonl").exists());

    // --skip-invalid: a warning and a count, and the good rows are written.
    let output = kto_warn(
        dir.path(),
        &[
            "prepare",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--skip-invalid",
            "--test-fraction",
            "0",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("invalid rows skipped: 1"));
    assert!(
        stderr(&output).contains("skipping invalid row"),
        "{}",
        stderr(&output)
    );
    // One class only: a clear warning.
    assert!(
        stderr(&output).contains("only desirable samples"),
        "{}",
        stderr(&output)
    );
    assert_eq!(rows(&out.join("train.jsonl")).len(), 1);
    assert_eq!(rows(&out.join("test.jsonl")).len(), 0);
}

#[test]
fn unknown_format_and_style_list_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let output = kto_warn(
        dir.path(),
        &[
            "prepare", "--input", "x.jsonl", "--out", "o", "--format", "csv",
        ],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output)
            .contains("expected one of auto, unpaired, trl, nemo, paired, hh, conversational"),
        "{}",
        stderr(&output)
    );
    let output = kto_warn(
        dir.path(),
        &[
            "prepare", "--input", "x.jsonl", "--out", "o", "--style", "dpo",
        ],
    );
    assert!(
        stderr(&output).contains("expected one of trl, nemo"),
        "{}",
        stderr(&output)
    );
    let output = kto_warn(
        dir.path(),
        &[
            "prepare",
            "--input",
            "x.jsonl",
            "--out",
            "o",
            "--test-fraction",
            "1.5",
        ],
    );
    assert!(
        stderr(&output).contains("--test-fraction must be in [0, 1), got 1.5"),
        "{}",
        stderr(&output)
    );
}
