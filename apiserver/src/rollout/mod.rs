//! The rollout controller: moves each new revision through its waves.
//!
//! `step` is a pure function of the DesiredState, its current Rollout, the
//! nodes (labels, readiness, what they report and when the server received it)
//! and the server's clock. It returns what to write: the Rollout, per-node
//! revision assignments, the last good revision, events. The controller reads
//! that input from the store, calls `step`, and writes its output in one
//! transaction. Everything lives in the store, so an apiserver killed at any
//! moment resumes where it was: the next tick recomputes the same decision
//! from the same stored state.
//!
//! Evidence is fresh or it is nothing: a node's wave is baked only when a report
//! that the *server received* after `bakeSeconds` had elapsed (on the server's
//! clock, counted from when the server first received Healthy at the revision)
//! still says Healthy at the revision. A node that falls silent holds its wave;
//! node clocks are never compared with the server's.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use manifests::plan::{plan_waves, PlanNode};
use manifests::wire::*;

/// A node as the controller sees it for one DesiredState.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Heartbeat within the grace period (true for a node that never reported: the wave's
    /// deadline judges it).
    pub ready: bool,
    /// Cordoned by an operator: takes no new revision.
    pub cordoned: bool,
    /// What it reports for this DesiredState.
    pub applied: Option<AppliedState>,
    /// Revision and server time at which a report saying Healthy at that revision was first
    /// received (this healthy spell).
    pub healthy_received: Option<(u64, SystemTime)>,
    /// When the server received the node's latest report.
    pub last_report: Option<SystemTime>,
    /// Why, when its components failed (probe output included).
    pub failure: Option<String>,
    /// The components of this DesiredState that another DesiredState pins on this node too.
    pub conflict: Option<String>,
}

impl NodeView {
    fn unavailable(&self) -> Option<String> {
        if self.cordoned {
            Some("cordoned".into())
        } else if !self.ready {
            Some("NotReady".into())
        } else {
            None
        }
    }
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

impl Update {
    fn of(rollout: RolloutObject) -> Update {
        Update {
            rollout,
            assign: vec![],
            clear_assignments: false,
            last_good: None,
            events: vec![],
        }
    }

    fn event(mut self, kind: EventType, reason: &str, message: String) -> Update {
        self.events.push((kind, reason.to_string(), message));
        self
    }
}

/// `start + seconds`, or None when that is past what the clock can hold: "never".
fn after(start: SystemTime, seconds: u64) -> Option<SystemTime> {
    start.checked_add(Duration::from_secs(seconds))
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

fn list(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(n, why)| format!("{n}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A fresh rollout object for the DesiredState's newest revision, not planned yet.
pub fn pending(state: &DesiredStateObject, now: SystemTime) -> RolloutObject {
    let name = &state.metadata.name;
    RolloutObject {
        metadata: ObjectInfo {
            name: name.clone(),
            labels: BTreeMap::new(),
            resource_version: String::new(),
            creation_timestamp: Some(now),
        },
        spec: RolloutSpecState {
            desired_state: name.clone(),
            revision: state.status.revision,
            from_revision: state.status.last_good_revision,
            plan: vec![],
        },
        status: RolloutStatus {
            phase: RolloutPhase::Pending,
            current_wave: 0,
            wave_started: None,
            failed_nodes: BTreeMap::new(),
            unavailable_nodes: BTreeMap::new(),
            baked_nodes: 0,
            message: format!(
                "revision {} is stored; waves are planned next",
                state.status.revision
            ),
            started: now,
            finished: None,
        },
    }
}

/// One decision for one DesiredState. `None`: nothing to change.
pub fn step(
    state: &DesiredStateObject,
    current: Option<&RolloutObject>,
    nodes: &[NodeView],
    now: SystemTime,
) -> Option<Update> {
    decide(state, current, nodes, now, None)
}

/// `step`, judging deadlines only from `judge_from` on: an apiserver that was down longer
/// than a deadline has heard from no node yet when it starts, and must not fail them all
/// for its own silence.
pub fn decide(
    state: &DesiredStateObject,
    current: Option<&RolloutObject>,
    nodes: &[NodeView],
    now: SystemTime,
    judge_from: Option<SystemTime>,
) -> Option<Update> {
    let judge = judge_from.is_none_or(|t| now >= t);
    let revision = state.status.revision;
    let last_good = state.status.last_good_revision;
    match current {
        // A revision stored without its Pending rollout (a store written before rollouts
        // were created with their revision): start one now.
        None if revision > last_good => plan(state, &pending(state, now), nodes, now, true),
        None => None,
        // A rollout newer than the DesiredState this decision was handed: the snapshot is
        // stale (an apply committed meanwhile). Never step backwards.
        Some(r) if r.spec.revision > revision => None,
        Some(r) if r.spec.revision != revision => {
            if revision <= last_good {
                return None;
            }
            let mut update = plan(state, &pending(state, now), nodes, now, true)?;
            if !r.status.phase.is_terminal() {
                update.events.insert(
                    0,
                    (
                        EventType::Normal,
                        "Superseded".into(),
                        format!(
                            "the rollout of revision {} is superseded by revision {revision}",
                            r.spec.revision
                        ),
                    ),
                );
            }
            update.rollout.metadata.resource_version = r.metadata.resource_version.clone();
            Some(update)
        }
        Some(r) => match r.status.phase {
            RolloutPhase::Pending => plan(state, r, nodes, now, true),
            RolloutPhase::Progressing if r.spec.plan.is_empty() => {
                plan(state, r, nodes, now, false)
            }
            RolloutPhase::Progressing => progress(state, r, nodes, now, judge),
            _ => None,
        },
    }
}

/// Plans the waves over the nodes that are available now and starts the first, or waits
/// (Progressing, with why) while no node can take the revision.
fn plan(
    state: &DesiredStateObject,
    rollout: &RolloutObject,
    nodes: &[NodeView],
    now: SystemTime,
    first: bool,
) -> Option<Update> {
    let revision = state.status.revision;
    let spec = &state.spec.rollout;
    let group = selected(state, nodes);
    let unavailable: BTreeMap<String, String> = group
        .iter()
        .filter_map(|n| n.unavailable().map(|why| (n.name.clone(), why)))
        .collect();
    // Nodes that failed this revision are not asked again.
    let failed = &rollout.status.failed_nodes;
    let available: Vec<PlanNode> = group
        .iter()
        .filter(|n| n.unavailable().is_none() && !failed.contains_key(&n.name))
        .map(|n| PlanNode {
            name: n.name.clone(),
            labels: n.labels.clone(),
        })
        .collect();
    if !group.is_empty() && group.iter().all(|n| failed.contains_key(&n.name)) {
        // Every node of the group failed it (within a generous maxFailures): nothing is left
        // to try it on. Waiting would never end.
        let mut next = rollout.clone();
        next.spec.revision = revision;
        return Some(abort(state, next, failed.clone(), group.len(), now));
    }
    let allowed = spec.max_unavailable.allowed(group.len());
    let waiting = if group.is_empty() {
        Some((
            EventType::Normal,
            "WaitingForNodes",
            format!("waiting for nodes: no node is selected; revision {revision} is not last good until it baked on one"),
        ))
    } else if available.is_empty() {
        Some((
            EventType::Normal,
            "WaitingForNodes",
            format!(
                "waiting for nodes: {} selected, none available ({})",
                group.len(),
                list(&unavailable)
            ),
        ))
    } else if unavailable.len() > allowed {
        Some((
            EventType::Warning,
            "RolloutWaiting",
            format!(
                "waiting: {} of {} nodes unavailable ({}), maxUnavailable allows {allowed}",
                unavailable.len(),
                group.len(),
                list(&unavailable)
            ),
        ))
    } else {
        None
    };
    let mut next = rollout.clone();
    next.spec.revision = revision;
    if let Some((kind, reason, message)) = waiting {
        next.status.phase = RolloutPhase::Progressing;
        next.spec.plan = vec![];
        next.status.current_wave = 0;
        next.status.wave_started = None;
        next.status.unavailable_nodes = BTreeMap::new();
        if !first && next.status.message == message {
            return None; // still waiting for the same reason
        }
        next.status.message = message.clone();
        return Some(Update::of(next).event(kind, reason, message));
    }
    let plan = plan_waves(&state.metadata.name, &available, spec);
    next.status.phase = RolloutPhase::Progressing;
    next.status.current_wave = 0;
    next.status.wave_started = Some(now);
    next.status.unavailable_nodes = unavailable.clone();
    next.status.message = format!("wave 1 of {}", plan.len());
    let assign = plan[0]
        .nodes
        .iter()
        .map(|n| (n.clone(), revision))
        .collect();
    let mut message = format!(
        "revision {} → {revision} in {} waves ({} nodes); wave 1 ({}): {}",
        state.status.last_good_revision,
        plan.len(),
        wave_sizes(&plan),
        plan[0].step,
        plan[0].nodes.join(", ")
    );
    if !unavailable.is_empty() {
        message.push_str(&format!(
            "; going on without {} (within maxUnavailable {allowed})",
            list(&unavailable)
        ));
    }
    next.spec.plan = plan;
    let mut update = Update::of(next).event(EventType::Normal, "RolloutStarted", message);
    update.assign = assign;
    Some(update)
}

/// Judges the waves started so far on fresh evidence; aborts, records failures, starts the
/// next wave or completes.
fn progress(
    state: &DesiredStateObject,
    rollout: &RolloutObject,
    nodes: &[NodeView],
    now: SystemTime,
    judge: bool,
) -> Option<Update> {
    let revision = state.status.revision;
    let spec = &state.spec.rollout;
    let group: BTreeSet<&str> = selected(state, nodes)
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let current_wave = rollout.status.current_wave;
    // None: the current wave waits to begin (unavailable nodes past the budget). The waves
    // before it are judged all the same: a canary that reverts while a later wave waits
    // stops the rollout before that wave is ever assigned.
    let wave_started = rollout.status.wave_started;
    let judged = if wave_started.is_some() {
        current_wave + 1
    } else {
        current_wave
    };
    let healthy_by = wave_started.and_then(|t| after(t, spec.healthy_deadline_seconds));
    let proven_by = healthy_by.and_then(|t| after(t, spec.bake_seconds));

    let mut failed = rollout.status.failed_nodes.clone();
    let mut baked_now = 0u64;
    let mut wave_baked = true;
    for (index, wave) in rollout.spec.plan.iter().enumerate().take(judged) {
        for node_name in &wave.nodes {
            let Some(node) = by_name
                .get(node_name.as_str())
                .filter(|_| group.contains(node_name.as_str()))
            else {
                failed.remove(node_name); // left the group (or was deleted): no longer counts
                continue;
            };
            if rollout.status.unavailable_nodes.contains_key(node_name)
                || failed.contains_key(node_name)
            {
                continue; // went on without it, or once failed, failed for this rollout
            }
            let at_revision = node.applied.as_ref().filter(|a| a.revision == revision);
            let phase = at_revision.map(|a| a.phase);
            let failure = if let Some(conflict) = &node.conflict {
                Some(format!("conflict: {conflict}"))
            } else if matches!(
                phase,
                Some(ComponentPhase::Reverted) | Some(ComponentPhase::Failed)
            ) {
                Some(
                    node.failure
                        .clone()
                        .unwrap_or_else(|| "reverted the revision".into()),
                )
            } else {
                None
            };
            if let Some(why) = failure {
                failed.insert(node_name.clone(), why);
                continue;
            }
            if index != current_wave {
                continue;
            }
            // Evidence from before the wave began is not about this wave (a DesiredState
            // deleted and created again restarts its revision numbers).
            let heard_healthy = node
                .healthy_received
                .filter(|(r, at)| {
                    *r == revision
                        && phase == Some(ComponentPhase::Healthy)
                        && wave_started.is_some_and(|started| *at >= started)
                })
                .map(|(_, at)| at);
            let baked = heard_healthy
                .and_then(|at| after(at, spec.bake_seconds))
                .zip(node.last_report)
                .is_some_and(|(baked_at, last)| last >= baked_at);
            if baked {
                baked_now += 1;
                continue;
            }
            wave_baked = false;
            if !judge {
                continue; // just restarted: the nodes have not been heard from yet
            }
            let overdue = match heard_healthy {
                None => healthy_by.is_some_and(|t| now > t).then(|| {
                    format!(
                        "not healthy within healthyDeadlineSeconds ({}s){}",
                        spec.healthy_deadline_seconds,
                        if node.ready { "" } else { "; NotReady" }
                    )
                }),
                Some(_) => proven_by.is_some_and(|t| now > t).then(|| {
                    format!(
                        "reported Healthy, then no report after its bake within healthyDeadlineSeconds + bakeSeconds ({}s + {}s)",
                        spec.healthy_deadline_seconds, spec.bake_seconds
                    )
                }),
            };
            if let Some(why) = overdue {
                failed.insert(node_name.clone(), why);
            }
        }
    }
    // A failed node no longer holds the wave; it counts against the budget instead.
    let mut next = rollout.clone();
    next.status.failed_nodes = failed.clone();
    let allowed = spec.max_failures.allowed(group.len());
    if failed.len() > allowed {
        return Some(abort(state, next, failed, group.len(), now));
    }
    if next.status.failed_nodes != rollout.status.failed_nodes {
        let newly: BTreeMap<String, String> = failed
            .iter()
            .filter(|(n, _)| !rollout.status.failed_nodes.contains_key(*n))
            .map(|(n, why)| (n.clone(), why.clone()))
            .collect();
        if newly.is_empty() {
            return Some(Update::of(next)); // nodes that left the group are forgotten
        }
        return Some(Update::of(next).event(
            EventType::Warning,
            "NodeFailed",
            format!("within the failure budget ({allowed}): {}", list(&newly)),
        ));
    }
    if wave_started.is_none() {
        // The wave waits for unavailable nodes (or their budget): try to begin it again.
        return begin_wave(state, &next, nodes, now, current_wave);
    }
    if !wave_baked {
        return None;
    }
    next.status.baked_nodes = next.status.baked_nodes.saturating_add(baked_now);
    if next.status.baked_nodes == 0 {
        // The wave's nodes left, failed within budget or were unavailable, and no earlier
        // wave baked: nothing has proven the revision, so no larger wave may take it. Plan
        // again over the nodes there are now, with a new first node as the canary.
        next.spec.plan = vec![];
        return plan(state, &next, nodes, now, true);
    }
    if current_wave + 1 >= rollout.spec.plan.len() {
        next.status.phase = RolloutPhase::Complete;
        next.status.current_wave = rollout.spec.plan.len();
        next.status.finished = Some(now);
        next.status.message = format!("revision {revision} is on every node of the group");
        let mut update = Update::of(next).event(
            EventType::Normal,
            "RolloutComplete",
            format!("revision {revision} baked in every wave"),
        );
        update.clear_assignments = true;
        update.last_good = Some(revision);
        return Some(update);
    }
    let mut update = begin_wave(state, &next, nodes, now, current_wave + 1)?;
    if let Some(event) = update.events.iter_mut().find(|e| e.1 == "WaveStarted") {
        event.2 = format!(
            "revision {revision}: wave {} of {} baked; {}",
            current_wave + 1,
            rollout.spec.plan.len(),
            event.2
        );
    }
    Some(update)
}

/// Aborts: Aborted, or RolledBack with every assignment removed (`autoRevert`).
fn abort(
    state: &DesiredStateObject,
    mut next: RolloutObject,
    failed: BTreeMap<String, String>,
    group_size: usize,
    now: SystemTime,
) -> Update {
    let spec = &state.spec.rollout;
    let revision = state.status.revision;
    let allowed = spec.max_failures.allowed(group_size);
    next.status.failed_nodes = failed.clone();
    next.status.phase = if spec.auto_revert {
        RolloutPhase::RolledBack
    } else {
        RolloutPhase::Aborted
    };
    next.status.finished = Some(now);
    next.status.message = format!("{} failed node(s), {allowed} allowed", failed.len());
    let wave = next.status.current_wave + 1;
    let mut update = Update::of(next).event(
        EventType::Warning,
        "RolloutAborted",
        format!(
            "revision {revision} aborted in wave {wave}: {}",
            list(&failed)
        ),
    );
    if spec.auto_revert {
        update = update.event(
            EventType::Warning,
            "RolledBack",
            format!(
                "every node of the rollout goes back to revision {}",
                state.status.last_good_revision
            ),
        );
        update.clear_assignments = true;
    }
    update
}

/// Starts wave `index`: assigns the revision to its available nodes, or waits (the wave not
/// started) while more nodes are unavailable than `maxUnavailable` allows.
fn begin_wave(
    state: &DesiredStateObject,
    rollout: &RolloutObject,
    nodes: &[NodeView],
    now: SystemTime,
    index: usize,
) -> Option<Update> {
    let revision = state.status.revision;
    let spec = &state.spec.rollout;
    let wave = rollout.spec.plan.get(index)?;
    let group: BTreeMap<&str, &NodeView> = selected(state, nodes)
        .into_iter()
        .map(|n| (n.name.as_str(), n))
        .collect();
    let mut unavailable = rollout.status.unavailable_nodes.clone();
    // Nodes that left the group no longer use the budget.
    unavailable.retain(|n, _| group.contains_key(n.as_str()));
    let mut members = Vec::new();
    for name in &wave.nodes {
        let Some(node) = group.get(name.as_str()) else {
            continue;
        };
        if rollout.status.failed_nodes.contains_key(name) {
            continue;
        }
        match node.unavailable() {
            Some(why) => {
                unavailable.insert(name.clone(), why);
            }
            None => {
                unavailable.remove(name);
                members.push(name.clone());
            }
        }
    }
    let allowed = spec.max_unavailable.allowed(group.len());
    let mut next = rollout.clone();
    next.status.current_wave = index;
    if unavailable.len() > allowed {
        let message = format!(
            "waiting to start wave {} of {}: {} node(s) unavailable ({}), maxUnavailable allows {allowed}",
            index + 1,
            rollout.spec.plan.len(),
            unavailable.len(),
            list(&unavailable)
        );
        next.status.wave_started = None;
        if rollout.status.wave_started.is_none()
            && rollout.status.current_wave == index
            && rollout.status.message == message
        {
            return None;
        }
        next.status.message = message.clone();
        return Some(Update::of(next).event(EventType::Warning, "RolloutWaiting", message));
    }
    let skipped: BTreeMap<String, String> = unavailable
        .iter()
        .filter(|(n, _)| wave.nodes.contains(n))
        .map(|(n, why)| (n.clone(), why.clone()))
        .collect();
    next.status.unavailable_nodes = unavailable;
    next.status.wave_started = Some(now);
    next.status.message = format!("wave {} of {}", index + 1, rollout.spec.plan.len());
    let mut message = format!(
        "wave {} ({}) starts: {}",
        index + 1,
        wave.step,
        if members.is_empty() {
            "(no available node)".to_string()
        } else {
            members.join(", ")
        }
    );
    if !skipped.is_empty() {
        message.push_str(&format!(
            "; going on without {} (within maxUnavailable {allowed})",
            list(&skipped)
        ));
    }
    let mut update = Update::of(next).event(EventType::Normal, "WaveStarted", message);
    update.assign = members.into_iter().map(|n| (n, revision)).collect();
    Some(update)
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifests::{FailureBudget, WaveStep};

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
            ..NodeView::default()
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + seconds)
    }

    /// The server receives a report at `received`; a Healthy one starts a healthy spell
    /// unless one is running at that revision.
    fn report(node: &mut NodeView, revision: u64, phase: ComponentPhase, received: u64) {
        node.applied = Some(AppliedState {
            desired_state: "web".into(),
            revision,
            phase,
            commit: None,
            // The node's clock: wildly off on purpose, the controller must not read it.
            healthy_since: Some(SystemTime::UNIX_EPOCH),
        });
        node.last_report = Some(at(received));
        if phase == ComponentPhase::Healthy {
            if node.healthy_received.is_none_or(|(r, _)| r != revision) {
                node.healthy_received = Some((revision, at(received)));
            }
        } else {
            node.healthy_received = None;
        }
    }

    fn find(nodes: &[NodeView], name: &str) -> usize {
        nodes.iter().position(|n| n.name == name).unwrap()
    }

    /// Plans from a Pending rollout, as the apiserver stores one with each revision.
    fn started(state: &DesiredStateObject, nodes: &[NodeView], now: SystemTime) -> Update {
        step(state, Some(&pending(state, now)), nodes, now).unwrap()
    }

    #[test]
    fn canary_first_then_waves_after_a_fresh_bake_then_complete() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 2)).collect();
        nodes.push(node("other", false));
        nodes[4].labels.insert("role".into(), "db".into());
        let first = started(&state, &nodes, at(0));
        assert_eq!(
            first.assign,
            vec![("n2".to_string(), 2)],
            "the canary goes first, alone"
        );
        assert_eq!(first.rollout.status.phase, RolloutPhase::Progressing);
        let sizes: Vec<usize> = first
            .rollout
            .spec
            .plan
            .iter()
            .map(|w| w.nodes.len())
            .collect();
        assert_eq!(sizes, vec![1, 1, 2]);
        let rollout = first.rollout;
        assert_eq!(
            step(&state, Some(&rollout), &nodes, at(5)),
            None,
            "waiting for the canary"
        );
        report(&mut nodes[2], 2, ComponentPhase::Healthy, 5);
        report(&mut nodes[2], 2, ComponentPhase::Healthy, 14);
        assert_eq!(
            step(&state, Some(&rollout), &nodes, at(14)),
            None,
            "not baked yet"
        );
        report(&mut nodes[2], 2, ComponentPhase::Healthy, 15);
        let second = step(&state, Some(&rollout), &nodes, at(15)).unwrap();
        assert_eq!(second.rollout.status.current_wave, 1);
        assert_eq!(second.rollout.status.baked_nodes, 1);
        assert_eq!(second.assign.len(), 1);
        assert_eq!(second.events[0].1, "WaveStarted");
        let rollout = second.rollout;
        let i = find(&nodes, &rollout.spec.plan[1].nodes[0]);
        report(&mut nodes[i], 2, ComponentPhase::Healthy, 16);
        report(&mut nodes[i], 2, ComponentPhase::Healthy, 26);
        let third = step(&state, Some(&rollout), &nodes, at(26)).unwrap();
        let rollout = third.rollout;
        for n in rollout.spec.plan[2].nodes.clone() {
            let i = find(&nodes, &n);
            report(&mut nodes[i], 2, ComponentPhase::Healthy, 27);
            report(&mut nodes[i], 2, ComponentPhase::Healthy, 37);
        }
        let done = step(&state, Some(&rollout), &nodes, at(37)).unwrap();
        assert_eq!(done.rollout.status.phase, RolloutPhase::Complete);
        assert_eq!(done.last_good, Some(2));
        assert_eq!(done.rollout.status.baked_nodes, 4);
        assert!(done.clear_assignments);
    }

    #[test]
    fn a_canary_that_falls_silent_holds_the_wave_and_fails_it_at_the_deadline() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 5);
        // Cut off: no report after t=5. Long past healthySince + bake, the wave still holds.
        nodes[0].ready = false;
        for t in [15, 30, 60, 69] {
            assert_eq!(step(&state, Some(&rollout), &nodes, at(t)), None, "t={t}");
        }
        // Heard again, reverted while cut off: the rollout stops at once.
        let mut heard = nodes.clone();
        report(&mut heard[0], 2, ComponentPhase::Reverted, 40);
        heard[0].failure = Some("web Reverted: probe http failed".into());
        let update = step(&state, Some(&rollout), &heard, at(40)).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
        assert!(update.assign.is_empty() && update.clear_assignments);
        // Never heard again: failed at healthyDeadlineSeconds + bakeSeconds after the wave began.
        let update = step(&state, Some(&rollout), &nodes, at(71)).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
        assert!(update.rollout.status.failed_nodes["n0"].contains("no report after its bake"));
    }

    #[test]
    fn the_node_clock_is_never_read() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..2).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        // healthySince (node clock) says 1970; only server receipt times count.
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 3);
        assert_eq!(step(&state, Some(&rollout), &nodes, at(12)), None);
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 13);
        assert!(step(&state, Some(&rollout), &nodes, at(13)).is_some());
    }

    #[test]
    fn a_reverted_canary_rolls_everything_back() {
        let state = state(3, 2);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        report(&mut nodes[0], 3, ComponentPhase::Reverted, 2);
        nodes[0].failure = Some("probe http failed: 503".into());
        let update = step(&state, Some(&rollout), &nodes, at(3)).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
        assert!(
            update.clear_assignments && update.assign.is_empty(),
            "no other node is ever assigned revision 3"
        );
        assert!(update.events[0].2.contains("n0: probe http failed: 503"));
        assert_eq!(update.last_good, None);
        // Stays rolled back: no restart of the same revision.
        assert_eq!(step(&state, Some(&update.rollout), &nodes, at(10)), None);
    }

    #[test]
    fn deadline_failures_count_against_max_failures() {
        let mut state = state(2, 1);
        state.spec.rollout.max_failures = FailureBudget::Count(1);
        state.spec.rollout.waves = vec![WaveStep::Percent(50), WaveStep::Percent(100)];
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), false)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        let wave = rollout.spec.plan[0].nodes.clone();
        let (a, b) = (find(&nodes, &wave[0]), find(&nodes, &wave[1]));
        // One goes NotReady mid-wave: it holds the wave, it is not failed at once.
        nodes[a].ready = false;
        assert_eq!(step(&state, Some(&rollout), &nodes, at(1)), None);
        report(&mut nodes[b], 2, ComponentPhase::Healthy, 2);
        report(&mut nodes[b], 2, ComponentPhase::Healthy, 30);
        assert_eq!(
            step(&state, Some(&rollout), &nodes, at(30)),
            None,
            "held by the silent node"
        );
        let update = step(&state, Some(&rollout), &nodes, at(61)).unwrap();
        assert_eq!(
            update.rollout.status.phase,
            RolloutPhase::Progressing,
            "within the budget"
        );
        assert!(update.rollout.status.failed_nodes[&wave[0]].contains("healthyDeadlineSeconds"));
        assert_eq!(update.events[0].1, "NodeFailed");
        let rollout = update.rollout;
        let update = step(&state, Some(&rollout), &nodes, at(62)).unwrap();
        assert_eq!(
            update.rollout.status.current_wave, 1,
            "the failed node no longer holds it"
        );
        // In wave 2 one more node never becomes healthy: the budget is spent.
        let rollout = update.rollout;
        let update = step(&state, Some(&rollout), &nodes, at(123)).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
    }

    #[test]
    fn a_node_of_a_finished_wave_going_offline_does_not_fail_the_rollout() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 1);
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 11);
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
    fn an_apply_during_a_rollout_supersedes_it() {
        let state2 = state(2, 1);
        let nodes: Vec<NodeView> = (0..3).map(|i| node(&format!("n{i}"), false)).collect();
        let rollout = started(&state2, &nodes, at(0)).rollout;
        let state3 = state(3, 1);
        let update = step(&state3, Some(&rollout), &nodes, at(5)).unwrap();
        assert_eq!(update.rollout.spec.revision, 3);
        assert_eq!(update.rollout.spec.from_revision, 1);
        assert_eq!(update.events[0].1, "Superseded");
    }

    #[test]
    fn a_revision_with_no_node_waits_and_canaries_its_first_joiner() {
        let state = state(1, 0);
        let first = started(&state, &[], at(0));
        assert_eq!(first.rollout.status.phase, RolloutPhase::Progressing);
        assert_eq!(first.last_good, None, "never ran anywhere: not last good");
        assert!(first.assign.is_empty());
        assert_eq!(first.events[0].1, "WaitingForNodes");
        let rollout = first.rollout;
        assert_eq!(
            step(&state, Some(&rollout), &[], at(5)),
            None,
            "one event, not one per tick"
        );
        // Boards join later: the first one is the canary, alone.
        let mut nodes = vec![node("late", false)];
        let update = step(&state, Some(&rollout), &nodes, at(10)).unwrap();
        assert_eq!(update.assign, vec![("late".to_string(), 1)]);
        assert_eq!(update.events[0].1, "RolloutStarted");
        let rollout = update.rollout;
        nodes.push(node("later", false));
        assert_eq!(
            step(&state, Some(&rollout), &nodes, at(11)),
            None,
            "the plan holds"
        );
        report(&mut nodes[0], 1, ComponentPhase::Healthy, 12);
        report(&mut nodes[0], 1, ComponentPhase::Healthy, 22);
        let done = step(&state, Some(&rollout), &nodes, at(22)).unwrap();
        assert_eq!(done.rollout.status.phase, RolloutPhase::Complete);
        assert_eq!(
            done.last_good,
            Some(1),
            "baked on one node: now it is proven"
        );
    }

    #[test]
    fn unavailable_nodes_are_skipped_within_max_unavailable_and_otherwise_wait() {
        let mut state = state(2, 1);
        state.spec.rollout.waves = vec![WaveStep::Count(1), WaveStep::Percent(100)];
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 1);
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 11);
        let off = find(&nodes, &rollout.spec.plan[1].nodes[0]);
        nodes[off].ready = false; // powered off before its wave
                                  // maxUnavailable 0: the rollout waits instead of failing.
        let waiting = step(&state, Some(&rollout), &nodes, at(11)).unwrap();
        assert_eq!(waiting.rollout.status.phase, RolloutPhase::Progressing);
        assert_eq!(waiting.rollout.status.wave_started, None);
        assert!(waiting.assign.is_empty());
        assert!(waiting
            .rollout
            .status
            .message
            .contains("maxUnavailable allows 0"));
        assert!(waiting.rollout.status.failed_nodes.is_empty());
        assert_eq!(waiting.events[0].1, "RolloutWaiting");
        assert_eq!(step(&state, Some(&waiting.rollout), &nodes, at(12)), None);
        // `shoal delete node`: it leaves the node list, and the held wave starts.
        let mut fewer = nodes.clone();
        fewer.remove(off);
        let go = step(&state, Some(&waiting.rollout), &fewer, at(13)).unwrap();
        assert_eq!(go.assign.len(), 2);
        assert!(go.rollout.status.wave_started.is_some());
        // maxUnavailable 1: the wave goes on without it at once.
        state.spec.rollout.max_unavailable = FailureBudget::Count(1);
        let without = step(&state, Some(&rollout), &nodes, at(11)).unwrap();
        assert_eq!(without.assign.len(), 2);
        assert!(!without.assign.iter().any(|(n, _)| *n == nodes[off].name));
        assert!(without.rollout.status.unavailable_nodes[&nodes[off].name].contains("NotReady"));
        let rollout = without.rollout;
        for (name, _) in &without.assign {
            let i = find(&nodes, name);
            report(&mut nodes[i], 2, ComponentPhase::Healthy, 12);
            report(&mut nodes[i], 2, ComponentPhase::Healthy, 22);
        }
        let done = step(&state, Some(&rollout), &nodes, at(22)).unwrap();
        assert_eq!(done.rollout.status.phase, RolloutPhase::Complete);
    }

    #[test]
    fn a_cordoned_node_is_unavailable_and_never_the_canary() {
        let mut state = state(2, 1);
        state.spec.rollout.max_unavailable = FailureBudget::Count(1);
        let mut nodes: Vec<NodeView> = (0..3).map(|i| node(&format!("n{i}"), i == 0)).collect();
        nodes[0].cordoned = true;
        let first = started(&state, &nodes, at(0));
        assert_eq!(first.assign.len(), 1);
        assert_ne!(first.assign[0].0, "n0");
        assert_eq!(first.rollout.status.unavailable_nodes["n0"], "cordoned");
        // Past the budget: no plan, the rollout waits with the reason.
        state.spec.rollout.max_unavailable = FailureBudget::Count(0);
        let waiting = started(&state, &nodes, at(0));
        assert!(waiting.assign.is_empty());
        assert!(waiting.rollout.status.message.contains("n0: cordoned"));
    }

    #[test]
    fn a_conflict_on_a_selected_node_fails_it() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..2).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        nodes[0].conflict = Some("tool is pinned by web and other".into());
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 1);
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 20);
        let update = step(&state, Some(&rollout), &nodes, at(20)).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
        assert!(update.events[0]
            .2
            .contains("conflict: tool is pinned by web and other"));
    }

    #[test]
    fn durations_past_the_clock_never_panic() {
        let mut state = state(2, 1);
        state.spec.rollout.healthy_deadline_seconds = u64::MAX;
        state.spec.rollout.bake_seconds = u64::MAX;
        let mut nodes = vec![node("n0", true)];
        let rollout = started(&state, &nodes, at(0)).rollout;
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 1);
        assert_eq!(step(&state, Some(&rollout), &nodes, at(u64::MAX / 4)), None);
        let mut far = rollout.clone();
        far.status.wave_started = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 2));
        assert_eq!(step(&state, Some(&far), &nodes, at(5)), None);
    }

    #[test]
    fn a_wave_whose_nodes_all_left_does_not_make_the_revision_last_good() {
        let state = state(2, 1);
        let mut nodes = vec![node("n0", true)];
        let rollout = started(&state, &nodes, at(0)).rollout;
        nodes[0].labels.insert("role".into(), "db".into()); // relabelled away
        let update = step(&state, Some(&rollout), &nodes, at(1)).unwrap();
        assert_ne!(update.rollout.status.phase, RolloutPhase::Complete);
        assert_eq!(update.last_good, None);
        assert_eq!(update.events[0].1, "WaitingForNodes");
    }
    #[test]
    fn a_canary_that_reverts_while_a_later_wave_waits_stops_the_rollout_before_that_wave() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 1);
        report(&mut nodes[0], 2, ComponentPhase::Healthy, 11);
        let off = find(&nodes, &rollout.spec.plan[1].nodes[0]);
        nodes[off].ready = false;
        let waiting = step(&state, Some(&rollout), &nodes, at(11))
            .unwrap()
            .rollout;
        assert_eq!(waiting.status.wave_started, None);
        // The canary reverts while wave 2 waits; then the blocking node is deleted.
        report(&mut nodes[0], 2, ComponentPhase::Reverted, 20);
        nodes.remove(off);
        let update = step(&state, Some(&waiting), &nodes, at(21)).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
        assert!(
            update.assign.is_empty(),
            "wave 2 is never assigned: {update:?}"
        );
    }

    #[test]
    fn a_wave_that_proved_nothing_is_planned_again_instead_of_growing() {
        let state = state(2, 1);
        let mut nodes: Vec<NodeView> = (0..4).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let rollout = started(&state, &nodes, at(0)).rollout;
        // The canary is relabelled away before it baked: wave 2 must not start on nothing.
        nodes[0].labels.insert("role".into(), "db".into());
        let update = step(&state, Some(&rollout), &nodes, at(1)).unwrap();
        assert_eq!(update.rollout.status.current_wave, 0);
        assert_eq!(update.assign.len(), 1, "a new canary, alone: {update:?}");
        assert_eq!(update.events[0].1, "RolloutStarted");
    }

    #[test]
    fn every_node_failed_within_a_generous_budget_aborts_instead_of_waiting_forever() {
        let mut state = state(2, 1);
        state.spec.rollout.max_failures = FailureBudget::Percent(100);
        let mut nodes = vec![node("n0", true)];
        let rollout = started(&state, &nodes, at(0)).rollout;
        report(&mut nodes[0], 2, ComponentPhase::Reverted, 2);
        let failed = step(&state, Some(&rollout), &nodes, at(2)).unwrap().rollout;
        let update = step(&state, Some(&failed), &nodes, at(3)).unwrap();
        let update = if update.rollout.status.phase == RolloutPhase::Progressing {
            step(&state, Some(&update.rollout), &nodes, at(4)).unwrap()
        } else {
            update
        };
        assert_eq!(
            update.rollout.status.phase,
            RolloutPhase::RolledBack,
            "{update:?}"
        );
    }

    #[test]
    fn a_stale_desired_state_never_steps_a_rollout_backwards() {
        let nodes: Vec<NodeView> = (0..2).map(|i| node(&format!("n{i}"), i == 0)).collect();
        let newer = pending(&state(3, 1), at(0));
        assert_eq!(step(&state(2, 1), Some(&newer), &nodes, at(1)), None);
    }

    #[test]
    fn deadlines_wait_for_the_nodes_to_be_heard_after_a_restart() {
        let state = state(2, 1);
        let nodes = vec![node("n0", true)];
        let rollout = started(&state, &nodes, at(0)).rollout;
        // Long past the deadline, but the apiserver just started: nobody is judged yet.
        assert_eq!(
            decide(&state, Some(&rollout), &nodes, at(500), Some(at(505))),
            None
        );
        let update = decide(&state, Some(&rollout), &nodes, at(506), Some(at(505))).unwrap();
        assert_eq!(update.rollout.status.phase, RolloutPhase::RolledBack);
    }

    #[test]
    fn healthy_evidence_from_before_the_wave_does_not_count() {
        let state = state(1, 0);
        let mut nodes = vec![node("n0", true), node("n1", false)];
        // An earlier incarnation of the DesiredState left a Healthy report at revision 1.
        report(&mut nodes[0], 1, ComponentPhase::Healthy, 0);
        let rollout = started(&state, &nodes, at(100)).rollout;
        nodes[0].last_report = Some(at(101));
        assert_eq!(
            step(&state, Some(&rollout), &nodes, at(101)),
            None,
            "not baked on old evidence"
        );
    }
}
