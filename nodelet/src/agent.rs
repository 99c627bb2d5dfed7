//! The reconcile loop: observe, decide (`lifecycle::decide`), act — never blocked by the work.
//!
//! One task owns the node state. Everything slow runs beside it: each change's current
//! action (baseline and downloads, a step, a restore) in a worker task of its own, and every
//! probe in a task of its own, on the probe's own period. The loop only reads their results,
//! asks `lifecycle::decide` what each change does next, writes the journal and starts the next
//! worker; so a download that hangs in one DesiredState never delays another's revert, probes
//! keep running while dpkg works, and SIGTERM is seen within a tick.
//!
//! Every transition is written to the journal before the action it announces, so after
//! `kill -9` the next start brings the services back as they ran, then resumes each change
//! where `lifecycle::resume` says. Nothing here needs the apiserver: the last assignment is on
//! disk, events queue up (bounded), and reports resume when it answers again.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use manifests::wire::*;
use manifests::{Component, ComponentKind, ComponentState, Probe};
use tokio::sync::{mpsc, watch};

use crate::artifact::{ArtifactCache, ArtifactError};
use crate::backend::Backends;
use crate::client::{ApiClient, ClientError};
use crate::host::HostSampler;
use crate::journal::{Action, Applied, Change, ChangePhase, Failure, NodeState, StateDir, Step};
use crate::lifecycle::{self, alive_name, Decision, Observations, Outcome, ProbeView};
use crate::probe;

/// How often the loop wakes when nothing happens.
const TICK: Duration = Duration::from_millis(250);
/// Implicit "is it running" probe of every service: period and threshold.
const ALIVE_PERIOD: Duration = Duration::from_secs(1);
const ALIVE_THRESHOLD: u32 = 3;
/// On SIGTERM, how long a running step may take to finish before it is abandoned (the journal
/// says Started, so the next start runs it again).
const STOP_GRACE: Duration = Duration::from_secs(2);
/// A change refused for lack of disk space is tried again after this long.
const NO_SPACE_RETRY: Duration = Duration::from_secs(30);
/// The longest text a report carries per field (messages, probe output), and per log line:
/// a service that prints megabyte lines cannot push a report past the body limit.
const REPORT_TEXT: usize = 4 * 1024;
const REPORT_LINE: usize = 500;
const REPORT_LINES: usize = 20;

/// A log tail as a report carries it: the last lines, each cut to a bounded length.
fn report_lines(lines: &[String]) -> Vec<String> {
    lines[lines.len().saturating_sub(REPORT_LINES)..]
        .iter()
        .map(|l| crate::command::tail(l, REPORT_LINE))
        .collect()
}

/// How often free space is looked at.
const DISK_CHECK: Duration = Duration::from_secs(5);
/// A write that failed for lack of space keeps the DiskPressure condition up this long.
const NO_SPACE_MEMORY: Duration = Duration::from_secs(60);
/// Events kept in memory (and on disk) while the apiserver is unreachable.
pub const MAX_QUEUED_EVENTS: usize = 500;
/// Events sent in one report, and the longest message: a report stays far below the
/// apiserver's body limit (4 MiB by default) however long the node was offline.
pub const EVENTS_PER_REPORT: usize = 100;
const MAX_EVENT_MESSAGE: usize = 8 * 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Events not yet delivered: bounded; when full, the oldest Normal event goes first (Warnings
/// explain failures and are kept longest), and what was dropped is counted and reported.
#[derive(Debug, Default)]
pub struct EventQueue {
    events: VecDeque<NodeEvent>,
    dropped: u64,
}

impl EventQueue {
    /// A queue holding what was stored (newest kept if it was over the bound).
    pub fn from_stored(stored: Vec<NodeEvent>) -> Self {
        let mut queue = EventQueue::default();
        for event in stored {
            queue.push(event);
        }
        queue
    }

    /// Adds an event, dropping the oldest Normal one (or the oldest of all) when full.
    pub fn push(&mut self, mut event: NodeEvent) {
        if event.message.len() > MAX_EVENT_MESSAGE {
            event.message = crate::command::tail(&event.message, MAX_EVENT_MESSAGE);
        }
        if self.events.len() >= MAX_QUEUED_EVENTS {
            let victim = self
                .events
                .iter()
                .position(|e| e.kind == EventType::Normal)
                .unwrap_or(0);
            self.events.remove(victim);
            self.dropped += 1;
        }
        self.events.push_back(event);
    }

    /// The oldest `n` events (at most one report's worth).
    pub fn batch(&self, n: usize) -> Vec<NodeEvent> {
        self.events
            .iter()
            .take(n.min(EVENTS_PER_REPORT))
            .cloned()
            .collect()
    }

    /// Forgets the `delivered` oldest events; after the first delivery following drops,
    /// queues one event saying how many were lost.
    pub fn delivered(&mut self, batch: &[NodeEvent]) {
        // Only what is still at the front: events dropped meanwhile are not delivered twice.
        let mut n = 0;
        while n < batch.len() && self.events.front() == Some(&batch[n]) {
            self.events.pop_front();
            n += 1;
        }
        if self.dropped > 0 {
            let dropped = std::mem::take(&mut self.dropped);
            self.push(NodeEvent {
                time: SystemTime::now(),
                kind: EventType::Warning,
                reason: "EventsDropped".into(),
                message: format!(
                    "{dropped} older events were dropped while the apiserver was unreachable (the node keeps {MAX_QUEUED_EVENTS})"
                ),
                desired_state: None,
                revision: None,
                component: None,
            });
        }
    }

    /// How many are waiting.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn snapshot(&self) -> Vec<NodeEvent> {
        self.events.iter().cloned().collect()
    }
}

/// What the heartbeat sends, kept fresh by the loop.
#[derive(Default)]
pub struct Shared {
    /// The latest report (events excluded).
    pub report: Mutex<NodeReport>,
    /// Events not yet delivered.
    pub events: Mutex<EventQueue>,
}

/// What workers and probe tasks share with the loop.
pub struct Context {
    /// The backends.
    pub backends: Backends,
    /// The artifact cache.
    pub artifacts: ArtifactCache,
    /// Host metrics (resource probes, reports).
    pub host: Arc<HostSampler>,
    /// For http probes.
    pub http: reqwest::Client,
    /// dpkg and modprobe/depmod change machine-wide state: one such step at a time.
    serial: tokio::sync::Mutex<()>,
}

/// One probe's running record.
#[derive(Debug, Clone)]
struct ProbeRecord {
    /// Identifies this record: a result of a task started for an older record is dropped.
    epoch: u64,
    next_due: Instant,
    period: Duration,
    threshold: u32,
    consecutive_failures: u32,
    passes: u32,
    running: bool,
    last: Option<probe::Outcome>,
}

impl ProbeRecord {
    fn view(&self) -> ProbeView {
        ProbeView {
            consecutive_failures: self.consecutive_failures,
            threshold: self.threshold,
            passes: self.passes,
            output: self
                .last
                .as_ref()
                .map(|o| o.output.clone())
                .unwrap_or_default(),
        }
    }
}

type ProbeKey = (String, String);

/// What a probe task sends back.
struct ProbeResult {
    key: ProbeKey,
    epoch: u64,
    outcome: probe::Outcome,
}

/// What a worker sends back.
struct WorkerResult {
    desired_state: String,
    revision: u64,
    outcome: Outcome,
}

struct Worker {
    revision: u64,
    /// What it does: what to report if it dies without a result (a panic in a backend).
    work: Work,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy)]
enum Work {
    Prepare,
    Step(usize),
    Restore(usize),
}

impl Work {
    /// The result of a worker that ended without one.
    fn died(self, name: &str) -> Outcome {
        let reason = format!(
            "the nodelet's worker for {name} ended without a result (a bug: see the nodelet's log)"
        );
        let failure = Failure {
            reason: reason.clone(),
            component: None,
            no_space: false,
        };
        match self {
            Work::Prepare => Outcome::PrepareFailed(failure),
            Work::Step(i) => Outcome::StepFailed(i, failure),
            Work::Restore(i) => Outcome::RestoreFailed(i, reason),
        }
    }
}

/// Node-wide settings of the loop.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The managed root (its disk is watched besides the state dir's).
    pub root: PathBuf,
    /// Below this many free bytes on either disk, the node reports DiskPressure.
    pub min_free_bytes: u64,
    /// Previous versions kept per component (unpacked services, `.deb`, `.ko`) for reverts.
    pub keep_versions: usize,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            root: PathBuf::from("/"),
            min_free_bytes: 64 * 1024 * 1024,
            keep_versions: 3,
        }
    }
}

/// What the loop knows about free space.
#[derive(Debug, Default)]
struct DiskWatch {
    /// The condition's message while it holds.
    pressure: Option<String>,
    last_check: Option<Instant>,
    /// Unix ms of the last write that failed for lack of space.
    no_space_at_ms: std::sync::atomic::AtomicU64,
}

/// The agent.
pub struct Agent {
    ctx: Arc<Context>,
    dir: StateDir,
    state: NodeState,
    assignment: Option<NodeAssignment>,
    probes: HashMap<ProbeKey, ProbeRecord>,
    probe_epoch: u64,
    probe_tx: mpsc::UnboundedSender<ProbeResult>,
    probe_rx: mpsc::UnboundedReceiver<ProbeResult>,
    workers: HashMap<String, Worker>,
    worker_tx: mpsc::UnboundedSender<WorkerResult>,
    worker_rx: mpsc::UnboundedReceiver<WorkerResult>,
    installed: BTreeMap<String, Option<String>>,
    /// Components whose inventory failed this tick (a backend error, or dpkg busy with the
    /// package): their DesiredStates are left alone until a tick can read them.
    unknown: BTreeSet<String>,
    /// DesiredStates refused for lack of disk space: not before this Unix ms.
    retry_after: HashMap<String, u64>,
    shared: Arc<Shared>,
    nodelet_version: String,
    vars: BTreeMap<String, String>,
    stopping: bool,
    settings: AgentSettings,
    disk: DiskWatch,
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
        *shared.events.lock().expect("not poisoned") = EventQueue::from_stored(dir.load_events()?);
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let (worker_tx, worker_rx) = mpsc::unbounded_channel();
        Ok(Agent {
            ctx: Arc::new(Context {
                backends,
                artifacts,
                host,
                http: reqwest::Client::builder()
                    .build()
                    .map_err(|e| e.to_string())?,
                serial: tokio::sync::Mutex::new(()),
            }),
            dir,
            state,
            assignment,
            probes: HashMap::new(),
            probe_epoch: 0,
            probe_tx,
            probe_rx,
            workers: HashMap::new(),
            worker_tx,
            worker_rx,
            installed: BTreeMap::new(),
            unknown: BTreeSet::new(),
            retry_after: HashMap::new(),
            shared,
            nodelet_version: env!("CARGO_PKG_VERSION").to_string(),
            vars: BTreeMap::new(),
            stopping: false,
            settings: AgentSettings::default(),
            disk: DiskWatch::default(),
        })
    }

    /// Node variables filled into every assigned spec (see `plan::interpolate`).
    pub fn with_vars(mut self, vars: BTreeMap<String, String>) -> Self {
        self.vars = vars;
        self
    }

    /// Node-wide settings (root, free-space floor, versions kept).
    pub fn with_settings(mut self, settings: AgentSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The durable state (for tests and reports).
    pub fn state(&self) -> &NodeState {
        &self.state
    }

    /// Writes the journal. A failure (a full disk) is reported and returned: forward steps
    /// do not run without their journal entry; reverts go on regardless.
    fn save(&self) -> Result<(), String> {
        self.dir.save(&self.state).inspect_err(|e| {
            tracing::error!(error = %e, "cannot write the journal");
            if e.contains("No space left") {
                self.no_space();
            }
        })
    }

    /// Remembers that a write failed for lack of space (DiskPressure for a while).
    fn no_space(&self) {
        self.disk
            .no_space_at_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Looks at free space every few seconds; raises and clears DiskPressure with an event.
    fn check_disk(&mut self) {
        let now = Instant::now();
        if self
            .disk
            .last_check
            .is_some_and(|t| now.duration_since(t) < DISK_CHECK)
        {
            return;
        }
        self.disk.last_check = Some(now);
        let mut short = Vec::new();
        for path in [self.dir.path().to_path_buf(), self.settings.root.clone()] {
            if let Some(free) = crate::host::free_bytes(&path) {
                if free < self.settings.min_free_bytes {
                    short.push(format!(
                        "{} MiB free under {} (the floor is {} MiB)",
                        free / (1024 * 1024),
                        path.display(),
                        self.settings.min_free_bytes / (1024 * 1024)
                    ));
                }
            }
        }
        let failed_at = self
            .disk
            .no_space_at_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if failed_at != 0 && now_ms().saturating_sub(failed_at) < NO_SPACE_MEMORY.as_millis() as u64
        {
            short.push("a write failed: no space left on device".into());
        }
        short.dedup();
        let pressure = (!short.is_empty()).then(|| short.join("; "));
        match (&self.disk.pressure, &pressure) {
            (None, Some(message)) => self.event(
                EventType::Warning,
                "DiskPressure",
                format!("{message}; running services are left alone, new downloads wait"),
                None,
                None,
                None,
            ),
            (Some(_), None) => self.event(
                EventType::Normal,
                "DiskPressureCleared",
                "enough free space again".into(),
                None,
                None,
                None,
            ),
            _ => {}
        }
        self.disk.pressure = pressure;
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
        let _ = self.dir.save_events(&events.snapshot());
    }

    /// Brings services back after a start (reboot or nodelet restart) as they ran when the
    /// nodelet stopped — also those of a change in flight — then resumes every change.
    pub async fn start(&mut self) -> Result<(), String> {
        if let Some(supervisor) = self.ctx.backends.service.supervisor() {
            supervisor.reap_orphans();
        }
        // The components a change in flight targets come first: with their settings, as a
        // fallback for a version whose recorded settings are missing.
        let mut services: BTreeMap<String, Component> = BTreeMap::new();
        let targets = self.state.changes.values().map(|c| &c.target.spec);
        let applied = self.state.applied.values().map(|a| &a.state.spec);
        for spec in targets.chain(applied) {
            for component in spec
                .components
                .iter()
                .filter(|c| c.kind == ComponentKind::Service && c.state == ComponentState::Present)
            {
                services
                    .entry(component.name.clone())
                    .or_insert_with(|| component.clone());
            }
        }
        for component in services.values() {
            // Whatever `current` points at runs again, as it last ran: the old version before
            // its step, the new one after.
            if let Err(e) = self.ctx.backends.service.ensure_running(component).await {
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
            let now = now_ms();
            let mut names = Vec::new();
            for (name, change) in self.state.changes.iter_mut() {
                let settle = settle_ms(change);
                lifecycle::resume(change, now, settle);
                names.push(format!("{name} ({:?})", change.phase));
            }
            let _ = self.save();
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
        let mut pending_results = Vec::new();
        loop {
            if let Some(mut assignment) = assignments.borrow_and_update().clone() {
                for state in &mut assignment.states {
                    crate::plan::interpolate(&mut state.spec, &self.vars);
                }
                if self.assignment.as_ref().map(|a| a.generation) != Some(assignment.generation) {
                    if let Err(e) = self.dir.save_assignment(&assignment) {
                        // Enforced from memory; on disk it is stored with the next one.
                        tracing::error!(error = %e, "cannot store the assignment");
                    }
                    self.assignment = Some(assignment);
                }
            }
            self.tick(std::mem::take(&mut pending_results)).await;
            tokio::select! {
                _ = assignments.changed() => {}
                _ = tokio::time::sleep(TICK) => {}
                Some(result) = self.worker_rx.recv() => pending_results.push(result),
                _ = stop.changed() => {
                    if *stop.borrow() {
                        self.shutdown().await;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Stops starting work, lets running steps finish for a short grace, abandons the rest
    /// (the journal resumes them), and writes the journal once more.
    async fn shutdown(&mut self) {
        self.stopping = true;
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, self.worker_rx.recv()).await {
                Ok(Some(result)) => self.absorb(vec![result]),
                _ => break,
            }
        }
        for (name, worker) in self.workers.drain() {
            tracing::warn!(desired_state = %name, "abandoning a running step at shutdown; it runs again at the next start");
            worker.task.abort();
        }
        let _ = self.save();
    }

    /// Folds worker results into their changes.
    fn absorb(&mut self, results: Vec<WorkerResult>) {
        let mut results = results;
        // Workers that ended, noted before the channel is drained: a result is sent before its
        // task ends, so one still unaccounted for after the drain never sent it (it panicked).
        let ended: Vec<(String, u64, Work)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.task.is_finished())
            .map(|(name, w)| (name.clone(), w.revision, w.work))
            .collect();
        while let Ok(result) = self.worker_rx.try_recv() {
            results.push(result);
        }
        for (name, revision, work) in ended {
            let reported = results
                .iter()
                .any(|r| r.desired_state == name && r.revision == revision);
            if !reported {
                tracing::error!(desired_state = %name, ?work, "a worker ended without a result");
                results.push(WorkerResult {
                    outcome: work.died(&name),
                    desired_state: name,
                    revision,
                });
            }
        }
        for result in results {
            if self
                .workers
                .get(&result.desired_state)
                .is_some_and(|w| w.revision == result.revision)
            {
                self.workers.remove(&result.desired_state);
            }
            let Some(change) = self.state.changes.get_mut(&result.desired_state) else {
                continue;
            };
            if change.target.revision != result.revision {
                continue;
            }
            let short_of_space = matches!(
                &result.outcome,
                Outcome::PrepareFailed(f) | Outcome::StepFailed(_, f) if f.no_space
            );
            lifecycle::record(change, result.outcome);
            if short_of_space {
                self.no_space();
            }
            let _ = self.save();
        }
    }

    fn absorb_probes(&mut self) {
        let now = Instant::now();
        while let Ok(result) = self.probe_rx.try_recv() {
            let Some(record) = self.probes.get_mut(&result.key) else {
                continue;
            };
            if record.epoch != result.epoch {
                continue;
            }
            record.running = false;
            record.next_due = now + record.period;
            if result.outcome.passed {
                record.consecutive_failures = 0;
                record.passes += 1;
            } else {
                record.consecutive_failures += 1;
            }
            record.last = Some(result.outcome);
        }
    }

    /// One pass: fold in results, advance every change, start new ones, schedule probes,
    /// publish the report. Never waits for a step or a probe.
    async fn tick(&mut self, results: Vec<WorkerResult>) {
        self.absorb(results);
        self.absorb_probes();
        let assignment = self.assignment.clone();
        self.inventory(assignment.as_ref()).await;
        // Every change in flight, before new ones start: a withdrawn revision is dropped
        // (Pending) or starts going back (later phases) in this tick.
        let in_flight: Vec<String> = self.state.changes.keys().cloned().collect();
        for name in in_flight {
            self.advance(&name);
        }
        if let Some(assignment) = &assignment {
            if !self.stopping {
                for target in &assignment.states {
                    if self.state.changes.contains_key(&target.name) {
                        continue;
                    }
                    self.reconcile_state(target);
                }
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
                let before = self
                    .state
                    .applied
                    .remove(&name)
                    .map(|a| a.state.spec.components)
                    .unwrap_or_default();
                self.reset_probes(&name);
                let _ = self.save();
                self.let_go(&name, &before, None);
            }
            self.sweep_conflicts();
        }
        self.check_disk();
        self.schedule_probes();
        self.publish(assignment.as_ref());
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
        let mut unknown = BTreeSet::new();
        for component in components {
            if installed.contains_key(&component.name) {
                continue;
            }
            // A version that cannot be read is not "absent": acting on it would reinstall
            // over whatever is going on (an operator's dpkg run, a backend error).
            let version = match self.ctx.backends.current(&component).await {
                Ok(version) => version,
                Err(e) => {
                    tracing::debug!(component = %component.name, error = %e, "inventory failed; leaving its DesiredState alone this tick");
                    unknown.insert(component.name.clone());
                    None
                }
            };
            installed.insert(component.name.clone(), version);
        }
        self.installed = installed;
        self.unknown = unknown;
    }

    /// Starts a change when a DesiredState's components are not what its revision pins.
    fn reconcile_state(&mut self, target: &AssignedState) {
        let failed = self
            .state
            .failed_revisions
            .get(&target.name)
            .is_some_and(|r| r.contains(&target.revision));
        if failed {
            return; // reverted here before: wait for a different revision
        }
        if self
            .retry_after
            .get(&target.name)
            .is_some_and(|t| now_ms() < *t)
        {
            return; // refused for lack of space a moment ago
        }
        if target
            .spec
            .components
            .iter()
            .any(|c| self.unknown.contains(&c.name))
        {
            return; // the inventory could not read it: next tick
        }
        let steps = crate::plan::steps(&target.spec.components, &self.installed);
        let applied = self.state.applied.get(&target.name);
        // The same revision can come with another spec: the apiserver strips a component that
        // two DesiredStates pin (a conflict), and gives it back when one lets go of it.
        let in_force =
            applied.is_some_and(|a| a.state == *target && a.phase == ComponentPhase::Healthy);
        if steps.is_empty() {
            if !in_force {
                // Nothing to install (only probes or rollout settings changed, or a component
                // left the spec): adopt the revision.
                let before = applied
                    .map(|a| a.state.spec.components.clone())
                    .unwrap_or_default();
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
                        touched: vec![],
                    },
                );
                let _ = self.save();
                self.let_go(&target.name, &before, Some(&target.spec));
            }
            return;
        }
        if in_force {
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
        self.begin(target.clone(), steps);
    }

    /// Journals a new change, Pending: nothing is touched until it is prepared.
    fn begin(&mut self, target: AssignedState, steps: Vec<(Component, Action)>) {
        let name = target.name.clone();
        let from_revision = self
            .state
            .applied
            .get(&name)
            .map_or(0, |a| a.state.revision);
        let summary = steps
            .iter()
            .map(|(c, a)| format!("{:?} {} {}", a, c.name, c.version.as_deref().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(", ");
        let revision = target.revision;
        let change = Change {
            target,
            from_revision,
            phase: ChangePhase::Pending,
            steps: steps
                .into_iter()
                .map(|(component, action)| Step {
                    component,
                    action,
                    snapshot: None,
                    state: crate::journal::StepState::Pending,
                })
                .collect(),
            baseline: BTreeMap::new(),
            applied_at_ms: 0,
            healthy_at_ms: None,
            revert_reason: None,
            probe_output: None,
            culprit: None,
            phase_since_ms: now_ms(),
            prepared: false,
            failure: None,
            settle_until_ms: None,
            revert_failure: None,
            log_tail: vec![],
            withdrawn: false,
        };
        self.state.changes.insert(name.clone(), change);
        if let Err(e) = self.save() {
            // Without its journal entry the change does not exist: nothing is touched, and it
            // is tried again later (typically the disk is full).
            self.state.changes.remove(&name);
            self.did_not_stick(&name, revision, true);
            self.event(
                EventType::Warning,
                "DiskPressure",
                format!(
                    "revision {revision} waits, nothing was changed: {e}; tried again in {}s",
                    NO_SPACE_RETRY.as_secs()
                ),
                Some(&name),
                Some(revision),
                None,
            );
            return;
        }
        self.event(
            EventType::Normal,
            "Applying",
            format!("revision {from_revision} → {revision}: {summary}"),
            Some(&name),
            Some(revision),
            None,
        );
        self.advance(&name);
    }

    /// Observes one change, decides, acts.
    fn advance(&mut self, name: &str) {
        let Some(change) = self.state.changes.get(name) else {
            return;
        };
        let observations = Observations {
            now_ms: now_ms(),
            busy: self.workers.contains_key(name),
            probes: self.probe_views(name),
            stopping: self.stopping,
            withdrawn: withdrawn(self.assignment.as_ref(), name, change.target.revision),
        };
        let decision = lifecycle::decide(change, &observations);
        if decision != Decision::Wait {
            tracing::debug!(desired_state = name, ?decision, "decided");
        }
        self.act(name, decision, observations.now_ms);
    }

    fn act(&mut self, name: &str, decision: Decision, now: u64) {
        let change = self.state.changes.get_mut(name).expect("in flight");
        let revision = change.target.revision;
        let was = change.phase;
        if let Some(next) = lifecycle::transition(change.phase, &decision) {
            lifecycle::enter(change, next, now);
        }
        match decision {
            Decision::Wait => {}
            Decision::Prepare => {
                let change = change.clone();
                self.spawn(
                    name,
                    revision,
                    Work::Prepare,
                    prepare(self.ctx.clone(), change),
                );
            }
            Decision::RunStep(i) => {
                let Some(step) = change.steps.get_mut(i) else {
                    return; // decide names existing steps only
                };
                step.state = crate::journal::StepState::Started;
                let step = step.clone();
                if let Err(e) = self.save() {
                    // No step without its journal entry. Waiting would leave the steps done
                    // so far running unprobed for as long as the disk stays full: go back.
                    let change = self.state.changes.get_mut(name).expect("in flight");
                    change.steps[i].state = crate::journal::StepState::Pending;
                    change.failure = Some(Failure {
                        reason: format!("cannot journal the step: {e}"),
                        component: Some(step.component.name.clone()),
                        no_space: e.contains("No space left"),
                    });
                    self.advance(name);
                    return;
                }
                self.spawn(
                    name,
                    revision,
                    Work::Step(i),
                    run_step(self.ctx.clone(), i, step),
                );
            }
            Decision::Verify => {
                change.applied_at_ms = now;
                let _ = self.save();
                // Fresh probe records: failures before the change do not count after it.
                self.reset_probes(name);
                self.event(
                    EventType::Normal,
                    "Applied",
                    format!("revision {revision} applied; verifying"),
                    Some(name),
                    Some(revision),
                    None,
                );
            }
            Decision::Bake => {
                let bake = change.target.spec.rollout.bake_seconds;
                let _ = self.save();
                self.event(
                    EventType::Normal,
                    "Healthy",
                    format!("revision {revision} healthy; watching for {bake}s"),
                    Some(name),
                    Some(revision),
                    None,
                );
            }
            Decision::Commit => self.commit(name),
            Decision::Revert(cause) => {
                change.revert_reason = Some(cause.reason.clone());
                change.probe_output = cause.probe_output;
                change.culprit = cause.culprit;
                change.withdrawn = cause.withdrawn;
                // The culprit's log, read before its process is replaced.
                let culprit = change
                    .culprit
                    .as_ref()
                    .and_then(|c| change.target.spec.components.iter().find(|x| &x.name == c))
                    .cloned();
                if let Some(component) = culprit {
                    change.log_tail = report_lines(&self.ctx.backends.log_tail(&component));
                }
                let from = change.from_revision;
                let culprit = change.culprit.clone();
                // A revert goes on even when the journal cannot be written (a full disk).
                let _ = self.save();
                if cause.withdrawn {
                    let back = match from {
                        0 => "removing what it installed".to_string(),
                        from => format!("putting back revision {from}"),
                    };
                    self.event(
                        EventType::Normal,
                        "Withdrawn",
                        format!("{} while {was:?}; {back} at once", cause.reason),
                        Some(name),
                        Some(revision),
                        None,
                    );
                } else {
                    // The component the event names is the one to blame.
                    self.event(
                        EventType::Warning,
                        "Reverting",
                        format!("revision {revision}: {}", cause.reason),
                        Some(name),
                        Some(revision),
                        culprit.as_deref(),
                    );
                }
                self.advance(name);
            }
            Decision::RestoreStep(i) => {
                let Some(step) = change.steps.get(i).cloned() else {
                    return; // decide names existing steps only
                };
                self.spawn(
                    name,
                    revision,
                    Work::Restore(i),
                    restore_step(self.ctx.clone(), i, step),
                );
            }
            Decision::FinishRevert => self.finish_revert(name),
            Decision::Refuse(failure) => self.refuse(name, failure),
            Decision::Drop => self.drop_change(name),
        }
    }

    /// A change that touched nothing yet (Pending) whose revision was withdrawn is forgotten,
    /// its download abandoned: a fixed revision never waits for a stalled download of the
    /// broken one.
    fn drop_change(&mut self, name: &str) {
        if let Some(worker) = self.workers.remove(name) {
            worker.task.abort();
        }
        let Some(change) = self.state.changes.remove(name) else {
            return;
        };
        let _ = self.save();
        self.event(
            EventType::Normal,
            "Superseded",
            format!(
                "revision {} was withdrawn by the apiserver before anything changed; dropped",
                change.target.revision
            ),
            Some(name),
            Some(change.target.revision),
            None,
        );
    }

    fn spawn(
        &mut self,
        name: &str,
        revision: u64,
        what: Work,
        work: impl std::future::Future<Output = Outcome> + Send + 'static,
    ) {
        let tx = self.worker_tx.clone();
        let desired_state = name.to_string();
        let task = tokio::spawn(async move {
            let outcome = work.await;
            let _ = tx.send(WorkerResult {
                desired_state,
                revision,
                outcome,
            });
        });
        self.workers.insert(
            name.to_string(),
            Worker {
                revision,
                work: what,
                task,
            },
        );
    }

    /// A change refused before anything was touched: reported like a revert (nothing to undo).
    /// For lack of disk space it is tried again later instead of being marked failed.
    fn refuse(&mut self, name: &str, failure: Failure) {
        let change = self.state.changes.remove(name).expect("in flight");
        let target = &change.target;
        let component = failure.component.clone().unwrap_or_default();
        let message = format!("{component}: {}", failure.reason);
        if failure.no_space {
            self.no_space();
        }
        self.did_not_stick(name, target.revision, failure.no_space);
        self.state.applied.insert(
            name.to_string(),
            Applied {
                state: self.state_before(name, &change),
                phase: ComponentPhase::Reverted,
                healthy_since_ms: None,
                message: Some(message.clone()),
                probe_output: None,
                log_tail: vec![],
                culprit: failure.component.clone(),
                reverted_revision: Some(target.revision),
                touched: vec![],
            },
        );
        let _ = self.save();
        self.event(
            EventType::Warning,
            if failure.no_space {
                "DiskPressure"
            } else {
                "Reverted"
            },
            if failure.no_space {
                format!(
                    "revision {} waits for disk space, nothing was changed: {message}; tried again in {}s",
                    target.revision,
                    NO_SPACE_RETRY.as_secs()
                )
            } else {
                format!(
                    "revision {} refused, nothing was changed: {message}",
                    target.revision
                )
            },
            Some(name),
            Some(target.revision),
            failure.component.as_deref(),
        );
    }

    /// What the node runs after a change that did not stick: the revision in force before it,
    /// or, when nothing was there before, none of this DesiredState's components.
    fn state_before(&self, name: &str, change: &Change) -> AssignedState {
        match self.state.applied.get(name) {
            Some(previous) => previous.state.clone(),
            None => AssignedState {
                revision: change.from_revision,
                spec: manifests::DesiredStateSpec {
                    components: vec![],
                    ..change.target.spec.clone()
                },
                ..change.target.clone()
            },
        }
    }

    /// A revision that did not stick is never retried automatically, unless it failed for
    /// lack of space, which says nothing about the release: then it is tried again later.
    fn did_not_stick(&mut self, name: &str, revision: u64, no_space: bool) {
        if no_space {
            self.retry_after.insert(
                name.to_string(),
                now_ms() + NO_SPACE_RETRY.as_millis() as u64,
            );
        } else {
            self.state
                .failed_revisions
                .entry(name.to_string())
                .or_default()
                .insert(revision);
        }
    }

    /// The bake is over: the change is the node's new normal.
    fn commit(&mut self, name: &str) {
        let change = self.state.changes.remove(name).expect("in flight");
        let before = self
            .state
            .applied
            .get(name)
            .map(|a| a.state.spec.components.clone())
            .unwrap_or_default();
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
                touched: vec![],
            },
        );
        let _ = self.save();
        self.prune(
            change.steps.iter().map(|s| s.component.clone()).collect(),
            vec![],
        );
        let revision = change.target.revision;
        if withdrawn(self.assignment.as_ref(), name, revision) {
            // A repair the apiserver moved on from (see `lifecycle::decide`).
            self.event(
                EventType::Normal,
                "Repaired",
                format!("revision {revision} is in force again; kept without its bake: another revision is assigned now"),
                Some(name),
                Some(revision),
                None,
            );
        } else {
            self.event(
                EventType::Normal,
                "Baked",
                format!(
                    "revision {revision} stayed healthy for {}s",
                    change.target.spec.rollout.bake_seconds
                ),
                Some(name),
                Some(revision),
                None,
            );
        }
        self.let_go(name, &before, Some(&change.target.spec));
    }

    /// Reports the components `name` stopped pinning on this node: its spec went from
    /// `before` to `after`, or (`after` None) it is no longer assigned. Only those that no
    /// DesiredState of the assignment manages now are called unmanaged; one that two of them
    /// pin is reported as in conflict, and remembered until the conflict is over
    /// (`sweep_conflicts`).
    fn let_go(
        &mut self,
        name: &str,
        before: &[Component],
        after: Option<&manifests::DesiredStateSpec>,
    ) {
        let Some(assignment) = &self.assignment else {
            return;
        };
        let left = before
            .iter()
            .filter(|c| after.is_none_or(|spec| !spec.components.iter().any(|x| x.name == c.name)))
            .map(|c| c.name.as_str());
        let standing = LetGo::of(left, assignment, name);
        let why = match after {
            None => "no longer assigned to this node",
            Some(_) => "not in its assigned spec any more",
        };
        if let Some((kind, reason, message)) = standing.event(why, after.is_none()) {
            self.event(kind, reason, message, Some(name), None, None);
        }
        if !standing.in_conflict.is_empty() {
            for (component, _) in standing.in_conflict {
                self.state.conflicted.insert(component, name.to_string());
            }
            let _ = self.save();
        }
    }

    /// Components let go of in a conflict, once the conflict is over: managed again by a
    /// DesiredState (nothing to say), or by none (reported unmanaged, left as installed).
    fn sweep_conflicts(&mut self) {
        let Some(assignment) = &self.assignment else {
            return;
        };
        let mut over = Vec::new();
        for (component, owner) in &self.state.conflicted {
            let standing = LetGo::of([component.as_str()], assignment, owner);
            if standing.in_conflict.is_empty() {
                over.push((component.clone(), owner.clone(), standing));
            }
        }
        if over.is_empty() {
            return;
        }
        for (component, owner, standing) in over {
            self.state.conflicted.remove(&component);
            if !standing.unmanaged.is_empty() {
                self.event(
                    EventType::Normal,
                    "Unmanaged",
                    format!("{component} left as installed: the conflict over it is over and no DesiredState on this node manages it now"),
                    Some(&owner),
                    None,
                    Some(&component),
                );
            }
        }
        let _ = self.save();
    }

    /// Every touched step is back (or one could not be put back): record how it ended.
    fn finish_revert(&mut self, name: &str) {
        let change = self.state.changes.remove(name).expect("in flight");
        let failure = change.revert_failure.clone();
        let log_tail = change.log_tail.clone();
        let phase = if failure.is_some() {
            ComponentPhase::Failed
        } else {
            ComponentPhase::Reverted
        };
        let message = lifecycle::revert_message(&change);
        // Withdrawn by the apiserver and back for sure: nothing failed, nothing to remember
        // (a withdrawn revision is not assigned again under its number; if it were, it would
        // apply). Reverted for lack of space: the release is not to blame, it is retried.
        let withdrawn = change.withdrawn && failure.is_none();
        if !withdrawn {
            let no_space = change.failure.as_ref().is_some_and(|f| f.no_space) && failure.is_none();
            self.did_not_stick(name, change.target.revision, no_space);
        }
        self.state.applied.insert(
            name.to_string(),
            Applied {
                state: self.state_before(name, &change),
                phase,
                healthy_since_ms: None,
                message: Some(message.clone()),
                probe_output: change.probe_output.clone(),
                log_tail: log_tail.clone(),
                culprit: change.culprit.clone(),
                reverted_revision: Some(change.target.revision),
                touched: lifecycle::touched(&change),
            },
        );
        self.reset_probes(name);
        let _ = self.save();
        // The failed release's unpacked folders are not kept (it is never retried by itself;
        // its artifact stays cached if it comes back under a new revision).
        let discard: Vec<(String, String)> = change
            .steps
            .iter()
            .filter(|s| s.component.kind == ComponentKind::Service && s.action != Action::Remove)
            .filter_map(|s| {
                let failed = s.component.version.clone()?;
                let back = s
                    .snapshot
                    .as_ref()
                    .and_then(|x| x.version())
                    .map(str::to_string);
                (back.as_deref() != Some(failed.as_str()))
                    .then(|| (s.component.name.clone(), failed))
            })
            .collect();
        if failure.is_none() {
            self.prune(vec![], discard);
        }
        let mut full = message;
        if let Some(output) = &change.probe_output {
            full.push_str(&format!("\nprobe output: {output}"));
        }
        if !log_tail.is_empty() {
            full.push_str(&format!("\nlog tail:\n{}", log_tail.join("\n")));
        }
        self.event(
            // A withdrawal that went back is what the apiserver asked for, not a failure.
            if withdrawn {
                EventType::Normal
            } else {
                EventType::Warning
            },
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
    }

    /// Removes what is no longer needed, beside the loop: kept versions of `components` beyond
    /// the installed one and the newest `keep_versions`, the `discard` service folders, and
    /// cached artifacts nothing assigned, applied or in flight refers to.
    fn prune(&self, components: Vec<Component>, discard: Vec<(String, String)>) {
        let ctx = self.ctx.clone();
        let keep = self.settings.keep_versions;
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        let specs = self
            .assignment
            .iter()
            .flat_map(|a| a.states.iter().map(|s| &s.spec))
            .chain(self.state.applied.values().map(|a| &a.state.spec))
            .chain(self.state.changes.values().map(|c| &c.target.spec));
        for spec in specs {
            for component in &spec.components {
                if let Some(artifact) = &component.artifact {
                    wanted.insert(artifact.sha256.to_ascii_lowercase());
                }
            }
        }
        tokio::spawn(async move {
            for (name, version) in discard {
                if let Err(e) = ctx.backends.service.discard_version(&name, &version) {
                    tracing::warn!(service = %name, version = %version, error = %e, "cannot remove a failed release's folder");
                }
            }
            for component in components
                .iter()
                .filter(|c| c.state == ComponentState::Present)
            {
                // `keep` counts the installed version too.
                ctx.backends
                    .prune_kept(component, &[], keep.saturating_sub(1).max(1))
                    .await;
            }
            let freed = ctx.artifacts.prune(&wanted);
            if freed > 0 {
                tracing::info!(bytes = freed, "pruned the artifact cache");
            }
        });
    }

    fn reset_probes(&mut self, ds: &str) {
        self.probes.retain(|(d, _), _| d != ds);
    }

    fn probe_views(&self, ds: &str) -> BTreeMap<String, ProbeView> {
        self.probes
            .iter()
            .filter(|((d, _), _)| d == ds)
            .map(|((_, p), r)| (p.clone(), r.view()))
            .collect()
    }

    /// What each DesiredState is probed for right now: the revision in force at rest (and
    /// while a change only prepares: nothing moved yet), the new revision while it verifies
    /// and bakes, nothing while components are being changed.
    fn probe_plan(&self) -> Vec<(String, Vec<Probe>, Vec<Component>)> {
        let mut plan = Vec::new();
        let names: BTreeSet<&String> = self
            .state
            .applied
            .keys()
            .chain(self.state.changes.keys())
            .collect();
        for name in names {
            let spec = match self.state.changes.get(name) {
                // Restarted services get their start time before anything is counted.
                Some(c) if c.settle_until_ms.is_some_and(|until| now_ms() < until) => None,
                Some(c) if matches!(c.phase, ChangePhase::Verifying | ChangePhase::Baking) => {
                    Some(&c.target.spec)
                }
                Some(c) if c.phase == ChangePhase::Pending => {
                    self.state.applied.get(name).map(|a| &a.state.spec)
                }
                Some(_) => None,
                None => self.state.applied.get(name).map(|a| &a.state.spec),
            };
            if let Some(spec) = spec {
                plan.push((name.clone(), spec.probes.clone(), spec.components.clone()));
            }
        }
        plan
    }

    /// Starts every probe that is due and not running, each in its own task.
    fn schedule_probes(&mut self) {
        if self.stopping {
            return;
        }
        let now = Instant::now();
        let plan = self.probe_plan();
        let mut wanted: BTreeSet<ProbeKey> = BTreeSet::new();
        for (ds, probes, components) in plan {
            for probe in probes {
                let key = (ds.clone(), probe.name.clone());
                wanted.insert(key.clone());
                let period = Duration::from_secs(probe.period_seconds.max(1).into());
                let threshold = probe.failure_threshold.max(1);
                if let Some(epoch) = self.due(&key, now, period, threshold) {
                    let ctx = self.ctx.clone();
                    // The probe's own time limit bounds it; the outer one is a backstop.
                    let limit = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)) + 5);
                    self.spawn_probe(key, epoch, async move {
                        match tokio::time::timeout(limit, probe::run(&probe, &ctx.http, &ctx.host))
                            .await
                        {
                            Ok(outcome) => outcome,
                            Err(_) => probe::Outcome {
                                passed: false,
                                output: format!("no result within {}s", limit.as_secs()),
                            },
                        }
                    });
                }
            }
            for component in components
                .into_iter()
                .filter(|c| c.kind == ComponentKind::Service && c.state == ComponentState::Present)
            {
                let key = (ds.clone(), alive_name(&component.name));
                wanted.insert(key.clone());
                if let Some(epoch) = self.due(&key, now, ALIVE_PERIOD, ALIVE_THRESHOLD) {
                    let ctx = self.ctx.clone();
                    self.spawn_probe(key, epoch, async move {
                        match ctx.backends.alive(&component).await {
                            Ok(()) => probe::Outcome {
                                passed: true,
                                output: format!("{} running", component.name),
                            },
                            Err(output) => probe::Outcome {
                                passed: false,
                                output,
                            },
                        }
                    });
                }
            }
        }
        // Probes no longer planned (a spec changed, a change is applying) are forgotten.
        self.probes.retain(|key, _| wanted.contains(key));
    }

    /// Runs one probe in a task of its own; its result comes back tagged with the record's epoch.
    fn spawn_probe(
        &self,
        key: ProbeKey,
        epoch: u64,
        run: impl std::future::Future<Output = probe::Outcome> + Send + 'static,
    ) {
        let tx = self.probe_tx.clone();
        tokio::spawn(async move {
            let outcome = run.await;
            let _ = tx.send(ProbeResult {
                key,
                epoch,
                outcome,
            });
        });
    }

    /// Marks `key` running and returns its epoch when it is due and idle.
    fn due(
        &mut self,
        key: &ProbeKey,
        now: Instant,
        period: Duration,
        threshold: u32,
    ) -> Option<u64> {
        let epoch = &mut self.probe_epoch;
        let record = self.probes.entry(key.clone()).or_insert_with(|| {
            *epoch += 1;
            ProbeRecord {
                epoch: *epoch,
                next_due: now,
                period,
                threshold,
                consecutive_failures: 0,
                passes: 0,
                running: false,
                last: None,
            }
        });
        record.period = period;
        record.threshold = threshold;
        if record.running || record.next_due > now {
            return None;
        }
        record.running = true;
        Some(record.epoch)
    }

    /// Builds the report the heartbeat sends.
    fn publish(&self, assignment: Option<&NodeAssignment>) {
        let mut report = NodeReport {
            nodelet_version: self.nodelet_version.clone(),
            observed_generation: assignment.map_or(0, |a| a.generation),
            host: Some(self.ctx.host.sample()),
            disk_pressure: self.disk.pressure.clone(),
            ..NodeReport::default()
        };
        let names: Vec<String> = self
            .state
            .applied
            .keys()
            .chain(self.state.changes.keys())
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for name in names {
            let standing = match (self.state.changes.get(&name), self.state.applied.get(&name)) {
                (Some(change), _) => Standing::of_change(change),
                (None, Some(applied)) => Standing::of_applied(applied),
                (None, None) => continue,
            };
            report.applied.push(AppliedState {
                desired_state: name.clone(),
                revision: standing.revision,
                phase: standing.phase,
                commit: standing.commit.clone(),
                healthy_since: standing.healthy_since,
            });
            // Components as the assignment wants them, with what is installed.
            let wanted = assignment
                .and_then(|a| a.states.iter().find(|s| s.name == name))
                .map(|s| &s.spec)
                .unwrap_or(standing.spec);
            for component in &wanted.components {
                let installed = self.installed.get(&component.name).cloned().flatten();
                report
                    .components
                    .push(standing.component(&name, component, installed));
            }
            let baseline = self
                .state
                .changes
                .get(&name)
                .map(|c| c.baseline.clone())
                .unwrap_or_default();
            for ((ds, probe_name), record) in self.probes.iter().filter(|((ds, _), _)| ds == &name)
            {
                let Some(last) = &record.last else {
                    continue; // not run yet: nothing to say
                };
                report.probes.push(ProbeStatus {
                    name: probe_name.clone(),
                    desired_state: ds.clone(),
                    passing: last.passed,
                    baseline_passing: baseline.get(probe_name).copied(),
                    consecutive_failures: record.consecutive_failures,
                    output: crate::command::tail(&last.output, 500),
                });
            }
        }
        report
            .probes
            .sort_by(|a, b| (&a.desired_state, &a.name).cmp(&(&b.desired_state, &b.name)));
        *self.shared.report.lock().expect("not poisoned") = report;
    }
}

/// Where the components one DesiredState let go of stand in the current assignment.
#[derive(Debug, Default, PartialEq, Eq)]
struct LetGo {
    /// Pinned by no DesiredState of the assignment: left as installed, managed by nobody.
    unmanaged: Vec<String>,
    /// Pinned by two or more DesiredStates (the assignment's conflicts): applied by none.
    in_conflict: Vec<(String, Vec<String>)>,
    /// Managed by another DesiredState of the assignment: (component, that DesiredState).
    elsewhere: Vec<(String, String)>,
}

impl LetGo {
    /// Sorts `components`, which `owner` no longer pins, by who manages them now.
    fn of<'a>(
        components: impl IntoIterator<Item = &'a str>,
        assignment: &NodeAssignment,
        owner: &str,
    ) -> Self {
        let mut out = LetGo::default();
        for component in components.into_iter().collect::<BTreeSet<_>>() {
            if let Some(conflict) = assignment
                .conflicts
                .iter()
                .find(|c| c.component == component)
            {
                out.in_conflict
                    .push((component.to_string(), conflict.desired_states.clone()));
            } else if let Some(other) = assignment
                .states
                .iter()
                .find(|s| s.name != owner && s.spec.components.iter().any(|c| c.name == component))
            {
                out.elsewhere
                    .push((component.to_string(), other.name.clone()));
            } else if !assignment
                .states
                .iter()
                .any(|s| s.spec.components.iter().any(|c| c.name == component))
            {
                out.unmanaged.push(component.to_string());
            }
        }
        out
    }

    /// The event that says so, if there is anything to say: `Unmanaged` names only the
    /// components nobody manages; a conflict alone is a `Conflict` warning; a DesiredState
    /// that is `gone` with nothing left unmanaged is `Unassigned`.
    fn event(&self, why: &str, gone: bool) -> Option<(EventType, &'static str, String)> {
        let mut parts = Vec::new();
        if !self.unmanaged.is_empty() {
            parts.push(format!(
                "{} left as installed: no DesiredState on this node manages {} now",
                self.unmanaged.join(", "),
                if self.unmanaged.len() == 1 {
                    "it"
                } else {
                    "them"
                }
            ));
        }
        for (component, owners) in &self.in_conflict {
            parts.push(format!(
                "{component} is in conflict: pinned by {}, applied by neither until one lets go of it",
                owners.join(" and ")
            ));
        }
        let (kind, reason) = if !self.unmanaged.is_empty() {
            (EventType::Normal, "Unmanaged")
        } else if !self.in_conflict.is_empty() {
            (EventType::Warning, "Conflict")
        } else if gone {
            (EventType::Normal, "Unassigned")
        } else {
            return None;
        };
        for (component, owner) in &self.elsewhere {
            parts.push(format!("{component} stays managed by {owner}"));
        }
        let message = if parts.is_empty() {
            why.to_string()
        } else {
            format!("{why}: {}", parts.join("; "))
        };
        Some((kind, reason, message))
    }
}

/// What the report says about one DesiredState: from its change in flight, or from what it
/// runs.
#[derive(Debug)]
struct Standing<'a> {
    revision: u64,
    phase: ComponentPhase,
    commit: Option<String>,
    healthy_since: Option<SystemTime>,
    spec: &'a manifests::DesiredStateSpec,
    message: Option<&'a str>,
    probe_output: Option<&'a str>,
    log_tail: &'a [String],
    culprit: Option<&'a str>,
    /// The components the change changed (see `lifecycle::touched`).
    touched: Vec<String>,
}

impl<'a> Standing<'a> {
    fn of_change(change: &'a Change) -> Self {
        Standing {
            revision: change.target.revision,
            phase: match change.phase {
                ChangePhase::Pending | ChangePhase::Applying => ComponentPhase::Applying,
                ChangePhase::Verifying => ComponentPhase::Verifying,
                ChangePhase::Baking => ComponentPhase::Healthy,
                ChangePhase::Reverting => ComponentPhase::Reverting,
            },
            commit: change.target.commit.clone(),
            healthy_since: change
                .healthy_at_ms
                .filter(|_| change.phase == ChangePhase::Baking)
                .map(ms_to_time),
            spec: &change.target.spec,
            message: change.revert_reason.as_deref(),
            probe_output: change.probe_output.as_deref(),
            log_tail: &change.log_tail,
            culprit: change.culprit.as_deref(),
            touched: lifecycle::touched(change),
        }
    }

    fn of_applied(applied: &'a Applied) -> Self {
        Standing {
            revision: applied.reverted_revision.unwrap_or(applied.state.revision),
            phase: applied.phase,
            commit: applied.state.commit.clone(),
            healthy_since: applied.healthy_since_ms.map(ms_to_time),
            spec: &applied.state.spec,
            message: applied.message.as_deref(),
            probe_output: applied.probe_output.as_deref(),
            log_tail: &applied.log_tail,
            culprit: applied.culprit.as_deref(),
            touched: applied.touched.clone(),
        }
    }

    /// Whether the DesiredState is going back, or went back.
    fn went_back(&self) -> bool {
        matches!(
            self.phase,
            ComponentPhase::Reverting | ComponentPhase::Reverted | ComponentPhase::Failed
        )
    }

    /// A component a revert is about: one the change changed, or the one named as the cause.
    /// (Nothing known, as in a journal written before this was recorded: every component.)
    fn blames(&self, component: &str) -> bool {
        let known = !self.touched.is_empty() || self.culprit.is_some();
        !known || self.culprit == Some(component) || self.touched.iter().any(|t| t == component)
    }

    /// One component's line in the report. A change that goes back blames only the
    /// components it changed (and the cause it names): they carry its phase and message, the
    /// culprit its probe output and log tail. The others of the DesiredState ran on as they
    /// were and are reported Healthy.
    fn component(
        &self,
        desired_state: &str,
        component: &Component,
        installed: Option<String>,
    ) -> ComponentStatus {
        let blamed = self.went_back() && self.blames(&component.name);
        let is_culprit = self.culprit == Some(component.name.as_str());
        let phase = if self.went_back() && !blamed {
            ComponentPhase::Healthy
        } else {
            self.phase
        };
        let text = |t: Option<&str>| t.map(|t| crate::command::tail(t, REPORT_TEXT));
        ComponentStatus {
            name: component.name.clone(),
            kind: component.kind,
            desired_state: desired_state.to_string(),
            revision: self.revision,
            desired_version: match component.state {
                ComponentState::Present => component.version.clone(),
                ComponentState::Absent => None,
            },
            version: installed,
            phase,
            message: if blamed { text(self.message) } else { None },
            probe_output: if blamed && (is_culprit || self.culprit.is_none()) {
                text(self.probe_output)
            } else {
                None
            },
            log_tail: if blamed && is_culprit {
                report_lines(self.log_tail)
            } else {
                vec![]
            },
        }
    }
}

/// Whether the apiserver withdrew `revision` of `desired_state`: the assignment holds another
/// revision of it, or does not assign it any more. Without an assignment (never received),
/// nothing is withdrawn: the node acts on what it stored.
fn withdrawn(assignment: Option<&NodeAssignment>, desired_state: &str, revision: u64) -> bool {
    assignment.is_some_and(|a| {
        a.states
            .iter()
            .find(|s| s.name == desired_state)
            .is_none_or(|s| s.revision != revision)
    })
}

/// How long restarted services of a change get before its probes count again: the longest
/// `startSeconds` among its services (what a step itself waits after starting one).
fn settle_ms(change: &Change) -> u64 {
    change
        .target
        .spec
        .components
        .iter()
        .filter_map(|c| c.service.as_ref())
        .map(|s| u64::from(s.start_seconds) * 1000)
        .max()
        .unwrap_or(0)
}

fn fetch_failure(component: &Component, error: &ArtifactError) -> Failure {
    Failure {
        reason: error.to_string(),
        component: Some(component.name.clone()),
        no_space: is_no_space(error),
    }
}

fn is_no_space(error: &ArtifactError) -> bool {
    match error {
        ArtifactError::NoSpace { .. } => true,
        ArtifactError::Io { source, .. } => source.raw_os_error() == Some(nix::libc::ENOSPC),
        _ => error.to_string().contains("No space left on device"),
    }
}

/// Pending's work: baseline probes (before anything changes), every artifact verified into the
/// cache, a snapshot of every component. Touches nothing on the node.
async fn prepare(ctx: Arc<Context>, change: Change) -> Outcome {
    let mut baseline = BTreeMap::new();
    let spec = &change.target.spec;
    let runs = spec
        .probes
        .iter()
        .map(|probe| probe::run(probe, &ctx.http, &ctx.host));
    let results = futures::future::join_all(runs).await;
    for (probe, outcome) in spec.probes.iter().zip(results) {
        baseline.insert(probe.name.clone(), outcome.passed);
    }
    for component in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Service)
    {
        // A service that is not installed yet has nothing to regress from: its alive probe
        // must pass after the change, so it counts as passing at baseline.
        let alive = ctx.backends.alive(component).await.is_ok();
        baseline.insert(alive_name(&component.name), alive);
    }
    // Artifacts first: a bad download or a wrong hash stops everything before anything is touched.
    for step in &change.steps {
        if step.action == Action::Remove {
            continue;
        }
        if let Some(artifact) = &step.component.artifact {
            if let Err(e) = ctx.artifacts.fetch(artifact).await {
                return Outcome::PrepareFailed(fetch_failure(&step.component, &e));
            }
        }
    }
    let mut snapshots = Vec::new();
    for step in &change.steps {
        match ctx.backends.snapshot(&step.component).await {
            Ok(snapshot) => snapshots.push(snapshot),
            Err(e) => {
                return Outcome::PrepareFailed(Failure {
                    reason: e.to_string(),
                    component: Some(step.component.name.clone()),
                    no_space: false,
                })
            }
        }
    }
    Outcome::Prepared {
        baseline,
        snapshots,
    }
}

/// Kinds whose steps change machine-wide state (dpkg's database, the module tree).
fn serialized(kind: ComponentKind) -> bool {
    matches!(kind, ComponentKind::Package | ComponentKind::Driver)
}

/// One step: the verified artifact (normally already cached by Pending), then the backend.
async fn run_step(ctx: Arc<Context>, index: usize, step: Step) -> Outcome {
    let failed = |reason: String, no_space: bool| {
        Outcome::StepFailed(
            index,
            Failure {
                reason,
                component: Some(step.component.name.clone()),
                no_space,
            },
        )
    };
    let artifact: Option<PathBuf> = match (&step.component.artifact, step.action) {
        (_, Action::Remove) | (None, _) => None,
        (Some(artifact), _) => match ctx.artifacts.fetch(artifact).await {
            Ok(path) => Some(path),
            Err(e) => return failed(format!("{}: {e}", step.component.name), is_no_space(&e)),
        },
    };
    let _serial = if serialized(step.component.kind) {
        Some(ctx.serial.lock().await)
    } else {
        None
    };
    let result = match step.action {
        Action::Remove => ctx.backends.remove(&step.component).await,
        _ => {
            ctx.backends
                .apply(&step.component, artifact.as_deref())
                .await
        }
    };
    match result {
        Ok(()) => Outcome::StepDone(index),
        Err(e) => {
            let no_space = match &e {
                crate::backend::BackendError::Artifact(a) => is_no_space(a),
                crate::backend::BackendError::Io { source, .. } => {
                    source.raw_os_error() == Some(nix::libc::ENOSPC)
                }
                other => other.to_string().contains("No space left on device"),
            };
            failed(
                format!("{:?} {} failed: {e}", step.action, step.component.name),
                no_space,
            )
        }
    }
}

/// Puts one step back from its snapshot.
async fn restore_step(ctx: Arc<Context>, index: usize, step: Step) -> Outcome {
    let Some(snapshot) = &step.snapshot else {
        return Outcome::RestoreFailed(index, "no snapshot was taken".into());
    };
    let _serial = if serialized(step.component.kind) {
        Some(ctx.serial.lock().await)
    } else {
        None
    };
    match ctx.backends.restore(&step.component, snapshot).await {
        Ok(()) => Outcome::Restored(index),
        Err(e) => Outcome::RestoreFailed(index, e.to_string()),
    }
}

/// The node token, once known: registration may still be going on in the background.
pub type TokenWatch = watch::Receiver<Option<String>>;

async fn token_of(tokens: &mut TokenWatch, stop: &mut watch::Receiver<bool>) -> Option<String> {
    loop {
        if let Some(token) = tokens.borrow_and_update().clone() {
            return Some(token);
        }
        tokio::select! {
            changed = tokens.changed() => if changed.is_err() { return None; },
            _ = stop.changed() => if *stop.borrow() { return None; },
        }
    }
}

/// Follows the assignment: long polls, stores each new one, and hands it to the loop.
pub async fn follow<C: ApiClient>(
    client: Arc<C>,
    mut tokens: TokenWatch,
    node: String,
    sender: watch::Sender<Option<NodeAssignment>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut since: Option<u64> = sender.borrow().as_ref().map(|a| a.generation);
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(token) = token_of(&mut tokens, &mut stop).await else {
            return;
        };
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

/// Sends the report every `interval`, with the oldest queued events (one report's worth).
pub async fn heartbeat<C: ApiClient>(
    client: Arc<C>,
    mut tokens: TokenWatch,
    node: String,
    shared: Arc<Shared>,
    dir: StateDir,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    // Events per report: halved while the apiserver answers 413 (a lower --max-body-bytes
    // than ours), down to none, so a heartbeat always gets through and the node stays Ready.
    let mut batch_size = EVENTS_PER_REPORT;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {
                if *stop.borrow() { return; }
            }
        }
        let Some(token) = token_of(&mut tokens, &mut stop).await else {
            return;
        };
        let mut report = shared.report.lock().expect("not poisoned").clone();
        let batch = shared
            .events
            .lock()
            .expect("not poisoned")
            .batch(batch_size);
        report.events = batch.clone();
        let call = client.report(&token, &node, &report);
        let result = tokio::select! {
            result = call => result,
            _ = stop.changed() => return,
        };
        match result {
            Ok(()) => {
                let mut queued = shared.events.lock().expect("not poisoned");
                queued.delivered(&batch);
                let _ = dir.save_events(&queued.snapshot());
                // More than one report's worth waiting (back from offline): send on at once.
                if batch_size > 0 && queued.len() >= batch_size {
                    tick.reset_immediately();
                }
                batch_size = (batch_size * 2).clamp(1, EVENTS_PER_REPORT);
            }
            Err(ClientError::Rejected { status: 413, .. }) => {
                tracing::warn!(
                    batch_size,
                    "the apiserver finds the report too large; sending fewer events per report"
                );
                if batch_size > 0 {
                    batch_size /= 2;
                    tick.reset_immediately();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, queued = batch.len(), "heartbeat failed; events stay queued")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventType, n: usize) -> NodeEvent {
        NodeEvent {
            time: UNIX_EPOCH + Duration::from_secs(n as u64),
            kind,
            reason: format!("R{n}"),
            message: "m".into(),
            desired_state: None,
            revision: None,
            component: None,
        }
    }

    #[test]
    fn the_event_queue_is_bounded_drops_normal_first_and_says_so() {
        let mut queue = EventQueue::default();
        queue.push(event(EventType::Warning, 0));
        for n in 1..=MAX_QUEUED_EVENTS + 10 {
            queue.push(event(EventType::Normal, n));
        }
        assert_eq!(queue.len(), MAX_QUEUED_EVENTS);
        assert_eq!(queue.dropped, 11);
        let batch = queue.batch(EVENTS_PER_REPORT);
        assert_eq!(batch.len(), EVENTS_PER_REPORT);
        assert_eq!(batch[0].reason, "R0", "the Warning is kept");
        assert_eq!(batch[1].reason, "R12", "the oldest Normal ones went");
        queue.delivered(&batch);
        assert_eq!(queue.len(), MAX_QUEUED_EVENTS - EVENTS_PER_REPORT + 1);
        let last = queue.events.back().unwrap();
        assert_eq!(last.reason, "EventsDropped");
        assert!(
            last.message.starts_with("11 older events"),
            "{}",
            last.message
        );
        assert_eq!(queue.dropped, 0);
    }

    #[test]
    fn a_long_message_is_cut_and_only_delivered_events_are_forgotten() {
        let mut queue = EventQueue::default();
        let mut long = event(EventType::Warning, 1);
        long.message = "x".repeat(100_000);
        queue.push(long);
        assert!(queue.events[0].message.len() <= MAX_EVENT_MESSAGE + 4);
        let batch = queue.batch(EVENTS_PER_REPORT);
        queue.push(event(EventType::Normal, 2));
        queue.delivered(&batch);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.events[0].reason, "R2");
        // A batch that is no longer at the front (dropped meanwhile) forgets nothing.
        queue.delivered(&[event(EventType::Normal, 9)]);
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn a_worker_that_dies_without_a_result_fails_its_work() {
        assert!(matches!(
            Work::Prepare.died("ds"),
            Outcome::PrepareFailed(_)
        ));
        assert!(matches!(
            Work::Step(2).died("ds"),
            Outcome::StepFailed(2, _)
        ));
        let Outcome::RestoreFailed(1, reason) = Work::Restore(1).died("ds") else {
            panic!()
        };
        assert!(reason.contains("ds"), "{reason}");
    }

    fn component(name: &str, version: &str) -> Component {
        serde_json::from_value(serde_json::json!({
            "name": name, "kind": "service", "version": version,
            "service": {"exec": ["bin/x"]},
        }))
        .unwrap()
    }

    fn assigned(name: &str, revision: u64, components: &[&str]) -> AssignedState {
        let mut spec: manifests::DesiredStateSpec =
            serde_json::from_value(serde_json::json!({"components": []})).unwrap();
        spec.components = components.iter().map(|c| component(c, "1.0.0")).collect();
        AssignedState {
            name: name.into(),
            revision,
            commit: None,
            spec,
        }
    }

    fn assignment(states: Vec<AssignedState>, conflicts: &[(&str, &[&str])]) -> NodeAssignment {
        NodeAssignment {
            node: "n".into(),
            generation: 1,
            states,
            conflicts: conflicts
                .iter()
                .map(|(c, owners)| ComponentConflict {
                    component: c.to_string(),
                    desired_states: owners.iter().map(|o| o.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_revision_is_withdrawn_when_the_assignment_holds_another_or_none() {
        let a = assignment(vec![assigned("web", 3, &["demo"])], &[]);
        assert!(!withdrawn(Some(&a), "web", 3));
        assert!(withdrawn(Some(&a), "web", 4), "superseded or aborted");
        assert!(withdrawn(Some(&a), "web", 2), "back to the last good one");
        assert!(withdrawn(Some(&a), "db", 1), "no longer assigned");
        assert!(
            !withdrawn(None, "web", 4),
            "nothing received: act on what is stored"
        );
    }

    fn reverted(touched: &[&str], culprit: Option<&str>) -> Applied {
        Applied {
            state: assigned("demo", 1, &["motd", "web"]),
            phase: ComponentPhase::Reverted,
            healthy_since_ms: None,
            message: Some("web 1.1.0 failed: probe http failed 3 times in a row".into()),
            probe_output: Some("503".into()),
            log_tail: vec!["panic: boom".into()],
            culprit: culprit.map(str::to_string),
            reverted_revision: Some(2),
            touched: touched.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn a_revert_blames_only_the_components_it_changed() {
        let applied = reverted(&["web"], Some("web"));
        let standing = Standing::of_applied(&applied);
        let web = standing.component("demo", &component("web", "1.1.0"), Some("1.0.0".into()));
        assert_eq!(web.phase, ComponentPhase::Reverted);
        assert_eq!(web.revision, 2);
        assert!(web
            .message
            .as_deref()
            .unwrap()
            .starts_with("web 1.1.0 failed"));
        assert_eq!(web.probe_output.as_deref(), Some("503"));
        assert_eq!(web.log_tail, vec!["panic: boom".to_string()]);
        let motd = standing.component("demo", &component("motd", "1.0.0"), Some("1.0.0".into()));
        assert_eq!(motd.phase, ComponentPhase::Healthy, "motd did not change");
        assert_eq!(motd.version.as_deref(), Some("1.0.0"));
        assert_eq!((motd.message, motd.probe_output), (None, None));
        assert!(motd.log_tail.is_empty());

        // Two changed, one named as the cause: both Reverted, only the cause has its log.
        let applied = reverted(&["web", "motd"], Some("web"));
        let standing = Standing::of_applied(&applied);
        let motd = standing.component("demo", &component("motd", "1.1.0"), None);
        assert_eq!(motd.phase, ComponentPhase::Reverted);
        assert!(motd.message.is_some());
        assert!(motd.probe_output.is_none() && motd.log_tail.is_empty());

        // Refused before anything changed: the component it names carries it.
        let applied = reverted(&[], Some("web"));
        let standing = Standing::of_applied(&applied);
        assert_eq!(
            standing
                .component("demo", &component("web", "1.1.0"), None)
                .phase,
            ComponentPhase::Reverted
        );
        assert_eq!(
            standing
                .component("demo", &component("motd", "1.0.0"), None)
                .phase,
            ComponentPhase::Healthy
        );

        // Nothing recorded (a journal from before): every component, as before.
        let applied = reverted(&[], None);
        let standing = Standing::of_applied(&applied);
        let motd = standing.component("demo", &component("motd", "1.0.0"), None);
        assert_eq!(motd.phase, ComponentPhase::Reverted);
        assert_eq!(motd.probe_output.as_deref(), Some("503"));

        // At rest nothing is blamed and every component has the DesiredState's phase.
        let mut healthy = reverted(&["web"], Some("web"));
        healthy.phase = ComponentPhase::Healthy;
        let standing = Standing::of_applied(&healthy);
        let web = standing.component("demo", &component("web", "1.0.0"), None);
        assert_eq!(web.phase, ComponentPhase::Healthy);
        assert!(web.message.is_none() && web.probe_output.is_none());
    }

    #[test]
    fn components_another_desired_state_manages_are_not_called_unmanaged() {
        // `a` was deleted: `x` is back with `b`, `y` is pinned by `b` and `c`, `z` by nobody.
        let now = assignment(
            vec![assigned("b", 1, &["x"]), assigned("c", 4, &["w"])],
            &[("y", &["b", "c"])],
        );
        let standing = LetGo::of(["x", "y", "z"], &now, "a");
        assert_eq!(
            standing,
            LetGo {
                unmanaged: vec!["z".into()],
                in_conflict: vec![("y".into(), vec!["b".into(), "c".into()])],
                elsewhere: vec![("x".into(), "b".into())],
            }
        );
        let (kind, reason, message) = standing
            .event("no longer assigned to this node", true)
            .unwrap();
        assert_eq!((kind, reason), (EventType::Normal, "Unmanaged"));
        assert_eq!(
            message,
            "no longer assigned to this node: z left as installed: no DesiredState on this node manages it now; \
             y is in conflict: pinned by b and c, applied by neither until one lets go of it; x stays managed by b"
        );

        // Only taken over: nothing to say about a spec; a DesiredState that went says so.
        let taken = LetGo::of(["x"], &now, "a");
        assert_eq!(
            taken.event("not in its assigned spec any more", false),
            None
        );
        assert_eq!(
            taken.event("no longer assigned to this node", true),
            Some((
                EventType::Normal,
                "Unassigned",
                "no longer assigned to this node: x stays managed by b".to_string()
            ))
        );
        // Only in conflict: a Conflict warning, no Unmanaged.
        let (kind, reason, message) = LetGo::of(["y"], &now, "b")
            .event("not in its assigned spec any more", false)
            .unwrap();
        assert_eq!((kind, reason), (EventType::Warning, "Conflict"));
        assert!(
            !message.contains("unmanaged") && message.contains("y is in conflict"),
            "{message}"
        );
        // A component back in the owner's own spec was not let go of (a conflict that ended
        // when the other DesiredState went).
        assert_eq!(LetGo::of(["x"], &now, "b"), LetGo::default());
        // A conflict that ended with nobody pinning the component: now it is unmanaged.
        let after = assignment(vec![assigned("c", 4, &["w"])], &[]);
        assert_eq!(
            LetGo::of(["y"], &after, "b").unmanaged,
            vec!["y".to_string()]
        );
    }

    #[test]
    fn even_a_full_queue_of_long_messages_fits_a_report() {
        let mut queue = EventQueue::default();
        for n in 0..MAX_QUEUED_EVENTS {
            let mut e = event(EventType::Warning, n);
            e.message = "y".repeat(50_000);
            queue.push(e);
        }
        let report = NodeReport {
            events: queue.batch(EVENTS_PER_REPORT),
            ..NodeReport::default()
        };
        let bytes = serde_json::to_vec(&report).unwrap().len();
        assert!(bytes < 2 * 1024 * 1024, "{bytes} bytes");
    }
}
