//! Prometheus metrics: request latency and applies as they happen, fleet gauges at scrape time.

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

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
        fleet.register("shoal_nodes", "Registered nodes", nodes);
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
}
