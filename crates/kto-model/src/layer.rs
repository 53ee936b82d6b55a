//! One Llama decoder layer on the fused ops of `kto-kernels`.
//!
//! Shaped like candle-transformers' `models/llama.rs`, with these differences, all for training speed and memory:
//! the linears that read the same input run as one GEMM over weights concatenated at load (`q|k|v`, `gate|up`), each
//! followed by the LoRA epilogue (`base + scale · h·Bᵀ` in f32, one rounding, PEFT's semantics) in the same op, so
//! the base output is not kept for backward; RMSNorm, RoPE (which also moves q and k into the attention layout),
//! SwiGLU and attention are single ops with their own backward, so autograd keeps their inputs and nothing of their
//! insides. Base weights are frozen ([`FrozenLinear`]: no weight
//! gradient is computed).

use crate::base_weights::BaseWeights;
use crate::config::ModelConfig;
use crate::frozen_linear::{FrozenLinear, FrozenWeight};
use crate::lora::{DropoutSource, LoraAdapter, LoraTarget};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use kto_kernels::attention::{attention, AttentionMask};
use std::sync::Arc;

/// Per-call settings resolved from an `AdapterChoice`.
#[derive(Clone, Copy)]
pub(crate) struct Pass<'a> {
    pub(crate) adapter: Option<&'a LoraAdapter>,
    pub(crate) grad: bool,
    pub(crate) dropout: Option<&'a DropoutSource>,
}

/// What every layer of one forward shares: which keys each query sees, and the rotary positions.
#[derive(Debug, Clone)]
pub(crate) struct LayerContext {
    pub(crate) mask: AttentionMask,
    /// u32 [rows, tokens].
    pub(crate) positions: Tensor,
    /// f32 [head_dim / 2].
    pub(crate) inv_freq: Tensor,
    /// Attention block by block (a one-row layout on a dense attention): the query and key ranges of each block
    /// and its own mask; `None` runs the whole row under `mask`.
    pub(crate) segments: Option<Arc<Vec<AttentionSegment>>>,
}

/// One block of [`LayerContext::segments`].
#[derive(Debug)]
pub(crate) struct AttentionSegment {
    pub(crate) queries: std::ops::Range<usize>,
    pub(crate) keys: std::ops::Range<usize>,
    pub(crate) mask: AttentionMask,
}

/// What a layer's attention does with keys and values besides using them.
pub(crate) enum LayerKv<'a> {
    /// Nothing: the pass's own keys are all there is.
    Own,
    /// Generation: earlier positions' keys and values come first, and the slot is extended with this call's.
    Cache(&'a mut Option<(Tensor, Tensor)>),
    /// Keep this pass's keys and values, detached and flattened to one row [1, kv_heads, rows · tokens, d], for a
    /// continuation ([`crate::kl_continuation`]).
    Capture(&'a mut Option<(Tensor, Tensor)>),
    /// A continuation: attention reads `index_select(cat(prefix, own), gather)` along the token axis.
    Continue {
        prefix: &'a (Tensor, Tensor),
        gather: &'a Tensor,
    },
}

/// `[rows, kv_heads, tokens, d]` → `[1, kv_heads, rows · tokens, d]`, detached.
fn one_row(t: &Tensor) -> Result<Tensor> {
    let (rows, heads, tokens, d) = t.dims4()?;
    let t = t.detach();
    Ok(if rows == 1 {
        t
    } else {
        t.transpose(0, 1)?
            .contiguous()?
            .reshape((1, heads, rows * tokens, d))?
    })
}

/// Linears of one layer that read the same input, as one GEMM over their concatenated frozen weights, plus the
/// LoRA update of whichever of them the pass's adapter targets.
#[derive(Debug, Clone)]
pub(crate) struct FusedLinear {
    layer: usize,
    base: FrozenLinear,
    /// The modules in column order: (module, first output column, output columns).
    modules: Vec<(LoraTarget, usize, usize)>,
}

impl FusedLinear {
    fn load(
        vb: &BaseWeights,
        config: &ModelConfig,
        layer: usize,
        targets: &[LoraTarget],
        bias: bool,
    ) -> Result<Self> {
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        let mut modules = Vec::new();
        let mut column = 0;
        for &target in targets {
            let (fan_in, fan_out) = target.shape(config);
            let module = vb.pp(target.module_name());
            weights.push(module.matrix("weight", (fan_out, fan_in))?);
            if bias {
                biases.push(module.dense("bias", fan_out)?);
            }
            modules.push((target, column, fan_out));
            column += fan_out;
        }
        // One copy of the weights, concatenated (the per-module tensors are dropped: no second copy in memory).
        let weight = FrozenWeight::stack_rows(weights)?;
        let bias = match biases.len() {
            0 => None,
            1 => Some(biases.remove(0)),
            _ => Some(Tensor::cat(&biases, 0)?),
        };
        Ok(Self {
            layer,
            base: FrozenLinear::from_weight(weight, bias)?,
            modules,
        })
    }

    /// `x` [..., in] → [..., Σ out]: the base GEMM, then for adapted modules `+ scale · (dropout(x) Aᵀ) Bᵀ` in f32.
    /// The q|k|v (and gate|up) LoRA inputs share one `x·Aᵀ` GEMM over the stacked `A`s when dropout is off (TRL's
    /// default); with dropout each module draws its own mask, in module order, as separate linears would.
    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let Some(adapter) = pass.adapter else {
            return Ok(self.base.forward(x)?);
        };
        let pairs: Vec<_> = self
            .modules
            .iter()
            .map(|&(target, _, _)| adapter.pair((self.layer, target)))
            .collect();
        if pairs.iter().all(Option::is_none) {
            return Ok(self.base.forward(x)?);
        }
        let config = adapter.config();
        let r = config.r;
        let fan_in = *x
            .dims()
            .last()
            .context("a linear input has no feature dimension")?;
        let rows = x.elem_count() / fan_in.max(1);
        let device = x.device();
        let var = |v: &candle_core::Var| {
            if pass.grad {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            }
        };
        // A module without an adapter contributes zero columns of h and zero rows of B.
        let mut a_rows = Vec::with_capacity(pairs.len());
        let mut b_rows = Vec::with_capacity(pairs.len());
        for (pair, &(_, _, fan_out)) in pairs.iter().zip(&self.modules) {
            match pair {
                Some(pair) => {
                    a_rows.push(var(&pair.a));
                    b_rows.push(var(&pair.b));
                }
                None => {
                    a_rows.push(Tensor::zeros((r, fan_in), DType::F32, device)?);
                    b_rows.push(Tensor::zeros((fan_out, r), DType::F32, device)?);
                }
            }
        }
        // PEFT casts the LoRA input to the adapter's dtype (f32).
        let x32 = x.to_dtype(DType::F32)?.reshape((rows, fan_in))?;
        let h = match pass.dropout.filter(|_| config.dropout > 0.0) {
            None => x32.matmul(&cat(&a_rows, 0)?.t()?)?,
            Some(source) => {
                let mut parts = Vec::with_capacity(pairs.len());
                for (pair, a) in pairs.iter().zip(&a_rows) {
                    parts.push(if pair.is_some() {
                        let mask = source.keep_mask(&[rows, fan_in], config.dropout, device)?;
                        (&x32 * mask)?.matmul(&a.t()?)?
                    } else {
                        Tensor::zeros((rows, r), DType::F32, device)?
                    });
                }
                cat(&parts, 1)?
            }
        };
        let starts: Vec<usize> = self.modules.iter().map(|&(_, start, _)| start).collect();
        // The base product and the epilogue as one op: the base output is not kept for backward.
        Ok(self
            .base
            .forward_with_lora(x, &h, &cat(&b_rows, 0)?, &starts, config.scale())?)
    }
}

fn cat(parts: &[Tensor], dim: usize) -> Result<Tensor> {
    Ok(if parts.len() == 1 {
        parts[0].clone()
    } else {
        Tensor::cat(parts, dim)?
    })
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: FusedLinear,
    o: FusedLinear,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: FusedLinear,
    down: FusedLinear,
}

#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    input_layernorm: Tensor,
    attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

impl Attention {
    fn forward(
        &self,
        c: &ModelConfig,
        x: &Tensor,
        context: &LayerContext,
        pass: Pass,
        kv: LayerKv,
    ) -> Result<Tensor> {
        let (rows, width, _) = x.dims3()?;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let qkv = self
            .qkv
            .forward(x, pass)?
            .reshape((rows, width, heads + 2 * kv_heads, d))?;
        // RoPE reads q and k straight from the fused output and writes them in [rows, heads, tokens, d].
        let rope = |first: usize, n: usize| {
            kto_kernels::rope::rope(
                &qkv.narrow(2, first, n)?,
                &context.positions,
                &context.inv_freq,
            )
        };
        let q = rope(0, heads)?;
        let mut k = rope(heads, kv_heads)?;
        let mut v = qkv
            .narrow(2, heads + kv_heads, kv_heads)?
            .transpose(1, 2)?
            .contiguous()?;
        match kv {
            LayerKv::Own => {}
            LayerKv::Cache(slot) => {
                if let Some((k_old, v_old)) = slot.as_ref() {
                    k = Tensor::cat(&[k_old, &k], 2)?;
                    v = Tensor::cat(&[v_old, &v], 2)?;
                }
                *slot = Some((k.clone(), v.clone()));
            }
            LayerKv::Capture(slot) => *slot = Some((one_row(&k)?, one_row(&v)?)),
            LayerKv::Continue { prefix, gather } => {
                k = Tensor::cat(&[&prefix.0, &k], 2)?.index_select(gather, 2)?;
                v = Tensor::cat(&[&prefix.1, &v], 2)?.index_select(gather, 2)?;
            }
        }
        let scale = 1.0 / (d as f64).sqrt();
        let out = match context.segments.as_deref() {
            None => attention(&q, &k, &v, &context.mask, scale)?,
            Some(segments) => {
                let part = |t: &Tensor, range: &std::ops::Range<usize>| {
                    t.narrow(2, range.start, range.len())?.contiguous()
                };
                let mut parts = Vec::with_capacity(segments.len());
                for s in segments.iter().filter(|s| !s.queries.is_empty()) {
                    parts.push(attention(
                        &part(&q, &s.queries)?,
                        &part(&k, &s.keys)?,
                        &part(&v, &s.keys)?,
                        &s.mask,
                        scale,
                    )?);
                }
                Tensor::cat(&parts, 2)?
            }
        };
        let out = out.transpose(1, 2)?.reshape((rows, width, heads * d))?;
        self.o.forward(&out, pass)
    }
}

impl DecoderLayer {
    pub(crate) fn load(vb: &BaseWeights, config: &ModelConfig, index: usize) -> Result<Self> {
        let h = config.hidden_size;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        use LoraTarget::*;
        Ok(Self {
            input_layernorm: vb.pp("input_layernorm").dense("weight", h)?,
            attn: Attention {
                qkv: FusedLinear::load(&attn, config, index, &[Q, K, V], config.qkv_bias)?,
                o: FusedLinear::load(&attn, config, index, &[O], config.o_bias)?,
            },
            post_attention_layernorm: vb.pp("post_attention_layernorm").dense("weight", h)?,
            mlp: Mlp {
                gate_up: FusedLinear::load(&mlp, config, index, &[Gate, Up], config.mlp_bias)?,
                down: FusedLinear::load(&mlp, config, index, &[Down], config.mlp_bias)?,
            },
        })
    }

    /// Bytes of the layer's frozen weights in memory.
    pub(crate) fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let linear =
            |l: &FusedLinear| l.base.weight().storage_bytes() + l.base.bias().map_or(0, dense);
        dense(&self.input_layernorm)
            + dense(&self.post_attention_layernorm)
            + linear(&self.attn.qkv)
            + linear(&self.attn.o)
            + linear(&self.mlp.gate_up)
            + linear(&self.mlp.down)
    }

    /// Pre-norm attention and MLP, each added to the residual stream.
    pub(crate) fn forward(
        &self,
        config: &ModelConfig,
        x: &Tensor,
        context: &LayerContext,
        pass: Pass,
        kv: LayerKv,
    ) -> Result<Tensor> {
        let eps = config.rms_norm_eps;
        let normed = kto_kernels::rmsnorm::rms_norm(x, &self.input_layernorm, eps)?;
        let x = (x + self.attn.forward(config, &normed, context, pass, kv)?)?;
        let normed = kto_kernels::rmsnorm::rms_norm(&x, &self.post_attention_layernorm, eps)?;
        let gate_up = self.mlp.gate_up.forward(&normed, pass)?;
        let hidden = kto_kernels::swiglu::swiglu(&gate_up)?;
        Ok((&x + self.mlp.down.forward(&hidden, pass)?)?)
    }
}
