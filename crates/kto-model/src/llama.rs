//! The Llama decoder (also Mistral and Qwen2) with optional LoRA adapters, built for training.
//!
//! Shaped like candle-transformers' `models/llama.rs`, but every op on the training path has a backward: RMSNorm,
//! RoPE and softmax are written from basic ops (candle-nn's fused `rms_norm`, `rope*` and `softmax_last_dim` drop
//! gradients), base linears are [`FrozenLinear`]s that compute no weight gradient, and attention recomputes its
//! probabilities in backward instead of keeping them ([`crate::attention`]).

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::frozen_linear::FrozenLinear;
use crate::lora::{lora_delta, DropoutSource, LoraAdapter, LoraSite, LoraTarget};
use crate::recompute::SideGrads;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
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

/// Per-call settings resolved from an [`AdapterChoice`].
#[derive(Clone, Copy)]
pub(crate) struct Pass<'a> {
    pub(crate) adapter: Option<&'a LoraAdapter>,
    pub(crate) grad: bool,
    pub(crate) dropout: Option<&'a DropoutSource>,
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

/// A linear layer of the decoder: frozen base weights plus whatever adapter the pass uses at this site.
#[derive(Debug, Clone)]
pub(crate) struct AdaptedLinear {
    pub(crate) base: FrozenLinear,
    pub(crate) site: LoraSite,
}

impl AdaptedLinear {
    fn load(vb: &VarBuilder, config: &ModelConfig, site: LoraSite, bias: bool) -> Result<Self> {
        let (fan_in, fan_out) = site.1.shape(config);
        let vb = vb.pp(site.1.module_name());
        let weight = vb.get((fan_out, fan_in), "weight")?;
        let bias = if bias {
            Some(vb.get(fan_out, "bias")?)
        } else {
            None
        };
        Ok(Self {
            base: FrozenLinear::new(weight, bias)?,
            site,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let Some((adapter, pair)) = pass.adapter.and_then(|a| a.pair(self.site).map(|p| (a, p)))
        else {
            return Ok(y);
        };
        let delta = lora_delta(x, pair, adapter.config(), pass.grad, pass.dropout)?;
        // Sum in f32, then back to the base dtype (torch's type promotion in PEFT's `result + lora(x) * scale`).
        Ok((y.to_dtype(DType::F32)? + delta)?.to_dtype(y.dtype())?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: AdaptedLinear,
    up: AdaptedLinear,
    down: AdaptedLinear,
}

#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    input_layernorm: Tensor,
    attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        c: &ModelConfig,
        x: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pass: Pass,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (rows, width, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((rows, width, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(self.q.forward(x, pass)?, c.num_attention_heads)?;
        let k = heads(self.k.forward(x, pass)?, c.num_key_value_heads)?;
        let v = heads(self.v.forward(x, pass)?, c.num_key_value_heads)?;
        let q = apply_rope(&q, cos, sin)?;
        let mut k = apply_rope(&k, cos, sin)?;
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((k_old, v_old)) = slot.as_ref() {
                k = Tensor::cat(&[k_old, &k], 2)?;
                v = Tensor::cat(&[v_old, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let n_rep = c.num_attention_heads / c.num_key_value_heads;
        let k = repeat_kv(&k, n_rep)?;
        let v = repeat_kv(&v, n_rep)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let out = crate::attention::attention(&q, &k, &v, mask, scale)?
            .transpose(1, 2)?
            .reshape((rows, width, c.num_attention_heads * c.head_dim))?;
        self.o.forward(&out, pass)
    }
}

impl DecoderLayer {
    /// One decoder layer: pre-norm attention and MLP, each added to the residual stream.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        config: &ModelConfig,
        x: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pass: Pass,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let eps = config.rms_norm_eps;
        let normed = rms_norm(x, &self.input_layernorm, eps)?;
        let x = (x + self
            .attn
            .forward(config, &normed, mask, cos, sin, pass, cache)?)?;
        let normed = rms_norm(&x, &self.post_attention_layernorm, eps)?;
        let gate = self.mlp.gate.forward(&normed, pass)?.silu()?;
        let up = self.mlp.up.forward(&normed, pass)?;
        Ok((&x + self.mlp.down.forward(&(gate * up)?, pass)?)?)
    }
}

/// A Llama-family causal LM with frozen base weights and optional LoRA adapters.
pub struct LlamaModel {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: FrozenLinear,
    inv_freq: Tensor,
    policy: Option<Arc<LoraAdapter>>,
    reference: Option<Arc<LoraAdapter>>,
    training: bool,
    checkpointing: bool,
    checkpoint_grads: SideGrads,
    dropout: DropoutSource,
    logits_chunk_elements: usize,
}

impl LlamaModel {
    /// Loads the base weights of `checkpoint` in `dtype` on `device` (memory-mapped; one copy on the device).
    pub fn load(checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let vb = checkpoint.var_builder(dtype, device)?;
        Self::from_var_builder(checkpoint.config.clone(), vb)
            .with_context(|| format!("loading the weights of {}", checkpoint.dir.display()))
    }

    pub fn from_var_builder(config: ModelConfig, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let h = config.hidden_size;
        let model_vb = vb.pp("model");
        let embed_tokens = model_vb
            .pp("embed_tokens")
            .get((config.vocab_size, h), "weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let lvb = model_vb.pp(format!("layers.{index}"));
            let avb = lvb.pp("self_attn");
            let mvb = lvb.pp("mlp");
            let lin = |vb: &VarBuilder, target: LoraTarget, bias: bool| {
                AdaptedLinear::load(vb, &config, (index, target), bias)
            };
            layers.push(DecoderLayer {
                input_layernorm: lvb.pp("input_layernorm").get(h, "weight")?,
                attn: Attention {
                    q: lin(&avb, LoraTarget::Q, config.qkv_bias)?,
                    k: lin(&avb, LoraTarget::K, config.qkv_bias)?,
                    v: lin(&avb, LoraTarget::V, config.qkv_bias)?,
                    o: lin(&avb, LoraTarget::O, config.o_bias)?,
                },
                post_attention_layernorm: lvb.pp("post_attention_layernorm").get(h, "weight")?,
                mlp: Mlp {
                    gate: lin(&mvb, LoraTarget::Gate, config.mlp_bias)?,
                    up: lin(&mvb, LoraTarget::Up, config.mlp_bias)?,
                    down: lin(&mvb, LoraTarget::Down, config.mlp_bias)?,
                },
            });
        }
        let norm = model_vb.pp("norm").get(h, "weight")?;
        let lm_head_weight = if config.tie_word_embeddings && !vb.contains_tensor("lm_head.weight")
        {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head").get((config.vocab_size, h), "weight")?
        };
        let inv_freq = Tensor::new(config.rope_inv_freq(), &device)?;
        let dropout = DropoutSource::new(0, &device)?;
        Ok(Self {
            lm_head: FrozenLinear::new(lm_head_weight, None)?,
            config,
            device,
            dtype,
            embed_tokens,
            layers,
            norm,
            inv_freq,
            policy: None,
            reference: None,
            training: false,
            checkpointing: false,
            checkpoint_grads: SideGrads::default(),
            dropout,
            logits_chunk_elements: crate::logprobs::DEFAULT_LOGITS_CHUNK_ELEMENTS,
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

    /// Gradient checkpointing: policy passes with gradient keep only each decoder layer's input and recompute the
    /// layer in backward (about one extra forward of compute for a fraction of the memory). The LoRA gradients then
    /// come out of [`LlamaModel::backward`], which must be used instead of `Tensor::backward`.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
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

    /// Bounds the f32 logits of one log-prob chunk (tokens × vocabulary); smaller saves memory, larger saves launches.
    pub fn set_logits_chunk_elements(&mut self, elements: usize) {
        self.logits_chunk_elements = elements.max(1);
    }

    pub(crate) fn logits_chunk_elements(&self) -> usize {
        self.logits_chunk_elements
    }

    pub(crate) fn lm_head(&self) -> &FrozenLinear {
        &self.lm_head
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
        let mask = self.attention_mask(lengths, width, 0)?;
        self.run_layers(input_ids, &mask, 0, pass, None)
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
        let mask = self.attention_mask(&[offset + n], n, offset)?;
        let hidden = self.run_layers(input_ids, &mask, offset, pass, Some(cache))?;
        let last = hidden.narrow(1, n - 1, 1)?.flatten_all()?;
        Ok(self
            .lm_head
            .forward(&last.unsqueeze(0)?)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }

    fn run_layers(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        offset: usize,
        pass: Pass,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (rows, width) = input_ids.dims2()?;
        let ids = input_ids.to_device(&self.device)?.flatten_all()?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.reshape((
            rows,
            width,
            self.config.hidden_size,
        ))?;
        let (cos, sin) = self.rope_tables(offset, width)?;
        let checkpointed = pass.grad && self.checkpointing && cache.is_none();
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
                    [mask.clone(), cos.clone(), sin.clone()],
                    seed,
                    self.checkpoint_grads.clone(),
                );
                op.apply(&x)?
            } else {
                let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[index]);
                layer.forward(&self.config, &x, mask, &cos, &sin, pass, layer_cache)?
            };
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// cos and sin [width, head_dim] for positions `offset..offset + width`, in the model dtype.
    fn rope_tables(&self, offset: usize, width: usize) -> Result<(Tensor, Tensor)> {
        let positions: Vec<f32> = (offset..offset + width).map(|p| p as f32).collect();
        let positions = Tensor::new(positions, &self.device)?.unsqueeze(1)?;
        let freqs = positions.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], 1)?;
        Ok((
            emb.cos()?.to_dtype(self.dtype)?,
            emb.sin()?.to_dtype(self.dtype)?,
        ))
    }

    /// Additive f32 mask [rows, 1, width, offset + width]: 0 where query i may see key j (causal, j a real token,
    /// inside the sliding window), -inf elsewhere.
    fn attention_mask(&self, lengths: &[usize], width: usize, offset: usize) -> Result<Tensor> {
        let keys = offset + width;
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let mut mask = Vec::with_capacity(lengths.len() * width * keys);
        for &len in lengths {
            for i in 0..width {
                let qpos = offset + i;
                for j in 0..keys {
                    let visible = j <= qpos && j < len.max(1) && qpos - j < window;
                    mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        Ok(Tensor::from_vec(
            mask,
            (lengths.len(), 1, width, keys),
            &self.device,
        )?)
    }
}

/// RMSNorm in f32 (as transformers computes it), scaled by `weight` in the input dtype.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// transformers' rotate-half RoPE: `x cos + rotate_half(x) sin`, x [rows, heads, width, head_dim].
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.unsqueeze(0)?.unsqueeze(0)?;
    let sin = sin.unsqueeze(0)?.unsqueeze(0)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// [rows, kv_heads, n, d] → [rows, kv_heads · n_rep, n, d], each KV head repeated for its group of query heads.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (rows, kv_heads, n, d) = x.dims4()?;
    Ok(Tensor::cat(&vec![x; n_rep], 2)?.reshape((rows, kv_heads * n_rep, n, d))?)
}
