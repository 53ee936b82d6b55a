//! The training loop, top to bottom: TRL 1.16's `KTOTrainer` inside transformers 5.17's `Trainer` loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use kto_data::batch::{BatchConfig, BatchOrder, KlPairing, MicroBatch, MicroBatches};
use kto_data::tokenize::TokenizedSample;

use crate::checkpoint::{self, load_trainable, save_trainable, TrainerState};
use crate::config::Config;
use crate::evaluate::evaluate_batches;
use crate::hooks::Hooks;
use crate::loss::LossSettings;
use crate::metrics::{self, MetricsAccumulator, StepInfo};
use crate::optimizer::{measure_grad_norm, scale_grads, AdamW, AdamWSettings};
use crate::plan::TrainingPlan;
use crate::policy::{score_micro_batch, PolicyModel, Reference};
use crate::progress::{DataPass, PassProgress, TrainingProgress};
use crate::reference_cache::ReferenceLogps;
use crate::run_dir::RunLock;
use crate::schedule::Schedule;
use crate::stop;
use crate::world::{Counted, Dealt, Gather, World};
use kto_data::faults::{self, Moment};

/// Everything a training run needs besides the model.
pub struct TrainJob<'a> {
    /// The resolved config; both loss weights must be numbers (resolve `"auto"` first).
    pub config: &'a Config,
    /// The run folder (`output_dir`).
    pub output_dir: &'a Path,
    /// Its held lock, where the run has begun ([`RunLock::begin`]): checkpoints, metrics and the adapter are written
    /// through it. Only rank 0 of a world holds it and writes; the other ranks pass `None`.
    pub lock: Option<&'a RunLock>,
    /// The processes training together ([`crate::world::Alone`] for one).
    pub world: &'a dyn World,
    pub train: &'a [TokenizedSample],
    pub eval: Option<&'a [TokenizedSample]>,
    pub pad_id: u32,
    /// Precomputed reference log-probs (`precompute_ref_log_probs`), by sample index.
    pub train_reference: Option<&'a ReferenceLogps>,
    pub eval_reference: Option<&'a ReferenceLogps>,
    /// A `checkpoint-N` folder to continue from, as [`RunLock::begin`] chose and verified it.
    pub resume_from: Option<&'a Path>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub global_step: usize,
    pub max_steps: usize,
    /// `output_dir/adapter` when training ran to its end.
    pub final_adapter: Option<PathBuf>,
    /// The signal that stopped the run early (SIGINT, SIGTERM), after a checkpoint of its last step.
    pub stopped_by: Option<i32>,
}

/// The settings of the loss, with both weights resolved.
pub fn loss_settings(config: &Config) -> Result<LossSettings> {
    Ok(LossSettings {
        loss_type: config.kto.loss_type,
        beta: config.kto.beta,
        desirable_weight: config.kto.desirable_weight.value("desirable_weight")?,
        undesirable_weight: config.kto.undesirable_weight.value("undesirable_weight")?,
    })
}

/// The micro-batches of a dataset: train or eval batch size, TRL's KL rotation (always by the *train* batch size).
pub fn micro_batches<'a>(
    config: &Config,
    samples: &'a [TokenizedSample],
    pad_id: u32,
    eval: bool,
) -> Result<MicroBatches<'a>> {
    let t = &config.train;
    MicroBatches::new(
        samples,
        BatchConfig {
            batch_size: if eval {
                t.per_device_eval_batch_size
            } else {
                t.per_device_train_batch_size
            },
            order: if t.shuffle && !eval {
                BatchOrder::Shuffled { seed: t.seed }
            } else {
                BatchOrder::Sequential
            },
            kl: if config.kto.loss_type.uses_kl() {
                KlPairing::Rotate {
                    chunk_size: t.per_device_train_batch_size,
                }
            } else {
                KlPairing::Off
            },
            max_length: Some(config.data.max_length),
            pad_id,
        },
    )
}

/// Trains the model's adapter, as transformers' `Trainer` loop runs `KTOTrainer`: each optimizer step accumulates
/// the gradients of its micro-batches, clips them and steps AdamW; then the step is logged, evaluated and saved as
/// `logging_steps`, `eval_steps` and `save_steps` say, and the run stops at `max_steps` or when `hooks.stop` asks.
pub fn train<M: PolicyModel>(model: &mut M, job: &TrainJob, hooks: &Hooks) -> Result<TrainSummary> {
    let config = job.config;
    let t = &config.train;
    let world = job.world;
    let shard = world.shard();
    let settings = loss_settings(config)?;
    let train_batches = micro_batches(config, job.train, job.pad_id, false)?;
    let eval_batches = match job.eval {
        Some(samples) if !samples.is_empty() => {
            Some(micro_batches(config, samples, job.pad_id, true)?)
        }
        _ => None,
    };
    let plan = TrainingPlan::for_world(
        job.train.len(),
        t.per_device_train_batch_size,
        shard.world_size,
        t.gradient_accumulation_steps,
        t.max_steps,
        t.num_train_epochs,
    )?;
    let schedule = Schedule::new(
        t.lr_scheduler_type,
        t.learning_rate,
        t.warmup_steps,
        plan.max_steps,
    );
    let params = model.trainable_parameters();
    if params.is_empty() {
        bail!("the model has no trainable parameters (no LoRA adapter installed)");
    }
    let stepping = Stepping {
        params: &params,
        max_grad_norm: if t.max_grad_norm > 0.0 {
            t.max_grad_norm
        } else {
            f64::INFINITY
        },
        reference: job
            .train_reference
            .map_or(Reference::Online, Reference::Precomputed),
        settings: &settings,
        output_dir: job.output_dir,
        hooks,
        world,
        dealt: Dealt::of(&train_batches, shard),
    };

    let (mut optimizer, mut state) = start_or_resume(job, &params)?;
    let mut pending: MetricsAccumulator = std::mem::take(&mut state.metrics_pending);
    tracing::info!(
        "{} samples, {} micro-batches per epoch, {} steps per epoch, {} steps",
        job.train.len(),
        plan.micro_batches_per_epoch,
        plan.steps_per_epoch,
        plan.max_steps
    );
    let progress = TrainingProgress::start(&hooks.progress, state.global_step, plan.max_steps);
    let evaluation = Evaluation {
        batches: eval_batches.as_ref(),
        samples: job.eval.map_or(0, <[_]>::len),
        reference: job
            .eval_reference
            .map_or(Reference::Online, Reference::Precomputed),
        settings: &settings,
        hooks,
        world,
        lock: job.lock,
        progress: &progress,
    };
    if state.evaluation_pending {
        evaluate(model, &evaluation, &mut state, &pending)?;
    }
    let mut since_log = Instant::now();
    let mut stopped_by = stop::agreed(&hooks.stop, world)?;
    // The step whose state is on disk (a fresh run's step 0 needs none): a stop request seen before the next step
    // begins ends the run there; otherwise the step in progress finishes and is saved.
    let mut saved_step = state.global_step;

    let (first_epoch, mut first_step_in_epoch) = plan.position_of_step(state.global_step);
    'epochs: for epoch in first_epoch..plan.num_epochs {
        // Built lazily, one micro-batch at a time; a resumed epoch skips the micro-batches already trained on.
        let skip = plan.micro_batches_of_step(first_step_in_epoch).start;
        let mut epoch_batches = train_batches.epoch_of(epoch as u64, shard).skip(skip);
        for step_in_epoch in first_step_in_epoch..plan.steps_per_epoch {
            if state.global_step == saved_step {
                stopped_by = stopped_by.or(stop::agreed(&hooks.stop, world)?);
            }
            if stopped_by.is_some()
                || state.global_step >= plan.max_steps
                || hooks
                    .stop_after_step
                    .is_some_and(|s| state.global_step >= s)
            {
                break 'epochs;
            }
            // Step: the gradients of the step's micro-batches, clipped, then AdamW.
            let step = state.global_step + 1;
            faults::signal_at(Moment::Step(step));
            model.begin_step(t.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64)?;
            let group = plan.micro_batches_of_step(step_in_epoch);
            let micro_batches = (&mut epoch_batches).take(group.len());
            let (grads, samples) = accumulate_gradients(
                model,
                micro_batches,
                group.clone(),
                step,
                &stepping,
                &mut pending,
            )?;
            let learning_rate = schedule.learning_rate_at(state.global_step);
            let grad_norm = apply_gradients(&mut optimizer, grads, learning_rate, step, &stepping)?;
            state.global_step = step;
            state.epoch = plan.epoch_progress(epoch, group.end - 1);
            (state.epoch_index, state.micro_batches_done) = (epoch, group.end);
            pending.end_step();
            progress.step_finished(step, samples);
            let is_last = step >= plan.max_steps;

            // Log.
            if step % t.logging_steps == 0 {
                let info = StepInfo {
                    step,
                    epoch: state.epoch,
                    grad_norm: grad_norm as f64,
                    learning_rate,
                };
                let row = pending.take_train_row(info, since_log.elapsed().as_secs_f64());
                since_log = Instant::now();
                log_row(row, &mut state, job.lock, &progress)?;
            }
            // Evaluate.
            if (t.eval_steps > 0 && step % t.eval_steps == 0) || is_last {
                evaluate(model, &evaluation, &mut state, &pending)?;
            }
            // Save; after a stop request the step just finished is saved whatever save_steps says.
            stopped_by = stop::agreed(&hooks.stop, world)?;
            let save_now = t.save_steps > 0 && (step % t.save_steps == 0 || is_last);
            if save_now || stopped_by.is_some() {
                state.metrics_pending = pending.clone();
                if let Some(lock) = job.lock {
                    save_checkpoint(model, &params, &optimizer, &state, config, lock)?;
                }
                saved_step = step;
            }
        }
        first_step_in_epoch = 0;
    }
    drop(progress);

    let finished = state.global_step >= plan.max_steps && stopped_by.is_none();
    let final_adapter = match job.lock {
        Some(lock) if finished => Some(lock.save_final_adapter(|tmp| model.save_adapter(tmp))?),
        _ => None,
    };
    Ok(TrainSummary {
        global_step: state.global_step,
        max_steps: plan.max_steps,
        final_adapter,
        stopped_by,
    })
}

/// What every optimizer step of a run shares.
struct Stepping<'a> {
    params: &'a [(String, Var)],
    /// `max_grad_norm`, or infinity for no clipping.
    max_grad_norm: f64,
    reference: Reference<'a>,
    settings: &'a LossSettings,
    output_dir: &'a Path,
    hooks: &'a Hooks<'a>,
    world: &'a dyn World,
    /// How each epoch is dealt over the ranks: what `gather_for_metrics` counts at a micro-batch.
    dealt: Dealt,
}

/// The gradients of one accumulation group, by parameter name (summed over its micro-batches, then averaged over
/// the world's ranks as DDP does), and the number of samples this rank trained on. Each micro-batch's loss is
/// divided by the group size, as transformers does before `backward`.
fn accumulate_gradients<M: PolicyModel>(
    model: &mut M,
    micro_batches: impl Iterator<Item = MicroBatch>,
    group: std::ops::Range<usize>,
    step: usize,
    stepping: &Stepping,
    pending: &mut MetricsAccumulator,
) -> Result<(HashMap<String, Tensor>, usize)> {
    let group_size = group.len();
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let (mut samples, mut micro_batches_seen) = (0, 0);
    for (index, batch) in group.zip(micro_batches) {
        let gather = Gather {
            world: stepping.world,
            counted: stepping.dealt.counted(index),
        };
        let scored = score_micro_batch(
            model,
            &batch,
            stepping.reference,
            stepping.settings,
            true,
            gather,
        )?;
        let divisor = Tensor::new(group_size as f32, scored.loss.loss.device())?;
        let scaled = scored.loss.loss.broadcast_div(&divisor)?;
        // transformers logs the mean over ranks of each rank's loss.
        let scaled_value = stepping
            .world
            .mean(scaled.to_scalar::<f32>()? as f64, Counted::All)?
            as f32;
        if !scaled_value.is_finite() {
            bail!(non_finite_message("loss", step, stepping.output_dir));
        }
        let batch_grads = model.backward(&scaled)?;
        for (name, var) in stepping.params {
            if let Some(g) = batch_grads.get(var.as_tensor()) {
                let summed = match grads.remove(name) {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                };
                grads.insert(name.clone(), summed);
            }
        }
        // samples/s counts every rank's samples (each rank's micro-batch is as long, even_batches padding aside).
        let all_ranks = batch.indices.len() * stepping.world.size();
        pending.add_micro_batch(&scored.metrics, scaled_value, all_ranks);
        samples += batch.indices.len();
        micro_batches_seen += 1;
    }
    if micro_batches_seen != group_size {
        bail!("step {step} expected {group_size} micro-batches, the epoch had {micro_batches_seen} left");
    }
    if stepping.world.size() > 1 {
        grads = average_over_ranks(grads, stepping)?;
    }
    Ok((grads, samples))
}

/// DDP's all-reduce: every rank's gradients summed in one flat f32 buffer (in parameter order) on their device,
/// divided by the number of ranks.
fn average_over_ranks(
    mut grads: HashMap<String, Tensor>,
    stepping: &Stepping,
) -> Result<HashMap<String, Tensor>> {
    let mut pieces = Vec::with_capacity(stepping.params.len());
    for (name, var) in stepping.params {
        let grad = match grads.remove(name) {
            Some(g) => g.to_dtype(DType::F32)?,
            None => var.as_tensor().zeros_like()?.to_dtype(DType::F32)?,
        };
        pieces.push(grad.flatten_all()?);
    }
    let flat = Tensor::cat(&pieces, 0)?;
    let ranks = Tensor::new(stepping.world.size() as f32, flat.device())?;
    // Timed for scripts/bench-dp.sh (RUST_LOG=kto::all_reduce=debug): the sum includes waiting for the slowest rank.
    let started = Instant::now();
    let averaged = stepping
        .world
        .sum_f32_tensor(&flat)?
        .broadcast_div(&ranks)?;
    tracing::debug!(
        target: "kto::all_reduce",
        seconds = started.elapsed().as_secs_f64(),
        floats = flat.elem_count(),
        "gradient all-reduce"
    );
    let mut offset = 0;
    for (name, var) in stepping.params {
        let len = var.elem_count();
        let grad = averaged
            .narrow(0, offset, len)?
            .reshape(var.shape())?
            .to_dtype(var.dtype())?;
        offset += len;
        grads.insert(name.clone(), grad);
    }
    Ok(grads)
}

/// Clips the gradients to `max_grad_norm` (the coefficient is applied inside the fused AdamW step; the gradients
/// themselves stay as they are), shows them to the gradient hook, and steps AdamW. Returns the norm before
/// clipping, as transformers logs it.
fn apply_gradients(
    optimizer: &mut AdamW,
    grads: HashMap<String, Tensor>,
    learning_rate: f64,
    step: usize,
    stepping: &Stepping,
) -> Result<f32> {
    let clipping = measure_grad_norm(&grads, stepping.max_grad_norm)?;
    if !clipping.norm.is_finite() {
        bail!(non_finite_message(
            "gradient norm",
            step,
            stepping.output_dir
        ));
    }
    if let Some(hook) = stepping.hooks.gradients {
        hook(step, &scale_grads(&grads, clipping.coefficient)?)?;
    }
    optimizer.step_scaled(stepping.params, &grads, learning_rate, clipping.coefficient)?;
    Ok(clipping.norm)
}

/// A fresh start (empty metrics, a new optimizer and state) or the exact state of the checkpoint `job.resume_from`
/// (trainable weights, optimizer, trainer state, and metrics.jsonl and the TensorBoard file as the checkpoint saw
/// them).
fn start_or_resume(job: &TrainJob, params: &[(String, Var)]) -> Result<(AdamW, TrainerState)> {
    let t = &job.config.train;
    let adamw = AdamWSettings {
        beta1: t.adam_beta1,
        beta2: t.adam_beta2,
        eps: t.adam_epsilon,
        weight_decay: t.weight_decay,
    };
    let Some(dir) = job.resume_from else {
        if let Some(lock) = job.lock {
            lock.reset_metrics(&[], t)?;
        }
        return Ok((AdamW::new(adamw), fresh_state(t.seed, job.world.size())));
    };
    let state = TrainerState::load(dir)?;
    load_trainable(params, &dir.join(checkpoint::TRAINABLE))?;
    let optimizer = AdamW::load(&dir.join(checkpoint::OPTIMIZER), adamw, params)?;
    if let Some(lock) = job.lock {
        lock.reset_metrics(&state.metrics_rows, t)?;
    }
    tracing::info!(
        "resuming from {} at step {}",
        dir.display(),
        state.global_step
    );
    Ok((optimizer, state))
}

/// What a held-out evaluation runs on; `batches` is None without an eval set.
struct Evaluation<'a> {
    batches: Option<&'a MicroBatches<'a>>,
    samples: usize,
    reference: Reference<'a>,
    settings: &'a LossSettings,
    hooks: &'a Hooks<'a>,
    world: &'a dyn World,
    /// Where the row goes (rank 0) and who sees it.
    lock: Option<&'a RunLock>,
    progress: &'a TrainingProgress,
}

/// The held-out evaluation at the current step, logged as one metrics row; each rank evaluates its share of the
/// set. A stop request (agreed by every rank) ends the pass after the batch in progress: nothing is logged, the
/// state says the evaluation is still due, and Ok(false) is returned.
fn evaluate<M: PolicyModel>(
    model: &mut M,
    evaluation: &Evaluation,
    state: &mut TrainerState,
    pending: &MetricsAccumulator,
) -> Result<bool> {
    let Some(batches) = evaluation.batches else {
        state.evaluation_pending = false;
        return Ok(true);
    };
    model.begin_evaluation()?;
    let (stop, world) = (&evaluation.hooks.stop, evaluation.world);
    let shard = world.shard();
    let dealt = Dealt::of(batches, shard);
    let pass = PassProgress::start(
        &evaluation.hooks.progress,
        DataPass::Evaluation,
        evaluation.samples,
    );
    let mut row = serde_json::Map::new();
    row.insert("step".into(), state.global_step.into());
    row.insert("epoch".into(), metrics::json_f64(state.epoch));
    let pass_stop = stop::PassStop::new(stop, world);
    let figures = evaluate_batches(
        model,
        pass_stop.batches(batches.epoch_of(0, shard)).inspect(|b| {
            faults::signal_at(Moment::EvalBatch);
            pass.advance(b.indices.len() * shard.world_size)
        }),
        world,
        dealt,
        evaluation.reference,
        evaluation.settings,
        pending.total_tokens,
    );
    drop(pass);
    state.evaluation_pending = pass_stop.finish()?.is_some();
    if state.evaluation_pending {
        return Ok(false);
    }
    row.extend(figures?);
    log_row(row, state, evaluation.lock, evaluation.progress)?;
    Ok(true)
}

/// Appends a metrics row to metrics.jsonl (rank 0), shows it, and keeps it in the state a checkpoint saves.
fn log_row(
    row: serde_json::Map<String, serde_json::Value>,
    state: &mut TrainerState,
    lock: Option<&RunLock>,
    progress: &TrainingProgress,
) -> Result<()> {
    if let Some(lock) = lock {
        lock.append_metrics(&row)?;
    }
    tracing::debug!("{}", serde_json::to_string(&row)?);
    progress.metrics_logged(&row);
    state.metrics_rows.push(row);
    Ok(())
}

fn fresh_state(seed: u64, world_size: usize) -> TrainerState {
    TrainerState {
        global_step: 0,
        epoch: 0.0,
        epoch_index: 0,
        micro_batches_done: 0,
        seed,
        metrics_pending: MetricsAccumulator::default(),
        metrics_rows: Vec::new(),
        evaluation_pending: false,
        kto_version: env!("CARGO_PKG_VERSION").into(),
        world_size,
    }
}

fn non_finite_message(what: &str, step: usize, output_dir: &Path) -> String {
    format!(
        "non-finite {what} at step {step}: training stopped. The last checkpoint in {} is intact. Try a lower \
         learning_rate, max_grad_norm = 1.0, dtype = \"f32\" or \"bf16\" instead of \"f16\", or check the data for \
         empty completions",
        output_dir.display()
    )
}

/// Adapter (PEFT), exact trainable weights, optimizer, trainer state and config, sealed with a manifest; then
/// `save_total_limit` pruning.
fn save_checkpoint<M: PolicyModel>(
    model: &M,
    params: &[(String, Var)],
    optimizer: &AdamW,
    state: &TrainerState,
    config: &Config,
    run: &RunLock,
) -> Result<()> {
    let limit = config.train.save_total_limit;
    run.save_checkpoint(state.global_step, limit, |tmp| {
        let adapter = tmp.join(checkpoint::ADAPTER_DIR);
        std::fs::create_dir_all(&adapter)?;
        model.save_adapter(&adapter)?;
        save_trainable(params, &tmp.join(checkpoint::TRAINABLE))?;
        optimizer.save(&tmp.join(checkpoint::OPTIMIZER))?;
        state.save(tmp)?;
        kto_data::atomic::write_file(
            &tmp.join(checkpoint::CONFIG),
            config.to_toml_string().as_bytes(),
        )
    })?;
    Ok(())
}
