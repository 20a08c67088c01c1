//! Data parallelism: the collective operations that join the workers of one update (one per
//! GPU), behind [`AllReduce`]. Each worker runs forward and backward on its shard of the
//! batch; the token count the loss divides by and the summed gradients are all-reduced, and
//! every worker then applies the same AdamW update to its own replica.
//!
//! [`SingleWorker`] is the identity (one device). [`InProcessAllReduce`] joins threads of one
//! process (one worker per simulated device on the CPU); it is what the CPU tests of the
//! reduction logic run. Between CUDA devices the `cuda` build uses NCCL (`nccl.rs`), which has
//! not yet run on a machine with several GPUs.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::Tensor;

use super::GrpoError;

/// Collective operations over the workers of one data-parallel update. Every worker calls
/// the same operations in the same order; each call returns once all have contributed, and
/// every worker gets the same result.
pub trait AllReduce: Send + Sync {
    /// Number of workers.
    fn world_size(&self) -> usize;
    /// Elementwise sum of `values` over the workers, in place.
    fn sum(&self, values: &mut [f64]) -> Result<(), GrpoError>;
    /// Elementwise maximum of `values` over the workers, in place.
    fn max(&self, values: &mut [f64]) -> Result<(), GrpoError>;
    /// Elementwise sums of `tensors` over the workers (same shapes and dtypes on every worker),
    /// on the devices of `tensors`.
    fn sum_tensors(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, GrpoError>;
}

/// One worker: every reduction is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleWorker;

impl AllReduce for SingleWorker {
    fn world_size(&self) -> usize {
        1
    }
    fn sum(&self, _: &mut [f64]) -> Result<(), GrpoError> {
        Ok(())
    }
    fn max(&self, _: &mut [f64]) -> Result<(), GrpoError> {
        Ok(())
    }
    fn sum_tensors(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, GrpoError> {
        Ok(tensors.to_vec())
    }
}

enum Contribution {
    Empty,
    Scalars(Vec<f64>),
    Tensors(Vec<Tensor>),
}

struct Shared {
    slots: Mutex<Vec<Contribution>>,
    barrier: Barrier,
}

/// The workers of one process, each on its own thread: [`InProcessAllReduce::group`] gives
/// one handle per worker. Each reduction adds the contributions in worker order, so every
/// worker gets bit-identical results and the replicas stay identical.
pub struct InProcessAllReduce {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl InProcessAllReduce {
    /// Handles for `size` workers (ranks 0..size), to be moved one to each worker thread.
    pub fn group(size: usize) -> Vec<Self> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            slots: Mutex::new((0..size).map(|_| Contribution::Empty).collect()),
            barrier: Barrier::new(size),
        });
        (0..size)
            .map(|rank| Self {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Publishes this worker's contribution, waits for all, folds them in rank order with
    /// `fold`, and waits again so that no worker overwrites its slot before all have read.
    fn exchange<R>(
        &self,
        mine: Contribution,
        fold: impl FnOnce(&[Contribution]) -> Result<R, GrpoError>,
    ) -> Result<R, GrpoError> {
        {
            let mut slots = self.lock();
            slots[self.rank] = mine;
        }
        self.shared.barrier.wait();
        let result = {
            let slots = self.lock();
            fold(&slots)
        };
        self.shared.barrier.wait();
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Contribution>> {
        self.shared.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn scalars(&self, values: &mut [f64], op: impl Fn(f64, f64) -> f64) -> Result<(), GrpoError> {
        let folded = self.exchange(Contribution::Scalars(values.to_vec()), |slots| {
            let mut out: Option<Vec<f64>> = None;
            for (rank, c) in slots.iter().enumerate() {
                let Contribution::Scalars(v) = c else {
                    return Err(mismatch(rank));
                };
                match &mut out {
                    None => out = Some(v.clone()),
                    Some(acc) if acc.len() == v.len() => {
                        acc.iter_mut().zip(v).for_each(|(a, &b)| *a = op(*a, b));
                    }
                    Some(acc) => {
                        return Err(GrpoError::Reduce(format!(
                            "worker {rank} reduces {} values, worker 0 {}",
                            v.len(),
                            acc.len()
                        )));
                    }
                }
            }
            Ok(out.unwrap_or_default())
        })?;
        values.copy_from_slice(&folded);
        Ok(())
    }
}

fn mismatch(rank: usize) -> GrpoError {
    GrpoError::Reduce(format!(
        "worker {rank} made a different collective call from the others"
    ))
}

impl AllReduce for InProcessAllReduce {
    fn world_size(&self) -> usize {
        self.size
    }

    fn sum(&self, values: &mut [f64]) -> Result<(), GrpoError> {
        self.scalars(values, |a, b| a + b)
    }

    fn max(&self, values: &mut [f64]) -> Result<(), GrpoError> {
        self.scalars(values, f64::max)
    }

    fn sum_tensors(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>, GrpoError> {
        self.exchange(Contribution::Tensors(tensors.to_vec()), |slots| {
            let mut out: Vec<Tensor> = Vec::with_capacity(tensors.len());
            for (rank, c) in slots.iter().enumerate() {
                let Contribution::Tensors(ts) = c else {
                    return Err(mismatch(rank));
                };
                if ts.len() != tensors.len() {
                    return Err(GrpoError::Reduce(format!(
                        "worker {rank} reduces {} tensors, this worker {}",
                        ts.len(),
                        tensors.len()
                    )));
                }
                if rank == 0 {
                    for (t, mine) in ts.iter().zip(tensors) {
                        out.push(t.to_device(mine.device())?);
                    }
                } else {
                    for (acc, t) in out.iter_mut().zip(ts) {
                        if acc.shape() != t.shape() || acc.dtype() != t.dtype() {
                            return Err(GrpoError::Reduce(format!(
                                "worker {rank} reduces a {:?} {:?} tensor against {:?} {:?}",
                                t.dims(),
                                t.dtype(),
                                acc.dims(),
                                acc.dtype()
                            )));
                        }
                        *acc = (&*acc + t.to_device(acc.device())?)?;
                    }
                }
            }
            Ok(out)
        })
    }
}
