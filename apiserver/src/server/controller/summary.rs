//! The fleet at a glance.

use super::*;

impl Controller {
    /// The fleet at a glance.
    pub fn summary(&self) -> Result<Summary, Error> {
        let nodes = self.list_nodes()?;
        let mut summary = Summary {
            nodes: nodes.len() as u64,
            ..Summary::default()
        };
        for node in &nodes {
            for condition in &node.status.conditions {
                let key = match (condition.kind.as_str(), condition.status) {
                    ("Ready", ConditionStatus::True) => "Ready",
                    ("Ready", _) => "NotReady",
                    (other, ConditionStatus::True) => other,
                    _ => continue,
                };
                *summary.by_condition.entry(key.to_string()).or_default() += 1;
            }
            let site = node
                .metadata
                .labels
                .get("site")
                .cloned()
                .unwrap_or_else(|| "(none)".into());
            *summary.by_site.entry(site).or_default() += 1;
            for component in &node.status.report.components {
                let version = component
                    .version
                    .clone()
                    .unwrap_or_else(|| "(absent)".into());
                *summary
                    .by_component_version
                    .entry(component.name.clone())
                    .or_default()
                    .entry(version)
                    .or_default() += 1;
            }
        }
        summary.desired_states = self.cache().states.len() as u64;
        for rollout in self.list_rollouts()? {
            *summary
                .rollouts_by_phase
                .entry(rollout.status.phase.as_str().to_string())
                .or_default() += 1;
        }
        summary.control_plane = Some(self.control_plane());
        Ok(summary)
    }
}
