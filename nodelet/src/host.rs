//! The host: labels the node reports about itself, and metrics read with sysinfo.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use manifests::wire::HostMetrics;
use sysinfo::{Components, DiskRefreshKind, Disks, System};

/// How often the lists of disks (mounts) and sensors are read again: they change when
/// something is mounted or a driver loads, not between two heartbeats.
pub const LIST_REFRESH: Duration = Duration::from_secs(60);

/// The shortest interval CPU use is measured over: sysinfo's minimum, and at least 1 s, so
/// the figure is a load and not the noise of a few milliseconds.
pub fn cpu_interval() -> Duration {
    sysinfo::MINIMUM_CPU_UPDATE_INTERVAL.max(Duration::from_secs(1))
}

/// The log filter for `RUST_LOG`: `level` or `target=level,…` (tracing's `Targets`; the full
/// `EnvFilter` syntax needs the regex engine, about a megabyte of the binary a board carries).
/// Unset or empty is `info`; anything else that does not parse is `info` too, with a warning
/// that says what is understood.
pub fn log_filter(spec: Option<&str>) -> (tracing_subscriber::filter::Targets, Option<String>) {
    let info = || tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO);
    match spec.map(str::trim).filter(|s| !s.is_empty()) {
        None => (info(), None),
        Some(spec) => match spec.parse() {
            Ok(filter) => (filter, None),
            Err(e) => (
                info(),
                Some(format!(
                    "RUST_LOG={spec:?} is not `level` or `target=level,…` ({e}); logging at info"
                )),
            ),
        },
    }
}

/// Whether something last refreshed at `last` (never: `None`) is due again at `now`.
pub fn refresh_due(last: Option<Instant>, now: Instant, every: Duration) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= every)
}

/// Bytes available to an unprivileged user on the file system holding `path` (statvfs's
/// available blocks times the fragment size); `None` if it cannot be read.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let stats = nix::sys::statvfs::statvfs(path).ok()?;
    // The field types differ between platforms (32-bit ARM has narrower ones).
    #[allow(clippy::unnecessary_cast)]
    let (blocks, fragment) = (
        stats.blocks_available() as u64,
        stats.fragment_size() as u64,
    );
    blocks.checked_mul(fragment)
}

/// The CPU model, from /proc/cpuinfo: `model name` on x86, and on ARM the
/// `CPU part` decoded for the cores shoal's users run (Cortex-A55 and friends).
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    for line in cpuinfo.lines() {
        if let Some((key, value)) = line.split_once(':') {
            if key.trim() == "model name" {
                return Some(value.trim().to_string());
            }
        }
    }
    let part = cpuinfo.lines().find_map(|l| {
        l.split_once(':')
            .filter(|(k, _)| k.trim() == "CPU part")
            .map(|(_, v)| v.trim().to_string())
    })?;
    let name = match part.as_str() {
        "0xd03" => "Cortex-A53",
        "0xd04" => "Cortex-A35",
        "0xd05" => "Cortex-A55",
        "0xd07" => "Cortex-A57",
        "0xd08" => "Cortex-A72",
        "0xd09" => "Cortex-A73",
        "0xd0a" => "Cortex-A75",
        "0xd0b" => "Cortex-A76",
        "0xd0c" => "Neoverse-N1",
        "0xd0d" => "Cortex-A77",
        "0xd41" => "Cortex-A78",
        "0xd46" => "Cortex-A510",
        "0xd47" => "Cortex-A710",
        "0xd4d" => "Cortex-A715",
        other => return Some(format!("ARM part {other}")),
    };
    Some(name.to_string())
}

/// Turns free text into a label value: letters, digits, `-`, `_`, `.`, at most 63, alphanumeric at both ends.
pub fn label_value(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed: String = mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .chars()
        .take(63)
        .collect();
    trimmed
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// Labels the node gives itself: arch, os, kernel, hostname, cpu model.
pub fn self_labels() -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert("arch".to_string(), std::env::consts::ARCH.to_string());
    labels.insert("os".to_string(), std::env::consts::OS.to_string());
    if let Some(kernel) = System::kernel_version() {
        labels.insert("kernel".to_string(), label_value(&kernel));
    }
    if let Some(host) = System::host_name() {
        labels.insert("hostname".to_string(), label_value(&host));
    }
    if let Some(model) = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .as_deref()
        .and_then(cpu_model)
    {
        labels.insert("cpu-model".to_string(), label_value(&model));
    }
    labels.retain(|_, v| !v.is_empty());
    labels
}

/// Reads host metrics; keeps sysinfo's state so CPU use is measured between two reads, and
/// the lists of disks and sensors so a sample reads only the figures, not the lists.
pub struct HostSampler {
    state: Mutex<Sampled>,
    root: PathBuf,
}

struct Sampled {
    system: System,
    /// CPU use over the last [`cpu_interval`] or more, and when it was measured.
    cpu: f64,
    cpu_at: Instant,
    disks: Disks,
    components: Components,
    lists_at: Option<Instant>,
    /// The disk holding the root, in `disks`, as of the last list.
    root_disk: Option<usize>,
}

impl HostSampler {
    /// A sampler whose disk figures are for the disk holding `root`.
    pub fn new(root: &Path) -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        HostSampler {
            state: Mutex::new(Sampled {
                system,
                // Until a first interval has passed there is no measurement: 0.
                cpu: 0.0,
                cpu_at: Instant::now(),
                disks: Disks::new(),
                components: Components::new(),
                lists_at: None,
                root_disk: None,
            }),
            root: root.to_path_buf(),
        }
    }

    /// Current metrics. Cheap enough to call several times a second: CPU use is measured
    /// again once per [`cpu_interval`] (the figure in between is the last one), and the disk
    /// and sensor lists are read again once per [`LIST_REFRESH`].
    pub fn sample(&self) -> HostMetrics {
        let now = Instant::now();
        let mut state = self.state.lock().expect("not poisoned");
        let state = &mut *state;
        if refresh_due(Some(state.cpu_at), now, cpu_interval()) {
            state.system.refresh_cpu_usage();
            state.cpu = f64::from(state.system.global_cpu_usage());
            state.cpu_at = now;
        }
        state.system.refresh_memory();
        if refresh_due(state.lists_at, now, LIST_REFRESH) {
            state.disks.refresh(true);
            state.components.refresh(true);
            let root = std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
            state.root_disk = state
                .disks
                .list()
                .iter()
                .enumerate()
                .filter(|(_, d)| root.starts_with(d.mount_point()))
                .max_by_key(|(_, d)| d.mount_point().as_os_str().len())
                .map(|(i, _)| i);
            state.lists_at = Some(now);
        } else {
            if let Some(disk) = state
                .root_disk
                .and_then(|i| state.disks.list_mut().get_mut(i))
            {
                disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
            }
            for component in state.components.list_mut() {
                component.refresh();
            }
        }
        let disk = state.root_disk.and_then(|i| state.disks.list().get(i));
        let (disk_total, disk_used) = disk.map_or((0, 0), |d| {
            (
                d.total_space(),
                d.total_space().saturating_sub(d.available_space()),
            )
        });
        let temperature = state
            .components
            .list()
            .iter()
            .filter_map(|c| c.temperature())
            .filter(|t| t.is_finite())
            .fold(None, |max: Option<f32>, t| {
                Some(max.map_or(t, |m| m.max(t)))
            })
            .map(f64::from);
        HostMetrics {
            cpu_percent: state.cpu,
            memory_used_bytes: state.system.used_memory(),
            memory_total_bytes: state.system.total_memory(),
            disk_used_bytes: disk_used,
            disk_total_bytes: disk_total,
            temperature_celsius: temperature,
            uptime_seconds: System::uptime(),
            process_count: process_count(),
        }
    }
}

/// Counts /proc's numeric entries: far cheaper than a full process refresh.
fn process_count() -> u64 {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count() as u64
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_models() {
        assert_eq!(
            cpu_model("processor: 0\nmodel name\t: Intel(R) Xeon(R) CPU\n").as_deref(),
            Some("Intel(R) Xeon(R) CPU")
        );
        let a55 = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd05\n";
        assert_eq!(cpu_model(a55).as_deref(), Some("Cortex-A55"));
        assert_eq!(
            label_value("Intel(R) Xeon(R) CPU @ 2.2GHz"),
            "Intel-R--Xeon-R--CPU---2.2GHz"
        );
        assert!(manifests::validate::is_label_value(&label_value("-weird ")));
    }

    #[test]
    fn samples_this_host() {
        let metrics = HostSampler::new(Path::new("/")).sample();
        assert!(metrics.memory_total_bytes > 0);
        assert!(metrics.process_count > 0);
        assert!(metrics.disk_total_bytes > 0);
    }

    #[test]
    fn rust_log_is_a_level_or_targets_and_anything_else_is_info_with_a_warning() {
        use tracing::level_filters::LevelFilter;
        let (filter, warning) = log_filter(None);
        assert_eq!(filter.default_level(), Some(LevelFilter::INFO));
        assert!(warning.is_none());
        let (filter, warning) = log_filter(Some("nodelet=debug,warn"));
        assert!(warning.is_none());
        assert_eq!(filter.default_level(), Some(LevelFilter::WARN));
        assert!(filter.would_enable("nodelet", &tracing::Level::DEBUG));
        let (filter, warning) = log_filter(Some("nodelet[span{x=1}]=debug"));
        assert_eq!(filter.default_level(), Some(LevelFilter::INFO));
        assert!(warning.unwrap().contains("target=level"));
    }

    #[test]
    fn refreshes_are_due_once_the_interval_passed() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        assert!(refresh_due(None, now, second), "never refreshed");
        assert!(!refresh_due(Some(now), now, second));
        assert!(!refresh_due(
            Some(now - Duration::from_millis(999)),
            now,
            second
        ));
        assert!(refresh_due(Some(now - second), now, second));
        assert!(
            !refresh_due(Some(now + second), now, second),
            "a last refresh after now"
        );
        assert!(cpu_interval() >= second);
    }

    #[test]
    fn cpu_use_is_measured_over_a_second_not_between_close_samples() {
        let sampler = HostSampler::new(Path::new("/"));
        // As if the last measurement were long ago: this sample measures.
        sampler.state.lock().unwrap().cpu_at = Instant::now() - Duration::from_secs(5);
        let first = sampler.sample();
        let measured_at = sampler.state.lock().unwrap().cpu_at;
        assert!(measured_at.elapsed() < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(10));
        let second = sampler.sample();
        assert_eq!(first.cpu_percent.to_bits(), second.cpu_percent.to_bits());
        assert_eq!(
            sampler.state.lock().unwrap().cpu_at,
            measured_at,
            "not measured again"
        );
        assert!((0.0..=100.0).contains(&first.cpu_percent));
        // The lists were read once, by the first sample.
        let listed = sampler.state.lock().unwrap().lists_at;
        assert!(listed.is_some());
        sampler.sample();
        assert_eq!(sampler.state.lock().unwrap().lists_at, listed);
        assert!(
            second.disk_total_bytes > 0,
            "the disk figures come from the kept list"
        );
    }

    #[test]
    fn free_bytes_of_a_file_system() {
        let tmp = tempfile::tempdir().unwrap();
        let free = free_bytes(tmp.path()).unwrap();
        assert!(free > 0);
        let metrics = HostSampler::new(Path::new("/")).sample();
        assert!(free_bytes(Path::new("/")).unwrap() <= metrics.disk_total_bytes);
        assert_eq!(free_bytes(&tmp.path().join("missing")), None);
    }
}
