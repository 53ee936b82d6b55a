//! Data parallelism (issue 23): `mpirun -n 2 kto train` against TRL 1.16 + PEFT trained by `torchrun
//! --nproc_per_node 2` (`tests/fixtures/trl-kto-dp`, made by `scripts/make-trl-kto-dp-fixture.py`), training and
//! evaluation rows; a stop asked of one rank or of all; a rank that dies; a run killed and resumed; the lock; and
//! the refusal of a kto built without the `mpi` feature to run as one of several launched processes.
//!
//! The MPI runs need kto built with `--features mpi` and Open MPI's `mpirun`: `cargo test -p kto-cli --features mpi
//! --test data_parallel` (CI installs Debian's openmpi-bin and libopenmpi-dev and runs it). Built with the feature,
//! a missing `mpirun` fails the tests rather than skipping them.
mod common;

use std::path::Path;

use kto_data::testing::{fixture, trl_fixture};

/// A kto without `mpi`, started as one of two processes, refuses with one line and writes nothing.
#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_mpi_feature_a_launched_rank_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_dp_config(dir.path(), "kto_wraparound", "");
    for (var, value) in [
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("PMI_SIZE", "4"),
        ("SLURM_STEP_NUM_TASKS", "2"),
    ] {
        let out = common::kto_command(dir.path(), &["train", "--config", &config])
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{var}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "started as one of {value} processes ({var}={value})"
            )) && stderr.contains("built without the `mpi` feature"),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!dir.path().join("out").exists(), "nothing written");
    }
    // One launched process is a run alone.
    let out = common::kto_command(
        dir.path(),
        &["train", "--config", &config, "--print-config"],
    )
    .env("OMPI_COMM_WORLD_SIZE", "1")
    .output()
    .unwrap();
    assert!(out.status.success());
    println!(
        "the MPI runs are tested with `cargo test -p kto-cli --features mpi --test data_parallel` (this build has no \
         `mpi` feature)"
    );
}

#[cfg(feature = "mpi")]
mod mpi_runs {
    use super::*;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use common::{adapter_bytes, deterministic, metrics_rows};
    use serde_json::{Map, Value};

    /// `mpirun` of one `kto ARGS` per entry of `ranks` (MPMD: rank i gets the environment variables of entry i) in
    /// `dir`. Open MPI asks for the two OMPI_ALLOW_RUN_AS_ROOT variables where tests run as root (CI).
    fn mpirun(dir: &Path, ranks: &[&[(&str, &str)]], args: &[&str]) -> Command {
        let mut command = Command::new("mpirun");
        command.arg("--oversubscribe");
        for (i, env) in ranks.iter().enumerate() {
            if i > 0 {
                command.arg(":");
            }
            command.args(["-n", "1", "env"]);
            command.args(env.iter().map(|(k, v)| format!("{k}={v}")));
            command.arg(env!("CARGO_BIN_EXE_kto")).args(args);
        }
        command
            .current_dir(dir)
            .env("KTO_CACHE_DIR", dir.join("cache"))
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    const TWO: &[&[(&str, &str)]] = &[&[], &[]];

    fn run(mut command: Command) -> Output {
        command
            .output()
            .expect("mpirun (Open MPI's openmpi-bin) must be installed for the mpi tests")
    }

    fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn train_to_end(dir: &Path, resume: bool) {
        let mut args = vec!["train", "--config", "kto.toml", "--quiet"];
        if resume {
            args.push("--resume");
        }
        let out = run(mpirun(dir, TWO, &args));
        assert!(
            out.status.success(),
            "mpirun -n 2 kto {}:\n{}",
            args.join(" "),
            stderr(&out)
        );
    }

    /// `mpirun -n 2 kto train` on the fixture run `name` must give TRL's per-step training and evaluation metrics
    /// to 1e-4 and its final adapter.
    fn matches_trl(name: &str) -> Result<()> {
        let dir = tempfile::tempdir()?;
        write_dp_config(dir.path(), name, "");
        train_to_end(dir.path(), false);
        let run = fixture("trl-kto-dp").join("runs").join(name);
        let settings: Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json"))?)?;
        let beta = settings["beta"].as_f64().context("beta")?;
        let log: Vec<Map<String, Value>> =
            serde_json::from_str(&std::fs::read_to_string(run.join("log.json"))?)?;
        let got = metrics_rows(dir.path());
        let mut worst = (0f64, String::new());
        for kind in ["loss", "eval_loss"] {
            let want: Vec<&Map<String, Value>> =
                log.iter().filter(|r| r.contains_key(kind)).collect();
            let got: Vec<&Map<String, Value>> =
                got.iter().filter(|r| r.contains_key(kind)).collect();
            assert_eq!(got.len(), want.len(), "{name}: rows with {kind}");
            for (row, trl_row) in got.iter().zip(want) {
                assert_eq!(row["step"], trl_row["step"], "{name}: {kind} rows");
                for (key, value) in trl_row {
                    let (Some(want), false) = (
                        value.as_f64(),
                        key.ends_with("runtime") || key.ends_with("per_second"),
                    ) else {
                        continue;
                    };
                    let got = row
                        .get(key)
                        .and_then(Value::as_f64)
                        .with_context(|| format!("{name}: row lacks {key}"))?;
                    let allowed = 1e-6f64
                        .max(1e-4 * want.abs())
                        .max(reward_floor(key, trl_row, beta));
                    let ratio = (got - want).abs() / allowed;
                    if ratio > worst.0 {
                        worst = (
                            ratio,
                            format!("step {} {key}: got {got}, TRL {want}", trl_row["step"]),
                        );
                    }
                }
            }
        }
        println!(
            "{name}: worst metric {}, {:.1} % of its tolerance",
            worst.1,
            100.0 * worst.0
        );
        assert!(worst.0 <= 1.0, "{name}: {}", worst.1);

        let device = candle_core::Device::Cpu;
        let trl = candle_core::safetensors::load(run.join("adapter_model.safetensors"), &device)?;
        let ours = candle_core::safetensors::load(
            dir.path().join("out/adapter/adapter_model.safetensors"),
            &device,
        )?;
        assert_eq!(ours.len(), trl.len(), "{name}: adapter tensors");
        // Every weight within 1e-4 of TRL's, except where AdamW's update is decided by rounding: a gradient at the
        // scale of adam_epsilon moves its weight by an unresolved fraction of the learning rate. Such weights must
        // stay under 0.1 % of the adapter and within a tenth of one step (lr / 10) of TRL's.
        let lr = settings["learning_rate"]
            .as_f64()
            .context("learning_rate")? as f32;
        let (mut elements, mut unresolved, mut largest) = (0usize, 0usize, 0f32);
        for (key, want) in &trl {
            let got = ours.get(key).with_context(|| format!("{name}: no {key}"))?;
            let diffs = (got - want)?.abs()?.flatten_all()?.to_vec1::<f32>()?;
            elements += diffs.len();
            for diff in diffs {
                largest = largest.max(diff);
                if diff > 1e-4 {
                    unresolved += 1;
                    assert!(diff <= lr / 10.0, "{name}: {key} differs by {diff}");
                }
            }
        }
        println!("{name}: adapter within 1e-4 of TRL's but {unresolved} of {elements} weights (largest {largest})");
        assert!(
            unresolved * 1000 <= elements,
            "{name}: {unresolved} of {elements} weights differ"
        );
        Ok(())
    }

    /// Rewards are β·(policy − reference) of log-probs summed in f32 (values of tens): near 0 they carry the
    /// rounding of those sums, a few 1e-7 of |log-prob| each, so they are also allowed 2e-6 of β·|log-prob| of their
    /// class (β·|logps/chosen| for margins, whichever class is larger).
    fn reward_floor(key: &str, trl_row: &Map<String, Value>, beta: f64) -> f64 {
        let key = key.strip_prefix("eval_").unwrap_or(key);
        let prefix = if trl_row.contains_key("eval_loss") {
            "eval_"
        } else {
            ""
        };
        let logps = |class: &str| {
            trl_row
                .get(&format!("{prefix}logps/{class}"))
                .and_then(Value::as_f64)
        };
        let scale = match key {
            "rewards/chosen" => logps("chosen"),
            "rewards/rejected" => logps("rejected"),
            "rewards/margins" => logps("chosen")
                .zip(logps("rejected"))
                .map(|(c, r)| c.abs().max(r.abs())),
            _ => None,
        };
        scale.map_or(0.0, |s| 2e-6 * s.abs() * beta)
    }

    #[test]
    fn even_batches_wrap_around_as_accelerate() -> Result<()> {
        matches_trl("kto_wraparound")
    }

    #[test]
    fn odd_micro_batch_with_accumulation_truncation_and_evaluation() -> Result<()> {
        matches_trl("kto_odd_accum_eval")
    }

    #[test]
    fn precomputed_reference_without_kl_and_evaluation() -> Result<()> {
        matches_trl("apo_precompute")
    }

    /// The fixture run with evaluation, saving every step, trained to its end by two ranks.
    fn uninterrupted() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_dp_config(dir.path(), "kto_odd_accum_eval", "save_steps = 1\n");
        train_to_end(dir.path(), false);
        dir
    }

    fn assert_same_run(dir: &Path, reference: &Path, what: &str) {
        assert!(
            adapter_bytes(dir) == adapter_bytes(reference),
            "{what}: the final adapter differs from the uninterrupted run's"
        );
        assert_eq!(
            deterministic(metrics_rows(dir)),
            deterministic(metrics_rows(reference)),
            "{what}: metrics.jsonl"
        );
    }

    /// A stop asked of one rank, or of both (as a cluster signals every rank), stops both at the same step: one
    /// checkpoint, exit 143 / 130; `--resume` by two ranks then ends as the uninterrupted run did, bit for bit,
    /// and by one process is refused.
    #[test]
    fn a_stop_on_any_rank_stops_all_and_resumes_to_the_same_run() {
        let reference = uninterrupted();
        let cases: [(&str, &[&[(&str, &str)]], i32, &str); 3] = [
            (
                "SIGTERM to rank 1 at step 2",
                &[&[], &[("KTO_TEST_SIGNAL", "SIGTERM@step:2")]],
                143,
                "checkpoint-2",
            ),
            (
                "SIGTERM to rank 0 at step 3",
                &[&[("KTO_TEST_SIGNAL", "SIGTERM@step:3")], &[]],
                143,
                "checkpoint-3",
            ),
            (
                "SIGINT to both in the first evaluation",
                &[
                    &[("KTO_TEST_SIGNAL", "SIGINT@eval:1")],
                    &[("KTO_TEST_SIGNAL", "SIGINT@eval:1")],
                ],
                130,
                "checkpoint-2",
            ),
        ];
        for (what, ranks, status, checkpoint) in cases {
            let dir = tempfile::tempdir().unwrap();
            write_dp_config(dir.path(), "kto_odd_accum_eval", "save_steps = 1\n");
            let out = run(mpirun(
                dir.path(),
                ranks,
                &["train", "--config", "kto.toml"],
            ));
            let text = stderr(&out);
            assert_eq!(out.status.code(), Some(status), "{what}: {text}");
            assert_eq!(
                text.matches("continue with --resume").count(),
                1,
                "{what}: rank 0 alone reports the stop: {text}"
            );
            let out_dir = dir.path().join("out");
            assert!(out_dir.join(checkpoint).is_dir(), "{what}: {text}");
            assert!(!out_dir.join("adapter").exists(), "{what}: not finished");

            let alone = common::kto(dir.path(), &["train", "--config", "kto.toml", "--resume"]);
            let refusal = common::stderr(&alone);
            assert_eq!(alone.status.code(), Some(1), "{what}: {refusal}");
            assert!(
                refusal.contains("was trained by 2 processes and this run has 1 process")
                    && refusal.contains("mpirun -n 2 kto train --resume"),
                "{what}: {refusal}"
            );

            train_to_end(dir.path(), true);
            assert_same_run(dir.path(), reference.path(), what);
        }
    }

    /// A rank that dies (SIGKILL at step 2) ends the run: mpirun stops the other rank and exits non-zero within a
    /// bounded time, naming the rank; the run then resumes from its last checkpoint to the uninterrupted result.
    #[test]
    fn a_rank_that_dies_ends_the_run_which_resumes_from_its_last_checkpoint() {
        let reference = uninterrupted();
        let dir = tempfile::tempdir().unwrap();
        write_dp_config(dir.path(), "kto_odd_accum_eval", "save_steps = 1\n");
        let started = Instant::now();
        let mut child = mpirun(
            dir.path(),
            &[&[], &[("KTO_TEST_SIGNAL", "SIGKILL@step:2")]],
            &["train", "--config", "kto.toml"],
        )
        .spawn()
        .expect("mpirun");
        let limit = Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > limit {
                child.kill().unwrap();
                panic!("the run outlived its dead rank by more than {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let text = stderr(&out);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("rank 1"), "the dead rank is named: {text}");
        assert!(dir.path().join("out/checkpoint-1").is_dir(), "{text}");
        train_to_end(dir.path(), true);
        assert_same_run(dir.path(), reference.path(), "killed at step 2");
    }

    /// Rank 0 holds the run folder's lock while the ranks train: another `kto train` there is refused, naming
    /// rank 0's process.
    #[test]
    fn rank_0_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        write_dp_config(dir.path(), "kto_odd_accum_eval", "save_steps = 1\n");
        // Slowed down (each checkpoint write pauses) so that it still trains when the second run starts.
        let slow: &[(&str, &str)] = &[("KTO_FAULT_DELAY_MS", "500")];
        let mut first = mpirun(
            dir.path(),
            &[slow, slow],
            &["train", "--config", "kto.toml"],
        )
        .spawn()
        .expect("mpirun");
        let lock = dir.path().join("out/.kto-run.lock");
        let started = Instant::now();
        let pid = loop {
            if let Ok(pid) = std::fs::read_to_string(&lock) {
                if !pid.trim().is_empty() {
                    break pid.trim().to_string();
                }
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no lock file");
            std::thread::sleep(Duration::from_millis(5));
        };
        let second = common::kto(dir.path(), &["train", "--config", "kto.toml", "--resume"]);
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended before the second was refused: the test proves nothing"
        );
        let text = common::stderr(&second);
        assert_eq!(second.status.code(), Some(1), "{text}");
        assert!(
            text.starts_with(&format!("error: out is in use by process {pid},")),
            "{text}"
        );
        assert!(first.wait().unwrap().success());
        assert!(!lock.exists(), "the lock file goes with its run");
    }
}

/// The fixture run `name` as a kto config in `dir` (training into `out/`, evaluating as the fixture did), with
/// `extra` appended to its `[train]` table; returns the config's path.
fn write_dp_config(dir: &Path, name: &str, extra: &str) -> String {
    let fx = fixture("trl-kto-dp");
    let parity = trl_fixture();
    let settings: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fx.join("runs").join(name).join("config.json")).unwrap(),
    )
    .unwrap();
    let get = |key: &str| settings[key].to_string();
    let precompute = settings
        .get("precompute_ref_log_probs")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let (eval_file, eval_steps) = match settings["eval_strategy"].as_str() {
        Some("steps") => (
            format!("eval_file = \"{}\"\n", fx.join("eval.jsonl").display()),
            format!(
                "eval_steps = {}\nper_device_eval_batch_size = {}\n",
                get("eval_steps"),
                get("per_device_eval_batch_size")
            ),
        ),
        _ => Default::default(),
    };
    let text = format!(
        "[model]\npath = \"{model}\"\n[lora]\ninit_adapter = \"{adapter}\"\n[data]\ntrain_file = \"{data}\"\n\
         {eval_file}max_length = {max_length}\n[kto]\nloss_type = {loss_type}\nbeta = {beta}\n\
         desirable_weight = {dw}\nundesirable_weight = {uw}\nprecompute_ref_log_probs = {precompute}\n[train]\n\
         output_dir = \"out\"\nper_device_train_batch_size = {batch}\ngradient_accumulation_steps = {accum}\n\
         learning_rate = {lr}\nlr_scheduler_type = \"constant\"\nmax_steps = {steps}\nmax_grad_norm = {clip}\n\
         weight_decay = 0.0\nlogging_steps = 1\n{eval_steps}{extra}",
        model = parity.join("model").display(),
        adapter = parity.join("adapter_init").display(),
        data = fx.join("train.jsonl").display(),
        max_length = get("max_length"),
        loss_type = get("loss_type"),
        beta = get("beta"),
        dw = get("desirable_weight"),
        uw = get("undesirable_weight"),
        batch = get("per_device_train_batch_size"),
        accum = get("gradient_accumulation_steps"),
        lr = get("learning_rate"),
        steps = get("max_steps"),
        clip = get("max_grad_norm"),
    );
    let path = dir.join("kto.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}
