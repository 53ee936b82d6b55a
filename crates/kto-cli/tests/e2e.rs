//! The whole journey through the built `kto` binary on the embedded tiny Llama and the bundled HH sample:
//! prepare → train with checkpoints → SIGKILL → `--resume` → eval → plot → export → the export, loaded as a model
//! of its own, generates what the base model with the adapter generates; and `kto chat` on piped stdin.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

use common::{kto, kto_command, kto_ok};
use kto_data::faults::SEAL_DELAY_ENV;
use kto_trainer::checkpoint::MANIFEST;
use safetensors::SafeTensors;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// configs/tiny.toml made small with `--set`: data from the test's folder, 8 steps of 4 samples, a checkpoint
/// every 2 steps, evaluation at the end.
fn tiny_config(extra: &[&str]) -> Vec<String> {
    let config = repo().join("configs/tiny.toml");
    let mut args = vec!["--config".to_string(), config.display().to_string()];
    for set in [
        "data.train_file=data/train.jsonl",
        "data.eval_file=data/test.jsonl",
        "data.max_length=128",
        "train.output_dir=run",
        "train.per_device_train_batch_size=4",
        "train.per_device_eval_batch_size=8",
        "train.max_steps=8",
        "train.save_steps=2",
        "train.logging_steps=1",
        "train.eval_steps=0",
    ]
    .iter()
    .chain(extra)
    {
        args.push("--set".into());
        args.push(set.to_string());
    }
    args
}

fn with_config<'a>(command: &[&'a str], config: &'a [String]) -> Vec<&'a str> {
    command
        .iter()
        .copied()
        .chain(config.iter().map(String::as_str))
        .collect()
}

fn read_rows(path: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `kto --version` names the build first (scripts/gpu-check.sh relies on it to prove it runs the cuda build).
#[test]
fn version_names_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let out = text(&kto_ok(dir.path(), &["--version"]).stdout);
    let build = if cfg!(feature = "cuda") {
        "(cuda: PTX compute_80, CUDA 13."
    } else {
        "(cpu only)"
    };
    assert!(
        out.starts_with(&format!("kto {} {build}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}

#[test]
fn prepare_train_kill_resume_eval_plot_export_generate_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let started = Instant::now();

    // prepare: 24 raw HH pairs → unpaired train/test.
    let raw: Vec<String> = std::fs::read_to_string(repo().join("data/hh-sample/train.jsonl"))
        .unwrap()
        .lines()
        .take(24)
        .map(String::from)
        .collect();
    std::fs::write(dir.join("raw.jsonl"), raw.join("\n") + "\n").unwrap();
    let out = kto_ok(
        dir,
        &[
            "prepare",
            "--input",
            "raw.jsonl",
            "--out",
            "data",
            "--test-fraction",
            "0.25",
        ],
    );
    assert!(text(&out.stdout).contains("hh"), "{}", text(&out.stdout));
    let train_rows = read_rows(&dir.join("data/train.jsonl"));
    let test_rows = read_rows(&dir.join("data/test.jsonl"));
    assert_eq!(
        train_rows.len() + test_rows.len(),
        48,
        "two samples per pair"
    );
    assert!(!test_rows.is_empty() && train_rows[0].contains_key("completion"));

    let config = tiny_config(&[]);

    // An error that says how to fix it: nothing to export before training.
    let out = kto(dir, &with_config(&["export", "--out", "merged"], &config));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("kto train --config") && err.contains("--adapter"),
        "{err}"
    );

    // train, killed (SIGKILL) once its first checkpoint is sealed. The fault hook's pause before each later
    // checkpoint is sealed keeps the run from finishing before the kill however fast the steps are.
    let checkpoint_2 = dir.join("run/checkpoint-2");
    let log = std::fs::File::create(dir.join("train-killed.log")).unwrap();
    let mut child = kto_command(dir, &with_config(&["train"], &config))
        .env(SEAL_DELAY_ENV, "500")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !checkpoint_2.join(MANIFEST).exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "kto train ended ({status}) before its first checkpoint:\n{}",
                std::fs::read_to_string(dir.join("train-killed.log")).unwrap()
            );
        }
        assert!(Instant::now() < deadline, "no checkpoint-2 after 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it was killed: make it longer"
    );
    assert!(
        !dir.join("run/adapter").exists(),
        "a killed run has no final adapter"
    );

    // resume: finishes the 8 steps, prints the summary, draws the curves.
    let out = kto_ok(dir, &with_config(&["train", "--resume"], &config));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stderr.contains("resuming from"), "{stderr}");
    for figure in [
        "training summary",
        "8 / 8",
        "loss",
        "rewards/margins",
        "eval_loss",
        "eval_reward_accuracy",
        "eval_reward_auroc",
        "eval_pair_accuracy",
        "run/adapter",
        "curves.png",
    ] {
        assert!(stdout.contains(figure), "summary lacks {figure}:\n{stdout}");
    }
    assert!(
        stderr.contains("step 8/8") && !stderr.contains("error"),
        "{stderr}"
    );
    let rows = read_rows(&dir.join("run/metrics.jsonl"));
    let steps: Vec<u64> = rows
        .iter()
        .filter(|r| r.contains_key("loss"))
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=8).collect::<Vec<_>>(),
        "every step logged once across the kill"
    );
    assert!(dir.join("run/adapter/adapter_model.safetensors").is_file());

    // eval: the standalone evaluation of the final adapter is the final eval row.
    let out = kto_ok(dir, &with_config(&["eval"], &config));
    assert!(text(&out.stdout).contains("eval_reward_accuracy"));
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/eval_results.json")).unwrap())
            .unwrap();
    let last_eval = rows
        .iter()
        .rev()
        .find(|r| r.contains_key("eval_loss"))
        .unwrap();
    assert_eq!(results["eval_loss"], last_eval["eval_loss"]);

    // plot: a valid, non-trivial SVG and PNG.
    kto_ok(dir, &["plot", "run", "--out", "plots/curves.svg"]);
    let svg = std::fs::read_to_string(dir.join("plots/curves.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>") && svg.len() > 5_000);
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(dir.join("plots/curves.png")).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert!(frame.width >= 400 && frame.height >= 300);
    let colours: BTreeSet<&[u8]> = pixels[..frame.buffer_size()]
        .chunks(frame.color_type.samples())
        .collect();
    assert!(colours.len() > 10, "the PNG is nearly blank");

    // export: an HF checkpoint with the base model's tensor names, shapes and dtypes; adapted weights changed.
    let out = kto_ok(dir, &with_config(&["export", "--out", "merged"], &config));
    assert!(text(&out.stdout).contains("merged"));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(
            dir.join("merged").join(file).is_file(),
            "export lacks {file}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");
    let base_bytes = std::fs::read(repo().join("assets/tiny-llama/model.safetensors")).unwrap();
    let merged_bytes = std::fs::read(dir.join("merged/model.safetensors")).unwrap();
    let (base, merged) = (
        SafeTensors::deserialize(&base_bytes).unwrap(),
        SafeTensors::deserialize(&merged_bytes).unwrap(),
    );
    let names = |st: &SafeTensors| {
        st.names()
            .into_iter()
            .map(|n| n.to_string())
            .collect::<BTreeSet<String>>()
    };
    assert_eq!(names(&base), names(&merged));
    for name in names(&base) {
        let (b, m) = (base.tensor(&name).unwrap(), merged.tensor(&name).unwrap());
        assert_eq!((b.dtype(), b.shape()), (m.dtype(), m.shape()), "{name}");
        let adapted = name.starts_with("model.layers.") && name.contains("_proj.");
        assert_eq!(
            b.data() != m.data(),
            adapted,
            "{name}: only adapted weights change"
        );
    }
    let out = kto(dir, &with_config(&["export", "--out", "merged"], &config));
    assert!(!out.status.success() && text(&out.stderr).contains("not empty"));

    // generate: the export alone = the base model with the adapter (greedy, and seeded sampling).
    let prompt = "\n\nHuman: How do I keep basil fresh?\n\nAssistant:";
    let merged_path = format!("model.path={}", dir.join("merged").display());
    let generate = |extra: &[&str]| {
        let mut args = with_config(&["generate"], &config);
        args.extend(["--prompt", prompt, "--max-new-tokens", "24"]);
        args.extend(extra);
        let out = kto_ok(dir, &args);
        (text(&out.stdout), text(&out.stderr))
    };
    let from_export = ["--set", &merged_path, "--no-adapter"];
    let (with_adapter, stderr) = generate(&[]);
    assert!(stderr.contains("with adapter run/adapter"), "{stderr}");
    assert!(!with_adapter.trim().is_empty());
    let (exported, stderr) = generate(&from_export);
    assert!(stderr.contains("without adapter"), "{stderr}");
    assert_eq!(exported, with_adapter, "export = base + adapter");
    let sampled = ["--temperature", "1", "--seed", "3", "--quiet"];
    let (sampled_with_adapter, stderr) = generate(&sampled);
    assert_eq!(stderr, "", "--quiet silences the logs");
    let (sampled_export, _) = generate(&[&from_export[..], &sampled[..]].concat());
    assert_eq!(sampled_export, sampled_with_adapter);
    assert_ne!(sampled_export, exported, "sampling is not greedy");

    // chat on piped stdin: a reply per message; /reset starts the same conversation over (greedy: same reply).
    let mut child = kto_command(
        dir,
        &with_config(&["chat", "--max-new-tokens", "16"], &config),
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"How do I keep basil fresh?\n/reset\nHow do I keep basil fresh?\n/exit\nignored\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("run/adapter") && stderr.contains("chat template"),
        "{stderr}"
    );
    // Replies may span lines; the two turns print the same text, each ended by a newline.
    let stdout = text(&out.stdout);
    let half = stdout.len() / 2;
    assert!(half > 1 && stdout.ends_with('\n'), "{stdout:?}");
    assert_eq!(stdout[..half], stdout[half..], "{stdout:?}");

    eprintln!("end to end in {:.1} s", started.elapsed().as_secs_f64());
}
