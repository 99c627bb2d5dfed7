//! The `shoal/v1` manifest types, with their defaults and JSON Schema.
//!
//! The types are deliberately lenient where a strict serde type would stop at
//! the first problem (versions, names and URLs are plain strings): `validate`
//! checks them afterwards so that one run reports every error of a file.
//! Unknown fields are caught by the parser (see `parse`), not by
//! `deny_unknown_fields`, for the same reason; the schema still says
//! `additionalProperties: false` through `#[schemars(deny_unknown_fields)]`.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only `apiVersion` this crate understands.
pub const API_VERSION: &str = "shoal/v1";
/// The `kind` of a desired-state manifest.
pub const KIND_DESIRED_STATE: &str = "DesiredState";
/// The label that puts a node in front of every rollout.
pub const CANARY_LABEL: &str = "shoal/canary";

/// A pinned set of services, drivers and packages for the nodes a selector picks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct DesiredState {
    /// Always `shoal/v1`.
    #[schemars(extend("enum" = ["shoal/v1"]))]
    pub api_version: String,
    /// Always `DesiredState`.
    #[schemars(extend("enum" = ["DesiredState"]))]
    pub kind: String,
    /// Name, labels and server-managed fields.
    pub metadata: ObjectMeta,
    /// What the selected nodes should run, how health is judged and how a change rolls out.
    pub spec: DesiredStateSpec,
}

/// Identity of an object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ObjectMeta {
    /// A DNS label (lowercase letters, digits and `-`, at most 63 characters), unique per kind.
    pub name: String,
    /// Free-form labels; keys and values follow Kubernetes label syntax.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations (not used for selection). shoal records provenance here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the apiserver. Send it back on a write to fail with 409 when the object changed since it was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// The desired state of a node group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct DesiredStateSpec {
    /// The node group. An empty selector selects every node.
    #[serde(default)]
    pub selector: LabelSelector,
    /// Applied in this order, reverted in reverse order.
    pub components: Vec<Component>,
    /// Health checks run before a change (the baseline) and after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    /// How a change reaches the group.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// A Kubernetes-style label selector: every `matchLabels` pair and every expression must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels a node must carry with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One set-based selector requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct SelectorRequirement {
    /// The label key.
    pub key: String,
    /// How the label's value is tested.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn` (at least one); none for `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Selector operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    /// The label is present and its value is one of `values`.
    In,
    /// The label is absent, or its value is none of `values`.
    NotIn,
    /// The label is present, with any value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// What a component is, which decides the backend that manages it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ComponentKind {
    /// A long-running process from a tar.gz artifact, run by systemd or the built-in supervisor.
    Service,
    /// A kernel module (`.ko`), loaded with modprobe.
    Driver,
    /// A dpkg package, from a `.deb` artifact or from apt.
    Package,
}

impl ComponentKind {
    /// The lowercase name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Service => "service",
            ComponentKind::Driver => "driver",
            ComponentKind::Package => "package",
        }
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a component should be installed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComponentState {
    /// Installed at `version` (the default).
    #[default]
    Present,
    /// Removed from the node. `version` and `artifact` are not needed.
    Absent,
}

/// One pinned service, driver or package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Component {
    /// Unique on a node: lowercase letters, digits, `-`, `_`, `.` and `+`, starting with a letter or digit, at most 63 characters.
    pub name: String,
    /// `service`, `driver` or `package`.
    pub kind: ComponentKind,
    /// Semantic version for services and drivers (`2.4.1`), Debian version for packages (`1:2023.03-1`). Required unless `state: absent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `present` (default) or `absent`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub state: ComponentState,
    /// Where the bits come from. Required for services and drivers; packages without one come from apt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// Settings for `kind: service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSettings>,
    /// Settings for `kind: driver`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<DriverSettings>,
    /// Settings for `kind: package`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<PackageSettings>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A downloadable artifact, verified before anything on the node is touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Artifact {
    /// `http://`, `https://` or `file://` URL.
    pub url: String,
    /// SHA-256 of the file, 64 hexadecimal characters.
    pub sha256: String,
    #[doc = "Size in bytes; optional. A download stops as soon as it exceeds it, and a file of another size is refused like a wrong sha256."]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// How a service runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Program and arguments; a relative program path is inside the unpacked artifact.
    pub exec: Vec<String>,
    /// Environment variables for the process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Seconds the process must stay up after a (re)start to count as started. Default 2.
    #[serde(default = "default_start_seconds")]
    pub start_seconds: u32,
    #[doc = "User the process runs as (a name, or a numeric uid), which must exist on the node; the unpacked files are owned by it. Default: root, like the nodelet."]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[doc = "Group the process runs as (a name, or a numeric gid). Default: the user's primary group."]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

fn default_start_seconds() -> u32 {
    2
}

/// How a driver loads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct DriverSettings {
    /// Kernel module name, when it differs from the component name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Module parameters passed to modprobe, in order (`param=value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<String>,
}

/// How a package is named in dpkg.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct PackageSettings {
    /// dpkg package name, when it differs from the component name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A health check. Exactly one of `http`, `tcp`, `exec`, `resource` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct Probe {
    /// A DNS label, unique among the probes of the manifest.
    pub name: String,
    /// Passes on a 2xx answer, or on `expectedStatus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Passes when a TCP connection opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// Passes when the command exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecCheck>,
    /// Passes while host resources stay below the thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceCheck>,
    /// Seconds between two runs. Default 10.
    #[serde(default = "default_period_seconds")]
    pub period_seconds: u32,
    /// Consecutive failures that make a regression. Default 3.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Seconds one run may take before it counts as failed. Default 2.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u32,
    /// Revert even when this probe already failed at baseline. Default false.
    #[serde(default)]
    pub required: bool,
}

fn default_period_seconds() -> u32 {
    10
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_timeout_seconds() -> u32 {
    2
}

/// The check a probe performs, once validation has made sure there is exactly one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProbeCheck<'a> {
    /// An HTTP GET.
    Http(&'a HttpCheck),
    /// A TCP connect.
    Tcp(&'a TcpCheck),
    /// A command.
    Exec(&'a ExecCheck),
    /// Host resource thresholds.
    Resource(&'a ResourceCheck),
}

impl Probe {
    /// The one check this probe performs; `None` when zero or several are set (validation rejects that).
    pub fn check(&self) -> Option<ProbeCheck<'_>> {
        let mut checks = [
            self.http.as_ref().map(ProbeCheck::Http),
            self.tcp.as_ref().map(ProbeCheck::Tcp),
            self.exec.as_ref().map(ProbeCheck::Exec),
            self.resource.as_ref().map(ProbeCheck::Resource),
        ]
        .into_iter()
        .flatten();
        match (checks.next(), checks.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }
}

/// An HTTP GET probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct HttpCheck {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Status that counts as passing; any 2xx when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<u16>,
}

/// A TCP connect probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct TcpCheck {
    /// `host:port`.
    pub address: String,
}

/// A command probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ExecCheck {
    /// Program and arguments, run without a shell.
    pub command: Vec<String>,
}

/// Host resource thresholds, read with sysinfo. At least one is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ResourceCheck {
    /// Passes while used memory is below this share of total memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_percent_below: Option<f64>,
    /// Passes while overall CPU use is below this percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_used_percent_below: Option<f64>,
    /// Passes while the disk holding the managed root is used below this percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used_percent_below: Option<f64>,
    /// Passes while every temperature sensor reads below this many degrees Celsius.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius_below: Option<f64>,
}

/// How a change reaches the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Cumulative share of the group updated after each wave: a node count (`"1"`) or a percentage (`"10%"`), ending at `"100%"`. Default `["1", "10%", "50%", "100%"]`.
    #[serde(default = "default_waves")]
    pub waves: Vec<WaveStep>,
    /// Seconds every node of a wave must stay healthy before the next wave starts. Default 300.
    #[serde(default = "default_bake_seconds")]
    pub bake_seconds: u64,
    /// Seconds a node has to become healthy before it counts as failed. Default 600.
    #[serde(default = "default_healthy_deadline_seconds")]
    pub healthy_deadline_seconds: u64,
    /// Failed nodes tolerated before the rollout aborts: a count (`0`) or a percentage of the group (`"5%"`). Default 0.
    #[serde(default)]
    pub max_failures: FailureBudget,
    /// Nodes of a wave that may be unavailable (NotReady when the wave starts, or cordoned) while the wave goes on without them: a count or a percentage of the group. Past it the rollout waits. Default 0.
    #[serde(default, skip_serializing_if = "FailureBudget::is_zero")]
    pub max_unavailable: FailureBudget,
    /// Spread each wave across the values of this node label (for example `site`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
    /// On abort, put every node of the rollout back to the last good revision. Default true.
    #[serde(default = "default_true")]
    pub auto_revert: bool,
}

fn default_waves() -> Vec<WaveStep> {
    vec![
        WaveStep::Count(1),
        WaveStep::Percent(10),
        WaveStep::Percent(50),
        WaveStep::Percent(100),
    ]
}
fn default_bake_seconds() -> u64 {
    300
}
fn default_healthy_deadline_seconds() -> u64 {
    600
}
fn default_true() -> bool {
    true
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            waves: default_waves(),
            bake_seconds: default_bake_seconds(),
            healthy_deadline_seconds: default_healthy_deadline_seconds(),
            max_failures: FailureBudget::default(),
            max_unavailable: FailureBudget::default(),
            spread_by: None,
            auto_revert: true,
        }
    }
}

/// One wave's cumulative size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaveStep {
    /// This many nodes in total after the wave.
    Count(u32),
    /// This percentage (1–100) of the group in total after the wave, rounded up.
    Percent(u32),
}

impl WaveStep {
    /// Cumulative number of nodes of a group of `group_size` updated once this wave is done.
    pub fn cumulative(self, group_size: usize) -> usize {
        match self {
            WaveStep::Count(n) => (n as usize).min(group_size),
            WaveStep::Percent(p) => (group_size * p as usize).div_ceil(100),
        }
    }
}

impl fmt::Display for WaveStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveStep::Count(n) => write!(f, "{n}"),
            WaveStep::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parses `"3"` or `"25%"`: what `waves` and `maxFailures` accept.
fn parse_count_or_percent(text: &str) -> Result<(u32, bool), String> {
    let trimmed = text.trim();
    let (digits, percent) = match trimmed.strip_suffix('%') {
        Some(digits) => (digits.trim(), true),
        None => (trimmed, false),
    };
    let value: u32 = digits.parse().map_err(|_| {
        format!("`{text}` is neither a whole number (\"3\") nor a whole percentage (\"25%\")")
    })?;
    Ok((value, percent))
}

impl std::str::FromStr for WaveStep {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        // Range checks live in `validate`, so that they are reported with every other problem.
        match parse_count_or_percent(text)? {
            (n, false) => Ok(WaveStep::Count(n)),
            (p, true) => Ok(WaveStep::Percent(p)),
        }
    }
}

/// Accepts a YAML string or integer, since `waves: [1, "10%"]` is a natural thing to write.
#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrInt {
    Int(u64),
    String(String),
}

impl StringOrInt {
    fn into_text(self) -> String {
        match self {
            StringOrInt::Int(n) => n.to_string(),
            StringOrInt::String(s) => s,
        }
    }
}

impl Serialize for WaveStep {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WaveStep {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = StringOrInt::deserialize(deserializer)
            .map_err(|_| {
                serde::de::Error::custom("expected a node count (\"1\") or a percentage (\"10%\")")
            })?
            .into_text();
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for WaveStep {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "WaveStep".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A node count (\"1\") or a whole percentage (\"10%\").",
            "oneOf": [
                {"type": "string", "pattern": "^([1-9][0-9]*|([1-9][0-9]?|100)%)$"},
                {"type": "integer", "minimum": 1}
            ]
        })
    }
}

/// How many failed nodes a rollout tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureBudget {
    /// At most this many nodes.
    Count(u32),
    /// At most this percentage of the group, rounded down.
    Percent(u32),
}

impl Default for FailureBudget {
    fn default() -> Self {
        FailureBudget::Count(0)
    }
}

impl FailureBudget {
    /// The default: no node.
    pub fn is_zero(&self) -> bool {
        matches!(self, FailureBudget::Count(0) | FailureBudget::Percent(0))
    }

    /// Failed nodes tolerated in a group of `group_size`.
    pub fn allowed(self, group_size: usize) -> usize {
        match self {
            FailureBudget::Count(n) => n as usize,
            FailureBudget::Percent(p) => group_size * p as usize / 100,
        }
    }
}

impl fmt::Display for FailureBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureBudget::Count(n) => write!(f, "{n}"),
            FailureBudget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for FailureBudget {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            FailureBudget::Count(n) => serializer.serialize_u32(*n),
            FailureBudget::Percent(_) => serializer.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for FailureBudget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = StringOrInt::deserialize(deserializer)
            .map_err(|_| {
                serde::de::Error::custom("expected a node count (0) or a percentage (\"5%\")")
            })?
            .into_text();
        match parse_count_or_percent(&text).map_err(serde::de::Error::custom)? {
            (n, false) => Ok(FailureBudget::Count(n)),
            (p, true) => Ok(FailureBudget::Percent(p)),
        }
    }
}

impl JsonSchema for FailureBudget {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FailureBudget".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A node count (0) or a whole percentage of the group (\"5%\").",
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^([0-9]+|([0-9]|[1-9][0-9]|100)%)$"}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_steps_round_up() {
        assert_eq!(WaveStep::Percent(10).cumulative(5), 1);
        assert_eq!(WaveStep::Percent(50).cumulative(5), 3);
        assert_eq!(WaveStep::Percent(100).cumulative(5), 5);
        assert_eq!(WaveStep::Count(3).cumulative(2), 2);
        assert_eq!(WaveStep::Percent(1).cumulative(0), 0);
    }

    #[test]
    fn wave_step_text() {
        assert_eq!("10%".parse::<WaveStep>(), Ok(WaveStep::Percent(10)));
        assert_eq!("3".parse::<WaveStep>(), Ok(WaveStep::Count(3)));
        assert!("12.5%".parse::<WaveStep>().is_err());
    }

    #[test]
    fn failure_budget_rounds_down() {
        assert_eq!(FailureBudget::Percent(10).allowed(19), 1);
        assert_eq!(FailureBudget::Count(2).allowed(1), 2);
    }
}
