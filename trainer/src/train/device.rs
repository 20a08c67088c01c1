//! The device a run trains on, from `spec.trainer.gpus`: 0 is the CPU, 1 or more is CUDA.
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

/// The device for `gpus` (`spec.trainer.gpus`). With more than one GPU the run trains on the
/// first: data parallelism over several is not wired into runs (the operator refuses them).
pub fn device(gpus: i32) -> Result<Device, DeviceError> {
    match gpus {
        g if g < 0 => Err(DeviceError::Negative(g)),
        0 => Ok(Device::Cpu),
        g => cuda(g),
    }
}

#[cfg(feature = "cuda")]
fn cuda(gpus: i32) -> Result<Device, DeviceError> {
    if gpus > 1 {
        tracing::warn!(
            gpus,
            "data parallelism is not wired into runs: training on GPU 0"
        );
    }
    Device::new_cuda(0).map_err(|e| DeviceError::NoCudaDevice {
        gpus,
        reason: e.to_string(),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(gpus: i32) -> Result<Device, DeviceError> {
    Err(DeviceError::NoCudaBuild(gpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_gpus_is_the_cpu() {
        assert!(device(0).is_ok_and(|d| d.is_cpu()));
        assert!(matches!(device(-1), Err(DeviceError::Negative(-1))));
    }

    /// This test runs where CUDA is not built or not present: asking for a GPU must fail with
    /// a message naming the setting, not train on the CPU.
    #[test]
    #[cfg_attr(feature = "cuda", ignore = "needs a machine without a usable GPU")]
    fn asking_for_a_gpu_without_one_fails_clearly() {
        for gpus in [1, 8] {
            let err = device(gpus).expect_err("no GPU here").to_string();
            assert!(
                err.contains(&format!("spec.trainer.gpus is {gpus}")),
                "{err}"
            );
            assert!(err.contains("set spec.trainer.gpus to 0"), "{err}");
        }
    }
}
