//! From a config to a trained adapter (`kto train`) or a held-out report (`kto eval`): locate the model, read and
//! tokenize the data, set up the adapters, resolve `"auto"` weights, precompute (or reuse) reference log-probs.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use kto_data::balance::{
    auto_desirable_weight, auto_undesirable_weight, balance_warning, ClassCounts,
};
use kto_data::batch::Shard;
use kto_data::formats::{read_dataset, ReadOptions};
use kto_data::hub::CachedDataset;
use kto_data::tokenize::{tokenize_dataset, TokenizationConfig, TokenizedSample, TokenizerBundle};
use kto_model::lora::{LoraAdapter, LoraConfig, LoraTarget};
use kto_model::ModelFiles;
use serde_json::{Map, Value};

use crate::base_model::BaseModel;
use crate::checkpoint::TrainerState;
use crate::config::{Config, Weight};
use crate::evaluate::evaluate_batches;
use crate::hooks::Hooks;
use crate::llama_policy::LoraPolicy;
use crate::plan::TrainingPlan;
use crate::policy::{precompute_reference, Reference};
use crate::progress::{DataPass, PassProgress};
use crate::reference_cache::{self, CacheKeyBuilder, ReferenceLogps};
use crate::run_dir::{check_resumable, plain, RunLock, Start};
use crate::stop;
use crate::train::{loss_settings, micro_batches, train, TrainJob, TrainSummary};
use crate::world::{Alone, Counted, Dealt, World};
use kto_data::faults::{self, Moment};

/// A loaded model with its tokenizer.
pub struct Loaded {
    pub policy: LoraPolicy,
    pub tokenizer: TokenizerBundle,
    pub checkpoint: ModelFiles,
}

/// Loads the base model and installs the adapters: `init_adapter` (trained) plus a frozen copy as the reference,
/// or a fresh LoRA (B = 0) whose reference is the base model with the adapter disabled. `adapter_override` (for
/// `kto eval --adapter`) replaces the policy adapter and keeps the reference as the config defines it.
pub fn load_model(config: &Config, adapter_override: Option<&Path>) -> Result<Loaded> {
    let base = BaseModel::load(config)?;
    let (policy, reference) = match &config.lora.init_adapter {
        Some(dir) => {
            let adapter = base
                .load_adapter(dir)
                .with_context(|| format!("[lora] init_adapter = {}", dir.display()))?;
            let reference = adapter.deep_copy()?;
            (adapter, Some(reference))
        }
        None => {
            let targets = config
                .lora
                .target_modules
                .iter()
                .map(|m| LoraTarget::parse(m))
                .collect::<Result<Vec<_>>>()?;
            let lora = LoraConfig::new(
                config.lora.r,
                config.lora.alpha,
                config.lora.dropout,
                config.lora.use_rslora,
                &targets,
            )?;
            (
                LoraAdapter::init(
                    lora,
                    &base.checkpoint.config,
                    config.train.seed,
                    &base.device,
                )?,
                None,
            )
        }
    };
    let policy = match adapter_override {
        Some(dir) => base
            .load_adapter(dir)
            .with_context(|| format!("adapter {}", dir.display()))?,
        None => policy,
    };
    let BaseModel {
        mut model,
        tokenizer,
        checkpoint,
        ..
    } = base;
    let dropout_active = !config.kto.disable_dropout && policy.config().dropout > 0.0;
    model.set_policy_adapter(Some(policy))?;
    model.set_reference_adapter(reference)?;
    // Evaluation mode until training starts (the reference precompute runs without dropout, as in TRL).
    model.set_training(false, config.train.seed)?;
    let base_model_name = config
        .model
        .path
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Loaded {
        policy: LoraPolicy {
            model,
            base_model_name,
            dropout_active,
        },
        tokenizer,
        checkpoint,
    })
}

fn tokenization(config: &Config) -> TokenizationConfig {
    TokenizationConfig {
        max_length: Some(config.data.max_length),
        max_prompt_length: config.data.max_prompt_length,
        max_completion_length: config.data.max_completion_length,
        truncation_mode: config.data.truncation_mode,
    }
}

/// A data set to read: its name in messages (the path, or `owner/name` and the split) and its files in order.
#[derive(Debug, Clone)]
pub struct DataSource {
    pub name: String,
    pub files: Vec<PathBuf>,
}

impl DataSource {
    /// A data path: a file of any kind, a folder or a glob of shards (`kto_data::sources::expand`).
    pub fn path(path: &Path) -> Result<Self> {
        Ok(Self {
            name: path.display().to_string(),
            files: kto_data::sources::expand(path)?,
        })
    }

    /// `split` of `[data] dataset_name` (and `dataset_config`) in the local Hugging Face cache.
    fn hub(dataset: &CachedDataset, split: &str) -> Result<Self> {
        let config = dataset
            .config
            .as_deref()
            .map(|c| format!(" (config {c})"))
            .unwrap_or_default();
        Ok(Self {
            name: format!("{}{config} split {split}", dataset.id),
            files: dataset.split_files(split)?,
        })
    }
}

fn cached_dataset(config: &Config, name: &str) -> Result<CachedDataset> {
    let cache_dir = kto_model::model_files::default_cache_dir()?;
    CachedDataset::locate(&cache_dir, name, config.data.dataset_config.as_deref())
        .with_context(|| format!("[data] dataset_name = {name:?}"))
}

/// The training data: `[data] train_file`, or `dataset_train_split` of `[data] dataset_name`.
pub fn train_source(config: &Config) -> Result<DataSource> {
    let data = &config.data;
    match (&data.train_file, &data.dataset_name) {
        (Some(path), _) => DataSource::path(path),
        (None, Some(name)) => DataSource::hub(&cached_dataset(config, name)?, &data.dataset_train_split)
            .context("[data] dataset_train_split"),
        (None, None) => bail!(
            "[data] train_file is not set (nor [data] dataset_name, a data set in the local Hugging Face cache)"
        ),
    }
}

/// The evaluation data: `[data] eval_file`, else `dataset_test_split` of `[data] dataset_name` when the cache has
/// that split (`required`: an error when it does not); `None`: no evaluation data.
pub fn eval_source(config: &Config, required: bool) -> Result<Option<DataSource>> {
    let data = &config.data;
    match (&data.eval_file, &data.dataset_name) {
        (Some(path), _) => DataSource::path(path).map(Some),
        (None, Some(name)) => {
            let dataset = cached_dataset(config, name)?;
            let split = &data.dataset_test_split;
            if !required && !dataset.splits().contains(split) {
                tracing::info!(
                    "{name}: no split {split:?} in the cache (splits: {}), so no evaluation",
                    dataset.splits().join(", ")
                );
                return Ok(None);
            }
            DataSource::hub(&dataset, split)
                .context("[data] dataset_test_split")
                .map(Some)
        }
        (None, None) if required => bail!("[data] eval_file is not set (nor [data] dataset_name)"),
        (None, None) => Ok(None),
    }
}

/// Reads and tokenizes one data path (a file, folder or glob of shards) as TRL does.
pub fn load_samples(
    config: &Config,
    tokenizer: &TokenizerBundle,
    path: &Path,
) -> Result<Vec<TokenizedSample>> {
    load_source(config, tokenizer, &DataSource::path(path)?)
}

/// Reads and tokenizes one data set as TRL does.
pub fn load_source(
    config: &Config,
    tokenizer: &TokenizerBundle,
    source: &DataSource,
) -> Result<Vec<TokenizedSample>> {
    let options = ReadOptions {
        format: config.data.format,
        ..Default::default()
    };
    let name = &source.name;
    let read = read_dataset(name, &source.files, &options)?;
    tracing::info!("{name}: {}", read.report);
    let (samples, report) = tokenize_dataset(tokenizer, &read.samples, &tokenization(config))
        .with_context(|| format!("tokenizing {name}"))?;
    if !report.drops.is_empty() {
        tracing::warn!("{name}: dropped {}", report.drops);
    }
    if samples.is_empty() {
        bail!(
            "{name}: no samples left after tokenization ({}): every prompt reaches [data] max_length = {} tokens; \
             raise max_length or shorten the prompts",
            report.drops,
            config.data.max_length
        );
    }
    Ok(samples)
}

/// KTO learns from the contrast of desirable and undesirable examples; a training set with one class is almost
/// always a labelling mistake (TRL only warns, with a weight range computed from a count clamped to 1).
fn require_both_classes(name: &str, samples: &[TokenizedSample]) -> Result<()> {
    let counts = ClassCounts::from_labels(samples.iter().map(|s| s.label));
    if counts.desirable == 0 || counts.undesirable == 0 {
        let (present, missing) = if counts.desirable == 0 {
            ("undesirable (label false)", "desirable (label true)")
        } else {
            ("desirable (label true)", "undesirable (label false)")
        };
        bail!(
            "{name}: all {} samples are {present}, none is {missing}: KTO needs both classes",
            samples.len()
        );
    }
    Ok(())
}

/// Replaces `"auto"` weights using the class counts of the training set (KTO paper eq. 8), and logs TRL's warning
/// when the weights are outside the recommended range.
pub fn resolve_weights(config: &mut Config, train: &[TokenizedSample]) {
    let counts = ClassCounts::from_labels(train.iter().map(|s| s.label));
    let k = &mut config.kto;
    match (k.desirable_weight, k.undesirable_weight) {
        (Weight::Auto, Weight::Value(u)) => {
            k.desirable_weight = Weight::Value(auto_desirable_weight(counts, u))
        }
        (Weight::Value(d), Weight::Auto) => {
            k.undesirable_weight = Weight::Value(auto_undesirable_weight(counts, d))
        }
        _ => {}
    }
    if let (Weight::Value(d), Weight::Value(u)) = (k.desirable_weight, k.undesirable_weight) {
        if let Some(warning) = balance_warning(counts, d, u) {
            tracing::warn!("{warning}");
        }
    }
}

/// Where precomputed reference log-probs are cached: `$KTO_CACHE_DIR`, else `~/.cache/kto/reference-logps`.
pub fn reference_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KTO_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kto").join("reference-logps")
}

/// The reference log-probs of a dataset, from the cache or computed once and stored; `None` when a stop request
/// ended the pass (after the batch in progress; nothing is cached).
fn reference_for(
    config: &Config,
    loaded: &Loaded,
    data: &DataSource,
    samples: &[TokenizedSample],
    eval: bool,
    hooks: &Hooks,
    world: &dyn World,
) -> Result<Option<ReferenceLogps>> {
    let t = &config.train;
    let batch_size = config.kto.precompute_ref_batch_size.unwrap_or(if eval {
        t.per_device_eval_batch_size
    } else {
        t.per_device_train_batch_size
    });
    let mut key = CacheKeyBuilder::new();
    for file in &loaded.checkpoint.weight_files {
        key = key.file_identity("model weights", file)?;
    }
    // A GGUF file's identity covers its metadata (config and tokenizer); a folder keeps them in files of their own.
    if let kto_model::ModelFormat::Safetensors = loaded.checkpoint.format {
        key = key
            .file_contents("model config", &loaded.checkpoint.dir.join("config.json"))?
            .file_contents("tokenizer", &loaded.checkpoint.dir.join("tokenizer.json"))?;
    }
    if let Some(path) = &config.lora.init_adapter {
        // A PEFT folder's weights, or a llama.cpp adapter .gguf file (all of it).
        let weights = if path.is_file() {
            path.clone()
        } else {
            path.join("adapter_model.safetensors")
        };
        key = key.file_contents("reference adapter", &weights)?;
    }
    for file in &data.files {
        key = key.file_contents("data", file)?;
    }
    key = key
        .text(
            "tokenization",
            &format!("{:?} format={}", tokenization(config), config.data.format),
        )
        .text(
            "batch",
            &format!(
                "batch={batch_size} kl_chunk={} kl={}",
                t.per_device_train_batch_size,
                config.kto.loss_type.uses_kl()
            ),
        )
        .text(
            "dtype/device",
            &format!("{:?} {}", config.model.dtype, config.model.device),
        );
    let key = key.finish();
    let dir = reference_cache_dir();
    // The cache is per machine: the ranks take it only when every one has it, else all compute their shares.
    let cached = reference_cache::load(&dir, &key, samples.len())?;
    let mut missing = [cached.is_none() as u8 as f64];
    world.sum_f64(&mut missing, Counted::All)?;
    if let (Some(cached), 0.0) = (cached, missing[0]) {
        tracing::info!("reference log-probs of {} from the cache", data.name);
        return Ok(Some(cached));
    }
    // Dataset order in batches of `batch_size`; KL pairs still rotate within chunks of the *train* batch size.
    let mut precompute_config = config.clone();
    precompute_config.train.per_device_eval_batch_size = batch_size;
    let batches = micro_batches(&precompute_config, samples, loaded.tokenizer.pad_id, true)?;
    let label = if eval { "eval" } else { "train" };
    let pass = PassProgress::start(
        &hooks.progress,
        DataPass::ReferencePrecompute {
            dataset: label.to_string(),
        },
        samples.len(),
    );
    let shard = world.shard();
    let pass_stop = stop::PassStop::new(&hooks.stop, world);
    let logps = precompute_reference(
        &loaded.policy,
        pass_stop
            .batches(batches.epoch_of(0, shard))
            .inspect(|batch| {
                faults::signal_at(Moment::PrecomputeBatch);
                pass.advance(batch.indices.len() * shard.world_size)
            }),
        world,
        Dealt::of(&batches, shard),
        config.kto.loss_type.uses_kl(),
        label,
    );
    drop(pass);
    if pass_stop.finish()?.is_some() {
        return Ok(None);
    }
    let logps = logps?;
    // Every rank holds the gathered values; rank 0 keeps them.
    if world.is_main() {
        reference_cache::store(&dir, &key, &logps)?;
    }
    Ok(Some(logps))
}

/// Where a run stopped during the reference precompute stands: no step of this process was taken.
fn stopped_before_training(
    config: &Config,
    num_samples: usize,
    resume: Option<&Path>,
    signal: i32,
) -> Result<TrainSummary> {
    let t = &config.train;
    let plan = TrainingPlan::new(
        num_samples,
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        t.max_steps,
        t.num_train_epochs,
    )?;
    let global_step = match resume {
        Some(dir) => TrainerState::load(dir)?.global_step,
        None => 0,
    };
    Ok(TrainSummary {
        global_step,
        max_steps: plan.max_steps,
        final_adapter: None,
        stopped_by: Some(signal),
    })
}

/// `kto train`: everything from the config, then the training loop. `lock` is the held lock of the config's
/// `output_dir` (taken before anything is written there; rank 0 of a world holds it, the other ranks pass `None`)
/// and `start` what [`RunLock::begin`] chose there, once: a fresh run, or the checkpoint to continue from.
pub fn run_training(
    config: &Config,
    lock: Option<&RunLock>,
    start: &Start,
    world: &dyn World,
    hooks: &Hooks,
) -> Result<TrainSummary> {
    let resume = start.checkpoint();
    config.require_for_training()?;
    let output_dir = plain(
        config
            .train
            .output_dir
            .as_deref()
            .context("[train] output_dir is not set")?,
    );
    if let Some(lock) = lock {
        ensure!(
            output_dir == lock.dir(),
            "the run lock is for {}, the config's output_dir is {}",
            lock.dir().display(),
            output_dir.display()
        );
    }
    ensure!(
        lock.is_some() == world.is_main(),
        "rank 0, and only rank 0, holds the run folder's lock"
    );
    // Before the model loads: the evaluation data (eval_file, or the test split of dataset_name in the cache).
    let eval_data = eval_source(config, false)?;
    let mut config = config.clone();
    let mut loaded = load_model(&config, None)?;
    let train_data = train_source(&config)?;
    let train_samples = load_source(&config, &loaded.tokenizer, &train_data)?;
    let eval_samples = match &eval_data {
        Some(source) => Some(load_source(&config, &loaded.tokenizer, source)?),
        None => None,
    };
    require_both_classes(&train_data.name, &train_samples)?;
    resolve_weights(&mut config, &train_samples);
    let (train_reference, eval_reference) = if config.kto.precompute_ref_log_probs {
        let train_ref = reference_for(
            &config,
            &loaded,
            &train_data,
            &train_samples,
            false,
            hooks,
            world,
        )?;
        let eval_ref = match (&eval_data, &eval_samples, &train_ref) {
            (Some(source), Some(samples), Some(_)) => {
                reference_for(&config, &loaded, source, samples, true, hooks, world)?
            }
            _ => None,
        };
        if let Some(signal) = stop::agreed(&hooks.stop, world)? {
            return stopped_before_training(&config, train_samples.len(), resume, signal);
        }
        (train_ref, eval_ref)
    } else {
        (None, None)
    };
    // The resume guard needs the resolved config (`"auto"` weights); before config.toml is replaced, so that a
    // refused run leaves the earlier run's files as they were.
    if let Some(checkpoint) = resume {
        check_resumable(&config, checkpoint)?;
        TrainerState::load(checkpoint)?.require_world_size(checkpoint, world.size())?;
    }
    if let Some(lock) = lock {
        lock.write_config(&config)?;
    }
    let job = TrainJob {
        config: &config,
        output_dir: &output_dir,
        lock,
        world,
        train: &train_samples,
        eval: eval_samples.as_deref(),
        pad_id: loaded.tokenizer.pad_id,
        train_reference: train_reference.as_ref(),
        eval_reference: eval_reference.as_ref(),
        resume_from: resume,
    };
    train(&mut loaded.policy, &job, hooks)
}

/// `kto eval`: the held-out metrics of the config's model and adapter (or `adapter`) on `[data] eval_file`.
pub fn run_evaluation(
    config: &Config,
    adapter: Option<&Path>,
    hooks: &Hooks,
) -> Result<Map<String, Value>> {
    let mut config = config.clone();
    let loaded = load_model(&config, adapter)?;
    let eval_data = eval_source(&config, true)?.context("[data] eval_file is not set")?;
    let samples = load_source(&config, &loaded.tokenizer, &eval_data)?;
    let has_train_data = config.data.train_file.is_some() || config.data.dataset_name.is_some();
    let auto_weight = matches!(
        (config.kto.desirable_weight, config.kto.undesirable_weight),
        (Weight::Auto, _) | (_, Weight::Auto)
    );
    if has_train_data && auto_weight {
        let train_samples = load_source(&config, &loaded.tokenizer, &train_source(&config)?)?;
        resolve_weights(&mut config, &train_samples);
    }
    let settings = loss_settings(&config).context(
        "a weight is \"auto\": set [data] train_file (or dataset_name) so it can be resolved, or give a number",
    )?;
    let batches = micro_batches(&config, &samples, loaded.tokenizer.pad_id, true)?;
    let pass = PassProgress::start(&hooks.progress, DataPass::Evaluation, samples.len());
    let dealt = Dealt::of(&batches, Shard::WHOLE);
    evaluate_batches(
        &loaded.policy,
        batches.epoch(0).inspect(|b| pass.advance(b.indices.len())),
        &Alone,
        dealt,
        Reference::Online,
        &settings,
        0,
    )
}
