//! The devices a run trains on, from `spec.trainer.gpus`: 0 is the CPU, N ≥ 1 is CUDA devices
//! 0..N, one data-parallel worker each (`grpo::data_parallel`); the first also samples.
//! A run that asks for a GPU and cannot have one fails at start; it never falls back to the
//! CPU, where it would train orders of magnitude slower without anyone being told.

use candle_core::Device;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error(
        "spec.trainer.gpus is {0}, but this trainer binary was built without CUDA (cargo feature `cuda`): use a CUDA build, or set spec.trainer.gpus to 0 to train on the CPU"
    )]
    NoCudaBuild(i32),
    #[error(
        "spec.trainer.gpus is {gpus}, but no CUDA device is usable ({reason}): check the GPU and driver of this machine, or set spec.trainer.gpus to 0 to train on the CPU"
    )]
    NoCudaDevice { gpus: i32, reason: String },
    #[error("spec.trainer.gpus must not be negative, got {0}")]
    Negative(i32),
}

/// The device of rank 0 for `gpus` (`spec.trainer.gpus`): the one that samples and
/// checkpoints. Every GPU asked for must be usable ([`devices`]).
pub fn device(gpus: i32) -> Result<Device, DeviceError> {
    devices(gpus).map(|mut d| d.swap_remove(0))
}

/// One device per data-parallel worker: `[Cpu]` for 0, CUDA devices 0..`gpus` otherwise.
pub fn devices(gpus: i32) -> Result<Vec<Device>, DeviceError> {
    match gpus {
        g if g < 0 => Err(DeviceError::Negative(g)),
        0 => Ok(vec![Device::Cpu]),
        g => (0..g as usize).map(|i| cuda(g, i)).collect(),
    }
}

#[cfg(feature = "cuda")]
fn cuda(gpus: i32, ordinal: usize) -> Result<Device, DeviceError> {
    Device::new_cuda(ordinal).map_err(|e| DeviceError::NoCudaDevice {
        gpus,
        reason: format!("CUDA device {ordinal}: {e}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(gpus: i32, _: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NoCudaBuild(gpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_gpus_is_the_cpu() {
        assert!(device(0).is_ok_and(|d| d.is_cpu()));
        assert!(devices(0).is_ok_and(|d| d.len() == 1 && d[0].is_cpu()));
        assert!(matches!(device(-1), Err(DeviceError::Negative(-1))));
    }

    /// This test runs where CUDA is not built or not present: asking for a GPU must fail with
    /// a message naming the setting, not train on the CPU.
    #[test]
    #[cfg_attr(feature = "cuda", ignore = "needs a machine without a usable GPU")]
    fn asking_for_a_gpu_without_one_fails_clearly() {
        for gpus in [1, 8] {
            let err = device(gpus).expect_err("no GPU here").to_string();
            assert!(devices(gpus).is_err());
            assert!(
                err.contains(&format!("spec.trainer.gpus is {gpus}")),
                "{err}"
            );
            assert!(err.contains("set spec.trainer.gpus to 0"), "{err}");
        }
    }
}
