//! Services: tar.gz artifacts unpacked per version, an atomic `current` symlink,
//! and either systemd or the built-in supervisor to run them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use manifests::{Component, ServiceSettings};

use super::{io, prunable, remove_kept, Backend, BackendError, Kept, Snapshot};
use crate::artifact::unpack_tar_gz;
use crate::command;
use crate::supervisor::{Account, RunSpec, Supervisor};

/// How services are run.
pub enum Runner {
    /// Units under `/etc/systemd/system`, driven with systemctl (systemd is PID 1).
    Systemd {
        /// Where unit files go.
        unit_dir: PathBuf,
    },
    /// The nodelet's own supervisor (containers, small boards, sandbox roots).
    Supervisor(Arc<Supervisor>),
}

/// The service backend.
pub struct ServiceBackend {
    /// `<root>/var/lib/shoal/services`.
    dir: PathBuf,
    runner: Runner,
}

/// True when systemd is the init system (sd_booted(3): `/run/systemd/system` exists).
pub fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn unit_name(name: &str) -> String {
    format!("shoal-{name}.service")
}

const SYSTEMCTL_LIMIT: Duration = Duration::from_secs(60);

impl ServiceBackend {
    /// A backend for services under `root`. Old versions are pruned by the agent after a
    /// commit (`prune_kept`), never by a step.
    pub fn new(root: &Path, runner: Runner) -> Self {
        ServiceBackend {
            dir: root.join("var/lib/shoal/services"),
            runner,
        }
    }

    /// The supervisor, when services run under it.
    pub fn supervisor(&self) -> Option<&Arc<Supervisor>> {
        match &self.runner {
            Runner::Supervisor(s) => Some(s),
            Runner::Systemd { .. } => None,
        }
    }

    fn service_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn version_dir(&self, name: &str, version: &str) -> PathBuf {
        self.service_dir(name).join(version)
    }

    fn current_link(&self, name: &str) -> PathBuf {
        self.service_dir(name).join("current")
    }

    /// Where the settings a version was last started with are kept: a revert restarts the old
    /// version with its own exec and env, not the new manifest's (systemd forgets them once the
    /// unit is rewritten, and the supervisor forgets them when the nodelet restarts).
    fn settings_path(&self, name: &str, version: &str) -> PathBuf {
        self.service_dir(name)
            .join(format!(".{version}.settings.json"))
    }

    fn record_settings(
        &self,
        name: &str,
        version: &str,
        settings: &ServiceSettings,
    ) -> Result<(), BackendError> {
        let path = self.settings_path(name, version);
        let json = serde_json::to_vec(settings).expect("settings serialize");
        crate::journal::write_atomic(&path, &json).map_err(io(&path))
    }

    fn recorded_settings(&self, name: &str, version: &str) -> Option<ServiceSettings> {
        let bytes = std::fs::read(self.settings_path(name, version)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn current_version(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.current_link(name)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Points `current` at `version` in one rename, so readers see the old or the new, never neither.
    fn switch(&self, name: &str, version: &str) -> Result<(), BackendError> {
        let dir = self.service_dir(name);
        let tmp = dir.join(".current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(version, &tmp).map_err(io(&tmp))?;
        std::fs::rename(&tmp, self.current_link(name)).map_err(io(&dir))
    }

    fn run_spec(
        &self,
        name: &str,
        version: &str,
        settings: &ServiceSettings,
    ) -> Result<RunSpec, BackendError> {
        let dir = self.version_dir(name, version);
        let program = PathBuf::from(&settings.exec[0]);
        let program = if program.is_absolute() {
            program
        } else {
            dir.join(program)
        };
        if !program.exists() {
            return Err(BackendError::Invalid(format!(
                "service {name} {version}: program {} is not in the artifact",
                program.display()
            )));
        }
        Ok(RunSpec {
            name: name.to_string(),
            program,
            args: settings.exec[1..].to_vec(),
            env: settings.env.clone(),
            cwd: dir,
            account: account(name, settings)?,
        })
    }

    async fn start(
        &self,
        name: &str,
        version: &str,
        settings: &ServiceSettings,
    ) -> Result<(), BackendError> {
        let spec = self.run_spec(name, version, settings)?;
        // The files belong to whoever the service runs as (root's own when it runs as root),
        // on every start: a version unpacked for one user may later run as another.
        let account = spec.account.as_ref();
        let uid = account
            .and_then(|a| a.uid)
            .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
        let gid = account
            .and_then(|a| a.gid)
            .unwrap_or_else(|| nix::unistd::getegid().as_raw());
        // A folder a user owned may hold whatever that user put there: it never runs as root
        // (the nodelet's user) again, only as a user; a new version is unpacked fresh.
        if account.and_then(|a| a.uid).is_none() {
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::symlink_metadata(&spec.cwd)
                .map_err(io(&spec.cwd))?
                .uid();
            if owner != uid {
                return Err(BackendError::Invalid(format!(
                    "service {name} {version}: its folder {} belongs to uid {owner}, which ran \
                     it before; what that user could change is not run as the nodelet's user: \
                     name `service.user` again, or release a new version",
                    spec.cwd.display()
                )));
            }
        }
        if let Some((folder, mode)) = unreachable_folder(&spec.cwd, uid, gid) {
            return Err(BackendError::Invalid(format!(
                "service {name} {version}: its user (uid {uid} gid {gid}) cannot reach {}: {} \
                 has mode {mode:04o}; allow it through (`chmod o+x {}`)",
                spec.cwd.display(),
                folder.display(),
                folder.display()
            )));
        }
        let tree = spec.cwd.clone();
        tokio::task::spawn_blocking(move || own_tree(&tree, uid, gid))
            .await
            .map_err(|e| BackendError::Invalid(format!("changing owners was interrupted: {e}")))?
            .map_err(|(path, e)| {
                BackendError::Invalid(format!(
                    "service {name} {version}: cannot give {} to uid {uid} gid {gid}: {e}",
                    path.display()
                ))
            })?;
        // Recorded before the start, so a crash right after it still leaves the record. Not
        // fatal: a revert must not fail on a full disk; without a record, a later snapshot
        // falls back to the supervisor's memory or the manifest.
        if let Err(e) = self.record_settings(name, version, settings) {
            tracing::warn!(service = name, version, error = %e, "could not record the settings this version starts with");
            // An older record would be believed over the settings it really runs with now.
            let _ = std::fs::remove_file(self.settings_path(name, version));
        }
        match &self.runner {
            Runner::Supervisor(supervisor) => supervisor.start(spec).await,
            Runner::Systemd { unit_dir } => {
                let unit = systemd_unit(&spec, &self.current_link(name));
                let path = unit_dir.join(unit_name(name));
                std::fs::create_dir_all(unit_dir).map_err(io(unit_dir))?;
                crate::journal::write_atomic(&path, unit.as_bytes()).map_err(io(&path))?;
                command::run("systemctl", &["daemon-reload"], &[], SYSTEMCTL_LIMIT).await?;
                command::run(
                    "systemctl",
                    &["enable", &unit_name(name)],
                    &[],
                    SYSTEMCTL_LIMIT,
                )
                .await?;
                command::run(
                    "systemctl",
                    &["restart", &unit_name(name)],
                    &[],
                    SYSTEMCTL_LIMIT,
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<(), BackendError> {
        match &self.runner {
            Runner::Supervisor(supervisor) => supervisor.stop(name).await,
            Runner::Systemd { unit_dir } => {
                let unit = unit_name(name);
                let _ = command::run(
                    "systemctl",
                    &["disable", "--now", &unit],
                    &[],
                    SYSTEMCTL_LIMIT,
                )
                .await;
                let path = unit_dir.join(&unit);
                if path.exists() {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                    command::run("systemctl", &["daemon-reload"], &[], SYSTEMCTL_LIMIT).await?;
                }
            }
        }
        Ok(())
    }

    async fn running(&self, name: &str) -> bool {
        match &self.runner {
            Runner::Supervisor(supervisor) => supervisor.running(name).await,
            Runner::Systemd { .. } => command::run(
                "systemctl",
                &["is-active", "--quiet", &unit_name(name)],
                &[],
                SYSTEMCTL_LIMIT,
            )
            .await
            .is_ok(),
        }
    }

    /// Waits `start_seconds` and checks the service is still up: a crash loop is a failed step.
    async fn check_started(
        &self,
        component: &Component,
        settings: &ServiceSettings,
    ) -> Result<(), BackendError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(settings.start_seconds.into());
        loop {
            if !self.running(&component.name).await {
                let logs = self.log_tail(component);
                return Err(BackendError::Invalid(format!(
                    "service {} {} exited right after it started; last lines: {}",
                    component.name,
                    component.version.as_deref().unwrap_or("?"),
                    logs.join(" | ")
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The unpacked version folders of service `name`.
    fn kept_versions(&self, name: &str) -> Vec<Kept> {
        let Ok(entries) = std::fs::read_dir(self.service_dir(name)) else {
            return Vec::new();
        };
        entries
            .flatten()
            // Not `current` (a symlink), nor staging and settings files (dot names).
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| {
                Some(Kept {
                    version: e.file_name().to_string_lossy().into_owned(),
                    modified: e.metadata().ok()?.modified().ok()?,
                    path: e.path(),
                })
            })
            .collect()
    }

    /// Removes version `version` of service `name` (its folder and recorded settings) unless it
    /// is the current one; true if it was removed. After a revert, the failed release's
    /// folder goes: nothing will go back to it, and it would only crowd out good versions.
    pub fn discard_version(&self, name: &str, version: &str) -> Result<bool, BackendError> {
        if version.is_empty() || version.starts_with('.') || version.contains('/') {
            return Err(BackendError::Invalid(format!(
                "service {name}: `{version}` is not a version folder name"
            )));
        }
        if self.current_version(name).as_deref() == Some(version) {
            return Ok(false);
        }
        let dir = self.version_dir(name, version);
        let settings = self.settings_path(name, version);
        match std::fs::remove_file(&settings) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&settings)(e));
            }
            _ => {}
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&dir)(e)),
        }
    }

    /// Starts a service that should run but does not (after a reboot or a nodelet restart).
    pub async fn ensure_running(&self, component: &Component) -> Result<bool, BackendError> {
        let Some(version) = self.current_version(&component.name) else {
            return Ok(false);
        };
        // As the current version last ran: after a revert that is not the manifest's version.
        let Some(settings) = self
            .recorded_settings(&component.name, &version)
            .or_else(|| component.service.clone())
        else {
            return Ok(false);
        };
        if self.running(&component.name).await {
            return Ok(false);
        }
        self.start(&component.name, &version, &settings).await?;
        Ok(true)
    }
}

/// Resolves `service.user` and `service.group` in this node's user database (NSS, so LDAP
/// users resolve too). A user or group the node does not have fails the step, which reverts.
fn account(name: &str, settings: &ServiceSettings) -> Result<Option<Account>, BackendError> {
    use nix::unistd::{Group, Uid, User};
    if settings.user.is_none() && settings.group.is_none() {
        return Ok(None);
    }
    let lookup = |what: &str, e: nix::Error| {
        BackendError::Invalid(format!("service {name}: cannot look up {what}: {e}"))
    };
    let gid = match &settings.group {
        None => None,
        Some(group) => Some(match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(group)
                .map_err(|e| lookup(&format!("group `{group}`"), e))?
                .ok_or_else(|| {
                    BackendError::Invalid(format!(
                        "service {name}: group `{group}` does not exist on this node: create it \
                         (`groupadd --system {group}`) or change `service.group`"
                    ))
                })?
                .gid
                .as_raw(),
        }),
    };
    let mut account = Account {
        user: settings.user.clone(),
        group: settings.group.clone(),
        uid: None,
        gid,
        home: "/".into(),
    };
    let Some(user) = &settings.user else {
        return Ok(Some(account));
    };
    let id = user.parse::<u32>().ok();
    let entry = match id {
        Some(uid) => User::from_uid(Uid::from_raw(uid)),
        None => User::from_name(user),
    }
    .map_err(|e| lookup(&format!("user `{user}`"), e))?;
    match (entry, id) {
        (Some(entry), _) => {
            account.uid = Some(entry.uid.as_raw());
            account.gid = Some(gid.unwrap_or(entry.gid.as_raw()));
            account.home = entry.dir;
        }
        // A bare uid without an entry has no primary group: it needs one named.
        (None, Some(uid)) => {
            if gid.is_none() {
                return Err(BackendError::Invalid(format!(
                    "service {name}: uid {uid} has no entry in this node's user database, so \
                     it has no primary group: set `service.group` too"
                )));
            }
            account.uid = Some(uid);
        }
        (None, None) => {
            return Err(BackendError::Invalid(format!(
                "service {name}: user `{user}` does not exist on this node: create it \
                 (`useradd --system --no-create-home {user}`) or change `service.user`"
            )))
        }
    }
    Ok(Some(account))
}

/// The topmost folder above `dir` that `uid`:`gid` may not pass through (no search
/// permission for its owner, group or others as they apply), with its mode. The user's
/// supplementary groups are not counted: a folder they open is reported too.
fn unreachable_folder(dir: &Path, uid: u32, gid: u32) -> Option<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        return None;
    }
    let mut blocked = None;
    for folder in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(folder) else {
            continue;
        };
        let mode = meta.mode();
        let search = if meta.uid() == uid {
            mode & 0o100
        } else if meta.gid() == gid {
            mode & 0o010
        } else {
            mode & 0o001
        };
        if search == 0 {
            blocked = Some((folder.to_path_buf(), mode & 0o7777));
        }
    }
    blocked
}

/// Gives every file under `dir` (and `dir`) to `uid`:`gid`, never following a symbolic
/// link. The service may write in its folder while this runs (a re-apply of a running
/// version), so paths are never walked by name: a folder swapped for a link to /etc between
/// a check and a use would hand /etc's files to the service. Every folder is opened with
/// `O_NOFOLLOW` relative to its parent's descriptor, and every change is made through a
/// descriptor (`fchown`, `fchownat` with `AT_SYMLINK_NOFOLLOW`). Only entries owned by
/// someone else are changed, so a nodelet that is not root can still start services as
/// itself.
fn own_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), (PathBuf, std::io::Error)> {
    let fd = nix::fcntl::open(dir, folder_flags(), nix::sys::stat::Mode::empty())
        .map_err(|e| (dir.to_path_buf(), e.into()))?;
    own_folder(fd, dir, uid, gid)
}

fn folder_flags() -> nix::fcntl::OFlag {
    use nix::fcntl::OFlag;
    // O_NONBLOCK: a FIFO planted in the folder must not block the open (O_DIRECTORY
    // refuses it anyway).
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK
}

fn own_folder(
    fd: std::os::fd::OwnedFd,
    path: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), (PathBuf, std::io::Error)> {
    use nix::dir::{Dir, Type};
    use nix::errno::Errno;
    use nix::fcntl::{openat, AtFlags};
    use nix::sys::stat::{fstat, fstatat, Mode};
    use nix::unistd::{fchown, fchownat, Gid, Uid};
    use std::os::unix::ffi::OsStrExt;
    let failed = |at: &Path| {
        let at = at.to_path_buf();
        move |e: Errno| (at, std::io::Error::from(e))
    };
    let (owner, group) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    let stat = fstat(&fd).map_err(failed(path))?;
    if stat.st_uid != uid || stat.st_gid != gid {
        fchown(&fd, owner, group).map_err(failed(path))?;
    }
    let mut dir = Dir::from_fd(fd).map_err(failed(path))?;
    let mut entries = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(failed(path))?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        entries.push((name.to_owned(), entry.file_type()));
    }
    for (name, kind) in entries {
        let at = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        if matches!(kind, Some(Type::Directory) | None) {
            match openat(&dir, name.as_c_str(), folder_flags(), Mode::empty()) {
                Ok(child) => {
                    own_folder(child, &at, uid, gid)?;
                    continue;
                }
                // Not a folder (any more): a file or a link, changed below without following.
                Err(Errno::ENOTDIR | Errno::ELOOP) => {}
                Err(e) => return Err(failed(&at)(e)),
            }
        }
        match fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) if stat.st_uid == uid && stat.st_gid == gid => {}
            Ok(_) => fchownat(
                &dir,
                name.as_c_str(),
                owner,
                group,
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(failed(&at))?,
            // Removed meanwhile (the service's own file): nothing to give.
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(failed(&at)(e)),
        }
    }
    Ok(())
}

fn systemd_unit(spec: &RunSpec, current: &Path) -> String {
    let quote = |s: &str| {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%")
        )
    };
    let mut exec = vec![quote(&spec.program.display().to_string())];
    exec.extend(spec.args.iter().map(|a| quote(a)));
    let env: String = spec
        .env
        .iter()
        .map(|(k, v)| format!("Environment={}\n", quote(&format!("{k}={v}"))))
        .collect();
    // The names as the manifest gives them (validated there: no quoting needed); systemd
    // resolves them itself, and runs the service with the user's supplementary groups too.
    let account: String = spec
        .account
        .iter()
        .flat_map(|a| {
            let user = a.user.as_ref().map(|u| format!("User={u}\n"));
            let group = a.group.as_ref().map(|g| format!("Group={g}\n"));
            user.into_iter().chain(group)
        })
        .collect();
    format!(
        "# Written by shoal's nodelet; changes are overwritten.\n[Unit]\nDescription=shoal service {name}\nAfter=network-online.target\n\n[Service]\nExecStart={exec}\nWorkingDirectory={cwd}\n{account}{env}Restart=always\nRestartSec=1\n\n[Install]\nWantedBy=multi-user.target\n# current: {current}\n",
        name = spec.name,
        exec = exec.join(" "),
        cwd = spec.cwd.display(),
        current = current.display(),
    )
}

fn settings(component: &Component) -> Result<&ServiceSettings, BackendError> {
    component.service.as_ref().ok_or_else(|| {
        BackendError::Invalid(format!("service {} has no `service.exec`", component.name))
    })
}

impl Backend for ServiceBackend {
    async fn current(&self, component: &Component) -> Result<Option<String>, BackendError> {
        Ok(self.current_version(&component.name))
    }

    async fn snapshot(&self, component: &Component) -> Result<Snapshot, BackendError> {
        let Some(version) = self.current_version(&component.name) else {
            return Ok(Snapshot::Absent);
        };
        // How it runs now: as it was last started (recorded beside the version); for a version
        // put there before settings were recorded, the supervisor's memory or the manifest.
        let settings = match self.recorded_settings(&component.name, &version) {
            Some(settings) => Some(settings),
            None => match self.supervisor() {
                Some(supervisor) => {
                    supervisor
                        .spec(&component.name)
                        .await
                        .map(|spec| ServiceSettings {
                            exec: std::iter::once(spec.program.display().to_string())
                                .chain(spec.args)
                                .collect(),
                            env: spec.env,
                            start_seconds: component
                                .service
                                .as_ref()
                                .map_or(2, |s| s.start_seconds),
                            user: spec.account.as_ref().and_then(|a| a.user.clone()),
                            group: spec.account.and_then(|a| a.group),
                        })
                }
                None => None,
            },
        };
        let settings = settings
            .or_else(|| component.service.clone())
            .ok_or_else(|| {
                BackendError::Invalid(format!(
                    "service {}: cannot tell how the current version runs",
                    component.name
                ))
            })?;
        Ok(Snapshot::Service { version, settings })
    }

    async fn apply(
        &self,
        component: &Component,
        artifact: Option<&Path>,
    ) -> Result<(), BackendError> {
        let settings = settings(component)?;
        let version = component
            .version
            .as_deref()
            .ok_or_else(|| BackendError::Invalid("no version".into()))?;
        let target = self.version_dir(&component.name, version);
        if !target.is_dir() {
            let artifact = artifact.ok_or_else(|| {
                BackendError::Invalid(format!("service {} needs an artifact", component.name))
            })?;
            let dir = self.service_dir(&component.name);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            // Unpack beside the target and rename: a crash never leaves a half-unpacked version behind the real name.
            let staging = dir.join(format!(".{version}.unpacking"));
            // Decompressing (twice: check, then unpack) takes seconds to minutes on a small
            // board: off the async workers, so the loop and the probes keep running.
            let (archive, into) = (artifact.to_path_buf(), staging.clone());
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(&into);
                unpack_tar_gz(&archive, &into, &crate::artifact::UnpackLimits::default())
            })
            .await
            .map_err(|e| BackendError::Invalid(format!("unpacking was interrupted: {e}")))??;
            std::fs::rename(&staging, &target).map_err(io(&target))?;
        }
        self.run_spec(&component.name, version, settings)?;
        self.switch(&component.name, version)?;
        self.start(&component.name, version, settings).await?;
        self.check_started(component, settings).await?;
        // No pruning here: a step that runs again after a restart would take its own new
        // version for "previous" and could prune the one its revert needs. The agent prunes
        // once the change is committed.
        Ok(())
    }

    async fn remove(&self, component: &Component) -> Result<(), BackendError> {
        self.stop(&component.name).await?;
        let link = self.current_link(&component.name);
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).map_err(io(&link))?;
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
            Snapshot::Service { version, settings } => {
                if !self.version_dir(&component.name, version).is_dir() {
                    return Err(BackendError::Invalid(format!(
                        "service {}: version {version} is no longer on disk, cannot go back to it",
                        component.name
                    )));
                }
                self.switch(&component.name, version)?;
                // Reverting must be fast: start the old version and let the probes judge it.
                self.start(&component.name, version, settings).await
            }
            other => Err(BackendError::Invalid(format!(
                "service {}: cannot restore {other:?}",
                component.name
            ))),
        }
    }

    async fn alive(&self, component: &Component) -> Result<(), String> {
        if self.current_version(&component.name).is_none() {
            return Ok(()); // not installed (state: absent): nothing to be alive
        }
        if self.running(&component.name).await {
            Ok(())
        } else {
            Err(format!(
                "service {} is not running; last lines: {}",
                component.name,
                self.log_tail(component).join(" | ")
            ))
        }
    }

    fn log_tail(&self, component: &Component) -> Vec<String> {
        match &self.runner {
            Runner::Supervisor(supervisor) => supervisor.log_tail(&component.name, 20),
            Runner::Systemd { .. } => {
                // journalctl is synchronous here: this is only called to build a failure report.
                std::process::Command::new("journalctl")
                    .args([
                        "-u",
                        &unit_name(&component.name),
                        "-n",
                        "20",
                        "--no-pager",
                        "-o",
                        "cat",
                    ])
                    .output()
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default()
            }
        }
    }

    async fn prune_kept(
        &self,
        component: &Component,
        protect: &[&str],
        keep: usize,
    ) -> Vec<PathBuf> {
        let name = &component.name;
        let current = self.current_version(name);
        let doomed = prunable(self.kept_versions(name), current.as_deref(), protect, keep);
        for kept in &doomed {
            let _ = std::fs::remove_file(self.settings_path(name, &kept.version));
        }
        remove_kept(doomed, "service version")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(version: &str, tag: &str) -> Component {
        serde_json::from_value(serde_json::json!({
            "name": "svc",
            "kind": "service",
            "version": version,
            "service": {"exec": ["bin/run", tag], "env": {"TAG": tag}, "startSeconds": 1},
        }))
        .unwrap()
    }

    fn unpack(backend: &ServiceBackend, version: &str) {
        let bin = backend.version_dir("svc", version).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let run = bin.join("run");
        std::fs::write(&run, "#!/bin/sh\nexec sleep 60\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// After a nodelet restart (a new supervisor that remembers nothing), a revert still starts
    /// the old version with its own arguments and environment, not the new manifest's.
    #[tokio::test]
    async fn a_revert_after_a_restart_starts_the_old_version_as_it_ran() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Arc::new(Supervisor::new(&tmp.path().join("s1")));
        let backend = ServiceBackend::new(tmp.path(), Runner::Supervisor(first.clone()));
        unpack(&backend, "1.0.0");
        unpack(&backend, "1.1.0");
        backend
            .apply(&component("1.0.0", "one"), None)
            .await
            .unwrap();
        first.stop("svc").await;

        let second = Arc::new(Supervisor::new(&tmp.path().join("s2")));
        let backend = ServiceBackend::new(tmp.path(), Runner::Supervisor(second.clone()));
        let new = component("1.1.0", "two");
        let snapshot = backend.snapshot(&new).await.unwrap();
        let Snapshot::Service { version, settings } = &snapshot else {
            panic!("{snapshot:?}");
        };
        assert_eq!(version, "1.0.0");
        assert_eq!(settings.exec, vec!["bin/run", "one"]);
        assert_eq!(settings.env.get("TAG").map(String::as_str), Some("one"));

        backend.apply(&new, None).await.unwrap();
        assert_eq!(second.spec("svc").await.unwrap().args, vec!["two"]);
        backend.restore(&new, &snapshot).await.unwrap();
        let running = second.spec("svc").await.unwrap();
        assert_eq!(backend.current_version("svc").as_deref(), Some("1.0.0"));
        assert_eq!(running.args, vec!["one"]);
        assert_eq!(running.env.get("TAG").map(String::as_str), Some("one"));

        // A restart after the revert: the manifest still says 1.1.0 "two", the node runs 1.0.0 "one".
        second.stop("svc").await;
        assert!(backend.ensure_running(&new).await.unwrap());
        assert_eq!(second.spec("svc").await.unwrap().args, vec!["one"]);
        second.stop("svc").await;
    }

    fn folders(backend: &ServiceBackend) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir(backend.service_dir("svc"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        left
    }

    #[tokio::test]
    async fn pruning_keeps_the_current_and_the_revert_target() {
        let tmp = tempfile::tempdir().unwrap();
        let supervisor = Arc::new(Supervisor::new(tmp.path()));
        let backend = ServiceBackend::new(tmp.path(), Runner::Supervisor(supervisor));
        for version in ["1.0.0", "1.1.0", "1.2.0", "1.2.1", "1.2.2"] {
            std::fs::create_dir_all(backend.version_dir("svc", version)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        backend.switch("svc", "1.2.2").unwrap();
        backend
            .record_settings("svc", "1.0.0", &settings())
            .unwrap();
        // A change from 1.1.0 (the revert target, older than the others) to 1.2.2.
        let removed = backend
            .prune_kept(&component("1.2.2", "x"), &["1.1.0"], 2)
            .await;
        assert_eq!(removed, vec![backend.version_dir("svc", "1.0.0")]);
        // The current one and the two newest others, plus the revert target however old.
        assert_eq!(
            folders(&backend),
            vec!["1.1.0", "1.2.0", "1.2.1", "1.2.2"],
            "1.0.0 goes; the revert target stays"
        );
        assert!(!backend.settings_path("svc", "1.0.0").exists());
        // Nothing protected and nothing else kept: only the current one stays.
        backend.prune_kept(&component("1.2.2", "x"), &[], 0).await;
        assert_eq!(folders(&backend), vec!["1.2.2"]);
    }

    fn settings() -> ServiceSettings {
        component("1.0.0", "one").service.unwrap()
    }

    #[test]
    fn a_failed_release_is_discarded_but_never_the_current_one() {
        let tmp = tempfile::tempdir().unwrap();
        let supervisor = Arc::new(Supervisor::new(tmp.path()));
        let backend = ServiceBackend::new(tmp.path(), Runner::Supervisor(supervisor));
        for version in ["1.0.0", "1.1.0"] {
            std::fs::create_dir_all(backend.version_dir("svc", version).join("bin")).unwrap();
            backend
                .record_settings("svc", version, &settings())
                .unwrap();
        }
        // Reverted from 1.1.0 to 1.0.0.
        backend.switch("svc", "1.0.0").unwrap();
        assert!(backend.discard_version("svc", "1.1.0").unwrap());
        assert!(!backend.version_dir("svc", "1.1.0").exists());
        assert!(!backend.settings_path("svc", "1.1.0").exists());
        assert!(
            !backend.discard_version("svc", "1.1.0").unwrap(),
            "already gone"
        );
        assert!(
            !backend.discard_version("svc", "1.0.0").unwrap(),
            "the current one"
        );
        assert!(backend.version_dir("svc", "1.0.0").is_dir());
        assert!(backend.settings_path("svc", "1.0.0").exists());
        assert!(backend.discard_version("svc", "../svc").is_err());
        assert!(backend.discard_version("svc", ".").is_err());
    }

    fn with_account(version: &str, user: Option<&str>, group: Option<&str>) -> Component {
        let mut component = component(version, "x");
        let service = component.service.as_mut().unwrap();
        service.user = user.map(str::to_string);
        service.group = group.map(str::to_string);
        component
    }

    #[test]
    fn users_and_groups_resolve_on_this_node_or_fail_the_step_with_what_to_do() {
        let settings = |user: Option<&str>, group: Option<&str>| {
            with_account("1.0.0", user, group).service.unwrap()
        };
        assert_eq!(account("svc", &settings(None, None)).unwrap(), None);
        let root = account("svc", &settings(Some("root"), None))
            .unwrap()
            .unwrap();
        assert_eq!((root.uid, root.gid), (Some(0), Some(0)));
        assert_eq!(root.home, Path::new("/root"));
        // By id, and a group that overrides the primary one.
        let by_id = account("svc", &settings(Some("0"), Some("65534")))
            .unwrap()
            .unwrap();
        assert_eq!((by_id.uid, by_id.gid), (Some(0), Some(65534)));
        // A group alone keeps the nodelet's user.
        let group = account("svc", &settings(None, Some("0"))).unwrap().unwrap();
        assert_eq!((group.uid, group.gid, group.user), (None, Some(0), None));

        let missing = account("svc", &settings(Some("no-such-user-here"), None))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("user `no-such-user-here` does not exist on this node"),
            "{missing}"
        );
        assert!(missing.contains("useradd --system"), "{missing}");
        let missing = account("svc", &settings(Some("root"), Some("no-such-group-here")))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("group `no-such-group-here` does not exist"),
            "{missing}"
        );
        // An id nobody has needs a group to run with.
        let bare = account("svc", &settings(Some("4000000000"), None))
            .unwrap_err()
            .to_string();
        assert!(bare.contains("set `service.group` too"), "{bare}");
        let bare = account("svc", &settings(Some("4000000000"), Some("0")))
            .unwrap()
            .unwrap();
        assert_eq!((bare.uid, bare.gid), (Some(4_000_000_000), Some(0)));
    }

    #[test]
    fn the_systemd_unit_runs_the_service_as_its_user_and_group() {
        let tmp = tempfile::tempdir().unwrap();
        let backend = ServiceBackend::new(
            tmp.path(),
            Runner::Systemd {
                unit_dir: tmp.path().join("units"),
            },
        );
        unpack(&backend, "1.0.0");
        let unit = |component: &Component| {
            let spec = backend
                .run_spec("svc", "1.0.0", component.service.as_ref().unwrap())
                .unwrap();
            systemd_unit(&spec, &backend.current_link("svc"))
        };
        let both = unit(&with_account("1.0.0", Some("root"), Some("0")));
        assert!(both.contains("\nUser=root\nGroup=0\n"), "{both}");
        let neither = unit(&with_account("1.0.0", None, None));
        assert!(
            !neither.contains("User=") && !neither.contains("Group="),
            "{neither}"
        );
    }

    /// As root (CI): the process runs as the manifest's user with that user's HOME, its
    /// files are that user's, and the same version run as root again is root's again.
    #[tokio::test]
    async fn a_service_runs_as_its_user_and_its_files_are_that_users() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: not root - running a service as another user needs root");
            return;
        }
        let nobody = nix::unistd::User::from_name("nobody")
            .unwrap()
            .expect("a nobody user");
        let tmp = tempfile::tempdir().unwrap();
        let supervisor = Arc::new(Supervisor::new(&tmp.path().join("state")));
        let backend = ServiceBackend::new(tmp.path(), Runner::Supervisor(supervisor.clone()));
        let dir = backend.version_dir("svc", "1.0.0");
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let run = dir.join("bin/run");
        std::fs::write(&run, "#!/bin/sh\necho \"$(id -u) $(id -g) $HOME $(id -G)\" > whoami.tmp && mv whoami.tmp whoami\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();

        let whoami = |component: Component| {
            let backend = &backend;
            let dir = dir.clone();
            async move {
                let _ = std::fs::remove_file(dir.join("whoami"));
                backend.apply(&component, None).await.unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                loop {
                    if let Ok(text) = std::fs::read_to_string(dir.join("whoami")) {
                        return text.trim().to_string();
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the service never wrote whoami"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        // A folder above that only root may pass: the user could not reach its program.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let blocked = backend
            .apply(&with_account("1.0.0", Some("nobody"), None), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            blocked.contains(&format!(
                "{} has mode 0700; allow it through (`chmod o+x",
                tmp.path().display()
            )),
            "{blocked}"
        );
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let seen = whoami(with_account("1.0.0", Some("nobody"), None)).await;
        let gid = nobody.gid.as_raw();
        assert_eq!(
            seen,
            format!("{} {gid} {} {gid}", nobody.uid, nobody.dir.display()),
            "uid, gid, HOME and no supplementary groups of root's"
        );
        for path in [&dir, &dir.join("bin"), &run] {
            let meta = std::fs::symlink_metadata(path).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid()),
                (nobody.uid.as_raw(), gid),
                "{}",
                path.display()
            );
        }
        // The same version as root: refused, the user could have changed its files.
        supervisor.stop("svc").await;
        let refused = backend
            .apply(&with_account("1.0.0", None, None), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains(&format!("belongs to uid {}", nobody.uid)),
            "{refused}"
        );
        assert!(!supervisor.running("svc").await);
        assert_eq!(std::fs::metadata(&run).unwrap().uid(), nobody.uid.as_raw());
    }

    /// As root: every file, folder and link of the tree is given to the user, and nothing a
    /// link points at outside it (a file, a folder) changes owner.
    #[test]
    fn giving_a_tree_to_a_user_never_follows_its_links() {
        use std::os::unix::fs::{symlink, MetadataExt};
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: not root - changing owners needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("folder")).unwrap();
        std::fs::write(outside.join("secret"), "root's").unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/file"), "x").unwrap();
        symlink(outside.join("secret"), tree.join("a/to-file")).unwrap();
        symlink(outside.join("folder"), tree.join("to-folder")).unwrap();
        nix::unistd::mkfifo(
            &tree.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        own_tree(&tree, 65534, 65534).unwrap();
        for path in ["", "a", "a/b", "a/b/file", "a/to-file", "to-folder", "fifo"] {
            let meta = std::fs::symlink_metadata(tree.join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{path}");
        }
        for path in ["secret", "folder"] {
            let meta = std::fs::metadata(outside.join(path)).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid()),
                (0, 0),
                "{path} outside was followed"
            );
        }
        // And back, as a nodelet running the same version as root again would.
        own_tree(&tree, 0, 0).unwrap();
        assert_eq!(std::fs::metadata(tree.join("a/b/file")).unwrap().uid(), 0);
    }
}
