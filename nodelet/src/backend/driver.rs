//! Drivers: a `.ko` under `/lib/modules/<kernel>/updates/shoal/`, depmod, and
//! `modprobe -r` / `modprobe`; the loaded version read from
//! `/sys/module/<name>/version`; every `.ko` kept so a revert needs no network.
//!
//! A module whose MODULE_VERSION is not a semantic version (`5.1-k`, or none at all) is
//! recorded when shoal loads it (`<state>/drivers/<module>/loaded.json`), so that it reads as
//! the version it was installed as, instead of drifting forever.

use std::path::{Path, PathBuf};
use std::time::Duration;

use manifests::Component;
use serde::{Deserialize, Serialize};

use super::{io, prunable, remove_kept, Backend, BackendError, Kept, Snapshot};
use crate::command;

const MODPROBE_LIMIT: Duration = Duration::from_secs(120);

/// The driver backend.
pub struct DriverBackend {
    root: PathBuf,
    kernel: String,
    /// Kept modules: `<state>/drivers/<module>/<version>.ko`.
    kept: PathBuf,
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl DriverBackend {
    /// A backend for modules under `root` for kernel `kernel`.
    pub fn new(root: &Path, state_dir: &Path, kernel: String) -> Self {
        DriverBackend {
            root: root.to_path_buf(),
            kernel,
            kept: state_dir.join("drivers"),
        }
    }

    /// The kernel module's name: the `driver.module` setting, else the component name; the
    /// kernel shows `-` as `_` in /sys/module.
    fn module(component: &Component) -> String {
        component
            .driver
            .as_ref()
            .and_then(|d| d.module.clone())
            .unwrap_or_else(|| component.name.clone())
            .replace('-', "_")
    }

    fn installed_path(&self, module: &str) -> PathBuf {
        self.root
            .join("lib/modules")
            .join(&self.kernel)
            .join("updates/shoal")
            .join(format!("{module}.ko"))
    }

    fn kept_path(&self, module: &str, version: &str) -> PathBuf {
        self.kept.join(module).join(format!("{version}.ko"))
    }

    /// The `.ko` files kept for `module`.
    fn kept_modules(&self, module: &str) -> Vec<Kept> {
        let Ok(entries) = std::fs::read_dir(self.kept.join(module)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let version = name.strip_suffix(".ko")?;
                Some(Kept {
                    version: version.to_string(),
                    modified: e.metadata().ok()?.modified().ok()?,
                    path: e.path(),
                })
            })
            .collect()
    }

    /// Removes kept `.ko` files of `module` as [`Backend::prune_kept`] says, `loaded` being the
    /// version the kernel runs. A loaded version no kept file is named after (a module
    /// without MODULE_VERSION) is told by its bytes: the kept file that is the same as the one
    /// modprobe loads stays.
    fn prune_module(
        &self,
        module: &str,
        loaded: Option<&str>,
        protect: &[&str],
        keep: usize,
    ) -> Vec<PathBuf> {
        let kept = self.kept_modules(module);
        let mut protect: Vec<&str> = protect.to_vec();
        let installed = std::fs::read(self.installed_path(module)).ok();
        if !kept.iter().any(|k| Some(k.version.as_str()) == loaded) {
            if let Some(installed) = &installed {
                protect.extend(
                    kept.iter()
                        .filter(|k| {
                            std::fs::metadata(&k.path)
                                .is_ok_and(|m| m.len() == installed.len() as u64)
                                && std::fs::read(&k.path).is_ok_and(|b| &b == installed)
                        })
                        .map(|k| k.version.as_str()),
                );
            }
        }
        let doomed = prunable(kept.clone(), loaded, &protect, keep);
        remove_kept(doomed, ".ko")
    }

    /// Where the last load of `module` from a kept `.ko` is recorded.
    fn record_path(&self, module: &str) -> PathBuf {
        self.kept.join(module).join("loaded.json")
    }

    /// What the kernel shows for `module`: its version (canonical, or `unknown` for a module
    /// without MODULE_VERSION) and its srcversion; `None` when it is not loaded.
    fn reported(module: &str) -> Option<(String, Option<String>)> {
        let dir = PathBuf::from("/sys/module").join(module);
        if !dir.exists() {
            return None;
        }
        let version = std::fs::read_to_string(dir.join("version"))
            .map(|v| canonical_version(v.trim()))
            .unwrap_or_else(|_| UNKNOWN.into());
        let srcversion = std::fs::read_to_string(dir.join("srcversion"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        Some((version, srcversion))
    }

    /// The version of `module` the kernel runs, as manifests name it; `None` when not loaded.
    fn loaded_version(&self, module: &str) -> Option<String> {
        let (reported, srcversion) = Self::reported(module)?;
        let record = read_record(&self.record_path(module));
        Some(resolve_version(
            &reported,
            srcversion.as_deref(),
            record.as_ref(),
        ))
    }

    async fn depmod(&self) -> Result<(), BackendError> {
        let mut args = vec!["-a".to_string()];
        if self.root != Path::new("/") {
            args.push("-b".into());
            args.push(self.root.display().to_string());
        }
        args.push(self.kernel.clone());
        command::run("depmod", &args, &[], MODPROBE_LIMIT).await?;
        Ok(())
    }

    async fn load(&self, module: &str, params: &[String]) -> Result<(), BackendError> {
        if Self::reported(module).is_some() {
            command::run("modprobe", &["-r", module], &[], MODPROBE_LIMIT).await?;
        }
        let mut args = vec![module.to_string()];
        args.extend(params.iter().cloned());
        command::run("modprobe", &args, &[], MODPROBE_LIMIT).await?;
        Ok(())
    }

    async fn install_file(
        &self,
        module: &str,
        ko: &Path,
        params: &[String],
        version: &str,
    ) -> Result<(), BackendError> {
        let target = self.installed_path(module);
        let dir = target.parent().expect("has a parent");
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = target.with_extension("ko.tmp");
        std::fs::copy(ko, &tmp).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        self.depmod().await?;
        self.load(module, params).await?;
        let record_path = self.record_path(module);
        match Self::reported(module) {
            Some((reported, _)) if reported == version => {
                // The module says who it is: an older record would only confuse a later read.
                let _ = std::fs::remove_file(&record_path);
                Ok(())
            }
            Some((reported, srcversion)) if semver::Version::parse(&reported).is_err() => {
                // Not a version shoal can compare (`5.1-k`, or none): remember that this is
                // what `version` reports, or it would read as drift and be loaded again and
                // again. Not fatal when the disk refuses: the module runs, and the next
                // reconcile loads it again and retries the record.
                let record = LoadedRecord {
                    reported,
                    version: version.to_string(),
                    srcversion,
                };
                if let Err(e) = write_record(&record_path, &record) {
                    tracing::warn!(module, path = %record_path.display(), error = %e, "cannot record the version the loaded module reports; it will read as drift until it can");
                }
                Ok(())
            }
            Some((reported, _)) => Err(BackendError::Invalid(format!(
                "module {module} loaded, but /sys/module/{module}/version says {reported}, not {version}; does the .ko carry MODULE_VERSION(\"{version}\")?"
            ))),
            None => Err(BackendError::Invalid(format!("module {module} is not loaded after modprobe"))),
        }
    }
}

/// What `/sys/module/<m>` shows for a module without a `version` file.
const UNKNOWN: &str = "unknown";

/// The last load of a module from a kept `.ko` whose reported version is not a semantic
/// version: what the kernel reported, and the version shoal loaded it as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedRecord {
    /// `/sys/module/<m>/version` (canonical), or `unknown`.
    pub reported: String,
    /// The version it was loaded as (the kept `.ko`'s).
    pub version: String,
    /// `/sys/module/<m>/srcversion` then: a checksum of the module's source, which tells two
    /// builds that report the same version apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srcversion: Option<String>,
}

fn read_record(path: &Path) -> Option<LoadedRecord> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_record(path: &Path, record: &LoadedRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(record).expect("a record serializes");
    crate::journal::write_atomic(path, &json)
}

/// The version a loaded module is, as manifests name it: what it reports, unless that is not
/// a semantic version and `record` says shoal loaded exactly this (same report, and same
/// srcversion where both are known) as another version. A valid semantic version is always
/// believed: a different one is a different module.
pub fn resolve_version(
    reported: &str,
    srcversion: Option<&str>,
    record: Option<&LoadedRecord>,
) -> String {
    if semver::Version::parse(reported).is_ok() {
        return reported.to_string();
    }
    match record {
        Some(record)
            if record.reported == reported
                && match (srcversion, record.srcversion.as_deref()) {
                    (Some(now), Some(then)) => now == then,
                    _ => true,
                } =>
        {
            record.version.clone()
        }
        _ => reported.to_string(),
    }
}

/// The version a module reports, as manifests write it: modules commonly say
/// `MODULE_VERSION("1.0")`, manifests pin drivers with semantic versions (`1.0.0`), so a
/// numeric version of one or two parts is padded with `.0`. Anything else is kept as it is.
pub fn canonical_version(loaded: &str) -> String {
    let parts: Vec<&str> = loaded.split('.').collect();
    let numeric = parts
        .iter()
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if numeric && parts.len() < 3 {
        let mut padded = parts;
        padded.resize(3, "0");
        padded.join(".")
    } else {
        loaded.to_string()
    }
}

impl Backend for DriverBackend {
    async fn current(&self, component: &Component) -> Result<Option<String>, BackendError> {
        Ok(self.loaded_version(&Self::module(component)))
    }

    async fn snapshot(&self, component: &Component) -> Result<Snapshot, BackendError> {
        let module = Self::module(component);
        let Some(version) = self.loaded_version(&module) else {
            return Ok(Snapshot::Absent);
        };
        let kept = self.kept_path(&module, &version);
        if !kept.exists() {
            // Loaded but not from us (or our copy is gone): keep the file modprobe would load.
            let installed = self.installed_path(&module);
            if installed.exists() {
                std::fs::create_dir_all(kept.parent().expect("has a parent")).map_err(io(&kept))?;
                std::fs::copy(&installed, &kept).map_err(io(&kept))?;
            } else {
                return Err(BackendError::Invalid(format!(
                    "module {module} {version} is loaded but its .ko is not under updates/shoal; shoal cannot restore it, so it will not replace it"
                )));
            }
        }
        let params = component
            .driver
            .as_ref()
            .map(|d| d.params.clone())
            .unwrap_or_default();
        Ok(Snapshot::Driver {
            version,
            ko: kept,
            params,
        })
    }

    async fn apply(
        &self,
        component: &Component,
        artifact: Option<&Path>,
    ) -> Result<(), BackendError> {
        let module = Self::module(component);
        let version = component
            .version
            .as_deref()
            .ok_or_else(|| BackendError::Invalid("no version".into()))?;
        let artifact = artifact
            .ok_or_else(|| BackendError::Invalid(format!("driver {module} needs an artifact")))?;
        let kept = self.kept_path(&module, version);
        std::fs::create_dir_all(kept.parent().expect("has a parent")).map_err(io(&kept))?;
        std::fs::copy(artifact, &kept).map_err(io(&kept))?;
        let params = component
            .driver
            .as_ref()
            .map(|d| d.params.clone())
            .unwrap_or_default();
        self.install_file(&module, &kept, &params, version).await
    }

    async fn remove(&self, component: &Component) -> Result<(), BackendError> {
        let module = Self::module(component);
        if Self::reported(&module).is_some() {
            command::run("modprobe", &["-r", module.as_str()], &[], MODPROBE_LIMIT).await?;
        }
        // It describes a load that is over.
        let _ = std::fs::remove_file(self.record_path(&module));
        let installed = self.installed_path(&module);
        if installed.exists() {
            std::fs::remove_file(&installed).map_err(io(&installed))?;
            self.depmod().await?;
        }
        Ok(())
    }

    async fn restore(
        &self,
        component: &Component,
        snapshot: &Snapshot,
    ) -> Result<(), BackendError> {
        match snapshot {
            Snapshot::Absent => self.remove(component).await,
            Snapshot::Driver {
                version,
                ko,
                params,
            } => {
                self.install_file(&Self::module(component), ko, params, version)
                    .await
            }
            other => Err(BackendError::Invalid(format!(
                "driver {}: cannot restore {other:?}",
                component.name
            ))),
        }
    }

    async fn alive(&self, component: &Component) -> Result<(), String> {
        if component.state == manifests::ComponentState::Absent {
            return Ok(());
        }
        let module = Self::module(component);
        match self.loaded_version(&module) {
            Some(_) => Ok(()),
            None => Err(format!("module {module} is not loaded")),
        }
    }

    fn log_tail(&self, _component: &Component) -> Vec<String> {
        // The kernel log is where a module explains itself.
        // (dmesg is synchronous here: this is only called to build a failure report.)
        std::process::Command::new("dmesg")
            .arg("--ctime")
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout);
                let lines: Vec<String> = text.lines().map(str::to_string).collect();
                lines[lines.len().saturating_sub(10)..].to_vec()
            })
            .unwrap_or_default()
    }

    async fn prune_kept(
        &self,
        component: &Component,
        protect: &[&str],
        keep: usize,
    ) -> Vec<PathBuf> {
        let module = Self::module(component);
        let loaded = self.loaded_version(&module);
        self.prune_module(&module, loaded.as_deref(), protect, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_modules_are_pruned_but_not_the_loaded_or_protected_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let backend = DriverBackend::new(
            &tmp.path().join("root"),
            &tmp.path().join("state"),
            "6.1.0".into(),
        );
        let dir = tmp.path().join("state/drivers/mcp251x");
        std::fs::create_dir_all(&dir).unwrap();
        for version in ["5.0.0", "5.1.0", "5.2.0", "5.3.0", "5.4.0"] {
            std::fs::write(
                dir.join(format!("{version}.ko")),
                format!("module {version}"),
            )
            .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::write(dir.join("loaded.json"), "{}").unwrap();
        let mut removed = backend.prune_module("mcp251x", Some("5.2.0"), &["5.0.0"], 1);
        removed.sort();
        assert_eq!(removed, vec![dir.join("5.1.0.ko"), dir.join("5.3.0.ko")]);
        assert!(
            dir.join("loaded.json").exists(),
            "only .ko files are versions"
        );

        // Loaded without a version the kept files are named after: the one modprobe loads stays.
        let installed = backend.installed_path("mcp251x");
        std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
        std::fs::write(&installed, "module 5.0.0").unwrap();
        let removed = backend.prune_module("mcp251x", Some("unknown"), &[], 0);
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(dir.join("5.0.0.ko").exists());
        assert!(!dir.join("5.4.0.ko").exists());
    }

    fn record(reported: &str, srcversion: Option<&str>) -> LoadedRecord {
        LoadedRecord {
            reported: reported.into(),
            version: "5.1.0".into(),
            srcversion: srcversion.map(str::to_string),
        }
    }

    #[test]
    fn versions_that_are_not_semver_read_as_the_version_shoal_loaded() {
        // No MODULE_VERSION at all.
        let unknown = record("unknown", None);
        assert_eq!(resolve_version("unknown", None, Some(&unknown)), "5.1.0");
        assert_eq!(resolve_version("unknown", None, None), "unknown");
        // A vendor suffix.
        let vendor = record("5.1-k", Some("ABC123"));
        assert_eq!(
            resolve_version("5.1-k", Some("ABC123"), Some(&vendor)),
            "5.1.0"
        );
        assert_eq!(resolve_version("5.1-k", None, Some(&vendor)), "5.1.0");
        assert_eq!(
            resolve_version("5.1-k", Some("ABC123"), Some(&record("5.1-k", None))),
            "5.1.0"
        );
        // Another build reporting the same string: not what shoal loaded.
        assert_eq!(
            resolve_version("5.1-k", Some("DEF456"), Some(&vendor)),
            "5.1-k"
        );
        // Another string: not what shoal loaded either.
        assert_eq!(
            resolve_version("5.2-k", Some("ABC123"), Some(&vendor)),
            "5.2-k"
        );
        assert_eq!(resolve_version("unknown", None, Some(&vendor)), "unknown");
        // A valid semantic version is the module's own word, record or not.
        assert_eq!(
            resolve_version("5.2.0", None, Some(&record("5.2.0", None))),
            "5.2.0"
        );
        assert_eq!(resolve_version("5.1.0", None, None), "5.1.0");
    }

    #[test]
    fn the_load_record_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let backend = DriverBackend::new(tmp.path(), &tmp.path().join("state"), "6.1.0".into());
        let path = backend.record_path("mcp251x");
        assert_eq!(read_record(&path), None);
        let written = record("5.1-k", Some("ABC123"));
        write_record(&path, &written).unwrap();
        assert_eq!(path, tmp.path().join("state/drivers/mcp251x/loaded.json"));
        assert_eq!(read_record(&path), Some(written));
        let bare = record("unknown", None);
        write_record(&path, &bare).unwrap();
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("srcversion"));
        assert_eq!(read_record(&path), Some(bare));
        // A torn or foreign file is no record.
        std::fs::write(&path, "{\"reported\": ").unwrap();
        assert_eq!(read_record(&path), None);
    }

    #[test]
    fn module_versions_read_as_manifests_write_them() {
        assert_eq!(canonical_version("1.0"), "1.0.0");
        assert_eq!(canonical_version("1"), "1.0.0");
        assert_eq!(canonical_version("1.1.0"), "1.1.0");
        // Not numeric, or already longer: as the module says it.
        assert_eq!(canonical_version("5.1.0-k"), "5.1.0-k");
        assert_eq!(canonical_version("2.1.0.2"), "2.1.0.2");
        assert_eq!(canonical_version("1.0-rc1"), "1.0-rc1");
        assert_eq!(canonical_version(""), "");
    }
}
