//! The TOML training config: TRL's key names and defaults, `--set` overrides, validation, printing.
//!
//! Defaults follow TRL 1.16's `KTOConfig` (which overrides some of transformers' `TrainingArguments`, e.g.
//! `learning_rate = 1e-6`, `max_length = 1024`, `disable_dropout = true`) except where the project's issue says
//! otherwise (`logging_steps = 1`, `save_steps = 0`, f32 weights, LoRA r 8 / alpha 16 / dropout 0.05).
//!
//! `disable_dropout = true` (TRL's default) zeroes every dropout, LoRA's included: TRL's
//! `disable_dropout_in_model` sets `p = 0` on every `nn.Dropout`, and PEFT builds `lora_dropout` as an `nn.Dropout`
//! whenever `lora_dropout > 0` (peft/tuners/lora/layer.py), after which TRL disables it. So with the default,
//! `[lora] dropout` only takes effect together with `[kto] disable_dropout = false`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Every section and its keys, in printing order. Used for unknown-key errors and `--print-config`.
pub const SECTIONS: &[(&str, &[&str])] = &[
    ("model", &["path", "dtype", "quantize", "device"]),
    (
        "lora",
        &[
            "r",
            "alpha",
            "dropout",
            "use_rslora",
            "target_modules",
            "init_adapter",
        ],
    ),
    (
        "data",
        &[
            "train_file",
            "eval_file",
            "dataset_name",
            "dataset_config",
            "dataset_train_split",
            "dataset_test_split",
            "format",
            "max_length",
            "max_prompt_length",
            "max_completion_length",
            "truncation_mode",
        ],
    ),
    (
        "kto",
        &[
            "loss_type",
            "beta",
            "desirable_weight",
            "undesirable_weight",
            "precompute_ref_log_probs",
            "precompute_ref_batch_size",
            "disable_dropout",
            "padding_free",
            "kl_prefix_sharing",
        ],
    ),
    (
        "train",
        &[
            "output_dir",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "lr_scheduler_type",
            "warmup_steps",
            "max_steps",
            "num_train_epochs",
            "weight_decay",
            "max_grad_norm",
            "gradient_checkpointing",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "seed",
            "shuffle",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
            "overwrite_output_dir",
            "report_to",
            "logging_dir",
        ],
    ),
];

/// What a key costs and saves, shown above it by `--print-config` (keys whose trade-off is not obvious).
const KEY_NOTES: &[(&str, &str, &str)] = &[
    (
        "model",
        "quantize",
        "How the frozen base's matrices (projections, embedding, LM head) are held: \"none\" (dense in dtype),\n\
         \"keep\" (a .gguf base keeps its file's block types), or a type to quantize to at load: \"q8_0\", \"q4_0\",\n\
         \"q4_k\", \"q5_k\", \"q6_k\" (QLoRA's load_in_4bit; k-quants need rows of 256 values, the others 32).\n\
         Each product dequantizes its weight, so the numbers are those of a dense base holding the dequantized values;\n\
         the cost is a dequantization per product. Norms, biases and the f32 LoRA weights stay dense. Unlike\n\
         bitsandbytes, the embedding and LM head are quantized too. A resumed run must keep the same value.",
    ),
    (
        "data",
        "train_file",
        "A file, a folder or a glob of shards (\"data/train-*.parquet\", read in name order as one data set):\n\
         .jsonl / .json (also .gz, .zst), .parquet, .arrow (save_to_disk folders, datasets cache files), .csv.\n\
         The format (unpaired, nemo, paired, hh, conversational) is detected from the columns as for JSONL.",
    ),
    (
        "data",
        "dataset_name",
        "TRL's dataset_name: a data set id (owner/name, or owner/name@revision) read from the local Hugging Face\n\
         cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub) instead of train_file; nothing is\n\
         downloaded (fill the cache with `hf download --repo-type dataset owner/name`). Its dataset_train_split is\n\
         trained on; its dataset_test_split, when the cache has it, is evaluated (eval_file, when set, instead).",
    ),
    (
        "data",
        "dataset_config",
        "TRL's dataset_config (load_dataset's name): the data set's folder of that name, as push_to_hub writes a\n\
         config (CONFIG/train-00000-of-00001.parquet).",
    ),
    (
        "data",
        "dataset_train_split",
        "The splits' files are found as datasets finds them: data/SPLIT-00000-of-00001.parquet shards, else a\n\
         folder or file named after train / validation / test (train.jsonl.gz), else every file is train.",
    ),
    (
        "train",
        "gradient_checkpointing",
        "true: recompute each decoder layer in backward (TRL's gradient_checkpointing). Costs about one more forward\n\
         pass of compute per step; saves the layers' activations between forward and backward (only their inputs stay).\n\
         The same gradients, except that LoRA dropout (disable_dropout = false) then draws other masks. Measured on the\n\
         SmolLM2-135M shape on CPU (docs/PERFORMANCE.md): peak memory -55 %, step time about 1.5x. Off by default\n\
         (TRL's default is true): kto without it already holds less than half of TRL's memory.",
    ),
    (
        "train",
        "report_to",
        "transformers' report_to: where the logged rows go besides metrics.jsonl. \"tensorboard\" (kto's one\n\
         integration; \"all\" means it too) writes TensorBoard event files with transformers' tags (train/loss,\n\
         eval/loss, ...) at each log; \"none\" or [] writes none. transformers 5 defaults to \"none\" so as not to start\n\
         remote trackers unasked; a local file needs no account, so kto writes it unless told not to.",
    ),
    (
        "train",
        "logging_dir",
        "The TensorBoard folder (`tensorboard --logdir` it or a folder above). Not set: TENSORBOARD_LOGGING_DIR (as\n\
         transformers 5 reads it), else transformers' output_dir/runs/<Mon DD_HH-MM-SS>_<host>, named when the run\n\
         starts; --resume continues the event file there, without repeating a step.",
    ),
];

/// Keys holding paths, resolved against the config file's folder.
const PATH_KEYS: &[(&str, &str)] = &[
    ("model", "path"),
    ("lora", "init_adapter"),
    ("data", "train_file"),
    ("data", "eval_file"),
    ("train", "output_dir"),
    ("train", "logging_dir"),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelSection,
    pub lora: LoraSection,
    pub data: DataSection,
    pub kto: KtoSection,
    pub train: TrainSection,
}

/// `[model] dtype`: the dtype the base weights are loaded in (the LoRA weights are f32 whatever it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl From<Dtype> for candle_core::DType {
    fn from(dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => Self::F32,
            Dtype::Bf16 => Self::BF16,
            Dtype::F16 => Self::F16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A model folder, or a hub id found in the local Hugging Face cache.
    pub path: Option<PathBuf>,
    pub dtype: Dtype,
    /// How the base's matrices are held: dense, the GGUF file's blocks, or quantized at load.
    pub quantize: kto_model::Quantization,
    /// `cpu | cuda | cuda:N | auto`.
    pub device: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: None,
            dtype: Dtype::F32,
            quantize: kto_model::Quantization::None,
            device: "cpu".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: usize,
    #[serde(alias = "lora_alpha")]
    pub alpha: f64,
    #[serde(alias = "lora_dropout")]
    pub dropout: f64,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
    /// Start from this PEFT adapter folder or llama.cpp adapter `.gguf` file; the reference is then a frozen copy of it.
    pub init_adapter: Option<PathBuf>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            use_rslora: false,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            init_adapter: None,
        }
    }
}

/// `keep_end | keep_start`: which end of a prompt longer than `max_prompt_length` is kept.
pub use kto_data::tokenize::TruncationMode;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// A data file, folder or glob of shards (any kind of `kto_data::sources`).
    pub train_file: Option<PathBuf>,
    pub eval_file: Option<PathBuf>,
    /// TRL's `dataset_name`: a data set id in the local Hugging Face cache, instead of `train_file`.
    pub dataset_name: Option<String>,
    /// TRL's `dataset_config`: the data set's config (its folder of that name).
    pub dataset_config: Option<String>,
    /// TRL's `dataset_train_split` (default `train`).
    pub dataset_train_split: String,
    /// TRL's `dataset_test_split` (default `test`): evaluated when the cache has it and `eval_file` is not set.
    pub dataset_test_split: String,
    /// `auto | unpaired | nemo | paired | hh | conversational` (kto-data's readers; `auto` detects per file).
    pub format: kto_data::Format,
    pub max_length: usize,
    /// Legacy truncation options (TRL < 1.0); unset means TRL 1.16's behaviour.
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: Option<usize>,
    pub truncation_mode: TruncationMode,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train_file: None,
            eval_file: None,
            dataset_name: None,
            dataset_config: None,
            dataset_train_split: "train".into(),
            dataset_test_split: "test".into(),
            format: kto_data::Format::Auto,
            max_length: 1024,
            max_prompt_length: None,
            max_completion_length: None,
            truncation_mode: TruncationMode::KeepEnd,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Kto,
    ApoZeroUnpaired,
}

impl LossType {
    /// Whether the loss uses the KL estimate from mismatched pairs (TRL's `calculate_KL`).
    pub fn uses_kl(self) -> bool {
        matches!(self, LossType::Kto)
    }
}

/// A loss weight: a number, or `"auto"` (resolved from the class counts of the training data).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weight {
    Value(f64),
    Auto,
}

impl Weight {
    /// The number, or an error for an unresolved `"auto"`.
    pub fn value(self, key: &str) -> Result<f64> {
        match self {
            Weight::Value(v) => Ok(v),
            Weight::Auto => {
                bail!("[kto] {key} = \"auto\" has not been resolved from the training data")
            }
        }
    }
}

impl Serialize for Weight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Weight::Value(v) => s.serialize_f64(*v),
            Weight::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Weight;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a positive number or \"auto\"")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Weight, E> {
                Ok(Weight::Value(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Weight, E> {
                Ok(Weight::Value(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Weight, E> {
                Ok(Weight::Value(v as f64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Weight, E> {
                if v == "auto" {
                    Ok(Weight::Auto)
                } else {
                    Err(E::custom(format!(
                        "invalid weight \"{v}\": expected a positive number or \"auto\""
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoSection {
    pub loss_type: LossType,
    pub beta: f64,
    pub desirable_weight: Weight,
    pub undesirable_weight: Weight,
    pub precompute_ref_log_probs: bool,
    /// Batch size of the reference precompute pass; unset uses the train/eval batch sizes (TRL).
    pub precompute_ref_batch_size: Option<usize>,
    /// Zero every dropout probability, LoRA's included (TRL's default).
    pub disable_dropout: bool,
    /// Pack each micro-batch's sequences end to end instead of right-padding them (TRL's `padding_free`); the
    /// numbers are the same, the padded positions' work goes.
    pub padding_free: bool,
    /// Run each KL sequence as a continuation of its target's prompt (the target pass's keys and values), so only
    /// the KL completions go through the model; the numbers are the same.
    pub kl_prefix_sharing: bool,
}

impl Default for KtoSection {
    fn default() -> Self {
        Self {
            loss_type: LossType::Kto,
            beta: 0.1,
            desirable_weight: Weight::Value(1.0),
            undesirable_weight: Weight::Value(1.0),
            precompute_ref_log_probs: false,
            precompute_ref_batch_size: None,
            disable_dropout: true,
            padding_free: true,
            kl_prefix_sharing: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub output_dir: Option<PathBuf>,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler_type: SchedulerType,
    /// Steps (>= 1) or a ratio of the total steps (in [0, 1)), as transformers' `warmup_steps`.
    pub warmup_steps: f64,
    /// `-1`: train for `num_train_epochs`.
    pub max_steps: i64,
    pub num_train_epochs: f64,
    pub weight_decay: f64,
    /// `0` disables clipping (transformers clips only when `max_grad_norm > 0`).
    pub max_grad_norm: f64,
    /// transformers' `gradient_checkpointing`: keep only each decoder layer's input from the policy pass and
    /// recompute the layer in backward. The same gradients (LoRA dropout aside: its masks are drawn per layer then)
    /// for about one more forward pass of compute, with the layers' activations no longer held between forward and
    /// backward. Off by default, as kto has run so far (TRL's `KTOConfig` turns it on; transformers' default is off).
    pub gradient_checkpointing: bool,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub seed: u64,
    pub shuffle: bool,
    pub logging_steps: usize,
    /// `0`: evaluate at the end only.
    pub eval_steps: usize,
    /// `0`: save only the final adapter.
    pub save_steps: usize,
    /// `0`: keep every checkpoint.
    pub save_total_limit: usize,
    /// transformers' name: a fresh run removes an earlier run's files from `output_dir` instead of refusing it.
    pub overwrite_output_dir: bool,
    /// transformers' `report_to`: the integrations the logged rows go to besides metrics.jsonl.
    pub report_to: ReportTo,
    /// The TensorBoard folder; `None`: `TENSORBOARD_LOGGING_DIR`, else `output_dir/runs/<start>_<host>`
    /// ([`crate::run_dir::RunDir::logging_dir`]).
    pub logging_dir: Option<PathBuf>,
}

/// transformers' `report_to`, a string or a list of strings: `"tensorboard"`, `"all"` (the integrations there are:
/// kto has only TensorBoard) and `"none"`; held as the list of integrations, as `TrainingArguments` normalizes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportTo(Vec<Integration>);

/// An integration kto reports to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integration {
    Tensorboard,
}

impl ReportTo {
    pub const NONE: ReportTo = ReportTo(Vec::new());

    pub fn tensorboard() -> ReportTo {
        ReportTo(vec![Integration::Tensorboard])
    }

    pub fn includes(&self, integration: Integration) -> bool {
        self.0.contains(&integration)
    }

    /// One value of the key (alone or in the list); `None` for `"none"`.
    fn parse_one(name: &str) -> std::result::Result<Option<Integration>, String> {
        match name {
            "tensorboard" | "all" => Ok(Some(Integration::Tensorboard)),
            "none" => Ok(None),
            other => Err(format!(
                "unknown integration \"{other}\": allowed values are \"tensorboard\", \"all\" (kto's integrations: \
                 tensorboard) and \"none\", or a list of them"
            )),
        }
    }
}

impl Serialize for ReportTo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let names: Vec<&str> = self
            .0
            .iter()
            .map(|i| match i {
                Integration::Tensorboard => "tensorboard",
            })
            .collect();
        names.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ReportTo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let names = match OneOrMany::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a string or a list of strings, e.g. [\"tensorboard\"]",
            )
        })? {
            OneOrMany::One(name) => vec![name],
            OneOrMany::Many(names) => names,
        };
        let mut integrations = Vec::new();
        for name in &names {
            if let Some(integration) =
                ReportTo::parse_one(name).map_err(serde::de::Error::custom)?
            {
                if !integrations.contains(&integration) {
                    integrations.push(integration);
                }
            }
        }
        Ok(ReportTo(integrations))
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            output_dir: None,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-6,
            lr_scheduler_type: SchedulerType::Linear,
            warmup_steps: 0.0,
            max_steps: -1,
            num_train_epochs: 3.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            gradient_checkpointing: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            seed: 42,
            shuffle: false,
            logging_steps: 1,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 0,
            overwrite_output_dir: false,
            report_to: ReportTo::tensorboard(),
            logging_dir: None,
        }
    }
}

/// One `--set section.key=value` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub section: String,
    pub key: String,
    pub value: toml::Value,
}

impl std::str::FromStr for Override {
    type Err = anyhow::Error;

    /// `section.key=value`; the value is read as TOML (number, boolean, array, quoted string), and anything that is
    /// not valid TOML is taken as a plain string (`output_dir=runs/a`, `loss_type=kto`).
    fn from_str(s: &str) -> Result<Self> {
        let (name, raw) = s.split_once('=').ok_or_else(|| {
            anyhow!("--set {s:?}: expected section.key=value, e.g. train.learning_rate=1e-5")
        })?;
        let (section, key) = name.trim().split_once('.').ok_or_else(|| {
            anyhow!("--set {s:?}: the key must name its section, e.g. train.learning_rate=1e-5")
        })?;
        let (section, key) = (section.trim(), key.trim());
        let allowed = section_keys(section).ok_or_else(|| {
            anyhow!(
                "--set {s:?}: unknown section [{section}]; allowed sections: {}",
                section_names()
            )
        })?;
        if !allowed.contains(&key) {
            bail!(
                "--set {s:?}: unknown key `{key}` in [{section}]; allowed keys: {}",
                allowed.join(", ")
            );
        }
        let raw = raw.trim();
        let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("parsed table has key v"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        Ok(Override {
            section: section.into(),
            key: key.into(),
            value,
        })
    }
}

fn section_keys(section: &str) -> Option<&'static [&'static str]> {
    SECTIONS
        .iter()
        .find(|(name, _)| *name == section)
        .map(|(_, keys)| *keys)
}

fn section_names() -> String {
    SECTIONS
        .iter()
        .map(|(s, _)| format!("[{s}]"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Config {
    /// Reads `path`, applies `overrides`, resolves the file's relative paths against its folder, validates.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, base, overrides)
            .with_context(|| format!("config {}", path.display()))
    }

    /// Parses config text; relative paths written in the text are resolved against `base_dir`, override paths are
    /// kept as given (relative to the working directory).
    pub fn from_toml_str(text: &str, base_dir: &Path, overrides: &[Override]) -> Result<Config> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| anyhow!("{e}"))?;
        check_known_keys(&table)?;
        resolve_paths(&mut table, base_dir);
        // The training data is a file or a data set: `--set data.dataset_name=...` replaces the file's train_file
        // and eval_file, `--set data.train_file=...` its dataset_name and dataset_config.
        let overridden = |key: &str| {
            overrides
                .iter()
                .any(|o| o.section == "data" && o.key == key)
        };
        if let Some(data) = table.get_mut("data").and_then(toml::Value::as_table_mut) {
            if overridden("dataset_name") {
                data.remove("train_file");
                data.remove("eval_file");
            }
            if overridden("train_file") {
                data.remove("dataset_name");
                data.remove("dataset_config");
            }
        }
        for o in overrides {
            let section = table
                .entry(o.section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| anyhow!("[{}] is not a table", o.section))?;
            section.insert(o.key.clone(), o.value.clone());
        }
        let config = Self::from_table(table)?;
        config.validate()?;
        Ok(config)
    }

    fn from_table(mut table: toml::Table) -> Result<Config> {
        let mut config = Config::default();
        macro_rules! section {
            ($name:literal, $field:ident) => {
                if let Some(value) = table.remove($name) {
                    config.$field = value.clone().try_into().map_err(|e: toml::de::Error| {
                        anyhow!(
                            "[{}] {}: {}",
                            $name,
                            failing_key(&value, &config.$field),
                            e.message().trim_end()
                        )
                    })?;
                }
            };
        }
        section!("model", model);
        section!("lora", lora);
        section!("data", data);
        section!("kto", kto);
        section!("train", train);
        Ok(config)
    }

    /// Range checks that do not depend on the data. Errors name `[section] key` and the allowed values.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let device_ok = m.device == "cpu"
            || m.device == "cuda"
            || m.device == "auto"
            || m.device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !device_ok {
            bail!(
                "[model] device = {:?}: allowed values are cpu, cuda, cuda:N, auto",
                m.device
            );
        }
        let l = &self.lora;
        if l.r == 0 {
            bail!("[lora] r = 0: must be >= 1");
        }
        positive("[lora] alpha", l.alpha)?;
        if !(0.0..1.0).contains(&l.dropout) {
            bail!("[lora] dropout = {}: must be in [0, 1)", l.dropout);
        }
        if l.target_modules.is_empty() {
            bail!("[lora] target_modules is empty: name at least one module, e.g. [\"q_proj\", \"v_proj\"]");
        }
        let d = &self.data;
        if let (Some(name), Some(file)) = (&d.dataset_name, &d.train_file) {
            bail!(
                "[data] dataset_name = {name:?} and [data] train_file = {:?} are both set: the training data is one \
                 or the other; remove one of them",
                file.display().to_string()
            );
        }
        if d.dataset_config.is_some() && d.dataset_name.is_none() {
            bail!("[data] dataset_config is set without [data] dataset_name");
        }
        for (key, split) in [
            ("dataset_train_split", &d.dataset_train_split),
            ("dataset_test_split", &d.dataset_test_split),
        ] {
            if split.is_empty() || split.contains('/') {
                bail!("[data] {key} = {split:?}: a split name such as \"train\" or \"test\"");
            }
        }
        if d.max_length == 0 {
            bail!("[data] max_length = 0: must be >= 1");
        }
        if d.max_prompt_length == Some(0) || d.max_completion_length == Some(0) {
            bail!("[data] max_prompt_length / max_completion_length must be >= 1 when set");
        }
        let k = &self.kto;
        positive("[kto] beta", k.beta)?;
        for (name, w) in [
            ("desirable_weight", k.desirable_weight),
            ("undesirable_weight", k.undesirable_weight),
        ] {
            if let Weight::Value(v) = w {
                positive(&format!("[kto] {name}"), v)?;
            }
        }
        if k.desirable_weight == Weight::Auto && k.undesirable_weight == Weight::Auto {
            bail!("[kto] desirable_weight and undesirable_weight are both \"auto\": at most one may be");
        }
        if k.precompute_ref_batch_size == Some(0) {
            bail!("[kto] precompute_ref_batch_size = 0: must be >= 1 when set");
        }
        let t = &self.train;
        for (name, v) in [
            ("per_device_train_batch_size", t.per_device_train_batch_size),
            ("per_device_eval_batch_size", t.per_device_eval_batch_size),
            ("gradient_accumulation_steps", t.gradient_accumulation_steps),
            ("logging_steps", t.logging_steps),
        ] {
            if v == 0 {
                bail!("[train] {name} = 0: must be >= 1");
            }
        }
        if k.loss_type.uses_kl() && t.per_device_train_batch_size < 2 {
            bail!(
                "[train] per_device_train_batch_size = {}: loss_type \"kto\" needs >= 2 (the KL term pairs each \
                 prompt with another sample's completion of the same batch)",
                t.per_device_train_batch_size
            );
        }
        if k.loss_type.uses_kl() && t.shuffle && k.precompute_ref_log_probs {
            bail!(
                "[train] shuffle = true with [kto] precompute_ref_log_probs = true: shuffled batches pair each prompt \
                 with a completion of its own shuffled batch, so the KL pairs change every epoch and cannot be \
                 precomputed; set one of them to false"
            );
        }
        non_negative("[train] learning_rate", t.learning_rate)?;
        non_negative("[train] warmup_steps", t.warmup_steps)?;
        if t.warmup_steps >= 1.0 && t.warmup_steps.fract() != 0.0 {
            bail!(
                "[train] warmup_steps = {}: a whole number of steps, or a ratio in [0, 1)",
                t.warmup_steps
            );
        }
        if t.max_steps == 0 || t.max_steps < -1 {
            bail!(
                "[train] max_steps = {}: -1 (use num_train_epochs) or >= 1",
                t.max_steps
            );
        }
        if t.max_steps < 0 {
            positive("[train] num_train_epochs", t.num_train_epochs)?;
        }
        non_negative("[train] weight_decay", t.weight_decay)?;
        non_negative("[train] max_grad_norm", t.max_grad_norm)?;
        for (name, v) in [("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("[train] {name} = {v}: must be in [0, 1)");
            }
        }
        non_negative("[train] adam_epsilon", t.adam_epsilon)?;
        Ok(())
    }

    /// Checks the keys a training run needs on top of [`Config::validate`].
    pub fn require_for_training(&self) -> Result<()> {
        if self.model.path.is_none() {
            bail!("[model] path is not set: a model folder or a hub id in the local Hugging Face cache");
        }
        if self.data.train_file.is_none() && self.data.dataset_name.is_none() {
            bail!(
                "[data] train_file is not set (nor [data] dataset_name, a data set in the local Hugging Face cache)"
            );
        }
        if self.train.output_dir.is_none() {
            bail!("[train] output_dir is not set");
        }
        Ok(())
    }

    /// The resolved config as TOML with every key, defaults included; unset optional keys appear as comments.
    pub fn to_toml_string(&self) -> String {
        let table = toml::Table::try_from(self).expect("config serializes to TOML");
        let mut out = String::new();
        for (section, keys) in SECTIONS {
            let values = table.get(*section).and_then(|v| v.as_table());
            let _ = writeln!(out, "[{section}]");
            for key in *keys {
                if let Some((_, _, note)) =
                    KEY_NOTES.iter().find(|(s, k, _)| s == section && k == key)
                {
                    for line in note.lines() {
                        let _ = writeln!(out, "# {line}");
                    }
                }
                match values.and_then(|t| t.get(*key)) {
                    Some(v) => {
                        let _ = writeln!(out, "{key} = {}", format_value(v));
                    }
                    None => {
                        let _ = writeln!(out, "# {key} is not set");
                    }
                }
            }
            out.push('\n');
        }
        out
    }
}

/// Floats in the shortest form TOML reads back exactly: `1.0`, `0.05`, `1e-6`.
fn format_value(v: &toml::Value) -> String {
    match v {
        toml::Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.1}"),
        toml::Value::Float(f) if (1e-3..1e15).contains(&f.abs()) => format!("{f}"),
        toml::Value::Float(f) => format!("{f:e}"),
        _ => v.to_string(),
    }
}

/// The first key of a section whose value alone fails to deserialize (serde's message does not name it).
fn failing_key<T: serde::de::DeserializeOwned + Serialize>(
    section: &toml::Value,
    defaults: &T,
) -> String {
    let (Some(keys), Ok(base)) = (section.as_table(), toml::Table::try_from(defaults)) else {
        return String::new();
    };
    for (key, value) in keys {
        let mut single = base.clone();
        single.insert(key.clone(), value.clone());
        if toml::Value::Table(single).try_into::<T>().is_err() {
            return key.clone();
        }
    }
    String::new()
}

fn positive(name: &str, v: f64) -> Result<()> {
    if !(v > 0.0 && v.is_finite()) {
        bail!("{name} = {v}: must be a positive number");
    }
    Ok(())
}

fn non_negative(name: &str, v: f64) -> Result<()> {
    if !(v >= 0.0 && v.is_finite()) {
        bail!("{name} = {v}: must be >= 0");
    }
    Ok(())
}

/// Unknown sections and keys, named with the allowed ones (more helpful than serde's first-error-only message).
fn check_known_keys(table: &toml::Table) -> Result<()> {
    for (section, value) in table {
        let Some(allowed) = section_keys(section) else {
            bail!(
                "unknown section [{section}]; allowed sections: {}",
                section_names()
            );
        };
        let Some(keys) = value.as_table() else {
            bail!("`{section}` must be a section ([{section}]), not a value");
        };
        for key in keys.keys() {
            let aliased = matches!(
                (section.as_str(), key.as_str()),
                ("lora", "lora_alpha" | "lora_dropout")
            );
            if !allowed.contains(&key.as_str()) && !aliased {
                bail!(
                    "unknown key `{key}` in [{section}]; allowed keys: {}",
                    allowed.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Relative paths are relative to the config file's folder. A model path that does not exist there is left as is:
/// it may be a hub id (`org/name`) looked up in the Hugging Face cache.
fn resolve_paths(table: &mut toml::Table, base_dir: &Path) {
    for (section, key) in PATH_KEYS {
        let Some(toml::Value::String(s)) = table.get_mut(*section).and_then(|t| t.get_mut(*key))
        else {
            continue;
        };
        let path = Path::new(s.as_str());
        if path.is_absolute() {
            continue;
        }
        let joined = base_dir.join(path);
        if *section == "model" && !joined.exists() {
            continue;
        }
        *s = joined.to_string_lossy().into_owned();
    }
}

/// The resolved config as a flat `section.key -> value` map (for checkpoints and comparing runs).
pub fn flatten(config: &Config) -> BTreeMap<String, toml::Value> {
    let table = toml::Table::try_from(config).expect("config serializes to TOML");
    let mut out = BTreeMap::new();
    for (section, value) in table {
        if let toml::Value::Table(keys) = value {
            for (key, v) in keys {
                out.insert(format!("{section}.{key}"), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::from_toml_str(text, Path::new("/cfg"), &[])
    }

    #[test]
    fn defaults_are_trl_kto_config_with_issue_overrides() {
        let c = parse("").unwrap();
        assert_eq!(c.train.learning_rate, 1e-6);
        assert_eq!(c.data.max_length, 1024);
        assert!(c.kto.disable_dropout);
        assert_eq!(c.train.per_device_train_batch_size, 8);
        assert_eq!(c.train.num_train_epochs, 3.0);
        assert_eq!(c.train.max_steps, -1);
        assert_eq!(c.train.lr_scheduler_type, SchedulerType::Linear);
        assert_eq!(c.kto.beta, 0.1);
        assert_eq!(c.train.adam_epsilon, 1e-8);
        assert_eq!(c.lora.target_modules.len(), 7);
    }

    #[test]
    fn unknown_key_names_section_and_allowed_keys() {
        let err = parse("[train]\nlernig_rate = 1e-5\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lernig_rate") && err.contains("[train]") && err.contains("learning_rate"),
            "{err}"
        );
        let err = parse("[trian]\n").unwrap_err().to_string();
        assert!(err.contains("[trian]") && err.contains("[train]"), "{err}");
    }

    #[test]
    fn report_to_reads_as_transformers_normalizes_it() {
        let report_to = |value: &str| {
            parse(&format!("[train]\nreport_to = {value}\n")).map(|c| c.train.report_to)
        };
        assert_eq!(parse("").unwrap().train.report_to, ReportTo::tensorboard());
        for tensorboard in [
            "\"tensorboard\"",
            "[\"tensorboard\"]",
            "\"all\"",
            "[\"all\"]",
        ] {
            assert_eq!(
                report_to(tensorboard).unwrap(),
                ReportTo::tensorboard(),
                "{tensorboard}"
            );
        }
        for none in ["\"none\"", "[\"none\"]", "[]"] {
            assert_eq!(report_to(none).unwrap(), ReportTo::NONE, "{none}");
        }
        for (bad, named) in [
            ("\"wandb\"", "\"wandb\""),
            ("[\"tensorboard\", \"mlflow\"]", "\"mlflow\""),
            ("1", "a string"),
        ] {
            let err = report_to(bad).unwrap_err().to_string();
            assert!(
                err.starts_with("[train] report_to: ")
                    && err.contains(named)
                    && (bad == "1" || err.contains("\"tensorboard\", \"all\"")),
                "{err}"
            );
        }
        // Printed as the list it is, which reads back the same.
        let none = parse("[train]\nreport_to = \"none\"\n").unwrap();
        assert!(none.to_toml_string().contains("\nreport_to = []\n"));
        assert_eq!(parse(&none.to_toml_string()).unwrap(), none);
        let printed = parse("").unwrap().to_toml_string();
        assert!(
            printed.contains("\nreport_to = [\"tensorboard\"]\n"),
            "{printed}"
        );
        assert!(printed.contains("# logging_dir is not set"), "{printed}");
    }

    #[test]
    fn logging_dir_is_relative_to_the_config_file() {
        let c = parse("[train]\nlogging_dir = \"tb/a\"\n").unwrap();
        assert_eq!(c.train.logging_dir, Some(PathBuf::from("/cfg/tb/a")));
    }

    #[test]
    fn bad_enum_value_lists_allowed_values() {
        let err = parse("[data]\nformat = \"csv\"\n").unwrap_err().to_string();
        assert!(err.contains("[data] format"), "{err}");
        assert_eq!(
            parse("[data]\nformat = \"hh\"\n").unwrap().data.format,
            kto_data::Format::Hh
        );
        let err = parse("[kto]\nloss_type = \"sigmoid\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[kto]") && err.contains("apo_zero_unpaired"),
            "{err}"
        );
        let err = parse("[train]\nlr_scheduler_type = \"poly\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cosine"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = parse("[train]\nlearning_rate = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("[train]"), "{err}");
    }

    #[test]
    fn range_validation() {
        assert!(parse("[kto]\nbeta = 0\n")
            .unwrap_err()
            .to_string()
            .contains("[kto] beta"));
        assert!(parse("[train]\nper_device_train_batch_size = 1\n").is_err());
        assert!(parse(
            "[kto]\nloss_type = \"apo_zero_unpaired\"\n[train]\nper_device_train_batch_size = 1\n"
        )
        .is_ok());
        assert!(parse("[train]\nmax_steps = 0\n").is_err());
        assert!(parse("[train]\nadam_beta2 = 1.0\n").is_err());
        assert!(parse("[model]\ndevice = \"gpu\"\n")
            .unwrap_err()
            .to_string()
            .contains("cuda:N"));
        assert!(parse("[model]\ndevice = \"cuda:1\"\n").is_ok());
        assert!(
            parse("[train]\nshuffle = true\n").is_ok(),
            "kto-data rotates KL completions within shuffled batches"
        );
        assert!(
            parse("[train]\nshuffle = true\n[kto]\nprecompute_ref_log_probs = true\n").is_err()
        );
        assert!(parse("[train]\nwarmup_steps = 0.1\n").is_ok());
        assert!(parse("[train]\nwarmup_steps = 2.5\n").is_err());
    }

    #[test]
    fn weights_accept_auto() {
        let c = parse("[kto]\ndesirable_weight = \"auto\"\nundesirable_weight = 2\n").unwrap();
        assert_eq!(c.kto.desirable_weight, Weight::Auto);
        assert_eq!(c.kto.undesirable_weight, Weight::Value(2.0));
        assert!(parse("[kto]\ndesirable_weight = \"many\"\n").is_err());
        assert!(
            parse("[kto]\ndesirable_weight = \"auto\"\nundesirable_weight = \"auto\"\n").is_err()
        );
    }

    #[test]
    fn overrides_parse_plain_values() {
        let sets: Vec<Override> = [
            "train.learning_rate=1e-5",
            "train.output_dir=runs/a b",
            "kto.loss_type=apo_zero_unpaired",
            "train.shuffle=true",
            "lora.target_modules=[\"q_proj\"]",
            "kto.desirable_weight=auto",
            "train.per_device_train_batch_size=1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let c = Config::from_toml_str("[train]\nlearning_rate = 1.0\n", Path::new("/cfg"), &sets)
            .unwrap();
        assert_eq!(c.train.learning_rate, 1e-5);
        assert_eq!(c.train.output_dir, Some(PathBuf::from("runs/a b")));
        assert_eq!(c.kto.loss_type, LossType::ApoZeroUnpaired);
        assert!(c.train.shuffle);
        assert_eq!(c.lora.target_modules, vec!["q_proj".to_string()]);
        assert_eq!(c.kto.desirable_weight, Weight::Auto);
        let err = "train.lr=1".parse::<Override>().unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");
        assert!("learning_rate=1".parse::<Override>().is_err());
    }

    #[test]
    fn dataset_name_is_trls_and_excludes_train_file() {
        let err = parse("[data]\ntrain_file = \"a.jsonl\"\ndataset_name = \"o/n\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[data] dataset_name") && err.contains("[data] train_file"),
            "{err}"
        );
        let c = parse("[data]\ndataset_name = \"trl-lib/kto-mix-14k\"\n").unwrap();
        assert_eq!(c.data.dataset_name.as_deref(), Some("trl-lib/kto-mix-14k"));
        assert_eq!(
            (
                c.data.dataset_train_split.as_str(),
                c.data.dataset_test_split.as_str()
            ),
            ("train", "test")
        );
        assert!(parse("[data]\ndataset_config = \"c\"\n").is_err());
        assert!(parse("[data]\ndataset_name = \"o/n\"\ndataset_train_split = \"\"\n").is_err());
        // --set of one replaces the other given in the file.
        let sets = ["data.dataset_name=o/n".parse().unwrap()];
        let c = Config::from_toml_str(
            "[data]\ntrain_file = \"a.jsonl\"\neval_file = \"b.jsonl\"\n",
            Path::new("/cfg"),
            &sets,
        )
        .unwrap();
        assert_eq!((c.data.train_file, c.data.eval_file), (None, None));
        assert_eq!(c.data.dataset_name.as_deref(), Some("o/n"));
        let sets = ["data.train_file=x.parquet".parse().unwrap()];
        let c = Config::from_toml_str(
            "[data]\ndataset_name = \"o/n\"\ndataset_config = \"c\"\n",
            Path::new("/cfg"),
            &sets,
        )
        .unwrap();
        assert_eq!((c.data.dataset_name, c.data.dataset_config), (None, None));
        assert_eq!(c.data.train_file, Some(PathBuf::from("x.parquet")));
        // --print-config explains the keys, set or not.
        let printed = parse("").unwrap().to_toml_string();
        for expected in [
            "# TRL's dataset_name: a data set id",
            "# dataset_name is not set",
            "dataset_train_split = \"train\"",
            "dataset_test_split = \"test\"",
            "# A file, a folder or a glob of shards",
        ] {
            assert!(printed.contains(expected), "{expected}: {printed}");
        }
    }

    #[test]
    fn relative_paths_resolve_against_config_folder() {
        let c = parse("[data]\ntrain_file = \"d/train.jsonl\"\n[train]\noutput_dir = \"/abs/out\"\n[model]\npath = \"org/model\"\n")
            .unwrap();
        assert_eq!(c.data.train_file, Some(PathBuf::from("/cfg/d/train.jsonl")));
        assert_eq!(c.train.output_dir, Some(PathBuf::from("/abs/out")));
        assert_eq!(
            c.model.path,
            Some(PathBuf::from("org/model")),
            "hub ids stay as written"
        );
    }

    #[test]
    fn printed_config_round_trips_with_every_key() {
        let c = parse("[kto]\ndesirable_weight = \"auto\"\n[data]\ntrain_file = \"/x.jsonl\"\n")
            .unwrap();
        let printed = c.to_toml_string();
        for (section, keys) in SECTIONS {
            assert!(printed.contains(&format!("[{section}]")));
            for key in *keys {
                assert!(
                    printed.contains(&format!("{key} ")),
                    "missing {key} in\n{printed}"
                );
            }
        }
        assert!(printed.contains("learning_rate = 1e-6"), "{printed}");
        assert_eq!(parse(&printed).unwrap(), c);
    }

    #[test]
    fn gradient_checkpointing_is_read_and_printed_with_its_cost() {
        assert!(!Config::default().train.gradient_checkpointing);
        let c = parse("[train]\ngradient_checkpointing = true\n").unwrap();
        assert!(c.train.gradient_checkpointing);
        let printed = c.to_toml_string();
        let at = printed
            .find("gradient_checkpointing = true")
            .expect("the key printed");
        let note = &printed[..at];
        assert!(
            note.contains("# true: recompute each decoder layer in backward")
                && note.contains("one more forward"),
            "the cost and the saving above the key:\n{printed}"
        );
        assert_eq!(parse(&printed).unwrap(), c);
        let set: Override = "train.gradient_checkpointing=true".parse().unwrap();
        assert_eq!(set.key, "gradient_checkpointing");
    }

    #[test]
    fn quantize_is_read_printed_and_refused_with_the_allowed_values() {
        assert_eq!(
            Config::default().model.quantize,
            kto_model::Quantization::None
        );
        let c = parse("[model]\nquantize = \"q4_k\"\n").unwrap();
        assert_eq!(
            c.model.quantize,
            kto_model::Quantization::To(candle_core::quantized::GgmlDType::Q4K)
        );
        let printed = c.to_toml_string();
        let at = printed
            .find("quantize = \"q4_k\"")
            .expect("the key printed");
        assert!(
            printed[..at].contains("# How the frozen base's matrices"),
            "{printed}"
        );
        assert_eq!(parse(&printed).unwrap(), c);
        let error = format!("{:#}", parse("[model]\nquantize = \"nf4\"\n").unwrap_err());
        assert!(
            error.contains("quantize")
                && error.contains("\"nf4\"")
                && error.contains(
                    "\"none\", \"keep\", \"q8_0\", \"q4_0\", \"q4_k\", \"q5_k\", \"q6_k\""
                ),
            "{error}"
        );
        let set: Override = "model.quantize=keep".parse().unwrap();
        let c = Config::from_toml_str("", Path::new("/cfg"), &[set]).unwrap();
        assert_eq!(c.model.quantize, kto_model::Quantization::Keep);
    }
}
