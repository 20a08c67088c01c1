//! The LM head and log-probs in blocks of rows with candle's primitives, for devices
//! without the CPU kernels: the forward keeps nothing of the `(rows, vocab)` logits, the
//! backward recomputes each block's logits and turns their gradient into the hidden and head
//! gradients at once. At most one block of logits (and its few same-sized temporaries) is
//! alive at a time. The entropies are computed in the same pass from detached values and
//! returned detached: only the log-probs join the graph, so the backward has no entropy
//! term to compute.

use candle_core::{CpuStorage, CudaStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor};

use super::super::precomputed::Precomputed;

/// Logit elements per block at most: 2^25 f32 values is 128 MiB (small in tests, so that
/// they cross blocks).
const BLOCK_ELEMS: usize = if cfg!(test) { 1 << 20 } else { 1 << 25 };

fn block_rows(v: usize) -> usize {
    (BLOCK_ELEMS / v.max(1)).max(1)
}

fn work_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// One block's logits in the working dtype and their row statistics.
struct BlockStats {
    /// `z − max`, `(m, v)`
    shifted: Tensor,
    /// `log Σ exp(z − max)`, `(m, 1)`
    lse: Tensor,
}

fn block_stats(h: &Tensor, w: &Tensor, work: DType) -> Result<BlockStats> {
    let z = h.matmul(&w.t()?)?.to_dtype(work)?;
    let max = z.max_keepdim(D::Minus1)?;
    let shifted = z.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(BlockStats { shifted, lse })
}

/// `(n, 2)`: log-prob of each target and entropy, of `hidden (n, d) · headᵀ`, in f32 (f64
/// for f64 inputs); the log-probs differentiable in `hidden` and `head`, the entropies not.
pub(super) fn lm_head_logprobs(hidden: &Tensor, head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _d) = hidden.dims2()?;
    let work = work_dtype(hidden.dtype());
    let rows = block_rows(head.dim(0)?);
    let (hd, wd) = (hidden.detach(), head.detach());
    let (mut lps, mut ents) = (Vec::new(), Vec::new());
    for r0 in (0..n).step_by(rows) {
        let m = rows.min(n - r0);
        let st = block_stats(&hd.narrow(0, r0, m)?, &wd, work)?;
        let logp = st.shifted.broadcast_sub(&st.lse)?;
        let t = targets.narrow(0, r0, m)?.reshape((m, 1))?;
        lps.push(logp.gather(&t, 1)?);
        ents.push((logp.exp()? * &logp)?.sum_keepdim(D::Minus1)?.neg()?);
    }
    // f32 for half-precision inputs (f64 for f64), as `token_logprobs_entropy` returns:
    // a bf16 log-prob would quantise the GRPO ratio by 1–3%.
    let (lp, entropy) = (Tensor::cat(&lps, 0)?, Tensor::cat(&ents, 0)?);
    if !(hidden.track_op() || head.track_op()) {
        return Tensor::cat(&[&lp, &entropy], 1);
    }
    // Only the log-probs go through the op: the entropies (built from detached inputs
    // above) stay outside the graph.
    let lp = hidden.apply_op2(
        head,
        BlockedHead {
            logprobs: Precomputed::new(&lp)?,
            targets: targets.clone(),
        },
    )?;
    Tensor::cat(&[&lp, &entropy], 1)
}

/// The log-probs `(n, 1)` as an op of the hidden rows and the head, for the backward.
struct BlockedHead {
    logprobs: Precomputed,
    targets: Tensor,
}

impl CustomOp2 for BlockedHead {
    fn name(&self) -> &'static str {
        "selfplay-blocked-lm-head"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.logprobs.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.logprobs.cuda()
    }

    /// dz = g_lp·(onehot − p), block by block.
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, _d) = h.dims2()?;
        let v = w.dim(0)?;
        let work = work_dtype(h.dtype());
        let rows = block_rows(v);
        let (h, w) = (h.detach(), w.detach());
        let grad = grad.detach().to_dtype(work)?;
        let vocab = Tensor::arange(0u32, v as u32, h.device())?.reshape((1, v))?;
        let mut dhs = Vec::new();
        let mut dw = Tensor::zeros(w.shape(), work, w.device())?;
        for r0 in (0..n).step_by(rows) {
            let m = rows.min(n - r0);
            let hb = h.narrow(0, r0, m)?;
            let st = block_stats(&hb, &w, work)?;
            let logp = st.shifted.broadcast_sub(&st.lse)?;
            let p = logp.exp()?;
            let g_lp = grad.narrow(0, r0, m)?;
            let onehot = vocab
                .broadcast_eq(&self.targets.narrow(0, r0, m)?.reshape((m, 1))?)?
                .to_dtype(work)?;
            let dz = onehot
                .broadcast_sub(&p)?
                .broadcast_mul(&g_lp)?
                .to_dtype(h.dtype())?;
            dhs.push(dz.matmul(&w)?);
            dw = (dw + dz.t()?.matmul(&hb)?.to_dtype(work)?)?;
        }
        Ok((Some(Tensor::cat(&dhs, 0)?), Some(dw.to_dtype(w.dtype())?)))
    }
}
