//! Every file kind kto reads, as pyarrow / `datasets` / pandas / gzip wrote it (scripts/make-data-fixtures.py), gives
//! the samples of the JSONL of the same rows; broken files give one error naming the file, the row and the column;
//! data set ids resolve in a faked Hugging Face cache.
use std::path::{Path, PathBuf};

use kto_data::formats::{read_dataset, read_file, ReadOptions, ReadOutput};
use kto_data::hub::CachedDataset;
use kto_data::{Format, Sample};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data-kinds")
}

fn read(name: &str) -> ReadOutput {
    read_file(&fixtures().join(name), &ReadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn samples(name: &str) -> Vec<Sample> {
    read(name).samples
}

fn error(name: &str) -> String {
    format!(
        "{:#}",
        read_file(&fixtures().join(name), &ReadOptions::default()).unwrap_err()
    )
}

/// The JSONL reference of a format, with at least two samples and both classes (so a test cannot pass on nothing).
fn reference(format: &str) -> Vec<Sample> {
    let samples = samples(&format!("{format}.jsonl"));
    assert!(samples.len() >= 4, "{format}: {} samples", samples.len());
    assert!(samples.iter().any(|s| s.label) && samples.iter().any(|s| !s.label));
    samples
}

#[test]
fn parquet_of_every_format_reads_as_its_jsonl() {
    for (format, detected) in [
        ("unpaired", Format::Unpaired),
        ("nemo", Format::Nemo),
        ("paired", Format::Paired),
        ("hh", Format::Hh),
        ("conversational", Format::Conversational),
        ("paired_conversational", Format::Paired),
    ] {
        let out = read(&format!("{format}.parquet"));
        assert_eq!(out.samples, reference(format), "{format}.parquet");
        assert_eq!(out.report.files[0].1, detected, "{format}.parquet");
        assert_eq!(
            out.report,
            read(&format!("{format}.jsonl"))
                .report
                .with_files(&out.report)
        );
    }
    // The list<struct<content, role>> columns are messages.
    let conversational = samples("conversational.parquet");
    assert!(conversational.iter().all(Sample::is_conversational));
    assert_eq!(
        samples("paired_conversational.parquet")[0]
            .completion
            .as_plain(),
        None
    );
}

#[test]
fn compressed_json_reads_as_its_jsonl() {
    for name in [
        "unpaired.jsonl.gz",
        "unpaired.json.gz",
        "unpaired.jsonl.zst",
    ] {
        assert_eq!(samples(name), reference("unpaired"), "{name}");
    }
}

#[test]
fn csv_as_pandas_writes_it_reads_as_its_jsonl() {
    // True/False labels, quoted commas, quotes and newlines, a leading space kept, "chosen"/"rejected", pair ids.
    for format in ["unpaired", "nemo", "paired", "hh"] {
        assert_eq!(
            samples(&format!("{format}.csv")),
            reference(format),
            "{format}.csv"
        );
    }
}

#[test]
fn arrow_streams_of_datasets_read_as_their_jsonl() {
    // A save_to_disk folder (state.json names data-00000-of-00001.arrow) with list<struct> columns.
    let saved = read("conversational_saved");
    assert_eq!(saved.samples, reference("conversational"));
    assert_eq!(
        saved.report.files,
        vec![(
            fixtures().join("conversational_saved/data-00000-of-00001.arrow"),
            Format::Conversational
        )]
    );
    // A file of the datasets cache (load_dataset("json", ...)'s json-train.arrow).
    assert_eq!(samples("unpaired-cache-train.arrow"), reference("unpaired"));
    // A DatasetDict folder: name a split.
    let dict = error("dict_saved");
    assert!(
        dict.contains("DatasetDict")
            && dict.contains("train, test")
            && dict.contains("dict_saved/train"),
        "{dict}"
    );
    assert_eq!(
        samples("dict_saved/train"),
        reference("unpaired")[..4].to_vec()
    );
}

#[test]
fn shards_are_one_data_set_in_name_order() {
    // Paired rows are unpaired over all shards at once, as TRL's map over the concatenated data set does.
    let glob = read("shards/train-*.parquet");
    assert_eq!(glob.samples, reference("paired"));
    let files: Vec<String> = glob
        .report
        .files
        .iter()
        .map(|(f, _)| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        [
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet"
        ]
    );
    assert_eq!((glob.report.rows, glob.report.pairs), (4, 4));
    // The folder holds a test shard too: refused, naming the splits.
    let mixed = error("shards");
    assert!(
        mixed.contains("several splits (train, test)") && mixed.contains("shards/train-*"),
        "{mixed}"
    );
    let none = error("shards/validation-*.parquet");
    assert!(none.contains("no data file matches"), "{none}");
}

#[test]
fn broken_files_give_one_clear_error() {
    let truncated = error("bad/truncated.parquet");
    assert!(
        truncated.contains("bad/truncated.parquet: not a readable Parquet file")
            && truncated.contains("truncated"),
        "{truncated}"
    );
    let named_wrong = error("bad/jsonl-named.parquet");
    assert!(
        named_wrong.contains("jsonl-named.parquet: not a readable Parquet file")
            && named_wrong.contains("PAR1"),
        "{named_wrong}"
    );
    let gz = error("bad/truncated.jsonl.gz");
    assert!(
        gz.contains("truncated.jsonl.gz: cannot decompress it as gzip") && gz.contains("truncated"),
        "{gz}"
    );
    // A mistyped column: file, row, column.
    let label = error("bad/label-int.parquet");
    assert!(
        label.contains("label-int.parquet: row 1: field `label` must be true/false"),
        "{label}"
    );
    // A CSV row without its last column: file, row, line, column.
    let csv = error("bad/missing-column.csv");
    assert!(
        csv.contains("missing-column.csv: row 2 (line 3): 2 fields where the header has 3: no value for column `label`"),
        "{csv}"
    );
    let arrow_cut = {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(fixtures().join("unpaired-cache-train.arrow")).unwrap();
        let cut = dir.path().join("cut.arrow");
        std::fs::write(&cut, &bytes[..bytes.len() - 8]).unwrap();
        format!(
            "{:#}",
            read_file(&cut, &ReadOptions::default()).unwrap_err()
        )
    };
    assert!(
        arrow_cut.contains("cut.arrow: not a complete Arrow IPC stream"),
        "{arrow_cut}"
    );
}

#[test]
fn skip_invalid_counts_table_rows() {
    let out = read_file(
        &fixtures().join("bad/missing-column.csv"),
        &ReadOptions {
            format: Format::Auto,
            skip_invalid: true,
        },
    )
    .unwrap();
    assert_eq!((out.report.rows, out.report.skipped_invalid), (2, 1));
    assert_eq!(out.samples.len(), 1);
}

fn hub() -> PathBuf {
    fixtures().join("hub")
}

#[test]
fn hub_ids_resolve_in_the_cache() {
    // push_to_hub's data/SPLIT-NNNNN-of-NNNNN.parquet, train in two shards.
    let prefs = CachedDataset::locate(&hub(), "kto-test/prefs", None).unwrap();
    assert_eq!(prefs.splits(), ["train", "test"]);
    let train = prefs.split_files("train").unwrap();
    assert_eq!(train.len(), 2);
    assert!(
        train[0].ends_with("data/train-00000-of-00002.parquet"),
        "{train:?}"
    );
    let out = read_dataset("kto-test/prefs", &train, &ReadOptions::default()).unwrap();
    assert_eq!(out.samples, reference("paired"));
    let missing = format!("{:#}", prefs.split_files("validation").unwrap_err());
    assert!(
        missing.contains("no split `validation`") && missing.contains("splits there: train, test"),
        "{missing}"
    );

    // A config is push_to_hub's CONFIG/ folder.
    let chat = CachedDataset::locate(&hub(), "kto-test/configs", Some("chat")).unwrap();
    let files = chat.split_files("train").unwrap();
    let out = read_dataset("chat", &files, &ReadOptions::default()).unwrap();
    assert_eq!(out.samples, reference("conversational"));
    let plain = CachedDataset::locate(&hub(), "kto-test/configs", Some("plain")).unwrap();
    let out = read_dataset(
        "plain",
        &plain.split_files("train").unwrap(),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(out.samples, reference("unpaired"));
    let bad_config = format!(
        "{:#}",
        CachedDataset::locate(&hub(), "kto-test/configs", Some("nope"))
            .err()
            .unwrap()
    );
    assert!(
        bad_config.contains("no config `nope`") && bad_config.contains("chat, plain"),
        "{bad_config}"
    );

    // Anthropic/hh-rlhf's layout: train.jsonl.gz files in data folders, all of them the train split.
    let hh = CachedDataset::locate(&hub(), "kto-test/hh-style", None).unwrap();
    let files = hh.split_files("train").unwrap();
    assert_eq!(files.len(), 2);
    let out = read_dataset("hh", &files, &ReadOptions::default()).unwrap();
    assert_eq!(out.samples.len(), reference("hh").len());
    assert_eq!(hh.split_files("test").unwrap().len(), 1);
}

/// Every faked data set (and config) resolves to the splits and files `datasets` 5.2 itself resolves it to
/// (`hub-resolved.json`, written by scripts/make-data-fixtures.py with `load_dataset_builder` on each snapshot): the
/// layout rules, push_to_hub's cards, and a card whose `data_files` and `data_dir` do not follow the layout.
#[test]
fn splits_and_files_are_those_datasets_resolves() {
    let text = std::fs::read_to_string(fixtures().join("hub-resolved.json")).unwrap();
    let resolved: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(
        resolved.len() >= 9,
        "{} data sets and configs",
        resolved.len()
    );
    for (key, want) in &resolved {
        let (id, config) = match key.split_once(':') {
            Some((id, config)) => (id, Some(config)),
            None => (key.as_str(), None),
        };
        let located = CachedDataset::locate(&hub(), id, config);
        if let Some(error) = want.get("error") {
            // datasets: "Config name is missing ... available configs: ['plain', 'chat']".
            let ours = format!(
                "{:#}",
                located.err().unwrap_or_else(|| panic!(
                    "{key}: kto resolved it, datasets did not ({error})"
                ))
            );
            assert!(
                ours.contains("several configs") && ours.contains("chat, plain"),
                "{key}: {ours}"
            );
            continue;
        }
        let dataset = located.unwrap_or_else(|e| panic!("{key}: {e:#}"));
        let want = want.as_object().unwrap();
        let mut splits = dataset.splits();
        splits.sort();
        let mut want_splits: Vec<String> = want.keys().cloned().collect();
        want_splits.sort();
        assert_eq!(splits, want_splits, "{key}: splits");
        for (split, files) in want {
            let ours: Vec<String> = dataset
                .split_files(split)
                .unwrap()
                .iter()
                .map(|f| {
                    f.strip_prefix(hub())
                        .unwrap()
                        .components()
                        .skip(3)
                        .collect::<PathBuf>()
                        .display()
                        .to_string()
                })
                .collect();
            let theirs: Vec<String> = files
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect();
            assert_eq!(ours, theirs, "{key}: files of split {split}");
        }
    }
    // The card's files read as the rows they hold (the notes file the layout rules would add to train is left out).
    let prefs = CachedDataset::locate(&hub(), "kto-test/card-paths", None).unwrap();
    assert_eq!(prefs.config.as_deref(), Some("prefs"));
    let out = read_dataset(
        "prefs",
        &prefs.split_files("train").unwrap(),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(out.samples, reference("unpaired"));
    let chat = CachedDataset::locate(&hub(), "kto-test/card-paths", Some("chat")).unwrap();
    let out = read_dataset(
        "chat",
        &chat.split_files("train").unwrap(),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(out.samples, reference("conversational"));
    let missing = format!(
        "{:#}",
        CachedDataset::locate(&hub(), "kto-test/card-paths", Some("nope"))
            .err()
            .unwrap()
    );
    assert!(
        missing.contains("no config `nope`") && missing.contains("lists chat, prefs"),
        "{missing}"
    );
}

#[test]
fn a_miss_says_where_kto_looked_and_how_to_fill_the_cache() {
    let miss = format!(
        "{:#}",
        CachedDataset::locate(&hub(), "someone/absent", None)
            .err()
            .unwrap()
    );
    assert!(
        miss.contains("`someone/absent` is not in the Hugging Face cache")
            && miss.contains("datasets--someone--absent/refs/main")
            && miss.contains("hf download --repo-type dataset someone/absent"),
        "{miss}"
    );
    let revision = format!(
        "{:#}",
        CachedDataset::locate(&hub(), "kto-test/prefs@v2", None)
            .err()
            .unwrap()
    );
    assert!(
        revision.contains("refs/v2") && revision.contains("--revision v2"),
        "{revision}"
    );
}

trait WithFiles {
    fn with_files(self, other: &Self) -> Self;
}

impl WithFiles for kto_data::ReadReport {
    /// The report with another's file list (the rest must be equal).
    fn with_files(mut self, other: &Self) -> Self {
        self.files = other.files.clone();
        self
    }
}

#[test]
fn other_names_are_still_read_as_json_and_a_folder_of_one_split_is_one_data_set() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("rows.txt");
    std::fs::copy(fixtures().join("unpaired.jsonl"), &txt).unwrap();
    let out = read_file(&txt, &ReadOptions::default()).unwrap();
    assert_eq!(out.samples, reference("unpaired"));
    // A folder: its data files in name order (README.md and hidden files aside), whatever their kinds.
    let folder = dir.path().join("shards");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(
        fixtures().join("unpaired.parquet"),
        folder.join("a.parquet"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("unpaired.jsonl.gz"),
        folder.join("b.jsonl.gz"),
    )
    .unwrap();
    std::fs::write(folder.join("README.md"), "# not data\n").unwrap();
    std::fs::write(folder.join(".hidden.jsonl"), "not json\n").unwrap();
    let out = read_file(&folder, &ReadOptions::default()).unwrap();
    let twice: Vec<Sample> = [reference("unpaired"), reference("unpaired")].concat();
    assert_eq!(out.samples, twice);
    assert_eq!(out.report.files.len(), 2);
}
