//! Graceful stop: a [`StopRequest`] is what the loop asks between steps (evaluation and the reference precompute:
//! between batches); the step in progress finishes, is saved, and the run ends. `kto train` ties it to SIGINT and
//! SIGTERM with [`StopRequest::on_signals`]: the first signal only requests, a second ends the process at once
//! with the exit status of that signal (128 + its number). A library caller makes its own and calls
//! [`StopRequest::request`]; nothing here is global.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::world::{Counted, World};

/// A shared flag: the signal (or other reason, as a number) that asked the run to stop, once asked.
#[derive(Debug, Clone, Default)]
pub struct StopRequest(Arc<AtomicI32>);

impl StopRequest {
    /// A request that nothing has made yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A request made by the first SIGINT or SIGTERM to this process; a second such signal exits at once.
    pub fn on_signals() -> Result<Self> {
        let stop = Self::new();
        let first_came = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            // Registered first, so it runs before the flag below is set: it ends the process only on a later signal.
            signal_hook::flag::register_conditional_shutdown(
                signal,
                128 + signal,
                first_came.clone(),
            )?;
            let (first_came, requested) = (first_came.clone(), stop.0.clone());
            // SAFETY: the action only stores to atomics, which is async-signal-safe.
            unsafe {
                signal_hook::low_level::register(signal, move || {
                    let _ =
                        requested.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
                    first_came.store(true, Ordering::SeqCst);
                })?;
            }
        }
        Ok(stop)
    }

    /// Asks the run to stop; `signal` is what [`StopRequest::requested`] reports (the first request wins).
    pub fn request(&self, signal: i32) {
        let _ = self
            .0
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The signal that asked to stop, if one did.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal),
        }
    }
}

/// Whether to stop, as every rank of `world` agrees: a stop requested on any rank stops them all at the same point
/// (with this rank's own signal, or the signal of the ranks that asked). One collective sum per call; alone, just
/// the request.
pub fn agreed(stop: &StopRequest, world: &dyn World) -> Result<Option<i32>> {
    let mine = stop.requested();
    if world.size() == 1 {
        return Ok(mine);
    }
    let mut asked = [mine.unwrap_or(0) as f64, mine.is_some() as u8 as f64];
    world.sum_f64(&mut asked, Counted::All)?;
    Ok(match (mine, asked[1] > 0.0) {
        (Some(signal), _) => Some(signal),
        (None, true) => Some((asked[0] / asked[1]).round() as i32),
        (None, false) => None,
    })
}

/// A pass over batches (evaluation, the reference precompute) that every rank ends at the same batch: before each
/// batch the ranks agree whether to stop ([`agreed`]), and [`PassStop::finish`] agrees once more after the last one,
/// so a stop asked during it is seen too. The outcome is kept here because the batches go to a consumer by value.
pub struct PassStop<'a> {
    stop: &'a StopRequest,
    world: &'a dyn World,
    ended: std::cell::RefCell<Option<Result<i32>>>,
}

impl<'a> PassStop<'a> {
    pub fn new(stop: &'a StopRequest, world: &'a dyn World) -> Self {
        Self {
            stop,
            world,
            ended: Default::default(),
        }
    }

    /// `batches` for as long as no rank asks to stop (and the collective that agrees it works).
    pub fn batches<I: Iterator + 'a>(&self, batches: I) -> impl Iterator<Item = I::Item> + '_ {
        batches.take_while(move |_| match agreed(self.stop, self.world) {
            Ok(None) => true,
            Ok(Some(signal)) => {
                self.ended.replace(Some(Ok(signal)));
                false
            }
            Err(err) => {
                self.ended.replace(Some(Err(err)));
                false
            }
        })
    }

    /// The agreed stop, if the pass ended on one or one was asked during its last batch; the collective's error if
    /// agreeing failed.
    pub fn finish(self) -> Result<Option<i32>> {
        match self.ended.into_inner() {
            Some(ended) => ended.map(Some),
            None => agreed(self.stop, self.world),
        }
    }
}

/// The exit status for a run stopped by `signal`: 130 for SIGINT, 143 for SIGTERM, as a shell reports them.
pub fn exit_status(signal: i32) -> i32 {
    128 + signal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let stop = StopRequest::new();
        assert_eq!(stop.requested(), None);
        let seen_by_the_loop = stop.clone();
        stop.request(SIGTERM);
        stop.request(SIGINT);
        assert_eq!(seen_by_the_loop.requested(), Some(SIGTERM));
        assert_eq!((exit_status(SIGINT), exit_status(SIGTERM)), (130, 143));
    }

    #[test]
    fn a_pass_ends_before_the_batch_after_a_stop_and_reports_it() -> Result<()> {
        let world = crate::world::Alone;
        // Asked while batch 1 is consumed: batch 2 is not taken.
        let stop = StopRequest::new();
        let pass = PassStop::new(&stop, &world);
        let taken: Vec<i32> = pass
            .batches(0..5)
            .inspect(|&batch| {
                if batch == 1 {
                    stop.request(SIGTERM)
                }
            })
            .collect();
        assert_eq!(taken, [0, 1]);
        assert_eq!(pass.finish()?, Some(SIGTERM));
        // Asked during the last batch: every batch is taken, and the finish still sees it.
        let stop = StopRequest::new();
        let pass = PassStop::new(&stop, &world);
        assert_eq!(
            pass.batches(0..3)
                .inspect(|&b| if b == 2 {
                    stop.request(SIGINT)
                })
                .count(),
            3
        );
        assert_eq!(pass.finish()?, Some(SIGINT));
        // Never asked.
        let stop = StopRequest::new();
        let pass = PassStop::new(&stop, &world);
        assert_eq!(pass.batches(0..3).count(), 3);
        assert_eq!(pass.finish()?, None);
        Ok(())
    }
}
