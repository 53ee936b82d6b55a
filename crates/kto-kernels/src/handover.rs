//! A result computed before its autograd node exists, handed to the node's forward.
//!
//! Ops such as recomputed attention and token log-probs run their real forward on detached inputs (so nothing of it
//! enters the graph), then apply a custom op over the tracked inputs only to record the backward. That op's forward
//! must return the result already computed: [`HandOver`] holds it until then, and gives it up, so the graph does
//! not keep a second copy.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

pub(crate) struct HandOver {
    what: &'static str,
    value: Mutex<Option<Tensor>>,
}

impl HandOver {
    pub(crate) fn new(what: &'static str, value: Tensor) -> Self {
        Self {
            what,
            value: Mutex::new(Some(value)),
        }
    }

    fn take(&self) -> Result<Tensor> {
        match self.value.lock().map(|mut v| v.take()) {
            Ok(Some(value)) => Ok(value),
            _ => bail!("{}: the forward ran twice", self.what),
        }
    }

    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            bail!("{}: result on another device than the inputs", self.what)
        };
        Ok((s.try_clone(layout)?, value.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            bail!("{}: result on another device than the inputs", self.what)
        };
        Ok((s.try_clone(layout)?, value.shape().clone()))
    }
}
