//! The gradient all-reduce on GPUs: NCCL over the ranks of a host world (MPI), as DDP does with its NCCL backend.
//! Every collective but the device one goes to the host world; the NCCL communicator is made at the first device
//! sum, on the stream candle computes on, from a unique id that rank 0 makes and broadcasts over the host world (the
//! bootstrap NCCL's documentation describes with MPI_Bcast). A world of one rank needs no host world at all.

use std::cell::OnceCell;
use std::ffi::c_char;

use anyhow::{anyhow, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage, Tensor};
use kto_data::batch::Shard;

use crate::world::{Counted, World};

/// A host world whose device sums go through NCCL.
pub struct NcclWorld {
    hosts: Box<dyn World>,
    comm: OnceCell<Comm>,
}

impl NcclWorld {
    /// NCCL over the ranks of `hosts` (each rank on its own GPU).
    pub fn over(hosts: Box<dyn World>) -> Self {
        Self {
            hosts,
            comm: OnceCell::new(),
        }
    }

    /// The communicator on `device`'s stream, made by every rank together the first time.
    fn comm(&self, device: &CudaDevice) -> Result<&Comm> {
        if let Some(comm) = self.comm.get() {
            return Ok(comm);
        }
        let mut id = match self.hosts.is_main() {
            true => Id::new()
                .map_err(|e| anyhow!("NCCL: cannot make a unique id: {e:?}"))?
                .internal()
                .iter()
                .map(|&c| c as u8)
                .collect(),
            false => Vec::new(),
        };
        self.hosts.broadcast_bytes(&mut id)?;
        let internal: [c_char; 128] = std::array::from_fn(|i| id[i] as c_char);
        let shard = self.hosts.shard();
        let comm = Comm::from_rank(
            device.cuda_stream(),
            shard.rank,
            shard.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| {
            anyhow!(
                "NCCL: rank {} of {} cannot join the communicator: {e:?}",
                shard.rank,
                shard.world_size
            )
        })?;
        Ok(self.comm.get_or_init(|| comm))
    }
}

impl World for NcclWorld {
    fn shard(&self) -> Shard {
        self.hosts.shard()
    }

    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.hosts.sum_f32(values)
    }

    fn sum_f64(&self, values: &mut [f64], counted: Counted) -> Result<()> {
        self.hosts.sum_f64(values, counted)
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
        self.hosts.broadcast_bytes(bytes)
    }

    /// One NCCL all-reduce of the whole buffer, device to device.
    fn sum_f32_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        let Device::Cuda(device) = flat.device() else {
            return self.hosts.sum_f32_tensor(flat);
        };
        let comm = self.comm(device)?;
        let flat = flat.contiguous()?;
        let (storage, layout) = flat.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            unreachable!("a tensor on a CUDA device has CUDA storage")
        };
        let send = storage
            .as_cuda_slice::<f32>()?
            .slice(layout.start_offset()..layout.start_offset() + flat.elem_count());
        let mut sum = device.alloc_zeros::<f32>(flat.elem_count())?;
        comm.all_reduce(&send, &mut sum, &ReduceOp::Sum)
            .map_err(|e| anyhow!("NCCL all-reduce of {} floats: {e:?}", flat.elem_count()))?;
        let storage = CudaStorage::wrap_cuda_slice(sum, device.clone());
        debug_assert_eq!(storage.dtype(), candle_core::DType::F32);
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            flat.shape(),
            BackpropOp::none(),
            false,
        ))
    }
}

/// NCCL on a world of this one process (the GPU check runs the device path without a launcher).
pub fn alone() -> NcclWorld {
    NcclWorld::over(Box::new(crate::world::Alone))
}
