//! `kto prepare`: read preference data in any input format, split it, and write `train.jsonl` and `test.jsonl` in
//! TRL's unpaired fields (`prompt`, `completion`, `label`) or NeMo's (`prompt`, `response`, `preference`).
//!
//! - Split: when every input file is named as a train or a test file (a `train`/`training` or
//!   `test`/`eval`/`valid`/`validation`/`val`/`dev` word in its name) and both kinds are there, that split is kept.
//!   Otherwise `test_fraction` of the *pairs* (a pair's chosen and rejected samples never straddle the split; an
//!   unpaired sample is its own group) go to the test file, drawn with `seed`; at least one group goes to each side
//!   when the fraction is above 0 and there are two groups or more.
//! - Order: each file is written in a seeded shuffled order. It puts a pair's two samples apart, so that TRL's KL
//!   pairing in dataset order (the completion of the previous sample) pairs unrelated prompts and completions, and it
//!   mixes the classes within batches.
//! - Samples of one pair carry the same `pair` id, for pair accuracy at evaluation.
//! - Both files are written to temporary files in the output folder and renamed at the end, so an interrupted run
//!   leaves no half-written file.
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::balance::ClassCounts;
use crate::formats::{next_pair_id, read_file, ReadOptions, ReadReport};
use crate::sample::{Sample, Text};

pub const DEFAULT_TEST_FRACTION: f64 = 0.1;
pub const DEFAULT_SEED: u64 = 42;

/// Field names of the written files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputStyle {
    /// `prompt`, `completion`, `label` (bool).
    #[default]
    Trl,
    /// `prompt`, `response`, `preference` ("chosen" | "rejected").
    Nemo,
}

impl FromStr for OutputStyle {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "trl" => Ok(OutputStyle::Trl),
            "nemo" => Ok(OutputStyle::Nemo),
            _ => bail!("unknown output style {name:?}: expected one of trl, nemo"),
        }
    }
}

impl fmt::Display for OutputStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputStyle::Trl => "trl",
            OutputStyle::Nemo => "nemo",
        })
    }
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out_dir: PathBuf,
    pub style: OutputStyle,
    /// `None`: [`DEFAULT_TEST_FRACTION`], unless the inputs are already split.
    pub test_fraction: Option<f64>,
    pub seed: u64,
    pub read: ReadOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitRole {
    Train,
    Test,
}

/// How the test set was made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// The inputs were train and test files already.
    KeptFromInputs,
    /// A seeded fraction of the pairs.
    Drawn { test_fraction: f64, seed: u64 },
}

#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub read: ReadReport,
    pub split: Split,
    pub train_path: PathBuf,
    pub test_path: PathBuf,
    pub train: ClassCounts,
    pub test: ClassCounts,
    /// Printed apart from the report (on stderr by `kto prepare`).
    pub warnings: Vec<String>,
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.read)?;
        match self.split {
            Split::KeptFromInputs => writeln!(f, "split: kept from the input files")?,
            Split::Drawn {
                test_fraction,
                seed,
            } => writeln!(
                f,
                "split: {test_fraction} of the pairs to test (seed {seed})"
            )?,
        }
        writeln!(
            f,
            "wrote {}: {} samples ({})",
            self.train_path.display(),
            self.train.total(),
            self.train
        )?;
        write!(
            f,
            "wrote {}: {} samples ({})",
            self.test_path.display(),
            self.test.total(),
            self.test
        )
    }
}

/// Whether a file name marks a train or a test split.
pub fn split_role(path: &Path) -> Option<SplitRole> {
    let stem = path.file_stem()?.to_string_lossy().to_lowercase();
    let words: Vec<&str> = stem.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    let has = |names: &[&str]| words.iter().any(|word| names.contains(word));
    match (
        has(&["train", "training"]),
        has(&["test", "eval", "valid", "validation", "val", "dev"]),
    ) {
        (true, false) => Some(SplitRole::Train),
        (false, true) => Some(SplitRole::Test),
        _ => None,
    }
}

pub fn prepare(options: &PrepareOptions) -> Result<PrepareReport> {
    if options.inputs.is_empty() {
        bail!("no input files");
    }
    if let Some(fraction) = options.test_fraction {
        if !(0.0..1.0).contains(&fraction) {
            bail!("--test-fraction must be in [0, 1), got {fraction}");
        }
    }
    let roles: Vec<Option<SplitRole>> = options.inputs.iter().map(|p| split_role(p)).collect();
    let keep_split = roles.iter().all(Option::is_some)
        && roles.contains(&Some(SplitRole::Train))
        && roles.contains(&Some(SplitRole::Test));

    let mut report = ReadReport::default();
    let mut warnings = Vec::new();
    let mut read_train = Vec::new();
    let mut read_test = Vec::new();
    for (path, role) in options.inputs.iter().zip(&roles) {
        let first_pair = next_pair_id(&read_train).max(next_pair_id(&read_test));
        let mut file = read_file(path, &options.read)?;
        for sample in &mut file.samples {
            if let Some(pair) = sample.pair.as_mut() {
                *pair += first_pair;
            }
        }
        report.merge(&file.report);
        if keep_split && *role == Some(SplitRole::Test) {
            read_test.extend(file.samples);
        } else {
            read_train.extend(file.samples);
        }
    }

    let split = if keep_split {
        if options.test_fraction.is_some() {
            warnings.push(
                "--test-fraction is ignored: the inputs are already a train and a test file"
                    .to_owned(),
            );
        }
        Split::KeptFromInputs
    } else {
        let test_fraction = options.test_fraction.unwrap_or(DEFAULT_TEST_FRACTION);
        (read_train, read_test) = split_by_pairs(read_train, test_fraction, options.seed);
        Split::Drawn {
            test_fraction,
            seed: options.seed,
        }
    };
    shuffle(&mut read_train, options.seed, 1);
    shuffle(&mut read_test, options.seed, 2);

    let train = ClassCounts::from_labels(read_train.iter().map(|s| s.label));
    let test = ClassCounts::from_labels(read_test.iter().map(|s| s.label));
    if train.total() == 0 {
        bail!(
            "no samples left to write: {} rows read, dropped: {}",
            report.rows,
            report.drops
        );
    }
    warnings.extend(train.single_class_warning().map(|w| format!("train: {w}")));
    warnings.extend(test.single_class_warning().map(|w| format!("test: {w}")));

    fs::create_dir_all(&options.out_dir)
        .with_context(|| format!("cannot create {}", options.out_dir.display()))?;
    let train_path = options.out_dir.join("train.jsonl");
    let test_path = options.out_dir.join("test.jsonl");
    let train_lines = to_lines(&read_train, options.style)?;
    let test_lines = to_lines(&read_test, options.style)?;
    crate::atomic::write_files(&[
        (&train_path, train_lines.as_bytes()),
        (&test_path, test_lines.as_bytes()),
    ])?;
    Ok(PrepareReport {
        read: report,
        split,
        train_path,
        test_path,
        train,
        test,
        warnings,
    })
}

/// Moves `test_fraction` of the pair groups (drawn with `seed`) to the test side.
pub fn split_by_pairs(
    samples: Vec<Sample>,
    test_fraction: f64,
    seed: u64,
) -> (Vec<Sample>, Vec<Sample>) {
    let mut groups: Vec<Vec<Sample>> = Vec::new();
    let mut group_of_pair = std::collections::HashMap::new();
    for sample in samples {
        match sample.pair {
            Some(pair) => {
                let index = *group_of_pair.entry(pair).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[index].push(sample);
            }
            None => groups.push(vec![sample]),
        }
    }
    let mut order: Vec<usize> = (0..groups.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    order.shuffle(&mut rng);
    let mut num_test = (test_fraction * groups.len() as f64).round() as usize;
    if test_fraction > 0.0 && groups.len() >= 2 {
        num_test = num_test.clamp(1, groups.len() - 1);
    }
    let mut is_test = vec![false; groups.len()];
    for &group in &order[..num_test] {
        is_test[group] = true;
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (group, samples) in groups.into_iter().enumerate() {
        if is_test[group] {
            &mut test
        } else {
            &mut train
        }
        .extend(samples);
    }
    (train, test)
}

fn shuffle(samples: &mut [Sample], seed: u64, stream: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    samples.shuffle(&mut rng);
}

#[derive(serde::Serialize)]
struct TrlRow<'a> {
    prompt: &'a Text,
    completion: &'a Text,
    label: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pair: Option<u64>,
}

#[derive(serde::Serialize)]
struct NemoRow<'a> {
    prompt: &'a Text,
    response: &'a Text,
    preference: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pair: Option<u64>,
}

/// One output row, as a JSON line (fields in this order).
pub fn sample_to_json(sample: &Sample, style: OutputStyle) -> Result<String> {
    Ok(match style {
        OutputStyle::Trl => serde_json::to_string(&TrlRow {
            prompt: &sample.prompt,
            completion: &sample.completion,
            label: sample.label,
            pair: sample.pair,
        })?,
        OutputStyle::Nemo => {
            if sample.is_conversational() {
                bail!(
                    "--style nemo writes plain-text prompts and responses, but the data is conversational (lists of \
                     messages); use --style trl"
                );
            }
            serde_json::to_string(&NemoRow {
                prompt: &sample.prompt,
                response: &sample.completion,
                preference: if sample.label { "chosen" } else { "rejected" },
                pair: sample.pair,
            })?
        }
    })
}

fn to_lines(samples: &[Sample], style: OutputStyle) -> Result<String> {
    let mut text = String::new();
    for sample in samples {
        text.push_str(&sample_to_json(sample, style)?);
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_roles_from_file_names() {
        assert_eq!(
            split_role(Path::new("data/hh/train.jsonl")),
            Some(SplitRole::Train)
        );
        assert_eq!(
            split_role(Path::new("hh_rlhf-test.jsonl")),
            Some(SplitRole::Test)
        );
        assert_eq!(split_role(Path::new("eval.json")), Some(SplitRole::Test));
        assert_eq!(split_role(Path::new("contest.jsonl")), None);
        assert_eq!(split_role(Path::new("data.jsonl")), None);
        assert_eq!(split_role(Path::new("train_test.jsonl")), None);
    }

    #[test]
    fn pairs_stay_on_one_side() {
        let samples: Vec<Sample> = (0..20u64)
            .flat_map(|p| {
                [
                    Sample::new("p", "good", true).with_pair(p),
                    Sample::new("p", "bad", false).with_pair(p),
                ]
            })
            .chain((0..10).map(|i| Sample::new(format!("u{i}"), "x", i % 2 == 0)))
            .collect();
        let (train, test) = split_by_pairs(samples.clone(), 0.2, 3);
        assert_eq!(train.len() + test.len(), 50);
        // 30 groups, 6 to test.
        let test_groups = test.iter().filter(|s| s.pair.is_some()).count() / 2
            + test.iter().filter(|s| s.pair.is_none()).count();
        assert_eq!(test_groups, 6);
        for sample in &test {
            if let Some(pair) = sample.pair {
                assert!(train.iter().all(|s| s.pair != Some(pair)));
                assert_eq!(test.iter().filter(|s| s.pair == Some(pair)).count(), 2);
            }
        }
        assert_eq!(
            split_by_pairs(samples.clone(), 0.2, 3).1,
            test,
            "the split is seeded"
        );
        assert_ne!(split_by_pairs(samples, 0.2, 4).1, test);
    }

    #[test]
    fn small_fractions_still_give_a_test_sample() {
        let samples: Vec<Sample> = (0..3)
            .map(|i| Sample::new(format!("p{i}"), "x", true))
            .collect();
        let (train, test) = split_by_pairs(samples.clone(), 0.01, 0);
        assert_eq!((train.len(), test.len()), (2, 1));
        let (train, test) = split_by_pairs(samples, 0.0, 0);
        assert_eq!((train.len(), test.len()), (3, 0));
    }

    #[test]
    fn output_rows_in_both_styles() {
        let sample = Sample::new("Q", "A", false).with_pair(7);
        assert_eq!(
            sample_to_json(&sample, OutputStyle::Trl).unwrap(),
            r#"{"prompt":"Q","completion":"A","label":false,"pair":7}"#
        );
        assert_eq!(
            sample_to_json(&Sample::new("Q", "A", true), OutputStyle::Nemo).unwrap(),
            r#"{"prompt":"Q","response":"A","preference":"chosen"}"#
        );
    }
}
