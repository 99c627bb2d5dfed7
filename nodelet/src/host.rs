//! The host: labels the node reports about itself, and metrics read with sysinfo.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use manifests::wire::HostMetrics;
use sysinfo::{Components, Disks, System};

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

/// Reads host metrics; keeps sysinfo's state so CPU use is measured between two reads.
pub struct HostSampler {
    system: Mutex<System>,
    root: PathBuf,
}

impl HostSampler {
    /// A sampler whose disk figures are for the disk holding `root`.
    pub fn new(root: &Path) -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        HostSampler {
            system: Mutex::new(system),
            root: root.to_path_buf(),
        }
    }

    /// Current metrics.
    pub fn sample(&self) -> HostMetrics {
        let (cpu, used, total) = {
            let mut system = self.system.lock().expect("not poisoned");
            system.refresh_cpu_usage();
            system.refresh_memory();
            (
                system.global_cpu_usage() as f64,
                system.used_memory(),
                system.total_memory(),
            )
        };
        let disks = Disks::new_with_refreshed_list();
        let root = std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        let disk = disks
            .list()
            .iter()
            .filter(|d| root.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len());
        let (disk_total, disk_used) = disk.map_or((0, 0), |d| {
            (
                d.total_space(),
                d.total_space().saturating_sub(d.available_space()),
            )
        });
        let temperature = Components::new_with_refreshed_list()
            .list()
            .iter()
            .filter_map(|c| c.temperature())
            .filter(|t| t.is_finite())
            .fold(None, |max: Option<f32>, t| {
                Some(max.map_or(t, |m| m.max(t)))
            })
            .map(f64::from);
        HostMetrics {
            cpu_percent: cpu,
            memory_used_bytes: used,
            memory_total_bytes: total,
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
}
