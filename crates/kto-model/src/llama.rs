//! The Llama-family causal LM (also Mistral and Qwen2) with optional LoRA adapters, built for training: embeddings,
//! the decoder layers of [`crate::layer`] (fused ops of `kto-kernels`), the final norm and the LM head, forward passes
//! over batches packed without padding ([`crate::layout`]) or right-padded, KL sequences run as continuations of
//! their targets' prompts ([`crate::kl_continuation`]), and KV-cache steps for generation.

use crate::base_weights::{BaseWeights, Quantization};
use crate::config::ModelConfig;
use crate::frozen_linear::{FrozenLinear, FrozenWeight};
use crate::kl_continuation::KlContinuation;
use crate::layer::{AttentionSegment, DecoderLayer, LayerContext, LayerKv, Pass};
use crate::layout::TokenLayout;
use crate::logprobs::{self, ScoredTokens, SequenceLogps};
use crate::lora::{DropoutSource, LoraAdapter};
use crate::model_files::ModelFiles;
use crate::recompute::SideGrads;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use kto_data::batch::SequenceBatch;
use kto_kernels::attention::AttentionMask;
use std::sync::Arc;

/// Which weights a forward pass runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The trained adapter, recording the graph for its gradient.
    Policy,
    /// The trained adapter without a graph (KL terms, evaluation, generation).
    PolicyNoGrad,
    /// The frozen reference adapter when one is loaded, else the base model with the adapter disabled; no graph.
    Reference,
}

impl AdapterChoice {
    /// The weights of the KL pass that goes with a pass over the targets: the same weights, never a graph (TRL
    /// computes the KL terms under `torch.no_grad()`).
    pub fn for_kl(self) -> Self {
        match self {
            AdapterChoice::Policy => AdapterChoice::PolicyNoGrad,
            other => other,
        }
    }
}

/// How a [`LlamaModel`] runs its passes: choices of work and memory that leave the numbers as they are (up to
/// floating-point summation order; with LoRA dropout drawing masks, gradient checkpointing draws other masks). Given
/// as a whole with [`LlamaModel::set_options`]; `Default` is what a loaded model starts with.
///
/// How the fields interact:
/// - `padding_free` and `kl_prefix_sharing` are independent: a KL continuation runs over the target pass's keys
///   whether that pass was packed or padded.
/// - `gradient_checkpointing` turns `kl_prefix_sharing` off for policy passes with gradient
///   ([`AdapterChoice::Policy`]): their KL sequences get a full pass of their own. LoRA dropout drawing masks (training
///   mode with dropout > 0) turns it off for every pass.
/// - `segmented_attention` matters only where a layout has blocks: packed rows (`padding_free` with padding to drop)
///   and KL continuations (`kl_prefix_sharing`). With both off it changes nothing. Off the CPU it is always on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelOptions {
    /// Policy passes with gradient keep only each decoder layer's input and recompute the layer in backward (about
    /// one extra forward of compute for a fraction of the memory). The LoRA gradients then come out of
    /// [`LlamaModel::backward`], which must be used instead of `Tensor::backward`. Default off (TRL's
    /// `gradient_checkpointing`, `[train] gradient_checkpointing`).
    pub gradient_checkpointing: bool,
    /// Bounds the f32 logits of one log-prob chunk (tokens × vocabulary); smaller saves memory, larger saves
    /// launches. 0 counts as 1. Default [`crate::logprobs::DEFAULT_LOGITS_CHUNK_ELEMENTS`].
    pub logits_chunk_elements: usize,
    /// Packs each batch's sequences end to end instead of right-padding them: the same numbers for less work. Off,
    /// every pass runs the batch as it is. Default on (`[kto] padding_free`).
    pub padding_free: bool,
    /// Runs KL sequences as continuations of their targets' prompts in [`LlamaModel::sequence_logps_with_kl`]:
    /// only the KL completions go through the model. Off, or where it cannot apply (LoRA dropout drawing masks,
    /// gradient checkpointing of a pass with gradient, a KL prompt that differs from its target's), they get a full
    /// pass of their own. Default on (`[kto] kl_prefix_sharing`).
    pub kl_prefix_sharing: bool,
    /// Runs attention block by block on the CPU too, as a device whose attention is dense GEMMs (the GPU) always
    /// does for packed rows and KL continuations, so that no query is scored against another sequence's keys
    /// (tests of the GPU's path on the CPU). Default off.
    #[doc(hidden)]
    pub segmented_attention: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            gradient_checkpointing: false,
            logits_chunk_elements: crate::logprobs::DEFAULT_LOGITS_CHUNK_ELEMENTS,
            padding_free: true,
            kl_prefix_sharing: true,
            segmented_attention: false,
        }
    }
}

/// Cached keys and values of earlier positions, one entry per layer (generation).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Llama-family causal LM with frozen base weights and optional LoRA adapters.
pub struct LlamaModel {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    quantization: Quantization,
    embed_tokens: FrozenWeight,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: FrozenLinear,
    /// The LM head is the embedding's storage.
    tied_head: bool,
    inv_freq: Tensor,
    policy: Option<Arc<LoraAdapter>>,
    reference: Option<Arc<LoraAdapter>>,
    options: ModelOptions,
    training: bool,
    checkpoint_grads: SideGrads,
    dropout: DropoutSource,
}

/// What the decoder does with keys and values in one forward (per layer: [`LayerKv`]).
enum ModelKv<'a> {
    Own,
    Cache(&'a mut KvCache),
    Capture(&'a mut Vec<Option<(Tensor, Tensor)>>),
    Continue {
        prefix: &'a [Option<(Tensor, Tensor)>],
        gather: &'a Tensor,
    },
}

impl ModelKv<'_> {
    fn layer(&mut self, index: usize) -> Result<LayerKv<'_>> {
        Ok(match self {
            ModelKv::Own => LayerKv::Own,
            ModelKv::Cache(cache) => LayerKv::Cache(&mut cache.layers[index]),
            ModelKv::Capture(slots) => LayerKv::Capture(&mut slots[index]),
            ModelKv::Continue { prefix, gather } => LayerKv::Continue {
                prefix: prefix[index]
                    .as_ref()
                    .context("a continuation without the keys of its prefix")?,
                gather,
            },
        })
    }
}

impl LlamaModel {
    /// Loads the base weights of `checkpoint` in `dtype` on `device`, dense (one copy on the device).
    pub fn load(checkpoint: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(checkpoint, dtype, device, Quantization::None)
    }

    /// Loads the base weights of `checkpoint`, its matrices held as `quantization` says and computed with in
    /// `dtype`; read one tensor at a time, so the base is never held twice.
    pub fn load_quantized(
        checkpoint: &ModelFiles,
        dtype: DType,
        device: &Device,
        quantization: Quantization,
    ) -> Result<Self> {
        let weights = BaseWeights::open(checkpoint, dtype, device, quantization)?;
        Self::from_weights(checkpoint.config.clone(), weights, quantization)
            .with_context(|| format!("loading the weights of {}", checkpoint.source().display()))
    }

    fn from_weights(
        config: ModelConfig,
        vb: BaseWeights,
        quantization: Quantization,
    ) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let h = config.hidden_size;
        let model_vb = vb.pp("model");
        let embed_tokens = model_vb
            .pp("embed_tokens")
            .matrix("weight", (config.vocab_size, h))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            layers.push(DecoderLayer::load(
                &model_vb.pp(format!("layers.{index}")),
                &config,
                index,
            )?);
        }
        let norm = model_vb.pp("norm").dense("weight", h)?;
        // A tied head shares the embedding's storage (dense or quantized): one copy.
        let tied_head = config.tie_word_embeddings && !vb.contains("lm_head.weight");
        let lm_head_weight = if tied_head {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head").matrix("weight", (config.vocab_size, h))?
        };
        let inv_freq = Tensor::new(config.rope_inv_freq(), &device)?;
        let dropout = DropoutSource::new(0, &device)?;
        Ok(Self {
            lm_head: FrozenLinear::from_weight(lm_head_weight, None)?,
            tied_head,
            config,
            device,
            dtype,
            quantization,
            embed_tokens,
            layers,
            norm,
            inv_freq,
            policy: None,
            reference: None,
            options: ModelOptions::default(),
            training: false,
            checkpoint_grads: SideGrads::default(),
            dropout,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How the base's matrices are held (`[model] quantize`).
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Bytes of the frozen base weights in memory (the tied head counted once).
    pub fn base_weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self.layers.iter().map(DecoderLayer::weight_bytes).sum();
        let head = if self.tied_head {
            0
        } else {
            self.lm_head.weight().storage_bytes()
        };
        self.embed_tokens.storage_bytes() + layers + dense(&self.norm) + head
    }

    /// Installs the trained adapter (its `Var`s are what the optimizer updates).
    pub fn set_policy_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<()> {
        if let Some(a) = &adapter {
            self.check_adapter(a)?;
        }
        self.policy = adapter.map(Arc::new);
        Ok(())
    }

    /// Installs a frozen reference adapter; without one, `AdapterChoice::Reference` runs the bare base model.
    pub fn set_reference_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<()> {
        if let Some(a) = &adapter {
            self.check_adapter(a)?;
        }
        self.reference = adapter.map(Arc::new);
        Ok(())
    }

    pub fn policy_adapter(&self) -> Option<&LoraAdapter> {
        self.policy.as_deref()
    }

    /// The policy adapter's trainable tensors with their PEFT key names, in PEFT's order (empty without one).
    pub fn trainable_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.policy
            .as_deref()
            .map(LoraAdapter::trainable_vars)
            .unwrap_or_default()
    }

    pub fn reference_adapter(&self) -> Option<&LoraAdapter> {
        self.reference.as_deref()
    }

    /// How the passes run from now on (all options at once: see [`ModelOptions`] for how they interact).
    pub fn set_options(&mut self, options: ModelOptions) {
        self.options = options;
    }

    pub fn options(&self) -> &ModelOptions {
        &self.options
    }

    /// `loss.backward()`, plus the LoRA gradients computed inside checkpointed layers.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.checkpoint_grads.clear();
        let mut grads = loss.backward()?;
        self.checkpoint_grads.drain_into(&mut grads)?;
        Ok(grads)
    }

    fn adapter_arc(&self, pass: Pass) -> Option<Arc<LoraAdapter>> {
        let same = |a: &Option<Arc<LoraAdapter>>| {
            a.as_ref()
                .filter(|a| pass.adapter.is_some_and(|p| std::ptr::eq(p, a.as_ref())))
                .cloned()
        };
        same(&self.policy).or_else(|| same(&self.reference))
    }

    /// Training mode turns LoRA dropout on for every pass that runs an adapter (generation excepted); `dropout_seed`
    /// restarts its random stream.
    pub fn set_training(&mut self, training: bool, dropout_seed: u64) -> Result<()> {
        self.training = training;
        self.dropout = DropoutSource::new(dropout_seed, &self.device)?;
        Ok(())
    }

    fn check_adapter(&self, adapter: &LoraAdapter) -> Result<()> {
        for site in adapter.sites() {
            if site.0 >= self.config.num_hidden_layers {
                bail!(
                    "adapter has layer {} but the model has {} layers",
                    site.0,
                    self.config.num_hidden_layers
                );
            }
            let (fan_in, fan_out) = site.1.shape(&self.config);
            let pair = adapter.pair(site).expect("site listed by the adapter");
            if pair.a.dims() != [adapter.config().r, fan_in]
                || pair.b.dims() != [fan_out, adapter.config().r]
            {
                bail!(
                    "adapter {} of layer {} has A {:?} and B {:?}; the model needs [r, {fan_in}] and [{fan_out}, r]",
                    site.1.module_name(),
                    site.0,
                    pair.a.dims(),
                    pair.b.dims()
                );
            }
        }
        Ok(())
    }

    /// Resolves `choice`. As in torch's train mode, LoRA dropout applies to whichever adapter runs while training,
    /// with or without gradient (TRL's no-grad KL and reference passes run in train mode too).
    pub(crate) fn pass(&self, choice: AdapterChoice) -> Result<Pass<'_>> {
        let (adapter, grad) = match choice {
            AdapterChoice::Policy => {
                let policy = self.policy.as_deref();
                (
                    Some(policy.context("AdapterChoice::Policy needs a policy adapter")?),
                    true,
                )
            }
            AdapterChoice::PolicyNoGrad => (self.policy.as_deref(), false),
            AdapterChoice::Reference => (self.reference.as_deref(), false),
        };
        let dropout = adapter
            .filter(|a| self.training && a.config().dropout > 0.0)
            .map(|_| &self.dropout);
        Ok(Pass {
            adapter,
            grad,
            dropout,
        })
    }

    /// Completion log-probs of every row of `batch` with the weights `choice` selects.
    pub fn sequence_logps(
        &self,
        batch: &SequenceBatch,
        choice: AdapterChoice,
    ) -> Result<SequenceLogps> {
        logprobs::check_batch(batch)?;
        if batch.rows == 0 || batch.width == 0 {
            return logprobs::empty_logps(batch.rows, &self.device);
        }
        let pass = self.pass(choice)?;
        let layout = TokenLayout::of(batch, self.options.padding_free, self.config.sliding_window)?;
        let hidden = self.run_layers(&layout, pass, ModelKv::Own)?;
        self.scored_logps(
            &hidden,
            &ScoredTokens::of_layout(batch, &layout)?,
            pass,
            &layout,
        )
    }

    /// The log-probs of a micro-batch's targets with `choice`, and of its KL sequences (row i: prompt i with another
    /// completion) with the same weights and no graph. With KL prefix sharing the KL sequences continue the target
    /// pass's prompt keys and values, so only their completions run through the model; otherwise (and in TRL's
    /// order, KL first) each gets a full pass.
    pub fn sequence_logps_with_kl(
        &self,
        target: &SequenceBatch,
        kl: &SequenceBatch,
        choice: AdapterChoice,
    ) -> Result<(SequenceLogps, SequenceLogps)> {
        let kl_choice = choice.for_kl();
        let pass = self.pass(choice)?;
        let kl_pass = self.pass(kl_choice)?;
        logprobs::check_batch(target)?;
        let window = self.config.sliding_window;
        let layout = TokenLayout::of(target, self.options.padding_free, window)?;
        let shareable = self.options.kl_prefix_sharing
            && target.rows > 0
            && target.width > 0
            && pass.dropout.is_none()
            && !(pass.grad && self.options.gradient_checkpointing);
        let plan = if shareable {
            KlContinuation::plan(target, &layout, kl, window)?
        } else {
            None
        };
        let Some(plan) = plan else {
            let kl_out = self.sequence_logps(kl, kl_choice)?;
            return Ok((self.sequence_logps(target, choice)?, kl_out));
        };
        let mut prefix = vec![None; self.layers.len()];
        let hidden = self.run_layers(&layout, pass, ModelKv::Capture(&mut prefix))?;
        let target_out = self.scored_logps(
            &hidden,
            &ScoredTokens::of_layout(target, &layout)?,
            pass,
            &layout,
        )?;
        if plan.layout.width == 0 {
            return Ok((target_out, logprobs::empty_logps(kl.rows, &self.device)?));
        }
        let gather = Tensor::from_slice(&plan.key_gather, plan.key_gather.len(), &self.device)?;
        let continued = self.run_layers(
            &plan.layout,
            kl_pass,
            ModelKv::Continue {
                prefix: &prefix,
                gather: &gather,
            },
        )?;
        drop(prefix);
        let hidden_size = self.config.hidden_size;
        let prompt_ends =
            Tensor::from_slice(&plan.prompt_ends, plan.prompt_ends.len(), &self.device)?;
        let sources = Tensor::cat(
            &[
                hidden
                    .detach()
                    .reshape((layout.forward_tokens(), hidden_size))?
                    .index_select(&prompt_ends, 0)?,
                continued.reshape((plan.layout.width, hidden_size))?,
            ],
            0,
        )?;
        let kl_out = self.scored_logps(&sources, &plan.scored, kl_pass, &plan.layout)?;
        Ok((target_out, kl_out))
    }

    fn scored_logps(
        &self,
        hidden: &Tensor,
        scored: &ScoredTokens,
        pass: Pass,
        layout: &TokenLayout,
    ) -> Result<SequenceLogps> {
        logprobs::completion_logps(
            hidden,
            scored,
            &self.lm_head,
            self.options.logits_chunk_elements.max(1),
            pass.grad,
            layout.forward_tokens(),
        )
    }

    /// Final hidden states [rows, width, hidden] of right-padded `input_ids` [rows, width]; row r holds `lengths[r]`
    /// real tokens (attention never looks at padding keys).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        choice: AdapterChoice,
    ) -> Result<Tensor> {
        let pass = self.pass(choice)?;
        let (rows, width) = input_ids.dims2()?;
        if lengths.len() != rows {
            bail!("{} lengths for {rows} rows", lengths.len());
        }
        let layout = TokenLayout {
            ids: input_ids.flatten_all()?.to_vec1()?,
            positions: (0..rows).flat_map(|_| 0..width as u32).collect(),
            tensor_rows: rows,
            width,
            key_ranges: AttentionMask::causal_ranges(
                lengths,
                width,
                0,
                self.config.sliding_window,
            )?,
            sequence_starts: (0..rows).map(|r| r * width).collect(),
            segments: Vec::new(),
        };
        self.run_layers(&layout, pass, ModelKv::Own)
    }

    /// Logits [rows, width, vocab] in the model dtype (tests and tools; training uses `sequence_logps`).
    pub fn forward_logits(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        choice: AdapterChoice,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, lengths, choice)?;
        Ok(self.lm_head.forward(&hidden)?)
    }

    /// One generation step: `input_ids` [1, n] at positions `cache.len()..`, returns the last position's logits
    /// [vocab] in f32 and extends the cache.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        choice: AdapterChoice,
    ) -> Result<Tensor> {
        let pass = Pass {
            dropout: None,
            ..self.pass(choice)?
        };
        if pass.grad {
            bail!("generation runs without gradient: use AdapterChoice::PolicyNoGrad or Reference");
        }
        let (rows, n) = input_ids.dims2()?;
        if rows != 1 {
            bail!("cached generation takes one row, got {rows}");
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let offset = cache.len();
        let layout = TokenLayout {
            ids: input_ids.flatten_all()?.to_vec1()?,
            positions: (offset..offset + n).map(|p| p as u32).collect(),
            tensor_rows: 1,
            width: n,
            key_ranges: AttentionMask::causal_ranges(
                &[offset + n],
                n,
                offset,
                self.config.sliding_window,
            )?,
            sequence_starts: vec![0],
            segments: Vec::new(),
        };
        let hidden = self.run_layers(&layout, pass, ModelKv::Cache(cache))?;
        let last = hidden.narrow(1, n - 1, 1)?.flatten_all()?;
        Ok(self
            .lm_head
            .forward(&last.unsqueeze(0)?)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }

    /// Block-by-block attention for one-row layouts where the attention is dense GEMMs (not on the CPU, whose
    /// attention computes only the visible scores; there only when forced for tests).
    fn attention_segments(
        &self,
        layout: &TokenLayout,
    ) -> Result<Option<Arc<Vec<AttentionSegment>>>> {
        let dense = !self.device.is_cpu() || self.options.segmented_attention;
        if !dense || layout.segments.is_empty() {
            return Ok(None);
        }
        let window = self.config.sliding_window;
        let segments = layout
            .segments
            .iter()
            .map(|s| {
                Ok(AttentionSegment {
                    queries: s.queries.clone(),
                    keys: s.keys.clone(),
                    mask: AttentionMask::causal(
                        &[s.keys.len()],
                        s.queries.len(),
                        s.offset,
                        window,
                        &self.device,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Arc::new(segments)))
    }

    /// The decoder over the tokens of `layout`: final hidden states [tensor rows, width, hidden].
    fn run_layers(&self, layout: &TokenLayout, pass: Pass, mut kv: ModelKv) -> Result<Tensor> {
        let (rows, width) = (layout.tensor_rows, layout.width);
        let ids = Tensor::from_slice(&layout.ids, rows * width, &self.device)?;
        let mut x =
            self.embed_tokens
                .gather_rows(&ids)?
                .reshape((rows, width, self.config.hidden_size))?;
        let context = LayerContext {
            mask: AttentionMask::from_ranges(layout.key_ranges.clone(), rows, width, &self.device)?,
            positions: Tensor::from_slice(&layout.positions, (rows, width), &self.device)?,
            inv_freq: self.inv_freq.clone(),
            segments: self.attention_segments(layout)?,
        };
        let checkpointed =
            pass.grad && self.options.gradient_checkpointing && matches!(kv, ModelKv::Own);
        if checkpointed {
            if !self.checkpoint_grads.is_empty() {
                bail!(
                    "LoRA gradients of checkpointed layers were never collected: with gradient checkpointing, call \
                     LlamaModel::backward(&loss) instead of loss.backward()"
                );
            }
            // The first layer's input must be tracked for the checkpointed ops to enter the graph.
            x = candle_core::Var::from_tensor(&x)?.as_tensor().clone();
        }
        for (index, layer) in self.layers.iter().enumerate() {
            x = if checkpointed {
                let adapter = self.adapter_arc(pass);
                let seed = pass.dropout.map(|d| d.next_seed());
                let op = crate::recompute::RecomputedLayer::new(
                    layer.clone(),
                    self.config.clone(),
                    adapter,
                    context.clone(),
                    seed,
                    self.checkpoint_grads.clone(),
                );
                op.apply(&x)?
            } else {
                layer.forward(&self.config, &x, &context, pass, kv.layer(index)?)?
            };
        }
        Ok(kto_kernels::rmsnorm::rms_norm(
            &x,
            &self.norm,
            self.config.rms_norm_eps,
        )?)
    }
}
