//! Packages: dpkg for `.deb` artifacts, apt-get for repository versions, every
//! installed `.deb` kept so a revert needs no network. A managed package is put on hold
//! (dpkg's selection), so an operator's `apt-get upgrade` does not move a pinned version
//! behind shoal's back. To change the pin shoal releases the hold on that one package, and
//! no other (apt still refuses to move other held packages). dpkg's removal drops the hold. A package
//! that leaves every manifest stays installed and held: shoal does not know what the
//! operator's selection was before it took the package over.
//!
//! With a sandbox root (`nodelet --root DIR`), dpkg runs with `--root`,
//! `--admindir`, `--log` and `--force-script-chrootless`, so tests never touch
//! the host's package database or `/var/log/dpkg.log`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use manifests::Component;

use super::{io, Backend, BackendError, Snapshot};
use crate::command;

const DPKG_LIMIT: Duration = Duration::from_secs(600);
/// Reading package lists: a slow mirror must not hold an install (or a revert) for ten minutes.
const APT_UPDATE_LIMIT: Duration = Duration::from_secs(120);
const APT_ENV: [(&str, &str); 1] = [("DEBIAN_FRONTEND", "noninteractive")];

/// The package backend.
pub struct PackageBackend {
    root: PathBuf,
    sandbox: bool,
    /// Every `.deb` installed, as `<package>_<version>.deb`.
    debs: PathBuf,
}

impl PackageBackend {
    /// A backend for packages under `root`, keeping `.deb` files in `state_dir/debs`.
    pub fn new(root: &Path, state_dir: &Path) -> Self {
        PackageBackend {
            root: root.to_path_buf(),
            sandbox: root != Path::new("/"),
            debs: state_dir.join("debs"),
        }
    }

    fn admindir(&self) -> PathBuf {
        self.root.join("var/lib/dpkg")
    }

    /// Creates an empty dpkg database in a sandbox root, as a fresh install has.
    pub fn prepare_sandbox(&self) -> Result<(), BackendError> {
        if !self.sandbox {
            return Ok(());
        }
        let admin = self.admindir();
        for dir in ["info", "updates", "triggers", "alternatives"] {
            let path = admin.join(dir);
            std::fs::create_dir_all(&path).map_err(io(&path))?;
        }
        for file in ["status", "available"] {
            let path = admin.join(file);
            if !path.exists() {
                std::fs::write(&path, b"").map_err(io(&path))?;
            }
        }
        let log = self.root.join("var/log");
        std::fs::create_dir_all(&log).map_err(io(&log))?;
        Ok(())
    }

    fn dpkg_options(&self) -> Vec<String> {
        // The hold is ours (see `hold`): shoal changes a pinned package on purpose.
        let mut options = vec!["--force-hold".to_string()];
        if self.sandbox {
            options.extend([
                format!("--root={}", self.root.display()),
                format!("--admindir={}", self.admindir().display()),
                format!("--log={}", self.root.join("var/log/dpkg.log").display()),
                "--force-script-chrootless".into(),
                "--force-not-root".into(),
            ]);
        }
        options
    }

    /// Sets dpkg's selection for `package` (`hold` pins it; `install` releases it), and checks
    /// that dpkg took it: `--set-selections` only warns about a package it does not know.
    async fn select(&self, package: &str, selection: &str) -> Result<(), BackendError> {
        let mut args = self.dpkg_options();
        args.push("--set-selections".into());
        command::run_with_input(
            "dpkg",
            &args,
            &[],
            format!("{package} {selection}\n").into_bytes(),
            DPKG_LIMIT,
        )
        .await?;
        let admindir = format!("--admindir={}", self.admindir().display());
        let want = command::run(
            "dpkg-query",
            &[admindir.as_str(), "-W", "-f=${db:Status-Want}\n", package],
            &[],
            DPKG_LIMIT,
        )
        .await?;
        // One line per installed architecture (multi-arch packages): each must have taken it.
        let wants: Vec<&str> = want
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if wants.is_empty() || wants.iter().any(|w| *w != selection) {
            return Err(BackendError::Invalid(format!(
                "dpkg did not take the selection `{selection}` for {package}: it says `{}`",
                want.stdout.trim()
            )));
        }
        Ok(())
    }

    /// Checks that dpkg now has `package` at `version`, and holds it there.
    async fn hold_at(&self, package: &str, version: &str) -> Result<(), BackendError> {
        match self.installed_version(package).await? {
            Some(installed) if installed == version => self.select(package, "hold").await,
            other => Err(BackendError::Invalid(format!(
                "after installing, dpkg reports {package} at {} instead of {version}; is the artifact the version the manifest pins?",
                other.as_deref().unwrap_or("nothing")
            ))),
        }
    }

    /// `apt-get install package=version`. `refresh` reads the package lists first: a new pin may
    /// have been published after apt last read them; a revert goes back to a version apt knew.
    async fn apt_install(
        &self,
        package: &str,
        version: &str,
        refresh: bool,
    ) -> Result<(), BackendError> {
        if refresh {
            // A source that cannot be read is not fatal: the install says whether the version is known.
            if let Err(e) =
                command::run("apt-get", &["update", "-q"], &APT_ENV, APT_UPDATE_LIMIT).await
            {
                tracing::warn!(error = %e, "apt-get update failed; installing from the lists apt has");
            }
        }
        // Release our own hold, and only ours: apt must still refuse to move a package that
        // the operator holds (no --allow-change-held-packages).
        let held = self.installed_version(package).await?.is_some();
        if held {
            self.select(package, "install").await?;
        }
        let pin = format!("{package}={version}");
        let installed = command::run(
            "apt-get",
            &[
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "--allow-downgrades",
                "-o",
                "Dpkg::Options::=--force-confold",
                pin.as_str(),
            ],
            &APT_ENV,
            DPKG_LIMIT,
        )
        .await;
        if let Err(e) = installed {
            if held {
                // Nothing changed: pin the version that is still there again.
                let _ = self.select(package, "hold").await;
            }
            return Err(e.into());
        }
        // Keep apt's .deb so a later revert needs no network.
        if let Some(deb) = self.find_deb(package, version) {
            std::fs::create_dir_all(&self.debs).map_err(io(&self.debs))?;
            let _ = std::fs::copy(&deb, self.kept_deb(package, version));
        }
        Ok(())
    }

    fn package_name<'a>(&self, component: &'a Component) -> &'a str {
        component
            .package
            .as_ref()
            .and_then(|p| p.name.as_deref())
            .unwrap_or(&component.name)
    }

    async fn dpkg(&self, args: &[&str]) -> Result<command::Output, BackendError> {
        let mut all = self.dpkg_options();
        all.extend(args.iter().map(|a| a.to_string()));
        Ok(command::run("dpkg", &all, &[], DPKG_LIMIT).await?)
    }

    async fn installed_version(&self, package: &str) -> Result<Option<String>, BackendError> {
        Ok(match self.dpkg_state(package).await? {
            DpkgState::Installed(version) => Some(version),
            DpkgState::Absent | DpkgState::Unfinished(_) => None,
        })
    }

    async fn dpkg_state(&self, package: &str) -> Result<DpkgState, BackendError> {
        let admindir = format!("--admindir={}", self.admindir().display());
        match command::run(
            "dpkg-query",
            &[
                admindir.as_str(),
                "-W",
                "-f=${db:Status-Abbrev}|${Version}",
                package,
            ],
            &[],
            DPKG_LIMIT,
        )
        .await
        {
            Ok(output) => {
                let (status, version) = output.stdout.split_once('|').unwrap_or(("", ""));
                // The second letter is the package's state: `i` installed (`ii`, or `hi` held),
                // `n`/`c` not installed (`un`, `rc`); anything else (`U` unpacked, `F`
                // half-configured, `H` half-installed, `W`/`t` triggers) is a change in progress
                // or one that failed half-way.
                Ok(match status.get(1..2) {
                    Some("i") => DpkgState::Installed(version.trim().to_string()),
                    Some("n" | "c") | None => DpkgState::Absent,
                    Some(_) => DpkgState::Unfinished(status.trim().to_string()),
                })
            }
            // dpkg-query exits 1 for a package it has never heard of.
            Err(command::CommandError::Failed { .. }) => Ok(DpkgState::Absent),
            Err(e) => Err(e.into()),
        }
    }

    fn kept_deb(&self, package: &str, version: &str) -> PathBuf {
        // ':' of an epoch is not welcome in file names; dpkg's own cache writes it as %3a.
        self.debs
            .join(format!("{package}_{}.deb", version.replace(':', "%3a")))
    }

    /// Finds a `.deb` of the installed version: ours, or apt's cache.
    fn find_deb(&self, package: &str, version: &str) -> Option<PathBuf> {
        let kept = self.kept_deb(package, version);
        if kept.exists() {
            return Some(kept);
        }
        let archives = self.root.join("var/cache/apt/archives");
        let prefix = format!("{package}_{}_", version.replace(':', "%3a"));
        std::fs::read_dir(archives)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
    }

    async fn install_deb(&self, package: &str, deb: &Path) -> Result<(), BackendError> {
        let deb_str = deb.display().to_string();
        let fields = command::run(
            "dpkg-deb",
            &["-f", deb_str.as_str(), "Package", "Version"],
            &[],
            DPKG_LIMIT,
        )
        .await?;
        let mut name = "";
        let mut version = "";
        for line in fields.stdout.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = v.trim();
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = v.trim();
            }
        }
        if name != package {
            return Err(BackendError::Invalid(format!(
                "the .deb contains package `{name}`, not `{package}`"
            )));
        }
        std::fs::create_dir_all(&self.debs).map_err(io(&self.debs))?;
        let kept = self.kept_deb(package, version);
        if !kept.exists() {
            let tmp = kept.with_extension("deb.tmp");
            std::fs::copy(deb, &tmp).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &kept).map_err(io(&kept))?;
        }
        let kept_str = kept.display().to_string();
        self.dpkg(&["--install", kept_str.as_str()]).await?;
        Ok(())
    }
}

/// A package as dpkg's database has it.
enum DpkgState {
    Installed(String),
    Absent,
    /// dpkg's status letters, for a package in the middle of (or stuck half-way through) a change.
    Unfinished(String),
}

/// Whether a dpkg process runs on this machine (anyone's: an operator's, apt's, ours).
fn dpkg_running() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
            && std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim() == "dpkg")
    })
}

impl Backend for PackageBackend {
    async fn current(&self, component: &Component) -> Result<Option<String>, BackendError> {
        let package = self.package_name(component);
        match self.dpkg_state(package).await? {
            DpkgState::Installed(version) => Ok(Some(version)),
            DpkgState::Absent => Ok(None),
            // Someone's dpkg is changing it right now: read it again when that is done.
            DpkgState::Unfinished(status) if dpkg_running() => Err(BackendError::Invalid(format!(
                "dpkg is changing {package} right now (status `{status}`)"
            ))),
            // Stuck half-way with no dpkg running: not installed, and the reconcile repairs it.
            DpkgState::Unfinished(_) => Ok(None),
        }
    }

    async fn snapshot(&self, component: &Component) -> Result<Snapshot, BackendError> {
        let package = self.package_name(component);
        Ok(match self.installed_version(package).await? {
            None => Snapshot::Absent,
            Some(version) => {
                let deb = self.find_deb(package, &version);
                Snapshot::Package { version, deb }
            }
        })
    }

    async fn apply(
        &self,
        component: &Component,
        artifact: Option<&Path>,
    ) -> Result<(), BackendError> {
        let package = self.package_name(component);
        let version = component
            .version
            .as_deref()
            .ok_or_else(|| BackendError::Invalid("no version".into()))?;
        match artifact {
            Some(deb) => self.install_deb(package, deb).await?,
            None => {
                if self.sandbox {
                    return Err(BackendError::Invalid(format!(
                        "package {package} has no artifact: installing from apt needs the real root (--root /); give a .deb artifact in sandbox roots"
                    )));
                }
                self.apt_install(package, version, true).await?;
            }
        }
        self.hold_at(package, version).await
    }

    async fn remove(&self, component: &Component) -> Result<(), BackendError> {
        let package = self.package_name(component);
        if self.installed_version(package).await?.is_some() {
            // dpkg's removal also drops the hold: the selection becomes `deinstall` (`rc`).
            self.dpkg(&["--remove", package]).await?;
        }
        Ok(())
    }

    async fn restore(
        &self,
        component: &Component,
        snapshot: &Snapshot,
    ) -> Result<(), BackendError> {
        let package = self.package_name(component);
        match snapshot {
            Snapshot::Absent => self.remove(component).await,
            Snapshot::Package {
                version,
                deb: Some(deb),
            } => {
                // Already there (a failed change may have left it so): make sure it is held.
                if self.installed_version(package).await?.as_deref() != Some(version) {
                    self.install_deb(package, deb).await?;
                }
                self.hold_at(package, version).await
            }
            Snapshot::Package { version, deb: None } => {
                if self.sandbox {
                    return Err(BackendError::Invalid(format!(
                        "package {package}: no .deb of {version} is kept, and a sandbox root cannot install from apt"
                    )));
                }
                if self.installed_version(package).await?.as_deref() != Some(version) {
                    self.apt_install(package, version, false).await?;
                }
                self.hold_at(package, version).await
            }
            other => Err(BackendError::Invalid(format!(
                "package {package}: cannot restore {other:?}"
            ))),
        }
    }

    async fn alive(&self, _component: &Component) -> Result<(), String> {
        Ok(())
    }

    fn log_tail(&self, _component: &Component) -> Vec<String> {
        let log = self.root.join("var/log/dpkg.log");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines[lines.len().saturating_sub(10)..].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These tests run dpkg, and `current` looks for any running dpkg: one at a time.
    static DPKG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A backend on an empty dpkg database in a temporary sandbox root.
    fn sandbox() -> (tempfile::TempDir, PackageBackend) {
        let tmp = tempfile::tempdir().unwrap();
        let backend = PackageBackend::new(&tmp.path().join("root"), &tmp.path().join("state"));
        backend.prepare_sandbox().unwrap();
        (tmp, backend)
    }

    /// A `.deb` of `shoal-busy` 1.0 with the given maintainer scripts.
    fn deb_with_scripts(dir: &Path, scripts: &[(&str, &str)]) -> PathBuf {
        let staging = dir.join("deb");
        std::fs::create_dir_all(staging.join("DEBIAN")).unwrap();
        std::fs::write(
            staging.join("DEBIAN/control"),
            "Package: shoal-busy\nVersion: 1.0\nArchitecture: all\nMaintainer: shoal <shoal@example.invalid>\nDescription: test\n",
        )
        .unwrap();
        for (name, body) in scripts {
            use std::os::unix::fs::PermissionsExt;
            let path = staging.join("DEBIAN").join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let deb = dir.join("shoal-busy.deb");
        let status = std::process::Command::new("dpkg-deb")
            .args(["--root-owner-group", "-b"])
            .arg(&staging)
            .arg(&deb)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        deb
    }

    fn component() -> Component {
        serde_json::from_value(serde_json::json!({
            "name": "shoal-busy", "kind": "package", "version": "1.0",
        }))
        .unwrap()
    }

    /// While someone's dpkg is installing the package, the inventory says "cannot tell"
    /// instead of "absent" (which would reinstall over it); once dpkg is done, the version.
    #[tokio::test]
    async fn a_package_dpkg_is_changing_is_unknown_not_absent() {
        let _one_at_a_time = DPKG.lock().await;
        let (tmp, backend) = sandbox();
        let deb = deb_with_scripts(tmp.path(), &[("postinst", "sleep 3")]);
        let mut args = backend.dpkg_options();
        args.extend(["--install".into(), deb.display().to_string()]);
        let mut operator = std::process::Command::new("dpkg")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let busy = loop {
            match backend.current(&component()).await {
                Err(e) => break e.to_string(),
                Ok(v) => assert!(
                    std::time::Instant::now() < deadline && v.is_none(),
                    "never seen busy: {v:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(busy.contains("dpkg is changing shoal-busy"), "{busy}");
        assert!(operator.wait().unwrap().success());
        assert_eq!(
            backend.current(&component()).await.unwrap().as_deref(),
            Some("1.0")
        );
    }

    /// A package left half-configured by a failed script, with no dpkg running, is not
    /// installed: the reconcile puts the pinned version in place again.
    #[tokio::test]
    async fn a_package_stuck_half_way_counts_as_absent() {
        let _one_at_a_time = DPKG.lock().await;
        let (tmp, backend) = sandbox();
        let deb = deb_with_scripts(tmp.path(), &[("postinst", "exit 1")]);
        assert!(backend
            .dpkg(&["--install", deb.to_str().unwrap()])
            .await
            .is_err());
        let DpkgState::Unfinished(status) = backend.dpkg_state("shoal-busy").await.unwrap() else {
            panic!("expected a half-configured package");
        };
        assert_eq!(status.get(1..2), Some("F"), "{status}");
        assert_eq!(backend.current(&component()).await.unwrap(), None);
    }

    /// dpkg only warns when asked to hold a package it does not know; shoal must not take
    /// that for a hold.
    #[tokio::test]
    async fn a_hold_dpkg_did_not_take_is_an_error() {
        let _one_at_a_time = DPKG.lock().await;
        let (_tmp, backend) = sandbox();
        let result = backend.select("shoal-not-installed", "hold").await;
        assert!(result.is_err(), "{result:?}");
        let status = std::fs::read_to_string(backend.admindir().join("status")).unwrap();
        assert!(!status.contains("shoal-not-installed"), "{status}");
    }
}
