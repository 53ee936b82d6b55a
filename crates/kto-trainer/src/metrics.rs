//! `metrics.jsonl` rows with TRL's names, averaged the way TRL 1.16 and transformers 5.17 average them.
//!
//! - TRL appends one value per micro-batch to its `_metrics` lists (`kl`, `entropy`, `logits/*`, `rewards/*`,
//!   `logps/*`; a class-specific value only when the micro-batch has that class, margins only with both) and its
//!   `log` averages every value appended since the previous log, across accumulation micro-batches *and* logging
//!   steps alike. `num_tokens` is the running total of target-sequence tokens.
//! - transformers' `loss` sums `loss / group_size` of every micro-batch into an f32 `tr_loss` and logs
//!   `tr_loss / steps_since_last_log`: the mean over logged steps of each step's (group-averaged) loss.
//! - `grad_norm` is the norm before clipping of the logged step; `learning_rate` the rate that step used.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::loss::MicroBatchMetrics;

/// The values appended since the last log, plus the running token total. Saved in checkpoints so that a resumed
/// run logs exactly the rows an uninterrupted one would.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsAccumulator {
    kl: Vec<f64>,
    entropy: Vec<f64>,
    logits_chosen: Vec<f64>,
    logits_rejected: Vec<f64>,
    rewards_chosen: Vec<f64>,
    rewards_rejected: Vec<f64>,
    logps_chosen: Vec<f64>,
    logps_rejected: Vec<f64>,
    rewards_margins: Vec<f64>,
    /// TRL's `_total_train_tokens`.
    pub total_tokens: u64,
    /// Tokens pushed through the model since the last log, all passes (`num_forward_tokens`; not a TRL metric).
    #[serde(default)]
    forward_tokens: u64,
    /// transformers' `tr_loss` (an f32 tensor there).
    loss_sum: f32,
    steps_since_log: usize,
    samples_since_log: usize,
}

/// The step-level values transformers adds to a training row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    pub step: usize,
    pub epoch: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
}

impl MetricsAccumulator {
    /// Records one training micro-batch: its metrics and its loss already divided by its accumulation group size.
    pub fn add_micro_batch(&mut self, m: &MicroBatchMetrics, scaled_loss: f32, samples: usize) {
        self.push(m);
        self.total_tokens += m.num_tokens;
        self.loss_sum += scaled_loss;
        self.samples_since_log += samples;
    }

    /// Records one evaluation batch's metrics (evaluation does not count tokens: TRL's eval rows repeat the
    /// training total).
    pub fn add_eval_batch(&mut self, m: &MicroBatchMetrics) {
        self.push(m);
    }

    fn push(&mut self, m: &MicroBatchMetrics) {
        self.forward_tokens += m.forward_tokens;
        self.kl.push(m.kl);
        self.entropy.push(m.entropy);
        let optional = [
            (&mut self.logits_chosen, m.logits_chosen),
            (&mut self.logits_rejected, m.logits_rejected),
            (&mut self.rewards_chosen, m.rewards_chosen),
            (&mut self.rewards_rejected, m.rewards_rejected),
            (&mut self.logps_chosen, m.logps_chosen),
            (&mut self.logps_rejected, m.logps_rejected),
            (&mut self.rewards_margins, m.rewards_margins),
        ];
        for (list, value) in optional {
            if let Some(v) = value {
                list.push(v);
            }
        }
    }

    /// Marks the end of an optimizer step.
    pub fn end_step(&mut self) {
        self.steps_since_log += 1;
    }

    pub fn steps_since_log(&self) -> usize {
        self.steps_since_log
    }

    /// The averaged TRL metrics with `prefix` (`""` or `"eval_"`), in TRL's names.
    fn averaged(&self, prefix: &str) -> Map<String, Value> {
        let mut row = Map::new();
        let lists: [(&str, &Vec<f64>); 9] = [
            ("kl", &self.kl),
            ("entropy", &self.entropy),
            ("logits/chosen", &self.logits_chosen),
            ("logits/rejected", &self.logits_rejected),
            ("rewards/chosen", &self.rewards_chosen),
            ("rewards/rejected", &self.rewards_rejected),
            ("logps/chosen", &self.logps_chosen),
            ("logps/rejected", &self.logps_rejected),
            ("rewards/margins", &self.rewards_margins),
        ];
        for (name, values) in lists {
            if !values.is_empty() {
                // Python's sum(val) / len(val): a left-to-right f64 sum.
                let mean = values.iter().fold(0.0, |a, b| a + b) / values.len() as f64;
                row.insert(format!("{prefix}{name}"), json_f64(mean));
            }
        }
        row.insert(
            format!("{prefix}num_tokens"),
            json_f64(self.total_tokens as f64),
        );
        row.insert(
            format!("{prefix}num_forward_tokens"),
            Value::from(self.forward_tokens),
        );
        row
    }

    /// The training row of a logging step; clears everything accumulated since the previous one.
    pub fn take_train_row(&mut self, info: StepInfo, elapsed_seconds: f64) -> Map<String, Value> {
        let mut row = Map::new();
        row.insert("step".into(), Value::from(info.step));
        row.insert("epoch".into(), json_f64(info.epoch));
        let loss = self.loss_sum as f64 / self.steps_since_log.max(1) as f64;
        row.insert("loss".into(), json_f64(loss));
        row.insert("grad_norm".into(), json_f64(info.grad_norm));
        row.insert("learning_rate".into(), json_f64(info.learning_rate));
        row.extend(self.averaged(""));
        let per_second = if elapsed_seconds > 0.0 {
            self.samples_since_log as f64 / elapsed_seconds
        } else {
            0.0
        };
        row.insert(
            "samples_per_second".into(),
            json_f64((per_second * 1000.0).round() / 1000.0),
        );
        self.clear_since_log();
        row
    }

    /// The evaluation row: TRL's averaged metrics with the `eval_` prefix (the caller adds `eval_loss` and the
    /// held-out figures).
    pub fn take_eval_metrics(&mut self, train_total_tokens: u64) -> Map<String, Value> {
        self.total_tokens = train_total_tokens;
        let row = self.averaged("eval_");
        self.clear_since_log();
        row
    }

    fn clear_since_log(&mut self) {
        let total_tokens = self.total_tokens;
        *self = MetricsAccumulator {
            total_tokens,
            ..Default::default()
        };
    }
}

/// JSON has no NaN or infinity: those are written as `null`.
pub fn json_f64(x: f64) -> Value {
    serde_json::Number::from_f64(x)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// Appends one row to `metrics.jsonl` (created when missing).
pub fn append_row(path: &Path, row: &Map<String, Value>) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let line = serde_json::to_string(row)?;
    writeln!(file, "{line}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Replaces `metrics.jsonl` with `rows` (on resume: the rows the checkpoint had), atomically.
pub fn write_rows(path: &Path, rows: &[Map<String, Value>]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row)?);
        text.push('\n');
    }
    kto_data::atomic::write_file(path, text.as_bytes())
}

/// Reads every row of a `metrics.jsonl` with its line number (from 1; blank lines skipped): the one reader of the
/// file, for the trainer, `kto train`'s summary and `kto plot`. Errors name the line.
pub fn read_numbered_rows(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let row = serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: not a JSON object (one metrics row per line)",
                    path.display(),
                    i + 1
                )
            })?;
            Ok((i + 1, row))
        })
        .collect()
}

/// Every row of a `metrics.jsonl` ([`read_numbered_rows`] without the line numbers).
pub fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    Ok(read_numbered_rows(path)?
        .into_iter()
        .map(|(_, row)| row)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kl: f64, rc: Option<f64>, rr: Option<f64>, tokens: u64) -> MicroBatchMetrics {
        MicroBatchMetrics {
            kl,
            entropy: 1.0,
            num_tokens: tokens,
            forward_tokens: 3 * tokens,
            rewards_chosen: rc,
            rewards_rejected: rr,
            rewards_margins: rc.zip(rr).map(|(c, r)| c - r),
            ..Default::default()
        }
    }

    #[test]
    fn averages_every_micro_batch_since_last_log() {
        let mut acc = MetricsAccumulator::default();
        // step 1: two micro-batches of an accumulation group of 2, losses 0.4 and 0.6
        acc.add_micro_batch(&m(1.0, Some(0.2), None, 10), 0.4 / 2.0, 4);
        acc.add_micro_batch(&m(2.0, Some(0.4), Some(-0.1), 20), 0.6 / 2.0, 4);
        acc.end_step();
        // step 2 (logged together with step 1, logging_steps = 2): loss 0.8
        acc.add_micro_batch(&m(3.0, None, Some(-0.3), 5), 0.8 / 2.0, 4);
        acc.add_micro_batch(&m(6.0, Some(0.6), None, 5), 0.8 / 2.0, 4);
        acc.end_step();
        let info = StepInfo {
            step: 2,
            epoch: 0.5,
            grad_norm: 1.5,
            learning_rate: 1e-3,
        };
        let row = acc.take_train_row(info, 2.0);
        let get = |k: &str| row[k].as_f64().unwrap();
        assert!((get("loss") - (0.5 + 0.8) / 2.0).abs() < 1e-7);
        assert_eq!(get("kl"), 3.0);
        assert!((get("rewards/chosen") - 0.4).abs() < 1e-12);
        assert!((get("rewards/rejected") + 0.2).abs() < 1e-12);
        assert!(
            (get("rewards/margins") - 0.5).abs() < 1e-12,
            "margins average only micro-batches with both"
        );
        assert_eq!(get("num_tokens"), 40.0);
        assert_eq!(
            get("num_forward_tokens"),
            120.0,
            "forward tokens since the last log"
        );
        assert_eq!(get("samples_per_second"), 8.0);
        assert_eq!(row["step"], Value::from(2));
        assert!(!row.contains_key("logits/chosen"));

        acc.add_micro_batch(&m(0.0, Some(1.0), None, 1), 0.1, 4);
        acc.end_step();
        let row = acc.take_train_row(StepInfo { step: 3, ..info }, 1.0);
        assert_eq!(
            row["num_tokens"].as_f64(),
            Some(41.0),
            "the token count is cumulative"
        );
        assert_eq!(row["num_forward_tokens"].as_f64(), Some(3.0));
        assert!((row["loss"].as_f64().unwrap() - 0.1).abs() < 1e-7);
    }

    #[test]
    fn eval_metrics_are_prefixed_and_repeat_train_tokens() {
        let mut acc = MetricsAccumulator::default();
        acc.add_eval_batch(&m(0.5, Some(0.1), Some(0.3), 99));
        let row = acc.take_eval_metrics(123);
        assert_eq!(row["eval_num_tokens"].as_f64(), Some(123.0));
        assert_eq!(row["eval_kl"].as_f64(), Some(0.5));
        assert!(row.contains_key("eval_rewards/margins"));
    }

    #[test]
    fn rows_round_trip_through_jsonl() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("metrics.jsonl");
        let mut row = Map::new();
        row.insert("step".into(), Value::from(1));
        row.insert("loss".into(), json_f64(f64::NAN));
        std::fs::write(&path, "\n")?;
        append_row(&path, &row)?;
        append_row(&path, &row)?;
        let lines: Vec<usize> = read_numbered_rows(&path)?.iter().map(|r| r.0).collect();
        assert_eq!(lines, vec![2, 3]);
        write_rows(&path, &[row.clone()])?;
        let rows = read_rows(&path)?;
        assert_eq!(rows, vec![row]);
        assert_eq!(rows[0]["loss"], Value::Null);
        Ok(())
    }
}
