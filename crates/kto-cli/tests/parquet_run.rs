//! A run from Parquet, and from a data set id in a (faked) Hugging Face cache, gives the metrics.jsonl of the run
//! from the JSONL of the same rows (wall-clock figures aside), on the fixture's tiny model.
mod common;

use std::path::PathBuf;

use common::{deterministic, kto_command, metrics_rows};
use kto_data::testing::trl_fixture as fixture;

fn data_kinds() -> PathBuf {
    kto_data::testing::fixture("data-kinds")
}

/// `kto train` in a fresh folder with `[data]` given by `data` (TOML lines) and the Hugging Face cache at the
/// fixtures' faked one; the metrics rows without wall-clock figures.
fn run(data: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[model]\npath = \"{m}\"\n[lora]\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
         [data]\n{data}\nmax_length = 64\n[train]\noutput_dir = \"out\"\nper_device_train_batch_size = 2\n\
         learning_rate = 1e-2\nmax_steps = 4\nlogging_steps = 1\n",
        m = fixture().join("model").display(),
    );
    std::fs::write(dir.path().join("kto.toml"), config).unwrap();
    let out = kto_command(dir.path(), &["train", "--config", "kto.toml"])
        .env("HF_HUB_CACHE", data_kinds().join("hub"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kto train failed: {stderr}");
    deterministic(metrics_rows(dir.path()))
}

#[test]
fn parquet_and_hub_runs_log_the_metrics_of_the_jsonl_run() {
    let jsonl = fixture().join("data.jsonl");
    let parquet = data_kinds().join("trl-kto-parity-data.parquet");
    let reference = run(&format!(
        "train_file = \"{}\"\neval_file = \"{}\"",
        jsonl.display(),
        jsonl.display()
    ));
    // Four training rows and the final evaluation, with the loss and the evaluation's figures in them.
    assert_eq!(reference.len(), 5, "{reference:?}");
    assert!(reference[0].contains_key("loss"), "{:?}", reference[0]);
    assert!(reference[4].contains_key("eval_loss"), "{:?}", reference[4]);

    let from_parquet = run(&format!(
        "train_file = \"{}\"\neval_file = \"{}\"",
        parquet.display(),
        parquet.display()
    ));
    assert_eq!(from_parquet, reference);

    // The same rows as push_to_hub lays them out (data/train-…, data/test-…), found in the cache by id; the test
    // split is the evaluation data.
    let from_hub = run("dataset_name = \"kto-test/parity\"");
    assert_eq!(from_hub, reference);
}

#[test]
fn a_data_set_missing_from_the_cache_names_the_download() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kto.toml"),
        format!(
            "[model]\npath = \"{}\"\n[data]\ndataset_name = \"someone/absent\"\n[train]\noutput_dir = \"out\"\n",
            fixture().join("model").display()
        ),
    )
    .unwrap();
    let out = kto_command(dir.path(), &["train", "--config", "kto.toml"])
        .env("HF_HUB_CACHE", data_kinds().join("hub"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("dataset_name")
            && stderr.contains("datasets--someone--absent")
            && stderr.contains("hf download --repo-type dataset someone/absent"),
        "{stderr}"
    );
    // Both sources of training data: refused, naming both keys.
    std::fs::write(
        dir.path().join("kto.toml"),
        "[data]\ndataset_name = \"o/n\"\ntrain_file = \"a.parquet\"\n",
    )
    .unwrap();
    let out = kto_command(dir.path(), &["train", "--config", "kto.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("[data] dataset_name")
            && stderr.contains("[data] train_file"),
        "{stderr}"
    );
}

#[test]
fn prepare_reads_a_glob_of_parquet_shards_as_the_jsonl_of_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let shards = data_kinds().join("shards/train-*.parquet");
    let jsonl = data_kinds().join("paired.jsonl");
    for (input, out) in [(&shards, "from-shards"), (&jsonl, "from-jsonl")] {
        let status = kto_command(
            dir.path(),
            &[
                "prepare",
                "--input",
                &input.display().to_string(),
                "--out",
                out,
                "--test-fraction",
                "0.25",
            ],
        )
        .output()
        .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    for file in ["train.jsonl", "test.jsonl"] {
        let read = |out: &str| std::fs::read_to_string(dir.path().join(out).join(file)).unwrap();
        assert!(!read("from-jsonl").is_empty(), "{file}");
        assert_eq!(read("from-shards"), read("from-jsonl"), "{file}");
    }
}
