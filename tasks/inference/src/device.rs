//! Where the models run: the `device` setting every model family takes, the device it resolves to on this
//! machine (and why, for the log), and the CPU thread pool a CPU model runs in.

use serde::Deserialize;

/// The `device` setting.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when the binary was built with it and the driver loads, else the CPU.
    #[default]
    Auto,
    /// The CPU (Burn's flex backend).
    Cpu,
    /// CUDA; without a driver (or a CUDA build) the worker logs why and uses the CPU.
    Cuda,
}

/// The device a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Burn's flex backend.
    Cpu,
    /// burn-cuda.
    Cuda,
}

impl Device {
    /// `cpu` or `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

/// Whether a CUDA driver is installed: `/proc/driver/nvidia/version` and `libcuda.so.1` in the loader's
/// cache or `LD_LIBRARY_PATH` (a CUDA binary that loads no driver would panic on its first kernel).
pub fn cuda_driver_present() -> bool {
    if !std::path::Path::new("/proc/driver/nvidia/version").exists() {
        return false;
    }
    let in_cache = std::fs::read("/etc/ld.so.cache")
        .map(|c| c.windows(12).any(|w| w == b"libcuda.so.1"))
        .unwrap_or(false);
    let in_path = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| !d.is_empty() && std::path::Path::new(d).join("libcuda.so.1").exists());
    in_cache || in_path
}

/// The device `choice` resolves to here, and why (logged at start). `cuda_built` says whether the calling
/// family was compiled with its CUDA backend.
pub fn choose_device(choice: DeviceChoice, cuda_built: bool) -> (Device, &'static str) {
    match choice {
        DeviceChoice::Cpu => (Device::Cpu, "device = cpu"),
        DeviceChoice::Auto | DeviceChoice::Cuda if !cuda_built => (
            Device::Cpu,
            "this build has no CUDA backend (build with --features cuda)",
        ),
        DeviceChoice::Auto | DeviceChoice::Cuda => {
            if cuda_driver_present() {
                (Device::Cuda, "the CUDA driver is present")
            } else {
                (Device::Cpu, "no CUDA driver on this machine (libcuda.so.1)")
            }
        }
    }
}

/// Resolves `choice` and logs the outcome for `family` (a warning when CUDA was asked for and is absent).
pub fn resolve(family: &str, choice: DeviceChoice, cuda_built: bool) -> Device {
    let (device, why) = choose_device(choice, cuda_built);
    if choice == DeviceChoice::Cuda && device == Device::Cpu {
        tracing::warn!(
            family,
            reason = why,
            "device = cuda, but the models run on the CPU"
        );
    }
    tracing::info!(
        family,
        device = device.name(),
        reason = why,
        "models: device chosen"
    );
    device
}

/// A CPU thread pool named after `family` with `threads` threads (default: one per core).
pub fn cpu_pool(family: &str, threads: Option<usize>) -> Result<rayon::ThreadPool, String> {
    let prefix = format!("{family}-cpu");
    let mut b = rayon::ThreadPoolBuilder::new().thread_name(move |i| format!("{prefix}-{i}"));
    if let Some(n) = threads {
        b = b.num_threads(n);
    }
    b.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_cuda_build_every_choice_is_the_cpu() {
        for choice in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda] {
            assert_eq!(choose_device(choice, false).0, Device::Cpu);
        }
        assert_eq!(choose_device(DeviceChoice::Cpu, true).0, Device::Cpu);
    }
}
