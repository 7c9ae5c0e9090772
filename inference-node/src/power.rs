//! Power sensing and the power limit.
//!
//! Sensors: NVML (NVIDIA GPUs; `libnvidia-ml` loaded at run time, so a
//! build needs nothing from CUDA and a machine without it falls back),
//! RAPL package counters under `/sys/class/powercap` when readable, and a
//! declared model (`--power-model idle=W,busy=W`). A power limit goes to
//! NVML where permitted; otherwise the engine holds its modeled power under
//! the limit by pacing its steps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::Nvml;

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

/// NVIDIA GPUs through NVML: the energy counter where the GPU has one
/// (Volta and newer), else instantaneous power times the interval.
pub struct NvmlSensor {
    nvml: Arc<Nvml>,
    /// NVML indices of the GPUs this process's CUDA sees.
    devices: Vec<u32>,
    last_mj: Vec<Option<u64>>,
}

impl NvmlSensor {
    /// `None` when the NVML library is absent or sees none of the GPUs in
    /// use. Only the GPUs CUDA sees (`CUDA_VISIBLE_DEVICES`, matched by
    /// UUID: `cuda::libs::nvml_selection`) are read, so a node given one GPU
    /// of eight counts that GPU's energy alone.
    pub fn open() -> Option<NvmlSensor> {
        let nvml = Nvml::init().ok()?;
        let count = nvml.device_count().ok().filter(|&c| c > 0)?;
        let uuids: Vec<String> = (0..count)
            .map(|i| {
                nvml.device_by_index(i)
                    .and_then(|d| d.uuid())
                    .unwrap_or_default()
            })
            .collect();
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let cuda = crate::cuda::libs::cuda_device_uuids();
        let devices =
            crate::cuda::libs::nvml_selection(visible.as_deref(), &uuids, cuda.as_deref());
        if devices.is_empty() {
            return None;
        }
        tracing::info!(?devices, "NVML reads these GPUs (NVML indices)");
        let last_mj = devices
            .iter()
            .map(|&i| {
                nvml.device_by_index(i)
                    .ok()
                    .and_then(|d| d.total_energy_consumption().ok())
            })
            .collect();
        Some(NvmlSensor {
            nvml: Arc::new(nvml),
            devices,
            last_mj,
        })
    }

    /// A handle that can set GPU power limits.
    pub fn control(&self) -> NvmlControl {
        NvmlControl {
            nvml: self.nvml.clone(),
            devices: self.devices.clone(),
        }
    }
}

impl PowerSensor for NvmlSensor {
    fn name(&self) -> &'static str {
        "nvml"
    }
    fn joules(&mut self, _busy: bool, dt: Duration) -> f64 {
        let mut j = 0.0;
        for (&i, last) in self.devices.iter().zip(self.last_mj.iter_mut()) {
            let Ok(d) = self.nvml.device_by_index(i) else {
                continue;
            };
            match (d.total_energy_consumption(), *last) {
                (Ok(now), Some(prev)) => {
                    j += now.saturating_sub(prev) as f64 / 1000.0;
                    *last = Some(now);
                }
                _ => {
                    if let Ok(mw) = d.power_usage() {
                        j += mw as f64 / 1000.0 * dt.as_secs_f64();
                    }
                }
            }
        }
        j
    }
}

/// Sets GPU power limits through NVML (needs root or the right capability).
#[derive(Clone)]
pub struct NvmlControl {
    nvml: Arc<Nvml>,
    devices: Vec<u32>,
}

impl NvmlControl {
    /// Splits `watts` evenly over the GPUs; the first refusal is returned.
    pub fn set_limit(&self, watts: f64) -> Result<(), String> {
        let per_gpu_mw = (watts * 1000.0 / self.devices.len().max(1) as f64) as u32;
        for &i in &self.devices {
            let mut d = self.nvml.device_by_index(i).map_err(|e| e.to_string())?;
            d.set_power_management_limit(per_gpu_mw)
                .map_err(|e| format!("GPU {i}: {e}"))?;
        }
        Ok(())
    }
}

/// Which sensor to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorChoice {
    /// RAPL, else the model (CPU backend).
    Auto,
    Nvml,
    Rapl,
    Model,
}

/// Opens the chosen sensor; one that is not available falls back to the
/// declared model (and says so in the log) rather than failing the node.
pub fn open_sensor(
    choice: SensorChoice,
    model: PowerModel,
    powercap: &Path,
) -> (Box<dyn PowerSensor>, Option<NvmlControl>) {
    let fallback = |what: &str| {
        tracing::warn!("{what} power sensor not available; using the declared power model");
        (Box::new(ModeledSensor(model)) as Box<dyn PowerSensor>, None)
    };
    match choice {
        SensorChoice::Model => (Box::new(ModeledSensor(model)), None),
        SensorChoice::Nvml => match NvmlSensor::open() {
            Some(s) => {
                let c = s.control();
                (Box::new(s), Some(c))
            }
            None => fallback("NVML"),
        },
        SensorChoice::Rapl => match RaplSensor::open(powercap) {
            Some(s) => (Box::new(s), None),
            None => fallback("RAPL"),
        },
        SensorChoice::Auto => match RaplSensor::open(powercap) {
            Some(s) => (Box::new(s), None),
            None => (Box::new(ModeledSensor(model)), None),
        },
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
    fn an_unavailable_sensor_falls_back_to_the_declared_model() {
        let m = PowerModel {
            idle_w: 1.0,
            busy_w: 3.0,
        };
        let (mut s, _) = open_sensor(SensorChoice::Rapl, m, Path::new("/nonexistent-powercap"));
        assert_eq!(s.name(), "model");
        assert_eq!(s.joules(true, Duration::from_secs(2)), 6.0);
        // NVML: without libnvidia-ml (CI machines) this is the model too;
        // with it, a real reading that is never negative.
        let (mut s, control) =
            open_sensor(SensorChoice::Nvml, m, Path::new("/nonexistent-powercap"));
        match s.name() {
            "nvml" => {
                assert!(control.is_some() && s.joules(true, Duration::from_millis(10)) >= 0.0)
            }
            other => assert_eq!((other, control.is_none()), ("model", true)),
        }
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
