//! The model's fused operations, each with a backward pass.
//!
//! candle-nn's fused ops (`rms_norm`, `rope`, `softmax_last_dim`, …) have no backward: a
//! model built from them trains only its embedding, silently. Every op here therefore comes
//! in two forms with the same maths:
//! * on the CPU, a custom op whose forward and backward are plain Rust loops spread over
//!   rayon (candle's own element-wise CPU ops run on one thread, which made the backward the
//!   bottleneck of a training step), their inner loops compiled for AVX-512 and AVX2 as well
//!   as the baseline and picked at run time (`cpu::multiversion!`), and their products
//!   through `gemm`;
//! * elsewhere (CUDA), a composition of differentiable candle primitives.
//!
//! Tests check both forms against each other and against PyTorch (`tests/policy_*`).

pub(crate) mod amx;
mod attention;
mod attention_blocked;
mod attention_cached;
mod bf16_dot;
mod bf16_few_rows;
pub(crate) mod cpu;
mod linear;
mod logprob;
pub(crate) mod precomputed;
mod rms_norm;
mod rope;
pub(crate) mod small_matmul;
mod softmax;
mod swiglu;

pub(crate) use attention::attention_segments;
pub use attention::{KeyRanges, attention, attention_heads};
pub(crate) use attention_cached::Segment;
pub(crate) use cpu::add_to_product;
pub use linear::{linear, linear_residual};
pub use logprob::{lm_head_logprobs, token_logprobs_entropy};
pub use rms_norm::rms_norm;
pub use rope::{RopePositions, RopeTables, rope_to_heads};
pub use softmax::{AttentionMask, masked_softmax};
pub use swiglu::swiglu;

/// Which implementation the ops use. `Auto` picks the fused CPU kernels on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OpsMode {
    #[default]
    Auto,
    /// Differentiable candle primitives only (the CUDA path; also a cross-check on the CPU).
    Composite,
}

impl OpsMode {
    pub(crate) fn fused(self, t: &candle_core::Tensor) -> bool {
        self == OpsMode::Auto
            && t.device().is_cpu()
            && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    }
}
