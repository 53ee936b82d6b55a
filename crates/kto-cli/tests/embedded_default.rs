//! The embedded default (`configs/tiny.toml`) meets its bar: the full schedule through the built binary ends with a
//! held-out reward accuracy of at least 0.8 (chance 0.5). About a minute in the dev profile on one thread.
//! Run a second time it replaces its earlier demo run (`overwrite_output_dir = true`), and its summary names plain
//! paths.
mod common;

use std::path::PathBuf;

use common::kto_command;

#[test]
fn embedded_default_reaches_reward_accuracy_0_8() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tempfile::tempdir().unwrap();
    let run_dir = out.path().join("tiny");
    // The earlier demo run, finished, is replaced rather than refused.
    std::fs::create_dir_all(run_dir.join("adapter")).unwrap();
    std::fs::write(run_dir.join("metrics.jsonl"), "{\"step\": 9999}\n").unwrap();
    // In the test's folder, with the reference cache there too.
    let output = kto_command(out.path(), &["train", "--quiet", "--config"])
        .arg(repo.join("configs/tiny.toml"))
        .arg("--set")
        // The summary shows it plain, as out/tiny.
        .arg(format!(
            "train.output_dir={}",
            out.path().join("elsewhere/../tiny").display()
        ))
        // Small matrices: one thread is as fast as two when quiet and avoids the barrier spin-wait when busy.
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kto train failed: {stderr}");
    assert!(
        stderr.contains("--overwrite: removed the earlier run's adapter, metrics.jsonl"),
        "{stderr}"
    );
    let summary = String::from_utf8_lossy(&output.stdout);
    let curves = run_dir.join("curves.png");
    assert!(
        summary.contains(&curves.display().to_string()) && !summary.contains(".."),
        "{summary}"
    );
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last_eval = rows
        .iter()
        .rfind(|row| row.get("eval_reward_accuracy").is_some())
        .expect("no evaluation row in metrics.jsonl");
    let accuracy = last_eval["eval_reward_accuracy"].as_f64().unwrap();
    let auroc = last_eval["eval_reward_auroc"].as_f64().unwrap();
    assert_eq!(last_eval["eval_samples"].as_u64(), Some(240), "{last_eval}");
    assert!(
        accuracy >= 0.8,
        "eval_reward_accuracy {accuracy} < 0.8: {last_eval}"
    );
    assert!(auroc >= 0.8, "eval_reward_auroc {auroc} < 0.8: {last_eval}");
}
