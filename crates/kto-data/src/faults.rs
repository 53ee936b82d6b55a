//! Fault injection for tests, all of it in this one module: failures made to happen at deterministic moments so
//! that the tests of graceful stop, crash safety and full disks (`crates/kto-cli/tests/stop_and_lock.rs`,
//! `faults.rs`, `e2e.rs`) depend on no timing. Each fault is asked for by an environment variable of the process
//! under test, read once; unset, a hook costs one load of an initialized value. Nothing else in kto reads the
//! environment to change how a run behaves.
//!
//! | variable | effect |
//! |---|---|
//! | `KTO_TEST_SIGNAL=SIG@MOMENT[,…]` | the process sends itself SIGINT, SIGTERM or SIGKILL (a process that dies) when MOMENT begins: `step:N` (optimizer step N), `eval:N` (the process's N-th evaluation batch), `precompute:N` (its N-th reference-precompute batch) |
//! | `KTO_FAULT_DELAY_MS=N` | every checkpoint and final-adapter write sleeps N ms after its files are written and before it is sealed, so a test can kill the process mid-write |
//! | `KTO_FAULT_WRITE_ERROR=NAME@N` | the N-th (1-based) atomic write of a file named NAME fails after its temporary is written, with the OS error of a full disk (ENOSPC) |

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use signal_hook::consts::{SIGINT, SIGKILL, SIGTERM};

pub const SIGNAL_ENV: &str = "KTO_TEST_SIGNAL";
pub const SEAL_DELAY_ENV: &str = "KTO_FAULT_DELAY_MS";
pub const WRITE_ERROR_ENV: &str = "KTO_FAULT_WRITE_ERROR";

/// Where [`SIGNAL_ENV`] may raise a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// Optimizer step N (1-based) begins.
    Step(usize),
    /// The process's next evaluation batch begins.
    EvalBatch,
    /// The process's next reference-precompute batch begins.
    PrecomputeBatch,
}

/// The faults the environment asks for.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// (signal, moment kind, N).
    signals: Vec<(i32, String, usize)>,
    seal_delay: Option<Duration>,
    /// (file name, N).
    write_error: Option<(String, usize)>,
}

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    // A malformed variable asks for nothing here; `check_environment` reports it where a command can say so.
    PLAN.get_or_init(|| read_plan().unwrap_or_default())
}

fn read_plan() -> Result<Plan> {
    let var = |name| std::env::var(name).ok();
    Ok(Plan {
        signals: var(SIGNAL_ENV).map_or(Ok(Vec::new()), |s| parse_signals(&s))?,
        seal_delay: var(SEAL_DELAY_ENV)
            .map(|v| {
                v.parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| anyhow!("{SEAL_DELAY_ENV}={v}: expected a number of milliseconds"))
            })
            .transpose()?,
        write_error: var(WRITE_ERROR_ENV)
            .map(|spec| {
                spec.rsplit_once('@')
                    .and_then(|(name, n)| Some((name.to_string(), n.parse::<usize>().ok()?)))
                    .ok_or_else(|| anyhow!("{WRITE_ERROR_ENV}={spec}: expected NAME@N"))
            })
            .transpose()?,
    })
}

/// One clear error for a malformed fault variable (`kto train` checks before it starts).
pub fn check_environment() -> Result<()> {
    read_plan().map(drop)
}

fn parse_signals(spec: &str) -> Result<Vec<(i32, String, usize)>> {
    spec.split(',')
        .map(|item| {
            let bad = || {
                anyhow!(
                    "{SIGNAL_ENV}={spec}: expected SIGINT|SIGTERM|SIGKILL@step|eval|precompute:N"
                )
            };
            let (signal, moment) = item.trim().split_once('@').ok_or_else(bad)?;
            let signal = match signal {
                "SIGINT" => SIGINT,
                "SIGTERM" => SIGTERM,
                "SIGKILL" => SIGKILL,
                _ => bail!(bad()),
            };
            let (kind, n) = moment.split_once(':').ok_or_else(bad)?;
            if !["step", "eval", "precompute"].contains(&kind) {
                bail!(bad());
            }
            Ok((signal, kind.to_string(), n.parse().map_err(|_| bad())?))
        })
        .collect()
}

/// Raises the signals [`SIGNAL_ENV`] schedules for this moment.
pub fn signal_at(moment: Moment) {
    static EVAL_BATCHES: AtomicUsize = AtomicUsize::new(0);
    static PRECOMPUTE_BATCHES: AtomicUsize = AtomicUsize::new(0);
    let plan = plan();
    if plan.signals.is_empty() {
        return;
    }
    let (kind, n) = match moment {
        Moment::Step(n) => ("step", n),
        Moment::EvalBatch => ("eval", EVAL_BATCHES.fetch_add(1, Ordering::SeqCst) + 1),
        Moment::PrecomputeBatch => (
            "precompute",
            PRECOMPUTE_BATCHES.fetch_add(1, Ordering::SeqCst) + 1,
        ),
    };
    for (signal, at_kind, at_n) in &plan.signals {
        if at_kind == kind && *at_n == n {
            signal_hook::low_level::raise(*signal).expect("raise a signal on this process");
        }
    }
}

/// The pause [`SEAL_DELAY_ENV`] asks for between writing a checkpoint's files and sealing it.
pub fn pause_before_seal() {
    if let Some(delay) = plan().seal_delay {
        std::thread::sleep(delay);
    }
}

/// The failure [`WRITE_ERROR_ENV`] asks for at this atomic write of `path`, if any.
pub fn write_error(path: &Path) -> io::Result<()> {
    let Some((name, nth)) = &plan().write_error else {
        return Ok(());
    };
    if path.file_name() != Some(std::ffi::OsStr::new(name)) {
        return Ok(());
    }
    static WRITES: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
    let mut writes = WRITES.lock().unwrap_or_else(|e| e.into_inner());
    let count = writes
        .get_or_insert_with(HashMap::new)
        .entry(name.clone())
        .or_default();
    *count += 1;
    if *count == *nth {
        // ENOSPC: what a full disk reports.
        return Err(io::Error::from_raw_os_error(28));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_plan_parses_and_rejects_typos() -> Result<()> {
        assert_eq!(
            parse_signals("SIGTERM@step:3,SIGINT@eval:2,SIGKILL@precompute:1")?,
            vec![
                (SIGTERM, "step".into(), 3),
                (SIGINT, "eval".into(), 2),
                (SIGKILL, "precompute".into(), 1)
            ]
        );
        for bad in ["SIGHUP@step:1", "SIGINT@steps:1", "SIGINT@step", "SIGINT"] {
            assert!(parse_signals(bad).is_err(), "{bad}");
        }
        Ok(())
    }
}
