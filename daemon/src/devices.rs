//! The devices the daemon owns: the CPU (slots and threads from the config) and the GPUs NVML finds.
//!
//! NVML is the hardware boundary, behind the small [`GpuProbe`] trait: the real one wraps
//! `nvml-wrapper` (libnvidia-ml loaded at run time, so lorad builds and starts anywhere), and tests
//! put a fake behind it. No driver or no library is "no GPU" with the reason, never a failure.
use lorad_schema::GpuSample;
use std::ffi::OsStr;

/// A field of /proc/meminfo (`MemTotal`, `MemAvailable`), bytes.
pub fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A GPU as discovered at start.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    /// NVML's index, which is CUDA's device number when CUDA_VISIBLE_DEVICES is unset.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Installed memory, bytes.
    pub memory_total: u64,
    /// Compute capability, e.g. (9, 0).
    pub compute_capability: (i32, i32),
}

/// What NVML tells about GPUs. Methods return None when a figure cannot be read (a device gone, a
/// query this GPU does not support): callers report "not measured", never a guess.
pub trait GpuProbe: Send + Sync {
    /// The GPUs present.
    fn gpus(&self) -> Vec<GpuInfo>;
    /// The driver version.
    fn driver(&self) -> Option<String>;
    /// Utilisation, memory used, temperature and power of GPU `index` now.
    fn sample(&self, index: u32) -> Option<GpuSample>;
    /// Free memory of GPU `index`, bytes.
    fn free_memory(&self, index: u32) -> Option<u64>;
    /// GPU `index`'s energy counter since the driver loaded, millijoules (Volta and newer).
    fn energy_mj(&self, index: u32) -> Option<u64>;
}

/// NVML through nvml-wrapper.
struct Nvml(nvml_wrapper::Nvml);

impl GpuProbe for Nvml {
    fn gpus(&self) -> Vec<GpuInfo> {
        let n = self.0.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|index| {
                let d = self.0.device_by_index(index).ok()?;
                let cc = d.cuda_compute_capability().ok()?;
                Some(GpuInfo {
                    index,
                    name: d.name().unwrap_or_else(|_| "unknown GPU".into()),
                    memory_total: d.memory_info().ok()?.total,
                    compute_capability: (cc.major, cc.minor),
                })
            })
            .collect()
    }

    fn driver(&self) -> Option<String> {
        self.0.sys_driver_version().ok()
    }

    fn sample(&self, index: u32) -> Option<GpuSample> {
        use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
        let d = self.0.device_by_index(index).ok()?;
        Some(GpuSample {
            util_pct: f64::from(d.utilization_rates().ok()?.gpu),
            mem_used_mb: d.memory_info().ok()?.used as f64 / (1u64 << 20) as f64,
            temp_c: f64::from(d.temperature(TemperatureSensor::Gpu).ok()?),
            power_w: f64::from(d.power_usage().ok()?) / 1000.0,
        })
    }

    fn free_memory(&self, index: u32) -> Option<u64> {
        let d = self.0.device_by_index(index).ok()?;
        Some(d.memory_info().ok()?.free)
    }

    fn energy_mj(&self, index: u32) -> Option<u64> {
        let d = self.0.device_by_index(index).ok()?;
        d.total_energy_consumption().ok()
    }
}

/// Opens NVML: the default library name, then `libnvidia-ml.so.1` (driver-only installs often lack
/// the unversioned link). Err: why there is no GPU, in words.
pub fn open_nvml() -> Result<Box<dyn GpuProbe>, String> {
    let first = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => return Ok(Box::new(Nvml(nvml))),
        Err(e) => e,
    };
    match nvml_wrapper::Nvml::builder()
        .lib_path(OsStr::new("libnvidia-ml.so.1"))
        .init()
    {
        Ok(nvml) => Ok(Box::new(Nvml(nvml))),
        Err(second) => Err(no_gpu_reason(&first.to_string(), &second.to_string())),
    }
}

/// The reason shown for "no GPU", from NVML's two load errors. Pure.
pub fn no_gpu_reason(unversioned: &str, versioned: &str) -> String {
    let missing = |e: &str| e.contains("libloading") || e.contains("cannot open shared object");
    if missing(unversioned) && missing(versioned) {
        "the NVIDIA driver's NVML library (libnvidia-ml.so.1) is not installed".into()
    } else if missing(versioned) {
        format!("NVML did not start: {unversioned}")
    } else {
        format!("NVML did not start: {versioned}")
    }
}

/// The devices of this daemon: CPU slots and the GPUs found at start.
pub struct Devices {
    probe: Option<Box<dyn GpuProbe>>,
    /// The GPUs found (empty without NVML).
    pub gpus: Vec<GpuInfo>,
    /// Why there is no GPU, when there is none.
    pub no_gpu: Option<String>,
    /// The driver version, when NVML runs.
    pub driver: Option<String>,
}

impl Devices {
    /// Discovers GPUs through NVML; logs what it found or why it found none.
    pub fn discover() -> Devices {
        match open_nvml() {
            Ok(probe) => Self::with_probe(probe),
            Err(reason) => {
                tracing::info!(%reason, "no GPU");
                Devices {
                    probe: None,
                    gpus: Vec::new(),
                    no_gpu: Some(reason),
                    driver: None,
                }
            }
        }
    }

    /// The devices a probe reports (a fake in tests).
    pub fn with_probe(probe: Box<dyn GpuProbe>) -> Devices {
        let gpus = probe.gpus();
        let driver = probe.driver();
        for g in &gpus {
            tracing::info!(index = g.index, name = %g.name, memory_mb = g.memory_total >> 20, cc = ?g.compute_capability, driver = ?driver, "GPU found");
        }
        let no_gpu = gpus
            .is_empty()
            .then(|| "NVML runs but reports no GPU".to_string());
        Devices {
            probe: Some(probe),
            gpus,
            no_gpu,
            driver,
        }
    }

    /// No GPU, for a reason (tests, or a daemon told not to look).
    pub fn none(reason: &str) -> Devices {
        Devices {
            probe: None,
            gpus: Vec::new(),
            no_gpu: Some(reason.into()),
            driver: None,
        }
    }

    /// GPU `index`, if present.
    pub fn gpu(&self, index: u32) -> Option<&GpuInfo> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// A telemetry sample of GPU `index`.
    pub fn sample(&self, index: u32) -> Option<GpuSample> {
        self.probe.as_ref()?.sample(index)
    }

    /// Free memory of GPU `index`, bytes.
    pub fn free_memory(&self, index: u32) -> Option<u64> {
        self.probe.as_ref()?.free_memory(index)
    }

    /// GPU `index`'s energy counter, millijoules.
    pub fn energy_mj(&self, index: u32) -> Option<u64> {
        self.probe.as_ref()?.energy_mj(index)
    }

    /// Why `device` (a job's `device` setting) cannot run here, if it cannot: checked at submit, so a
    /// job never waits for a device that does not exist. `cuda_built`: this lorad has CUDA support.
    pub fn refuse(&self, device: &str, cuda_built: bool) -> Option<String> {
        let index = match device {
            "cpu" | "auto" => return None,
            "cuda" => 0,
            other => other.strip_prefix("cuda:")?.parse::<u32>().ok()?,
        };
        let name = format!("cuda:{index}");
        if !cuda_built {
            return Some(format!(
                "setting 'device': '{device}': this lorad was built without CUDA support (build it with --features cuda), so it trains on the CPU only; use device=cpu or auto"
            ));
        }
        if self.gpu(index).is_some() {
            return None;
        }
        Some(match (&self.no_gpu, self.gpus.is_empty()) {
            (Some(reason), _) => {
                format!("setting 'device': '{device}': no GPU ({reason}); use device=cpu or auto")
            }
            _ => {
                let present: Vec<String> = self
                    .gpus
                    .iter()
                    .map(|g| format!("cuda:{}", g.index))
                    .collect();
                format!(
                    "setting 'device': no GPU {name} here (present: {}); use one of them, or auto",
                    present.join(", ")
                )
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// GPUs that answer with fixed figures.
    pub(crate) struct FakeGpus(pub Vec<(GpuInfo, u64)>);

    impl GpuProbe for FakeGpus {
        fn gpus(&self) -> Vec<GpuInfo> {
            self.0.iter().map(|(g, _)| g.clone()).collect()
        }
        fn driver(&self) -> Option<String> {
            Some("555.1".into())
        }
        fn sample(&self, index: u32) -> Option<GpuSample> {
            self.0
                .iter()
                .find(|(g, _)| g.index == index)
                .map(|_| GpuSample {
                    util_pct: 97.0,
                    mem_used_mb: 1000.0,
                    temp_c: 60.0,
                    power_w: 300.0,
                })
        }
        fn free_memory(&self, index: u32) -> Option<u64> {
            self.0
                .iter()
                .find(|(g, _)| g.index == index)
                .map(|(_, f)| *f)
        }
        fn energy_mj(&self, _: u32) -> Option<u64> {
            None
        }
    }

    pub(crate) fn gpu(index: u32, gb: u64) -> GpuInfo {
        GpuInfo {
            index,
            name: "NVIDIA H100".into(),
            memory_total: gb << 30,
            compute_capability: (9, 0),
        }
    }

    #[test]
    fn no_library_reads_as_no_gpu_with_the_reason() {
        let missing =
            "a libloading error occurred: libnvidia-ml.so: cannot open shared object file";
        let missing1 =
            "a libloading error occurred: libnvidia-ml.so.1: cannot open shared object file";
        assert!(no_gpu_reason(missing, missing1).contains("not installed"));
        assert_eq!(
            no_gpu_reason(missing, "the NVIDIA driver is not loaded"),
            "NVML did not start: the NVIDIA driver is not loaded"
        );
        // Whatever this machine has, discovery never fails.
        let d = Devices::discover();
        assert!(d.no_gpu.is_some() || !d.gpus.is_empty());
    }

    #[test]
    fn cuda_devices_are_refused_at_once_when_they_cannot_run() {
        let none =
            Devices::none("the NVIDIA driver's NVML library (libnvidia-ml.so.1) is not installed");
        assert_eq!(none.refuse("cpu", false), None);
        assert_eq!(none.refuse("auto", true), None);
        assert!(none
            .refuse("cuda:0", false)
            .unwrap()
            .contains("built without CUDA support"));
        let e = none.refuse("cuda:0", true).unwrap();
        assert!(
            e.contains("no GPU (the NVIDIA driver's NVML library"),
            "{e}"
        );
        let two = Devices::with_probe(Box::new(FakeGpus(vec![
            (gpu(0, 80), 80 << 30),
            (gpu(1, 80), 1 << 30),
        ])));
        assert_eq!(two.refuse("cuda:1", true), None);
        assert_eq!(two.refuse("cuda", true), None);
        let e = two.refuse("cuda:2", true).unwrap();
        assert!(
            e.contains("no GPU cuda:2 here (present: cuda:0, cuda:1)"),
            "{e}"
        );
        assert_eq!(two.free_memory(1), Some(1 << 30));
        assert_eq!(two.sample(0).unwrap().power_w, 300.0);
    }
}
