//! The rollout controller: moves each new revision through its waves.
//!
//! `step` is a pure function of the DesiredState, its current Rollout, the
//! nodes (labels, readiness, what they report) and the clock. It returns what
//! to write: the Rollout, per-node revision assignments, the last good
//! revision, events. `reconcile` reads that input from the store, calls
//! `step`, and writes its output in one transaction. Everything lives in the
//! store, so an apiserver killed at any moment resumes where it was: the next
//! tick recomputes the same decision from the same stored state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use manifests::plan::{plan_waves, PlanNode};
use manifests::wire::*;

/// A node as the controller sees it for one DesiredState.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Heartbeat within the grace period.
    pub ready: bool,
    /// What it reports for this DesiredState.
    pub applied: Option<AppliedState>,
    /// Why, when its components failed (probe output included).
    pub failure: Option<String>,
}

/// What to write after one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The rollout as it should be stored.
    pub rollout: RolloutObject,
    /// Node → revision to assign.
    pub assign: Vec<(String, u64)>,
    /// Remove every assignment of this DesiredState (nodes fall back to the last good revision).
    pub clear_assignments: bool,
    /// New last good revision.
    pub last_good: Option<u64>,
    /// Events: type, reason, message.
    pub events: Vec<(EventType, String, String)>,
}

fn selected<'a>(state: &DesiredStateObject, nodes: &'a [NodeView]) -> Vec<&'a NodeView> {
    nodes
        .iter()
        .filter(|n| state.spec.selector.matches(&n.labels))
        .collect()
}

fn wave_sizes(plan: &[manifests::plan::Wave]) -> String {
    plan.iter()
        .map(|w| w.nodes.len().to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// One decision for one DesiredState. `None`: nothing to change.
pub fn step(
    state: &DesiredStateObject,
    current: Option<&RolloutObject>,
    nodes: &[NodeView],
    now: SystemTime,
) -> Option<Update> {
    let revision = state.status.revision;
    let last_good = state.status.last_good_revision;
    let is_current = current.is_some_and(|r| r.spec.revision == revision);
    if revision > last_good && !is_current {
        return Some(start(state, current, nodes, now));
    }
    let rollout = current?;
    if rollout.status.phase != RolloutPhase::Progressing || rollout.spec.revision != revision {
        return None;
    }
    let spec = &state.spec.rollout;
    let group: BTreeSet<&str> = selected(state, nodes)
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let wave_started = rollout
        .status
        .wave_started
        .unwrap_or(rollout.status.started);
    let deadline = wave_started + Duration::from_secs(spec.healthy_deadline_seconds);
    let bake = Duration::from_secs(spec.bake_seconds);

    // Judge every node of the waves started so far; nodes that left the group no longer count.
    let mut failed = rollout.status.failed_nodes.clone();
    let mut baked_in_wave = true;
    for (index, wave) in rollout
        .spec
        .plan
        .iter()
        .enumerate()
        .take(rollout.status.current_wave + 1)
    {
        for node_name in &wave.nodes {
            if !group.contains(node_name.as_str()) {
                failed.remove(node_name);
                continue;
            }
            let node = by_name[node_name.as_str()];
            let at_revision = node.applied.as_ref().filter(|a| a.revision == revision);
            let failure = match at_revision.map(|a| a.phase) {
                Some(ComponentPhase::Reverted) | Some(ComponentPhase::Failed) => Some(
                    node.failure
                        .clone()
                        .unwrap_or_else(|| "reverted the revision".into()),
                ),
                _ if !node.ready && index == rollout.status.current_wave => {
                    Some("went NotReady during its wave".to_string())
                }
                Some(ComponentPhase::Healthy) => None,
                _ if index == rollout.status.current_wave && now > deadline => Some(format!(
                    "not healthy within healthyDeadlineSeconds ({}s)",
                    spec.healthy_deadline_seconds
                )),
                _ => None,
            };
            if let Some(why) = failure {
                failed.entry(node_name.clone()).or_insert(why);
                continue;
            }
            if failed.contains_key(node_name) {
                continue; // once failed, failed for this rollout
            }
            if index == rollout.status.current_wave {
                let baked = at_revision
                    .filter(|a| a.phase == ComponentPhase::Healthy)
                    .and_then(|a| a.healthy_since)
                    .is_some_and(|since| now.duration_since(since).unwrap_or_default() >= bake);
                baked_in_wave &= baked;
            }
        }
    }

    let mut next = rollout.clone();
    next.status.failed_nodes = failed.clone();
    let allowed = spec.max_failures.allowed(group.len());
    if failed.len() > allowed {
        let who: Vec<String> = failed
            .iter()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        next.status.phase = if spec.auto_revert {
            RolloutPhase::RolledBack
        } else {
            RolloutPhase::Aborted
        };
        next.status.finished = Some(now);
        next.status.message = format!("{} failed node(s), {allowed} allowed", failed.len());
        let mut events = vec![(
            EventType::Warning,
            "RolloutAborted".to_string(),
            format!(
                "revision {revision} aborted in wave {}: {}",
                rollout.status.current_wave + 1,
                who.join("; ")
            ),
        )];
        if spec.auto_revert {
            events.push((
                EventType::Warning,
                "RolledBack".to_string(),
                format!("every node of the rollout goes back to revision {last_good}"),
            ));
        }
        return Some(Update {
            rollout: next,
            assign: vec![],
            clear_assignments: spec.auto_revert,
            last_good: None,
            events,
        });
    }
    if next.status.failed_nodes != rollout.status.failed_nodes {
        let newly: Vec<String> = failed
            .iter()
            .filter(|(n, _)| !rollout.status.failed_nodes.contains_key(*n))
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        return Some(Update {
            rollout: next,
            assign: vec![],
            clear_assignments: false,
            last_good: None,
            events: vec![(
                EventType::Warning,
                "NodeFailed".into(),
                format!(
                    "within the failure budget ({allowed}): {}",
                    newly.join("; ")
                ),
            )],
        });
    }
    if !baked_in_wave {
        return None;
    }
    let finished_wave = rollout.status.current_wave;
    if finished_wave + 1 >= rollout.spec.plan.len() {
        next.status.phase = RolloutPhase::Complete;
        next.status.current_wave = rollout.spec.plan.len();
        next.status.finished = Some(now);
        next.status.message = format!("revision {revision} is on every node of the group");
        return Some(Update {
            rollout: next,
            assign: vec![],
            clear_assignments: true,
            last_good: Some(revision),
            events: vec![(
                EventType::Normal,
                "RolloutComplete".into(),
                format!("revision {revision} baked in every wave"),
            )],
        });
    }
    let wave = &rollout.spec.plan[finished_wave + 1];
    next.status.current_wave = finished_wave + 1;
    next.status.wave_started = Some(now);
    let assign: Vec<(String, u64)> = wave
        .nodes
        .iter()
        .filter(|n| group.contains(n.as_str()))
        .map(|n| (n.clone(), revision))
        .collect();
    Some(Update {
        rollout: next,
        assign,
        clear_assignments: false,
        last_good: None,
        events: vec![(
            EventType::Normal,
            "WaveStarted".into(),
            format!(
                "revision {revision}: wave {} of {} baked; wave {} ({}) starts: {}",
                finished_wave + 1,
                rollout.spec.plan.len(),
                finished_wave + 2,
                wave.step,
                wave.nodes.join(", ")
            ),
        )],
    })
}

fn start(
    state: &DesiredStateObject,
    current: Option<&RolloutObject>,
    nodes: &[NodeView],
    now: SystemTime,
) -> Update {
    let name = &state.metadata.name;
    let revision = state.status.revision;
    let group: Vec<PlanNode> = selected(state, nodes)
        .into_iter()
        .map(|n| PlanNode {
            name: n.name.clone(),
            labels: n.labels.clone(),
        })
        .collect();
    let plan = plan_waves(name, &group, &state.spec.rollout);
    let mut events = Vec::new();
    if let Some(old) = current.filter(|r| {
        r.status.phase == RolloutPhase::Progressing || r.status.phase == RolloutPhase::Paused
    }) {
        events.push((
            EventType::Normal,
            "Superseded".to_string(),
            format!(
                "the rollout of revision {} is superseded by revision {revision}",
                old.spec.revision
            ),
        ));
    }
    let mut rollout = RolloutObject {
        metadata: ObjectInfo {
            name: name.clone(),
            labels: BTreeMap::new(),
            resource_version: String::new(),
            creation_timestamp: Some(now),
        },
        spec: RolloutSpecState {
            desired_state: name.clone(),
            revision,
            from_revision: state.status.last_good_revision,
            plan: plan.clone(),
        },
        status: RolloutStatus {
            phase: RolloutPhase::Progressing,
            current_wave: 0,
            wave_started: Some(now),
            failed_nodes: BTreeMap::new(),
            message: String::new(),
            started: now,
            finished: None,
        },
    };
    if plan.is_empty() {
        rollout.status.phase = RolloutPhase::Complete;
        rollout.status.finished = Some(now);
        rollout.status.message = "no node selected".into();
        events.push((
            EventType::Normal,
            "RolloutComplete".into(),
            format!("revision {revision}: no node is selected; it is the last good revision"),
        ));
        return Update {
            rollout,
            assign: vec![],
            clear_assignments: true,
            last_good: Some(revision),
            events,
        };
    }
    events.push((
        EventType::Normal,
        "RolloutStarted".into(),
        format!(
            "revision {} → {revision} in {} waves ({} nodes); wave 1 ({}): {}",
            state.status.last_good_revision,
            plan.len(),
            wave_sizes(&plan),
            plan[0].step,
            plan[0].nodes.join(", ")
        ),
    ));
    let assign = plan[0]
        .nodes
        .iter()
        .map(|n| (n.clone(), revision))
        .collect();
    Update {
        rollout,
        assign,
        clear_assignments: false,
        last_good: None,
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifests::{LabelSelector, WaveStep};

    fn state(revision: u64, last_good: u64) -> DesiredStateObject {
        let text = "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {role: web}}\n  components: [{name: tool, kind: package, version: '1.0'}]\n  rollout: {waves: ['1', '50%', '100%'], bakeSeconds: 10, healthyDeadlineSeconds: 60, maxFailures: 0}\n";
        let manifest = manifests::parse_str("t", text).objects.remove(0).object;
        DesiredStateObject {
            api_version: "shoal/v1".into(),
            kind: "DesiredState".into(),
            metadata: StoredMeta {
                name: "web".into(),
                ..Default::default()
            },
            spec: manifest.spec,
            status: DesiredStateStatus {
                revision,
                last_good_revision: last_good,
                ..Default::default()
            },
        }
    }

    fn node(name: &str, canary: bool) -> NodeView {
        let mut labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
        if canary {
            labels.insert("shoal/canary".into(), "true".into());
        }
        NodeView {
            name: name.into(),
            labels,
            ready: true,
            applied: None,
            failure: None,
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + seconds)
    }

    fn report(node: &mut NodeView, revision: u64, phase: ComponentPhase, since: u64) {
        node.applied = Some(AppliedState {
            desired_state: "web".into(),
            revision,
            phase,
            commit: None,
            healthy_since: Some(at(since)),
        });
    }

    #[test]
    fn canary_first_then_waves_after_bake_then_complete() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 2)).collect();
        nodes.push(node("other", false));
        nodes[4].labels.insert("role".into(), "db".into());
        let first = step(&state, None, &nodes, at(0)).unwrap();
        assert_eq!(
            first.assign,
            vec![("n2".to_string(), 2)],
            "the canary goes first, alone"
        );
        assert_eq!(
            first
                .rollout
                .spec
                .plan
                .iter()
                .map(|w| w.nodes.len())
                .collect::<Vec<_>>(),
            vec![1, 1, 2]
        );
        let rollout = first.rollout;
        assert_eq!(
            step(&state, Some(&rollout), &nodes, at(5)),
            None,
            "waiting for the canary"
        );
        report(&mut nodes[2], 2, ComponentPhase::Healthy, 5);
        assert_eq!(
            step(&state, Some(&rollout), &nodes, at(14)),
            None,
            "not baked yet"
        );
        let second = step(&state, Some(&rollout), &nodes, at(15)).unwrap();
        assert_eq!(second.rollout.status.current_wave, 1);
        assert_eq!(second.assign.len(), 1);
        assert_eq!(second.events[0].1, "WaveStarted");
        let rollout = second.rollout;
        let wave2 = rollout.spec.plan[1].nodes[0].clone();
        let i = nodes.iter().position(|n| n.name == wave2).unwrap();
        report(&mut nodes[i], 2, ComponentPhase::Healthy, 16);
        let third = step(&state, Some(&rollout), &nodes, at(26)).unwrap();
        let rollout = third.rollout;
        for n in rollout.spec.plan[2].nodes.clone() {
            let i = nodes.iter().position(|x| x.name == n).unwrap();
            report(&mut nodes[i], 2, ComponentPhase::Healthy, 27);
        }
        let done = step(&state, Some(&rollout), &nodes, at(37)).unwrap();
        assert_eq!(done.rollout.status.phase, RolloutPhase::Complete);
        assert_eq!(done.last_good, Some(2));
        assert!(done.clear_assignments);
    }

    #[test]
    fn a_reverted_canary_rolls_everything_back() {
        let state = state(3, 2);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = step(&state, None, &nodes, at(0)).unwrap().rollout;
        report(&mut nodes[0], 3, ComponentPhase::Reverted, 0);
        nodes[0].failure = Some("probe http failed: 503".into());
        let update = step(&state, Some(&rollout), &nodes, at(3)).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
        assert!(
            update.clear_assignments && update.assign.is_empty(),
            "no other node is ever assigned revision 3"
        );
        assert!(update.events[0].2.contains("n0: probe http failed: 503"));
        // Stays rolled back: no restart of the same revision.
        assert_eq!(step(&state, Some(&update.rollout), &nodes, at(10)), None);
    }

    #[test]
    fn deadline_and_not_ready_count_as_failures_within_budget() {
        let mut state = state(2, 1);
        state.spec.rollout.max_failures = manifests::FailureBudget::Count(1);
        state.spec.rollout.waves = vec![WaveStep::Percent(50), WaveStep::Percent(100)];
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), false)).collect();
        let rollout = step(&state, None, &nodes, at(0)).unwrap().rollout;
        let wave: Vec<String> = rollout.spec.plan[0].nodes.clone();
        let a = nodes.iter().position(|n| n.name == wave[0]).unwrap();
        let b = nodes.iter().position(|n| n.name == wave[1]).unwrap();
        nodes[a].ready = false;
        let update = step(&state, Some(&rollout), &nodes, at(1)).unwrap();
        assert_eq!(
            update.rollout.status.phase,
            RolloutPhase::Progressing,
            "one failure is within the budget"
        );
        assert!(update.rollout.status.failed_nodes[&wave[0]].contains("NotReady"));
        let rollout = update.rollout;
        // The other node never becomes healthy: past the deadline it fails too, and the budget is spent.
        let update = step(&state, Some(&rollout), &nodes, at(61)).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
        let _ = b;
        let _ = LabelSelector::default();
    }

    #[test]
    fn a_node_of_a_finished_wave_going_offline_does_not_fail_the_rollout() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = step(&state, None, &nodes, at(0)).unwrap().rollout;
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 1);
        let rollout = step(&state, Some(&rollout), &nodes, at(11))
            .unwrap()
            .rollout;
        assert_eq!(rollout.status.current_wave, 1);
        nodes[0].ready = false; // the canary's wave is over
        let update = step(&state, Some(&rollout), &nodes, at(12));
        assert!(
            update
                .as_ref()
                .is_none_or(|u| u.rollout.status.failed_nodes.is_empty()),
            "{update:?}"
        );
    }

    #[test]
    fn an_apply_during_a_rollout_supersedes_it_and_no_nodes_completes_at_once() {
        let state2 = state(2, 1);
        let nodes: Vec<NodeView> = (0..3).map(|i| node(&format!("n{i}"), false)).collect();
        let rollout = step(&state2, None, &nodes, at(0)).unwrap().rollout;
        let state3 = state(3, 1);
        let update = step(&state3, Some(&rollout), &nodes, at(5)).unwrap();
        assert_eq!(update.rollout.spec.revision, 3);
        assert_eq!(update.rollout.spec.from_revision, 1);
        assert_eq!(update.events[0].1, "Superseded");
        let empty = step(&state(1, 0), None, &[], at(0)).unwrap();
        assert_eq!(empty.rollout.status.phase, RolloutPhase::Complete);
        assert_eq!(empty.last_good, Some(1));
    }
}
