//! Input formats: detect (per data set, from the first row's keys) or force one of five, and read the rows of any
//! file kind of [`crate::sources`] (JSONL or a JSON array, compressed or not, Parquet, Arrow, CSV; a folder or glob
//! of shards as one data set) into unpaired [`Sample`]s. Errors name the file and the row: `file:line` for JSON,
//! `file: row N` for the table kinds, and the column (`field `label` ...`).
//!
//! | format | keys | samples per row |
//! |---|---|---|
//! | `unpaired` (alias `trl`) | `prompt`, `completion` (strings), `label` | 1 |
//! | `nemo` | `prompt`, `response`, `preference` (`"chosen"` / `"rejected"`) | 1 |
//! | `paired` | `prompt`, `chosen`, `rejected` (strings, or message lists) | 2 |
//! | `hh` | `chosen`, `rejected`: whole HH-RLHF conversations, see [`crate::hh`] | 2 |
//! | `conversational` | `prompt`, `completion` (lists of `{role, content}`), `label` | 1 |
//!
//! A label is `true`/`false` or `"chosen"`/`"rejected"`, in `label` and `preference` alike. Unpaired and NeMo rows may
//! carry an integer `pair` (written by `kto prepare`) that links the two samples of one preference pair.
//!
//! Order: the two samples of paired rows come out as TRL's `unpair_preference_dataset` orders them (a `datasets`
//! batched map of 1000 rows: the 1000 chosen samples, then the 1000 rejected ones), so that training on the same
//! file sees the same sequence as TRL. Note that this puts long runs of one class next to each other; `kto prepare`
//! writes a shuffled order instead.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde_json::{value::RawValue, Map, Value};

use crate::drops::DropCounts;
use crate::hh;
use crate::sample::{Message, Sample, Text};
use crate::sources::{self, FileRows, Place, Row, RowError};

/// Rows per `datasets.map(batched=True)` call in TRL's unpairing (the `datasets` default batch size).
const TRL_UNPAIR_CHUNK: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Auto,
    Unpaired,
    Nemo,
    Paired,
    Hh,
    Conversational,
}

impl Format {
    /// The names accepted by [`Format::from_str`] (and the config's `format = "..."`).
    pub const NAMES: [&'static str; 7] = [
        "auto",
        "unpaired",
        "trl",
        "nemo",
        "paired",
        "hh",
        "conversational",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Unpaired => "unpaired",
            Format::Nemo => "nemo",
            Format::Paired => "paired",
            Format::Hh => "hh",
            Format::Conversational => "conversational",
        }
    }

    /// Whether each row holds a preference pair (two samples).
    pub fn is_paired(self) -> bool {
        matches!(self, Format::Paired | Format::Hh)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown data format {given:?}: expected one of {}", Format::NAMES.join(", "))]
pub struct UnknownFormat {
    pub given: String,
}

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Ok(match name {
            "auto" => Format::Auto,
            "unpaired" | "trl" => Format::Unpaired,
            "nemo" => Format::Nemo,
            "paired" => Format::Paired,
            "hh" => Format::Hh,
            "conversational" => Format::Conversational,
            _ => {
                return Err(UnknownFormat {
                    given: name.to_owned(),
                })
            }
        })
    }
}

impl<'de> serde::Deserialize<'de> for Format {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Format {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    pub format: Format,
    /// Skip rows with bad input (with a warning each, and a count in the report) instead of failing.
    pub skip_invalid: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            skip_invalid: false,
        }
    }
}

/// What reading found: rows, pairs, samples, and everything left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadReport {
    /// Each file read and the format it was read as.
    pub files: Vec<(PathBuf, Format)>,
    /// Data rows read (JSONL lines that are not blank, or array elements), valid or not.
    pub rows: usize,
    /// Rows of the paired formats (`paired`, `hh`) among them, including those dropped.
    pub pairs: usize,
    pub desirable: usize,
    pub undesirable: usize,
    /// Pairs left out by [`crate::hh`], by reason.
    pub drops: DropCounts,
    /// Rows with bad input skipped under `skip_invalid`.
    pub skipped_invalid: usize,
}

impl ReadReport {
    pub fn samples(&self) -> usize {
        self.desirable + self.undesirable
    }

    pub fn class_counts(&self) -> crate::balance::ClassCounts {
        crate::balance::ClassCounts {
            desirable: self.desirable,
            undesirable: self.undesirable,
        }
    }

    pub fn merge(&mut self, other: &ReadReport) {
        self.files.extend(other.files.iter().cloned());
        self.rows += other.rows;
        self.pairs += other.pairs;
        self.desirable += other.desirable;
        self.undesirable += other.undesirable;
        self.drops.merge(&other.drops);
        self.skipped_invalid += other.skipped_invalid;
    }
}

impl fmt::Display for ReadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (path, format) in &self.files {
            writeln!(f, "read {} as {format}", path.display())?;
        }
        writeln!(f, "rows read: {} ({} pairs)", self.rows, self.pairs)?;
        writeln!(
            f,
            "samples: {} ({} desirable, {} undesirable)",
            self.samples(),
            self.desirable,
            self.undesirable
        )?;
        writeln!(f, "dropped: {}", self.drops)?;
        write!(f, "invalid rows skipped: {}", self.skipped_invalid)
    }
}

/// Samples read, with the report of how.
#[derive(Debug, Clone, Default)]
pub struct ReadOutput {
    pub samples: Vec<Sample>,
    pub report: ReadReport,
}

/// Reads several files in order; pair ids stay unique across them.
pub fn read_files<P: AsRef<Path>>(paths: &[P], options: &ReadOptions) -> Result<ReadOutput> {
    let mut output = ReadOutput::default();
    for path in paths {
        let first_pair = next_pair_id(&output.samples);
        let mut file = read_file(path.as_ref(), options)?;
        offset_pairs(&mut file.samples, first_pair);
        output.samples.append(&mut file.samples);
        output.report.merge(&file.report);
    }
    Ok(output)
}

/// The smallest pair id that no sample uses yet.
pub fn next_pair_id(samples: &[Sample]) -> u64 {
    samples
        .iter()
        .filter_map(|s| s.pair)
        .max()
        .map_or(0, |max| max + 1)
}

fn offset_pairs(samples: &mut [Sample], offset: u64) {
    for sample in samples {
        if let Some(pair) = sample.pair.as_mut() {
            *pair += offset;
        }
    }
}

/// Reads one data path: a file of any kind of [`crate::sources`], a folder or a glob of shards (one data set: the
/// format is detected once, paired rows are unpaired over all of them, as `datasets` concatenates shards).
pub fn read_file(path: &Path, options: &ReadOptions) -> Result<ReadOutput> {
    let files = sources::expand(path)?;
    read_dataset(&path.display().to_string(), &files, options)
}

/// Reads `files` in order as one data set; `name` names it in the errors that concern all of them.
pub fn read_dataset(name: &str, files: &[PathBuf], options: &ReadOptions) -> Result<ReadOutput> {
    let mut reader = RowReader::new(options);
    for file in files {
        let source = file.display().to_string();
        match sources::read_rows(file)? {
            FileRows::Json(text) => {
                let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
                for row in split_rows(&source, text)? {
                    reader.push(&source, Place::Line(row.line), parse_row(&row))?;
                }
            }
            FileRows::Table(rows) => {
                for Row { place, object } in rows {
                    reader.push(&source, place, object)?;
                }
            }
        }
    }
    if reader.report.rows == 0 {
        match files {
            [one] => bail!("{}: no rows (the file is empty)", one.display()),
            _ => bail!("{name}: no rows in any of its {} files", files.len()),
        }
    }
    Ok(reader.finish(files.to_vec()))
}

/// A data file's bytes as text. Data files are UTF-8 (a byte-order mark is allowed and skipped by [`parse_str`]);
/// UTF-16/UTF-32 files and invalid bytes are refused with the line, so that the fix is obvious.
pub fn decode_text(source: &str, bytes: Vec<u8>) -> Result<String> {
    for (bom, encoding) in [
        (&[0xFF, 0xFE, 0x00, 0x00][..], "UTF-32LE"),
        (&[0x00, 0x00, 0xFE, 0xFF][..], "UTF-32BE"),
        (&[0xFF, 0xFE][..], "UTF-16LE"),
        (&[0xFE, 0xFF][..], "UTF-16BE"),
    ] {
        if bytes.starts_with(bom) {
            bail!("{source}: the file is {encoding} (it starts with that byte-order mark); save it as UTF-8");
        }
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line_start = bytes[..valid]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let line = 1 + bytes[..valid].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!(
            "{source}:{line}: not valid UTF-8 (byte 0x{:02X} at column {}); save the file as UTF-8",
            bytes[valid],
            valid - line_start + 1
        )
    })
}

/// Parses the text of one JSON file; `source` names it in errors.
pub fn parse_str(source: &str, text: &str, options: &ReadOptions) -> Result<ReadOutput> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rows = split_rows(source, text)?;
    if rows.is_empty() {
        bail!("{source}: no rows (the file is empty)");
    }
    let mut reader = RowReader::new(options);
    for row in &rows {
        reader.push(source, Place::Line(row.line), parse_row(row))?;
    }
    Ok(reader.finish(vec![PathBuf::from(source)]))
}

/// Rows in, samples out: detects the format at the first good row, converts each row, skips or fails on bad ones.
struct RowReader<'a> {
    options: &'a ReadOptions,
    format: Format,
    report: ReadReport,
    unpaired: Vec<Sample>,
    pairs: Vec<(Sample, Sample)>,
}

impl<'a> RowReader<'a> {
    fn new(options: &'a ReadOptions) -> Self {
        Self {
            options,
            format: options.format,
            report: ReadReport::default(),
            unpaired: Vec::new(),
            pairs: Vec::new(),
        }
    }

    fn push(
        &mut self,
        source: &str,
        place: Place,
        object: Result<Map<String, Value>, RowError>,
    ) -> Result<()> {
        self.report.rows += 1;
        let object = match object {
            Ok(object) => object,
            Err(error) => return self.skip_or_fail(source, place, error),
        };
        if self.format == Format::Auto {
            self.format = detect_format(&object).with_context(|| format!("{source}{place}"))?;
        }
        if self.format.is_paired() {
            self.report.pairs += 1;
        }
        match convert_row(self.format, &object) {
            Ok(Converted::One(sample)) => self.unpaired.push(sample),
            Ok(Converted::Pair(chosen, rejected)) => {
                let id = self.pairs.len() as u64;
                self.pairs
                    .push((chosen.with_pair(id), rejected.with_pair(id)));
            }
            Ok(Converted::Dropped(reason)) => self.report.drops.add(reason),
            Err(error) => self.skip_or_fail(source, place, error)?,
        }
        Ok(())
    }

    fn skip_or_fail(&mut self, source: &str, place: Place, error: RowError) -> Result<()> {
        if !self.options.skip_invalid {
            bail!("{source}{place}: {error}");
        }
        tracing::warn!("skipping invalid row {source}{place}: {error}");
        self.report.skipped_invalid += 1;
        Ok(())
    }

    fn finish(mut self, files: Vec<PathBuf>) -> ReadOutput {
        let samples = if self.format.is_paired() {
            unpair_like_trl(self.pairs)
        } else {
            self.unpaired
        };
        self.report.desirable = samples.iter().filter(|s| s.label).count();
        self.report.undesirable = samples.len() - self.report.desirable;
        let format = self.format;
        self.report
            .files
            .extend(files.into_iter().map(|file| (file, format)));
        ReadOutput {
            samples,
            report: self.report,
        }
    }
}

fn unpair_like_trl(pairs: Vec<(Sample, Sample)>) -> Vec<Sample> {
    let mut samples = Vec::with_capacity(pairs.len() * 2);
    for chunk in pairs.chunks(TRL_UNPAIR_CHUNK) {
        samples.extend(chunk.iter().map(|(chosen, _)| chosen.clone()));
        samples.extend(chunk.iter().map(|(_, rejected)| rejected.clone()));
    }
    samples
}

struct RawRow<'a> {
    line: usize,
    json: &'a str,
}

/// A JSON array when the file starts with `[`, else one JSON value per non-blank line.
fn split_rows<'a>(source: &str, text: &'a str) -> Result<Vec<RawRow<'a>>> {
    if text.trim_start().starts_with('[') {
        let elements: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{source}:{}:{}: malformed JSON array: {e}",
                e.line(),
                e.column()
            )
        })?;
        return Ok(elements
            .into_iter()
            .map(|element| {
                let json = element.get();
                let offset = json.as_ptr() as usize - text.as_ptr() as usize;
                RawRow {
                    line: 1 + text[..offset].matches('\n').count(),
                    json,
                }
            })
            .collect());
    }
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, json)| RawRow { line: i + 1, json })
        .collect())
}

fn row_error(message: impl Into<String>) -> RowError {
    RowError(message.into())
}

fn parse_row(row: &RawRow) -> Result<Map<String, Value>, RowError> {
    match serde_json::from_str::<Value>(row.json) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(row_error(format!(
            "expected a JSON object, got {}",
            type_name(&other)
        ))),
        Err(e) => {
            // A JSONL row is one line: its column says more than serde's "line 1".
            let message = e.to_string();
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(m, _)| m);
            let at = if e.line() <= 1 {
                format!("column {}", e.column())
            } else {
                format!("line {} of the value, column {}", e.line(), e.column())
            };
            Err(row_error(format!("malformed JSON at {at}: {message}")))
        }
    }
}

fn detect_format(object: &Map<String, Value>) -> Result<Format> {
    let has = |key: &str| object.contains_key(key);
    let is_list = |key: &str| object.get(key).is_some_and(Value::is_array);
    if has("chosen") && has("rejected") {
        return Ok(if has("prompt") {
            Format::Paired
        } else {
            Format::Hh
        });
    }
    if has("response") && has("preference") {
        return Ok(Format::Nemo);
    }
    if has("completion") && has("label") {
        return Ok(if is_list("prompt") || is_list("completion") {
            Format::Conversational
        } else {
            Format::Unpaired
        });
    }
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    bail!(
        "cannot detect the data format from the keys [{}]; known formats: unpaired/trl (prompt, completion, label), \
         nemo (prompt, response, preference), paired (prompt, chosen, rejected), hh (chosen, rejected), \
         conversational (prompt and completion as lists of {{role, content}}, label)",
        keys.join(", ")
    )
}

enum Converted {
    One(Sample),
    Pair(Sample, Sample),
    Dropped(hh::HhDropReason),
}

fn convert_row(format: Format, row: &Map<String, Value>) -> Result<Converted, RowError> {
    Ok(match format {
        Format::Unpaired => Converted::One(Sample {
            prompt: plain_field(row, "prompt", format)?.into(),
            completion: plain_field(row, "completion", format)?.into(),
            label: label_field(row, "label")?,
            pair: pair_field(row)?,
        }),
        Format::Conversational => Converted::One(Sample {
            prompt: Text::Messages(messages_field(row, "prompt")?),
            completion: Text::Messages(messages_field(row, "completion")?),
            label: label_field(row, "label")?,
            pair: pair_field(row)?,
        }),
        Format::Nemo => Converted::One(Sample {
            prompt: plain_field(row, "prompt", format)?.into(),
            completion: plain_field(row, "response", format)?.into(),
            label: label_field(row, "preference")?,
            pair: pair_field(row)?,
        }),
        Format::Paired => {
            let conversational = row.get("prompt").is_some_and(Value::is_array);
            let text = |key: &str| -> Result<Text, RowError> {
                if conversational {
                    Ok(Text::Messages(messages_field(row, key)?))
                } else {
                    plain_field(row, key, format).map(Text::Plain)
                }
            };
            let prompt = text("prompt")?;
            Converted::Pair(
                Sample {
                    prompt: prompt.clone(),
                    completion: text("chosen")?,
                    label: true,
                    pair: None,
                },
                Sample {
                    prompt,
                    completion: text("rejected")?,
                    label: false,
                    pair: None,
                },
            )
        }
        Format::Hh => {
            let chosen = plain_field(row, "chosen", format)?;
            let rejected = plain_field(row, "rejected", format)?;
            match hh::convert_pair(&chosen, &rejected) {
                Ok(pair) => Converted::Pair(
                    Sample::new(pair.prompt.clone(), pair.chosen, true),
                    Sample::new(pair.prompt, pair.rejected, false),
                ),
                Err(reason) => Converted::Dropped(reason),
            }
        }
        Format::Auto => unreachable!("the format is detected before rows are converted"),
    })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn required<'a>(row: &'a Map<String, Value>, key: &str) -> Result<&'a Value, RowError> {
    row.get(key)
        .ok_or_else(|| row_error(format!("missing field `{key}`")))
}

fn plain_field(row: &Map<String, Value>, key: &str, format: Format) -> Result<String, RowError> {
    match required(row, key)? {
        Value::String(text) if text.trim().is_empty() => Err(row_error(format!("field `{key}` is empty"))),
        Value::String(text) => Ok(text.clone()),
        Value::Array(_) => Err(row_error(format!(
            "field `{key}` must be a string in format {format}, got a list (lists of messages are format \
             conversational)"
        ))),
        other => Err(row_error(format!("field `{key}` must be a string, got {}", type_name(other)))),
    }
}

fn messages_field(row: &Map<String, Value>, key: &str) -> Result<Vec<Message>, RowError> {
    let Value::Array(items) = required(row, key)? else {
        return Err(row_error(format!(
            "field `{key}` must be a list of {{role, content}} messages (format conversational), got {}",
            type_name(&row[key])
        )));
    };
    if items.is_empty() {
        return Err(row_error(format!("field `{key}` is empty")));
    }
    let messages = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item.get("role").and_then(Value::as_str);
            let content = item.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(role), Some(content)) => Ok(Message::new(role, content)),
                _ => Err(row_error(format!(
                    "field `{key}`: message {i} must be an object with string `role` and `content`, got {item}"
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        return Err(row_error(format!("field `{key}` is empty")));
    }
    Ok(messages)
}

fn label_field(row: &Map<String, Value>, key: &str) -> Result<bool, RowError> {
    match required(row, key)? {
        Value::Bool(label) => Ok(*label),
        Value::String(s) if s == "chosen" => Ok(true),
        Value::String(s) if s == "rejected" => Ok(false),
        other => Err(row_error(format!(
            "field `{key}` must be true/false or \"chosen\"/\"rejected\", got {other}"
        ))),
    }
}

fn pair_field(row: &Map<String, Value>) -> Result<Option<u64>, RowError> {
    match row.get("pair") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            row_error(format!(
                "field `pair` must be a non-negative integer, got {value}"
            ))
        }),
    }
}
