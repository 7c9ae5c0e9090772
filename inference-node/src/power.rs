//! Power sensing and the power limit.
//!
//! Sensors: RAPL package counters under `/sys/class/powercap` when readable,
//! otherwise a declared model (`--power-model idle=W,busy=W`). NVML is not
//! implemented yet (see docs/inference-node.md); with no GPU sensor a power
//! limit is held by pacing engine steps against the modeled power.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Something that can say how many joules the last interval cost.
pub trait PowerSensor: Send {
    fn name(&self) -> &'static str;
    /// Joules spent over the last `dt`, during which the engine was `busy`.
    fn joules(&mut self, busy: bool, dt: Duration) -> f64;
    /// Modeled busy/idle power, if the sensor is a model (for pacing).
    fn model(&self) -> Option<PowerModel> {
        None
    }
}

/// Declared power draw of the node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerModel {
    pub idle_w: f64,
    pub busy_w: f64,
}

impl std::str::FromStr for PowerModel {
    type Err = String;
    /// Parses `idle=W,busy=W`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut idle, mut busy) = (None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected idle=W,busy=W, got {s:?}"))?;
            let w: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("{k}: {v:?} is not a number of watts"))?;
            if !w.is_finite() || w < 0.0 {
                return Err(format!("{k}: watts must be >= 0"));
            }
            match k.trim() {
                "idle" => idle = Some(w),
                "busy" => busy = Some(w),
                other => return Err(format!("unknown key {other:?} (idle, busy)")),
            }
        }
        match (idle, busy) {
            (Some(idle_w), Some(busy_w)) if busy_w >= idle_w => Ok(PowerModel { idle_w, busy_w }),
            (Some(_), Some(_)) => Err("busy must be >= idle".into()),
            _ => Err(format!("expected idle=W,busy=W, got {s:?}")),
        }
    }
}

/// Modeled sensor: busy watts while stepping, idle otherwise.
pub struct ModeledSensor(pub PowerModel);

impl PowerSensor for ModeledSensor {
    fn name(&self) -> &'static str {
        "model"
    }
    fn joules(&mut self, busy: bool, dt: Duration) -> f64 {
        let w = if busy { self.0.busy_w } else { self.0.idle_w };
        w * dt.as_secs_f64()
    }
    fn model(&self) -> Option<PowerModel> {
        Some(self.0)
    }
}

/// Intel/AMD RAPL package energy counters.
pub struct RaplSensor {
    domains: Vec<(PathBuf, u64, u64)>, // (energy_uj path, max range, last)
}

impl RaplSensor {
    /// Finds readable package domains under `root` (normally
    /// `/sys/class/powercap`); `None` if there are none.
    pub fn open(root: &Path) -> Option<RaplSensor> {
        let mut domains = Vec::new();
        for entry in std::fs::read_dir(root).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            // Top-level packages only (intel-rapl:0), not sub-zones (intel-rapl:0:0).
            if !name.starts_with("intel-rapl:") || name.matches(':').count() != 1 {
                continue;
            }
            let path = entry.path().join("energy_uj");
            let Some(now) = read_u64(&path) else { continue };
            let max = read_u64(&entry.path().join("max_energy_range_uj")).unwrap_or(u64::MAX);
            domains.push((path, max, now));
        }
        (!domains.is_empty()).then_some(RaplSensor { domains })
    }
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

impl PowerSensor for RaplSensor {
    fn name(&self) -> &'static str {
        "rapl"
    }
    fn joules(&mut self, _busy: bool, _dt: Duration) -> f64 {
        let mut uj = 0u64;
        for (path, max, last) in self.domains.iter_mut() {
            if let Some(now) = read_u64(path) {
                // The counter wraps at max_energy_range_uj.
                uj += if now >= *last {
                    now - *last
                } else {
                    *max - *last + now
                };
                *last = now;
            }
        }
        uj as f64 / 1e6
    }
}

/// How long to idle after a step of `dt` so that average modeled power
/// stays at or under `limit_w`; zero when no pacing is needed, and `None`
/// when the limit is at or below idle power (cannot be met by pacing).
pub fn pacing_delay(model: PowerModel, limit_w: f64, dt: Duration) -> Option<Duration> {
    if model.busy_w <= limit_w {
        return Some(Duration::ZERO);
    }
    if limit_w <= model.idle_w {
        return None;
    }
    let s = dt.as_secs_f64() * (model.busy_w - limit_w) / (limit_w - model.idle_w);
    Some(Duration::from_secs_f64(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_model_parses_idle_and_busy_and_rejects_nonsense() {
        let m: PowerModel = "idle=40,busy=250".parse().unwrap();
        assert_eq!(
            m,
            PowerModel {
                idle_w: 40.0,
                busy_w: 250.0
            }
        );
        assert!("idle=40".parse::<PowerModel>().is_err());
        assert!("idle=x,busy=3".parse::<PowerModel>().is_err());
        assert!("idle=300,busy=3".parse::<PowerModel>().is_err());
    }

    #[test]
    fn pacing_keeps_average_modeled_power_at_the_limit() {
        let m = PowerModel {
            idle_w: 50.0,
            busy_w: 250.0,
        };
        let dt = Duration::from_millis(100);
        let s = pacing_delay(m, 150.0, dt).unwrap();
        let avg = (250.0 * dt.as_secs_f64() + 50.0 * s.as_secs_f64()) / (dt + s).as_secs_f64();
        assert!((avg - 150.0).abs() < 1e-6);
        assert_eq!(pacing_delay(m, 300.0, dt), Some(Duration::ZERO));
        assert_eq!(pacing_delay(m, 40.0, dt), None);
    }

    #[test]
    fn rapl_counters_are_read_and_wraparound_is_handled() {
        let dir = std::env::temp_dir().join(format!("rapl-test-{}", std::process::id()));
        let zone = dir.join("intel-rapl:0");
        std::fs::create_dir_all(&zone).unwrap();
        std::fs::write(zone.join("energy_uj"), "999000000\n").unwrap();
        std::fs::write(zone.join("max_energy_range_uj"), "1000000000\n").unwrap();
        let mut s = RaplSensor::open(&dir).unwrap();
        std::fs::write(zone.join("energy_uj"), "1000000\n").unwrap();
        let j = s.joules(true, Duration::from_secs(1));
        assert!((j - 2.0).abs() < 1e-9, "{j}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
