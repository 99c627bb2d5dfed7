//! The node's durable state and journal, written atomically before every step.
//!
//! Everything the nodelet needs to act without the apiserver, and to finish or
//! undo a change after `kill -9`, is in one JSON file in the state directory:
//! what each DesiredState runs and how that went, the change in flight (with
//! a snapshot of what was there before each step), and revisions that failed
//! here and must not be retried. A write is temp file, fsync, rename, fsync of
//! the folder: after a crash the file is either the old or the new version.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use manifests::wire::{AssignedState, ComponentPhase, NodeEvent};
use manifests::Component;
use serde::{Deserialize, Serialize};

use crate::backend::Snapshot;

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads a JSON file; `None` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "{} is corrupt: {e}; move it aside to start over",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// What one step of a change does to one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Not installed → installed.
    Install,
    /// To a higher version.
    Upgrade,
    /// To a lower version.
    Downgrade,
    /// Same version, but not what should be there (drift, a stopped service).
    Repair,
    /// Installed → removed (`state: absent`).
    Remove,
}

/// Progress of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepState {
    /// Not started.
    Pending,
    /// Started; may be half done.
    Started,
    /// Finished.
    Done,
    /// Put back to its snapshot.
    Reverted,
}

/// One step: a component, what to do with it, and how to put back what was there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The component as the new revision wants it.
    pub component: Component,
    /// What the step does.
    pub action: Action,
    /// What was there before, enough to restore it without the network; taken while the
    /// change is Pending, before any step runs.
    #[serde(default)]
    pub snapshot: Option<Snapshot>,
    /// Progress.
    pub state: StepState,
}

/// Where a change is (see `lifecycle` for the transition and deadline tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangePhase {
    /// Nothing touched yet: baseline probes, downloads and snapshots are being taken.
    Pending,
    /// Steps are running.
    Applying,
    /// Steps done; waiting for every baseline-passing probe to pass.
    Verifying,
    /// Healthy; still watched for regressions until the bake time is over.
    Baking,
    /// Going back, in reverse order.
    Reverting,
}

/// A change of one DesiredState from one revision to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The revision being applied.
    pub target: AssignedState,
    /// The revision that was there (0: none).
    pub from_revision: u64,
    /// Where it is.
    pub phase: ChangePhase,
    /// The steps, in manifest order.
    pub steps: Vec<Step>,
    /// Probe name → passed at baseline.
    pub baseline: BTreeMap<String, bool>,
    /// Unix ms when the steps finished (verification deadline starts here).
    pub applied_at_ms: u64,
    /// Unix ms when every probe held.
    pub healthy_at_ms: Option<u64>,
    /// Why it is reverting.
    pub revert_reason: Option<String>,
    /// Output of the probe that regressed.
    pub probe_output: Option<String>,
    /// The component whose log explains the failure.
    pub culprit: Option<String>,
    /// Unix ms when the change entered its phase (deadlines count from here).
    #[serde(default)]
    pub phase_since_ms: u64,
    /// Pending: baseline, artifacts and snapshots are ready.
    #[serde(default)]
    pub prepared: bool,
    /// A step (or preparing) failed: the change reverts (or, Pending, is refused).
    #[serde(default)]
    pub failure: Option<Failure>,
    /// After a restart: probes do not count until then (Unix ms), while services come back.
    #[serde(default)]
    pub settle_until_ms: Option<u64>,
    /// Reverting: a restore failed; the change ends Failed.
    #[serde(default)]
    pub revert_failure: Option<String>,
    /// The culprit's last log lines, read when the revert began (before its process went).
    #[serde(default)]
    pub log_tail: Vec<String>,
    /// Reverting because the apiserver withdrew the revision (not because anything failed).
    #[serde(default)]
    pub withdrawn: bool,
}

/// Why a step, or preparing a change, failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// For people.
    pub reason: String,
    /// The component it is about.
    pub component: Option<String>,
    /// The disk was too full: retried once there is room, not recorded as a failed revision.
    #[serde(default)]
    pub no_space: bool,
}

/// What a DesiredState runs on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The revision in force (the last one that applied, or that was reverted to).
    pub state: AssignedState,
    /// How it went.
    pub phase: ComponentPhase,
    /// Unix ms of the last time it became Healthy.
    pub healthy_since_ms: Option<u64>,
    /// For Reverted and Failed: why.
    pub message: Option<String>,
    /// Probe output that caused a revert.
    pub probe_output: Option<String>,
    /// Log lines of the component that caused it.
    pub log_tail: Vec<String>,
    /// The component that caused it.
    pub culprit: Option<String>,
    /// The revision that was reverted (reported, not retried).
    pub reverted_revision: Option<u64>,
    /// For Reverted and Failed: the components the change had changed (the others of the
    /// DesiredState were left as they ran, and are not blamed).
    #[serde(default)]
    pub touched: Vec<String>,
}

/// The node's durable state: one file, one atomic write per transition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// DesiredState → what it runs.
    pub applied: BTreeMap<String, Applied>,
    /// DesiredState → the change in flight.
    pub changes: BTreeMap<String, Change>,
    /// DesiredState → revisions that failed here: never retried automatically.
    pub failed_revisions: BTreeMap<String, BTreeSet<u64>>,
    /// Components managed before, by name: what they were pinned to (to notice removals from manifests).
    pub managed: BTreeMap<String, Component>,
    /// Components a DesiredState let go of because another one pins them too (a conflict),
    /// by name → that DesiredState: once the conflict is over and nobody pins them, they are
    /// reported unmanaged.
    #[serde(default)]
    pub conflicted: BTreeMap<String, String>,
}

/// The state directory's files.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// Events kept while the apiserver is unreachable; the oldest go first when full.
pub const MAX_QUEUED_EVENTS: usize = 1000;

impl StateDir {
    /// The state directory.
    pub fn new(dir: PathBuf) -> Self {
        StateDir { dir }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Loads the node state (empty on first start).
    pub fn load(&self) -> Result<NodeState, String> {
        Ok(read_json(&self.file("state.json"))?.unwrap_or_default())
    }

    /// Saves the node state; called before every step.
    pub fn save(&self, state: &NodeState) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        write_atomic(&self.file("state.json"), &bytes)
            .map_err(|e| format!("cannot write the journal in {}: {e}", self.dir.display()))
    }

    /// The last assignment received (what to enforce while offline).
    pub fn load_assignment(&self) -> Result<Option<manifests::wire::NodeAssignment>, String> {
        read_json(&self.file("assignment.json"))
    }

    /// Stores the assignment.
    pub fn save_assignment(
        &self,
        assignment: &manifests::wire::NodeAssignment,
    ) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(assignment).expect("assignment serializes");
        write_atomic(&self.file("assignment.json"), &bytes).map_err(|e| e.to_string())
    }

    /// The node token, if registered.
    pub fn load_token(&self) -> Result<Option<String>, String> {
        match std::fs::read_to_string(self.file("token")) {
            Ok(token) => Ok(Some(token.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read the node token: {e}")),
        }
    }

    /// Stores the node token, readable by the owner only.
    pub fn save_token(&self, token: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.file("token");
        write_atomic(&path, token.as_bytes()).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())
    }

    /// Events not yet delivered.
    pub fn load_events(&self) -> Result<Vec<NodeEvent>, String> {
        Ok(read_json(&self.file("events.json"))?.unwrap_or_default())
    }

    /// Stores undelivered events (bounded).
    pub fn save_events(&self, events: &[NodeEvent]) -> Result<(), String> {
        let start = events.len().saturating_sub(MAX_QUEUED_EVENTS);
        let bytes = serde_json::to_vec(&events[start..]).expect("events serialize");
        write_atomic(&self.file("events.json"), &bytes).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_replaces_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("state"));
        assert_eq!(dir.load().unwrap(), NodeState::default());
        let mut state = NodeState::default();
        state
            .failed_revisions
            .entry("x".into())
            .or_default()
            .insert(3);
        dir.save(&state).unwrap();
        assert_eq!(dir.load().unwrap(), state);
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        std::fs::write(tmp.path().join("state/state.json"), b"{broken").unwrap();
        assert!(dir.load().unwrap_err().contains("corrupt"));
    }
}
