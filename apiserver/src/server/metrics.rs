//! Prometheus metrics: request latency and applies as they happen, fleet gauges at scrape time.

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use manifests::wire::{RolloutObject, RolloutPhase};

use super::controller::Controller;

/// Labels of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// The route pattern (`/api/v1/nodes/{name}`), not the raw path, to bound cardinality.
    pub route: String,
    /// Status code.
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ApplyLabels {
    action: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConditionLabels {
    condition: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ComponentVersionLabels {
    component: String,
    version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DesiredStateLabels {
    desiredstate: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DesiredStatePhaseLabels {
    desiredstate: String,
    phase: String,
}

/// What `shoal_nodes_by_condition` always has a series for, zero or not: a dashboard or an
/// alert on `NotReady > 0` must see 0, not no data (Kubernetes' kube-state-metrics does the same).
const CONDITIONS: [&str; 6] = [
    "Ready",
    "NotReady",
    "Healthy",
    "Converged",
    "Conflict",
    "DiskPressure",
];

/// Every rollout phase, for the same reason.
const PHASES: [RolloutPhase; 7] = [
    RolloutPhase::Pending,
    RolloutPhase::Progressing,
    RolloutPhase::Paused,
    RolloutPhase::Complete,
    RolloutPhase::Aborted,
    RolloutPhase::RolledBack,
    RolloutPhase::Superseded,
];

/// Metrics that accumulate while the server runs.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Histogram>,
    applies: Family<ApplyLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers the accumulating metrics.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "shoal_http_request_duration_seconds",
            "Time to answer an HTTP request (long polls and watches excluded)",
            requests.clone(),
        );
        let applies = Family::<ApplyLabels, Counter>::default();
        registry.register(
            "shoal_applies",
            "Objects applied, by what happened to them",
            applies.clone(),
        );
        Metrics {
            registry,
            requests,
            applies,
        }
    }

    /// Records one answered request.
    pub fn observe_request(&self, labels: RequestLabels, seconds: f64) {
        self.requests.get_or_create(&labels).observe(seconds);
    }

    /// Counts one applied object.
    pub fn count_apply(&self, action: &str) {
        self.applies
            .get_or_create(&ApplyLabels {
                action: action.to_string(),
            })
            .inc();
    }

    /// The exposition text: accumulated metrics, then fleet gauges computed now.
    pub fn render(
        &self,
        controller: &Controller,
        open_watches: usize,
    ) -> Result<String, super::error::ApiError> {
        let fleet = Registry::default();
        let mut fleet = fleet;
        let by_condition = Family::<ConditionLabels, Gauge>::default();
        let by_phase = Family::<PhaseLabels, Gauge>::default();
        let cpu = Family::<NodeLabels, Gauge<f64, AtomicU64>>::default();
        let memory = Family::<NodeLabels, Gauge>::default();
        let disk = Family::<NodeLabels, Gauge>::default();
        let temperature = Family::<NodeLabels, Gauge<f64, AtomicU64>>::default();
        let uptime = Family::<NodeLabels, Gauge>::default();
        let summary = controller.summary()?;
        for condition in CONDITIONS {
            by_condition
                .get_or_create(&ConditionLabels {
                    condition: condition.to_string(),
                })
                .set(0);
        }
        for phase in PHASES {
            by_phase
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str().to_string(),
                })
                .set(0);
        }
        for (condition, count) in &summary.by_condition {
            by_condition
                .get_or_create(&ConditionLabels {
                    condition: condition.clone(),
                })
                .set(*count as i64);
        }
        for (phase, count) in &summary.rollouts_by_phase {
            by_phase
                .get_or_create(&PhaseLabels {
                    phase: phase.clone(),
                })
                .set(*count as i64);
        }
        for node in controller.list_nodes()? {
            let Some(host) = &node.status.report.host else {
                continue;
            };
            let labels = NodeLabels {
                node: node.metadata.name.clone(),
            };
            cpu.get_or_create(&labels).set(host.cpu_percent);
            memory
                .get_or_create(&labels)
                .set(host.memory_used_bytes as i64);
            disk.get_or_create(&labels).set(host.disk_used_bytes as i64);
            if let Some(t) = host.temperature_celsius {
                temperature.get_or_create(&labels).set(t);
            }
            uptime
                .get_or_create(&labels)
                .set(host.uptime_seconds as i64);
        }
        let nodes = Gauge::<i64>::default();
        nodes.set(summary.nodes as i64);
        fleet.register("shoal_nodes_registered", "Registered nodes", nodes);
        let by_version = Family::<ComponentVersionLabels, Gauge>::default();
        for (component, versions) in &summary.by_component_version {
            for (version, count) in versions {
                by_version
                    .get_or_create(&ComponentVersionLabels {
                        component: component.clone(),
                        version: version.clone(),
                    })
                    .set(*count as i64);
            }
        }
        fleet.register(
            "shoal_nodes",
            "Nodes that report a component at a version (`(absent)`: removed)",
            by_version,
        );
        self.rollout_gauges(&mut fleet, &controller.list_rollouts()?);
        fleet.register(
            "shoal_nodes_by_condition",
            "Nodes for which a condition holds (Ready, NotReady, Healthy, Converged, Conflict)",
            by_condition,
        );
        fleet.register("shoal_rollouts", "Rollouts by phase", by_phase);
        fleet.register("shoal_node_cpu_percent", "Node CPU use, percent", cpu);
        fleet.register("shoal_node_memory_used_bytes", "Node memory in use", memory);
        fleet.register(
            "shoal_node_disk_used_bytes",
            "Used bytes on the node's managed disk",
            disk,
        );
        fleet.register(
            "shoal_node_temperature_celsius",
            "Node's hottest sensor",
            temperature,
        );
        fleet.register("shoal_node_uptime_seconds", "Node uptime", uptime);
        let watches = Gauge::<i64>::default();
        watches.set(open_watches as i64);
        fleet.register(
            "shoal_watches_open",
            "Watches (?watch=true streams) open now",
            watches,
        );
        let mut text = String::new();
        encode_registry(&mut text, &self.registry).expect("writing to a String");
        encode_registry(&mut text, &fleet).expect("writing to a String");
        encode_eof(&mut text).expect("writing to a String");
        Ok(text)
    }

    /// Each DesiredState's newest rollout: its phase (one series per phase, 1 for the one it
    /// is in), revision, wave in progress and number of waves.
    fn rollout_gauges(&self, fleet: &mut Registry, rollouts: &[RolloutObject]) {
        let mut newest: std::collections::BTreeMap<&str, &RolloutObject> = Default::default();
        for rollout in rollouts {
            let entry = newest
                .entry(rollout.spec.desired_state.as_str())
                .or_insert(rollout);
            if rollout.spec.revision > entry.spec.revision {
                *entry = rollout;
            }
        }
        let phase = Family::<DesiredStatePhaseLabels, Gauge>::default();
        let revision = Family::<DesiredStateLabels, Gauge>::default();
        let wave = Family::<DesiredStateLabels, Gauge>::default();
        let waves = Family::<DesiredStateLabels, Gauge>::default();
        for (name, rollout) in newest {
            for candidate in PHASES {
                phase
                    .get_or_create(&DesiredStatePhaseLabels {
                        desiredstate: name.to_string(),
                        phase: candidate.as_str().to_string(),
                    })
                    .set(i64::from(candidate == rollout.status.phase));
            }
            let labels = DesiredStateLabels {
                desiredstate: name.to_string(),
            };
            revision
                .get_or_create(&labels)
                .set(i64::try_from(rollout.spec.revision).unwrap_or(i64::MAX));
            let total = rollout.spec.plan.len();
            // 1-based, as `shoal rollout status` says "wave 2 of 4"; n of n when done.
            wave.get_or_create(&labels)
                .set((rollout.status.current_wave + 1).min(total) as i64);
            waves.get_or_create(&labels).set(total as i64);
        }
        fleet.register(
            "shoal_rollout_phase",
            "The phase of each DesiredState's newest rollout: 1 for the phase it is in, 0 for the others",
            phase,
        );
        fleet.register(
            "shoal_rollout_revision",
            "The revision each DesiredState's newest rollout rolls out",
            revision,
        );
        fleet.register(
            "shoal_rollout_wave",
            "The wave each DesiredState's newest rollout is in (1-based; the last wave when done)",
            wave,
        );
        fleet.register(
            "shoal_rollout_waves",
            "The waves each DesiredState's newest rollout has",
            waves,
        );
    }
}
