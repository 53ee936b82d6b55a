//! `kto plot`: learning curves from a synthetic metrics.jsonl, as SVG and PNG, and its errors.
mod common;

use std::collections::HashSet;
use std::path::Path;

use common::{kto, stderr, stdout};
use serde_json::{json, Value};

const PANEL_TITLES: [&str; 6] = [
    "Loss",
    "Rewards",
    "KL estimate",
    "Held-out reward accuracy",
    "Learning rate",
    "Gradient norm",
];

/// A run the way the trainer logs it: a training row per step (some keys missing or null), an eval row every
/// `eval_every` steps and at the end.
fn synthetic_run(steps: u64, eval_every: u64) -> Vec<Value> {
    let mut rows = Vec::new();
    for step in 1..=steps {
        let t = step as f64 / steps as f64;
        let wiggle = ((step * 7919) % 13) as f64 / 13.0 - 0.5;
        let mut row = json!({
            "step": step, "epoch": 2.0 * t, "loss": 0.5 - 0.2 * t + 0.05 * wiggle,
            "grad_norm": 2.0 - t + wiggle, "learning_rate": 5e-5 * (1.0 - t), "kl": 0.3 * t,
            "logps/chosen": -80.0, "logps/rejected": -90.0,
            "rewards/chosen": t + 0.2 * wiggle, "rewards/rejected": -t - 0.2 * wiggle,
            "rewards/margins": 2.0 * t, "logits/chosen": -1.0, "logits/rejected": -1.1,
            "entropy": 2.0, "num_tokens": 100 * step, "samples_per_second": 9.5
        });
        if step % 5 == 0 {
            // A batch without desirable samples logs no chosen reward; NaN is written as null.
            row.as_object_mut().unwrap().remove("rewards/chosen");
            row["rewards/margins"] = Value::Null;
        }
        rows.push(row);
        if eval_every > 0 && (step % eval_every == 0 || step == steps) {
            rows.push(json!({
                "step": step, "epoch": 2.0 * t, "eval_loss": 0.5 - 0.1 * t, "eval_kl": 0.25 * t,
                "eval_rewards/chosen": 0.8 * t, "eval_rewards/rejected": -0.8 * t,
                "eval_rewards/margins": 1.6 * t, "eval_reward_accuracy": 0.5 + 0.3 * t,
                "eval_reward_auroc": 0.5 + 0.35 * t, "eval_pair_accuracy": 0.5 + 0.4 * t,
                "eval_num_tokens": 4000, "eval_samples": 32
            }));
        }
    }
    rows
}

fn write_metrics(dir: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

/// Width, height and the number of distinct colours of an 8-bit RGB(A) PNG.
fn png_summary(path: &Path) -> (u32, u32, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let channels = info.color_type.samples();
    let colours: HashSet<&[u8]> = pixels[..info.buffer_size()].chunks(channels).collect();
    (info.width, info.height, colours.len())
}

fn assert_curves(svg_path: &Path, png_path: &Path) -> String {
    let svg = std::fs::read_to_string(svg_path).unwrap();
    assert!(
        svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG document"
    );
    for title in PANEL_TITLES {
        assert!(svg.contains(title), "the SVG has no panel titled {title:?}");
    }
    let (width, height, colours) = png_summary(png_path);
    assert!(
        (800..=4000).contains(&width) && (500..=4000).contains(&height),
        "{width}x{height}"
    );
    assert!(width > height, "a landscape grid of panels");
    // Text, axes and six colours of curves, anti-aliased: far more than a blank or single-colour picture.
    assert!(colours > 50, "only {colours} distinct colours in the PNG");
    svg
}

#[test]
fn plots_a_run_with_train_and_eval_rows_into_the_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_metrics(dir.path(), &synthetic_run(120, 25));
    let output = kto(dir.path(), &["plot", dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let svg = assert_curves(
        &dir.path().join("curves.svg"),
        &dir.path().join("curves.png"),
    );
    for legend in [
        "chosen",
        "rejected",
        "margin",
        "reward accuracy",
        "AUROC",
        "pair accuracy",
        "chance",
    ] {
        assert!(svg.contains(legend), "no legend entry {legend:?}");
    }
    assert!(
        svg.contains("smoothed"),
        "120 noisy steps are drawn smoothed, and the header says so"
    );
    assert!(
        svg.contains("120 training rows and 5 evaluations"),
        "header summary"
    );
    assert!(stdout(&output).contains("curves.png"));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn a_single_step_run_still_plots() {
    let dir = tempfile::tempdir().unwrap();
    write_metrics(dir.path(), &synthetic_run(1, 0));
    let output = kto(dir.path(), &["plot", dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let svg = assert_curves(
        &dir.path().join("curves.svg"),
        &dir.path().join("curves.png"),
    );
    assert!(svg.contains("1 training row and 0 evaluations"));
    assert!(
        svg.contains("no evaluation rows"),
        "the accuracy panel says why it is empty"
    );
    // The single logged point of each train metric is a marker.
    assert!(
        svg.contains("<circle"),
        "a one-point series must still be visible"
    );
}

#[test]
fn eval_rows_alone_still_plot() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = synthetic_run(10, 5)
        .into_iter()
        .filter(|r| r.get("eval_loss").is_some())
        .collect();
    assert_eq!(rows.len(), 2);
    write_metrics(dir.path(), &rows);
    let output = kto(dir.path(), &["plot", dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let svg = assert_curves(
        &dir.path().join("curves.svg"),
        &dir.path().join("curves.png"),
    );
    assert!(svg.contains("no learning rate logged"));
}

#[test]
fn out_sets_the_file_names() {
    let dir = tempfile::tempdir().unwrap();
    write_metrics(dir.path(), &synthetic_run(8, 4));
    let run = dir.path().to_str().unwrap();

    let named = dir.path().join("plots/run-a.svg");
    let output = kto(dir.path(), &["plot", run, "--out", named.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_curves(&named, &dir.path().join("plots/run-a.png"));

    let stem = dir.path().join("plots/run-b");
    let output = kto(dir.path(), &["plot", run, "--out", stem.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_curves(
        &dir.path().join("plots/run-b.svg"),
        &dir.path().join("plots/run-b.png"),
    );
    assert!(
        !dir.path().join("curves.svg").exists(),
        "--out replaces the default location"
    );
}

#[test]
fn a_missing_run_folder_or_metrics_file_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-run");
    let output = kto(dir.path(), &["plot", missing.to_str().unwrap()]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("no-such-run") && message.contains("does not exist"),
        "{message}"
    );
    assert!(message.contains("kto train"), "{message}");

    let output = kto(dir.path(), &["plot", dir.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("metrics.jsonl") && message.contains("not found"),
        "{message}"
    );
    assert!(message.contains("kto train"), "{message}");
}

#[test]
fn bad_rows_are_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().to_str().unwrap();
    let good = synthetic_run(3, 0);
    let metrics = dir.path().join("metrics.jsonl");

    let text = format!("{}\n{}\n{{\"step\": 3, \"loss\": 0.4\n", good[0], good[1]);
    std::fs::write(&metrics, text).unwrap();
    let message = stderr(&kto(dir.path(), &["plot", run]));
    assert!(
        message.contains("metrics.jsonl:3") && message.contains("not a JSON object"),
        "{message}"
    );

    let text = format!("{}\n{{\"step\": 2, \"loss\": \"low\"}}\n", good[0]);
    std::fs::write(&metrics, text).unwrap();
    let message = stderr(&kto(dir.path(), &["plot", run]));
    assert!(
        message.contains("metrics.jsonl:2") && message.contains("`loss`"),
        "{message}"
    );

    std::fs::write(&metrics, "{\"loss\": 0.5}\n").unwrap();
    let message = stderr(&kto(dir.path(), &["plot", run]));
    assert!(
        message.contains("metrics.jsonl:1") && message.contains("`step`"),
        "{message}"
    );

    std::fs::write(&metrics, "\n").unwrap();
    let output = kto(dir.path(), &["plot", run]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("no rows"), "{}", stderr(&output));
    assert!(
        !dir.path().join("curves.png").exists(),
        "nothing is written on error"
    );
}
