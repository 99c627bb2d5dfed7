//! Backends: how services, drivers and packages are inventoried, installed, removed and put back.

pub mod driver;
pub mod package;
pub mod service;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use manifests::{Component, ComponentKind, ServiceSettings};
use serde::{Deserialize, Serialize};

use crate::artifact::ArtifactError;
use crate::command::CommandError;

/// Why a backend step failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A program failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// An artifact was bad.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Something about the component itself.
    #[error("{0}")]
    Invalid(String),
}

/// Maps an I/O error to a `BackendError` naming the path.
pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError + '_ {
    move |source| BackendError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What was there before a step, enough to put it back without the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Snapshot {
    /// Nothing was installed.
    Absent,
    /// A service version whose unpacked folder is still on disk.
    Service {
        /// The version that was current.
        version: String,
        /// How it ran.
        settings: ServiceSettings,
    },
    /// A kernel module, kept as a file.
    Driver {
        /// Its version.
        version: String,
        /// The kept `.ko`.
        ko: PathBuf,
        /// Its modprobe parameters.
        params: Vec<String>,
    },
    /// A package version, with its kept `.deb` when one could be found.
    Package {
        /// The installed version.
        version: String,
        /// The kept `.deb`; `None` means restoring needs apt and the network.
        deb: Option<PathBuf>,
    },
}

impl Snapshot {
    /// The version the snapshot holds, if any.
    pub fn version(&self) -> Option<&str> {
        match self {
            Snapshot::Absent => None,
            Snapshot::Service { version, .. }
            | Snapshot::Driver { version, .. }
            | Snapshot::Package { version, .. } => Some(version),
        }
    }
}

/// One kind of component, managed for real.
// The trait is only used with concrete types inside this crate, so the
// `Send`-ness of its futures is known where they are awaited.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// The version in force now; `None` when not installed.
    async fn current(&self, component: &Component) -> Result<Option<String>, BackendError>;
    /// Captures what is there now, so `restore` can put it back exactly.
    async fn snapshot(&self, component: &Component) -> Result<Snapshot, BackendError>;
    /// Installs and activates `component` at its version from a verified artifact.
    async fn apply(
        &self,
        component: &Component,
        artifact: Option<&Path>,
    ) -> Result<(), BackendError>;
    /// Removes the component.
    async fn remove(&self, component: &Component) -> Result<(), BackendError>;
    /// Puts back what `snapshot` captured.
    async fn restore(&self, component: &Component, snapshot: &Snapshot)
        -> Result<(), BackendError>;
    /// `Ok` while the component works as far as the backend can tell (a service is running).
    async fn alive(&self, component: &Component) -> Result<(), String>;
    /// The last lines of the component's log.
    fn log_tail(&self, component: &Component) -> Vec<String>;
    /// Removes kept versions of the component (unpacked services, `.deb`, `.ko` files) except
    /// the installed one, every `protect`ed one (versions a revert may go back to) and the
    /// `keep` newest others; returns what it removed. Best effort: a file that cannot be
    /// removed is logged and left, and nothing is removed while the installed version cannot
    /// be told.
    async fn prune_kept(
        &self,
        component: &Component,
        protect: &[&str],
        keep: usize,
    ) -> Vec<PathBuf>;
}

/// One kept version of a component on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The version it holds.
    pub version: String,
    /// When it was last written.
    pub modified: SystemTime,
    /// The file or folder.
    pub path: PathBuf,
}

/// Which kept versions go: all but `installed`, the `protect`ed ones and the `keep` newest
/// of the rest (by mtime; the version breaks ties, so the choice is the same every time).
pub fn prunable(
    mut kept: Vec<Kept>,
    installed: Option<&str>,
    protect: &[&str],
    keep: usize,
) -> Vec<Kept> {
    kept.retain(|k| {
        Some(k.version.as_str()) != installed && !protect.contains(&k.version.as_str())
    });
    kept.sort_by(|a, b| {
        b.modified
            .cmp(&a.modified)
            .then_with(|| b.version.cmp(&a.version))
    });
    kept.split_off(keep.min(kept.len()))
}

/// Removes `doomed` files or folders, logging (not failing on) what cannot be removed.
fn remove_kept(doomed: Vec<Kept>, what: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for kept in doomed {
        let result = if kept.path.is_dir() {
            std::fs::remove_dir_all(&kept.path)
        } else {
            std::fs::remove_file(&kept.path)
        };
        match result {
            Ok(()) => removed.push(kept.path),
            Err(e) => tracing::warn!(
                path = %kept.path.display(),
                error = %e,
                "cannot remove a kept {what}; it stays until the next prune"
            ),
        }
    }
    removed
}

/// The three backends of a node.
pub struct Backends {
    /// Services.
    pub service: service::ServiceBackend,
    /// Kernel modules.
    pub driver: driver::DriverBackend,
    /// dpkg packages.
    pub package: package::PackageBackend,
}

macro_rules! dispatch {
    ($self:ident, $component:expr, $method:ident ( $($arg:expr),* )) => {
        match $component.kind {
            ComponentKind::Service => $self.service.$method($($arg),*).await,
            ComponentKind::Driver => $self.driver.$method($($arg),*).await,
            ComponentKind::Package => $self.package.$method($($arg),*).await,
        }
    };
}

impl Backends {
    /// See [`Backend::current`].
    pub async fn current(&self, c: &Component) -> Result<Option<String>, BackendError> {
        dispatch!(self, c, current(c))
    }
    /// See [`Backend::snapshot`].
    pub async fn snapshot(&self, c: &Component) -> Result<Snapshot, BackendError> {
        dispatch!(self, c, snapshot(c))
    }
    /// See [`Backend::apply`].
    pub async fn apply(&self, c: &Component, artifact: Option<&Path>) -> Result<(), BackendError> {
        dispatch!(self, c, apply(c, artifact))
    }
    /// See [`Backend::remove`].
    pub async fn remove(&self, c: &Component) -> Result<(), BackendError> {
        dispatch!(self, c, remove(c))
    }
    /// See [`Backend::restore`].
    pub async fn restore(&self, c: &Component, s: &Snapshot) -> Result<(), BackendError> {
        dispatch!(self, c, restore(c, s))
    }
    /// See [`Backend::alive`].
    pub async fn alive(&self, c: &Component) -> Result<(), String> {
        dispatch!(self, c, alive(c))
    }
    /// See [`Backend::prune_kept`].
    pub async fn prune_kept(&self, c: &Component, protect: &[&str], keep: usize) -> Vec<PathBuf> {
        dispatch!(self, c, prune_kept(c, protect, keep))
    }
    /// See [`Backend::log_tail`].
    pub fn log_tail(&self, c: &Component) -> Vec<String> {
        match c.kind {
            ComponentKind::Service => self.service.log_tail(c),
            ComponentKind::Driver => self.driver.log_tail(c),
            ComponentKind::Package => self.package.log_tail(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn kept(version: &str, age_seconds: u64) -> Kept {
        Kept {
            version: version.into(),
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_seconds),
            path: PathBuf::from(version),
        }
    }

    fn versions(kept: &[Kept]) -> Vec<&str> {
        kept.iter().map(|k| k.version.as_str()).collect()
    }

    #[test]
    fn pruning_keeps_installed_protected_and_newest() {
        let all = vec![
            kept("1.0", 50),
            kept("1.1", 40),
            kept("1.2", 30),
            kept("1.3", 20),
            kept("1.4", 10),
        ];
        // 1.4 installed, 1.0 (the oldest) is a revert target, one more kept: 1.3.
        let doomed = prunable(all.clone(), Some("1.4"), &["1.0"], 1);
        assert_eq!(versions(&doomed), vec!["1.2", "1.1"]);
        // Nothing installed, nothing protected, keep none: all go.
        assert_eq!(prunable(all.clone(), None, &[], 0).len(), 5);
        // Keeping more than there are removes nothing.
        assert!(prunable(all.clone(), Some("1.0"), &[], 10).is_empty());
        // Same mtime: the version decides, the same way every time.
        let tied = vec![kept("2.0", 5), kept("2.1", 5), kept("2.2", 5)];
        assert_eq!(versions(&prunable(tied, None, &[], 1)), vec!["2.1", "2.0"]);
    }
}
