//! Packages: dpkg for `.deb` artifacts, apt-get for repository versions, every
//! installed `.deb` kept so a revert needs no network. A managed package is put on hold
//! (dpkg's selection), so an operator's `apt-get upgrade` does not move a pinned version
//! behind shoal's back. To change the pin shoal releases the hold on that one package, and
//! no other (apt still refuses to move other held packages). dpkg's removal drops the hold. A package
//! that leaves every manifest stays installed and held: shoal does not know what the
//! operator's selection was before it took the package over.
//!
//! The inventory (`current`, every reconcile tick) reads dpkg's status file itself, parsed
//! once per change of the file; `dpkg-query` is run only to verify a change shoal just made,
//! and while dpkg has journal entries it has not folded into the status file yet.
//!
//! With a sandbox root (`nodelet --root DIR`), dpkg runs with `--root`,
//! `--admindir`, `--log` and `--force-script-chrootless`, so tests never touch
//! the host's package database or `/var/log/dpkg.log`.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use manifests::Component;

use super::{io, prunable, remove_kept, Backend, BackendError, Kept, Snapshot};
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
    /// The status file as last parsed, and what the admindir looked like then.
    inventory: Mutex<Option<Inventory>>,
}

/// dpkg's status file, parsed; valid while the file and the `updates/` folder look the same.
struct Inventory {
    status: FileKey,
    updates: Option<FileKey>,
    /// `updates/` held journal entries dpkg has not folded into the status file.
    pending: bool,
    packages: Arc<StatusFile>,
}

/// What tells a changed file from an unchanged one without reading it: dpkg replaces its
/// status file by renaming a new one over it, so the inode changes with every write; mtime
/// and length catch an editor writing in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileKey {
    fn of(path: &Path) -> Option<FileKey> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileKey {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}

impl PackageBackend {
    /// A backend for packages under `root`, keeping `.deb` files in `state_dir/debs`.
    pub fn new(root: &Path, state_dir: &Path) -> Self {
        PackageBackend {
            root: root.to_path_buf(),
            sandbox: root != Path::new("/"),
            debs: state_dir.join("debs"),
            inventory: Mutex::new(None),
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
        wait_for_dpkg().await;
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

    /// Checks that dpkg now has `package` at `version`, and holds it there. Asks dpkg-query,
    /// not the status file: this verifies a write, and dpkg-query is dpkg's own word on it.
    async fn hold_at(&self, package: &str, version: &str) -> Result<(), BackendError> {
        let installed = match self.query_state(package).await? {
            DpkgState::Installed(version) => Some(version),
            DpkgState::Absent | DpkgState::Unfinished(_) => None,
        };
        match installed {
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
        wait_for_dpkg().await;
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

    /// The package as dpkg's database has it: from the status file, parsed again only when it
    /// changed, so a tick without dpkg activity costs two stat() calls and no process.
    async fn dpkg_state(&self, package: &str) -> Result<DpkgState, BackendError> {
        let admin = self.admindir();
        let status_path = admin.join("status");
        let updates_path = admin.join("updates");
        let status = FileKey::of(&status_path);
        let updates = FileKey::of(&updates_path);
        let cached = {
            let inventory = self.inventory.lock().expect("not poisoned");
            inventory.as_ref().and_then(|i| {
                (Some(i.status) == status && i.updates == updates)
                    .then(|| (i.pending, i.packages.clone()))
            })
        };
        let (pending, packages) = match (cached, status) {
            (Some(cached), _) => cached,
            (None, Some(status)) => {
                let (pending, packages) = tokio::task::spawn_blocking(move || {
                    let pending = journal_pending(&updates_path);
                    let text = std::fs::read_to_string(&status_path).map_err(io(&status_path))?;
                    Ok::<_, BackendError>((pending, Arc::new(StatusFile::parse(&text))))
                })
                .await
                .map_err(|e| BackendError::Invalid(format!("reading dpkg's status file: {e}")))??;
                // File times are coarse (a clock tick or more): a change in the same tick as
                // this read would leave the key as it is. Keys that recent are not trusted; the
                // next call reads again.
                let settled = [Some(status), updates]
                    .iter()
                    .flatten()
                    .all(|key| settled(key.modified, SystemTime::now()));
                *self.inventory.lock().expect("not poisoned") = settled.then(|| Inventory {
                    status,
                    updates,
                    pending,
                    packages: packages.clone(),
                });
                (pending, packages)
            }
            // No database where dpkg keeps it: let dpkg-query say what it makes of that.
            (None, None) => return self.query_state(package).await,
        };
        if pending {
            // dpkg is mid-transaction (or died in one): the truth is the status file plus its
            // journal, which dpkg-query folds together.
            return self.query_state(package).await;
        }
        Ok(packages.state(package))
    }

    /// The package as dpkg-query reports it.
    async fn query_state(&self, package: &str) -> Result<DpkgState, BackendError> {
        let admindir = format!("--admindir={}", self.admindir().display());
        match command::run(
            "dpkg-query",
            &[
                admindir.as_str(),
                "-W",
                "-f=${db:Status-Abbrev}|${Version}|${Architecture}\n",
                package,
            ],
            &[],
            DPKG_LIMIT,
        )
        .await
        {
            Ok(output) => {
                // One line per architecture of a multi-arch package.
                let instances: Vec<Instance> = output
                    .stdout
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|line| {
                        let mut fields = line.splitn(3, '|');
                        Instance {
                            abbrev: fields.next().unwrap_or("").trim().to_string(),
                            version: fields.next().unwrap_or("").trim().to_string(),
                            architecture: fields.next().unwrap_or("").trim().to_string(),
                        }
                    })
                    .collect();
                Ok(fold_instances(&instances))
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

    /// The `.deb` files kept for `package`. Debian package names and versions have no `_`,
    /// so `<package>_` names that package's files and no other's.
    fn kept_debs(&self, package: &str) -> Vec<Kept> {
        let Ok(entries) = std::fs::read_dir(&self.debs) else {
            return Vec::new();
        };
        let prefix = format!("{package}_");
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let version = name.strip_prefix(&prefix)?.strip_suffix(".deb")?;
                Some(Kept {
                    version: version.replace("%3a", ":"),
                    modified: e.metadata().ok()?.modified().ok()?,
                    path: e.path(),
                })
            })
            .collect()
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
#[derive(Debug, Clone, PartialEq, Eq)]
enum DpkgState {
    Installed(String),
    Absent,
    /// dpkg's status letters, for a package in the middle of (or stuck half-way through) a change.
    Unfinished(String),
}

/// One architecture of a package, as dpkg-query's `${db:Status-Abbrev}` shows it: the
/// selection (`i`nstall, `h`old, `r`emove, `p`urge, `u`nknown), the state (`i`nstalled,
/// `n`ot-installed, `c`onfig-files, `U`npacked, `F` half-configured, `H`alf-installed,
/// `W`/`t` triggers) and the error flag (`R` reinstall-required), trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Instance {
    abbrev: String,
    version: String,
    architecture: String,
}

impl Instance {
    fn state_letter(&self) -> Option<char> {
        self.abbrev.chars().nth(1)
    }
}

/// What the instances of one package add up to. Architectures that are not installed (`n`,
/// `c`: removed, config files left) do not count: `libfoo:amd64` installed beside a removed
/// `libfoo:i386` is installed. Of the rest, every one must be installed at one version;
/// anything else is a change in progress, or one that failed half-way.
fn fold_instances(instances: &[Instance]) -> DpkgState {
    let present: Vec<&Instance> = instances
        .iter()
        .filter(|i| !matches!(i.state_letter(), Some('n' | 'c') | None))
        .collect();
    let Some(first) = present.first() else {
        return DpkgState::Absent;
    };
    if present
        .iter()
        .all(|i| i.state_letter() == Some('i') && i.version == first.version)
    {
        return DpkgState::Installed(first.version.clone());
    }
    if let [only] = present.as_slice() {
        return DpkgState::Unfinished(only.abbrev.clone());
    }
    DpkgState::Unfinished(
        present
            .iter()
            .map(|i| format!("{} {}:{}", i.abbrev, i.version, i.architecture))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// dpkg's status file (`<admindir>/status`), reduced to what the inventory needs.
#[derive(Debug, Default)]
struct StatusFile {
    packages: HashMap<String, Vec<Instance>>,
}

impl StatusFile {
    /// Parses the deb822 stanzas of a status file. Fields other than Package, Status, Version
    /// and Architecture (and continuation lines, which start with a space or a tab) are
    /// skipped; a stanza without Package or Status is ignored, as dpkg would not write one.
    fn parse(text: &str) -> StatusFile {
        let mut packages: HashMap<String, Vec<Instance>> = HashMap::new();
        let mut stanza: [Option<&str>; 4] = [None; 4];
        let mut finish = |stanza: &mut [Option<&str>; 4]| {
            if let [Some(package), Some(status), version, architecture] = *stanza {
                if let Some(abbrev) = status_abbrev(status) {
                    packages
                        .entry(package.to_string())
                        .or_default()
                        .push(Instance {
                            abbrev,
                            version: version.unwrap_or("").to_string(),
                            architecture: architecture.unwrap_or("").to_string(),
                        });
                }
            }
            *stanza = [None; 4];
        };
        for line in text.lines() {
            if line.trim().is_empty() {
                finish(&mut stanza);
                continue;
            }
            if line.starts_with([' ', '\t']) {
                continue;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let slot = ["Package", "Status", "Version", "Architecture"]
                .iter()
                .position(|field| name.eq_ignore_ascii_case(field));
            if let Some(slot) = slot {
                stanza[slot] = Some(value.trim());
            }
        }
        finish(&mut stanza);
        StatusFile { packages }
    }

    /// The state of `package`; `name:arch` looks at that architecture only, as dpkg-query does.
    fn state(&self, package: &str) -> DpkgState {
        let (name, arch) = match package.split_once(':') {
            Some((name, arch)) => (name, Some(arch)),
            None => (package, None),
        };
        let Some(instances) = self.packages.get(name) else {
            return DpkgState::Absent;
        };
        match arch {
            None => fold_instances(instances),
            Some(arch) => {
                let only: Vec<Instance> = instances
                    .iter()
                    .filter(|i| i.architecture == arch)
                    .cloned()
                    .collect();
                fold_instances(&only)
            }
        }
    }
}

/// `install ok installed` → `ii`, `hold ok installed` → `hi`, `install reinstreq
/// half-installed` → `iHR`: the letters dpkg-query's `${db:Status-Abbrev}` prints, trimmed.
/// `None` for a Status field dpkg would not write.
fn status_abbrev(status: &str) -> Option<String> {
    let mut words = status.split_whitespace();
    let want = match words.next()? {
        "unknown" => 'u',
        "install" => 'i',
        "hold" => 'h',
        "deinstall" => 'r',
        "purge" => 'p',
        _ => return None,
    };
    let flag = match words.next()? {
        "ok" => ' ',
        "reinstreq" => 'R',
        _ => return None,
    };
    let state = match words.next()? {
        "not-installed" => 'n',
        "config-files" => 'c',
        "half-installed" => 'H',
        "unpacked" => 'U',
        "half-configured" => 'F',
        "triggers-awaited" => 'W',
        "triggers-pending" => 't',
        "installed" => 'i',
        _ => return None,
    };
    Some(format!("{want}{state}{flag}").trim_end().to_string())
}

/// How old a file's mtime must be before a key with it is trusted to show the next change.
const SETTLED: Duration = Duration::from_secs(2);

/// Whether `modified` is far enough in the past that a later write would show in it.
fn settled(modified: Option<SystemTime>, now: SystemTime) -> bool {
    modified
        .and_then(|m| now.duration_since(m).ok())
        .is_some_and(|age| age >= SETTLED)
}

/// Whether dpkg's `updates/` folder holds journal entries (files named by a number only)
/// that it has not folded into the status file yet.
fn journal_pending(updates: &Path) -> bool {
    std::fs::read_dir(updates).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
        })
    })
}

/// How long a dpkg step waits for another dpkg to finish.
const DPKG_WAIT: Duration = Duration::from_secs(300);

/// Waits (bounded) until no dpkg runs: an operator's apt-get (or a dpkg that outlived a killed
/// nodelet) would otherwise make ours fail on dpkg's lock — and a revert that fails that way
/// leaves the node Failed. After the wait, dpkg itself says what holds its lock.
async fn wait_for_dpkg() {
    let deadline = tokio::time::Instant::now() + DPKG_WAIT;
    let mut said = false;
    while dpkg_running() && tokio::time::Instant::now() < deadline {
        if !said {
            tracing::info!("another dpkg is running; waiting for it to finish");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
            // No dpkg runs now, but one may have ended between the read and the look at the
            // processes (its last state read as unfinished): read once more, then a package
            // still half-way is stuck — not installed, and the reconcile repairs it.
            DpkgState::Unfinished(_) => match self.dpkg_state(package).await? {
                DpkgState::Installed(version) => Ok(Some(version)),
                DpkgState::Absent | DpkgState::Unfinished(_) => Ok(None),
            },
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

    async fn prune_kept(
        &self,
        component: &Component,
        protect: &[&str],
        keep: usize,
    ) -> Vec<PathBuf> {
        let package = self.package_name(component);
        let installed = match self.dpkg_state(package).await {
            Ok(DpkgState::Installed(version)) => Some(version),
            Ok(DpkgState::Absent) => None,
            // Half-way through a change, the .deb to finish (or undo) it with may be any of them.
            Ok(DpkgState::Unfinished(_)) => return Vec::new(),
            Err(e) => {
                tracing::warn!(package, error = %e, "not pruning kept .deb files: cannot tell what is installed");
                return Vec::new();
            }
        };
        let doomed = prunable(self.kept_debs(package), installed.as_deref(), protect, keep);
        remove_kept(doomed, ".deb")
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
        deb_with(dir, scripts, false)
    }

    /// A `.deb` of `shoal-busy` 1.0 with the given maintainer scripts, and with a conffile
    /// (`/etc/shoal-busy.conf`, which removal leaves behind) if `conffile`.
    fn deb_with(dir: &Path, scripts: &[(&str, &str)], conffile: bool) -> PathBuf {
        let staging = dir.join("deb");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(staging.join("DEBIAN")).unwrap();
        std::fs::write(
            staging.join("DEBIAN/control"),
            "Package: shoal-busy\nVersion: 1.0\nArchitecture: all\nMaintainer: shoal <shoal@example.invalid>\nDescription: test\n",
        )
        .unwrap();
        if conffile {
            std::fs::create_dir_all(staging.join("etc")).unwrap();
            std::fs::write(staging.join("etc/shoal-busy.conf"), "setting = 1\n").unwrap();
            std::fs::write(staging.join("DEBIAN/conffiles"), "/etc/shoal-busy.conf\n").unwrap();
        }
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

    /// A status file as dpkg writes one, with the cases the inventory must tell apart.
    const STATUS: &str = "\
Package: plain
Status: install ok installed
Priority: optional
Version: 1.2-3
Architecture: arm64
Description: an installed package
 whose description goes on.
 Package: not-a-package
 Status: install ok installed

Package: pinned
Status: hold ok installed
Version: 1:2.0~rc1-1
Architecture: all

Package: broken
Status: install ok half-configured
Version: 0.9
Architecture: amd64

Package: removed
Status: deinstall ok config-files
Version: 3.0
Conffiles:
 /etc/removed.conf 0123456789abcdef

Package: unpacked
Status: install reinstreq half-installed
Version: 4.0
Architecture: amd64

Package: libboth
Status: install ok installed
Version: 2.1
Architecture: amd64
Multi-Arch: same

Package: libboth
Status: install ok installed
Version: 2.1
Architecture: i386
Multi-Arch: same

Package: libmid
Status: install ok installed
Version: 2.1
Architecture: amd64

Package: libmid
Status: install ok unpacked
Version: 2.2
Architecture: i386

Package: libone
Status: install ok installed
Version: 5
Architecture: amd64

Package: libone
Status: deinstall ok config-files
Version: 4
Architecture: i386
";

    #[test]
    fn the_status_file_reads_as_dpkg_query_would() {
        let status = StatusFile::parse(STATUS);
        let installed = |v: &str| DpkgState::Installed(v.to_string());
        let unfinished = |s: &str| DpkgState::Unfinished(s.to_string());
        assert_eq!(status.state("plain"), installed("1.2-3"));
        assert_eq!(status.state("pinned"), installed("1:2.0~rc1-1"));
        assert_eq!(status.state("broken"), unfinished("iF"));
        assert_eq!(status.state("removed"), DpkgState::Absent);
        assert_eq!(status.state("unpacked"), unfinished("iHR"));
        assert_eq!(status.state("never-heard-of"), DpkgState::Absent);
        // Continuation lines are part of the field above them, never a stanza of their own.
        assert_eq!(status.state("not-a-package"), DpkgState::Absent);
        // Multi-arch: installed only when every installed architecture has the same version.
        assert_eq!(status.state("libboth"), installed("2.1"));
        assert_eq!(
            status.state("libmid"),
            unfinished("ii 2.1:amd64, iU 2.2:i386")
        );
        assert_eq!(status.state("libmid:amd64"), installed("2.1"));
        assert_eq!(status.state("libmid:i386"), unfinished("iU"));
        // A removed architecture (config files left) does not make the other one unfinished.
        assert_eq!(status.state("libone"), installed("5"));
        assert_eq!(status.state("libone:i386"), DpkgState::Absent);
    }

    #[test]
    fn status_words_map_to_dpkg_query_letters() {
        assert_eq!(status_abbrev("install ok installed").as_deref(), Some("ii"));
        assert_eq!(status_abbrev("hold ok installed").as_deref(), Some("hi"));
        assert_eq!(
            status_abbrev("deinstall ok config-files").as_deref(),
            Some("rc")
        );
        assert_eq!(
            status_abbrev("purge ok not-installed").as_deref(),
            Some("pn")
        );
        assert_eq!(
            status_abbrev("unknown ok not-installed").as_deref(),
            Some("un")
        );
        assert_eq!(
            status_abbrev("install ok triggers-pending").as_deref(),
            Some("it")
        );
        assert_eq!(
            status_abbrev("install ok triggers-awaited").as_deref(),
            Some("iW")
        );
        assert_eq!(
            status_abbrev("install reinstreq half-installed").as_deref(),
            Some("iHR")
        );
        assert_eq!(status_abbrev("install ok"), None);
        assert_eq!(status_abbrev("install maybe installed"), None);
    }

    #[test]
    fn only_old_file_times_are_trusted() {
        let now = SystemTime::now();
        assert!(settled(Some(now - Duration::from_secs(60)), now));
        assert!(!settled(Some(now - Duration::from_millis(500)), now));
        assert!(
            !settled(Some(now + Duration::from_secs(60)), now),
            "a clock stepped back"
        );
        assert!(!settled(None, now));
    }

    /// Writes the sandbox's status file by renaming a new one over it, as dpkg does, dated an
    /// hour ago so the backend trusts its key.
    fn write_status(backend: &PackageBackend, text: &str) {
        let path = backend.admindir().join("status");
        let tmp = backend.admindir().join("status-new");
        std::fs::write(&tmp, text).unwrap();
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let updates = std::fs::File::open(backend.admindir().join("updates")).unwrap();
        updates.set_modified(hour_ago).unwrap();
    }

    #[tokio::test]
    async fn a_changed_status_file_is_read_again() {
        let (_tmp, backend) = sandbox();
        write_status(
            &backend,
            "Package: p\nStatus: install ok installed\nVersion: 1.0\n",
        );
        assert_eq!(
            backend.dpkg_state("p").await.unwrap(),
            DpkgState::Installed("1.0".into())
        );
        assert!(
            backend.inventory.lock().unwrap().is_some(),
            "kept for the next tick"
        );
        write_status(
            &backend,
            "Package: p\nStatus: install ok installed\nVersion: 1.1\n",
        );
        assert_eq!(
            backend.dpkg_state("p").await.unwrap(),
            DpkgState::Installed("1.1".into())
        );
    }

    /// While dpkg's journal holds entries it has not folded into the status file, the status
    /// file alone is out of date: dpkg-query reads both.
    #[tokio::test]
    async fn a_pending_dpkg_journal_is_read_through_dpkg_query() {
        let (_tmp, backend) = sandbox();
        write_status(
            &backend,
            "Package: p\nStatus: install ok installed\nVersion: 1.0\nArchitecture: all\n",
        );
        assert_eq!(
            backend.dpkg_state("p").await.unwrap(),
            DpkgState::Installed("1.0".into())
        );
        std::fs::write(
            backend.admindir().join("updates/0000"),
            "Package: p\nStatus: install ok half-configured\nVersion: 1.1\nArchitecture: all\n",
        )
        .unwrap();
        assert!(journal_pending(&backend.admindir().join("updates")));
        assert_eq!(
            backend.dpkg_state("p").await.unwrap(),
            DpkgState::Unfinished("iF".into())
        );
    }

    #[test]
    fn only_numbered_files_are_journal_entries() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!journal_pending(tmp.path()));
        std::fs::write(tmp.path().join("tmp.i"), "").unwrap();
        assert!(!journal_pending(tmp.path()));
        std::fs::write(tmp.path().join("0003"), "").unwrap();
        assert!(journal_pending(tmp.path()));
        assert!(!journal_pending(&tmp.path().join("missing")));
    }

    /// The parser against dpkg itself, on a real database through a package's life.
    #[tokio::test]
    async fn the_parser_agrees_with_dpkg_query() {
        let _one_at_a_time = DPKG.lock().await;
        let (tmp, backend) = sandbox();
        let agree = |step: &'static str| {
            let backend = &backend;
            async move {
                assert!(
                    !journal_pending(&backend.admindir().join("updates")),
                    "{step}"
                );
                let text = std::fs::read_to_string(backend.admindir().join("status")).unwrap();
                let parsed = StatusFile::parse(&text);
                for package in ["shoal-busy", "shoal-never-installed"] {
                    let queried = backend.query_state(package).await.unwrap();
                    assert_eq!(parsed.state(package), queried, "{step}: {package}\n{text}");
                }
                parsed.state("shoal-busy")
            }
        };
        assert_eq!(agree("empty").await, DpkgState::Absent);

        let deb = deb_with(tmp.path(), &[], true);
        backend
            .dpkg(&["--install", deb.to_str().unwrap()])
            .await
            .unwrap();
        assert_eq!(agree("installed").await, DpkgState::Installed("1.0".into()));

        backend.select("shoal-busy", "hold").await.unwrap();
        assert_eq!(agree("held").await, DpkgState::Installed("1.0".into()));

        backend.dpkg(&["--remove", "shoal-busy"]).await.unwrap();
        assert_eq!(agree("config files left").await, DpkgState::Absent);
        assert!(std::fs::read_to_string(backend.admindir().join("status"))
            .unwrap()
            .contains("config-files"));

        let failing = deb_with(tmp.path(), &[("postinst", "exit 1")], true);
        assert!(backend
            .dpkg(&["--install", failing.to_str().unwrap()])
            .await
            .is_err());
        assert_eq!(
            agree("half-configured").await,
            DpkgState::Unfinished("iF".into())
        );
    }

    #[tokio::test]
    async fn kept_debs_are_pruned_but_not_the_installed_or_protected_ones() {
        let (_tmp, backend) = sandbox();
        write_status(
            &backend,
            "Package: p\nStatus: hold ok installed\nVersion: 1:1.2\nArchitecture: all\n",
        );
        std::fs::create_dir_all(&backend.debs).unwrap();
        let versions = ["1.0", "1.1", "1:1.2", "1:1.3", "1:1.4"];
        for (age, version) in versions.iter().rev().enumerate() {
            let path = backend.kept_deb("p", version);
            std::fs::write(&path, version).unwrap();
            let when = SystemTime::now() - Duration::from_secs(100 * (age as u64 + 1));
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        // Another package's file, whose name starts the same way.
        std::fs::write(backend.debs.join("p2_0.1.deb"), "").unwrap();
        let component: Component = serde_json::from_value(serde_json::json!({
            "name": "p", "kind": "package", "version": "1:1.4",
        }))
        .unwrap();
        let mut removed = backend.prune_kept(&component, &["1.0"], 1).await;
        removed.sort();
        assert_eq!(
            removed,
            vec![backend.kept_deb("p", "1:1.3"), backend.kept_deb("p", "1.1")],
            "kept: 1:1.2 installed, 1.0 protected, 1:1.4 the newest other"
        );
        assert!(backend.kept_deb("p", "1:1.2").exists());
        assert!(backend.kept_deb("p", "1.0").exists());
        assert!(backend.kept_deb("p", "1:1.4").exists());
        assert!(backend.debs.join("p2_0.1.deb").exists());

        // Half-way through a change, nothing goes.
        write_status(
            &backend,
            "Package: p\nStatus: install ok half-configured\nVersion: 1:1.4\nArchitecture: all\n",
        );
        assert!(backend.prune_kept(&component, &[], 0).await.is_empty());
    }
}
