//! What a data path names (a file, a folder, a glob of shards) and the rows of each file kind as JSON objects, so
//! that every kind goes through the same format detection and conversion as JSONL ([`crate::formats`]).
//!
//! | kind | names | read with |
//! |---|---|---|
//! | JSON Lines / a JSON array | `.jsonl`, `.json` (and any other name, as before) | serde_json |
//! | compressed JSON | `.jsonl.gz`, `.json.gz`, `.jsonl.zst`, `.json.zst` | flate2, zstd |
//! | Parquet | `.parquet` (snappy, gzip, zstd or uncompressed pages) | arrow-rs `parquet` |
//! | Arrow IPC | `.arrow`: a stream as `datasets` writes its cache files and `save_to_disk` shards, or an Arrow file | `arrow-ipc` |
//! | CSV | `.csv`, `.csv.gz`, `.csv.zst` (a header row) | `csv` |
//!
//! Parquet and Arrow rows become JSON objects through `arrow-json` (explicit nulls; a `list<struct<role, content>>`
//! column is a list of message objects). CSV cells are text, except that `label` / `preference` cells reading
//! true/false (any case: pandas writes `True`/`False`) are booleans and `pair` cells integers (empty: no pair).
//!
//! A folder is a `save_to_disk` folder (`state.json` lists its Arrow files) or a folder of data files, read in
//! name order; a path with `*`, `?` or `[` that does not exist as is, a glob (`data/train-*.parquet`), also read in
//! name order. Rows are numbered from 1 in each file (row 1 is `dataset[0]` of that file); JSON errors keep their
//! `file:line`.
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::RecordBatch;
use serde_json::{Map, Value};

/// A file's compression, from its last extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// How a data file is read, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// JSON Lines or a JSON array (the reader tells them apart by the first character).
    Json(Compression),
    Csv(Compression),
    Parquet,
    /// Arrow IPC: a stream (what `datasets` writes) or an Arrow file.
    Arrow,
}

impl FileKind {
    /// The kind a file name says; `None` for names that are not data files (README.md, a `.txt`). [`read_rows`]
    /// reads those as JSON, as kto always has; folders keep only the files that have a kind.
    pub fn of(path: &Path) -> Option<FileKind> {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        let (stem, compression) = if let Some(stem) = name.strip_suffix(".gz") {
            (stem, Compression::Gzip)
        } else if let Some(stem) = name.strip_suffix(".zst") {
            (stem, Compression::Zstd)
        } else {
            (name.as_str(), Compression::None)
        };
        let extension = stem.rsplit_once('.')?.1;
        Some(match (extension, compression) {
            ("jsonl" | "json", c) => FileKind::Json(c),
            ("csv", c) => FileKind::Csv(c),
            ("parquet", Compression::None) => FileKind::Parquet,
            ("arrow", Compression::None) => FileKind::Arrow,
            _ => return None,
        })
    }
}

/// The file names a folder or glob skips, as `datasets` does (`data_files.FILES_TO_IGNORE`, `save_to_disk`'s
/// `state.json`).
pub(crate) const FILES_TO_IGNORE: &[&str] = &[
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dataset_dict.json",
    "state.json",
];

/// The data files a path names, in reading order: the file itself; a `save_to_disk` folder's Arrow files; a
/// folder's data files or a glob's matches in name order.
pub fn expand(spec: &Path) -> Result<Vec<PathBuf>> {
    match std::fs::metadata(spec) {
        Ok(meta) if meta.is_dir() => folder_files(spec),
        Ok(_) => Ok(vec![spec.to_owned()]),
        Err(_) if is_glob(spec) => glob_files(spec),
        Err(e) => Err(anyhow!(e).context(format!("cannot read {}", spec.display()))),
    }
}

fn is_glob(spec: &Path) -> bool {
    spec.to_string_lossy().contains(['*', '?', '['])
}

fn glob_files(spec: &Path) -> Result<Vec<PathBuf>> {
    let pattern = spec.to_string_lossy();
    let mut files = Vec::new();
    for entry in
        glob::glob(&pattern).with_context(|| format!("{pattern}: not a valid glob pattern"))?
    {
        let path = entry.with_context(|| format!("{pattern}: cannot list a match"))?;
        if path.is_file() && !ignored(&path) {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{pattern}: no data file matches the pattern");
    }
    Ok(files)
}

fn ignored(path: &Path) -> bool {
    path.file_name().is_some_and(|name| {
        let name = name.to_string_lossy();
        name.starts_with('.') || FILES_TO_IGNORE.contains(&name.as_ref())
    })
}

fn folder_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        let splits = std::fs::read_to_string(&dict)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|v| v.get("splits").cloned())
            .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
            .unwrap_or_default();
        let first = splits.first().map_or("train", String::as_str);
        bail!(
            "{}: a DatasetDict saved by save_to_disk (splits: {}); name one split's folder, e.g. {}",
            dir.display(),
            splits.join(", "),
            dir.join(first).display()
        );
    }
    let state = dir.join("state.json");
    if state.is_file() {
        return saved_dataset_files(dir, &state);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        if path.is_file() && !ignored(&path) && FileKind::of(&path).is_some() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no data files in the folder (.jsonl, .json, .jsonl.gz, .json.gz, .jsonl.zst, .parquet, .arrow, .csv)",
            dir.display()
        );
    }
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let splits = crate::hub::splits_in(&names);
    if splits.len() > 1 {
        bail!(
            "{}: the folder holds the files of several splits ({}); name one split's files, e.g. {}",
            dir.display(),
            splits.join(", "),
            dir.join(format!("{}-*", splits[0])).display()
        );
    }
    Ok(files)
}

/// A `Dataset.save_to_disk` folder: `state.json`'s `_data_files`, in their order (as `load_from_disk` reads them).
fn saved_dataset_files(dir: &Path, state: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct State {
        #[serde(rename = "_data_files")]
        data_files: Vec<DataFile>,
    }
    #[derive(serde::Deserialize)]
    struct DataFile {
        filename: String,
    }
    let text = std::fs::read_to_string(state)
        .with_context(|| format!("cannot read {}", state.display()))?;
    let parsed: State = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a save_to_disk state.json (no `_data_files` list of {{\"filename\": ...}})",
            state.display()
        )
    })?;
    if parsed.data_files.is_empty() {
        bail!("{}: `_data_files` is empty", state.display());
    }
    Ok(parsed
        .data_files
        .into_iter()
        .map(|f| dir.join(f.filename))
        .collect())
}

/// Where a row is in its file, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// A JSON row: its line (`file:LINE`).
    Line(usize),
    /// A Parquet / Arrow row, from 1.
    Row(usize),
    /// A CSV row (from 1, the header aside) and the line it starts on.
    CsvRow { row: usize, line: u64 },
}

impl fmt::Display for Place {
    /// Written right after the file name: `data.jsonl:3`, `data.parquet: row 3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Line(line) => write!(f, ":{line}"),
            Place::Row(row) => write!(f, ": row {row}"),
            Place::CsvRow { row, line } => write!(f, ": row {row} (line {line})"),
        }
    }
}

/// A row-level problem; the caller adds the file and the [`Place`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowError(pub String);

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One row of a file: its place and its object (or why it is not one).
pub(crate) struct Row {
    pub place: Place,
    pub object: Result<Map<String, Value>, RowError>,
}

/// The rows of the table kinds (Parquet, Arrow, CSV); JSON files go through [`crate::formats::parse_str`]'s row
/// splitting, so that their errors stay `file:line`.
pub(crate) enum FileRows {
    Json(String),
    Table(Vec<Row>),
}

/// Reads one file by its [`FileKind`] (a name without one is read as JSON).
pub(crate) fn read_rows(path: &Path) -> Result<FileRows> {
    let source = path.display();
    match FileKind::of(path).unwrap_or(FileKind::Json(Compression::None)) {
        FileKind::Json(compression) => {
            let bytes = decompressed(path, compression)?;
            Ok(FileRows::Json(crate::formats::decode_text(
                &source.to_string(),
                bytes,
            )?))
        }
        FileKind::Csv(compression) => {
            let bytes = decompressed(path, compression)?;
            csv_rows(path, &bytes).map(FileRows::Table)
        }
        FileKind::Parquet => parquet_rows(path).map(FileRows::Table),
        FileKind::Arrow => arrow_rows(path).map(FileRows::Table),
    }
}

fn decompressed(path: &Path, compression: Compression) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    let (result, name) = match compression {
        Compression::None => return Ok(bytes),
        Compression::Gzip => (
            flate2::read::MultiGzDecoder::new(bytes.as_slice()).read_to_end(&mut out),
            "gzip",
        ),
        Compression::Zstd => (
            zstd::stream::read::Decoder::new(bytes.as_slice())
                .and_then(|mut d| d.read_to_end(&mut out)),
            "zstd",
        ),
    };
    result.map_err(|e| {
        anyhow!(
            "{}: cannot decompress it as {name} ({e}): the file is truncated or not {name}-compressed",
            path.display()
        )
    })?;
    Ok(out)
}

/// Every row of the batches as a JSON object (`arrow-json`, nulls kept as `null`), numbered on from `rows.len()`.
fn push_batch(path: &Path, batch: &RecordBatch, rows: &mut Vec<Row>) -> Result<()> {
    let mut writer = arrow_json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow_json::writer::LineDelimited>(Vec::new());
    writer
        .write(batch)
        .and_then(|()| writer.finish())
        .map_err(|e| {
            anyhow!(
                "{}: a column cannot be read as text, lists or numbers ({e}); columns: {}",
                path.display(),
                columns(batch)
            )
        })?;
    let text = writer.into_inner();
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let object = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(object)) => Ok(object),
            other => Err(RowError(format!(
                "arrow-json gave no object for the row: {other:?}"
            ))),
        };
        rows.push(Row {
            place: Place::Row(rows.len() + 1),
            object,
        });
    }
    Ok(())
}

fn columns(batch: &RecordBatch) -> String {
    batch
        .schema()
        .fields()
        .iter()
        .map(|f| format!("{} ({})", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parquet_rows(path: &Path) -> Result<Vec<Row>> {
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let damaged = |e: parquet::errors::ParquetError| {
        anyhow!(
            "{}: not a readable Parquet file ({e}); it is truncated, damaged or not Parquet (a Parquet file starts \
             and ends with PAR1)",
            path.display()
        )
    };
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(damaged)?
        .build()
        .map_err(damaged)?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| {
            anyhow!(
                "{}: cannot read the rows after row {} ({e}); the file is truncated or damaged",
                path.display(),
                rows.len()
            )
        })?;
        push_batch(path, &batch, &mut rows)?;
    }
    Ok(rows)
}

/// The end-of-stream marker of the Arrow IPC stream format (continuation token, zero length).
const ARROW_STREAM_END: [u8; 8] = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];

fn arrow_rows(path: &Path) -> Result<Vec<Row>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let damaged = |e: arrow_schema::ArrowError| {
        anyhow!(
            "{}: not a readable Arrow IPC file ({e}); it is truncated, damaged or not Arrow (datasets writes Arrow \
             streams: save_to_disk's data-*.arrow, the cache's *.arrow)",
            path.display()
        )
    };
    let mut rows = Vec::new();
    if bytes.starts_with(b"ARROW1") {
        let reader =
            arrow_ipc::reader::FileReader::try_new(Cursor::new(bytes), None).map_err(damaged)?;
        for batch in reader {
            push_batch(path, &batch.map_err(damaged)?, &mut rows)?;
        }
    } else {
        // The stream reader takes an end of file between messages for the end of the stream: a file cut there
        // would lose rows without a word.
        if !bytes.ends_with(&ARROW_STREAM_END) {
            bail!(
                "{}: not a complete Arrow IPC stream (no end-of-stream marker at the end); it is truncated, damaged \
                 or not Arrow",
                path.display()
            );
        }
        let reader =
            arrow_ipc::reader::StreamReader::try_new(BufReader::new(Cursor::new(bytes)), None)
                .map_err(damaged)?;
        for batch in reader {
            push_batch(path, &batch.map_err(damaged)?, &mut rows)?;
        }
    }
    Ok(rows)
}

/// The label columns whose true/false cells are booleans.
const BOOL_COLUMNS: &[&str] = &["label", "preference"];

fn csv_value(column: &str, cell: &str) -> Value {
    if BOOL_COLUMNS.contains(&column) {
        if cell.eq_ignore_ascii_case("true") {
            return Value::Bool(true);
        }
        if cell.eq_ignore_ascii_case("false") {
            return Value::Bool(false);
        }
    }
    if column == "pair" {
        if cell.is_empty() {
            return Value::Null;
        }
        if let Ok(n) = cell.parse::<u64>() {
            return Value::from(n);
        }
    }
    Value::String(cell.to_owned())
}

fn csv_rows(path: &Path, bytes: &[u8]) -> Result<Vec<Row>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    let bad = |e: csv::Error| {
        let at = e
            .position()
            .map(|p| format!(" line {}:", p.line()))
            .unwrap_or_default();
        anyhow!("{}:{at} not readable as CSV: {e}", path.display())
    };
    let header: Vec<String> = reader
        .headers()
        .map_err(bad)?
        .iter()
        .map(str::to_owned)
        .collect();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(bad)?;
        let place = Place::CsvRow {
            row: rows.len() + 1,
            line: record.position().map_or(0, |p| p.line()),
        };
        let object = if record.len() < header.len() {
            Err(RowError(format!(
                "{} fields where the header has {}: no value for column{} {}",
                record.len(),
                header.len(),
                if header.len() - record.len() > 1 {
                    "s"
                } else {
                    ""
                },
                header[record.len()..]
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        } else if record.len() > header.len() {
            Err(RowError(format!(
                "{} fields where the header has {} ({}): a value without a column (an unquoted comma?)",
                record.len(),
                header.len(),
                header.join(", ")
            )))
        } else {
            Ok(header
                .iter()
                .zip(record.iter())
                .map(|(column, cell)| (column.clone(), csv_value(column, cell)))
                .collect())
        };
        rows.push(Row { place, object });
    }
    Ok(rows)
}
