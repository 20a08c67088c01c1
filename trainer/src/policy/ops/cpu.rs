//! Helpers of the CPU kernels: typed slices of tensors and the float trait they are generic over.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType, bail};

/// The element types the CPU kernels run on (f32 for training, f64 for gradient checks).
pub(crate) trait Real:
    num_traits::Float + num_traits::NumAssign + WithDType + Send + Sync + std::iter::Sum + 'static
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
}

impl Real for f32 {
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}

/// The contiguous elements of a custom op's input.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("selfplay op: input is not contiguous"),
    }
}

/// Runs `f` on the contiguous elements of a CPU tensor (copied first if strided).
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(slice::<T>(s, layout)?),
        _ => bail!("selfplay op: expected a CPU tensor"),
    }
}

/// The dtype-dispatch of the kernels: f32 and f64 only.
pub(crate) fn check_float(dtype: DType, op: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        d => bail!("{op}: the CPU kernels support f32 and f64, not {d:?}"),
    }
}

/// Rows per rayon task: enough work per task that scheduling stays cheap.
pub(crate) fn rows_per_task(rows: usize, row_len: usize) -> usize {
    let per_task_elems = 16 * 1024;
    (per_task_elems / row_len.max(1)).clamp(1, rows.max(1))
}
