//! Runs that survive preemption and never share a folder (docs/RELIABILITY.md):
//! - a second `kto train` on a folder being trained is refused at once and changes nothing of the first run;
//! - SIGTERM / SIGINT at seeded moments (a step, an evaluation batch, a reference-precompute batch, twice in a row)
//!   stop the run gracefully, and `--resume` ends with the uninterrupted run's adapter, each step logged once;
//! - a checkpoint write that fails midway leaves no temporary behind and a folder that resumes.
//!
//! The signals are raised by the process itself at the moment `KTO_TEST_SIGNAL` names, and the failed write is
//! injected by `KTO_FAULT_WRITE_ERROR`, so nothing here depends on timing.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    adapter_bytes, deterministic, kto_warn, metrics_rows, run_folder, run_to_end, stderr,
    train_command, uninterrupted_run, with_evaluation_on_fixture, MAX_STEPS,
};
use kto_data::testing::trl_fixture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEED: u64 = 20261203;

/// The fixture run with held-out evaluation every 4 steps (2 batches of 8 and 4 samples), the reference log-probs
/// precomputed (6 train + 2 eval batches, batches in dataset order) and a checkpoint only every 5 steps: a stop
/// must save on its own.
fn with_evaluation(cmd: Command) -> Command {
    let sets = [
        "train.eval_steps=4",
        "train.save_steps=5",
        "kto.precompute_ref_log_probs=true",
        "train.shuffle=false", // precomputed KL pairs need the dataset order
    ];
    with_evaluation_on_fixture(cmd, &sets)
}

/// Every file and folder under `dir`, recursively.
fn entries_under(dir: &Path) -> Vec<PathBuf> {
    let mut entries = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            entries.push(path);
        }
    }
    entries.sort();
    entries
}

/// Every file under `dir` with its bytes, by path relative to `dir`.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    entries_under(dir)
        .into_iter()
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path.strip_prefix(dir).unwrap().to_path_buf(), bytes)
        })
        .collect()
}

/// The files two runs must agree on byte for byte: all but metrics.jsonl, curves, trainer_state.json and the
/// TensorBoard event files, which hold wall-clock figures (runtime, samples per second, wall times; compared
/// without them through `metrics_rows`, the event files in tests/tensorboard.rs), and the manifests that hold their
/// checksums.
fn deterministic_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files_under(dir)
        .into_iter()
        .filter(|(rel, _)| {
            let name = rel.file_name().unwrap().to_string_lossy();
            !["metrics.jsonl", "trainer_state.json", "manifest.json"].contains(&name.as_ref())
                && !name.starts_with("curves.")
                && !name.contains("tfevents")
        })
        .collect()
}

/// The `.NAME.tmp-PID` files and folders of atomic writes under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    entries_under(dir)
        .into_iter()
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .collect()
}

fn assert_same_run(dir: &Path, reference: &Path) {
    assert!(
        adapter_bytes(dir) == adapter_bytes(reference),
        "the final adapter differs from the uninterrupted run's"
    );
    let rows = deterministic(metrics_rows(dir));
    let train_steps: Vec<u64> = rows
        .iter()
        .filter(|r| r.contains_key("loss"))
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        train_steps,
        (1..=MAX_STEPS as u64).collect::<Vec<_>>(),
        "each step logged once"
    );
    assert_eq!(rows, deterministic(metrics_rows(reference)));
}

/// The same with `[train] gradient_checkpointing` on (and LoRA dropout drawing masks, which the recompute replays):
/// stopped at a seeded step and resumed, the run equals an uninterrupted one with it on.
#[test]
fn with_gradient_checkpointing_a_stopped_and_resumed_run_equals_an_uninterrupted_one() {
    let checkpointing = |mut cmd: Command| {
        cmd.args(["--set", "train.gradient_checkpointing=true"])
            .args(["--set", "kto.disable_dropout=false"]);
        cmd
    };
    let reference = run_folder();
    let out = checkpointing(train_command(reference.path(), false, 0))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let dir = run_folder();
    let step = StdRng::seed_from_u64(SEED).random_range(1..MAX_STEPS);
    let mut cmd = checkpointing(train_command(dir.path(), false, 0));
    cmd.env("KTO_TEST_SIGNAL", format!("SIGTERM@step:{step}"));
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let out = checkpointing(train_command(dir.path(), true, 0))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_run(dir.path(), reference.path());
}

#[test]
fn second_process_on_one_folder_is_refused() {
    let alone = uninterrupted_run();

    let dir = run_folder();
    let out = dir.path().join("out");
    // Slowed down (each checkpoint write pauses) so that it is still training when the second one starts.
    let mut first = train_command(dir.path(), false, 100).spawn().unwrap();
    let lock = out.join(".kto-run.lock");
    let started = Instant::now();
    while std::fs::read_to_string(&lock).map_or(true, |pid| pid.trim().is_empty()) {
        assert!(started.elapsed() < Duration::from_secs(60), "no lock file");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The requeued job of the issue: `--resume` while the first process still trains.
    let second = train_command(dir.path(), true, 0).output().unwrap();
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run ended before the second was refused: the test proves nothing"
    );
    let text = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{text}");
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert!(
        text.starts_with("error: out is in use by process ")
            && text.contains(&first.id().to_string()),
        "{text}"
    );
    assert!(first.wait().unwrap().success());
    assert!(!lock.exists(), "the lock file goes with its run");
    assert!(deterministic_files(&out) == deterministic_files(&alone.path().join("out")));
    assert_same_run(dir.path(), alone.path());
}

/// Launches until the run ends: each one with the next scheduled signal, checking how it stopped.
#[test]
fn stopped_by_signals_and_resumed_equals_an_uninterrupted_run() {
    let reference = run_folder();
    let out = with_evaluation(train_command(reference.path(), false, 0))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let dir = run_folder();
    let out_dir = dir.path().join("out");
    let mut rng = StdRng::seed_from_u64(SEED);
    let signal = |rng: &mut StdRng| ["SIGINT", "SIGTERM"][rng.random_range(0..2)];
    // (hook, expected exit status, the step it stops at): a precompute batch (no step yet), a step, an evaluation
    // batch (stops inside the evaluation at step 4 or 8), a step, a double signal (aborts), the next evaluation.
    let first_step = rng.random_range(1..4);
    let later_step = rng.random_range(9..12);
    let moments = [
        format!("precompute:{}", rng.random_range(1..=6)), // the train pass: nothing cached yet
        format!("step:{first_step}"),
        format!("eval:{}", rng.random_range(1..=2)),
        format!("step:{later_step}"),
    ];
    let mut step = 0;
    let mut log = Vec::new();
    for (launch, moment) in moments.iter().enumerate() {
        let sig = signal(&mut rng);
        let mut cmd = with_evaluation(train_command(dir.path(), launch > 0, 0));
        cmd.env("KTO_TEST_SIGNAL", format!("{sig}@{moment}"));
        let out = cmd.output().unwrap();
        let text = stderr(&out);
        log.push(format!("{sig}@{moment}"));
        let expected_code = if sig == "SIGINT" { 130 } else { 143 };
        assert_eq!(out.status.code(), Some(expected_code), "{log:?}: {text}");
        step = match moment.split_once(':').unwrap() {
            ("precompute", _) => 0,
            ("step", n) => n.parse().unwrap(),
            // The evaluation after the step the run had reached stops it there: 4 or 8.
            _ => (step / 4 + 1) * 4,
        };
        assert!(
            text.contains(&format!(
                "stopped at step {step} of {MAX_STEPS}; continue with --resume"
            )),
            "{log:?}: {text}"
        );
        if step > 0 {
            // Saved whatever save_steps (5) says, and sealed.
            let checkpoint = out_dir.join(format!("checkpoint-{step}"));
            kto_trainer::checkpoint::check_complete(&checkpoint, true).unwrap();
            let state = kto_trainer::checkpoint::TrainerState::load(&checkpoint).unwrap();
            assert_eq!(
                state.evaluation_pending,
                moment.starts_with("eval"),
                "a stop inside an evaluation leaves it to the resumed run"
            );
        } else {
            assert!(
                std::fs::read_dir(dir.path().join("cache"))
                    .map_or(true, |mut d| d.next().is_none()),
                "a stopped precompute caches nothing"
            );
        }
        assert!(temporaries(&out_dir).is_empty(), "{log:?}");
    }

    // A second signal while the first is being honoured ends the process at once: no checkpoint of that step.
    let mut cmd = with_evaluation(train_command(dir.path(), true, 0));
    cmd.env(
        "KTO_TEST_SIGNAL",
        format!("SIGTERM@step:{MAX_STEPS},SIGINT@step:{MAX_STEPS}"),
    );
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(!stderr(&out).contains("stopped at"), "{}", stderr(&out));
    assert!(!out_dir.join(format!("checkpoint-{MAX_STEPS}")).exists());

    run_to_end_with_evaluation(dir.path());
    assert_same_run(dir.path(), reference.path());
    assert!(temporaries(&out_dir).is_empty());
}

fn run_to_end_with_evaluation(dir: &Path) {
    let out = with_evaluation(train_command(dir, true, 0))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn failed_write_leaves_no_temporary_and_a_resumable_folder() {
    let reference = uninterrupted_run();

    let dir = run_folder();
    let out_dir = dir.path().join("out");
    // The third checkpoint's optimizer state: the disk fills up in the middle of a checkpoint.
    let out = train_command(dir.path(), false, 0)
        .env("KTO_FAULT_WRITE_ERROR", "optimizer.safetensors@3")
        .output()
        .unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.matches("error:").count(), 1, "{text}");
    assert_eq!(
        text.matches("No space left on device").count(),
        1,
        "the OS error once: {text}"
    );
    assert!(text.contains("optimizer.safetensors"), "{text}");
    assert!(
        temporaries(&out_dir).is_empty(),
        "{:?}",
        temporaries(&out_dir)
    );
    assert!(!out_dir.join("checkpoint-3").exists());
    kto_trainer::checkpoint::check_complete(&out_dir.join("checkpoint-2"), true).unwrap();

    run_to_end(dir.path(), true);
    assert_same_run(dir.path(), reference.path());
}

/// `eval`, `plot`, `generate` and `export` only read a run folder: they work while a training process holds it.
#[test]
fn readers_work_while_the_folder_is_locked() {
    let dir = uninterrupted_run();
    let out_dir = dir.path().join("out");
    let lock = kto_trainer::run_dir::RunLock::acquire(&out_dir).unwrap();
    let eval_file = format!(
        "data.eval_file={}",
        trl_fixture().join("data.jsonl").display()
    );
    let commands: [&[&str]; 4] = [
        &[
            "eval",
            "--config",
            "kto.toml",
            "--set",
            &eval_file,
            "--out",
            "eval.json",
        ],
        &["plot", "out", "--out", "curves.svg"],
        &[
            "generate",
            "--config",
            "kto.toml",
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
        ],
        &[
            "export",
            "--config",
            "kto.toml",
            "--adapter",
            "out/adapter",
            "--out",
            "merged",
        ],
    ];
    for args in commands {
        let out = kto_warn(dir.path(), args);
        assert!(out.status.success(), "kto {args:?}: {}", stderr(&out));
    }
    assert_eq!(
        std::fs::read_to_string(out_dir.join(".kto-run.lock")).unwrap(),
        format!("{}\n", std::process::id()),
        "the lock is untouched"
    );
    drop(lock);
}

/// `--overwrite` (and `[train] overwrite_output_dir`) replace an earlier run: its files go before the new run writes,
/// other files stay, and the new run equals a run in an empty folder.
#[test]
fn overwrite_replaces_an_earlier_run() {
    let alone = uninterrupted_run();

    let dir = run_folder();
    let out_dir = dir.path().join("out");
    // An earlier, different run (2 steps) and a file of the user's.
    let earlier = train_command(dir.path(), false, 0)
        .args(["--set", "train.max_steps=2"])
        .output()
        .unwrap();
    assert!(earlier.status.success(), "{}", stderr(&earlier));
    std::fs::write(out_dir.join("notes.txt"), "mine").unwrap();

    let both = train_command(dir.path(), true, 0)
        .arg("--overwrite")
        .output()
        .unwrap();
    assert!(!both.status.success());
    assert!(stderr(&both).contains("--overwrite"), "{}", stderr(&both));

    let out = train_command(dir.path(), false, 0)
        .arg("--overwrite")
        .output()
        .unwrap();
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("--overwrite: removed the earlier run's adapter, checkpoint-1, checkpoint-2"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("notes.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_file(out_dir.join("notes.txt")).unwrap();
    assert!(deterministic_files(&out_dir) == deterministic_files(&alone.path().join("out")));
    assert_same_run(dir.path(), alone.path());

    // The config key does the same.
    let again = train_command(dir.path(), false, 0)
        .args(["--set", "train.overwrite_output_dir=true"])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert_same_run(dir.path(), alone.path());
}
