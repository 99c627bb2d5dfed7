//! The change lifecycle as data: phases, their transition and deadline tables, and the pure
//! `decide` that the agent's loop calls for every change in flight.
//!
//! A change of one DesiredState moves through
//!
//! ```text
//! Pending ──RunStep──▶ Applying ──Verify──▶ Verifying ──Bake──▶ Baking ──Commit──▶ (applied)
//!    │                    │                    │                  │
//!    ├──Refuse            └────────────────────┴──────Revert──────┴──▶ Reverting ──FinishRevert──▶ (reverted)
//!    └──Drop (withdrawn: nothing touched)
//! ```
//!
//! A change whose revision the apiserver withdrew (a rollout aborted or superseded: the
//! assignment now holds another revision of its DesiredState, or none) is dropped while
//! Pending and reverted from any later phase at once, without waiting for probes or the bake.
//!
//! `decide` looks only at the journaled [`Change`], what the loop observed this tick
//! ([`Observations`]: the clock, whether the change's worker is busy, fresh probe results) and
//! returns one [`Decision`]. The loop acts on it (spawns a worker, writes the journal), and a
//! worker's result is folded back into the change with [`record`]. Both are pure, so every
//! (phase, observation) pair has a unit test below, and a restart is nothing special: the loop
//! calls `decide` on the journal it reads back, plus [`resume`] once.

use std::collections::BTreeMap;

use manifests::{ComponentKind, ComponentState};

use crate::backend::Snapshot;
use crate::journal::{Change, ChangePhase, Failure, StepState};

/// One probe as the loop saw it since the change entered its current phase.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeView {
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Failures in a row that make a regression.
    pub threshold: u32,
    /// Passes since the phase began.
    pub passes: u32,
    /// The last output.
    pub output: String,
}

/// What the loop knows this tick about one change.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    /// Unix ms, the node's clock.
    pub now_ms: u64,
    /// A worker of this change is still running (a download, a step, a restore).
    pub busy: bool,
    /// Probe name (spec probes, and `<service>-alive`) → results since the phase began.
    pub probes: BTreeMap<String, ProbeView>,
    /// The nodelet is shutting down: start nothing new.
    pub stopping: bool,
    /// The assignment no longer holds this change's revision for its DesiredState (another
    /// revision, or the DesiredState is no longer assigned): the apiserver withdrew it.
    pub withdrawn: bool,
}

/// Why a change goes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevertCause {
    /// For people.
    pub reason: String,
    /// Output of the probe that regressed, if a probe did.
    pub probe_output: Option<String>,
    /// The component whose log explains it.
    pub culprit: Option<String>,
    /// The apiserver withdrew the revision: nothing failed, and the revision is not marked
    /// as one that did not stick.
    pub withdrawn: bool,
}

impl RevertCause {
    /// Why a withdrawn revision goes back.
    pub fn withdrawn(revision: u64) -> Self {
        RevertCause {
            reason: format!(
                "revision {revision} was withdrawn by the apiserver (rollout aborted or superseded)"
            ),
            probe_output: None,
            culprit: None,
            withdrawn: true,
        }
    }
}

/// What the loop should do next for one change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Decision {
    /// Nothing now: a worker is running, probes are settling, or the bake is not over.
    Wait,
    /// Pending: run the baseline probes, fetch the artifacts, snapshot every component.
    Prepare,
    /// Run step `i` (journal it as Started first).
    RunStep(usize),
    /// Every step is done: start verifying.
    Verify,
    /// Every probe that must pass passes: start the bake.
    Bake,
    /// The bake is over: the change is the node's new normal.
    Commit,
    /// Go back.
    Revert(RevertCause),
    /// Put step `i` back from its snapshot.
    RestoreStep(usize),
    /// Every touched step is back (or a restore failed: `Failed`, needs an operator).
    FinishRevert,
    /// Pending failed before anything was touched: report it, change nothing.
    Refuse(Failure),
    /// Pending, and the revision was withdrawn: forget the change (abandoning its download),
    /// nothing was touched.
    Drop,
}

/// What a worker reports back.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Baseline taken, artifacts verified in the cache, every component snapshotted.
    Prepared {
        /// Probe name → passed at baseline.
        baseline: BTreeMap<String, bool>,
        /// One snapshot per step, in step order.
        snapshots: Vec<Snapshot>,
    },
    /// Preparing failed; nothing was touched.
    PrepareFailed(Failure),
    /// Step `i` finished.
    StepDone(usize),
    /// Step `i` failed (it may be half done).
    StepFailed(usize, Failure),
    /// Step `i` is back at its snapshot.
    Restored(usize),
    /// Putting step `i` back failed.
    RestoreFailed(usize, String),
}

/// The phase a decision leads to, from a phase: the transition table. `None`: the decision
/// does not move the phase (or ends the change: Commit, FinishRevert, Refuse).
pub fn transition(phase: ChangePhase, decision: &Decision) -> Option<ChangePhase> {
    use ChangePhase::*;
    match (phase, decision) {
        (Pending, Decision::RunStep(_)) => Some(Applying),
        (Pending | Applying, Decision::Verify) => Some(Verifying),
        (Verifying, Decision::Bake) => Some(Baking),
        (Applying | Verifying | Baking, Decision::Revert(_)) => Some(Reverting),
        _ => None,
    }
}

/// When a phase gives up on its own: the deadline table (Unix ms), from the journaled change.
/// Pending and Applying have none here: every download and program has its own time limits
/// (artifact and command modules), so a worker always ends.
pub fn deadline(change: &Change) -> Option<u64> {
    let rollout = &change.target.spec.rollout;
    match change.phase {
        ChangePhase::Pending | ChangePhase::Applying | ChangePhase::Reverting => None,
        ChangePhase::Verifying => Some(
            change
                .phase_since_ms
                .saturating_add(rollout.healthy_deadline_seconds.saturating_mul(1000)),
        ),
        ChangePhase::Baking => Some(
            change
                .healthy_at_ms
                .unwrap_or(change.phase_since_ms)
                .saturating_add(rollout.bake_seconds.saturating_mul(1000)),
        ),
    }
}

/// The probes a change must keep passing: every spec probe, and the implicit `-alive` probe of
/// every service it keeps present. (name, must pass: passed at baseline or `required`).
pub fn watched_probes(change: &Change) -> Vec<(String, bool)> {
    let spec = &change.target.spec;
    let mut out: Vec<(String, bool)> = spec
        .probes
        .iter()
        .map(|p| {
            let baseline = change.baseline.get(&p.name).copied().unwrap_or(true);
            (p.name.clone(), baseline || p.required)
        })
        .collect();
    for component in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Service && c.state == ComponentState::Present)
    {
        // A service not installed before has nothing to regress from: it must come up.
        let name = alive_name(&component.name);
        let baseline = change.baseline.get(&name).copied().unwrap_or(true);
        out.push((name, baseline));
    }
    out
}

/// The implicit liveness probe of a service.
pub fn alive_name(component: &str) -> String {
    format!("{component}-alive")
}

/// The component a failing probe points at: the service of an alive probe; otherwise the
/// first service the change touches (the likeliest cause of an HTTP or TCP regression).
pub fn culprit_of(probe: &str, change: &Change) -> Option<String> {
    if let Some(service) = probe.strip_suffix("-alive") {
        if change.steps.iter().any(|s| s.component.name == service) {
            return Some(service.to_string());
        }
    }
    change
        .steps
        .iter()
        .find(|s| s.component.kind == ComponentKind::Service)
        .or_else(|| change.steps.first())
        .map(|s| s.component.name.clone())
}

/// A probe that must pass and failed `threshold` times in a row.
fn regression(change: &Change, obs: &Observations) -> Option<RevertCause> {
    for (name, must_pass) in watched_probes(change) {
        let Some(view) = obs.probes.get(&name) else {
            continue;
        };
        if must_pass && view.consecutive_failures >= view.threshold.max(1) {
            return Some(RevertCause {
                reason: format!(
                    "probe {name} failed {} times in a row",
                    view.consecutive_failures
                ),
                probe_output: Some(view.output.clone()),
                culprit: culprit_of(&name, change),
                withdrawn: false,
            });
        }
    }
    None
}

/// Probes that must pass and have not passed since the phase began (or fail right now).
fn waiting_for(change: &Change, obs: &Observations) -> Vec<String> {
    watched_probes(change)
        .into_iter()
        .filter(|(_, must_pass)| *must_pass)
        .filter(|(name, _)| {
            obs.probes
                .get(name)
                .is_none_or(|v| v.passes == 0 || v.consecutive_failures > 0)
        })
        .map(|(name, _)| name)
        .collect()
}

/// The next thing to do for `change`. Pure: the journal, the clock and what was observed.
pub fn decide(change: &Change, obs: &Observations) -> Decision {
    // Pending touched nothing: its worker (a baseline, a download) is abandoned, however long
    // it would still take.
    if obs.withdrawn && change.phase == ChangePhase::Pending {
        return Decision::Drop;
    }
    // A worker owns the change until it reports: never two actions on one change at once.
    if obs.busy {
        return Decision::Wait;
    }
    if obs.withdrawn && change.failure.is_none() {
        // No probe, settle time or bake is waited for: the revision is not wanted any more.
        // (A step that failed meanwhile is reported as the failure it is, below.) A repair
        // is kept instead: undoing it would put back what drifted, which nobody asked for;
        // it finishes its steps and is kept without a bake, and the assigned revision goes
        // on from there.
        match change.phase {
            ChangePhase::Applying | ChangePhase::Verifying | ChangePhase::Baking
                if !is_repair(change) =>
            {
                return Decision::Revert(RevertCause::withdrawn(change.target.revision));
            }
            ChangePhase::Verifying | ChangePhase::Baking => return Decision::Commit,
            _ => {}
        }
    }
    match change.phase {
        ChangePhase::Pending => {
            if let Some(failure) = &change.failure {
                return Decision::Refuse(failure.clone());
            }
            if obs.stopping {
                return Decision::Wait;
            }
            if !change.prepared {
                return Decision::Prepare;
            }
            match first_unfinished(change) {
                Some(i) => Decision::RunStep(i),
                // Nothing to run (a change is begun with steps; a hand-edited journal may not
                // have any): verify what is there.
                None => Decision::Verify,
            }
        }
        ChangePhase::Applying => {
            if let Some(failure) = &change.failure {
                return Decision::Revert(RevertCause {
                    reason: failure.reason.clone(),
                    probe_output: None,
                    culprit: failure.component.clone(),
                    withdrawn: false,
                });
            }
            if obs.stopping {
                return Decision::Wait;
            }
            match first_unfinished(change) {
                Some(i) => Decision::RunStep(i),
                None => Decision::Verify,
            }
        }
        ChangePhase::Verifying | ChangePhase::Baking => {
            if change
                .settle_until_ms
                .is_some_and(|until| obs.now_ms < until)
            {
                return Decision::Wait; // services restarted after a nodelet restart come up first
            }
            if let Some(cause) = regression(change, obs) {
                return Decision::Revert(cause);
            }
            let due = deadline(change).unwrap_or(u64::MAX);
            if change.phase == ChangePhase::Baking {
                return if obs.now_ms >= due {
                    Decision::Commit
                } else {
                    Decision::Wait
                };
            }
            let waiting = waiting_for(change, obs);
            if waiting.is_empty() {
                Decision::Bake
            } else if obs.now_ms > due {
                let output = waiting
                    .iter()
                    .filter_map(|n| obs.probes.get(n).map(|v| format!("{n}: {}", v.output)))
                    .collect::<Vec<_>>()
                    .join("\n");
                Decision::Revert(RevertCause {
                    reason: format!(
                        "not healthy within {}s: waiting for {}",
                        change.target.spec.rollout.healthy_deadline_seconds,
                        waiting.join(", ")
                    ),
                    probe_output: Some(output),
                    culprit: waiting.first().and_then(|n| culprit_of(n, change)),
                    withdrawn: false,
                })
            } else {
                Decision::Wait
            }
        }
        ChangePhase::Reverting => {
            // Reverting goes on while stopping is requested only if nothing is running; the
            // journal resumes it after the restart.
            if change.revert_failure.is_some() {
                return Decision::FinishRevert;
            }
            if obs.stopping {
                return Decision::Wait;
            }
            match last_touched(change) {
                Some(i) => Decision::RestoreStep(i),
                None => Decision::FinishRevert,
            }
        }
    }
}

/// A change that puts back the revision already in force (drift, a stopped service), not one
/// that moves the DesiredState to another revision.
pub fn is_repair(change: &Change) -> bool {
    change.from_revision == change.target.revision
}

fn first_unfinished(change: &Change) -> Option<usize> {
    change.steps.iter().position(|s| s.state != StepState::Done)
}

/// The last step that was started or done and is not back yet: reverts go last first.
fn last_touched(change: &Change) -> Option<usize> {
    change
        .steps
        .iter()
        .rposition(|s| matches!(s.state, StepState::Started | StepState::Done))
}

/// The components the change actually changed: every step that started (maybe half done),
/// finished or was put back. A step never started left its component as it was, and a
/// revert does not blame it.
pub fn touched(change: &Change) -> Vec<String> {
    change
        .steps
        .iter()
        .filter(|s| s.state != StepState::Pending)
        .map(|s| s.component.name.clone())
        .collect()
}

/// What a finished revert says: which changed component failed and why (or that the
/// apiserver withdrew the revision), what was put back, and how it ended.
pub fn revert_message(change: &Change) -> String {
    let revision = change.target.revision;
    let reason = change.revert_reason.as_deref().unwrap_or("reverted");
    let culprit = change
        .culprit
        .as_deref()
        .and_then(|c| change.steps.iter().find(|s| s.component.name == c));
    let mut text = match culprit {
        _ if change.withdrawn => reason.to_string(),
        Some(step) => match step.component.state {
            ComponentState::Present => format!(
                "{} {} failed: {reason}",
                step.component.name,
                step.component.version.as_deref().unwrap_or("(any version)")
            ),
            ComponentState::Absent => {
                format!("removing {} failed: {reason}", step.component.name)
            }
        },
        None => format!("revision {revision} failed: {reason}"),
    };
    match &change.revert_failure {
        Some(failure) => text.push_str(&format!("; {failure}; needs an operator")),
        None => {
            // Last first, as they went back.
            let back: Vec<String> = change
                .steps
                .iter()
                .rev()
                .filter(|s| s.state != StepState::Pending)
                .map(|s| {
                    let before = s.snapshot.as_ref().and_then(Snapshot::version);
                    match before {
                        Some(v) => format!("{} back at {v}", s.component.name),
                        None => format!("{} removed again", s.component.name),
                    }
                })
                .collect();
            text.push_str(&format!("; reverted to revision {}", change.from_revision));
            if !back.is_empty() {
                text.push_str(&format!(" ({})", back.join(", ")));
            }
        }
    }
    text
}

/// Moves the change into `phase` at `now_ms` (the deadline table counts from here).
pub fn enter(change: &mut Change, phase: ChangePhase, now_ms: u64) {
    change.phase = phase;
    change.phase_since_ms = now_ms;
    if phase == ChangePhase::Baking {
        change.healthy_at_ms = Some(now_ms);
    }
    if phase != ChangePhase::Verifying && phase != ChangePhase::Baking {
        change.settle_until_ms = None;
    }
}

/// Folds a worker's result into the change. Results for steps of another phase (a worker
/// that outlived a decision) are ignored.
pub fn record(change: &mut Change, outcome: Outcome) {
    match outcome {
        Outcome::Prepared {
            baseline,
            snapshots,
        } if change.phase == ChangePhase::Pending => {
            change.baseline = baseline;
            for (step, snapshot) in change.steps.iter_mut().zip(snapshots) {
                step.snapshot = Some(snapshot);
            }
            change.prepared = change.steps.iter().all(|s| s.snapshot.is_some());
        }
        Outcome::PrepareFailed(failure) if change.phase == ChangePhase::Pending => {
            change.failure = Some(failure);
        }
        Outcome::StepDone(i) if change.phase == ChangePhase::Applying => {
            if let Some(step) = change.steps.get_mut(i) {
                step.state = StepState::Done;
            }
        }
        Outcome::StepFailed(i, failure) if change.phase == ChangePhase::Applying => {
            if let Some(step) = change.steps.get_mut(i) {
                step.state = StepState::Started; // maybe half done: the revert restores it
            }
            change.failure = Some(failure);
        }
        Outcome::Restored(i) if change.phase == ChangePhase::Reverting => {
            if let Some(step) = change.steps.get_mut(i) {
                step.state = StepState::Reverted;
            }
        }
        Outcome::RestoreFailed(i, reason) if change.phase == ChangePhase::Reverting => {
            let step = change.steps.get(i);
            change.revert_failure = Some(format!(
                "restoring {} to {} failed: {reason}",
                step.map_or("?", |s| s.component.name.as_str()),
                step.and_then(|s| s.snapshot.as_ref())
                    .and_then(Snapshot::version)
                    .unwrap_or("absent")
            ));
        }
        ignored => tracing::debug!(?ignored, phase = ?change.phase, "stale worker result ignored"),
    }
}

/// What a restart does to a journaled change (the nodelet died; its workers with it):
/// - Pending: nothing was touched; preparing starts over (downloads resume from the cache).
/// - Applying: a Started step may be half done; it runs again (steps are idempotent). Done
///   steps stay done: their services were started again by the agent before this.
/// - Verifying, Baking: the services of done steps were just started again; the change
///   verifies again from a fresh window after `settle_ms` (the services' start time), and a
///   bake starts over, because health before the restart says nothing about the processes now.
/// - Reverting: goes on with the steps not yet back.
pub fn resume(change: &mut Change, now_ms: u64, settle_ms: u64) {
    match change.phase {
        ChangePhase::Pending => {
            change.prepared = false;
            change.failure = None;
        }
        ChangePhase::Applying | ChangePhase::Reverting => {}
        ChangePhase::Verifying | ChangePhase::Baking => {
            enter(change, ChangePhase::Verifying, now_ms);
            change.healthy_at_ms = None;
            change.settle_until_ms = Some(now_ms.saturating_add(settle_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Action, Step};
    use manifests::wire::AssignedState;
    use manifests::Component;

    fn component(name: &str, kind: ComponentKind) -> Component {
        serde_json::from_value(serde_json::json!({
            "name": name, "kind": kind, "version": "1.1.0",
            "service": {"exec": ["bin/x"]},
        }))
        .unwrap()
    }

    /// A change of a service and a package, with one http probe (threshold 3), bake 10 s and a
    /// healthy deadline of 60 s.
    fn change(phase: ChangePhase) -> Change {
        let spec: manifests::DesiredStateSpec = serde_json::from_value(serde_json::json!({
            "components": [],
            "probes": [{"name": "http", "http": {"url": "http://127.0.0.1:1/"}, "failureThreshold": 3}],
            "rollout": {"bakeSeconds": 10, "healthyDeadlineSeconds": 60},
        }))
        .unwrap();
        let mut spec = spec;
        spec.components = vec![
            component("svc", ComponentKind::Service),
            component("pkg", ComponentKind::Package),
        ];
        let steps = spec
            .components
            .iter()
            .map(|c| Step {
                component: c.clone(),
                action: Action::Upgrade,
                snapshot: None,
                state: StepState::Pending,
            })
            .collect();
        Change {
            target: AssignedState {
                name: "ds".into(),
                revision: 2,
                commit: None,
                spec,
            },
            from_revision: 1,
            phase,
            steps,
            baseline: BTreeMap::from([("http".to_string(), true), ("svc-alive".into(), true)]),
            applied_at_ms: 0,
            healthy_at_ms: None,
            revert_reason: None,
            probe_output: None,
            culprit: None,
            phase_since_ms: 1_000,
            prepared: false,
            failure: None,
            settle_until_ms: None,
            revert_failure: None,
            log_tail: vec![],
            withdrawn: false,
        }
    }

    fn obs(now_ms: u64) -> Observations {
        Observations {
            now_ms,
            ..Default::default()
        }
    }

    fn passing(passes: u32) -> ProbeView {
        ProbeView {
            consecutive_failures: 0,
            threshold: 3,
            passes,
            output: "ok".into(),
        }
    }

    fn failing(failures: u32) -> ProbeView {
        ProbeView {
            consecutive_failures: failures,
            threshold: 3,
            passes: 1,
            output: "503".into(),
        }
    }

    fn all_passing(now: u64) -> Observations {
        let mut o = obs(now);
        o.probes.insert("http".into(), passing(1));
        o.probes.insert("svc-alive".into(), passing(1));
        o
    }

    fn failure(component: &str) -> Failure {
        Failure {
            reason: format!("{component}: boom"),
            component: Some(component.into()),
            no_space: false,
        }
    }

    #[test]
    fn a_busy_worker_always_means_wait() {
        for phase in [
            ChangePhase::Pending,
            ChangePhase::Applying,
            ChangePhase::Verifying,
            ChangePhase::Baking,
            ChangePhase::Reverting,
        ] {
            let mut o = all_passing(5_000);
            o.busy = true;
            assert_eq!(decide(&change(phase), &o), Decision::Wait, "{phase:?}");
        }
    }

    #[test]
    fn pending_prepares_then_runs_the_first_step_or_refuses() {
        let mut c = change(ChangePhase::Pending);
        assert_eq!(decide(&c, &obs(0)), Decision::Prepare);
        let mut stopping = obs(0);
        stopping.stopping = true;
        assert_eq!(decide(&c, &stopping), Decision::Wait);
        record(
            &mut c,
            Outcome::Prepared {
                baseline: BTreeMap::from([("http".to_string(), false)]),
                snapshots: vec![Snapshot::Absent, Snapshot::Absent],
            },
        );
        assert!(c.prepared);
        assert_eq!(c.baseline.get("http"), Some(&false));
        let d = decide(&c, &obs(0));
        assert_eq!(d, Decision::RunStep(0));
        assert_eq!(
            transition(ChangePhase::Pending, &d),
            Some(ChangePhase::Applying)
        );

        let mut c = change(ChangePhase::Pending);
        record(&mut c, Outcome::PrepareFailed(failure("svc")));
        assert_eq!(decide(&c, &obs(0)), Decision::Refuse(failure("svc")));
        assert_eq!(
            transition(ChangePhase::Pending, &Decision::Refuse(failure("svc"))),
            None
        );
    }

    #[test]
    fn a_change_without_steps_verifies_instead_of_running_one() {
        let mut c = change(ChangePhase::Pending);
        c.steps.clear();
        c.prepared = true;
        let d = decide(&c, &obs(0));
        assert_eq!(d, Decision::Verify);
        assert_eq!(
            transition(ChangePhase::Pending, &d),
            Some(ChangePhase::Verifying)
        );
    }

    #[test]
    fn applying_runs_steps_in_order_then_verifies() {
        let mut c = change(ChangePhase::Applying);
        assert_eq!(decide(&c, &obs(0)), Decision::RunStep(0));
        c.steps[0].state = StepState::Started; // journaled before the step; a restart re-runs it
        assert_eq!(decide(&c, &obs(0)), Decision::RunStep(0));
        record(&mut c, Outcome::StepDone(0));
        assert_eq!(decide(&c, &obs(0)), Decision::RunStep(1));
        let mut stopping = obs(0);
        stopping.stopping = true;
        assert_eq!(decide(&c, &stopping), Decision::Wait);
        record(&mut c, Outcome::StepDone(1));
        let d = decide(&c, &obs(0));
        assert_eq!(d, Decision::Verify);
        assert_eq!(
            transition(ChangePhase::Applying, &d),
            Some(ChangePhase::Verifying)
        );
    }

    #[test]
    fn a_failed_step_reverts_naming_the_component() {
        let mut c = change(ChangePhase::Applying);
        c.steps[0].state = StepState::Done;
        c.steps[1].state = StepState::Started;
        record(&mut c, Outcome::StepFailed(1, failure("pkg")));
        let d = decide(&c, &obs(0));
        let Decision::Revert(cause) = &d else {
            panic!("{d:?}")
        };
        assert_eq!(cause.culprit.as_deref(), Some("pkg"));
        assert_eq!(
            transition(ChangePhase::Applying, &d),
            Some(ChangePhase::Reverting)
        );
    }

    #[test]
    fn verifying_bakes_once_every_watched_probe_passed() {
        let c = change(ChangePhase::Verifying);
        // Nothing observed yet: wait (an unrun probe is not a pass).
        assert_eq!(decide(&c, &obs(2_000)), Decision::Wait);
        let mut o = obs(2_000);
        o.probes.insert("http".into(), passing(1));
        assert_eq!(decide(&c, &o), Decision::Wait, "svc-alive has not passed");
        let d = decide(&c, &all_passing(2_000));
        assert_eq!(d, Decision::Bake);
        assert_eq!(
            transition(ChangePhase::Verifying, &d),
            Some(ChangePhase::Baking)
        );
    }

    #[test]
    fn verifying_reverts_on_regression_and_on_its_deadline() {
        let c = change(ChangePhase::Verifying);
        let mut o = all_passing(2_000);
        o.probes.insert("http".into(), failing(2));
        assert_eq!(decide(&c, &o), Decision::Wait, "two failures of three");
        o.probes.insert("http".into(), failing(3));
        let Decision::Revert(cause) = decide(&c, &o) else {
            panic!()
        };
        assert_eq!(cause.probe_output.as_deref(), Some("503"));
        assert_eq!(cause.culprit.as_deref(), Some("svc"));

        // Never passed, never failed enough: the healthy deadline (60 s after entering) ends it.
        let mut o = obs(61_001);
        o.probes.insert("http".into(), failing(1));
        o.probes.insert("svc-alive".into(), passing(1));
        assert_eq!(deadline(&c), Some(61_000));
        let Decision::Revert(cause) = decide(&c, &o) else {
            panic!()
        };
        assert!(
            cause.reason.contains("not healthy within 60s"),
            "{}",
            cause.reason
        );
        let mut o = obs(60_999);
        o.probes.insert("http".into(), failing(1));
        assert_eq!(decide(&c, &o), Decision::Wait);
    }

    #[test]
    fn a_probe_failing_at_baseline_neither_reverts_nor_blocks_unless_required() {
        let mut c = change(ChangePhase::Verifying);
        c.baseline.insert("http".into(), false);
        let mut o = all_passing(2_000);
        o.probes.insert("http".into(), failing(9));
        assert_eq!(decide(&c, &o), Decision::Bake);
        c.target.spec.probes[0].required = true;
        assert!(matches!(decide(&c, &o), Decision::Revert(_)));
    }

    #[test]
    fn baking_commits_after_the_bake_and_reverts_on_regression() {
        let mut c = change(ChangePhase::Baking);
        c.healthy_at_ms = Some(5_000);
        assert_eq!(deadline(&c), Some(15_000));
        assert_eq!(decide(&c, &all_passing(14_999)), Decision::Wait);
        assert_eq!(decide(&c, &all_passing(15_000)), Decision::Commit);
        assert_eq!(transition(ChangePhase::Baking, &Decision::Commit), None);
        let mut o = all_passing(10_000);
        o.probes.insert("svc-alive".into(), failing(3));
        let d = decide(&c, &o);
        let Decision::Revert(cause) = &d else {
            panic!()
        };
        assert_eq!(cause.culprit.as_deref(), Some("svc"));
        assert_eq!(
            transition(ChangePhase::Baking, &d),
            Some(ChangePhase::Reverting)
        );
    }

    #[test]
    fn reverting_restores_last_first_and_finishes() {
        let mut c = change(ChangePhase::Reverting);
        c.steps[0].state = StepState::Done;
        c.steps[1].state = StepState::Started;
        assert_eq!(decide(&c, &obs(0)), Decision::RestoreStep(1));
        record(&mut c, Outcome::Restored(1));
        assert_eq!(decide(&c, &obs(0)), Decision::RestoreStep(0));
        record(&mut c, Outcome::Restored(0));
        assert_eq!(decide(&c, &obs(0)), Decision::FinishRevert);
        // Pending steps were never touched: nothing to restore.
        let c = change(ChangePhase::Reverting);
        assert_eq!(decide(&c, &obs(0)), Decision::FinishRevert);
    }

    #[test]
    fn a_failed_restore_finishes_the_revert_as_failed() {
        let mut c = change(ChangePhase::Reverting);
        c.steps[0].state = StepState::Done;
        c.steps[0].snapshot = Some(Snapshot::Absent);
        record(&mut c, Outcome::RestoreFailed(0, "disk".into()));
        assert!(c
            .revert_failure
            .as_deref()
            .unwrap()
            .contains("svc to absent"));
        assert_eq!(decide(&c, &obs(0)), Decision::FinishRevert);
    }

    #[test]
    fn results_for_another_phase_are_ignored() {
        let mut c = change(ChangePhase::Reverting);
        record(&mut c, Outcome::StepDone(0));
        assert_eq!(c.steps[0].state, StepState::Pending);
        let mut c = change(ChangePhase::Applying);
        record(&mut c, Outcome::Restored(0));
        assert_eq!(c.steps[0].state, StepState::Pending);
    }

    #[test]
    fn a_restart_resumes_each_phase_as_documented() {
        let mut c = change(ChangePhase::Pending);
        c.prepared = true;
        resume(&mut c, 50_000, 2_000);
        assert_eq!(decide(&c, &obs(50_000)), Decision::Prepare);

        let mut c = change(ChangePhase::Applying);
        c.steps[0].state = StepState::Done;
        c.steps[1].state = StepState::Started;
        resume(&mut c, 50_000, 2_000);
        assert_eq!(decide(&c, &obs(50_000)), Decision::RunStep(1));

        for phase in [ChangePhase::Verifying, ChangePhase::Baking] {
            let mut c = change(phase);
            c.healthy_at_ms = Some(1_000);
            resume(&mut c, 50_000, 2_000);
            assert_eq!(c.phase, ChangePhase::Verifying);
            // Settling: even a failing probe waits while the restarted services come up.
            let mut o = obs(51_999);
            o.probes.insert("http".into(), failing(5));
            assert_eq!(decide(&c, &o), Decision::Wait, "{phase:?}");
            assert_eq!(decide(&c, &all_passing(52_000)), Decision::Bake);
            // A fresh verification window from the restart.
            assert_eq!(deadline(&c), Some(110_000));
            let mut baked = c.clone();
            enter(&mut baked, ChangePhase::Baking, 52_000);
            assert_eq!(deadline(&baked), Some(62_000), "the bake starts over");
        }

        let mut c = change(ChangePhase::Reverting);
        c.steps[0].state = StepState::Done;
        c.steps[1].state = StepState::Reverted;
        resume(&mut c, 50_000, 2_000);
        assert_eq!(decide(&c, &obs(50_000)), Decision::RestoreStep(0));
    }

    fn withdrawn(now: u64) -> Observations {
        let mut o = all_passing(now);
        o.withdrawn = true;
        o
    }

    fn is_withdrawal(d: &Decision) -> bool {
        matches!(d, Decision::Revert(cause) if cause.withdrawn
            && cause.reason == "revision 2 was withdrawn by the apiserver (rollout aborted or superseded)"
            && cause.culprit.is_none()
            && cause.probe_output.is_none())
    }

    #[test]
    fn a_withdrawn_pending_change_is_dropped_even_while_it_downloads() {
        let c = change(ChangePhase::Pending);
        assert_eq!(decide(&c, &withdrawn(0)), Decision::Drop);
        let mut busy = withdrawn(0);
        busy.busy = true;
        assert_eq!(
            decide(&c, &busy),
            Decision::Drop,
            "a stalled download never holds it"
        );
        let mut refused = change(ChangePhase::Pending);
        record(&mut refused, Outcome::PrepareFailed(failure("svc")));
        assert_eq!(
            decide(&refused, &withdrawn(0)),
            Decision::Drop,
            "not remembered as failed: it is not wanted anyway"
        );
        assert_eq!(transition(ChangePhase::Pending, &Decision::Drop), None);
    }

    #[test]
    fn a_withdrawn_applying_change_reverts_once_its_step_reports() {
        let mut c = change(ChangePhase::Applying);
        c.steps[0].state = StepState::Started;
        let mut busy = withdrawn(0);
        busy.busy = true;
        assert_eq!(
            decide(&c, &busy),
            Decision::Wait,
            "the step's worker owns it"
        );
        record(&mut c, Outcome::StepDone(0));
        let d = decide(&c, &withdrawn(0));
        assert!(is_withdrawal(&d), "{d:?}");
        assert_eq!(
            transition(ChangePhase::Applying, &d),
            Some(ChangePhase::Reverting)
        );
        // Stopping: the journal still moves to Reverting (a restart goes on from there).
        let mut stopping = withdrawn(0);
        stopping.stopping = true;
        assert!(is_withdrawal(&decide(&c, &stopping)));
        // A step that failed meanwhile is reported as the failure it is.
        record(&mut c, Outcome::StepFailed(1, failure("pkg")));
        let Decision::Revert(cause) = decide(&c, &withdrawn(0)) else {
            panic!()
        };
        assert!(!cause.withdrawn);
        assert_eq!(cause.culprit.as_deref(), Some("pkg"));
    }

    #[test]
    fn a_withdrawn_verifying_change_reverts_without_waiting_for_probes() {
        let c = change(ChangePhase::Verifying);
        // Nothing observed yet, all passing, or settling after a restart: back at once.
        let mut nothing = obs(2_000);
        nothing.withdrawn = true;
        assert!(is_withdrawal(&decide(&c, &nothing)));
        assert!(is_withdrawal(&decide(&c, &withdrawn(2_000))));
        let mut settling = c.clone();
        settling.settle_until_ms = Some(10_000);
        assert!(is_withdrawal(&decide(&settling, &withdrawn(2_000))));
        let d = decide(&c, &withdrawn(2_000));
        assert_eq!(
            transition(ChangePhase::Verifying, &d),
            Some(ChangePhase::Reverting)
        );
    }

    #[test]
    fn a_withdrawn_baking_change_reverts_without_finishing_its_bake() {
        let mut c = change(ChangePhase::Baking);
        c.healthy_at_ms = Some(5_000);
        assert_eq!(decide(&c, &all_passing(6_000)), Decision::Wait);
        let d = decide(&c, &withdrawn(6_000));
        assert!(is_withdrawal(&d), "{d:?}");
        assert_eq!(
            transition(ChangePhase::Baking, &d),
            Some(ChangePhase::Reverting)
        );
        // Even past the bake: a withdrawn revision never commits.
        assert!(is_withdrawal(&decide(&c, &withdrawn(50_000))));
    }

    #[test]
    fn a_withdrawn_revert_restores_every_touched_step_last_first() {
        let mut c = change(ChangePhase::Reverting);
        c.steps[0].state = StepState::Done;
        c.steps[1].state = StepState::Done;
        c.withdrawn = true;
        assert_eq!(decide(&c, &withdrawn(0)), Decision::RestoreStep(1));
        let mut busy = withdrawn(0);
        busy.busy = true;
        assert_eq!(decide(&c, &busy), Decision::Wait);
        record(&mut c, Outcome::Restored(1));
        assert_eq!(decide(&c, &withdrawn(0)), Decision::RestoreStep(0));
        record(&mut c, Outcome::Restored(0));
        assert_eq!(decide(&c, &withdrawn(0)), Decision::FinishRevert);
    }

    #[test]
    fn a_withdrawn_repair_is_kept_not_undone() {
        // Revision 2 is in force and drifted; a repair puts it back when the apiserver moves
        // on. Undoing the repair would restore the drift: it finishes and is kept, unbaked.
        let repair = |phase| {
            let mut c = change(phase);
            c.from_revision = 2;
            c
        };
        assert!(is_repair(&repair(ChangePhase::Applying)));
        assert!(!is_repair(&change(ChangePhase::Applying)));
        assert_eq!(
            decide(&repair(ChangePhase::Pending), &withdrawn(0)),
            Decision::Drop
        );
        let mut c = repair(ChangePhase::Applying);
        assert_eq!(decide(&c, &withdrawn(0)), Decision::RunStep(0));
        c.steps.iter_mut().for_each(|s| s.state = StepState::Done);
        assert_eq!(decide(&c, &withdrawn(0)), Decision::Verify);
        assert_eq!(
            decide(&repair(ChangePhase::Verifying), &withdrawn(2_000)),
            Decision::Commit
        );
        let mut baking = repair(ChangePhase::Baking);
        baking.healthy_at_ms = Some(1_500);
        assert_eq!(decide(&baking, &withdrawn(2_000)), Decision::Commit);
        // A repair whose step failed still goes back, as any failed step does.
        let mut failed = repair(ChangePhase::Applying);
        record(&mut failed, Outcome::StepFailed(0, failure("svc")));
        assert!(matches!(decide(&failed, &withdrawn(0)), Decision::Revert(c) if !c.withdrawn));
    }

    #[test]
    fn touched_is_what_the_change_changed() {
        let mut c = change(ChangePhase::Reverting);
        assert!(touched(&c).is_empty());
        c.steps[0].state = StepState::Reverted;
        assert_eq!(touched(&c), vec!["svc".to_string()]);
        c.steps[1].state = StepState::Started;
        assert_eq!(touched(&c), vec!["svc".to_string(), "pkg".to_string()]);
    }

    #[test]
    fn a_revert_message_names_the_failed_component_and_what_went_back() {
        let mut c = change(ChangePhase::Reverting);
        c.steps[0].snapshot = Some(Snapshot::Absent);
        c.steps[1].snapshot = Some(Snapshot::Package {
            version: "1.0.0".into(),
            deb: None,
        });
        c.steps[0].state = StepState::Reverted;
        c.steps[1].state = StepState::Reverted;
        c.revert_reason = Some("probe http failed 3 times in a row".into());
        c.culprit = Some("svc".into());
        assert_eq!(
            revert_message(&c),
            "svc 1.1.0 failed: probe http failed 3 times in a row; reverted to revision 1 (pkg back at 1.0.0, svc removed again)"
        );
        // Only the steps that ran are named.
        c.steps[1].state = StepState::Pending;
        assert_eq!(
            revert_message(&c),
            "svc 1.1.0 failed: probe http failed 3 times in a row; reverted to revision 1 (svc removed again)"
        );
        c.revert_failure = Some("restoring svc to absent failed: disk".into());
        assert!(revert_message(&c)
            .ends_with("; restoring svc to absent failed: disk; needs an operator"));

        let mut w = change(ChangePhase::Reverting);
        w.steps[0].snapshot = Some(Snapshot::Absent);
        w.steps[0].state = StepState::Reverted;
        let cause = RevertCause::withdrawn(2);
        w.revert_reason = Some(cause.reason);
        w.withdrawn = true;
        assert_eq!(
            revert_message(&w),
            "revision 2 was withdrawn by the apiserver (rollout aborted or superseded); reverted to revision 1 (svc removed again)"
        );
        w.withdrawn = false;
        w.revert_reason = Some("the worker died".into());
        assert!(revert_message(&w).starts_with("revision 2 failed: the worker died;"));
    }

    #[test]
    fn huge_rollout_settings_do_not_overflow() {
        let mut c = change(ChangePhase::Verifying);
        c.target.spec.rollout.healthy_deadline_seconds = u64::MAX;
        c.target.spec.rollout.bake_seconds = u64::MAX;
        assert_eq!(deadline(&c), Some(u64::MAX));
        assert_eq!(decide(&c, &obs(u64::MAX - 1)), Decision::Wait);
        enter(&mut c, ChangePhase::Baking, 7);
        assert_eq!(decide(&c, &all_passing(u64::MAX - 1)), Decision::Wait);
    }
}
