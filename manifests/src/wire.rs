//! Objects the apiserver stores and serves, and the node protocol's messages.
//!
//! Timestamps are RFC 3339 strings on the wire (as in Kubernetes) and
//! `SystemTime` in memory.

use std::collections::BTreeMap;
use std::time::SystemTime;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::types::{ComponentKind, DesiredStateSpec};

/// Serde helpers for RFC 3339 timestamps.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Formats a time as RFC 3339 with milliseconds, in UTC.
    pub fn format(time: SystemTime) -> String {
        humantime::format_rfc3339_millis(time).to_string()
    }

    /// Parses an RFC 3339 time.
    pub fn parse(text: &str) -> Result<SystemTime, String> {
        humantime::parse_rfc3339_weak(text)
            .map_err(|e| format!("`{text}` is not an RFC 3339 time: {e}"))
    }

    /// `#[serde(with = "rfc3339::option")]` for `Option<SystemTime>`.
    pub mod option {
        use super::*;

        /// Serializes an optional time.
        pub fn serialize<S: Serializer>(
            time: &Option<SystemTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match time {
                Some(time) => s.serialize_str(&format(*time)),
                None => s.serialize_none(),
            }
        }

        /// Deserializes an optional time.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| parse(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }

    /// `#[serde(with = "rfc3339::required")]` for `SystemTime`.
    pub mod required {
        use super::*;

        /// Serializes a time.
        pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&format(*time))
        }

        /// Deserializes a time.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
            let text = String::deserialize(d)?;
            parse(&text).map_err(serde::de::Error::custom)
        }
    }
}

/// Metadata of server-side objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectInfo {
    /// Object name.
    pub name: String,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Changes on every write; send it back to detect concurrent changes (409).
    pub resource_version: String,
    /// When the object was created.
    #[serde(
        default,
        with = "rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub creation_timestamp: Option<SystemTime>,
}

/// Where a revision came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionSource {
    /// `apply`, `git` or `undo`.
    pub kind: String,
    /// Who made it: the token's name, or `git-sync`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Git commit SHA, for git sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Git commit author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Git commit subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// File the manifest came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// One stored version of a DesiredState's spec. Revisions are numbered from 1 and never change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// The DesiredState.
    pub desired_state: String,
    /// 1, 2, 3, …
    pub revision: u64,
    /// When it was stored.
    #[serde(with = "rfc3339::required")]
    #[schemars(with = "String")]
    pub created: SystemTime,
    /// Where it came from.
    pub source: RevisionSource,
    /// The spec at this revision, defaults filled in.
    pub spec: DesiredStateSpec,
}

/// Server-side view of a DesiredState.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredStateStatus {
    /// The newest revision.
    pub revision: u64,
    /// The revision every node of the group may run (the last one that finished rolling out).
    #[serde(default)]
    pub last_good_revision: u64,
    /// Where the newest revision came from.
    #[serde(default)]
    pub source: RevisionSource,
    /// Nodes the selector picks now.
    #[serde(default)]
    pub selected_nodes: u64,
}

/// A DesiredState as the apiserver stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredStateObject {
    /// `shoal/v1`.
    pub api_version: String,
    /// `DesiredState`.
    pub kind: String,
    /// Name, labels, annotations, resourceVersion.
    pub metadata: StoredMeta,
    /// The newest spec.
    pub spec: DesiredStateSpec,
    /// Revision bookkeeping.
    pub status: DesiredStateStatus,
}

/// Metadata of a stored DesiredState (the manifest's metadata plus server fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredMeta {
    /// Name.
    pub name: String,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Changes on every write.
    pub resource_version: String,
    /// Increments when the spec changes (equals the newest revision).
    pub generation: u64,
    /// When the object was created.
    #[serde(
        default,
        with = "rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub creation_timestamp: Option<SystemTime>,
}

/// What happened to one object of an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    /// It did not exist.
    Created,
    /// Its spec, labels or annotations changed.
    Configured,
    /// Nothing changed.
    Unchanged,
    /// Removed by prune.
    Pruned,
}

/// The result of applying one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    /// `DesiredState`.
    pub kind: String,
    /// Object name.
    pub name: String,
    /// What happened (or would happen, on a dry run).
    pub action: ApplyAction,
    /// The revision the object is at afterwards.
    pub revision: u64,
    /// The object's resourceVersion afterwards.
    pub resource_version: String,
}

/// The response to `POST /api/v1/apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResponse {
    /// True when nothing was stored.
    pub dry_run: bool,
    /// One result per object, in input order.
    pub results: Vec<ApplyResult>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiErrorBody {
    /// What went wrong.
    pub error: String,
    /// The field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Every problem, for invalid manifests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<crate::error::Diagnostic>,
}

/// Lifecycle of one component on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ComponentPhase {
    /// Desired but not started.
    Pending,
    /// Downloading, installing, switching.
    Applying,
    /// Applied; probes are being watched.
    Verifying,
    /// Applied and every probe holds.
    Healthy,
    /// A step failed or a probe regressed; going back.
    Reverting,
    /// Back at exactly what was there before the change.
    Reverted,
    /// The revert failed too: needs an operator.
    Failed,
}

/// One component as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Component name.
    pub name: String,
    /// Component kind.
    pub kind: ComponentKind,
    /// The DesiredState that pins it.
    pub desired_state: String,
    /// The revision of that DesiredState being applied.
    pub revision: u64,
    /// The version the manifest asks for (`None` for `state: absent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<String>,
    /// The version installed now (`None` when not installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where in its lifecycle it is.
    pub phase: ComponentPhase,
    /// Why, for Reverted and Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Output of the probe that regressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_output: Option<String>,
    /// Last lines of the component's log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
}

/// One probe as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeStatus {
    /// Probe name.
    pub name: String,
    /// The DesiredState that defines it.
    pub desired_state: String,
    /// The latest run passed.
    pub passing: bool,
    /// The baseline run (before the last change) passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_passing: Option<bool>,
    /// Failures in a row.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Output of the latest run, shortened.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
}

/// Host metrics, read with sysinfo on the node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostMetrics {
    /// Overall CPU use, percent.
    pub cpu_percent: f64,
    /// Used memory, bytes.
    pub memory_used_bytes: u64,
    /// Total memory, bytes.
    pub memory_total_bytes: u64,
    /// Used bytes on the disk holding the managed root.
    pub disk_used_bytes: u64,
    /// Size of that disk.
    pub disk_total_bytes: u64,
    /// Hottest temperature sensor, °C, when the host has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<f64>,
    /// Seconds since boot.
    pub uptime_seconds: u64,
    /// Running processes.
    pub process_count: u64,
}

/// Which revision of a DesiredState a node runs, and how that went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedState {
    /// The DesiredState.
    pub desired_state: String,
    /// The revision the node was asked to run.
    pub revision: u64,
    /// The worst phase among its components.
    pub phase: ComponentPhase,
    /// The git commit of that revision, when it came from git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// When the node last reached Healthy at this revision.
    #[serde(
        default,
        with = "rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub healthy_since: Option<SystemTime>,
}

/// `True`, `False` or `Unknown`, as in Kubernetes conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// Holds.
    True,
    /// Does not hold.
    False,
    /// Not known (no report yet).
    Unknown,
}

/// A node condition: `Ready`, `Converged`, `Healthy` or `Conflict`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Which condition.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// One CamelCase word.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// For people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What a node reports on every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The nodelet's version.
    #[serde(default)]
    pub nodelet_version: String,
    /// The assignment generation the node has acted on.
    #[serde(default)]
    pub observed_generation: u64,
    /// Per DesiredState: revision and phase.
    #[serde(default)]
    pub applied: Vec<AppliedState>,
    /// Every managed component.
    #[serde(default)]
    pub components: Vec<ComponentStatus>,
    /// Every probe.
    #[serde(default)]
    pub probes: Vec<ProbeStatus>,
    /// Host metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostMetrics>,
    /// Things that happened since the last report, oldest first (kept while offline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<NodeEvent>,
    /// Set while the node is short of disk space (what is short, for people): the
    /// `DiskPressure` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_pressure: Option<String>,
}

/// Something that happened on a node, as the node recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEvent {
    /// When, by the node's clock.
    #[serde(with = "rfc3339::required")]
    #[schemars(with = "String")]
    pub time: SystemTime,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// One CamelCase word: `Applied`, `Healthy`, `Reverted`, `Drift`, …
    pub reason: String,
    /// For people: probe output and log lines included.
    pub message: String,
    /// The DesiredState it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_state: Option<String>,
    /// The revision it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The component it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
}

/// Event severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EventType {
    /// Expected.
    Normal,
    /// Needs attention.
    Warning,
}

/// A node's status, as the apiserver keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// When the last heartbeat arrived.
    #[serde(
        default,
        with = "rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub last_heartbeat: Option<SystemTime>,
    /// Ready, Converged, Healthy, Conflict.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The latest report, without its events (those become Events).
    #[serde(default)]
    pub report: NodeReport,
    /// Per DesiredState: the revision the node reports Healthy and when the server first
    /// received that (the server's clock; rollouts bake on it, never on the node's clock).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub healthy_received: BTreeMap<String, HealthyReceived>,
    /// Set by `shoal cordon`: the node takes no new revision and keeps these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cordoned: Option<Cordon>,
    /// Recent host metrics, oldest first (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_history: Vec<HostSample>,
}

/// When the server first heard a node Healthy at a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthyReceived {
    /// The revision.
    pub revision: u64,
    /// The node's own `healthySince` in that report: a new value is a new healthy spell.
    #[serde(
        default,
        with = "rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub node_since: Option<SystemTime>,
    /// When the report arrived (server clock).
    #[serde(with = "rfc3339::required")]
    #[schemars(with = "String")]
    pub at: SystemTime,
}

/// A cordon: who, when, and the revisions the node keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cordon {
    /// When.
    #[serde(with = "rfc3339::required")]
    #[schemars(with = "String")]
    pub since: SystemTime,
    /// Who (the token's name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
    /// DesiredState → the revision the node was assigned when cordoned.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revisions: BTreeMap<String, u64>,
}

/// One host metrics sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostSample {
    /// When it arrived.
    #[serde(with = "rfc3339::required")]
    #[schemars(with = "String")]
    pub time: SystemTime,
    /// The metrics.
    pub metrics: HostMetrics,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeObject {
    /// Name and labels.
    pub metadata: ObjectInfo,
    /// What the node last reported.
    pub status: NodeStatus,
}

/// `POST /api/v1/nodes/register` with a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    /// The node's name (a DNS label).
    pub name: String,
    /// The node's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The answer to a registration: the node token, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    /// The node's name.
    pub name: String,
    /// The node token: keep it; the apiserver stores only its hash.
    pub token: String,
}

/// One DesiredState at the revision a node should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssignedState {
    /// The DesiredState.
    pub name: String,
    /// The revision.
    pub revision: u64,
    /// The git commit of that revision, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The spec at that revision.
    pub spec: DesiredStateSpec,
}

/// A component pinned by more than one DesiredState on one node: applied by none of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentConflict {
    /// The component name.
    pub component: String,
    /// The DesiredStates that pin it.
    pub desired_states: Vec<String>,
}

/// Everything a node should run: `GET /api/v1/nodes/{name}/assignment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAssignment {
    /// The node.
    pub node: String,
    /// A hash of the content: equal generations mean equal assignments.
    pub generation: u64,
    /// DesiredStates selecting this node, each at its assigned revision.
    pub states: Vec<AssignedState>,
    /// Components left alone because two DesiredStates pin them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<ComponentConflict>,
}

/// A recorded event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Sequence number, increasing.
    pub seq: u64,
    /// When it happened.
    #[serde(with = "rfc3339::required")]
    #[schemars(with = "String")]
    pub time: SystemTime,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// One CamelCase word.
    pub reason: String,
    /// The object it is about: `node/x`, `desiredstate/y`, `rollout/y`.
    pub object: String,
    /// For people.
    pub message: String,
    /// The node involved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The DesiredState involved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_state: Option<String>,
    /// The revision involved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// The fleet at a glance: `GET /api/v1/summary`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Registered nodes.
    pub nodes: u64,
    /// Nodes per condition that holds (`Ready`, `NotReady`, `Healthy`, `Converged`, `Conflict`).
    pub by_condition: BTreeMap<String, u64>,
    /// Nodes per value of the `site` label (`(none)` when missing).
    pub by_site: BTreeMap<String, u64>,
    /// Nodes per component and installed version.
    pub by_component_version: BTreeMap<String, BTreeMap<String, u64>>,
    /// DesiredStates.
    pub desired_states: u64,
    /// Rollouts per phase.
    pub rollouts_by_phase: BTreeMap<String, u64>,
    /// The apiserver replica that answered, and who leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlane>,
}

/// The apiserver replica that answered a summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlane {
    /// This replica's name in the leader lease.
    pub replica: String,
    /// Whether this replica leads (runs the rollout controller, readiness events, git sync).
    pub leading: bool,
    /// The replica that holds the leader lease, as this one last read it (absent with a
    /// store of its own: then it always leads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Where the store is: `sled`, `postgres` or `memory`.
    pub store: String,
    /// The newest store revision this replica has applied.
    pub revision: u64,
}

/// Where a rollout is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum RolloutPhase {
    /// The revision is stored; the controller has not planned its waves yet (within a tick).
    Pending,
    /// Waves are being applied (or the rollout waits for nodes: see the message).
    Progressing,
    /// Held by an operator.
    Paused,
    /// Every wave baked.
    Complete,
    /// Too many nodes failed.
    Aborted,
    /// Aborted, and every node of the rollout is back at the last good revision.
    RolledBack,
    /// A newer revision replaced it before it finished.
    Superseded,
}

impl RolloutPhase {
    /// The phase's name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Pending => "Pending",
            RolloutPhase::Progressing => "Progressing",
            RolloutPhase::Paused => "Paused",
            RolloutPhase::Complete => "Complete",
            RolloutPhase::Aborted => "Aborted",
            RolloutPhase::RolledBack => "RolledBack",
            RolloutPhase::Superseded => "Superseded",
        }
    }

    /// Complete, Aborted, RolledBack or Superseded: nothing more happens to it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutPhase::Complete
                | RolloutPhase::Aborted
                | RolloutPhase::RolledBack
                | RolloutPhase::Superseded
        )
    }
}

/// A rollout of one revision of a DesiredState to its group, wave by wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutObject {
    /// Named after its DesiredState.
    pub metadata: ObjectInfo,
    /// What rolls out, and the plan.
    pub spec: RolloutSpecState,
    /// How far it got.
    pub status: RolloutStatus,
}

/// What a rollout rolls out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpecState {
    /// The DesiredState.
    pub desired_state: String,
    /// The revision being rolled out.
    pub revision: u64,
    /// The last good revision before it (0 when there was none).
    pub from_revision: u64,
    /// The waves, planned when the rollout started.
    #[schemars(with = "Vec<serde_json::Value>")]
    pub plan: Vec<crate::plan::Wave>,
}

/// Progress of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The phase.
    pub phase: RolloutPhase,
    /// 0-based index of the wave in progress (equal to the plan's length when done).
    pub current_wave: usize,
    /// When the current wave started, on the server's clock. None: it has not started (the
    /// rollout waits for nodes, or for unavailable nodes to come back within `maxUnavailable`).
    #[serde(
        default,
        with = "rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub wave_started: Option<SystemTime>,
    /// Nodes that failed, with why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_nodes: BTreeMap<String, String>,
    /// Nodes the rollout went on without (NotReady when their wave started, or cordoned), with
    /// why; they count against `maxUnavailable`, not `maxFailures`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unavailable_nodes: BTreeMap<String, String>,
    /// Nodes that baked the revision on fresh evidence so far. The revision becomes last good
    /// only when this is at least 1.
    #[serde(default)]
    pub baked_nodes: u64,
    /// For people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When it started.
    #[serde(with = "rfc3339::required")]
    #[schemars(with = "String")]
    pub started: SystemTime,
    /// When it finished (Complete, Aborted, RolledBack or Superseded).
    #[serde(
        default,
        with = "rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub finished: Option<SystemTime>,
}
