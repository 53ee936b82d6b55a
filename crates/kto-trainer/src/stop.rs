//! Graceful stop on SIGINT/SIGTERM: the first signal only records a request, which the training loop honours after
//! the optimizer step in progress (evaluation and the reference precompute after their current batch); a second
//! signal ends the process at once, with the exit status of that signal (128 + its number).
//!
//! Nothing here is active until [`install`] is called (`kto train` does), so library users and other commands keep
//! the default behaviour of these signals.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

/// The signal of the first stop request; 0 while none came.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// Test hook (`crates/kto-cli/tests/stop_and_lock.rs`): `KTO_TEST_SIGNAL=SIG@MOMENT[,SIG@MOMENT...]` makes the
/// process send itself SIGINT or SIGTERM at deterministic moments, so the tests do not depend on timing. A moment is
/// `step:N` (when optimizer step N begins), `eval:N` (when the N-th evaluation batch of the process begins) or
/// `precompute:N` (the N-th reference-precompute batch). Unset, it costs one lookup per moment.
pub const TEST_SIGNAL_ENV: &str = "KTO_TEST_SIGNAL";

/// The moments [`TEST_SIGNAL_ENV`] schedules: (signal, kind, N).
type TestPlan = Vec<(i32, String, usize)>;
static TEST_PLAN: OnceLock<TestPlan> = OnceLock::new();

/// Installs the handlers for SIGINT and SIGTERM (and reads [`TEST_SIGNAL_ENV`]). Idempotent.
pub fn install() -> Result<()> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    if let Ok(spec) = std::env::var(TEST_SIGNAL_ENV) {
        let _ = TEST_PLAN.set(parse_test_plan(&spec)?);
    }
    let first_came = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it runs before the flag below is set: it ends the process only on a later signal.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, first_came.clone())?;
        let first_came = first_came.clone();
        // SAFETY: the action only stores to atomics, which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(signal, move || {
                let _ = REQUESTED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
                first_came.store(true, Ordering::SeqCst);
            })?;
        }
    }
    let _ = INSTALLED.set(());
    Ok(())
}

/// The signal that asked to stop, if one did.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// The exit status for a run stopped by `signal`: 130 for SIGINT, 143 for SIGTERM, as a shell reports them.
pub fn exit_status(signal: i32) -> i32 {
    128 + signal
}

/// Where [`TEST_SIGNAL_ENV`] may raise a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// Optimizer step N (1-based) begins.
    Step(usize),
    /// The process's N-th evaluation batch begins.
    EvalBatch,
    /// The process's N-th reference-precompute batch begins.
    PrecomputeBatch,
}

/// The test hook: raises the signals that [`TEST_SIGNAL_ENV`] schedules for this moment (none unless [`install`]
/// read a plan).
pub fn test_moment(moment: Moment) {
    static EVAL_BATCHES: AtomicUsize = AtomicUsize::new(0);
    static PRECOMPUTE_BATCHES: AtomicUsize = AtomicUsize::new(0);
    let Some(plan) = TEST_PLAN.get() else {
        return;
    };
    let (kind, n) = match moment {
        Moment::Step(n) => ("step", n),
        Moment::EvalBatch => ("eval", EVAL_BATCHES.fetch_add(1, Ordering::SeqCst) + 1),
        Moment::PrecomputeBatch => (
            "precompute",
            PRECOMPUTE_BATCHES.fetch_add(1, Ordering::SeqCst) + 1,
        ),
    };
    for (signal, at_kind, at_n) in plan {
        if at_kind == kind && *at_n == n {
            signal_hook::low_level::raise(*signal).expect("raise a signal on this process");
        }
    }
}

fn parse_test_plan(spec: &str) -> Result<TestPlan> {
    spec.split(',')
        .map(|item| {
            let bad = || {
                anyhow!("{TEST_SIGNAL_ENV}={spec}: expected SIGINT|SIGTERM@step|eval|precompute:N")
            };
            let (signal, moment) = item.trim().split_once('@').ok_or_else(bad)?;
            let signal = match signal {
                "SIGINT" => SIGINT,
                "SIGTERM" => SIGTERM,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_plan_parses_and_rejects_typos() -> Result<()> {
        assert_eq!(
            parse_test_plan("SIGTERM@step:3,SIGINT@eval:2")?,
            vec![(SIGTERM, "step".into(), 3), (SIGINT, "eval".into(), 2)]
        );
        for bad in ["SIGHUP@step:1", "SIGINT@steps:1", "SIGINT@step", "SIGINT"] {
            assert!(parse_test_plan(bad).is_err(), "{bad}");
        }
        assert_eq!((exit_status(SIGINT), exit_status(SIGTERM)), (130, 143));
        Ok(())
    }
}
