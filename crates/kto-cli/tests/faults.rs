//! Kill anywhere: `kto train` killed with SIGKILL at seeded random moments (some inside checkpoint writes) and
//! resumed with `--resume` each time ends with the adapter and metrics of an uninterrupted run, bit for bit.
//! Damaged checkpoints are reported and skipped in favour of the previous intact one.
//!
//! The run: the TRL fixture's tiny model and 12 samples, a fresh LoRA with dropout, shuffled batches, gradient
//! accumulation, 12 steps, a checkpoint every step, `save_total_limit = 2` — every piece of state a resume restores.
//! `KTO_FAULT_DELAY_MS` makes each checkpoint write pause after its files are written and before it is sealed, so
//! the harness can see the temporary folder and kill the process inside the write.
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::{
    adapter_bytes, deterministic, metrics_rows, run_folder, run_to_end, train_command,
    uninterrupted_run, MAX_STEPS,
};

const KILLS: usize = 12;
const SEED: u64 = 20261123;

/// A temporary checkpoint or final-adapter folder: a write is in progress.
fn write_in_progress(out: &Path) -> Option<String> {
    std::fs::read_dir(out).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        (name.starts_with('.') && name.contains(".tmp-") && e.path().is_dir()).then_some(name)
    })
}

/// How a launch is killed.
#[derive(Debug)]
enum Moment {
    /// After this long, wherever the process is (loading, training, logging, saving).
    After(Duration),
    /// Inside the n-th checkpoint write seen (0-based), this long after it was first seen.
    InWrite { nth: usize, delay: Duration },
}

/// Waits for `moment` and kills `child`; false when the process ended first.
fn kill_at(child: &mut Child, out: &Path, moment: &Moment) -> bool {
    let start = Instant::now();
    let mut seen = 0;
    let mut last: Option<String> = None;
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        let due = match moment {
            Moment::After(d) => start.elapsed() >= *d,
            Moment::InWrite { nth, delay } => match write_in_progress(out) {
                Some(name) if last.as_ref() != Some(&name) => {
                    last = Some(name);
                    seen += 1;
                    if seen > *nth {
                        std::thread::sleep(*delay);
                        true
                    } else {
                        false
                    }
                }
                Some(_) => false,
                None => {
                    last = None;
                    false
                }
            },
        };
        if due {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[test]
fn killed_and_resumed_run_equals_an_uninterrupted_one() {
    let reference = run_folder();
    let started = Instant::now();
    run_to_end(reference.path(), false);
    let full_run = started.elapsed();

    let dir = run_folder();
    let out = dir.path().join("out");
    let mut rng = StdRng::seed_from_u64(SEED);
    let (mut kills, mut kills_in_write, mut launches) = (0, 0, 0);
    let mut log = Vec::new();
    while kills < KILLS {
        assert!(
            launches < 4 * KILLS,
            "too many launches ended before their kill: {log:?}"
        );
        let fault_delay = 25;
        let moment = if launches % 2 == 1 {
            Moment::InWrite {
                nth: rng.random_range(0..3),
                delay: Duration::from_millis(rng.random_range(0..fault_delay)),
            }
        } else {
            // Anywhere in the first 60% of a full run (later moments would often let it finish).
            Moment::After(full_run.mul_f64(rng.random_range(0.0..0.6)))
        };
        let had_checkpoint = kto_trainer::run_dir::RunDir::new(&out)
            .latest_complete()
            .is_some();
        let resume = launches > 0;
        let mut child = train_command(dir.path(), resume, fault_delay)
            .spawn()
            .unwrap();
        let killed = kill_at(&mut child, &out, &moment);
        launches += 1;
        let stderr = {
            use std::io::Read;
            let mut s = String::new();
            child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
            s
        };
        // A launch killed early may die before it says anything (on a loaded machine, before it reaches the
        // lock); one that ran to its end must have said it. (`resume_before_any_checkpoint_starts_from_the_beginning` checks the line
        // deterministically.)
        if resume && !had_checkpoint && !killed {
            assert!(
                stderr.contains("starting from the beginning"),
                "--resume with no checkpoint says so: {stderr}"
            );
        }
        log.push(format!("{moment:?} killed={killed}"));
        if !killed {
            // It ran to its end before the moment came; start over so that the remaining kills still happen.
            assert!(!stderr.contains("error"), "{stderr}");
            std::fs::remove_dir_all(&out).unwrap();
            launches = 0;
            continue;
        }
        kills += 1;
        kills_in_write += matches!(moment, Moment::InWrite { .. }) as usize;
        // Whatever the moment, every sealed checkpoint is intact. Temporaries (`.NAME.tmp-PID`: a write in progress,
        // or an old checkpoint renamed aside to be deleted) are no checkpoints; the next start removes them (below).
        for entry in std::fs::read_dir(&out).into_iter().flatten().flatten() {
            let path = entry.path();
            let temporary =
                kto_data::atomic::is_temporary_name(&entry.file_name().to_string_lossy());
            if !temporary && path.join("manifest.json").exists() {
                kto_trainer::checkpoint::check_complete(&path, true)
                    .unwrap_or_else(|e| panic!("after {moment:?}: {e:#}"));
            }
        }
    }
    assert!(kills_in_write >= KILLS / 3, "{log:?}");

    run_to_end(dir.path(), true);
    assert!(
        adapter_bytes(dir.path()) == adapter_bytes(reference.path()),
        "the final adapter differs from the uninterrupted run's after {log:?}"
    );
    let rows = deterministic(metrics_rows(dir.path()));
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(
        steps,
        (1..=MAX_STEPS as u64).collect::<Vec<_>>(),
        "each step logged once"
    );
    assert_eq!(rows, deterministic(metrics_rows(reference.path())));
    assert!(
        write_in_progress(&out).is_none(),
        "leftover temporaries are removed on resume"
    );
}

/// Flips one byte in the middle of a file (same size: only the checksum can tell).
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn damaged_checkpoints_are_reported_and_skipped() {
    let reference = uninterrupted_run();

    // A finished run keeps checkpoints 11 and 12 (save_total_limit = 2); drop its adapter and metrics.
    let dir = run_folder();
    let out = dir.path().join("out");
    run_to_end(dir.path(), false);
    std::fs::remove_dir_all(out.join("adapter")).unwrap();
    std::fs::remove_file(out.join("metrics.jsonl")).unwrap();
    let newest = out.join(format!("checkpoint-{MAX_STEPS}"));
    let older = out.join(format!("checkpoint-{}", MAX_STEPS - 1));
    assert!(newest.exists() && older.exists());

    // The newest checkpoint corrupted (same size): reported, skipped, resumed from the one before.
    corrupt(&newest.join("optimizer.safetensors"));
    let stderr = run_to_end(dir.path(), true);
    assert!(
        stderr.contains(&format!("checkpoint-{MAX_STEPS}")) && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
    assert!(adapter_bytes(dir.path()) == adapter_bytes(reference.path()));
    let rows = deterministic(metrics_rows(dir.path()));
    assert_eq!(rows, deterministic(metrics_rows(reference.path())));

    // Truncated files and a missing manifest are caught too; with nothing intact left, resuming is refused.
    let trainable = newest.join("trainable.safetensors");
    let len = std::fs::metadata(&trainable).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&trainable)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::remove_file(older.join("manifest.json")).unwrap();
    let out_cmd = train_command(dir.path(), true, 0).output().unwrap();
    let stderr = String::from_utf8_lossy(&out_cmd.stderr);
    assert!(!out_cmd.status.success());
    assert!(
        stderr.contains("trainable.safetensors")
            && stderr.contains("the manifest says")
            && stderr.contains("no manifest")
            && stderr.contains("no intact checkpoint"),
        "{stderr}"
    );
}

#[test]
fn resume_before_any_checkpoint_starts_from_the_beginning() {
    let dir = run_folder();
    let stderr = run_to_end(dir.path(), true);
    assert!(
        stderr.contains("no checkpoint in out yet: starting from the beginning"),
        "{stderr}"
    );
    let steps: Vec<u64> = metrics_rows(dir.path())
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=MAX_STEPS as u64).collect::<Vec<_>>());
}
