//! Layer-wise activation checkpointing: a differentiable forward keeps only each layer's
//! input, and the backward reruns one layer at a time under autograd to get its gradients.
//!
//! candle has no checkpointing, and a custom op hands gradients back only to its own
//! inputs. A checkpointed layer is therefore a custom op on the layer's input `x` and on a
//! one-element "tie" tensor that carries the layer's weights into the graph: the tie is a
//! chain of ops, one per weight, each taking the weight and the previous link. The graph
//! thus runs loss → layer op → tie chain → weights, so candle's backward reaches the layer
//! op before the ties: the layer op's backward reruns the layer on a fresh variable copy of
//! `x` with the trainable weights, backpropagates the output's gradient through that small
//! graph, returns the gradient of `x` and leaves the weights' gradients in a slot the tie
//! ops then hand to their weights. Only one layer's activations are alive at a time.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor, Var, bail};

use super::model::{Layer, LayerEnv};
use super::ops::precomputed::Precomputed;

/// The weights' gradients of one layer, filled by the layer op's backward.
type Slots = Arc<Mutex<Vec<Option<Tensor>>>>;

/// `env.layer(train, x)` with only `x` kept for the backward. `infer` holds the same weights
/// detached (the forward builds no graph); `train` the trainable ones.
pub(super) fn layer(env: &LayerEnv, infer: &Layer, train: &Layer, x: &Tensor) -> Result<Tensor> {
    let out = env.layer(infer, &x.detach(), None)?;
    let slots: Slots = Arc::new(Mutex::new(vec![None; train.tensors().len()]));
    let zero = Tensor::zeros(1, x.dtype(), x.device())?;
    let mut tie = zero.clone();
    for (i, w) in train.tensors().into_iter().enumerate() {
        tie = w.apply_op2(
            &tie,
            Tie {
                slot: i,
                slots: slots.clone(),
                zero: Precomputed::new(&zero)?,
            },
        )?;
    }
    x.apply_op2(
        &tie,
        Checkpointed {
            env: env.clone(),
            train: train.clone(),
            out: Precomputed::new(&out)?,
            slots,
        },
    )
}

struct Checkpointed {
    env: LayerEnv,
    train: Layer,
    out: Precomputed,
    slots: Slots,
}

impl CustomOp2 for Checkpointed {
    fn name(&self) -> &'static str {
        "selfplay-checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        tie: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = self.env.layer(&self.train, xv.as_tensor(), None)?;
        // d/dy Σ y ⊙ g = g: the layer's backward seeded with the output's gradient.
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let dx = grads.get(xv.as_tensor()).cloned().ok_or_else(|| {
            candle_core::Error::Msg("checkpointed layer: no input gradient".into())
        })?;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for (slot, w) in slots.iter_mut().zip(self.train.tensors()) {
            *slot = grads.get(w).cloned();
        }
        Ok((Some(dx), Some(tie.zeros_like()?)))
    }
}

/// One link of the chain that ties a layer's weights to its checkpointed op.
struct Tie {
    slot: usize,
    slots: Slots,
    zero: Precomputed,
}

impl CustomOp2 for Tie {
    fn name(&self) -> &'static str {
        "selfplay-checkpoint-tie"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.zero.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.zero.cuda()
    }

    fn bwd(
        &self,
        w: &Tensor,
        prev: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(self.slot)
            .and_then(Option::take);
        let Some(g) = g else {
            bail!(
                "checkpointed layer: weight {} got no gradient from its layer",
                self.slot
            )
        };
        if g.shape() != w.shape() {
            bail!(
                "checkpointed layer: gradient {:?} for weight {:?}",
                g.dims(),
                w.dims()
            );
        }
        Ok((Some(g), Some(prev.zeros_like()?)))
    }
}
