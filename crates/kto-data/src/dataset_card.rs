//! The `configs:` of a data set card (the YAML block at the top of the snapshot's README.md), read as `datasets`
//! reads them (`utils/metadata.py` `MetadataConfigs`, `data_files.sanitize_patterns`, `load.py`
//! `create_builder_configs_from_metadata_configs`):
//!
//! ```yaml
//! configs:
//! - config_name: default        # required
//!   default: true               # optional: the config used when none is named
//!   data_dir: raw               # optional: patterns (or the layout rules) start there
//!   data_files:                 # optional: a pattern, a list of patterns (the train split), or per split:
//!   - split: train
//!     path: raw/prefs-*.jsonl   # a pattern or a list of them
//! ```
//!
//! The default config is the only one, or the one named `default`, or the one with `default: true` (two such are an
//! error). Patterns are `fsspec` globs relative to the snapshot (or `data_dir`): `*` stays within a folder, `**`
//! crosses folders, hidden files and folders match only when the pattern names them; each pattern's matches are
//! in name order, the patterns in the card's order.
use std::path::Path;

use anyhow::{bail, Context, Result};
use yaml_rust2::{Yaml, YamlLoader};

/// One entry of the card's `configs:`.
#[derive(Debug, Clone, PartialEq)]
pub struct CardConfig {
    pub name: String,
    pub default: bool,
    /// Relative to the snapshot, without a trailing `/`.
    pub data_dir: Option<String>,
    /// Split → patterns, in the card's order; `None`: the split layout rules apply (under `data_dir`).
    pub data_files: Option<Vec<(String, Vec<String>)>>,
}

/// The `configs:` of the card `readme` (a README.md); `None` when it has no YAML block or no `configs:`.
pub fn read_configs(readme: &Path) -> Result<Option<Vec<CardConfig>>> {
    let text = std::fs::read_to_string(readme)
        .with_context(|| format!("cannot read the data set card {}", readme.display()))?;
    parse_configs(&text).with_context(|| format!("the data set card {}", readme.display()))
}

/// `datasets`' `_split_yaml_from_readme`: the lines between a first line `---` and the next `---`.
fn yaml_block(card: &str) -> Option<String> {
    let lines: Vec<&str> = card.lines().collect();
    if lines.first() != Some(&"---") {
        return None;
    }
    let end = lines[1..].iter().position(|l| *l == "---")? + 1;
    Some(lines[1..end].join("\n"))
}

/// The `configs:` of a card's text.
pub fn parse_configs(card: &str) -> Result<Option<Vec<CardConfig>>> {
    let Some(block) = yaml_block(card) else {
        return Ok(None);
    };
    let documents = YamlLoader::load_from_str(&block).context("its YAML block does not parse")?;
    let configs = match documents.first().map(|d| &d["configs"]) {
        None | Some(Yaml::BadValue) | Some(Yaml::Null) => return Ok(None),
        Some(Yaml::Array(configs)) if configs.is_empty() => return Ok(None),
        Some(Yaml::Array(configs)) => configs,
        Some(other) => bail!("`configs:` must be a list of configs, got {other:?}"),
    };
    let configs: Vec<CardConfig> = configs
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            config_entry(entry).with_context(|| format!("`configs:` entry {}", i + 1))
        })
        .collect::<Result<_>>()?;
    Ok(Some(configs))
}

fn config_entry(entry: &Yaml) -> Result<CardConfig> {
    if entry.as_hash().is_none() {
        bail!("a config must be a mapping with `config_name`, got {entry:?}");
    }
    let Some(name) = scalar(&entry["config_name"]) else {
        bail!("a config must have a `config_name` (a string), got {entry:?}");
    };
    let default = match &entry["default"] {
        Yaml::BadValue | Yaml::Null => false,
        Yaml::Boolean(b) => *b,
        other => bail!("config `{name}`: `default` must be true or false, got {other:?}"),
    };
    let data_dir = match &entry["data_dir"] {
        Yaml::BadValue | Yaml::Null => None,
        other => match scalar(other) {
            Some(dir) => Some(dir.trim_matches('/').to_owned()),
            None => bail!("config `{name}`: `data_dir` must be a string, got {other:?}"),
        },
    };
    let data_files = match &entry["data_files"] {
        Yaml::BadValue | Yaml::Null => None,
        files => Some(data_files(files).with_context(|| format!("config `{name}`: `data_files`"))?),
    };
    Ok(CardConfig {
        name,
        default,
        data_dir,
        data_files,
    })
}

/// `sanitize_patterns`: a pattern or a list of patterns is the train split; a list of `{split, path}` names each.
fn data_files(files: &Yaml) -> Result<Vec<(String, Vec<String>)>> {
    const FORMS: &str =
        "a pattern, a list of patterns, or a list of `{split: NAME, path: PATTERN or list}`";
    let patterns = |value: &Yaml| -> Result<Vec<String>> {
        match value {
            Yaml::Array(items) => items
                .iter()
                .map(|item| {
                    scalar(item)
                        .with_context(|| format!("a pattern must be a string, got {item:?}"))
                })
                .collect(),
            other => Ok(vec![scalar(other).with_context(|| {
                format!("a pattern must be a string, got {other:?}")
            })?]),
        }
    };
    let items = match files {
        Yaml::Array(items) => items,
        single => return Ok(vec![("train".to_owned(), patterns(single)?)]),
    };
    if !items.iter().any(|item| item.as_hash().is_some()) {
        return Ok(vec![("train".to_owned(), patterns(files)?)]);
    }
    let mut splits: Vec<(String, Vec<String>)> = Vec::new();
    for item in items {
        let (Some(hash), Some(split)) = (item.as_hash(), scalar(&item["split"])) else {
            bail!("expected {FORMS}; got the entry {item:?}");
        };
        if hash.len() != 2 || item["path"].is_badvalue() {
            bail!("expected {FORMS}; the entry for split `{split}` has keys other than `split` and `path`");
        }
        if splits.iter().any(|(s, _)| *s == split) {
            bail!("the split `{split}` is listed twice");
        }
        let paths = patterns(&item["path"]).with_context(|| format!("split `{split}`"))?;
        splits.push((split, paths));
    }
    Ok(splits)
}

/// A YAML scalar as the string `yaml.safe_load` would give (a number or boolean written where a name goes).
fn scalar(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// `MetadataConfigs.get_default_config_name`: the only config, or the one named `default`, or the one marked
/// `default: true`; `None` when several configs have none of these.
pub fn default_config(configs: &[CardConfig]) -> Result<Option<&CardConfig>> {
    let mut chosen: Option<&CardConfig> = None;
    for config in configs {
        if configs.len() == 1 || config.name == "default" || config.default {
            if let Some(first) = chosen {
                bail!(
                    "the card has several default configs: `{}` and `{}`",
                    first.name,
                    config.name
                );
            }
            chosen = Some(config);
        }
    }
    Ok(chosen)
}

/// The files among `files` (relative `/` paths, in name order) that `pattern` matches, as `datasets` resolves a
/// pattern against a repository: `*` and `?` stay within a folder name, `**` spans folders, a leading `.` (a hidden
/// file or folder) must be matched by a `.` in the pattern.
pub fn matching<'a>(pattern: &str, files: &'a [String]) -> Result<Vec<&'a String>> {
    let glob = glob::Pattern::new(pattern.trim_start_matches("./"))
        .with_context(|| format!("`{pattern}` is not a valid pattern"))?;
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    Ok(files
        .iter()
        .filter(|file| glob.matches_with(file, options))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(yaml: &str) -> Vec<CardConfig> {
        parse_configs(&format!("---\n{yaml}\n---\n# A card\n"))
            .unwrap()
            .expect("configs")
    }

    #[test]
    fn the_four_forms_of_data_files() {
        let c = configs(
            "license: mit\nconfigs:\n- config_name: one\n  data_files: data.csv\n- config_name: list\n  data_files:\n  \
             - part0/*\n  - part1/*\n- config_name: splits\n  default: true\n  data_files:\n  - split: train\n    \
             path:\n    - train/a/*\n    - train/b/*\n  - split: test\n    path: test/*\n- config_name: dir\n  data_dir: raw/\n",
        );
        let files = |i: usize| c[i].data_files.clone().unwrap();
        assert_eq!(
            files(0),
            [("train".to_owned(), vec!["data.csv".to_owned()])]
        );
        assert_eq!(
            files(1),
            [(
                "train".to_owned(),
                vec!["part0/*".to_owned(), "part1/*".to_owned()]
            )]
        );
        assert_eq!(
            files(2),
            [
                (
                    "train".to_owned(),
                    vec!["train/a/*".to_owned(), "train/b/*".to_owned()]
                ),
                ("test".to_owned(), vec!["test/*".to_owned()])
            ]
        );
        assert_eq!(
            (c[3].data_dir.as_deref(), &c[3].data_files),
            (Some("raw"), &None)
        );
        assert_eq!(default_config(&c).unwrap().unwrap().name, "splits");
    }

    #[test]
    fn default_config_follows_datasets() {
        let named = |names: &[(&str, bool)]| -> Vec<CardConfig> {
            names
                .iter()
                .map(|(name, default)| CardConfig {
                    name: name.to_string(),
                    default: *default,
                    data_dir: None,
                    data_files: None,
                })
                .collect()
        };
        assert_eq!(
            default_config(&named(&[("only", false)]))
                .unwrap()
                .unwrap()
                .name,
            "only"
        );
        assert_eq!(
            default_config(&named(&[("a", false), ("default", false)]))
                .unwrap()
                .unwrap()
                .name,
            "default"
        );
        assert!(default_config(&named(&[("a", false), ("b", false)]))
            .unwrap()
            .is_none());
        let two = default_config(&named(&[("a", true), ("default", false)])).unwrap_err();
        assert!(
            format!("{two}").contains("several default configs: `a` and `default`"),
            "{two}"
        );
    }

    #[test]
    fn bad_cards_say_what_is_wrong() {
        let err = |yaml: &str| {
            format!(
                "{:#}",
                parse_configs(&format!("---\n{yaml}\n---\n")).unwrap_err()
            )
        };
        assert!(err("configs:\n- data_files: a.csv")
            .contains("`configs:` entry 1: a config must have a `config_name`"));
        assert!(err("configs: nope").contains("must be a list"));
        let twice = err("configs:\n- config_name: x\n  data_files:\n  - split: train\n    path: a\n  - split: train\n    path: b");
        assert!(
            twice.contains("config `x`: `data_files`: the split `train` is listed twice"),
            "{twice}"
        );
        let extra = err("configs:\n- config_name: x\n  data_files:\n  - split: train\n    path: a\n    other: 1");
        assert!(
            extra.contains("keys other than `split` and `path`"),
            "{extra}"
        );
        // No YAML block, or one without configs: the layout rules apply.
        assert_eq!(parse_configs("# A card without YAML\n").unwrap(), None);
        assert_eq!(parse_configs("---\nlicense: mit\n---\n").unwrap(), None);
    }

    #[test]
    fn patterns_match_as_fsspec_globs() {
        let files: Vec<String> = [
            "a.jsonl",
            "raw/.hidden.jsonl",
            "raw/deep/y.jsonl",
            "raw/x.jsonl",
            "train-1.parquet",
        ]
        .iter()
        .map(|f| f.to_string())
        .collect();
        let names = |pattern: &str| -> Vec<&str> {
            matching(pattern, &files)
                .unwrap()
                .into_iter()
                .map(String::as_str)
                .collect()
        };
        assert_eq!(names("*.jsonl"), ["a.jsonl"]);
        assert_eq!(names("raw/*"), ["raw/x.jsonl"]);
        assert_eq!(names("raw/**"), ["raw/deep/y.jsonl", "raw/x.jsonl"]);
        assert_eq!(names("raw/.*"), ["raw/.hidden.jsonl"]);
        assert_eq!(names("./train-*"), ["train-1.parquet"]);
        assert!(names("nothing/*").is_empty());
    }
}
