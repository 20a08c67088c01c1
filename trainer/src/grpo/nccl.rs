//! [`AllReduce`] between the CUDA devices of one process with NCCL (candle's `nccl` feature,
//! part of the `cuda` build): one communicator per worker, created together on one thread
//! per device. Every worker's communicator runs on its device's candle stream, so a
//! reduction is ordered after the backward that made the gradients and before the update
//! that reads them, with no extra synchronisation.
//!
//! Compiled in the `cuda` build only; it has not yet run on a machine with several GPUs (the
//! operator refuses `trainer.gpus > 1` until it has). The reduction logic above it is tested
//! on the CPU with [`super::InProcessAllReduce`].

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::GrpoError;
use super::parallel::AllReduce;

/// An NCCL communicator. NCCL lets a communicator be used from any thread as long as two
/// calls on it never run at once; the mutex in [`NcclAllReduce`] makes sure of that.
struct SendComm(Comm);

// SAFETY: see above; the raw communicator is only ever used under the mutex.
unsafe impl Send for SendComm {}

/// One worker's handle: rank `rank` of `size`, on `device`.
pub struct NcclAllReduce {
    comm: Arc<Mutex<SendComm>>,
    device: Device,
    size: usize,
}

fn nccl(e: impl std::fmt::Debug) -> GrpoError {
    GrpoError::Reduce(format!("NCCL: {e:?}"))
}

impl NcclAllReduce {
    /// One handle per device, rank i on `devices[i]` (all CUDA). NCCL's initialisation
    /// blocks until every rank has joined, so each rank joins from its own thread.
    pub fn group(devices: &[Device]) -> Result<Vec<Self>, GrpoError> {
        let id = Id::new().map_err(nccl)?;
        let size = devices.len();
        std::thread::scope(|scope| {
            let joins: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(rank, device)| {
                    scope.spawn(move || {
                        let stream = device.as_cuda_device()?.cuda_stream();
                        stream.context().bind_to_thread().map_err(nccl)?;
                        let comm = Comm::from_rank(stream, rank, size, id).map_err(nccl)?;
                        Ok(Self {
                            comm: Arc::new(Mutex::new(SendComm(comm))),
                            device: device.clone(),
                            size,
                        })
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(GrpoError::Reduce("NCCL initialisation panicked".into()))
                    })
                })
                .collect()
        })
    }

    fn reduce(&self, t: &Tensor, op: Op) -> Result<Tensor, GrpoError> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let t = t.to_device(&self.device)?.contiguous()?;
        Ok(t.apply_op1_no_bwd(&AllReduceOp { comm: &comm.0, op })?)
    }

    fn scalars(&self, values: &mut [f64], op: Op) -> Result<(), GrpoError> {
        let t = Tensor::from_slice(values, values.len(), &self.device)?;
        let out = self.reduce(&t, op)?.to_vec1::<f64>()?;
        values.copy_from_slice(&out);
        Ok(())
    }
}

impl AllReduce for NcclAllReduce {
    fn world_size(&self) -> usize {
        self.size
    }

    fn sum(&self, values: &mut [f64]) -> Result<(), GrpoError> {
        self.scalars(values, Op::Sum)
    }

    fn max(&self, values: &mut [f64]) -> Result<(), GrpoError> {
        self.scalars(values, Op::Max)
    }

    fn sum_tensors(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, GrpoError> {
        tensors.iter().map(|t| self.reduce(t, Op::Sum)).collect()
    }
}

#[derive(Clone, Copy)]
enum Op {
    Sum,
    Max,
}

/// An all-reduce as a candle op, so that it reads and writes candle's device buffers.
struct AllReduceOp<'a> {
    comm: &'a Comm,
    op: Op,
}

impl CustomOp1 for AllReduceOp<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("an NCCL all-reduce needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("all-reduce of a strided tensor".into()))?;
        let op = match self.op {
            Op::Sum => ReduceOp::Sum,
            Op::Max => ReduceOp::Max,
        };
        let dev = s.device.clone();
        let failed = |e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}"));
        macro_rules! all_reduce {
            ($src:expr, $t:ty) => {{
                let src = $src.slice(start..end);
                let mut dst = dev.alloc_zeros::<$t>(end - start)?;
                self.comm.all_reduce(&src, &mut dst, &op).map_err(failed)?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        let out = match &s.slice {
            CudaStorageSlice::F32(src) => all_reduce!(src, f32),
            CudaStorageSlice::F64(src) => all_reduce!(src, f64),
            _ => candle_core::bail!("NCCL all-reduce of an unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }
}
