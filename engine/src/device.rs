//! Which device a run uses.
use crate::error::EngineError;
use candle_core::Device;

/// The device named by the `device` setting: `auto` is CUDA 0 when built with CUDA and one is present,
/// else the CPU.
pub fn select_device(spec: &str) -> Result<Device, EngineError> {
    let setting = |detail: String| EngineError::Setting {
        field: "device".into(),
        detail,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" if cfg!(feature = "cuda") => Ok(Device::cuda_if_available(0)?),
        "auto" => Ok(Device::Cpu),
        other => {
            let ordinal = match other {
                "cuda" => 0,
                _ => match other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    Some(n) => n,
                    None => return Err(setting(format!("'{other}' is not auto, cpu or cuda:N"))),
                },
            };
            if !cfg!(feature = "cuda") {
                return Err(setting(format!(
                    "'{other}': this lorad was built without CUDA support"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| setting(format!("'{other}': {e}")))
        }
    }
}
