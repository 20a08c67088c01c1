//! The output of a custom op computed beforehand with candle's primitives.
//!
//! candle has no tensor-level custom op: a `CustomOp`'s forward receives raw storages. The
//! ops that save memory by recomputing in their backward (blocked attention and LM head on
//! devices without our CPU kernels, checkpointed layers) therefore compute their forward with
//! candle's primitives on detached inputs, which builds no graph, and hand the result to a
//! custom op whose forward only copies it out: the op then joins the graph with its inputs
//! and its own backward, and nothing of the forward's intermediates stays alive.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, Result, Shape, Storage, Tensor, bail};

/// A tensor that owns exactly its storage (fresh and contiguous).
#[derive(Debug)]
pub(crate) struct Precomputed(Tensor);

impl Precomputed {
    pub(crate) fn new(t: &Tensor) -> Result<Self> {
        Ok(Self(t.detach().force_contiguous()?))
    }

    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let (s, l) = self.0.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, self.0.shape().clone())),
            _ => bail!("precomputed output: not on the CPU"),
        }
    }

    pub(crate) fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let (s, l) = self.0.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, self.0.shape().clone())),
            _ => bail!("precomputed output: not on a CUDA device"),
        }
    }
}
