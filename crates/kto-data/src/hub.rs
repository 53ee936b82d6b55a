//! A data set id (`owner/name`, TRL's `dataset_name`) in the local Hugging Face cache: the files of one split, picked
//! as the Hub and `datasets` name them. Nothing is downloaded.
//!
//! The cache is laid out as `hf download --repo-type dataset owner/name` leaves it:
//! `CACHE/datasets--owner--name/refs/main` holds a commit, `snapshots/COMMIT/...` the files; `owner/name@REV` reads
//! `refs/REV`. The caller passes the cache folder (kto-model's `default_cache_dir`: `HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
//!
//! A config (`dataset_config`, `load_dataset`'s `name`) is the snapshot's folder of that name, as `push_to_hub(...,
//! config_name=C)` writes it (`C/train-00000-of-00001.parquet`); `default` is the whole snapshot when there is no
//! such folder. Within it the split's files are found by `datasets`' own rules (`datasets/data_files.py`), the first
//! that matches any file:
//! 1. shards named `data/SPLIT-00000-of-00002.parquet` (`push_to_hub`; directly in a config's folder too): any split
//!    name;
//! 2. a folder named after the split (`train/`, `my-test/`, ...), then
//! 3. a file named after it (`train.jsonl.gz`, `harmless-base/train.jsonl.gz`), with `datasets`' words for each of
//!    its three splits: train (train, training), validation (validation, valid, dev, val), test (test, testing, eval,
//!    evaluation), delimited by `-._ `, a digit or the end;
//! 4. otherwise every data file is the `train` split.
//!
//! Files are taken in name order. When the snapshot's README.md lists `configs:` (as `push_to_hub` writes, or as an
//! author wrote them), they decide instead, as in `datasets` ([`crate::dataset_card`]): the config named, else the
//! card's default one (several configs without a default need `dataset_config`); its `data_files` patterns give
//! each split's files, or without them the rules above apply under its `data_dir`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::dataset_card::{self, CardConfig};
use crate::sources::FileKind;

/// `datasets`' default splits and the words that name each (`data_files.SPLIT_KEYWORDS`).
const SPLIT_KEYWORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// `datasets`' `NON_WORDS_CHARS`: what may delimit a split word in a name.
fn is_delimiter(c: char) -> bool {
    matches!(c, '-' | '.' | '_' | ' ') || c.is_ascii_digit()
}

/// Whether `word` stands in `name` between delimiters; `at_end` also accepts it at the end (folder names).
fn has_word(name: &str, word: &str, at_end: bool) -> bool {
    name.match_indices(word).any(|(i, _)| {
        let before = name[..i].chars().next_back().is_none_or(is_delimiter);
        let after = match name[i + word.len()..].chars().next() {
            Some(c) => is_delimiter(c),
            None => at_end,
        };
        before && after
    })
}

/// The split of a shard name `SPLIT-00000-of-00002.EXT` (`data_files.SPLIT_PATTERN_SHARDED`).
fn shard_split(file_name: &str) -> Option<&str> {
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    file_name.match_indices('-').find_map(|(i, _)| {
        let rest = &file_name.as_bytes()[i + 1..];
        let ok = rest.len() > 14
            && digits(&rest[..5])
            && &rest[5..9] == b"-of-"
            && digits(&rest[9..14])
            && rest[14..].contains(&b'.');
        (ok && i > 0).then(|| &file_name[..i])
    })
}

/// The splits that `datasets` would see in these relative paths (`/`-separated), each with its files, in the order
/// of its rules (train, validation, test first).
pub fn assign_splits(files: &[String]) -> Vec<(String, Vec<String>)> {
    let mut shards: Vec<(String, Vec<String>)> = Vec::new();
    for file in files {
        let (dir, name) = file.rsplit_once('/').unwrap_or(("", file));
        if dir != "data" && !dir.is_empty() {
            continue;
        }
        if let Some(split) = shard_split(name) {
            match shards.iter_mut().find(|(s, _)| s == split) {
                Some((_, list)) => list.push(file.clone()),
                None => shards.push((split.to_owned(), vec![file.clone()])),
            }
        }
    }
    if !shards.is_empty() {
        shards.sort_by_key(|(split, _)| {
            let default = SPLIT_KEYWORDS.iter().position(|(s, _)| s == split);
            (default.unwrap_or(SPLIT_KEYWORDS.len()), split.clone())
        });
        return shards;
    }
    let by_dir = |file: &String, word: &str| {
        let dirs = file.rsplit_once('/').map_or("", |(dir, _)| dir);
        dirs.split('/').any(|dir| has_word(dir, word, true))
    };
    let by_name = |file: &String, word: &str| {
        let name = file
            .rsplit_once('/')
            .map_or(file.as_str(), |(_, name)| name);
        has_word(name, word, false)
    };
    for rule in [&by_dir as &dyn Fn(&String, &str) -> bool, &by_name] {
        let splits: Vec<(String, Vec<String>)> = SPLIT_KEYWORDS
            .iter()
            .map(|(split, words)| {
                let matching = files
                    .iter()
                    .filter(|f| words.iter().any(|w| rule(f, w)))
                    .cloned()
                    .collect::<Vec<_>>();
                (split.to_string(), matching)
            })
            .filter(|(_, matching)| !matching.is_empty())
            .collect();
        if !splits.is_empty() {
            return splits;
        }
    }
    if files.is_empty() {
        return Vec::new();
    }
    vec![("train".to_owned(), files.to_vec())]
}

/// The split names among a folder's file names (for refusing a folder that mixes splits).
pub(crate) fn splits_in(names: &[String]) -> Vec<String> {
    assign_splits(names)
        .into_iter()
        .map(|(split, _)| split)
        .collect()
}

/// A data set in the cache: where its snapshot is and the files of each split (relative, `/`-separated).
pub struct CachedDataset {
    /// `owner/name` as given (with `@REV` when given).
    pub id: String,
    /// The config asked for, or the card's default config.
    pub config: Option<String>,
    /// The folder the relative file names start from (the snapshot, or its config folder).
    pub root: PathBuf,
    /// Each split and its files, in `datasets`' order (the card's, or train, validation, test first).
    splits: Vec<(String, Vec<String>)>,
}

impl CachedDataset {
    /// Finds `dataset` (`owner/name` or `owner/name@REV`) and its `config` in the hub cache at `cache_dir`.
    pub fn locate(cache_dir: &Path, dataset: &str, config: Option<&str>) -> Result<Self> {
        let (repo_id, revision) = dataset.split_once('@').unwrap_or((dataset, "main"));
        let repo = hf_hub::Repo::with_revision(
            repo_id.to_owned(),
            hf_hub::RepoType::Dataset,
            revision.to_owned(),
        );
        let folder = cache_dir.join(repo.folder_name());
        let cache = hf_hub::Cache::new(cache_dir.to_owned());
        // hf-hub resolves refs/REV to snapshots/COMMIT/FILE; the empty file name gives the snapshot folder itself.
        let Some(snapshot) = cache.repo(repo).get("") else {
            let revision_flag = if revision == "main" {
                String::new()
            } else {
                format!(" --revision {revision}")
            };
            bail!(
                "dataset `{dataset}` is not in the Hugging Face cache: no snapshot for revision `{revision}` at {} \
                 (looked in {}; the cache is HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub). kto \
                 downloads nothing: on a machine with network run `hf download --repo-type dataset {repo_id}\
                 {revision_flag}` (and copy its cache folder here), or set [data] train_file to the data files",
                folder.join("refs").join(revision).display(),
                cache_dir.display()
            );
        };
        let all = data_files_under(&snapshot)?;
        let card = snapshot.join("README.md");
        if card.is_file() {
            if let Some(configs) = dataset_card::read_configs(&card)? {
                return Self::from_card(dataset, &snapshot, &all, &configs, config);
            }
        }
        let (root, files) = match config {
            None => (snapshot.clone(), all),
            Some(config) => {
                let prefix = format!("{config}/");
                let inside: Vec<String> = all
                    .iter()
                    .filter_map(|f| f.strip_prefix(&prefix).map(str::to_owned))
                    .collect();
                if !inside.is_empty() {
                    (snapshot.join(config), inside)
                } else if config == "default" {
                    (snapshot.clone(), all)
                } else {
                    let mut folders: Vec<&str> = all
                        .iter()
                        .filter_map(|f| f.split_once('/').map(|(dir, _)| dir))
                        .collect();
                    folders.dedup();
                    bail!(
                        "dataset `{dataset}` has no config `{config}` in the cache: no data files in {} (folders with \
                         data files there: {}); set [data] dataset_config to one of them, or leave it unset",
                        snapshot.join(config).display(),
                        if folders.is_empty() { "none".to_owned() } else { folders.join(", ") }
                    );
                }
            }
        };
        if files.is_empty() {
            bail!(
                "dataset `{dataset}`: no data files (.parquet, .jsonl, .json, .csv, .arrow, compressed JSON) in its \
                 snapshot {}; was it downloaded with --include patterns that left them out?",
                root.display()
            );
        }
        Ok(Self {
            id: dataset.to_owned(),
            config: config.map(str::to_owned),
            root,
            splits: assign_splits(&files),
        })
    }

    /// The splits of `config` (or of the default config) among the card's `configs`; `all`: the snapshot's data
    /// files.
    fn from_card(
        dataset: &str,
        snapshot: &Path,
        all: &[String],
        configs: &[CardConfig],
        config: Option<&str>,
    ) -> Result<Self> {
        let mut names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        let names = names.join(", ");
        let card = snapshot.join("README.md");
        let chosen = match config {
            Some(name) => match configs.iter().find(|c| c.name == name) {
                Some(chosen) => chosen,
                None => bail!(
                    "dataset `{dataset}` has no config `{name}`: its card {} lists {names}; set [data] dataset_config \
                     to one of them",
                    card.display()
                ),
            },
            None => match dataset_card::default_config(configs)
                .with_context(|| format!("dataset `{dataset}`: {}", card.display()))?
            {
                Some(chosen) => chosen,
                None => bail!(
                    "dataset `{dataset}` has several configs and its card {} marks none as the default: set [data] \
                     dataset_config to one of {names}",
                    card.display()
                ),
            },
        };
        let under = |dir: &str, file: &str| match dir {
            "" => file.to_owned(),
            dir => format!("{dir}/{file}"),
        };
        let data_dir = chosen.data_dir.as_deref().unwrap_or("");
        let splits = match &chosen.data_files {
            Some(patterns) => patterns
                .iter()
                .map(|(split, patterns)| {
                    let mut files = Vec::new();
                    for pattern in patterns {
                        let matched = dataset_card::matching(&under(data_dir, pattern), all)?;
                        files.extend(matched.into_iter().cloned());
                    }
                    if files.is_empty() {
                        bail!(
                            "dataset `{dataset}`, config `{}` of its card {}: no data file kto reads (.parquet, .jsonl, \
                             .json, .csv, .arrow, compressed JSON) matches the split `{split}`'s patterns {patterns:?}{}",
                            chosen.name,
                            card.display(),
                            if data_dir.is_empty() { String::new() } else { format!(" under `{data_dir}`") }
                        );
                    }
                    Ok((split.clone(), files))
                })
                .collect::<Result<Vec<_>>>()?,
            None => {
                let prefix = if data_dir.is_empty() { String::new() } else { format!("{data_dir}/") };
                let inside: Vec<String> = all
                    .iter()
                    .filter_map(|f| f.strip_prefix(&prefix).map(str::to_owned))
                    .collect();
                assign_splits(&inside)
                    .into_iter()
                    .map(|(split, files)| (split, files.iter().map(|f| under(data_dir, f)).collect()))
                    .collect()
            }
        };
        if splits.is_empty() {
            bail!(
                "dataset `{dataset}`, config `{}` of its card {}: no data files (.parquet, .jsonl, .json, .csv, .arrow, \
                 compressed JSON) under `{data_dir}`",
                chosen.name,
                card.display()
            );
        }
        Ok(Self {
            id: dataset.to_owned(),
            config: Some(chosen.name.clone()),
            root: snapshot.to_owned(),
            splits,
        })
    }

    /// The splits found, in `datasets`' order.
    pub fn splits(&self) -> Vec<String> {
        self.splits.iter().map(|(split, _)| split.clone()).collect()
    }

    /// The files of `split` (in name order, or the card's patterns' order).
    pub fn split_files(&self, split: &str) -> Result<Vec<PathBuf>> {
        let splits = &self.splits;
        match splits.iter().find(|(s, _)| s == split) {
            Some((_, files)) => Ok(files.iter().map(|f| self.root.join(f)).collect()),
            None => bail!(
                "dataset `{}`{} has no split `{split}` in the cache (splits there: {}; in {})",
                self.id,
                self.config
                    .as_deref()
                    .map(|c| format!(" (config `{c}`)"))
                    .unwrap_or_default(),
                splits
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.root.display()
            ),
        }
    }
}

/// Every data file under `root` (following the cache's symlinks), as sorted relative `/` paths; hidden files and
/// folders and `__`-folders are skipped, as `datasets` does.
fn data_files_under(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_owned(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with("__") {
                continue;
            }
            let path = entry.path();
            let relative = format!("{prefix}{name}");
            if path.is_dir() {
                stack.push((path, format!("{relative}/")));
            } else if path.is_file()
                && FileKind::of(&path).is_some()
                && !crate::sources::FILES_TO_IGNORE.contains(&name.as_str())
            {
                out.push(relative);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(files: &[&str]) -> Vec<(String, Vec<String>)> {
        assign_splits(&files.iter().map(|f| f.to_string()).collect::<Vec<_>>())
    }

    fn split_names(files: &[&str]) -> Vec<String> {
        assign(files).into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn shards_name_any_split() {
        let splits = assign(&[
            "data/test-00000-of-00001.parquet",
            "data/train_prefs-00000-of-00002.parquet",
            "data/train_prefs-00001-of-00002.parquet",
            "data/train-00000-of-00001.parquet",
        ]);
        let names: Vec<&str> = splits.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["train", "test", "train_prefs"]);
        assert_eq!(splits[2].1.len(), 2);
        // A shard name outside data/ (or a config folder's root) is not rule 1.
        assert_eq!(
            split_names(&["other/train-00000-of-00001.parquet"]),
            ["train"]
        );
    }

    #[test]
    fn folder_then_file_names_then_everything() {
        assert_eq!(
            split_names(&["train/a.parquet", "my-test/b.parquet", "valid/c.parquet"]),
            ["train", "validation", "test"]
        );
        assert_eq!(
            split_names(&[
                "harmless-base/train.jsonl.gz",
                "harmless-base/test.jsonl.gz",
                "helpful-base/train.jsonl.gz"
            ]),
            ["train", "test"]
        );
        assert_eq!(
            split_names(&["my_eval_file.csv", "training1.csv"]),
            ["train", "test"]
        );
        // `trainer` and `contest` do not name a split: the word must stand between delimiters.
        assert_eq!(split_names(&["trainer.jsonl", "contest.jsonl"]), ["train"]);
        assert_eq!(assign(&["trainer.jsonl", "contest.jsonl"])[0].1.len(), 2);
    }
}
