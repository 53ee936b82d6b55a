//! How `kto` shows progress: indicatif bars on a terminal (training steps with loss, reward margin, KL,
//! samples/s and ETA; a second bar for the reference precompute and for evaluation), plain log lines when stderr
//! is not a terminal, nothing with `--quiet`. Log messages are printed above the bars so they never tear them.
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kto_trainer::progress::{DataPass, Observer, Silent};
use serde_json::{Map, Value};

/// Sets up logging for the whole process and returns what shows the progress of training, precompute and
/// evaluation. `quiet` keeps warnings and errors only (`RUST_LOG` still wins for logging).
pub fn init(quiet: bool) -> Arc<dyn Observer> {
    let terminal = std::io::stderr().is_terminal();
    let bars =
        (terminal && !quiet).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    let default_level = if quiet { "warn" } else { "info" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(AboveBars(bars.clone()))
        .with_ansi(terminal)
        .without_time()
        .with_target(false)
        .try_init();
    match (quiet, bars) {
        (true, _) => Arc::new(Silent),
        (false, Some(bars)) => Arc::new(Bars::new(bars)),
        (false, None) => Arc::new(LogLines::default()),
    }
}

/// Writes log lines to stderr, hiding the bars while it does.
#[derive(Clone)]
struct AboveBars(Option<MultiProgress>);

impl Write for AboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Some(bars) => bars.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AboveBars {
    type Writer = AboveBars;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Training speed since training (re)started.
#[derive(Debug, Clone)]
struct Rate {
    started: Instant,
    first_step: usize,
    max_steps: usize,
    samples: usize,
}

impl Rate {
    fn new(first_step: usize, max_steps: usize) -> Self {
        Self {
            started: Instant::now(),
            first_step,
            max_steps,
            samples: 0,
        }
    }

    fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn eta(&self, step: usize) -> Option<Duration> {
        let done = step.checked_sub(self.first_step).filter(|&d| d > 0)?;
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        Some(Duration::from_secs_f64(
            per_step * self.max_steps.saturating_sub(step) as f64,
        ))
    }
}

fn metric(row: &Map<String, Value>, key: &str) -> Option<f64> {
    row.get(key).and_then(Value::as_f64)
}

/// "loss 0.6931  margin 0.0123  kl 0.0000" from a training row.
fn train_figures(row: &Map<String, Value>) -> String {
    [
        ("loss", "loss"),
        ("margin", "rewards/margins"),
        ("kl", "kl"),
    ]
    .iter()
    .filter_map(|(label, key)| metric(row, key).map(|v| format!("{label} {v:.4}")))
    .collect::<Vec<_>>()
    .join("  ")
}

/// "eval at step 40: loss 0.61  reward accuracy 0.850  AUROC 0.912  pair accuracy 0.900" from an eval row.
fn eval_line(row: &Map<String, Value>) -> String {
    let figures = [
        ("loss", "eval_loss"),
        ("reward accuracy", "eval_reward_accuracy"),
        ("AUROC", "eval_reward_auroc"),
        ("pair accuracy", "eval_pair_accuracy"),
        ("margin", "eval_rewards/margins"),
        ("kl", "eval_kl"),
    ]
    .iter()
    .filter_map(|(label, key)| metric(row, key).map(|v| format!("{label} {v:.4}")))
    .collect::<Vec<_>>()
    .join("  ");
    match row.get("step") {
        Some(step) => format!("eval at step {step}: {figures}"),
        None => format!("eval: {figures}"),
    }
}

fn is_eval_row(row: &Map<String, Value>) -> bool {
    row.contains_key("eval_loss")
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Terminal bars.
struct Bars {
    bars: MultiProgress,
    state: Mutex<BarState>,
}

#[derive(Default)]
struct BarState {
    training: Option<(ProgressBar, Rate)>,
    figures: String,
    pass: Option<ProgressBar>,
}

impl BarState {
    /// The training bar's message: the last logged figures and the speed.
    fn refresh(&self) {
        if let Some((bar, rate)) = &self.training {
            bar.set_message(format!(
                "{}  {:.1} samples/s",
                self.figures,
                rate.samples_per_second()
            ));
        }
    }
}

impl Bars {
    fn new(bars: MultiProgress) -> Self {
        Self {
            bars,
            state: Mutex::new(BarState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BarState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid progress template")
        .progress_chars("=> ")
}

impl Observer for Bars {
    fn training_started(&self, first_step: usize, max_steps: usize) {
        let bar = self.bars.add(ProgressBar::new(max_steps as u64));
        bar.set_style(style(
            "train [{bar:30}] {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        ));
        bar.set_position(first_step as u64);
        bar.reset_eta();
        bar.enable_steady_tick(Duration::from_millis(500));
        self.state().training = Some((bar, Rate::new(first_step, max_steps)));
    }

    fn step_finished(&self, step: usize, samples: usize) {
        let mut state = self.state();
        if let Some((bar, rate)) = &mut state.training {
            rate.samples += samples;
            bar.set_position(step as u64);
        }
        state.refresh();
    }

    fn metrics_logged(&self, row: &Map<String, Value>) {
        if is_eval_row(row) {
            self.bars.suspend(|| eprintln!("{}", eval_line(row)));
        } else {
            let mut state = self.state();
            state.figures = train_figures(row);
            state.refresh();
        }
    }

    fn training_finished(&self) {
        if let Some((bar, rate)) = self.state().training.take() {
            // The bar gives way to one line, so that what follows starts on a clean line.
            bar.finish_and_clear();
            self.bars.remove(&bar);
            eprintln!(
                "trained {}/{} steps in {} ({:.1} samples/s)",
                bar.position(),
                rate.max_steps,
                human(rate.started.elapsed()),
                rate.samples_per_second()
            );
        }
    }

    fn pass_started(&self, pass: &DataPass, samples: usize) {
        let bar = self.bars.add(ProgressBar::new(samples as u64));
        bar.set_style(style(
            "{prefix} [{bar:30}] {pos}/{len} samples  [{elapsed_precise} < {eta_precise}]",
        ));
        bar.set_prefix(pass.to_string());
        self.state().pass = Some(bar);
    }

    fn pass_advanced(&self, samples: usize) {
        if let Some(bar) = &self.state().pass {
            bar.inc(samples as u64);
        }
    }

    fn pass_finished(&self, _pass: &DataPass) {
        if let Some(bar) = self.state().pass.take() {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
    }
}

/// Plain log lines for logs and CI: one per logged metrics row, passes at their start and end (and every
/// [`LogLines::PASS_INTERVAL`] in between).
#[derive(Default)]
struct LogLines {
    state: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    rate: Option<Rate>,
    step: usize,
    pass: Option<PassLog>,
}

struct PassLog {
    started: Instant,
    last_line: Instant,
    done: usize,
    total: usize,
}

impl LogLines {
    const PASS_INTERVAL: Duration = Duration::from_secs(10);

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Observer for LogLines {
    fn training_started(&self, first_step: usize, max_steps: usize) {
        let mut state = self.state();
        state.rate = Some(Rate::new(first_step, max_steps));
        state.step = first_step;
        tracing::info!("training from step {first_step} to {max_steps}");
    }

    fn step_finished(&self, step: usize, samples: usize) {
        let mut state = self.state();
        state.step = step;
        if let Some(rate) = &mut state.rate {
            rate.samples += samples;
        }
    }

    fn metrics_logged(&self, row: &Map<String, Value>) {
        if is_eval_row(row) {
            tracing::info!("{}", eval_line(row));
            return;
        }
        let state = self.state();
        let Some(rate) = &state.rate else { return };
        let step = state.step;
        let eta = rate
            .eta(step)
            .map_or_else(|| "?".to_string(), |d| human(d).to_string());
        tracing::info!(
            "step {step}/{}  {}  {:.1} samples/s  eta {eta}",
            rate.max_steps,
            train_figures(row),
            rate.samples_per_second()
        );
    }

    fn pass_started(&self, pass: &DataPass, samples: usize) {
        tracing::info!("{pass}: {samples} samples");
        let now = Instant::now();
        self.state().pass = Some(PassLog {
            started: now,
            last_line: now,
            done: 0,
            total: samples,
        });
    }

    fn pass_advanced(&self, samples: usize) {
        if let Some(p) = &mut self.state().pass {
            p.done += samples;
            if p.last_line.elapsed() >= Self::PASS_INTERVAL {
                p.last_line = Instant::now();
                tracing::info!("  {}/{} samples", p.done, p.total);
            }
        }
    }

    fn pass_finished(&self, pass: &DataPass) {
        if let Some(p) = self.state().pass.take() {
            tracing::info!(
                "{pass}: {}/{} samples in {}",
                p.done,
                p.total,
                human(p.started.elapsed())
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, f64)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    }

    #[test]
    fn lines_name_the_figures() {
        let train = row(&[("loss", 0.5), ("rewards/margins", 0.25), ("kl", 0.125)]);
        assert_eq!(
            train_figures(&train),
            "loss 0.5000  margin 0.2500  kl 0.1250"
        );
        let mut eval = row(&[("eval_loss", 0.4), ("eval_reward_accuracy", 0.875)]);
        eval.insert("step".into(), Value::from(40));
        assert!(is_eval_row(&eval) && !is_eval_row(&train));
        assert_eq!(
            eval_line(&eval),
            "eval at step 40: loss 0.4000  reward accuracy 0.8750"
        );
        assert_eq!(human(Duration::from_secs(75)), "1m15s");
        assert_eq!(human(Duration::from_secs(7300)), "2h01m");
    }

    #[test]
    fn eta_from_the_steps_done_since_start() {
        let mut rate = Rate::new(10, 20);
        assert_eq!(rate.eta(10), None, "no step done yet");
        rate.started -= Duration::from_secs(4);
        let eta = rate.eta(12).unwrap().as_secs_f64();
        assert!((eta - 16.0).abs() < 0.1, "2 s per step, 8 left: {eta}");
    }
}
