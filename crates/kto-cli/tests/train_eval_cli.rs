//! `kto train` and `kto eval` end to end on the TRL parity fixture.
mod common;

use std::path::Path;

use common::{kto, stderr, stdout};
use kto_data::testing::trl_fixture;
use serde_json::Value;

fn write_config(dir: &Path) {
    let fx = trl_fixture();
    let text = format!(
        "[model]\npath = \"{m}\"\n[lora]\ninit_adapter = \"{a}\"\n[data]\ntrain_file = \"{d}\"\neval_file = \"{d}\"\n\
         max_length = 64\n[kto]\nloss_type = \"kto\"\nbeta = 0.1\n[train]\noutput_dir = \"out\"\n\
         per_device_train_batch_size = 4\nlearning_rate = 1e-2\nlr_scheduler_type = \"constant\"\nmax_steps = 3\n\
         save_steps = 1\nsave_total_limit = 2\n",
        m = fx.join("model").display(),
        a = fx.join("adapter_init").display(),
        d = fx.join("data.jsonl").display(),
    );
    std::fs::write(dir.join("kto.toml"), text).unwrap();
}

#[test]
fn train_matches_trl_and_eval_reports_held_out_figures() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let out = kto(dir.path(), &["train", "--config", "kto.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let rows: Vec<Value> = std::fs::read_to_string(dir.path().join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let log: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(trl_fixture().join("runs/kto/log.json")).unwrap(),
    )
    .unwrap();
    let train_rows: Vec<&Value> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train_rows.len(), log.len());
    for (row, want) in train_rows.iter().zip(&log) {
        for (key, want) in want.as_object().unwrap() {
            let (got, want) = (row[key].as_f64().unwrap(), want.as_f64().unwrap());
            assert!(
                (got - want).abs() <= 1e-6 || (got - want).abs() <= 1e-4 * want.abs(),
                "{key}: {got} vs {want}"
            );
        }
    }
    assert!(
        rows.last().unwrap().get("eval_reward_auroc").is_some(),
        "evaluation at the end"
    );
    // save_total_limit = 2 keeps the two newest checkpoints.
    assert!(!dir.path().join("out/checkpoint-1").exists());
    assert!(dir.path().join("out/checkpoint-3/manifest.json").exists());
    assert!(dir
        .path()
        .join("out/adapter/adapter_model.safetensors")
        .exists());
    let log = stderr(&out);
    assert!(
        log.contains("learning curves"),
        "kto train plots at the end: {log}"
    );

    let out = kto(
        dir.path(),
        &["eval", "--config", "kto.toml", "--out", "eval.json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains("eval_reward_accuracy") && table.contains("eval_loss"),
        "{table}"
    );
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval.json")).unwrap())
            .unwrap();
    let last_eval = rows.last().unwrap();
    for key in ["eval_loss", "eval_reward_auroc", "eval_rewards/chosen"] {
        assert_eq!(
            results[key], last_eval[key],
            "{key}: standalone eval of the final adapter = the final eval row"
        );
    }
}

#[test]
fn config_errors_and_print_config() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let out = kto(
        dir.path(),
        &[
            "train",
            "--config",
            "kto.toml",
            "--set",
            "train.lernig_rate=1",
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("lernig_rate") && err.contains("learning_rate"),
        "{err}"
    );

    let out = kto(
        dir.path(),
        &[
            "train",
            "--config",
            "kto.toml",
            "--set",
            "kto.beta=0.25",
            "--print-config",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(
        printed.contains("beta = 0.25") && printed.contains("adam_epsilon = 1e-8"),
        "{printed}"
    );
    assert!(
        !dir.path().join("out").exists(),
        "--print-config trains nothing"
    );
}
