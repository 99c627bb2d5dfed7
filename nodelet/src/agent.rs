//! The reconcile loop: inventory, diff, baseline probes, apply, verify, bake, and revert on regression.
//!
//! One task owns the node state and advances every DesiredState's change one
//! tick at a time (brupop-style: read, decide, act, record). Every transition
//! is written to the journal before the step it announces, so after `kill -9`
//! the next start finishes the change (Applying, Verifying, Baking) or finishes
//! undoing it (Reverting) — never leaves a half-installed component unreported.
//! Nothing here needs the apiserver: the last assignment is on disk, events
//! queue up, and reports resume when it answers again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use manifests::wire::*;
use manifests::{Component, ComponentKind, ComponentState, Probe};
use tokio::sync::watch;

use crate::artifact::ArtifactCache;
use crate::backend::{BackendError, Backends};
use crate::client::{ApiClient, ClientError};
use crate::host::HostSampler;
use crate::journal::{Action, Applied, Change, ChangePhase, NodeState, StateDir, Step, StepState};
use crate::probe::{self, Outcome};

/// How often the loop wakes when nothing happens.
const TICK: Duration = Duration::from_millis(250);
/// Implicit "is it running" probe of every service: period and threshold.
const ALIVE_PERIOD: Duration = Duration::from_secs(1);
const ALIVE_THRESHOLD: u32 = 3;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// One probe's running record.
#[derive(Debug, Clone)]
struct ProbeRecord {
    next_due: Instant,
    period: Duration,
    threshold: u32,
    consecutive_failures: u32,
    passes_since_change: u32,
    last: Option<Outcome>,
}

/// What the heartbeat sends, kept fresh by the loop.
#[derive(Default)]
pub struct Shared {
    /// The latest report (events excluded).
    pub report: Mutex<NodeReport>,
    /// Events not yet delivered.
    pub events: Mutex<Vec<NodeEvent>>,
}

/// The agent.
pub struct Agent {
    backends: Backends,
    artifacts: ArtifactCache,
    host: Arc<HostSampler>,
    http: reqwest::Client,
    dir: StateDir,
    state: NodeState,
    assignment: Option<NodeAssignment>,
    probes: HashMap<(String, String), ProbeRecord>,
    installed: BTreeMap<String, Option<String>>,
    /// Components whose inventory failed this tick (a backend error, or dpkg busy with the
    /// package): their DesiredStates are left alone until a tick can read them.
    unknown: std::collections::BTreeSet<String>,
    shared: Arc<Shared>,
    nodelet_version: String,
    vars: BTreeMap<String, String>,
}

fn alive_name(component: &str) -> String {
    format!("{component}-alive")
}

/// The component an error is about, for the failure report's log tail.
fn describe(error: &BackendError) -> String {
    error.to_string()
}

impl Agent {
    /// An agent over `backends`, with its state in `dir`.
    pub fn new(
        backends: Backends,
        artifacts: ArtifactCache,
        host: Arc<HostSampler>,
        dir: StateDir,
        shared: Arc<Shared>,
    ) -> Result<Self, String> {
        let state = dir.load()?;
        let assignment = dir.load_assignment()?;
        *shared.events.lock().expect("not poisoned") = dir.load_events()?;
        Ok(Agent {
            backends,
            artifacts,
            host,
            http: reqwest::Client::builder()
                .build()
                .map_err(|e| e.to_string())?,
            dir,
            state,
            assignment,
            probes: HashMap::new(),
            installed: BTreeMap::new(),
            unknown: Default::default(),
            shared,
            nodelet_version: env!("CARGO_PKG_VERSION").to_string(),
            vars: BTreeMap::new(),
        })
    }

    /// Node variables filled into every assigned spec (see `plan::interpolate`).
    pub fn with_vars(mut self, vars: BTreeMap<String, String>) -> Self {
        self.vars = vars;
        self
    }

    /// The durable state (for tests and reports).
    pub fn state(&self) -> &NodeState {
        &self.state
    }

    fn save(&self) -> Result<(), String> {
        self.dir.save(&self.state)
    }

    fn event(
        &self,
        kind: EventType,
        reason: &str,
        message: String,
        desired_state: Option<&str>,
        revision: Option<u64>,
        component: Option<&str>,
    ) {
        match kind {
            EventType::Normal => {
                tracing::info!(reason, desired_state, revision, component, "{message}")
            }
            EventType::Warning => {
                tracing::warn!(reason, desired_state, revision, component, "{message}")
            }
        }
        let mut events = self.shared.events.lock().expect("not poisoned");
        events.push(NodeEvent {
            time: SystemTime::now(),
            kind,
            reason: reason.to_string(),
            message,
            desired_state: desired_state.map(str::to_string),
            revision,
            component: component.map(str::to_string),
        });
        let _ = self.dir.save_events(&events);
    }

    /// Brings services back after a start (reboot or nodelet restart), before anything else.
    pub async fn start(&mut self) -> Result<(), String> {
        if let Some(supervisor) = self.backends.service.supervisor() {
            supervisor.reap_orphans();
        }
        let components: Vec<Component> = self
            .state
            .applied
            .values()
            .flat_map(|a| a.state.spec.components.clone())
            .filter(|c| c.kind == ComponentKind::Service && c.state == ComponentState::Present)
            .collect();
        for component in components {
            // A change in flight decides for itself what runs.
            let in_flight = self
                .state
                .changes
                .values()
                .any(|c| c.steps.iter().any(|s| s.component.name == component.name));
            if in_flight {
                continue;
            }
            if let Err(e) = self.backends.service.ensure_running(&component).await {
                self.event(
                    EventType::Warning,
                    "StartFailed",
                    format!("could not start: {e}"),
                    None,
                    None,
                    Some(&component.name),
                );
            }
        }
        if !self.state.changes.is_empty() {
            let names: Vec<String> = self.state.changes.keys().cloned().collect();
            self.event(
                EventType::Warning,
                "Recovering",
                format!(
                    "resuming changes interrupted by a restart: {}",
                    names.join(", ")
                ),
                None,
                None,
                None,
            );
        }
        Ok(())
    }

    /// Runs the loop until `stop` turns true.
    pub async fn run(
        mut self,
        mut assignments: watch::Receiver<Option<NodeAssignment>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        self.start().await?;
        loop {
            if let Some(mut assignment) = assignments.borrow_and_update().clone() {
                for state in &mut assignment.states {
                    crate::plan::interpolate(&mut state.spec, &self.vars);
                }
                if self.assignment.as_ref().map(|a| a.generation) != Some(assignment.generation) {
                    self.dir.save_assignment(&assignment)?;
                    self.assignment = Some(assignment);
                }
            }
            if let Err(e) = self.tick().await {
                tracing::error!(error = %e, "reconcile failed; retrying");
            }
            tokio::select! {
                _ = assignments.changed() => {}
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => {
                    if *stop.borrow() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One pass: advance changes in flight, start new ones, probe, publish the report.
    pub async fn tick(&mut self) -> Result<(), String> {
        let assignment = self.assignment.clone();
        self.inventory(assignment.as_ref()).await;
        let in_flight: Vec<String> = self.state.changes.keys().cloned().collect();
        for name in in_flight {
            self.advance(&name).await?;
        }
        if let Some(assignment) = &assignment {
            for target in &assignment.states {
                if self.state.changes.contains_key(&target.name) {
                    continue;
                }
                self.reconcile_state(target).await?;
            }
            // DesiredStates no longer assigned: stop managing them (nothing is uninstalled).
            let gone: Vec<String> = self
                .state
                .applied
                .keys()
                .filter(|name| !assignment.states.iter().any(|s| &s.name == *name))
                .filter(|name| !self.state.changes.contains_key(*name))
                .cloned()
                .collect();
            for name in gone {
                self.state.applied.remove(&name);
                self.probes.retain(|(ds, _), _| ds != &name);
                self.save()?;
                self.event(
                    EventType::Normal,
                    "Unmanaged",
                    "no longer assigned to this node: its components are left as they are".into(),
                    Some(&name),
                    None,
                    None,
                );
            }
        }
        self.steady_probes().await;
        self.publish(assignment.as_ref());
        Ok(())
    }

    /// Reads the installed version of every component this node manages or is asked to.
    async fn inventory(&mut self, assignment: Option<&NodeAssignment>) {
        let mut components: Vec<Component> = Vec::new();
        if let Some(assignment) = assignment {
            components.extend(
                assignment
                    .states
                    .iter()
                    .flat_map(|s| s.spec.components.clone()),
            );
        }
        components.extend(
            self.state
                .applied
                .values()
                .flat_map(|a| a.state.spec.components.clone()),
        );
        let mut installed = BTreeMap::new();
        let mut unknown = std::collections::BTreeSet::new();
        for component in components {
            if installed.contains_key(&component.name) {
                continue;
            }
            // A version that cannot be read is not "absent": acting on it would reinstall
            // over whatever is going on (an operator's dpkg run, a backend error).
            let version = match self.backends.current(&component).await {
                Ok(version) => version,
                Err(e) => {
                    tracing::warn!(component = %component.name, error = %e, "inventory failed; leaving its DesiredState alone this tick");
                    unknown.insert(component.name.clone());
                    None
                }
            };
            installed.insert(component.name.clone(), version);
        }
        self.installed = installed;
        self.unknown = unknown;
    }

    async fn reconcile_state(&mut self, target: &AssignedState) -> Result<(), String> {
        let failed = self
            .state
            .failed_revisions
            .get(&target.name)
            .is_some_and(|r| r.contains(&target.revision));
        if failed {
            return Ok(()); // reverted here before: wait for a different revision
        }
        if target
            .spec
            .components
            .iter()
            .any(|c| self.unknown.contains(&c.name))
        {
            return Ok(()); // the inventory could not read it: next tick
        }
        let steps = crate::plan::steps(&target.spec.components, &self.installed);
        let applied = self.state.applied.get(&target.name);
        if steps.is_empty() {
            let up_to_date = applied.is_some_and(|a| {
                a.state.revision == target.revision && a.phase == ComponentPhase::Healthy
            });
            if !up_to_date {
                // Nothing to install (only probes or rollout settings changed): adopt the revision.
                self.state.applied.insert(
                    target.name.clone(),
                    Applied {
                        state: target.clone(),
                        phase: ComponentPhase::Healthy,
                        healthy_since_ms: Some(now_ms()),
                        message: None,
                        probe_output: None,
                        log_tail: vec![],
                        culprit: None,
                        reverted_revision: None,
                    },
                );
                self.save()?;
            }
            return Ok(());
        }
        if applied.is_some_and(|a| {
            a.state.revision == target.revision && a.phase == ComponentPhase::Healthy
        }) {
            let drifted: Vec<String> = steps
                .iter()
                .map(|(c, _)| {
                    format!(
                        "{} is {} instead of {}",
                        c.name,
                        self.installed
                            .get(&c.name)
                            .cloned()
                            .flatten()
                            .unwrap_or_else(|| "absent".into()),
                        c.version.as_deref().unwrap_or("absent")
                    )
                })
                .collect();
            self.event(
                EventType::Warning,
                "Drift",
                format!(
                    "changed outside shoal: {}; putting it back",
                    drifted.join(", ")
                ),
                Some(&target.name),
                Some(target.revision),
                None,
            );
        }
        self.begin(target.clone(), steps).await
    }

    /// Baseline, snapshots, artifacts — then the journal entry, then the steps.
    async fn begin(
        &mut self,
        target: AssignedState,
        steps: Vec<(Component, Action)>,
    ) -> Result<(), String> {
        let name = target.name.clone();
        let from_revision = self
            .state
            .applied
            .get(&name)
            .map_or(0, |a| a.state.revision);
        self.event(
            EventType::Normal,
            "Applying",
            format!(
                "revision {from_revision} → {}: {}",
                target.revision,
                steps
                    .iter()
                    .map(|(c, a)| format!(
                        "{:?} {} {}",
                        a,
                        c.name,
                        c.version.as_deref().unwrap_or("")
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(&name),
            Some(target.revision),
            None,
        );
        // Baseline: every probe once, before anything changes.
        let mut baseline = BTreeMap::new();
        for probe in &target.spec.probes {
            let outcome = probe::run(probe, &self.http, &self.host).await;
            baseline.insert(probe.name.clone(), outcome.passed);
        }
        for component in target
            .spec
            .components
            .iter()
            .filter(|c| c.kind == ComponentKind::Service)
        {
            // A service that is not installed yet has nothing to regress from: its alive probe
            // must pass after the change, so it counts as passing at baseline.
            let alive = self.backends.alive(component).await.is_ok();
            baseline.insert(alive_name(&component.name), alive);
        }
        // Artifacts first: a bad download or a wrong hash stops everything before anything is touched.
        let mut journal_steps = Vec::new();
        let mut artifacts: HashMap<String, PathBuf> = HashMap::new();
        for (component, action) in &steps {
            if *action != Action::Remove {
                if let Some(artifact) = &component.artifact {
                    match self.artifacts.fetch(artifact).await {
                        Ok(path) => {
                            artifacts.insert(component.name.clone(), path);
                        }
                        Err(e) => {
                            return self.refuse(&target, from_revision, component, &e.to_string())
                        }
                    }
                }
            }
            let snapshot = match self.backends.snapshot(component).await {
                Ok(snapshot) => snapshot,
                Err(e) => return self.refuse(&target, from_revision, component, &e.to_string()),
            };
            journal_steps.push(Step {
                component: component.clone(),
                action: *action,
                snapshot,
                state: StepState::Pending,
            });
        }
        let change = Change {
            target,
            from_revision,
            phase: ChangePhase::Applying,
            steps: journal_steps,
            baseline,
            applied_at_ms: 0,
            healthy_at_ms: None,
            revert_reason: None,
            probe_output: None,
            culprit: None,
        };
        self.state.changes.insert(name.clone(), change);
        self.save()?;
        self.apply_steps(&name, artifacts).await
    }

    /// A change refused before anything was touched: reported like a revert (nothing to undo).
    fn refuse(
        &mut self,
        target: &AssignedState,
        from_revision: u64,
        component: &Component,
        reason: &str,
    ) -> Result<(), String> {
        let previous = self.state.applied.get(&target.name).cloned();
        let message = format!("{}: {reason}", component.name);
        self.event(
            EventType::Warning,
            "Reverted",
            format!(
                "revision {} refused, nothing was changed: {message}",
                target.revision
            ),
            Some(&target.name),
            Some(target.revision),
            Some(&component.name),
        );
        self.state
            .failed_revisions
            .entry(target.name.clone())
            .or_default()
            .insert(target.revision);
        self.state.applied.insert(
            target.name.clone(),
            Applied {
                state: previous
                    .as_ref()
                    .map(|p| p.state.clone())
                    // Nothing was there before: the node runs none of this DesiredState's components.
                    .unwrap_or_else(|| AssignedState {
                        revision: from_revision,
                        spec: manifests::DesiredStateSpec {
                            components: vec![],
                            ..target.spec.clone()
                        },
                        ..target.clone()
                    }),
                phase: ComponentPhase::Reverted,
                healthy_since_ms: None,
                message: Some(message),
                probe_output: None,
                log_tail: vec![],
                culprit: Some(component.name.clone()),
                reverted_revision: Some(target.revision),
            },
        );
        self.save()
    }

    async fn apply_steps(
        &mut self,
        name: &str,
        mut artifacts: HashMap<String, PathBuf>,
    ) -> Result<(), String> {
        let count = self.state.changes[name].steps.len();
        for index in 0..count {
            let step = self.state.changes[name].steps[index].clone();
            if step.state == StepState::Done {
                continue;
            }
            self.state.changes.get_mut(name).expect("in flight").steps[index].state =
                StepState::Started;
            self.save()?;
            let artifact = match (&step.component.artifact, step.action) {
                (_, Action::Remove) => None,
                (Some(artifact), _) => match artifacts.remove(&step.component.name) {
                    Some(path) => Some(path),
                    // Resuming after a restart: the verified artifact is in the cache.
                    None => match self.artifacts.fetch(artifact).await {
                        Ok(path) => Some(path),
                        Err(e) => {
                            return self
                                .start_revert(
                                    name,
                                    format!("{}: {e}", step.component.name),
                                    None,
                                    Some(step.component.name.clone()),
                                )
                                .await
                        }
                    },
                },
                (None, _) => None,
            };
            let result = match step.action {
                Action::Remove => self.backends.remove(&step.component).await,
                _ => {
                    self.backends
                        .apply(&step.component, artifact.as_deref())
                        .await
                }
            };
            if let Err(e) = result {
                let reason = format!(
                    "{:?} {} failed: {}",
                    step.action,
                    step.component.name,
                    describe(&e)
                );
                return self
                    .start_revert(name, reason, None, Some(step.component.name.clone()))
                    .await;
            }
            self.state.changes.get_mut(name).expect("in flight").steps[index].state =
                StepState::Done;
            self.save()?;
        }
        let change = self.state.changes.get_mut(name).expect("in flight");
        change.phase = ChangePhase::Verifying;
        change.applied_at_ms = now_ms();
        let revision = change.target.revision;
        self.save()?;
        // Fresh probe records: failures before the change do not count after it.
        self.probes.retain(|(ds, _), _| ds != name);
        self.event(
            EventType::Normal,
            "Applied",
            format!("revision {revision} applied; verifying"),
            Some(name),
            Some(revision),
            None,
        );
        Ok(())
    }

    /// Advances a change in flight by one tick.
    async fn advance(&mut self, name: &str) -> Result<(), String> {
        let change = self.state.changes[name].clone();
        match change.phase {
            ChangePhase::Applying => self.apply_steps(name, HashMap::new()).await,
            ChangePhase::Reverting => self.revert(name).await,
            ChangePhase::Verifying | ChangePhase::Baking => {
                let results = self
                    .run_due_probes(
                        name,
                        &change.target.spec.probes,
                        &change.target.spec.components,
                        true,
                    )
                    .await;
                // Regression: passed at baseline (or required) and now failed `failureThreshold` times in a row.
                for (probe_name, record) in &results {
                    let baseline = change.baseline.get(probe_name).copied().unwrap_or(true);
                    let required = change
                        .target
                        .spec
                        .probes
                        .iter()
                        .any(|p| &p.name == probe_name && p.required);
                    if (baseline || required) && record.consecutive_failures >= record.threshold {
                        let output = record
                            .last
                            .as_ref()
                            .map(|o| o.output.clone())
                            .unwrap_or_default();
                        let culprit = culprit_of(probe_name, &change);
                        let reason = format!(
                            "probe {probe_name} failed {} times in a row",
                            record.consecutive_failures
                        );
                        return self.start_revert(name, reason, Some(output), culprit).await;
                    }
                }
                let now = now_ms();
                match change.phase {
                    ChangePhase::Verifying => {
                        let waiting: Vec<String> = results
                            .iter()
                            .filter(|(probe_name, record)| {
                                let baseline =
                                    change.baseline.get(*probe_name).copied().unwrap_or(true);
                                let required = change
                                    .target
                                    .spec
                                    .probes
                                    .iter()
                                    .any(|p| &p.name == *probe_name && p.required);
                                (baseline || required)
                                    && (record.passes_since_change == 0
                                        || record.consecutive_failures > 0)
                            })
                            .map(|(n, _)| n.clone())
                            .collect();
                        if waiting.is_empty() {
                            let c = self.state.changes.get_mut(name).expect("in flight");
                            c.phase = ChangePhase::Baking;
                            c.healthy_at_ms = Some(now);
                            let revision = c.target.revision;
                            self.save()?;
                            self.event(
                                EventType::Normal,
                                "Healthy",
                                format!(
                                    "revision {revision} healthy; watching for {}s",
                                    change.target.spec.rollout.bake_seconds
                                ),
                                Some(name),
                                Some(revision),
                                None,
                            );
                        } else if now.saturating_sub(change.applied_at_ms)
                            > change.target.spec.rollout.healthy_deadline_seconds * 1000
                        {
                            let output = waiting
                                .iter()
                                .filter_map(|n| {
                                    results
                                        .get(n)
                                        .and_then(|r| r.last.as_ref())
                                        .map(|o| format!("{n}: {}", o.output))
                                })
                                .collect::<Vec<_>>()
                                .join("\n");
                            let culprit = waiting.first().and_then(|n| culprit_of(n, &change));
                            let reason = format!(
                                "not healthy within {}s: waiting for {}",
                                change.target.spec.rollout.healthy_deadline_seconds,
                                waiting.join(", ")
                            );
                            return self.start_revert(name, reason, Some(output), culprit).await;
                        }
                        Ok(())
                    }
                    _ => {
                        let healthy_at = change.healthy_at_ms.unwrap_or(now);
                        if now.saturating_sub(healthy_at)
                            >= change.target.spec.rollout.bake_seconds * 1000
                        {
                            self.commit(name)
                        } else {
                            Ok(())
                        }
                    }
                }
            }
        }
    }

    /// The bake is over: the change is the node's new normal.
    fn commit(&mut self, name: &str) -> Result<(), String> {
        let change = self.state.changes.remove(name).expect("in flight");
        for step in &change.steps {
            if step.component.state == ComponentState::Present {
                self.state
                    .managed
                    .insert(step.component.name.clone(), step.component.clone());
            } else {
                self.state.managed.remove(&step.component.name);
            }
        }
        self.state.applied.insert(
            name.to_string(),
            Applied {
                state: change.target.clone(),
                phase: ComponentPhase::Healthy,
                healthy_since_ms: change.healthy_at_ms,
                message: None,
                probe_output: None,
                log_tail: vec![],
                culprit: None,
                reverted_revision: None,
            },
        );
        self.save()?;
        self.event(
            EventType::Normal,
            "Baked",
            format!(
                "revision {} stayed healthy for {}s",
                change.target.revision, change.target.spec.rollout.bake_seconds
            ),
            Some(name),
            Some(change.target.revision),
            None,
        );
        Ok(())
    }

    async fn start_revert(
        &mut self,
        name: &str,
        reason: String,
        probe_output: Option<String>,
        culprit: Option<String>,
    ) -> Result<(), String> {
        let change = self.state.changes.get_mut(name).expect("in flight");
        change.phase = ChangePhase::Reverting;
        change.revert_reason = Some(reason.clone());
        change.probe_output = probe_output;
        change.culprit = culprit;
        let revision = change.target.revision;
        self.save()?;
        self.event(
            EventType::Warning,
            "Reverting",
            format!("revision {revision}: {reason}"),
            Some(name),
            Some(revision),
            None,
        );
        self.revert(name).await
    }

    /// Puts back every started step, last first, from its snapshot.
    async fn revert(&mut self, name: &str) -> Result<(), String> {
        let change = self.state.changes[name].clone();
        // The culprit's log, read before its process is replaced.
        let log_tail = change
            .culprit
            .as_ref()
            .and_then(|c| change.target.spec.components.iter().find(|x| &x.name == c))
            .map(|c| self.backends.log_tail(c))
            .unwrap_or_default();
        let mut failure = None;
        for index in (0..change.steps.len()).rev() {
            let step = &change.steps[index];
            if !matches!(step.state, StepState::Started | StepState::Done) {
                continue;
            }
            match self.backends.restore(&step.component, &step.snapshot).await {
                Ok(()) => {
                    self.state.changes.get_mut(name).expect("in flight").steps[index].state =
                        StepState::Reverted;
                    self.save()?;
                }
                Err(e) => {
                    failure = Some(format!(
                        "restoring {} to {} failed: {e}",
                        step.component.name,
                        step.snapshot.version().unwrap_or("absent")
                    ));
                    break;
                }
            }
        }
        let change = self.state.changes.remove(name).expect("in flight");
        let reason = change.revert_reason.clone().unwrap_or_default();
        let previous = self.state.applied.get(name).cloned();
        let phase = if failure.is_some() {
            ComponentPhase::Failed
        } else {
            ComponentPhase::Reverted
        };
        let message = match &failure {
            Some(f) => format!("{reason}; {f}; needs an operator"),
            None => format!("{reason}; reverted to revision {}", change.from_revision),
        };
        self.state
            .failed_revisions
            .entry(name.to_string())
            .or_default()
            .insert(change.target.revision);
        self.state.applied.insert(
            name.to_string(),
            Applied {
                state: previous.map(|p| p.state).unwrap_or_else(|| AssignedState {
                    revision: change.from_revision,
                    spec: manifests::DesiredStateSpec {
                        components: vec![],
                        ..change.target.spec.clone()
                    },
                    ..change.target.clone()
                }),
                phase,
                healthy_since_ms: None,
                message: Some(message.clone()),
                probe_output: change.probe_output.clone(),
                log_tail: log_tail.clone(),
                culprit: change.culprit.clone(),
                reverted_revision: Some(change.target.revision),
            },
        );
        self.probes.retain(|(ds, _), _| ds != name);
        self.save()?;
        let mut full = message;
        if let Some(output) = &change.probe_output {
            full.push_str(&format!("\nprobe output: {output}"));
        }
        if !log_tail.is_empty() {
            full.push_str(&format!("\nlog tail:\n{}", log_tail.join("\n")));
        }
        self.event(
            EventType::Warning,
            if failure.is_some() {
                "RevertFailed"
            } else {
                "Reverted"
            },
            full,
            Some(name),
            Some(change.target.revision),
            change.culprit.as_deref(),
        );
        Ok(())
    }

    /// Runs the probes of one DesiredState that are due, plus the implicit alive probes of its services.
    async fn run_due_probes(
        &mut self,
        ds: &str,
        probes: &[Probe],
        components: &[Component],
        reset_period: bool,
    ) -> BTreeMap<String, ProbeRecord> {
        let now = Instant::now();
        let _ = reset_period;
        for probe in probes {
            let key = (ds.to_string(), probe.name.clone());
            let record = self
                .probes
                .entry(key.clone())
                .or_insert_with(|| ProbeRecord {
                    next_due: now,
                    period: Duration::from_secs(probe.period_seconds.max(1).into()),
                    threshold: probe.failure_threshold.max(1),
                    consecutive_failures: 0,
                    passes_since_change: 0,
                    last: None,
                });
            if record.next_due > now {
                continue;
            }
            let outcome = probe::run(probe, &self.http, &self.host).await;
            let record = self.probes.get_mut(&key).expect("inserted");
            record.next_due = Instant::now() + record.period;
            if outcome.passed {
                record.consecutive_failures = 0;
                record.passes_since_change += 1;
            } else {
                record.consecutive_failures += 1;
            }
            record.last = Some(outcome);
        }
        for component in components
            .iter()
            .filter(|c| c.kind == ComponentKind::Service && c.state == ComponentState::Present)
        {
            let key = (ds.to_string(), alive_name(&component.name));
            let record = self
                .probes
                .entry(key.clone())
                .or_insert_with(|| ProbeRecord {
                    next_due: now,
                    period: ALIVE_PERIOD,
                    threshold: ALIVE_THRESHOLD,
                    consecutive_failures: 0,
                    passes_since_change: 0,
                    last: None,
                });
            if record.next_due > now {
                continue;
            }
            let alive = self.backends.alive(component).await;
            let record = self.probes.get_mut(&key).expect("inserted");
            record.next_due = Instant::now() + record.period;
            match alive {
                Ok(()) => {
                    record.consecutive_failures = 0;
                    record.passes_since_change += 1;
                    record.last = Some(Outcome {
                        passed: true,
                        output: format!("{} running", component.name),
                    });
                }
                Err(output) => {
                    record.consecutive_failures += 1;
                    record.last = Some(Outcome {
                        passed: false,
                        output,
                    });
                }
            }
        }
        self.probes
            .iter()
            .filter(|((d, _), _)| d == ds)
            .map(|((_, p), r)| (p.clone(), r.clone()))
            .collect()
    }

    /// Probes of DesiredStates at rest: reported, never a reason to revert.
    async fn steady_probes(&mut self) {
        let at_rest: Vec<(String, Vec<Probe>, Vec<Component>)> = self
            .state
            .applied
            .iter()
            .filter(|(name, _)| !self.state.changes.contains_key(*name))
            .map(|(name, a)| {
                (
                    name.clone(),
                    a.state.spec.probes.clone(),
                    a.state.spec.components.clone(),
                )
            })
            .collect();
        for (name, probes, components) in at_rest {
            self.run_due_probes(&name, &probes, &components, false)
                .await;
        }
    }

    /// Builds the report the heartbeat sends.
    fn publish(&self, assignment: Option<&NodeAssignment>) {
        let mut report = NodeReport {
            nodelet_version: self.nodelet_version.clone(),
            observed_generation: assignment.map_or(0, |a| a.generation),
            host: Some(self.host.sample()),
            ..NodeReport::default()
        };
        let names: Vec<String> = self
            .state
            .applied
            .keys()
            .chain(self.state.changes.keys())
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for name in names {
            let (
                revision,
                phase,
                commit,
                healthy_since,
                spec,
                message,
                probe_output,
                log_tail,
                culprit,
            ) = match (self.state.changes.get(&name), self.state.applied.get(&name)) {
                (Some(change), _) => (
                    change.target.revision,
                    match change.phase {
                        ChangePhase::Applying => ComponentPhase::Applying,
                        ChangePhase::Verifying => ComponentPhase::Verifying,
                        ChangePhase::Baking => ComponentPhase::Healthy,
                        ChangePhase::Reverting => ComponentPhase::Reverting,
                    },
                    change.target.commit.clone(),
                    change.healthy_at_ms.map(ms_to_time),
                    &change.target.spec,
                    change.revert_reason.clone(),
                    change.probe_output.clone(),
                    vec![],
                    change.culprit.clone(),
                ),
                (None, Some(applied)) => (
                    applied.reverted_revision.unwrap_or(applied.state.revision),
                    applied.phase,
                    applied.state.commit.clone(),
                    applied.healthy_since_ms.map(ms_to_time),
                    &applied.state.spec,
                    applied.message.clone(),
                    applied.probe_output.clone(),
                    applied.log_tail.clone(),
                    applied.culprit.clone(),
                ),
                (None, None) => continue,
            };
            report.applied.push(AppliedState {
                desired_state: name.clone(),
                revision,
                phase,
                commit,
                healthy_since,
            });
            // Components as the assignment wants them, with what is installed.
            let wanted = assignment
                .and_then(|a| a.states.iter().find(|s| s.name == name))
                .map(|s| &s.spec)
                .unwrap_or(spec);
            for component in &wanted.components {
                let is_culprit = culprit.as_deref() == Some(component.name.as_str());
                report.components.push(ComponentStatus {
                    name: component.name.clone(),
                    kind: component.kind,
                    desired_state: name.clone(),
                    revision,
                    desired_version: match component.state {
                        ComponentState::Present => component.version.clone(),
                        ComponentState::Absent => None,
                    },
                    version: self.installed.get(&component.name).cloned().flatten(),
                    phase,
                    message: if matches!(
                        phase,
                        ComponentPhase::Reverted
                            | ComponentPhase::Failed
                            | ComponentPhase::Reverting
                    ) {
                        message.clone()
                    } else {
                        None
                    },
                    probe_output: if is_culprit || culprit.is_none() {
                        probe_output.clone()
                    } else {
                        None
                    },
                    log_tail: if is_culprit { log_tail.clone() } else { vec![] },
                });
            }
            let baseline = self
                .state
                .changes
                .get(&name)
                .map(|c| c.baseline.clone())
                .unwrap_or_default();
            for ((ds, probe_name), record) in self.probes.iter().filter(|((ds, _), _)| ds == &name)
            {
                report.probes.push(ProbeStatus {
                    name: probe_name.clone(),
                    desired_state: ds.clone(),
                    passing: record.last.as_ref().is_some_and(|o| o.passed),
                    baseline_passing: baseline.get(probe_name).copied(),
                    consecutive_failures: record.consecutive_failures,
                    output: record
                        .last
                        .as_ref()
                        .map(|o| crate::command::tail(&o.output, 500))
                        .unwrap_or_default(),
                });
            }
        }
        report
            .probes
            .sort_by(|a, b| (&a.desired_state, &a.name).cmp(&(&b.desired_state, &b.name)));
        *self.shared.report.lock().expect("not poisoned") = report;
    }
}

/// The component a failing probe points at: the service of an alive probe; otherwise the
/// first service of the change (the likeliest cause of an HTTP or TCP regression).
fn culprit_of(probe: &str, change: &Change) -> Option<String> {
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

/// Follows the assignment: long polls, stores each new one, and hands it to the loop.
pub async fn follow<C: ApiClient>(
    client: Arc<C>,
    token: String,
    node: String,
    sender: watch::Sender<Option<NodeAssignment>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut since: Option<u64> = sender.borrow().as_ref().map(|a| a.generation);
    let mut backoff = Duration::from_secs(1);
    loop {
        let call = client.assignment(&token, &node, since, Duration::from_secs(30));
        let result = tokio::select! {
            result = call => result,
            _ = stop.changed() => return,
        };
        match result {
            Ok(assignment) => {
                backoff = Duration::from_secs(1);
                if Some(assignment.generation) != since {
                    since = Some(assignment.generation);
                    let _ = sender.send(Some(assignment));
                }
            }
            Err(e) => {
                if let ClientError::Rejected {
                    status: 401 | 403, ..
                } = e
                {
                    tracing::error!(error = %e, "the apiserver refuses this node's token; re-register with --join-token");
                } else {
                    tracing::warn!(error = %e, "cannot fetch the assignment; enforcing the last one");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Sends the report every `interval`, with the events recorded since the last delivery.
pub async fn heartbeat<C: ApiClient>(
    client: Arc<C>,
    token: String,
    node: String,
    shared: Arc<Shared>,
    dir: StateDir,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {
                if *stop.borrow() { return; }
            }
        }
        let mut report = shared.report.lock().expect("not poisoned").clone();
        let events = shared.events.lock().expect("not poisoned").clone();
        report.events = events.clone();
        match client.report(&token, &node, &report).await {
            Ok(()) => {
                // Drop exactly what was delivered; events recorded meanwhile stay queued.
                let mut queued = shared.events.lock().expect("not poisoned");
                let delivered = events.len().min(queued.len());
                queued.drain(..delivered);
                let _ = dir.save_events(&queued);
            }
            Err(e) => {
                tracing::warn!(error = %e, queued = events.len(), "heartbeat failed; events stay queued")
            }
        }
    }
}
