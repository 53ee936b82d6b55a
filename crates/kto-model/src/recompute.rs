//! Gradient checkpointing of decoder layers.
//!
//! A checkpointed layer enters the autograd graph as one custom op over its input: the forward runs the layer with
//! no graph, and the backward reruns it with one and backpropagates the incoming gradient through it. A custom op
//! can only return gradients for its inputs, so the LoRA gradients found there go to [`SideGrads`], which
//! [`crate::LlamaModel::backward`] merges into the returned `GradStore`. LoRA dropout is replayed exactly: each
//! layer call owns a seed, and the recompute reseeds its dropout source with it.

use crate::config::ModelConfig;
use crate::layer::{DecoderLayer, LayerContext, LayerKv, Pass};
use crate::lora::{DropoutSource, LoraAdapter};
use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor,
    TensorId, Var,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// LoRA gradients produced inside checkpointed layers during one backward, keyed by the `Var`'s tensor id.
#[derive(Debug, Clone, Default)]
pub struct SideGrads(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl SideGrads {
    fn add(&self, id: TensorId, grad: Tensor) -> Result<()> {
        let mut map = self.0.lock().expect("side gradients poisoned");
        let sum = match map.remove(&id) {
            Some(previous) => (previous + grad)?,
            None => grad,
        };
        map.insert(id, sum);
        Ok(())
    }

    pub fn clear(&self) {
        self.0.lock().expect("side gradients poisoned").clear();
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().expect("side gradients poisoned").is_empty()
    }

    /// Moves every gradient into `grads`, adding to what is there.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let drained: Vec<(TensorId, Tensor)> = self
            .0
            .lock()
            .expect("side gradients poisoned")
            .drain()
            .collect();
        for (id, grad) in drained {
            let sum = match grads.get_id(id) {
                Some(existing) => (existing + grad)?,
                None => grad,
            };
            grads.insert_id(id, sum);
        }
        Ok(())
    }
}

/// One decoder layer as a custom op over its input hidden states.
pub struct RecomputedLayer {
    layer: DecoderLayer,
    config: ModelConfig,
    adapter: Option<Arc<LoraAdapter>>,
    /// The mask and rotary positions every layer of the forward shares.
    context: LayerContext,
    dropout_seed: Option<u64>,
    side_grads: SideGrads,
    out: Mutex<Option<Tensor>>,
}

impl RecomputedLayer {
    pub(crate) fn new(
        layer: DecoderLayer,
        config: ModelConfig,
        adapter: Option<Arc<LoraAdapter>>,
        context: LayerContext,
        dropout_seed: Option<u64>,
        side_grads: SideGrads,
    ) -> Self {
        Self {
            layer,
            config,
            adapter,
            context,
            dropout_seed,
            side_grads,
            out: Mutex::new(None),
        }
    }

    /// Runs the layer on `x` (a tracked tensor) and returns its output as a graph node over `x` only.
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        let out = self.run(&x.detach(), false)?.contiguous()?;
        *self.out.lock().expect("layer output poisoned") = Some(out);
        x.apply_op1_arc(Arc::new(Box::new(self)))
    }

    fn run(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let dropout = match self.dropout_seed {
            Some(seed) => {
                Some(DropoutSource::new(seed, x.device()).map_err(candle_core::Error::wrap)?)
            }
            None => None,
        };
        let pass = Pass {
            adapter: self.adapter.as_deref(),
            grad,
            dropout: dropout.as_ref(),
        };
        self.layer
            .forward(&self.config, x, &self.context, pass, LayerKv::Own)
            .map_err(candle_core::Error::wrap)
    }

    fn take_output(&self) -> Result<Tensor> {
        match self.out.lock().map(|mut o| o.take()) {
            Ok(Some(out)) => Ok(out),
            _ => bail!("recomputed-layer: forward ran twice"),
        }
    }
}

macro_rules! hand_over_output {
    ($self:ident, $variant:ident) => {{
        let out = $self.take_output()?;
        let (storage, layout) = out.storage_and_layout();
        let Storage::$variant(s) = &*storage else {
            bail!("recomputed-layer: output on another device");
        };
        Ok((s.try_clone(layout)?, out.shape().clone()))
    }};
}

impl CustomOp1 for RecomputedLayer {
    fn name(&self) -> &'static str {
        "recomputed-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        hand_over_output!(self, Cpu)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        hand_over_output!(self, Cuda)
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        hand_over_output!(self, Metal)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&x.detach())?;
        let out = self.run(x.as_tensor(), true)?;
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        if let Some(adapter) = &self.adapter {
            for (_, var) in adapter.trainable_vars() {
                if let Some(g) = grads.get(var.as_tensor()) {
                    self.side_grads.add(var.as_tensor().id(), g.clone())?;
                }
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}
