//! The object logic, split by domain, over the store and nothing of HTTP:
//!
//! - `desired_states`: apply (dry run, resourceVersion checks, artifact reuse), delete,
//!   reads and revisions;
//! - `nodes`: registration and node tokens, reports, readiness, cordon, delete, conditions;
//! - `assignments`: what each node is told to run;
//! - `events`: recording with retention and a per-node share, reading after a sequence;
//! - `rollouts`: the rollout controller's objects, its reconcile loop, pause, resume, undo;
//! - `summary`: the fleet at a glance;
//! - `leader`: the lease that makes one replica the leader, and the fence on its writes;
//! - `feed`: everything derived from the store's change feed (caches, heartbeats, long
//!   polls, watchers) — the only place derived state changes;
//! - `error`: the domain error, which only the HTTP layer maps to status codes.
//!
//! Every write is one store transaction, so a crash leaves either all of an apply or none
//! of it; the writer then waits until the feed has applied its commit, so it reads its own
//! writes. Nothing here is process-local state that two replicas could disagree on except
//! what the feed derives.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use manifests::wire::*;
use manifests::{DesiredState, API_VERSION, KIND_DESIRED_STATE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use super::lease::{self, Lease, LEADER};
use crate::store::{self, Applied, Feed, Store, StoreError, Table, Txn, TxnError, Typed};

mod assignments;
mod desired_states;
mod error;
mod events;
mod feed;
mod leader;
mod nodes;
#[cfg(test)]
mod replica_tests;
mod rollouts;
mod summary;
#[cfg(test)]
mod tests;

pub use desired_states::ApplyInput;
use desired_states::*;
pub use error::Error;
pub use events::MAX_EVENTS_PER_REPORT;
use feed::*;
use leader::*;
pub use nodes::conditions;
use nodes::*;
use rollouts::*;

// The store's tables, each with the type of what it holds (see `store::Table` for keys).
const DESIRED_STATES: Typed<DesiredStateObject> = Typed::new(Table::DesiredStates);
const REVISIONS: Typed<Revision> = Typed::new(Table::Revisions);
const NODES: Typed<StoredNode> = Typed::new(Table::Nodes);
const ROLLOUTS: Typed<RolloutObject> = Typed::new(Table::Rollouts);
const EVENTS: Typed<Event> = Typed::new(Table::Events);
/// Node and DesiredState → the revision the rollout controller assigned.
const ASSIGNMENTS: Typed<u64> = Typed::new(Table::Assignments);
const LEASES: Typed<Lease> = Typed::new(Table::Leases);

/// Tunables of the controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Events kept; older ones are dropped.
    pub event_retention: usize,
    /// A node whose last heartbeat is older than this is not Ready.
    pub ready_grace: Duration,
    /// Host metrics samples kept per node (in memory).
    pub host_history: usize,
    /// How long the leader lease lasts unrenewed (a store shared by several apiservers):
    /// a replica takes over within about this long after the leader dies.
    pub lease_duration: Duration,
    /// With a store only this process writes: a heartbeat that changes nothing but the
    /// node's host metrics is stored only if the node's stored heartbeat is older than this
    /// (the others are kept in memory). A heartbeat time known only from the store gets this
    /// much more than `ready_grace` before its node counts as not Ready.
    pub heartbeat_persist_interval: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            event_retention: 10_000,
            ready_grace: Duration::from_secs(40),
            host_history: 60,
            lease_duration: Duration::from_secs(10),
            heartbeat_persist_interval: Duration::from_secs(60),
        }
    }
}

/// The kinds of object a watch can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// DesiredState.
    DesiredState,
    /// Node.
    Node,
    /// Rollout.
    Rollout,
    /// Event.
    Event,
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ChangeType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
    /// Not a change: this replica missed some of the store's changes and rebuilt what it
    /// derives from them, so a watcher cannot know what it missed. Every watch ends on this
    /// (as on falling behind); its client lists again, as with Kubernetes' `410 Gone`.
    Resync,
}

/// One change, as watchers receive it.
#[derive(Debug, Clone)]
pub struct Change {
    /// Kind of object.
    pub kind: Kind,
    /// What happened.
    pub change: ChangeType,
    /// Object name.
    pub name: String,
    /// The object after the change (before it, for deletes).
    pub object: Arc<serde_json::Value>,
}

#[derive(Default)]
struct Cache {
    states: BTreeMap<String, Arc<DesiredStateObject>>,
    /// Revisions in use: newest, last good and assigned ones.
    revisions: HashMap<(String, u64), Arc<Revision>>,
    /// node → DesiredState → revision, as the rollout controller assigned.
    assignments: HashMap<String, BTreeMap<String, u64>>,
    /// Rollouts, read from here with the assignments they made: a client that sees a wave
    /// started also sees its assignments. One that does not decode is that rollout's
    /// problem: it stays here as its error.
    rollouts: BTreeMap<String, Result<Arc<RolloutObject>, StoreError>>,
    /// The store revision this cache reflects.
    revision: u64,
}

#[derive(Default)]
struct Live {
    /// Sequence numbers of the stored events about each node, oldest first: a node's share
    /// of the retention is enforced from here without scanning the events.
    node_events: HashMap<String, VecDeque<u64>>,
    /// DesiredStates whose rollout decision failed, and when to try again.
    rollout_backoff: HashMap<String, Backoff>,
    host_history: HashMap<String, VecDeque<HostSample>>,
    /// Readiness last seen by the readiness sweep, to report transitions once.
    ready: HashMap<String, bool>,
    /// Last heartbeat per node, stored or only heard: the sweep and the rollout loop read
    /// this instead of decoding every node record.
    heartbeats: HashMap<String, SystemTime>,
    /// Per node, what this process last stored of its report (see
    /// `nodes::report_digest`) and when that report arrived: a heartbeat that brings nothing
    /// new is kept in memory.
    stored_reports: HashMap<String, (u64, SystemTime)>,
    /// What of each node requests and the rollout loop need (token hash, labels, cordon,
    /// what it reports per DesiredState), so they decode no node record. A node write that
    /// changes its labels or cordon wakes that node's long polls; a heartbeat does not.
    nodes: HashMap<String, Arc<NodeFacts>>,
}

impl Live {
    /// Appends a host sample to `name`'s history, keeping the newest `keep`.
    fn add_host_sample(&mut self, name: &str, time: SystemTime, metrics: HostMetrics, keep: usize) {
        let history = self.host_history.entry(name.to_string()).or_default();
        history.push_back(HostSample { time, metrics });
        while history.len() > keep {
            history.pop_front();
        }
    }
}

/// The apiserver's object logic.
///
/// Its locks are taken with `unwrap_or_else(PoisonError::into_inner)`: a rollout decision
/// that panics is caught (one DesiredState's problem), and must not poison every later
/// request through a lock it held.
pub struct Controller {
    /// Itself, for work that must outlive the request that started it (a batch of
    /// heartbeats is committed by a task of its own, not by a request that can be dropped).
    me: std::sync::Weak<Controller>,
    /// When this process started: deadlines are judged only after nodes could report.
    started: SystemTime,
    store: Arc<Store>,
    config: ControllerConfig,
    changes: broadcast::Sender<Change>,
    cache: RwLock<Arc<Cache>>,
    /// One refresh at a time: two interleaved ones could store the older scan last.
    refreshing: Mutex<()>,
    live: Mutex<Live>,
    /// The store revision the feed handler has applied to everything derived from it
    /// (cache, heartbeats, watchers): a writer waits for its commit to get here.
    processed: watch::Sender<u64>,
    identity: String,
    lease: Mutex<LeaseState>,
    /// Per node with a long poll waiting: bumped when that node's assignment may have
    /// changed (a registration wakes that node, not every long poll).
    node_epochs: Mutex<HashMap<String, watch::Sender<NodeWake>>>,
    /// The generation of each node's assignment as of the last change: a change of
    /// DesiredStates or assignments wakes exactly the nodes whose generation it moved.
    generations: Mutex<HashMap<String, u64>>,
    /// Assignments computed for the current cache, by what of a node they depend on: one
    /// computation per distinct (labels, cordon, assigned revisions), not one per node.
    assignments_memo: Mutex<AssignmentMemo>,
    /// Told when a DesiredState changes: the rollout loop decides at once instead of at its
    /// next tick.
    desired_states_changed: watch::Sender<u64>,
    /// Heartbeats waiting to be committed together (see `Controller::report`).
    reports: Mutex<nodes::ReportQueue>,
    /// Held by the one task that commits the queued heartbeats.
    report_committer: tokio::sync::Mutex<()>,
    /// Whether a task is on its way to commit the queue (so a heartbeat starts one only
    /// when none is).
    report_drainer: std::sync::atomic::AtomicBool,
}

/// See `Controller::assignments_memo`.
#[derive(Default)]
struct AssignmentMemo {
    /// The cache revision the entries were computed at; a newer cache clears them.
    revision: u64,
    by_inputs: HashMap<String, Arc<assignments::SharedAssignment>>,
}

/// What a long poll for one node's assignment waits on: a change of that node's
/// assignment (or of the node itself).
pub struct AssignmentChanges {
    node: watch::Receiver<NodeWake>,
}

/// The value behind each node's wake-up: a counter, and how many nodes the change that
/// bumped it woke together.
#[derive(Debug, Clone, Copy, Default)]
struct NodeWake {
    count: u64,
    together: usize,
}

/// What woke a long poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// This node's assignment may have changed, in a change that woke `together` nodes.
    Changed {
        /// Nodes woken by the same change (1 for a change of this node alone).
        together: usize,
    },
    /// The controller is gone.
    Closed,
}

impl AssignmentChanges {
    /// Waits for the next change.
    pub async fn changed(&mut self) -> Wake {
        match self.node.changed().await {
            Ok(()) => Wake::Changed {
                together: self.node.borrow_and_update().together,
            },
            Err(_) => Wake::Closed,
        }
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Controller {
    /// A controller over `store`; loads its cache.
    pub fn new(store: Arc<Store>, config: ControllerConfig) -> Result<Arc<Self>, StoreError> {
        let (changes, _) = broadcast::channel(4096);
        // Subscribed before the first read: no change can fall between the two.
        let feed = store.subscribe();
        let (processed, _) = watch::channel(store.revision());
        let controller = Arc::new_cyclic(|me| Controller {
            me: me.clone(),
            started: SystemTime::now(),
            store,
            config,
            changes,
            cache: RwLock::new(Arc::new(Cache::default())),
            refreshing: Mutex::new(()),
            live: Mutex::new(Live::default()),
            processed,
            identity: replica_identity(),
            lease: Mutex::new(LeaseState::default()),
            node_epochs: Mutex::new(HashMap::new()),
            generations: Mutex::new(HashMap::new()),
            assignments_memo: Mutex::new(AssignmentMemo::default()),
            desired_states_changed: watch::channel(0).0,
            reports: Mutex::new(nodes::ReportQueue::default()),
            report_committer: tokio::sync::Mutex::new(()),
            report_drainer: std::sync::atomic::AtomicBool::new(false),
        });
        controller.refresh()?;
        // Readiness as it stands at start: transitions are reported from here on.
        let now = SystemTime::now();
        // A node that never reported has no readiness to turn; its first heartbeat is no transition.
        let nodes = controller.list_nodes_raw()?;
        let facts = nodes
            .iter()
            .map(|n| (n.object.metadata.name.clone(), Arc::new(NodeFacts::of(n))))
            .collect();
        let heartbeats: HashMap<String, SystemTime> = nodes
            .into_iter()
            .filter_map(|n| Some((n.object.metadata.name, n.object.status.last_heartbeat?)))
            .collect();
        let ready = heartbeats
            .iter()
            .map(|(name, at)| (name.clone(), controller.fresh(*at, now)))
            .collect();
        let mut node_events: HashMap<String, VecDeque<u64>> = HashMap::new();
        for (_, event) in EVENTS.read_prefix(&controller.store, b"") {
            let event = event?;
            if let Some(node) = event.node {
                node_events.entry(node).or_default().push_back(event.seq);
            }
        }
        let mut live = controller
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        live.ready = ready;
        live.heartbeats = heartbeats;
        live.node_events = node_events;
        live.nodes = facts;
        drop(live);
        controller.wake_moved_assignments();
        tokio::spawn(follow_feed(Arc::downgrade(&controller), feed));
        Ok(controller)
    }

    /// Runs a transaction and waits until everything derived from the store (the cache,
    /// heartbeats, watchers, long polls) shows it: a client reads its own writes.
    async fn transact<T, E>(
        &self,
        f: impl Fn(&mut dyn Txn) -> Result<T, E>,
    ) -> Result<(T, u64), TxnError<E>> {
        let (value, revision) = self.store.transact(f).await?;
        self.caught_up(revision).await;
        Ok((value, revision))
    }

    /// Waits until the feed handler has applied `revision`.
    async fn caught_up(&self, revision: u64) {
        let mut processed = self.processed.subscribe();
        let reached = tokio::time::timeout(
            Duration::from_secs(10),
            processed.wait_for(|r| *r >= revision),
        )
        .await;
        if !matches!(reached, Ok(Ok(_))) {
            tracing::error!(
                revision,
                "the change feed handler fell behind; answering anyway"
            );
        }
    }

    /// The store. Private on purpose: the HTTP layer asks the controller, never the store.
    #[cfg(test)]
    fn store(&self) -> &Store {
        &self.store
    }

    /// Whether this replica can serve: its store answers and its view is not lagging
    /// behind the store's (for `/readyz`).
    pub fn readiness(&self) -> Result<(), Error> {
        Ok(self.store.check()?)
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Subscribes to every change.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Counts DesiredState changes that bring or remove a revision: the rollout loop's cue
    /// (a receiver coalesces those it has not seen yet into one).
    pub fn desired_states_changed(&self) -> watch::Receiver<u64> {
        self.desired_states_changed.subscribe()
    }

    /// Subscribes to "`node`'s assignment may have changed". Subscribe before reading the
    /// assignment, so a change between the two is not missed.
    pub fn assignment_changes(&self, node: &str) -> AssignmentChanges {
        let mut epochs = self
            .node_epochs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Entries of nodes nobody waits for any more go (a deleted node, or a name that
        // never was one).
        if epochs.len() > 1024 && epochs.len() > 2 * self.live_node_count() {
            epochs.retain(|_, sender| sender.receiver_count() > 0);
        }
        let node = epochs
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(NodeWake::default()).0)
            .subscribe();
        AssignmentChanges { node }
    }

    /// Nodes known to the feed.
    fn live_node_count(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .nodes
            .len()
    }

    /// Wakes the long polls of `nodes`, telling each how many woke together.
    fn wake_nodes<'a>(&self, nodes: impl ExactSizeIterator<Item = &'a str>) {
        let together = nodes.len();
        let epochs = self
            .node_epochs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for node in nodes {
            if let Some(sender) = epochs.get(node) {
                sender.send_modify(|wake| {
                    wake.count += 1;
                    wake.together = together;
                });
            }
        }
    }

    /// After a change that can move assignments (DesiredStates, assignments, a resync):
    /// computes every node's assignment generation (once per distinct node inputs, through
    /// the memo) and wakes the long polls of exactly the nodes whose generation moved. A
    /// change that moves nothing (a rollout completing onto the revision nodes already
    /// run) wakes nobody; before, it woke all 10,000 long polls to find that out.
    fn wake_moved_assignments(&self) {
        let nodes: Vec<(String, Arc<assignments::AssignmentInputs>)> = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .nodes
            .iter()
            .map(|(name, facts)| (name.clone(), facts.inputs.clone()))
            .collect();
        let mut moved = Vec::new();
        {
            let mut known = self
                .generations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if known.len() > nodes.len() {
                let alive: std::collections::HashSet<&str> =
                    nodes.iter().map(|(n, _)| n.as_str()).collect();
                known.retain(|name, _| alive.contains(name.as_str()));
            }
            for (name, inputs) in &nodes {
                let generation = self.shared_assignment(inputs, name).assignment.generation;
                if known.insert(name.clone(), generation) != Some(generation) {
                    moved.push(name.as_str());
                }
            }
        }
        self.wake_nodes(moved.into_iter());
    }

    /// A change of one node (labels, cordon, registration): records its generation and
    /// wakes its long polls.
    fn wake_reshaped_node(&self, name: &str, inputs: &assignments::AssignmentInputs) {
        let generation = self.shared_assignment(inputs, name).assignment.generation;
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), generation);
        self.wake_nodes(std::iter::once(name));
    }

    fn publish(&self, kind: Kind, change: ChangeType, name: &str, object: impl Serialize) {
        // Serializing is the expensive part; skip it when nobody watches.
        if self.changes.receiver_count() > 0 {
            let object = Arc::new(serde_json::to_value(object).expect("objects serialize"));
            let _ = self.changes.send(Change {
                kind,
                change,
                name: name.to_string(),
                object,
            });
        }
    }

    fn cache(&self) -> Arc<Cache> {
        self.cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
