//! `[train] report_to = ["tensorboard"]`: the event files of a run with evaluation, killed between two checkpoints
//! and resumed, hold every metrics.jsonl row once, as transformers' `TensorBoardCallback` tags it, at its step.
//!
//! They are read back twice: by kto's own frame reader (CRC-checked, always), and by TensorBoard's Python reader
//! (`scripts/read-tensorboard.py`) where a python with the `tensorboard` package is found: `KTO_TEST_PYTHON` (then it
//! must work: CI sets it), else `python3` when it imports tensorboard, else the test says it skipped that part.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    kto, kto_ok, metrics_rows, run_folder, stderr, train_command, with_evaluation_on_fixture,
    MAX_STEPS,
};
use kto_trainer::tensorboard::{event_files, read_events, What};
use serde_json::{Map, Value};

/// The fixture run with evaluation every 4 steps, a checkpoint every 5, and TensorBoard asked for by name.
fn with_tensorboard(cmd: Command) -> Command {
    let sets = [
        "train.eval_steps=4",
        "train.save_steps=5",
        "train.report_to=[\"tensorboard\"]",
    ];
    with_evaluation_on_fixture(cmd, &sets)
}

/// Each tag's (step, f32 value) points in logging order; NaN (null in metrics.jsonl) as None.
type Scalars = BTreeMap<String, Vec<(i64, Option<f32>)>>;

/// transformers' `rewrite_logs`, written out again so that kto's writer is checked against the rule, not itself.
fn transformers_tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(name) => format!("eval/{name}"),
        None => format!("train/{key}"),
    }
}

/// What TensorBoard must show for `rows`.
fn expected_scalars(rows: &[Map<String, Value>]) -> Scalars {
    let mut scalars: Scalars = BTreeMap::new();
    for row in rows {
        let step = row["step"].as_i64().unwrap();
        for (key, value) in row.iter().filter(|(key, _)| key.as_str() != "step") {
            let value = value.as_f64().map(|v| v as f32);
            scalars
                .entry(transformers_tag(key))
                .or_default()
                .push((step, value));
        }
    }
    scalars
}

/// The one TensorBoard folder of the run (transformers' `out/runs/<Mon DD_HH-MM-SS>_<host>`) and its one event file.
fn the_event_file(dir: &Path) -> (PathBuf, PathBuf) {
    let runs: Vec<PathBuf> = std::fs::read_dir(dir.join("out/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "one TensorBoard run: {runs:?}");
    let files = event_files(&runs[0]);
    assert_eq!(files.len(), 1, "one event file: {files:?}");
    (runs[0].clone(), files[0].clone())
}

/// The scalars of an event file as kto's reader decodes them (every frame's CRCs checked).
fn scalars_read_by_kto(file: &Path) -> Scalars {
    let events = read_events(file).unwrap();
    assert_eq!(
        events[0].what,
        Some(What::FileVersion("brain.Event:2".into()))
    );
    let mut scalars: Scalars = BTreeMap::new();
    for event in &events[1..] {
        let Some(What::Summary(summary)) = &event.what else {
            panic!("not a summary: {event:?}");
        };
        for value in &summary.value {
            let v = value.simple_value.expect("a scalar");
            let v = (!v.is_nan()).then_some(v);
            scalars
                .entry(value.tag.clone())
                .or_default()
                .push((event.step, v));
        }
    }
    scalars
}

/// A python that imports `tensorboard`: `KTO_TEST_PYTHON` (which then must), else `python3` if it does.
fn tensorboard_python() -> Option<String> {
    let imports_tensorboard = |python: &str| {
        Command::new(python)
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    match std::env::var("KTO_TEST_PYTHON") {
        Ok(python) => {
            assert!(
                imports_tensorboard(&python),
                "KTO_TEST_PYTHON={python} is set but cannot import tensorboard"
            );
            Some(python)
        }
        Err(_) => imports_tensorboard("python3").then(|| "python3".to_string()),
    }
}

/// The scalars TensorBoard's own reader finds in `logdir`, and the event files it read.
fn scalars_read_by_tensorboard(python: &str, logdir: &Path) -> (Vec<String>, Scalars) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/read-tensorboard.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(logdir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[derive(serde::Deserialize)]
    struct Read {
        event_files: Vec<String>,
        scalars: BTreeMap<String, Vec<(i64, Option<f64>)>>,
    }
    let read: Read = serde_json::from_slice(&out.stdout).unwrap();
    let scalars = read
        .scalars
        .into_iter()
        .map(|(tag, points)| {
            let points = points.into_iter().map(|(s, v)| (s, v.map(|v| v as f32)));
            (tag, points.collect())
        })
        .collect();
    (read.event_files, scalars)
}

#[test]
fn event_files_equal_metrics_and_a_resumed_run_logs_each_step_once() {
    let dir = run_folder();
    // Killed as step 8 begins (a second signal ends the process at once): steps 1-7 are logged, the last
    // checkpoint is step 5's.
    let mut cmd = with_tensorboard(train_command(dir.path(), false, 0));
    cmd.env("KTO_TEST_SIGNAL", "SIGTERM@step:8,SIGINT@step:8");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let (logdir, file) = the_event_file(dir.path());
    let logged = scalars_read_by_kto(&file);
    let steps = |scalars: &Scalars, tag: &str| -> Vec<i64> {
        scalars[tag].iter().map(|(step, _)| *step).collect()
    };
    assert_eq!(steps(&logged, "train/loss"), (1..=7).collect::<Vec<_>>());
    assert_eq!(logged, expected_scalars(&metrics_rows(dir.path())));

    let out = with_tensorboard(train_command(dir.path(), true, 0))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        the_event_file(dir.path()),
        (logdir.clone(), file.clone()),
        "the same file, continued"
    );
    let rows = metrics_rows(dir.path());
    let expected = expected_scalars(&rows);
    for tag in [
        "train/loss",
        "train/kl",
        "train/rewards/chosen",
        "train/logps/chosen",
        "train/learning_rate",
        "train/grad_norm",
        "train/epoch",
        "train/num_tokens",
        "eval/loss",
        "eval/kl",
        "eval/rewards/margins",
        "eval/reward_accuracy",
        "eval/reward_auroc",
    ] {
        assert!(expected.contains_key(tag), "{tag} in {:?}", expected.keys());
    }
    let logged = scalars_read_by_kto(&file);
    assert_eq!(
        steps(&logged, "train/loss"),
        (1..=MAX_STEPS as i64).collect::<Vec<_>>()
    );
    assert_eq!(steps(&logged, "eval/loss"), [4, 8, 12]);
    assert_eq!(logged, expected);

    match tensorboard_python() {
        Some(python) => {
            let (files, read) = scalars_read_by_tensorboard(&python, &logdir);
            assert_eq!(files.len(), 1, "{files:?}");
            assert_eq!(read, expected, "TensorBoard's reader against metrics.jsonl");
        }
        None => eprintln!(
            "SKIPPED: TensorBoard's own reader (no python with the tensorboard package: set KTO_TEST_PYTHON); \
             kto's reader checked the event file"
        ),
    }
}

#[test]
fn report_to_none_writes_no_event_file_and_logging_dir_moves_them() {
    let dir = run_folder();
    let short = [
        "train",
        "--config",
        "kto.toml",
        "--set",
        "train.max_steps=2",
    ];
    let out = kto_ok(
        dir.path(),
        &[&short[..], &["--set", "train.report_to=none"]].concat(),
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("tensorboard"));
    assert!(dir.path().join("out/metrics.jsonl").exists());
    assert!(!dir.path().join("out/runs").exists());

    let out = kto_ok(
        dir.path(),
        &[
            &short[..],
            &["--overwrite", "--set", "train.logging_dir=tb"],
        ]
        .concat(),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tensorboard --logdir tb"));
    let files = event_files(&dir.path().join("tb"));
    assert_eq!(files.len(), 1);
    assert_eq!(
        scalars_read_by_kto(&files[0]),
        expected_scalars(&metrics_rows(dir.path()))
    );
    assert!(!dir.path().join("out/runs").exists());

    let out = kto(
        dir.path(),
        &[&short[..], &["--set", "train.report_to=wandb"]].concat(),
    );
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains("[train] report_to")
            && err.contains("\"wandb\"")
            && err.contains("\"tensorboard\""),
        "{err}"
    );
}
