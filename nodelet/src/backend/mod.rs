//! Backends: how services, drivers and packages are inventoried, installed, removed and put back.

pub mod driver;
pub mod package;
pub mod service;

use std::path::{Path, PathBuf};

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
    /// See [`Backend::log_tail`].
    pub fn log_tail(&self, c: &Component) -> Vec<String> {
        match c.kind {
            ComponentKind::Service => self.service.log_tail(c),
            ComponentKind::Driver => self.driver.log_tail(c),
            ComponentKind::Package => self.package.log_tail(c),
        }
    }
}
