//! A job's energy and cost. Energy is what a counter says, never a model: NVML's total-energy counter
//! of the job's GPU, or the CPU package's RAPL counter (`energy_uj` under /sys/class/powercap; it
//! counts the whole package, other processes included, and says so). Without a readable counter the
//! job's energy is "not measured". Cost = kWh x `price_per_kwh` + active hours x `price_per_hour`.
use crate::core::Core;
use crate::scheduler::Slot;
use std::path::{Path, PathBuf};

/// Where an attempt's energy comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Counter {
    /// The CPU package's RAPL directory.
    Rapl(PathBuf),
    /// GPU `N`'s NVML counter.
    Nvml(u32),
}

/// One attempt's energy meter: the counter, its reading when the attempt started, and the energy the
/// job had used before (earlier attempts).
#[derive(Debug, Clone, PartialEq)]
pub struct Meter {
    /// The counter; None: not measured, for `source`'s reason.
    counter: Option<(Counter, u64)>,
    /// Joules of the job's earlier attempts.
    before_j: f64,
    /// `rapl package-0`, `nvml cuda:0`, or "not measured: why".
    pub source: String,
}

/// A RAPL counter's value and range, microjoules.
pub fn read_rapl(dir: &Path) -> Result<(u64, u64), String> {
    let read = |name: &str| -> Result<u64, String> {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    Ok((read("energy_uj")?, read("max_energy_range_uj")?))
}

/// Microjoules between two readings of a counter that wraps at `range`. Pure.
pub fn rapl_delta_uj(start: u64, now: u64, range: u64) -> u64 {
    if now >= start {
        now - start
    } else {
        (range - start).saturating_add(now)
    }
}

/// The cost of `energy_j` joules and `active_s` seconds at these prices; None when no price is set, or
/// when a price per kWh is set but the energy was not measured (a cost without it would be a guess).
/// Pure.
pub fn cost(
    energy_j: Option<f64>,
    active_s: f64,
    per_kwh: Option<f64>,
    per_hour: Option<f64>,
) -> Option<f64> {
    let time = per_hour.map(|p| p * active_s / 3600.0);
    match (per_kwh, energy_j) {
        (Some(p), Some(j)) => Some(p * j / 3.6e6 + time.unwrap_or(0.0)),
        (Some(_), None) => None,
        (None, _) => time,
    }
}

impl Meter {
    /// A meter that measures nothing, for `why`.
    pub fn not_measured(why: String) -> Meter {
        Meter {
            counter: None,
            before_j: 0.0,
            source: format!("not measured: {why}"),
        }
    }

    /// Starts metering an attempt on `slot`; `before_j`: the job's energy so far. Blocking (sysfs).
    pub fn start(core: &Core, slot: Slot, before_j: Option<f64>) -> Meter {
        let before_j = before_j.unwrap_or(0.0);
        let (counter, source) = match slot {
            Slot::Gpu(n) => match core.devices.energy_mj(n) {
                Some(mj) => (Some((Counter::Nvml(n), mj)), format!("nvml cuda:{n}")),
                None => (
                    None,
                    format!("not measured: cuda:{n} has no NVML energy counter"),
                ),
            },
            Slot::Cpu => match read_rapl(&core.config.rapl_dir) {
                Ok((uj, _)) => (
                    Some((Counter::Rapl(core.config.rapl_dir.clone()), uj)),
                    "rapl (the whole CPU package)".to_string(),
                ),
                Err(e) => (
                    None,
                    format!("not measured: no readable RAPL counter ({e})"),
                ),
            },
            Slot::Slurm => (
                None,
                "not measured: the job runs on a Slurm node".to_string(),
            ),
        };
        Meter {
            counter,
            before_j,
            source,
        }
    }

    /// The job's energy now (earlier attempts included), joules; None: not measured. Blocking.
    pub fn joules(&self, core: &Core) -> Option<f64> {
        let (counter, start) = self.counter.as_ref()?;
        let delta_j = match counter {
            Counter::Rapl(dir) => {
                let (now, range) = read_rapl(dir).ok()?;
                rapl_delta_uj(*start, now, range) as f64 / 1e6
            }
            Counter::Nvml(n) => core.devices.energy_mj(*n)?.saturating_sub(*start) as f64 / 1e3,
        };
        Some(self.before_j + delta_j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_difference_survives_a_wrap() {
        assert_eq!(rapl_delta_uj(100, 350, 1000), 250);
        assert_eq!(rapl_delta_uj(900, 50, 1000), 150);
    }

    #[test]
    fn cost_is_reported_only_from_what_was_measured() {
        // 3.6 MJ = 1 kWh at 0.30, plus 2 h at 1.5.
        assert_eq!(
            cost(Some(3.6e6), 7200.0, Some(0.30), Some(1.5)),
            Some(0.30 + 3.0)
        );
        assert_eq!(cost(Some(3.6e6), 7200.0, None, Some(1.5)), Some(3.0));
        assert_eq!(cost(None, 7200.0, Some(0.30), Some(1.5)), None);
        assert_eq!(cost(None, 7200.0, None, None), None);
        assert_eq!(cost(Some(1.0), 1.0, None, None), None);
    }

    #[test]
    fn rapl_readings_name_the_file_that_failed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let e = read_rapl(dir.path()).unwrap_err();
        assert!(e.contains("energy_uj"), "{e}");
        std::fs::write(dir.path().join("energy_uj"), "123\n").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("max_energy_range_uj"), "1000\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_rapl(dir.path()), Ok((123, 1000)));
    }
}
