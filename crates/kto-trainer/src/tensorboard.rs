//! TensorBoard event files (`[train] report_to = "tensorboard"`): every metrics.jsonl row as one event at its
//! global step, its scalars tagged as transformers' `TensorBoardCallback` tags the same logs (`rewrite_logs`:
//! `loss` → `train/loss`, `eval_loss` → `eval/loss`) and stored as `SummaryWriter.add_scalar` stores them
//! (`simple_value`, an f32).
//!
//! The file is TensorBoard's format: TFRecord frames (length, masked CRC32C of the length, a serialized `Event`,
//! masked CRC32C of it), the first event `file_version = "brain.Event:2"`. The messages below are the fields kto
//! writes of TensorFlow's `event.proto` and `summary.proto`, with their field numbers.
//!
//! One event a row (all of its scalars in one `Summary`; TensorBoard reads that as it reads one event a scalar), so
//! that the file holds the rows record for record, as metrics.jsonl holds them line for line. Continuing a run
//! ([`EventFile::continue_in`]) keeps the records that agree with the rows metrics.jsonl keeps (the checkpoint's),
//! cuts the rest, a crashed attempt's steps after the checkpoint, and writes the missing rows: a reader sees each
//! logged row once.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use prost::Message as _;
use serde_json::{Map, Value};

/// `tensorflow.Event`: `wall_time = 1`, `step = 2`, `oneof what { file_version = 3; summary = 5; ... }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// The part of `Event.what` kto writes.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`: `repeated Value value = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: `tag = 1`, `oneof value { float simple_value = 2; ... }`. Optional so that a 0.0 is
/// written too (a proto3 oneof member always is): a value without its oneof set is not a scalar to TensorBoard.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// What TensorBoard's writers put first in every event file.
const FILE_VERSION: &str = "brain.Event:2";
/// TensorBoard finds event files by this in their names.
const EVENT_FILE_MARK: &str = "tfevents";

/// The TensorBoard tag of a metrics.jsonl key: transformers' `rewrite_logs`.
pub fn tag(key: &str) -> String {
    match (key.strip_prefix("eval_"), key.strip_prefix("test_")) {
        (Some(name), _) => format!("eval/{name}"),
        (_, Some(name)) => format!("test/{name}"),
        _ => format!("train/{key}"),
    }
}

/// The scalars of a row with their tags: every number but `step` (the event's step), as f32 like
/// `add_scalar`; `null` (a NaN or infinity in metrics.jsonl) is NaN. Other values (none in kto's rows) are left out.
pub fn scalars(row: &Map<String, Value>) -> Vec<SummaryValue> {
    row.iter()
        .filter(|(key, _)| key.as_str() != "step")
        .filter_map(|(key, value)| {
            let number = match value {
                Value::Number(n) => n.as_f64()?,
                Value::Null => f64::NAN,
                _ => return None,
            };
            Some(SummaryValue {
                tag: tag(key),
                simple_value: Some(number as f32),
            })
        })
        .collect()
}

/// A row's event; `None` for a row without a step.
fn row_event(row: &Map<String, Value>, wall_time: f64) -> Option<Event> {
    Some(Event {
        wall_time,
        step: row.get("step")?.as_i64()?,
        what: Some(What::Summary(Summary {
            value: scalars(row),
        })),
    })
}

fn file_version_event(wall_time: f64) -> Event {
    Event {
        wall_time,
        step: 0,
        what: Some(What::FileVersion(FILE_VERSION.into())),
    }
}

/// TFRecord's CRC: CRC32C rotated and offset, so that a CRC of data holding CRCs stays strong.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame holding `event`.
fn frame(event: &Event) -> Vec<u8> {
    let data = event.encode_to_vec();
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&masked_crc(&data).to_le_bytes());
    out
}

/// The events of `bytes` with the offset each one ends at, up to the first frame that is cut short, fails its CRC or
/// does not decode (the tail a killed writer leaves); the reason is returned when there is one.
fn decode_frames(bytes: &[u8]) -> (Vec<(Event, usize)>, Option<String>) {
    let mut events = Vec::new();
    let mut at = 0;
    let fail = |events, at: usize, why: &str| (events, Some(format!("byte {at}: {why}")));
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + 12) else {
            return fail(events, at, "a frame header cut short");
        };
        let (length, length_crc) = header.split_at(8);
        if masked_crc(length).to_le_bytes() != length_crc {
            return fail(events, at, "the length's CRC does not match");
        }
        let length = u64::from_le_bytes(length.try_into().expect("8 bytes"));
        let start = at + 12;
        let Some(end) = usize::try_from(length)
            .ok()
            .and_then(|n| start.checked_add(n))
        else {
            return fail(events, at, "an impossible length");
        };
        let (Some(data), Some(data_crc)) = (bytes.get(start..end), bytes.get(end..end + 4)) else {
            return fail(events, at, "a frame cut short");
        };
        if masked_crc(data).to_le_bytes() != data_crc {
            return fail(events, at, "the event's CRC does not match");
        }
        let Ok(event) = Event::decode(data) else {
            return fail(events, at, "not an Event");
        };
        at = end + 4;
        events.push((event, at));
    }
    (events, None)
}

/// Every event of an event file, each frame's CRCs checked; a damaged or cut frame is an error naming its offset.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (events, damage) = decode_frames(&bytes);
    if let Some(why) = damage {
        bail!("{}: {why}", path.display());
    }
    Ok(events.into_iter().map(|(event, _)| event).collect())
}

/// The event files of a folder (TensorBoard's test: `tfevents` in the name), oldest first: their names begin with
/// the creation time in seconds, and TensorBoard reads them in name order.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(EVENT_FILE_MARK))
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The run's event file: rows are appended to it as they are logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFile {
    path: PathBuf,
}

impl EventFile {
    /// A new event file in `dir` (created when missing) holding `rows`, named as torch's `SummaryWriter` names
    /// them: `events.out.tfevents.<seconds>.<host>.<pid>.<n>`, `n` counting files of the same second and process.
    /// Other files in `dir` are left alone.
    pub fn create(dir: &Path, rows: &[Map<String, Value>]) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let now = wall_time();
        let stem = format!(
            "events.out.{EVENT_FILE_MARK}.{:010}.{}.{}",
            now as u64,
            gethostname::gethostname().to_string_lossy(),
            std::process::id()
        );
        let path = (0..)
            .map(|n| dir.join(format!("{stem}.{n}")))
            .find(|path| !path.exists())
            .expect("a free name");
        let file = EventFile { path };
        let mut bytes = frame(&file_version_event(now));
        for event in rows.iter().filter_map(|row| row_event(row, now)) {
            bytes.extend(frame(&event));
        }
        // Not an atomic write: a temporary beside it would be an event file to TensorBoard, and a torn tail is cut
        // when the run is continued.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file.path)
            .and_then(|mut f| f.write_all(&bytes))
            .with_context(|| format!("writing {}", file.path.display()))?;
        Ok(file)
    }

    /// The newest event file in `dir` continued so that it holds exactly `rows` (the rows metrics.jsonl keeps on
    /// `--resume`): its records up to the first one that differs from them (wall time aside) stay, with their wall
    /// times; the rest is cut and the missing rows are written now. A new file when `dir` holds none.
    pub fn continue_in(dir: &Path, rows: &[Map<String, Value>]) -> Result<Self> {
        let Some(path) = event_files(dir).pop() else {
            return Self::create(dir, rows);
        };
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (found, _) = decode_frames(&bytes);
        let wanted: Vec<Event> = std::iter::once(file_version_event(0.0))
            .chain(rows.iter().filter_map(|row| row_event(row, 0.0)))
            .collect();
        let agreeing = found
            .iter()
            .zip(&wanted)
            .take_while(|((have, _), want)| have.step == want.step && have.what == want.what)
            .count();
        let keep_bytes = match agreeing {
            0 => 0,
            n => found[n - 1].1,
        };
        let now = wall_time();
        let mut tail = Vec::new();
        for event in &wanted[agreeing..] {
            tail.extend(frame(&Event {
                wall_time: now,
                ..event.clone()
            }));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_len(keep_bytes as u64))
            .with_context(|| format!("cutting {}", path.display()))?;
        let file = EventFile { path };
        file.append_bytes(&tail)?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a row's event; each row is one write, so that a live `tensorboard --logdir` sees it at once.
    pub fn append(&self, row: &Map<String, Value>) -> Result<()> {
        match row_event(row, wall_time()) {
            Some(event) => self.append_bytes(&frame(&event)),
            None => Ok(()),
        }
    }

    fn append_bytes(&self, bytes: &[u8]) -> Result<()> {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut file| file.write_all(bytes))
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Seconds since the Unix epoch, as `Event.wall_time` holds them.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    /// Each event's step and its (tag, value) pairs, wall times aside.
    fn steps_and_scalars(events: &[Event]) -> Vec<(i64, Vec<(String, f32)>)> {
        events
            .iter()
            .filter_map(|e| match &e.what {
                Some(What::Summary(s)) => Some((
                    e.step,
                    s.value
                        .iter()
                        .map(|v| (v.tag.clone(), v.simple_value.unwrap()))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn tags_are_transformers_rewrite_logs() {
        assert_eq!(tag("loss"), "train/loss");
        assert_eq!(tag("rewards/chosen"), "train/rewards/chosen");
        assert_eq!(tag("eval_loss"), "eval/loss");
        assert_eq!(tag("eval_logps/rejected"), "eval/logps/rejected");
        assert_eq!(tag("test_loss"), "test/loss");
        assert_eq!(tag("epoch"), "train/epoch");
    }

    #[test]
    fn frames_are_tfrecords_with_masked_crc32c() {
        // CRC32C's check value, then TFRecord's mask of it ((crc >> 15 | crc << 17) + 0xa282ead8, in Python).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        let event = file_version_event(1.5);
        let bytes = frame(&event);
        // wall_time (field 1, fixed64) and file_version (field 3, length-delimited); step 0 is not written.
        let mut data = vec![0x09];
        data.extend(1.5f64.to_le_bytes());
        data.extend([0x1a, FILE_VERSION.len() as u8]);
        data.extend(FILE_VERSION.as_bytes());
        assert_eq!(&bytes[..8], (data.len() as u64).to_le_bytes());
        assert_eq!(&bytes[12..bytes.len() - 4], data);
        assert_eq!(decode_frames(&bytes), (vec![(event, bytes.len())], None));
    }

    #[test]
    fn a_zero_is_written_as_a_scalar() {
        let value = SummaryValue {
            tag: "train/kl".into(),
            simple_value: Some(0.0),
        };
        let decoded = SummaryValue::decode(value.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.simple_value, Some(0.0));
    }

    #[test]
    fn damaged_frames_are_found() {
        let mut bytes = frame(&file_version_event(1.0));
        let first = bytes.len();
        bytes.extend(frame(
            &row_event(&row(r#"{"step": 1, "loss": 0.5}"#), 2.0).unwrap(),
        ));
        let (events, damage) = decode_frames(&bytes[..bytes.len() - 1]);
        assert_eq!((events.len(), events[0].1), (1, first));
        assert!(damage.unwrap().contains("cut short"));
        bytes[first + 14] ^= 1;
        let (events, damage) = decode_frames(&bytes);
        assert_eq!(events.len(), 1);
        assert!(damage.unwrap().contains("event's CRC"));
    }

    #[test]
    fn rows_become_events_at_their_step() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let rows = [
            row(r#"{"step": 1, "epoch": 0.5, "loss": 0.25, "rewards/chosen": 0.125, "kl": 0.0}"#),
            row(r#"{"step": 1, "epoch": 0.5, "eval_loss": 0.75, "eval_reward_auroc": null}"#),
        ];
        let file = EventFile::create(dir.path(), &rows[..1])?;
        file.append(&rows[1])?;
        let name = file.path().file_name().unwrap().to_string_lossy();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events = read_events(file.path())?;
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        let got = steps_and_scalars(&events);
        let tags: Vec<Vec<&str>> = got
            .iter()
            .map(|(_, s)| s.iter().map(|(t, _)| t.as_str()).collect())
            .collect();
        assert_eq!(
            tags,
            [
                vec![
                    "train/epoch",
                    "train/kl",
                    "train/loss",
                    "train/rewards/chosen"
                ],
                vec!["train/epoch", "eval/loss", "eval/reward_auroc"],
            ]
        );
        assert_eq!(got[0].1[2].1, 0.25);
        assert!(got[1].1[2].1.is_nan());
        assert_eq!((got[0].0, got[1].0), (1, 1));
        Ok(())
    }

    #[test]
    fn continuing_cuts_what_the_rows_do_not_hold_and_writes_what_they_miss() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let rows: Vec<_> = (1..=4)
            .map(|step| {
                row(&format!(
                    r#"{{"step": {step}, "loss": {}}}"#,
                    step as f64 / 8.0
                ))
            })
            .collect();
        // A run logged steps 1-3, then crashed (half a frame written); its checkpoint holds steps 1-2.
        let file = EventFile::create(dir.path(), &rows[..3])?;
        let mut torn = frame(&row_event(&rows[3], 9.0).unwrap());
        torn.truncate(10);
        std::fs::OpenOptions::new()
            .append(true)
            .open(file.path())?
            .write_all(&torn)?;
        assert!(
            read_events(file.path()).is_err(),
            "the torn frame is damage"
        );

        let resumed = EventFile::continue_in(dir.path(), &rows[..2])?;
        assert_eq!(resumed, file, "the same file is continued");
        resumed.append(&rows[2])?;
        resumed.append(&rows[3])?;
        let steps: Vec<i64> = steps_and_scalars(&read_events(file.path())?)
            .iter()
            .map(|(step, _)| *step)
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);

        // A checkpoint whose rows the file lacks (report_to was "none" for a while) or holds otherwise: the
        // agreeing records stay, the rest is rewritten from the rows.
        let mut other = rows.clone();
        other[1].insert("loss".into(), Value::from(9.0));
        EventFile::continue_in(dir.path(), &other)?;
        let got = steps_and_scalars(&read_events(file.path())?);
        assert_eq!(got.len(), 4);
        assert_eq!(got[1].1, vec![("train/loss".to_string(), 9.0)]);
        assert_eq!(event_files(dir.path()), vec![file.path().to_path_buf()]);
        Ok(())
    }

    #[test]
    fn a_folder_without_an_event_file_gets_one() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let logs = dir.path().join("runs/a");
        let file = EventFile::continue_in(&logs, &[row(r#"{"step": 5, "loss": 1.0}"#)])?;
        assert_eq!(event_files(&logs), vec![file.path().to_path_buf()]);
        assert_eq!(steps_and_scalars(&read_events(file.path())?)[0].0, 5);
        Ok(())
    }
}
