//! The object logic: applies and revisions, node records, assignments, conditions, events.
//!
//! It knows the store and nothing of HTTP. Every write is one store
//! transaction, so a crash leaves either all of an apply or none of it.
//! After a commit, an in-memory cache of DesiredStates and the revisions in
//! use is rebuilt, nodes waiting for their assignment are woken, and watchers
//! are told.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use manifests::wire::*;
use manifests::{DesiredState, API_VERSION, KIND_DESIRED_STATE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use super::error::ApiError;
use super::lease::{self, Lease, LEADER};
use crate::store::{self, decode, encode, Applied, Feed, Store, StoreError, Table, Txn, TxnError};

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
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            event_retention: 10_000,
            ready_grace: Duration::from_secs(40),
            host_history: 60,
            lease_duration: Duration::from_secs(10),
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

/// A node as stored: the object and the hash of its token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredNode {
    token_sha256: String,
    /// The join token it registered with.
    joined_with: String,
    object: NodeObject,
}

/// One manifest of an apply, with where it came from.
#[derive(Debug, Clone)]
pub struct ApplyInput {
    /// The validated manifest.
    pub object: DesiredState,
    /// Provenance recorded on a new revision.
    pub source: RevisionSource,
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

/// A DesiredState whose rollout decision keeps failing.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    retry_at: SystemTime,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            failures: 0,
            retry_at: SystemTime::UNIX_EPOCH,
        }
    }
}

/// Events one node report may carry; the rest are dropped (and that is recorded). A nodelet
/// sends at most 100 per report.
pub const MAX_EVENTS_PER_REPORT: usize = 200;

/// The fewest events any node may keep, however many nodes share the retention.
const MIN_NODE_EVENT_SHARE: usize = 20;

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
    /// Last heartbeat per node: the sweep reads this instead of decoding every node record.
    heartbeats: HashMap<String, SystemTime>,
    /// A digest of what of each node decides its assignment (labels, cordon): a node write
    /// that changes it wakes the long polls, a heartbeat does not.
    shapes: HashMap<String, u64>,
}

/// This replica's part in leader election.
#[derive(Default)]
struct LeaseState {
    observed: Option<lease::Observed>,
    /// Our epoch while we lead, and until when we may act on it.
    held: Option<(u64, Instant)>,
    /// When this replica last became leader.
    since: Option<SystemTime>,
}

fn node_shape(node: &NodeObject) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&(&node.metadata.labels, &node.status.cordoned))
        .expect("nodes serialize")
        .hash(&mut hasher);
    hasher.finish()
}

/// This replica's name in the leader lease: host, process and a random tag (a restarted
/// process is another replica).
fn replica_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "apiserver".into());
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The apiserver's object logic.
///
/// Its locks are taken with `unwrap_or_else(PoisonError::into_inner)`: a rollout decision
/// that panics is caught (one DesiredState's problem), and must not poison every later
/// request through a lock it held.
pub struct Controller {
    /// When this process started: deadlines are judged only after nodes could report.
    started: SystemTime,
    store: Arc<Store>,
    config: ControllerConfig,
    changes: broadcast::Sender<Change>,
    epoch: watch::Sender<u64>,
    cache: RwLock<Arc<Cache>>,
    /// One refresh at a time: two interleaved ones could store the older scan last.
    refreshing: Mutex<()>,
    live: Mutex<Live>,
    /// The store revision the feed handler has applied to everything derived from it
    /// (cache, heartbeats, watchers): a writer waits for its commit to get here.
    processed: watch::Sender<u64>,
    identity: String,
    lease: Mutex<LeaseState>,
}

/// Why an apply transaction stopped: a real error, or a dry run that must not commit.
enum ApplyStop {
    Error(ApiError),
    DryRun(Vec<ApplyResult>),
}

impl From<StoreError> for ApplyStop {
    fn from(e: StoreError) -> Self {
        ApplyStop::Error(ApiError::Store(e))
    }
}

impl From<ApiError> for ApplyStop {
    fn from(e: ApiError) -> Self {
        ApplyStop::Error(e)
    }
}

fn get_json<T: serde::de::DeserializeOwned>(
    txn: &dyn Txn,
    table: Table,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    txn.get(table, key)?
        .map(|bytes| decode(table, key, &bytes))
        .transpose()
}

/// A node's stored record inside a transaction, or 404.
fn node_in(txn: &dyn Txn, name: &str) -> Result<StoredNode, ApiError> {
    get_json(txn, Table::Nodes, name.as_bytes())?.ok_or_else(|| ApiError::NotFound {
        kind: "Node",
        name: name.to_string(),
    })
}

/// Applies the store's change feed to a controller until either is dropped.
async fn follow_feed(controller: std::sync::Weak<Controller>, mut feed: broadcast::Receiver<Feed>) {
    loop {
        let item = feed.recv().await;
        let Some(controller) = controller.upgrade() else {
            return;
        };
        match item {
            Ok(Feed::Batch(applied)) => {
                // One batch's trouble (a panic deriving state from it) must not stop the feed.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    controller.on_batch(&applied)
                }));
                if outcome.is_err() {
                    tracing::error!(
                        revision = applied.revision,
                        "deriving state from a batch panicked"
                    );
                    controller.resync();
                }
            }
            Ok(Feed::Reset(_)) | Err(broadcast::error::RecvError::Lagged(_)) => controller.resync(),
            Err(broadcast::error::RecvError::Closed) => return,
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
        let (epoch, _) = watch::channel(0);
        // Subscribed before the first read: no change can fall between the two.
        let feed = store.subscribe();
        let (processed, _) = watch::channel(store.revision());
        let controller = Arc::new(Controller {
            started: SystemTime::now(),
            store,
            config,
            changes,
            epoch,
            cache: RwLock::new(Arc::new(Cache::default())),
            refreshing: Mutex::new(()),
            live: Mutex::new(Live::default()),
            processed,
            identity: replica_identity(),
            lease: Mutex::new(LeaseState::default()),
        });
        controller.refresh()?;
        // Readiness as it stands at start: transitions are reported from here on.
        let now = SystemTime::now();
        // A node that never reported has no readiness to turn; its first heartbeat is no transition.
        let nodes = controller.list_nodes_raw()?;
        let shapes = nodes
            .iter()
            .map(|n| (n.object.metadata.name.clone(), node_shape(&n.object)))
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
        for (key, value) in controller.store.scan_prefix(Table::Events, b"") {
            let event: Event = decode(Table::Events, &key, &value)?;
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
        live.shapes = shapes;
        drop(live);
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

    /// Applies one committed batch to everything derived from the store, and tells
    /// watchers and long polls. The only place derived state changes, for this replica's
    /// commits and every other replica's alike.
    fn on_batch(&self, applied: &Applied) {
        let now = SystemTime::now();
        let watching = self.changes.receiver_count() > 0;
        let mut refresh = false;
        let mut wake = false;
        for change in &applied.changes {
            match change.table {
                Table::DesiredStates | Table::Assignments | Table::Rollouts => {
                    refresh = true;
                    wake = true;
                }
                Table::Revisions => refresh = true,
                Table::Nodes | Table::Events | Table::Leases => {}
            }
        }
        let before = self.cache();
        if refresh && before.revision < applied.last {
            if let Err(error) = self.refresh() {
                tracing::error!(%error, "cannot rebuild the cache from the store");
            }
        }
        for change in &applied.changes {
            let name = String::from_utf8_lossy(&change.key).into_owned();
            match change.table {
                Table::DesiredStates if watching => {
                    let (kind, bytes) = match (&change.value, &change.previous) {
                        (Some(value), None) => (ChangeType::Added, value),
                        (Some(value), Some(_)) => (ChangeType::Modified, value),
                        (None, Some(previous)) => (ChangeType::Deleted, previous),
                        (None, None) => continue,
                    };
                    if let Ok(object) =
                        decode::<DesiredStateObject>(Table::DesiredStates, &change.key, bytes)
                    {
                        let object = match self.list_nodes_raw() {
                            Ok(nodes) if kind != ChangeType::Deleted => {
                                with_selected(&object, &nodes)
                            }
                            _ => object,
                        };
                        self.publish(Kind::DesiredState, kind, &name, &object);
                    }
                }
                Table::Rollouts if watching => {
                    if let Some(Ok(rollout)) = change
                        .value
                        .as_ref()
                        .map(|v| decode::<RolloutObject>(Table::Rollouts, &change.key, v))
                    {
                        self.publish(Kind::Rollout, ChangeType::Modified, &name, &rollout);
                    }
                }
                Table::Nodes => wake |= self.on_node_change(&name, change, now, watching),
                Table::Events => {
                    let Some(Ok(event)) = change
                        .value
                        .as_ref()
                        .map(|v| decode::<Event>(Table::Events, &change.key, v))
                    else {
                        continue;
                    };
                    if let Some(node) = &event.node {
                        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                        let queue = live.node_events.entry(node.clone()).or_default();
                        // Sequence numbers arrive in order: the newest goes last.
                        if queue.back().is_none_or(|last| *last < event.seq) {
                            queue.push_back(event.seq);
                        }
                    }
                    if watching {
                        self.publish(
                            Kind::Event,
                            ChangeType::Added,
                            &event.seq.to_string(),
                            &event,
                        );
                    }
                }
                _ => {}
            }
        }
        if wake {
            self.bump_epoch();
        }
        self.processed.send_replace(applied.last);
    }

    /// A node record written or removed: heartbeats, readiness and watchers follow.
    /// Returns whether its assignment may have changed.
    fn on_node_change(
        &self,
        name: &str,
        change: &store::Changed,
        now: SystemTime,
        watching: bool,
    ) -> bool {
        match &change.value {
            Some(bytes) => {
                let Ok(stored) = decode::<StoredNode>(Table::Nodes, &change.key, bytes) else {
                    return false;
                };
                let shape = node_shape(&stored.object);
                let reshaped = {
                    let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(at) = stored.object.status.last_heartbeat {
                        live.heartbeats.insert(name.to_string(), at);
                    }
                    live.shapes.insert(name.to_string(), shape) != Some(shape)
                };
                if watching {
                    if let Ok(object) = self.decorate(stored.object, now) {
                        let kind = if change.previous.is_none() {
                            ChangeType::Added
                        } else {
                            ChangeType::Modified
                        };
                        self.publish(Kind::Node, kind, name, &object);
                    }
                }
                reshaped
            }
            None => {
                {
                    let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                    live.heartbeats.remove(name);
                    live.ready.remove(name);
                    live.host_history.remove(name);
                    live.shapes.remove(name);
                    // Its history stays (it is about what happened) and ages out with the rest.
                    live.node_events.remove(name);
                }
                if watching {
                    if let Some(Ok(stored)) = change
                        .previous
                        .as_ref()
                        .map(|v| decode::<StoredNode>(Table::Nodes, &change.key, v))
                    {
                        self.publish(Kind::Node, ChangeType::Deleted, name, &stored.object);
                    }
                }
                true
            }
        }
    }

    /// Rebuilds everything derived from the store after the feed could not be followed
    /// (this replica fell too far behind).
    fn resync(&self) {
        tracing::warn!("rebuilding derived state from the store after missing changes");
        if let Err(error) = self.refresh() {
            tracing::error!(%error, "cannot rebuild the cache from the store");
        }
        if let Ok(nodes) = self.list_nodes_raw() {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            for node in nodes {
                let name = node.object.metadata.name.clone();
                live.shapes.insert(name.clone(), node_shape(&node.object));
                if let Some(at) = node.object.status.last_heartbeat {
                    live.heartbeats.insert(name, at);
                }
            }
        }
        self.bump_epoch();
        self.processed.send_replace(self.store.revision());
    }

    // ---- Leader election ------------------------------------------------------

    /// Whether this replica leads, and its fencing epoch. With a store no other process
    /// writes, this replica is the only one and always leads (epoch 0, never fenced).
    pub fn leader_epoch(&self) -> Option<u64> {
        if !self.store.is_shared() {
            return Some(0);
        }
        let state = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .held
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(epoch, _)| epoch)
    }

    /// This replica, and who leads.
    pub fn control_plane(&self) -> ControlPlane {
        let leader = self
            .store
            .is_shared()
            .then(|| {
                self.store
                    .get(Table::Leases, LEADER)
                    .and_then(|b| decode::<Lease>(Table::Leases, LEADER, &b).ok())
                    .map(|l| l.holder)
            })
            .flatten();
        ControlPlane {
            replica: self.identity.clone(),
            leading: self.leader_epoch().is_some(),
            leader,
            store: self.store.kind().to_string(),
            revision: self.store.revision(),
        }
    }

    /// When this replica became leader (its start, with a store of its own).
    fn leading_since(&self) -> SystemTime {
        if !self.store.is_shared() {
            return self.started;
        }
        let state = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        state.since.unwrap_or(self.started).max(self.started)
    }

    /// One round of leader election; the server runs it every third of the lease duration.
    pub async fn lease_tick(&self) -> Result<(), ApiError> {
        if !self.store.is_shared() {
            return Ok(());
        }
        let started = Instant::now();
        let duration = self.config.lease_duration;
        // A record that does not decode is no lease: it is overwritten.
        let read = |bytes: Option<Vec<u8>>| {
            bytes.and_then(|b| decode::<Lease>(Table::Leases, LEADER, &b).ok())
        };
        let record = read(self.store.get(Table::Leases, LEADER).map(|b| b.to_vec()));
        let decision = {
            let mut state = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
            state.observed = lease::observe(state.observed.take(), record.as_ref(), started);
            lease::decide(
                record.as_ref(),
                state.observed.as_ref(),
                &self.identity,
                started,
                SystemTime::now(),
                duration,
            )
        };
        let (expected, next) = match decision {
            lease::Decision::Follow { holder } => {
                let mut state = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
                if state.held.take().is_some() {
                    tracing::warn!(%holder, "this replica no longer leads");
                }
                return Ok(());
            }
            lease::Decision::Write { expected, lease } => (expected, lease),
        };
        let outcome = self
            .transact(|txn| {
                if read(txn.get(Table::Leases, LEADER)?) != expected {
                    return Err(ApiError::Conflict {
                        message: "the lease changed meanwhile".into(),
                        hint: String::new(),
                    });
                }
                txn.put(Table::Leases, LEADER, encode(&next))?;
                Ok(())
            })
            .await;
        let mut state = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(_) => {
                let was = state.held.map(|(epoch, _)| epoch);
                state.held = Some((next.epoch, lease::acts_until(started, duration)));
                if was != Some(next.epoch) {
                    state.since = Some(SystemTime::now());
                    tracing::info!(epoch = next.epoch, identity = %self.identity, "this replica leads");
                }
                Ok(())
            }
            // Another replica wrote it first: look again next tick.
            Err(TxnError::Aborted(_)) => Ok(()),
            Err(TxnError::Store(error)) => {
                if state.held.is_some_and(|(_, until)| Instant::now() >= until) {
                    state.held = None;
                    tracing::warn!(%error, "cannot renew the leader lease; this replica stops leading");
                }
                Err(error.into())
            }
        }
    }

    /// Inside a leader's transaction: refuses it unless the lease still names this replica
    /// with `epoch` (fencing: a deposed leader's decisions never land).
    fn fence(&self, txn: &dyn Txn, epoch: u64) -> Result<(), ApiError> {
        if !self.store.is_shared() {
            return Ok(());
        }
        match get_json::<Lease>(txn, Table::Leases, LEADER)? {
            Some(lease) if lease.holder == self.identity && lease.epoch == epoch => Ok(()),
            _ => Err(ApiError::Conflict {
                message: "this replica no longer leads".into(),
                hint: String::new(),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Subscribes to every change.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Subscribes to "some assignment may have changed".
    pub fn assignment_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
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

    fn bump_epoch(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Reloads the cache of DesiredStates, revisions in use and assignments from the store.
    pub fn refresh(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self
            .refreshing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut cache = Cache {
            revision: self.store.revision(),
            ..Cache::default()
        };
        for (key, value) in self.store.scan_prefix(Table::Rollouts, b"") {
            let name = String::from_utf8_lossy(&key).into_owned();
            let object = decode::<RolloutObject>(Table::Rollouts, &key, &value).map(Arc::new);
            cache.rollouts.insert(name, object);
        }
        for (key, value) in self.store.scan_prefix(Table::DesiredStates, b"") {
            let object: DesiredStateObject = decode(Table::DesiredStates, &key, &value)?;
            cache
                .states
                .insert(object.metadata.name.clone(), Arc::new(object));
        }
        for (key, value) in self.store.scan_prefix(Table::Assignments, b"") {
            let Some(split) = key.iter().position(|b| *b == 0) else {
                continue;
            };
            let node = String::from_utf8_lossy(&key[..split]).into_owned();
            let state = String::from_utf8_lossy(&key[split + 1..]).into_owned();
            let revision: u64 = decode(Table::Assignments, &key, &value)?;
            cache
                .assignments
                .entry(node)
                .or_default()
                .insert(state, revision);
        }
        let mut wanted: Vec<(String, u64)> = Vec::new();
        for state in cache.states.values() {
            wanted.push((state.metadata.name.clone(), state.status.revision));
            wanted.push((state.metadata.name.clone(), state.status.last_good_revision));
        }
        for per_node in cache.assignments.values() {
            wanted.extend(per_node.iter().map(|(s, r)| (s.clone(), *r)));
        }
        let old = self
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (state, revision) in wanted {
            if revision == 0 || cache.revisions.contains_key(&(state.clone(), revision)) {
                continue;
            }
            let revision_object = match old.revisions.get(&(state.clone(), revision)) {
                Some(cached) => Some(cached.clone()),
                None => self.stored_revision(&state, revision)?.map(Arc::new),
            };
            if let Some(revision_object) = revision_object {
                cache.revisions.insert((state, revision), revision_object);
            }
        }
        let mut current = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        // A refresh that read an older view than the one shown must not replace it.
        if current.revision <= cache.revision {
            *current = Arc::new(cache);
        }
        Ok(())
    }

    fn cache(&self) -> Arc<Cache> {
        self.cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    // ---- DesiredStates ------------------------------------------------------

    /// Stores every manifest in one transaction. With `dry_run`, reports what would happen and stores nothing.
    pub async fn apply(
        &self,
        inputs: Vec<ApplyInput>,
        dry_run: bool,
    ) -> Result<ApplyResponse, ApiError> {
        for input in &inputs {
            self.check_artifact_reuse(&input.object)?;
        }
        let now = SystemTime::now();
        let outcome = self.transact(|txn| -> Result<_, ApplyStop> {
            let version = txn.revision().to_string();
            // An Applied event per manifest, and a Superseded one where a rollout is replaced.
            let seqs: Vec<u64> = (0..inputs.len() * 2).map(|_| txn.next_id()).collect();
            let mut results = Vec::new();
            let mut written: Vec<(ChangeType, DesiredStateObject, Option<Revision>)> = Vec::new();
            for input in &inputs {
                let manifest = &input.object;
                let name = &manifest.metadata.name;
                let existing: Option<DesiredStateObject> =
                    get_json(txn, Table::DesiredStates, name.as_bytes())?;
                if let Some(expected) = &manifest.metadata.resource_version {
                    let actual = existing
                        .as_ref()
                        .map(|e| e.metadata.resource_version.as_str());
                    if actual != Some(expected.as_str()) {
                        return Err(ApplyStop::Error(ApiError::Conflict {
                            message: match actual {
                                Some(actual) => format!("DesiredState `{name}` changed since it was read: resourceVersion is {actual}, not {expected}"),
                                None => format!("DesiredState `{name}` does not exist, but the manifest names resourceVersion {expected}"),
                            },
                            hint: "fetch it again (`shoal get desiredstate NAME -o yaml`), redo your change, or drop metadata.resourceVersion to overwrite".into(),
                        }));
                    }
                }
                let (action, object, revision) = match existing {
                    None => {
                        let revision = Revision {
                            desired_state: name.clone(),
                            revision: 1,
                            created: now,
                            source: input.source.clone(),
                            spec: manifest.spec.clone(),
                        };
                        let object = DesiredStateObject {
                            api_version: API_VERSION.into(),
                            kind: KIND_DESIRED_STATE.into(),
                            metadata: StoredMeta {
                                name: name.clone(),
                                labels: manifest.metadata.labels.clone(),
                                annotations: manifest.metadata.annotations.clone(),
                                resource_version: version.clone(),
                                generation: 1,
                                creation_timestamp: Some(now),
                            },
                            spec: manifest.spec.clone(),
                            status: DesiredStateStatus {
                                revision: 1,
                                // Nothing is good yet: the rollout controller assigns revision 1 wave by wave.
                                last_good_revision: 0,
                                source: input.source.clone(),
                                selected_nodes: 0,
                            },
                        };
                        (ApplyAction::Created, object, Some(revision))
                    }
                    Some(mut object) => {
                        let spec_changed = object.spec != manifest.spec;
                        let meta_changed = object.metadata.labels != manifest.metadata.labels
                            || object.metadata.annotations != manifest.metadata.annotations;
                        if !spec_changed && !meta_changed {
                            results.push(ApplyResult {
                                kind: KIND_DESIRED_STATE.into(),
                                name: name.clone(),
                                action: ApplyAction::Unchanged,
                                revision: object.status.revision,
                                resource_version: object.metadata.resource_version.clone(),
                            });
                            continue;
                        }
                        object.metadata.labels = manifest.metadata.labels.clone();
                        object.metadata.annotations = manifest.metadata.annotations.clone();
                        object.metadata.resource_version = version.clone();
                        let mut revision = None;
                        if spec_changed {
                            let number = object.status.revision + 1;
                            revision = Some(Revision {
                                desired_state: name.clone(),
                                revision: number,
                                created: now,
                                source: input.source.clone(),
                                spec: manifest.spec.clone(),
                            });
                            object.spec = manifest.spec.clone();
                            object.metadata.generation = number;
                            object.status.revision = number;
                            object.status.source = input.source.clone();
                        }
                        (ApplyAction::Configured, object, revision)
                    }
                };
                results.push(ApplyResult {
                    kind: KIND_DESIRED_STATE.into(),
                    name: name.clone(),
                    action,
                    revision: object.status.revision,
                    resource_version: version.clone(),
                });
                txn.put(Table::DesiredStates, name.as_bytes(), encode(&object))?;
                if let Some(revision) = &revision {
                    txn.put(
                        Table::Revisions,
                        &store::revision_key(name, revision.revision),
                        encode(revision),
                    )?;
                }
                let change = if action == ApplyAction::Created {
                    ChangeType::Added
                } else {
                    ChangeType::Modified
                };
                written.push((change, object, revision));
            }
            if dry_run {
                return Err(ApplyStop::DryRun(results));
            }
            let mut events = Vec::new();
            for ((change, object, revision), seq) in written.iter().zip(seqs.iter().copied()) {
                let name = &object.metadata.name;
                let message = match (change, revision) {
                    (ChangeType::Added, _) => {
                        format!("created at revision {}", object.status.revision)
                    }
                    (_, Some(revision)) => format!("spec changed: revision {}", revision.revision),
                    _ => "labels or annotations changed".to_string(),
                };
                let event = self.new_event(
                    seq,
                    now,
                    EventType::Normal,
                    "Applied",
                    &format!("desiredstate/{name}"),
                    message,
                    None,
                    Some(name.clone()),
                    revision.as_ref().map(|r| r.revision),
                )?;
                txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
                events.push(event);
            }
            let mut rollouts = Vec::new();
            let mut seqs = seqs[inputs.len()..].iter().copied();
            for (_, object, revision) in &written {
                let seq = seqs.next().expect("one per input");
                let Some(revision) = revision else { continue };
                // The rollout exists from the moment its revision does, so `rollout status
                // --revision N`, `apply --wait` and `rollout pause` find it at once.
                let name = &object.metadata.name;
                let previous: Option<RolloutObject> =
                    get_json(txn, Table::Rollouts, name.as_bytes())?;
                // A pause holds across a new revision, as `kubectl rollout pause` does: the
                // operator stopped the group for a reason.
                let paused = previous
                    .as_ref()
                    .is_some_and(|r| r.status.phase == RolloutPhase::Paused);
                if let Some(old) = previous.filter(|r| !r.status.phase.is_terminal()) {
                    let event = self.new_event(
                        seq,
                        now,
                        EventType::Normal,
                        "Superseded",
                        &format!("rollout/{name}"),
                        format!(
                            "the rollout of revision {} ({}) is superseded by revision {}",
                            old.spec.revision,
                            old.status.phase.as_str(),
                            revision.revision
                        ),
                        None,
                        Some(name.clone()),
                        Some(old.spec.revision),
                    )?;
                    txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
                    events.push(event);
                }
                let mut rollout = crate::rollout::pending(object, now);
                rollout.metadata.resource_version = version.clone();
                if paused {
                    rollout.status.phase = RolloutPhase::Paused;
                    rollout.status.message = format!(
                        "paused, as the rollout it replaced was: `shoal rollout resume {name}` starts revision {}",
                        revision.revision
                    );
                }
                txn.put(Table::Rollouts, name.as_bytes(), encode(&rollout))?;
                rollouts.push(rollout);
            }
            Ok((results, written, events, rollouts))
        })
        .await;
        let ((results, written, events, _rollouts), revision) = match outcome {
            Ok(done) => done,
            Err(store::TxnError::Aborted(ApplyStop::DryRun(results))) => {
                return Ok(ApplyResponse {
                    dry_run: true,
                    results,
                })
            }
            Err(store::TxnError::Aborted(ApplyStop::Error(e))) => return Err(e),
            Err(store::TxnError::Store(e)) => return Err(e.into()),
        };
        if !written.is_empty() {
            // Durable before anyone is told: sled itself only flushes every 200 ms.
            self.store.flush().await?;
            self.caught_up(revision).await;
            self.after_events(&events).await?;
        }
        Ok(ApplyResponse { dry_run, results })
    }

    /// Refuses a component that pins an artifact an earlier revision pinned under another
    /// version: the node's cache is content-addressed, so it would serve the old file under
    /// the new version (a forgotten sha256, which no canary can catch).
    fn check_artifact_reuse(&self, manifest: &DesiredState) -> Result<(), ApiError> {
        let name = &manifest.metadata.name;
        let pinned: Vec<(usize, &manifests::Component, &str)> = manifest
            .spec
            .components
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.artifact.as_ref().map(|a| (i, c, a.sha256.as_str())))
            .collect();
        if pinned.is_empty() {
            return Ok(());
        }
        for (key, value) in self
            .store
            .scan_prefix(Table::Revisions, &store::revision_prefix(name))
        {
            let revision: Revision = decode(Table::Revisions, &key, &value)?;
            for earlier in &revision.spec.components {
                let Some(artifact) = &earlier.artifact else {
                    continue;
                };
                for (index, component, sha256) in &pinned {
                    if earlier.name == component.name
                        && artifact.sha256.eq_ignore_ascii_case(sha256)
                        && earlier.version != component.version
                    {
                        return Err(ApiError::invalid_field(
                            &format!("spec.components[{index}].artifact.sha256"),
                            format!(
                                "`{}` {} pins sha256 {sha256}, which revision {} of DesiredState `{name}` pinned for version {}",
                                component.name, version_text(&component.version), revision.revision, version_text(&earlier.version)
                            ),
                            format!(
                                "did you forget to update sha256? Nodes that have {} would run it as {}: put the sha256 of {} there",
                                version_text(&earlier.version), version_text(&component.version), artifact_name(&component.artifact)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes a DesiredState, its revisions and assignments. Nodes stop managing its components.
    pub async fn delete_desired_state(
        &self,
        name: &str,
        expected_version: Option<&str>,
    ) -> Result<DesiredStateObject, ApiError> {
        let assignments: Vec<Vec<u8>> = self
            .cache()
            .assignments
            .iter()
            .filter(|(_, per_node)| per_node.contains_key(name))
            .map(|(node, _)| store::assignment_key(node, name))
            .collect();
        let now = SystemTime::now();
        let ((object, event), _) = self.transact(|txn| -> Result<_, ApiError> {
            let seq = txn.next_id();
            let revisions = txn.scan_prefix(Table::Revisions, &store::revision_prefix(name))?;
            let object: DesiredStateObject = get_json(txn, Table::DesiredStates, name.as_bytes())?
                .ok_or_else(|| ApiError::NotFound {
                    kind: "DesiredState",
                    name: name.to_string(),
                })?;
            if let Some(expected) = expected_version {
                if object.metadata.resource_version != expected {
                    return Err(ApiError::Conflict {
                        message: format!(
                            "DesiredState `{name}` changed since it was read: resourceVersion is {}, not {expected}",
                            object.metadata.resource_version
                        ),
                        hint: "read it again and retry, or delete without a resourceVersion".into(),
                    });
                }
            }
            txn.delete(Table::DesiredStates, name.as_bytes())?;
            for (key, _) in &revisions {
                txn.delete(Table::Revisions, key)?;
            }
            for key in &assignments {
                txn.delete(Table::Assignments, key)?;
            }
            txn.delete(Table::Rollouts, name.as_bytes())?;
            let event = self.new_event(
                seq,
                now,
                EventType::Normal,
                "Deleted",
                &format!("desiredstate/{name}"),
                "deleted; nodes stop managing its components".into(),
                None,
                Some(name.to_string()),
                None,
            )?;
            txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
            Ok((object, event))
        })
        .await?;
        self.store.flush().await?;
        self.after_events(&[event]).await?;
        Ok(object)
    }

    /// One DesiredState, with the number of nodes it selects now.
    pub fn get_desired_state(&self, name: &str) -> Result<DesiredStateObject, ApiError> {
        let cache = self.cache();
        let object = cache.states.get(name).ok_or_else(|| ApiError::NotFound {
            kind: "DesiredState",
            name: name.to_string(),
        })?;
        Ok(with_selected(object, &self.list_nodes_raw()?))
    }

    /// Every DesiredState, by name.
    pub fn list_desired_states(&self) -> Result<Vec<DesiredStateObject>, ApiError> {
        let cache = self.cache();
        let nodes = self.list_nodes_raw()?;
        Ok(cache
            .states
            .values()
            .map(|object| with_selected(object, &nodes))
            .collect())
    }

    /// Every revision of a DesiredState, oldest first.
    pub fn revisions(&self, name: &str) -> Result<Vec<Revision>, ApiError> {
        if !self.cache().states.contains_key(name) {
            return Err(ApiError::NotFound {
                kind: "DesiredState",
                name: name.to_string(),
            });
        }
        self.store
            .scan_prefix(Table::Revisions, &store::revision_prefix(name))
            .into_iter()
            .map(|(k, v)| decode(Table::Revisions, &k, &v).map_err(ApiError::from))
            .collect()
    }

    // ---- Nodes --------------------------------------------------------------

    /// Registers (or re-registers) a node and issues a fresh node token.
    pub async fn register(
        &self,
        request: RegisterRequest,
        join_token: &str,
    ) -> Result<RegisterResponse, ApiError> {
        if !manifests::validate::is_dns_label(&request.name) {
            return Err(ApiError::invalid_field(
                "name",
                format!("`{}` is not a valid node name", request.name),
                "a node name is a DNS label: lowercase letters, digits and '-', at most 63 characters (nodelet --name)",
            ));
        }
        for (key, value) in &request.labels {
            if !manifests::validate::is_label_key(key)
                || !manifests::validate::is_label_value(value)
            {
                return Err(ApiError::invalid_field(
                    &format!("labels.{key}"),
                    format!("`{key}={value}` is not a valid label"),
                    "label keys are `name` or `prefix/name`, values at most 63 letters, digits, '-', '_' or '.'",
                ));
            }
        }
        let secret: [u8; 32] = rand::random();
        let token = format!("{}:{}", request.name, hex::encode(secret));
        let token_sha256 = sha256_hex(&token);
        let now = SystemTime::now();
        let ((node, event), _) = self
            .transact(|txn| -> Result<_, ApiError> {
                let version = txn.revision().to_string();
                let seq = txn.next_id();
                let existing: Option<StoredNode> =
                    get_json(txn, Table::Nodes, request.name.as_bytes())?;
                let reregistered = existing.is_some();
                let mut object = existing.map(|n| n.object).unwrap_or_else(|| NodeObject {
                    metadata: ObjectInfo {
                        name: request.name.clone(),
                        labels: BTreeMap::new(),
                        resource_version: String::new(),
                        creation_timestamp: Some(now),
                    },
                    status: NodeStatus::default(),
                });
                object.metadata.labels = request.labels.clone();
                object.metadata.resource_version = version.clone();
                let stored = StoredNode {
                    token_sha256: token_sha256.clone(),
                    joined_with: join_token.to_string(),
                    object: object.clone(),
                };
                txn.put(Table::Nodes, request.name.as_bytes(), encode(&stored))?;
                let event = self.put_node_event(
                    txn,
                    seq,
                    now,
                    if reregistered {
                        "Reregistered"
                    } else {
                        "Registered"
                    },
                    &request.name,
                    format!(
                        "joined with token `{join_token}`, labels {}",
                        format_labels(&request.labels)
                    ),
                )?;
                Ok((object, event))
            })
            .await?;
        // The node keeps only the token: losing its hash in a crash would lock the node out.
        self.store.flush().await?;
        let _ = node;
        self.after_events(&[event]).await?;
        Ok(RegisterResponse {
            name: request.name,
            token,
        })
    }

    /// True when `token` is the node token of `name` (compared in constant time).
    pub fn node_token_matches(&self, name: &str, token: &str) -> Result<bool, ApiError> {
        use subtle::ConstantTimeEq;
        let Some(stored) = self.find_node(name)? else {
            return Ok(false);
        };
        let presented = sha256_hex(token);
        Ok(bool::from(
            presented.as_bytes().ct_eq(stored.token_sha256.as_bytes()),
        ))
    }

    /// Stores a node's heartbeat report and turns its events into Events.
    pub async fn report(&self, name: &str, mut report: NodeReport) -> Result<(), ApiError> {
        let now = SystemTime::now();
        let mut node_events = std::mem::take(&mut report.events);
        if node_events.len() > MAX_EVENTS_PER_REPORT {
            // A flood (or a forgery) keeps its newest events and says what it lost.
            let sent = node_events.len();
            node_events.drain(..sent - MAX_EVENTS_PER_REPORT);
            node_events.push(NodeEvent {
                time: now,
                kind: EventType::Warning,
                reason: "EventsDropped".into(),
                message: format!(
                    "the node sent {sent} events in one report; kept the newest {MAX_EVENTS_PER_REPORT}"
                ),
                desired_state: None,
                revision: None,
                component: None,
            });
        }
        let ((object, events), _) = self
            .transact(|txn| -> Result<_, ApiError> {
                let version = txn.revision().to_string();
                let seqs: Vec<u64> = node_events.iter().map(|_| txn.next_id()).collect();
                let mut stored = node_in(txn, name)?;
                stored.object.status.last_heartbeat = Some(now);
                stored.object.status.healthy_received =
                    healthy_received(&stored.object.status.healthy_received, &report, now);
                stored.object.status.report = report.clone();
                stored.object.metadata.resource_version = version.clone();
                txn.put(Table::Nodes, name.as_bytes(), encode(&stored))?;
                let mut events = Vec::new();
                for (node_event, seq) in node_events.iter().zip(&seqs) {
                    let event = self.new_event(
                        *seq,
                        node_event.time,
                        node_event.kind,
                        &node_event.reason,
                        &format!("node/{name}"),
                        match &node_event.component {
                            // "demo: demo 1.2.0 failed" would say the name twice.
                            Some(component)
                                if !node_event.message.starts_with(component.as_str()) =>
                            {
                                format!("{component}: {}", node_event.message)
                            }
                            _ => node_event.message.clone(),
                        },
                        Some(name.to_string()),
                        node_event.desired_state.clone(),
                        node_event.revision,
                    )?;
                    txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
                    events.push(event);
                }
                Ok((stored.object, events))
            })
            .await?;
        // The node forgets its events once they are acknowledged, so those must be on disk.
        // A plain heartbeat is not flushed: the next one replaces it anyway.
        if !events.is_empty() {
            self.store.flush().await?;
        }
        if let Some(host) = &report.host {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let history = live.host_history.entry(name.to_string()).or_default();
            history.push_back(HostSample {
                time: now,
                metrics: host.clone(),
            });
            while history.len() > self.config.host_history {
                history.pop_front();
            }
        }
        let was_ready = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            live.heartbeats.insert(name.to_string(), now);
            live.ready.insert(name.to_string(), true)
        };
        // Readiness events are the leader's to raise (a follower's view of who was NotReady
        // is its own); the leader's sweep notices a node heard by another replica.
        if was_ready == Some(false) && self.leader_epoch().is_some() {
            self.node_readiness_event(name, true, now).await?;
        }
        let _ = object;
        self.after_events(&events).await?;
        Ok(())
    }

    fn list_nodes_raw(&self) -> Result<Vec<StoredNode>, StoreError> {
        self.store
            .scan_prefix(Table::Nodes, b"")
            .into_iter()
            .map(|(k, v)| decode(Table::Nodes, &k, &v))
            .collect()
    }

    fn fresh(&self, heartbeat: SystemTime, now: SystemTime) -> bool {
        now.duration_since(heartbeat).unwrap_or_default() <= self.config.ready_grace
    }

    fn is_ready(&self, node: &NodeObject, now: SystemTime) -> bool {
        node.status
            .last_heartbeat
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() <= self.config.ready_grace)
    }

    /// Adds the computed conditions and the host history to a stored node.
    fn decorate(&self, mut node: NodeObject, now: SystemTime) -> Result<NodeObject, ApiError> {
        let assignment = self.assignment_for(&node);
        node.status.conditions = conditions(&node, &assignment, self.is_ready(&node, now));
        if let Some(history) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .host_history
            .get(&node.metadata.name)
        {
            node.status.host_history = history.iter().cloned().collect();
        }
        Ok(node)
    }

    /// A node's stored record, if it is registered.
    fn find_node(&self, name: &str) -> Result<Option<StoredNode>, StoreError> {
        self.store
            .get(Table::Nodes, name.as_bytes())
            .map(|bytes| decode(Table::Nodes, name.as_bytes(), &bytes))
            .transpose()
    }

    /// A node's stored record, or 404.
    fn stored_node(&self, name: &str) -> Result<StoredNode, ApiError> {
        self.find_node(name)?.ok_or_else(|| ApiError::NotFound {
            kind: "Node",
            name: name.to_string(),
        })
    }

    /// One node with its conditions.
    pub fn get_node(&self, name: &str) -> Result<NodeObject, ApiError> {
        self.decorate(self.stored_node(name)?.object, SystemTime::now())
    }

    /// Every node with its conditions, by name.
    pub fn list_nodes(&self) -> Result<Vec<NodeObject>, ApiError> {
        let now = SystemTime::now();
        self.list_nodes_raw()?
            .into_iter()
            .map(|n| self.decorate(n.object, now))
            .collect()
    }

    /// Reports nodes whose readiness changed since the last sweep; run periodically.
    pub async fn sweep_readiness(&self, now: SystemTime) -> Result<(), ApiError> {
        // From the in-memory heartbeat times: with 10,000 nodes, decoding every record
        // every two seconds was a visible share of the apiserver's CPU.
        let mut flipped = Vec::new();
        {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let states: Vec<(String, bool)> = live
                .heartbeats
                .iter()
                .map(|(name, at)| (name.clone(), self.fresh(*at, now)))
                .collect();
            for (name, ready) in states {
                // A node seen for the first time (its first heartbeat, or one another
                // replica heard) turns nothing.
                if live.ready.insert(name.clone(), ready) == Some(!ready) {
                    flipped.push((name, ready));
                }
            }
        }
        // Every replica tracks readiness; only the leader reports its transitions.
        if self.leader_epoch().is_none() {
            return Ok(());
        }
        for (name, ready) in flipped {
            self.node_readiness_event(&name, ready, now).await?;
        }
        Ok(())
    }

    async fn node_readiness_event(
        &self,
        name: &str,
        ready: bool,
        now: SystemTime,
    ) -> Result<(), ApiError> {
        let (kind, reason, message) = if ready {
            (
                EventType::Normal,
                "NodeReady",
                "heartbeats resumed".to_string(),
            )
        } else {
            (
                EventType::Warning,
                "NodeNotReady",
                format!(
                    "no heartbeat for more than {}s",
                    self.config.ready_grace.as_secs()
                ),
            )
        };
        self.record_event(
            now,
            kind,
            reason,
            &format!("node/{name}"),
            message,
            Some(name.to_string()),
            None,
            None,
        )
        .await?;
        if self.changes.receiver_count() > 0 {
            if let Ok(node) = self.get_node(name) {
                self.publish(Kind::Node, ChangeType::Modified, name, &node);
            }
        }
        Ok(())
    }

    /// Cordons a node (it takes no new revision and keeps the ones it is assigned now) or
    /// uncordons it. Idempotent, like `kubectl cordon`.
    pub async fn set_cordon(
        &self,
        name: &str,
        cordon: bool,
        actor: &str,
    ) -> Result<NodeObject, ApiError> {
        let stored = self.stored_node(name)?;
        if stored.object.status.cordoned.is_some() == cordon {
            return self.get_node(name);
        }
        let now = SystemTime::now();
        let states: Vec<String> = self.cache().states.keys().cloned().collect();
        let ((node, event), _) = self
            .transact(|txn| -> Result<_, ApiError> {
                let version = txn.revision().to_string();
                let seq = txn.next_id();
                let mut stored = node_in(txn, name)?;
                // What it is assigned now, read in this transaction: a wave that starts
                // meanwhile either lands before (and is kept) or conflicts and retries.
                let mut keep = BTreeMap::new();
                for state_name in &states {
                    let Some(state) = get_json::<DesiredStateObject>(
                        txn,
                        Table::DesiredStates,
                        state_name.as_bytes(),
                    )?
                    else {
                        continue;
                    };
                    if !state.spec.selector.matches(&stored.object.metadata.labels) {
                        continue;
                    }
                    let key = store::assignment_key(name, state_name);
                    let revision = match txn.get(Table::Assignments, &key)? {
                        Some(bytes) => decode::<u64>(Table::Assignments, &key, &bytes)?,
                        None => state.status.last_good_revision,
                    };
                    if revision > 0 {
                        keep.insert(state_name.clone(), revision);
                    }
                }
                let (reason, message) = if cordon {
                    stored.object.status.cordoned = Some(Cordon {
                        since: now,
                        by: actor.to_string(),
                        revisions: keep.clone(),
                    });
                    let kept = if keep.is_empty() {
                        "nothing".to_string()
                    } else {
                        keep.iter()
                            .map(|(s, r)| format!("{s}@{r}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    (
                        "NodeCordoned",
                        format!("cordoned by {actor}: takes no new revision, keeps {kept}"),
                    )
                } else {
                    stored.object.status.cordoned = None;
                    (
                        "NodeUncordoned",
                        format!("uncordoned by {actor}: follows its rollouts again"),
                    )
                };
                stored.object.metadata.resource_version = version.clone();
                txn.put(Table::Nodes, name.as_bytes(), encode(&stored))?;
                let event = self.put_node_event(txn, seq, now, reason, name, message)?;
                Ok((stored.object, event))
            })
            .await?;
        self.store.flush().await?;
        let node = self.decorate(node, now)?;
        self.after_events(&[event]).await?;
        Ok(node)
    }

    /// Forgets a node: its record, its token and its assignments. A nodelet that comes back
    /// must join again.
    pub async fn delete_node(&self, name: &str, actor: &str) -> Result<NodeObject, ApiError> {
        // Every DesiredState's key, not only those the cache shows assigned: a wave that
        // started since the cache was built must not leave a row for a rejoining namesake.
        let assignments: Vec<Vec<u8>> = self
            .cache()
            .states
            .keys()
            .map(|state| store::assignment_key(name, state))
            .collect();
        let now = SystemTime::now();
        let ((node, event), _) = self.transact(|txn| -> Result<_, ApiError> {
            let seq = txn.next_id();
            let stored = node_in(txn, name)?;
            txn.delete(Table::Nodes, name.as_bytes())?;
            for key in &assignments {
                txn.delete(Table::Assignments, key)?;
            }
            let event = self.put_node_event(
                txn,
                seq,
                now,
                "NodeDeleted",
                name,
                format!("deleted by {actor}: its token no longer works; a nodelet that comes back must join again"),
            )?;
            Ok((stored.object, event))
        })
        .await?;
        self.store.flush().await?;
        self.after_events(&[event]).await?;
        Ok(node)
    }

    // ---- Assignments --------------------------------------------------------

    /// What `node` should run now.
    pub fn assignment(&self, node: &str) -> Result<NodeAssignment, ApiError> {
        Ok(self.assignment_for(&self.stored_node(node)?.object))
    }

    fn assignment_for(&self, node: &NodeObject) -> NodeAssignment {
        let cache = self.cache();
        let name = &node.metadata.name;
        let assigned = cache.assignments.get(name);
        let mut states = Vec::new();
        for state in cache.states.values() {
            if !state.spec.selector.matches(&node.metadata.labels) {
                continue;
            }
            let state_name = &state.metadata.name;
            let revision = match &node.status.cordoned {
                // Cordoned: what it had, and nothing new.
                Some(cordon) => cordon.revisions.get(state_name).copied().unwrap_or(0),
                None => assigned
                    .and_then(|a| a.get(state_name).copied())
                    .unwrap_or(state.status.last_good_revision),
            };
            if revision == 0 {
                continue; // nothing good to run yet; the rollout controller assigns the first revision
            }
            let revision_object = match cache.revisions.get(&(state_name.clone(), revision)) {
                Some(cached) => cached.clone(),
                // Only a cordoned node keeps a revision the cache may not hold.
                // An unreadable one is skipped like a missing one: the node keeps what it runs.
                None => match self.stored_revision(state_name, revision) {
                    Ok(Some(stored)) => Arc::new(stored),
                    _ => continue,
                },
            };
            states.push(AssignedState {
                name: state_name.clone(),
                revision,
                commit: revision_object.source.commit.clone(),
                spec: revision_object.spec.clone(),
            });
        }
        // A component pinned by two DesiredStates that select this node is applied by neither —
        // judged on their newest specs too, so a conflict shows before any rollout reaches the node.
        let mut owners: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for state in cache
            .states
            .values()
            .filter(|s| s.spec.selector.matches(&node.metadata.labels))
        {
            let assigned = states.iter().find(|a| a.name == state.metadata.name);
            let names: std::collections::BTreeSet<&str> = state
                .spec
                .components
                .iter()
                .chain(assigned.iter().flat_map(|a| a.spec.components.iter()))
                .map(|c| c.name.as_str())
                .collect();
            for component in names {
                owners
                    .entry(component)
                    .or_default()
                    .push(state.metadata.name.clone());
            }
        }
        let conflicts: Vec<ComponentConflict> = owners
            .into_iter()
            .filter(|(_, owners)| owners.len() > 1)
            .map(|(component, desired_states)| ComponentConflict {
                component: component.to_string(),
                desired_states,
            })
            .collect();
        if !conflicts.is_empty() {
            for state in &mut states {
                state.spec.components.retain(|c| {
                    !conflicts
                        .iter()
                        .any(|conflict| conflict.component == c.name)
                });
            }
        }
        let mut assignment = NodeAssignment {
            node: name.clone(),
            generation: 0,
            states,
            conflicts,
        };
        let digest =
            Sha256::digest(serde_json::to_vec(&assignment).expect("assignments serialize"));
        // 53 bits, so that JavaScript clients read the number exactly.
        assignment.generation = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) >> 11;
        assignment
    }

    /// One revision as stored, if it exists.
    fn stored_revision(&self, name: &str, revision: u64) -> Result<Option<Revision>, StoreError> {
        let key = store::revision_key(name, revision);
        self.store
            .get(Table::Revisions, &key)
            .map(|bytes| decode(Table::Revisions, &key, &bytes))
            .transpose()
    }

    // ---- Events -------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn new_event(
        &self,
        seq: u64,
        time: SystemTime,
        kind: EventType,
        reason: &str,
        object: &str,
        message: String,
        node: Option<String>,
        desired_state: Option<String>,
        revision: Option<u64>,
    ) -> Result<Event, StoreError> {
        Ok(Event {
            seq,
            time,
            kind,
            reason: reason.to_string(),
            object: object.to_string(),
            message,
            node,
            desired_state,
            revision,
        })
    }

    /// Writes a Normal event about node `node` inside a transaction.
    fn put_node_event(
        &self,
        txn: &mut dyn Txn,
        seq: u64,
        now: SystemTime,
        reason: &str,
        node: &str,
        message: String,
    ) -> Result<Event, StoreError> {
        let event = self.new_event(
            seq,
            now,
            EventType::Normal,
            reason,
            &format!("node/{node}"),
            message,
            Some(node.to_string()),
            None,
            None,
        )?;
        txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
        Ok(event)
    }

    /// Records one event on its own.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_event(
        &self,
        time: SystemTime,
        kind: EventType,
        reason: &str,
        object: &str,
        message: String,
        node: Option<String>,
        desired_state: Option<String>,
        revision: Option<u64>,
    ) -> Result<Event, ApiError> {
        let (event, _) = self
            .transact(|txn| {
                let event = self.new_event(
                    txn.next_id(),
                    time,
                    kind,
                    reason,
                    object,
                    message.clone(),
                    node.clone(),
                    desired_state.clone(),
                    revision,
                )?;
                txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
                Ok::<_, StoreError>(event)
            })
            .await?;
        self.after_events(std::slice::from_ref(&event)).await?;
        Ok(event)
    }

    async fn after_events(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        // Each node's share of the retention: one node's flood evicts its own history only.
        let over_share: Vec<Vec<u8>> = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let nodes = live.node_events.len().max(live.heartbeats.len()).max(1);
            let share = (self.config.event_retention / nodes).max(MIN_NODE_EVENT_SHARE);
            let mut drop = Vec::new();
            // The feed handler queued these events already (the writer waited for it).
            for event in events {
                let Some(node) = &event.node else { continue };
                let queue = live.node_events.entry(node.clone()).or_default();
                while queue.len() > share {
                    if let Some(seq) = queue.pop_front() {
                        drop.push(seq.to_be_bytes().to_vec());
                    }
                }
            }
            drop
        };
        if !over_share.is_empty() {
            self.store.remove_keys(Table::Events, &over_share).await?;
        }
        let count = self.store.len(Table::Events);
        if count > self.config.event_retention {
            let excess = count - self.config.event_retention;
            let oldest = self.store.scan_from(Table::Events, b"", excess);
            {
                let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                for (key, value) in &oldest {
                    if let Ok(Event {
                        node: Some(node),
                        seq,
                        ..
                    }) = decode::<Event>(Table::Events, key, value)
                    {
                        if let Some(queue) = live.node_events.get_mut(&node) {
                            queue.retain(|s| *s != seq);
                        }
                    }
                }
            }
            let keys: Vec<Vec<u8>> = oldest.into_iter().map(|(k, _)| k).collect();
            self.store.remove_keys(Table::Events, &keys).await?;
        }
        Ok(())
    }

    /// Events after sequence number `after`, oldest first, at most `limit`, optionally about one object.
    pub fn events(
        &self,
        after: u64,
        limit: usize,
        about: Option<&str>,
    ) -> Result<Vec<Event>, ApiError> {
        let start = (after.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        // Filtering happens after the scan, so read in pages until enough match.
        let mut cursor = start.to_vec();
        loop {
            let page = self.store.scan_from(Table::Events, &cursor, 1000);
            let done = page.len() < 1000;
            for (key, value) in &page {
                let event: Event = decode(Table::Events, key, value)?;
                let relevant = match about {
                    None => true,
                    Some(about) => {
                        event.object == about
                            || event
                                .node
                                .as_deref()
                                .is_some_and(|n| about == format!("node/{n}"))
                            || event.desired_state.as_deref().is_some_and(|d| {
                                about == format!("desiredstate/{d}")
                                    || about == format!("rollout/{d}")
                            })
                    }
                };
                if relevant {
                    out.push(event);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            match page.last() {
                Some((key, _)) if !done => {
                    let next = u64::from_be_bytes(key.as_slice().try_into().unwrap_or([0xff; 8]))
                        .saturating_add(1);
                    cursor = next.to_be_bytes().to_vec();
                }
                _ => return Ok(out),
            }
        }
    }

    // ---- Rollouts (stored by the rollout controller) ------------------------

    /// One rollout.
    pub fn get_rollout(&self, name: &str) -> Result<RolloutObject, ApiError> {
        // From the cache, which shows a rollout only together with the assignments it made.
        match self.cache().rollouts.get(name) {
            Some(Ok(rollout)) => Ok(RolloutObject::clone(rollout)),
            Some(Err(e)) => Err(ApiError::Store(e.clone())),
            None => Err(ApiError::NotFound {
                kind: "Rollout",
                name: name.to_string(),
            }),
        }
    }

    /// Every rollout, by name.
    pub fn list_rollouts(&self) -> Result<Vec<RolloutObject>, ApiError> {
        Ok(self
            .cache()
            .rollouts
            .values()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| RolloutObject::clone(r))
            .collect())
    }

    /// The rollout controller's view of every node for one DesiredState.
    pub fn node_views(
        &self,
        desired_state: &str,
        now: SystemTime,
    ) -> Result<Vec<crate::rollout::NodeView>, ApiError> {
        let cache = self.cache();
        // DesiredStates that pin a component this one pins: a node both select is in conflict.
        let rivals: Vec<(Arc<DesiredStateObject>, Vec<String>)> =
            match cache.states.get(desired_state) {
                None => vec![],
                Some(own) => cache
                    .states
                    .values()
                    .filter(|other| other.metadata.name != desired_state)
                    .filter_map(|other| {
                        let shared: Vec<String> = own
                            .spec
                            .components
                            .iter()
                            .filter(|c| other.spec.components.iter().any(|o| o.name == c.name))
                            .map(|c| c.name.clone())
                            .collect();
                        (!shared.is_empty()).then(|| (other.clone(), shared))
                    })
                    .collect(),
            };
        Ok(self
            .list_nodes_raw()?
            .into_iter()
            .map(|stored| {
                let node = stored.object;
                let report = &node.status.report;
                let applied = report
                    .applied
                    .iter()
                    .find(|a| a.desired_state == desired_state)
                    .cloned();
                let conflicts: Vec<String> = rivals
                    .iter()
                    .filter(|(other, _)| other.spec.selector.matches(&node.metadata.labels))
                    .flat_map(|(other, shared)| {
                        shared.iter().map(move |c| {
                            format!(
                                "{c} is pinned by {desired_state} and {}",
                                other.metadata.name
                            )
                        })
                    })
                    .collect();
                let healthy_received = node
                    .status
                    .healthy_received
                    .get(desired_state)
                    .map(|h| (h.revision, h.at));
                let failure: Vec<String> = report
                    .components
                    .iter()
                    .filter(|c| c.desired_state == desired_state)
                    .filter(|c| {
                        matches!(c.phase, ComponentPhase::Reverted | ComponentPhase::Failed)
                    })
                    .map(|c| {
                        let mut text = format!("{} {:?}", c.name, c.phase);
                        if let Some(message) = &c.message {
                            text.push_str(&format!(": {message}"));
                        }
                        if let Some(output) = &c.probe_output {
                            text.push_str(&format!(
                                " (probe: {})",
                                output.lines().next().unwrap_or("")
                            ));
                        }
                        // The component's own last words: what an operator reads first.
                        let tail: Vec<&str> = c
                            .log_tail
                            .iter()
                            .rev()
                            .take(2)
                            .rev()
                            .map(|l| l.trim())
                            .filter(|l| !l.is_empty())
                            .collect();
                        if !tail.is_empty() {
                            let log: String = tail.join(" / ").chars().take(300).collect();
                            text.push_str(&format!(" (log: {log})"));
                        }
                        text
                    })
                    .collect();
                crate::rollout::NodeView {
                    // A node that registered and never reported is not available: a wave
                    // goes on without it (within maxUnavailable) or waits for it.
                    ready: self.is_ready(&node, now),
                    cordoned: node.status.cordoned.is_some(),
                    last_report: node.status.last_heartbeat,
                    healthy_received,
                    name: node.metadata.name,
                    labels: node.metadata.labels,
                    applied,
                    failure: (!failure.is_empty()).then(|| failure.join("; ")),
                    conflict: (!conflicts.is_empty()).then(|| conflicts.join("; ")),
                }
            })
            .collect())
    }

    /// One tick of the rollout controller over every DesiredState. One DesiredState's
    /// failure (an error, or a panic in its decision) is that DesiredState's problem: it is
    /// logged, raises a Warning event on it, and is retried with backoff, while every other
    /// DesiredState keeps rolling (kube-rs's `error_policy`).
    pub async fn reconcile_rollouts(&self, now: SystemTime) -> Result<(), ApiError> {
        // Only the leader decides; its decisions carry its epoch, so a deposed leader's
        // last decision is refused by the store.
        let Some(epoch) = self.leader_epoch() else {
            return Ok(());
        };
        let states: Vec<Arc<DesiredStateObject>> = self.cache().states.values().cloned().collect();
        for state in states {
            let name = state.metadata.name.clone();
            let due = {
                let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                live.rollout_backoff
                    .get(&name)
                    .is_none_or(|b| now >= b.retry_at)
            };
            if !due {
                continue;
            }
            let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                self.reconcile_one(&state, now, epoch),
            ))
            .await;
            let error = match outcome {
                Ok(Ok(())) => {
                    let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                    if live.rollout_backoff.remove(&name).is_some() {
                        tracing::info!(desired_state = %name, "rollout decisions work again");
                    }
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(panic) => format!(
                    "the rollout decision panicked: {}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)")
                ),
            };
            let (failures, delay) = {
                let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                let backoff = live.rollout_backoff.entry(name.clone()).or_default();
                backoff.failures = backoff.failures.saturating_add(1);
                // 1 s, 2 s, 4 s … up to 5 minutes.
                let delay = Duration::from_secs(1u64 << (backoff.failures - 1).min(9))
                    .min(Duration::from_secs(300));
                backoff.retry_at = now + delay;
                (backoff.failures, delay)
            };
            tracing::error!(desired_state = %name, failures, error = %error, retry_in = ?delay, "rollout decision failed");
            // One event per failure streak, not one per retry.
            if failures == 1 {
                let _ = self
                    .record_event(
                        now,
                        EventType::Warning,
                        "RolloutError",
                        &format!("rollout/{name}"),
                        format!(
                            "{error}; retried with backoff, other DesiredStates are not affected"
                        ),
                        None,
                        Some(name.clone()),
                        Some(state.status.revision),
                    )
                    .await;
            }
        }
        Ok(())
    }

    async fn reconcile_one(
        &self,
        state: &DesiredStateObject,
        now: SystemTime,
        epoch: u64,
    ) -> Result<(), ApiError> {
        let name = &state.metadata.name;
        let current = match self.get_rollout(name) {
            Ok(rollout) => Some(rollout),
            Err(ApiError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        // Only a pending revision or a rollout in flight has anything to decide (exactly when
        // `step` can return an update); skip reading every node otherwise.
        let revision = state.status.revision;
        let untracked = revision > state.status.last_good_revision
            && current.as_ref().is_none_or(|r| r.spec.revision != revision);
        let in_flight = current.as_ref().is_some_and(|r| {
            matches!(
                r.status.phase,
                RolloutPhase::Pending | RolloutPhase::Progressing
            ) && r.spec.revision == revision
        });
        if !untracked && !in_flight {
            return Ok(());
        }
        let nodes = self.node_views(name, now)?;
        // After a restart, nodes get a heartbeat's grace to be heard before deadlines count:
        // an outage of the apiserver is not the nodes' silence.
        // Likewise after a takeover: nodes that talked to the old leader need a moment to
        // find this one.
        let judge_from = self.leading_since() + self.config.ready_grace;
        if let Some(update) =
            crate::rollout::decide(state, current.as_ref(), &nodes, now, Some(judge_from))
        {
            self.write_rollout(
                name,
                current
                    .as_ref()
                    .map(|r| r.metadata.resource_version.clone()),
                update,
                now,
                Some(epoch),
            )
            .await?;
        }
        Ok(())
    }

    /// Stores a rollout decision in one transaction: the rollout, assignments, last good revision, events.
    async fn write_rollout(
        &self,
        name: &str,
        expected: Option<String>,
        update: crate::rollout::Update,
        now: SystemTime,
        fence: Option<u64>,
    ) -> Result<bool, ApiError> {
        let existing_assignments: Vec<Vec<u8>> = self
            .cache()
            .assignments
            .iter()
            .filter(|(_, per_node)| per_node.contains_key(name))
            .map(|(node, _)| store::assignment_key(node, name))
            .collect();
        let base_rollout = update.rollout.clone();
        // Rolled back: a cordoned node pinned to the aborted revision (or to any revision
        // that never became good) goes back to the last good one like every other node.
        let rolled_back = update.clear_assignments
            && update.last_good.is_none()
            && base_rollout.status.phase == RolloutPhase::RolledBack;
        let pinned: Vec<String> = if rolled_back {
            self.list_nodes_raw()?
                .into_iter()
                .filter(|n| {
                    n.object.status.cordoned.as_ref().is_some_and(|c| {
                        c.revisions
                            .get(name)
                            .is_some_and(|r| *r > base_rollout.spec.from_revision)
                    })
                })
                .map(|n| n.object.metadata.name)
                .collect()
        } else {
            vec![]
        };
        let events = self
            .transact(|txn| -> Result<_, ApiError> {
                if let Some(epoch) = fence {
                    self.fence(txn, epoch)?;
                }
                let version = txn.revision().to_string();
                let seqs: Vec<u64> = update.events.iter().map(|_| txn.next_id()).collect();
                let mut rollout = base_rollout.clone();
                rollout.metadata.resource_version = version.clone();
                // Another writer (pause, undo) got there first: decide again next tick.
                let stored: Option<RolloutObject> =
                    get_json(txn, Table::Rollouts, name.as_bytes())?;
                if stored.map(|r| r.metadata.resource_version) != expected {
                    return Err(ApiError::Conflict {
                        message: "rollout changed meanwhile".into(),
                        hint: String::new(),
                    });
                }
                // Deleted since the tick read it: a rollout must not outlive its DesiredState.
                // Applied since: the decision was about an older revision.
                let state: Option<DesiredStateObject> =
                    get_json(txn, Table::DesiredStates, name.as_bytes())?;
                if state.is_none_or(|s| s.status.revision != rollout.spec.revision) {
                    return Err(ApiError::Conflict {
                        message: "DesiredState deleted or applied meanwhile".into(),
                        hint: String::new(),
                    });
                }
                txn.put(Table::Rollouts, name.as_bytes(), encode(&rollout))?;
                for node_name in &pinned {
                    if let Some(mut node) =
                        get_json::<StoredNode>(txn, Table::Nodes, node_name.as_bytes())?
                    {
                        if let Some(cordon) = &mut node.object.status.cordoned {
                            match rollout.spec.from_revision {
                                0 => cordon.revisions.remove(name),
                                good => cordon.revisions.insert(name.to_string(), good),
                            };
                        }
                        node.object.metadata.resource_version = version.clone();
                        txn.put(Table::Nodes, node_name.as_bytes(), encode(&node))?;
                    }
                }
                if update.clear_assignments {
                    for key in &existing_assignments {
                        txn.delete(Table::Assignments, key)?;
                    }
                }
                for (node, revision) in &update.assign {
                    txn.put(
                        Table::Assignments,
                        &store::assignment_key(node, name),
                        encode(revision),
                    )?;
                }
                if let Some(good) = update.last_good {
                    if let Some(mut state) =
                        get_json::<DesiredStateObject>(txn, Table::DesiredStates, name.as_bytes())?
                    {
                        state.status.last_good_revision = good;
                        state.metadata.resource_version = version.clone();
                        txn.put(Table::DesiredStates, name.as_bytes(), encode(&state))?;
                    }
                }
                let mut events = Vec::new();
                for ((kind, reason, message), seq) in update.events.iter().zip(&seqs) {
                    let event = self.new_event(
                        *seq,
                        now,
                        *kind,
                        reason,
                        &format!("rollout/{name}"),
                        message.clone(),
                        None,
                        Some(name.to_string()),
                        Some(rollout.spec.revision),
                    )?;
                    txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
                    events.push(event);
                }
                Ok((events, rollout))
            })
            .await;
        let events = match events {
            Err(store::TxnError::Aborted(ApiError::Conflict { .. })) => return Ok(false),
            other => other?.0 .0,
        };
        self.store.flush().await?;
        self.after_events(&events).await?;
        Ok(true)
    }

    /// Pause or resume a rollout (operator verbs).
    pub async fn set_rollout_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<RolloutObject, ApiError> {
        let current = self.get_rollout(name)?;
        // A rollout is paused before its first wave as well as during one (`apply` then
        // `rollout pause` at once); resumed, an unplanned one is planned on the next tick.
        let (from, to): (&[RolloutPhase], RolloutPhase) = if paused {
            (
                &[RolloutPhase::Pending, RolloutPhase::Progressing],
                RolloutPhase::Paused,
            )
        } else {
            (&[RolloutPhase::Paused], RolloutPhase::Progressing)
        };
        if !from.contains(&current.status.phase) {
            return Err(ApiError::Conflict {
                message: format!(
                    "rollout `{name}` of revision {} is {}, not {}",
                    current.spec.revision,
                    current.status.phase.as_str(),
                    from.iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
                hint: "see `shoal rollout status NAME`".into(),
            });
        }
        let mut next = current.clone();
        next.status.phase = to;
        if !paused && next.status.wave_started.is_some() {
            // A pause must not eat the wave's deadline.
            next.status.wave_started = Some(SystemTime::now());
        }
        let reason = if paused {
            "RolloutPaused"
        } else {
            "RolloutResumed"
        };
        let update = crate::rollout::Update {
            rollout: next,
            assign: vec![],
            clear_assignments: false,
            last_good: None,
            events: vec![(
                EventType::Normal,
                reason.into(),
                format!("revision {}", current.spec.revision),
            )],
        };
        let written = self
            .write_rollout(
                name,
                Some(current.metadata.resource_version.clone()),
                update,
                SystemTime::now(),
                None,
            )
            .await?;
        if !written {
            return Err(ApiError::Conflict {
                message: format!("rollout `{name}` changed while pausing or resuming it"),
                hint: "look at `shoal rollout status NAME` and try again".into(),
            });
        }
        self.get_rollout(name)
    }

    /// Rolls back by applying an earlier revision's spec as a new revision (`undo`).
    pub async fn undo(
        &self,
        name: &str,
        to_revision: Option<u64>,
        actor: &str,
    ) -> Result<ApplyResponse, ApiError> {
        let state = self.get_desired_state(name)?;
        let target = match to_revision {
            Some(r) => r,
            None if state.status.last_good_revision > 0
                && state.status.last_good_revision < state.status.revision =>
            {
                state.status.last_good_revision
            }
            None => state.status.revision.saturating_sub(1),
        };
        let revision = self.stored_revision(name, target)?.ok_or_else(|| {
            ApiError::invalid_field(
                "toRevision",
                format!("DesiredState `{name}` has no revision {target}"),
                "list them with `shoal rollout history NAME`",
            )
        })?;
        let manifest = DesiredState {
            api_version: API_VERSION.into(),
            kind: KIND_DESIRED_STATE.into(),
            metadata: manifests::ObjectMeta {
                name: name.to_string(),
                labels: state.metadata.labels.clone(),
                annotations: state.metadata.annotations.clone(),
                resource_version: None,
            },
            spec: revision.spec,
        };
        let source = RevisionSource {
            kind: "undo".into(),
            actor: Some(actor.to_string()),
            subject: Some(format!("undo to revision {target}")),
            ..RevisionSource::default()
        };
        self.apply(
            vec![ApplyInput {
                object: manifest,
                source,
            }],
            false,
        )
        .await
    }

    // ---- Summary ------------------------------------------------------------

    /// The fleet at a glance.
    pub fn summary(&self) -> Result<Summary, ApiError> {
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

fn version_text(version: &Option<String>) -> &str {
    version.as_deref().unwrap_or("(no version)")
}

fn artifact_name(artifact: &Option<manifests::Artifact>) -> String {
    artifact
        .as_ref()
        .map(|a| a.url.rsplit('/').next().unwrap_or(&a.url).to_string())
        .unwrap_or_default()
}

/// When the server first received Healthy for each DesiredState the report says is Healthy:
/// kept while the node reports the same healthy spell (revision and its own `healthySince`),
/// restarted with a new one, dropped when it is not Healthy. The server's clock only.
fn healthy_received(
    before: &BTreeMap<String, HealthyReceived>,
    report: &NodeReport,
    now: SystemTime,
) -> BTreeMap<String, HealthyReceived> {
    report
        .applied
        .iter()
        .filter(|a| a.phase == ComponentPhase::Healthy)
        .map(|a| {
            let kept = before
                .get(&a.desired_state)
                .filter(|h| h.revision == a.revision && same_millis(h.node_since, a.healthy_since))
                .copied();
            let mark = kept.unwrap_or(HealthyReceived {
                revision: a.revision,
                node_since: a.healthy_since,
                at: now,
            });
            (a.desired_state.clone(), mark)
        })
        .collect()
}

/// Equal at the wire's resolution (RFC 3339 with milliseconds): a time read back from the
/// store is compared with one that has not been through it yet.
fn same_millis(a: Option<SystemTime>, b: Option<SystemTime>) -> bool {
    let millis = |t: Option<SystemTime>| {
        t.map(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        })
    };
    millis(a) == millis(b)
}

/// A stored DesiredState with the number of nodes its selector picks among `nodes`.
fn with_selected(object: &DesiredStateObject, nodes: &[StoredNode]) -> DesiredStateObject {
    let mut object = object.clone();
    object.status.selected_nodes = nodes
        .iter()
        .filter(|n| object.spec.selector.matches(&n.object.metadata.labels))
        .count() as u64;
    object
}

fn format_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "(none)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn condition(kind: &str, holds: bool, reason: &str, message: String) -> Condition {
    Condition {
        kind: kind.to_string(),
        status: if holds {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.to_string(),
        message,
    }
}

/// The four node conditions, from the stored report, the current assignment and readiness.
pub fn conditions(node: &NodeObject, assignment: &NodeAssignment, ready: bool) -> Vec<Condition> {
    let report = &node.status.report;
    let mut out = Vec::new();
    if node.status.last_heartbeat.is_none() {
        let unknown = |kind: &str| Condition {
            kind: kind.to_string(),
            status: ConditionStatus::Unknown,
            reason: "NoHeartbeat".into(),
            message: "the node has not reported yet".into(),
        };
        out.push(unknown("Ready"));
        out.push(unknown("Converged"));
        out.push(unknown("Healthy"));
        out.push(unknown("DiskPressure"));
    } else {
        out.push(if ready {
            condition("Ready", true, "Heartbeat", String::new())
        } else {
            condition(
                "Ready",
                false,
                "HeartbeatMissed",
                "no recent heartbeat".into(),
            )
        });
        let behind: Vec<String> = assignment
            .states
            .iter()
            .filter(|want| {
                !report.applied.iter().any(|have| {
                    have.desired_state == want.name
                        && have.revision == want.revision
                        && have.phase == ComponentPhase::Healthy
                })
            })
            .map(|want| format!("{}@{}", want.name, want.revision))
            .collect();
        let converged = behind.is_empty() && report.observed_generation == assignment.generation;
        out.push(if converged {
            condition("Converged", true, "AtDesiredState", String::new())
        } else if behind.is_empty() {
            condition(
                "Converged",
                false,
                "Pending",
                "the node has not picked up its newest assignment".into(),
            )
        } else {
            condition(
                "Converged",
                false,
                "Progressing",
                format!("not yet healthy at {}", behind.join(", ")),
            )
        });
        let broken: Vec<String> = report
            .components
            .iter()
            .filter(|c| {
                matches!(
                    c.phase,
                    ComponentPhase::Reverted | ComponentPhase::Failed | ComponentPhase::Reverting
                )
            })
            .map(|c| format!("{} {:?}", c.name, c.phase))
            .chain(
                report
                    .probes
                    .iter()
                    .filter(|p| !p.passing)
                    .map(|p| format!("probe {} failing", p.name)),
            )
            .collect();
        out.push(if broken.is_empty() {
            condition("Healthy", true, "ProbesPassing", String::new())
        } else {
            condition("Healthy", false, "Unhealthy", broken.join("; "))
        });
        out.push(match &report.disk_pressure {
            Some(message) => condition("DiskPressure", true, "LowDiskSpace", message.clone()),
            None => condition("DiskPressure", false, "EnoughDiskSpace", String::new()),
        });
    }
    out.push(if assignment.conflicts.is_empty() {
        condition("Conflict", false, "NoConflict", String::new())
    } else {
        condition(
            "Conflict",
            true,
            "ComponentPinnedTwice",
            assignment
                .conflicts
                .iter()
                .map(|c| {
                    format!(
                        "{} is pinned by {}",
                        c.component,
                        c.desired_states.join(" and ")
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn controller_with(config: ControllerConfig) -> Arc<Controller> {
        Controller::new(Store::memory().await, config).expect("controller")
    }

    async fn controller() -> Arc<Controller> {
        controller_with(ControllerConfig::default()).await
    }

    /// A DesiredState selecting `role=<role>` that pins each `(component, version)` as a package.
    fn manifest(name: &str, role: &str, components: &[(&str, &str)]) -> String {
        let mut text = format!(
            "apiVersion: shoal/v1\nkind: DesiredState\nmetadata:\n  name: {name}\nspec:\n  selector:\n    matchLabels: {{role: {role}}}\n  components:\n"
        );
        for (component, version) in components {
            text.push_str(&format!(
                "    - {{name: {component}, kind: package, version: \"{version}\"}}\n"
            ));
        }
        text
    }

    fn inputs(yaml: &str) -> Vec<ApplyInput> {
        let loaded = manifests::parse_str("test.yaml", yaml);
        assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
        loaded
            .objects
            .into_iter()
            .map(|parsed| ApplyInput {
                object: parsed.object,
                source: RevisionSource {
                    kind: "apply".into(),
                    actor: Some("unit".into()),
                    ..RevisionSource::default()
                },
            })
            .collect()
    }

    fn with_resource_version(yaml: &str, version: &str) -> String {
        yaml.replacen(
            "metadata:\n",
            &format!("metadata:\n  resourceVersion: \"{version}\"\n"),
            1,
        )
    }

    async fn apply(c: &Controller, yaml: &str) -> ApplyResult {
        let response = c.apply(inputs(yaml), false).await.expect("apply");
        assert!(!response.dry_run);
        assert_eq!(response.results.len(), 1);
        response.results[0].clone()
    }

    async fn register(c: &Controller, name: &str, role: &str) -> RegisterResponse {
        c.register(
            RegisterRequest {
                name: name.into(),
                labels: BTreeMap::from([("role".to_string(), role.to_string())]),
            },
            "join",
        )
        .await
        .expect("register")
    }

    fn reasons(c: &Controller) -> Vec<String> {
        c.events(0, 10_000, None)
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect()
    }

    #[tokio::test]
    async fn apply_numbers_revisions_and_reports_what_happened() {
        let c = controller().await;
        let v1 = manifest("web", "web", &[("nginx", "1.0-1")]);
        let created = apply(&c, &v1).await;
        assert_eq!(created.action, ApplyAction::Created);
        assert_eq!(created.revision, 1);

        let again = apply(&c, &v1).await;
        assert_eq!(again.action, ApplyAction::Unchanged);
        assert_eq!(again.revision, 1);
        assert_eq!(again.resource_version, created.resource_version);

        let v2 = manifest("web", "web", &[("nginx", "1.1-1")]);
        let configured = apply(&c, &v2).await;
        assert_eq!(configured.action, ApplyAction::Configured);
        assert_eq!(configured.revision, 2);
        assert_ne!(configured.resource_version, created.resource_version);

        // Labels alone: a new resourceVersion, but no new revision.
        let labelled = v2.replacen("metadata:\n", "metadata:\n  labels: {team: a}\n", 1);
        let relabelled = apply(&c, &labelled).await;
        assert_eq!(relabelled.action, ApplyAction::Configured);
        assert_eq!(relabelled.revision, 2);
        assert_ne!(relabelled.resource_version, configured.resource_version);

        let object = c.get_desired_state("web").unwrap();
        assert_eq!(object.metadata.generation, 2);
        assert_eq!(object.status.revision, 2);
        assert_eq!(
            object.metadata.resource_version,
            relabelled.resource_version
        );
        assert_eq!(
            object.metadata.labels.get("team").map(String::as_str),
            Some("a")
        );

        let revisions = c.revisions("web").unwrap();
        assert_eq!(
            revisions.iter().map(|r| r.revision).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            revisions[0].spec.components[0].version.as_deref(),
            Some("1.0-1")
        );
        assert_eq!(
            revisions[1].spec.components[0].version.as_deref(),
            Some("1.1-1")
        );
        assert_eq!(revisions[1].source.actor.as_deref(), Some("unit"));
        // One Applied event per stored change; the unchanged apply records nothing; revision 2
        // replaced revision 1's rollout before it was planned.
        assert_eq!(
            reasons(&c),
            vec!["Applied", "Applied", "Superseded", "Applied"]
        );

        // Deleting removes the revisions too; re-creating starts again at 1.
        c.delete_desired_state("web", None).await.unwrap();
        assert!(matches!(c.revisions("web"), Err(ApiError::NotFound { .. })));
        assert!(c
            .store()
            .scan_prefix(Table::Revisions, &store::revision_prefix("web"))
            .is_empty());
        assert_eq!(apply(&c, &v2).await.revision, 1);
    }

    #[tokio::test]
    async fn stale_resource_versions_conflict_and_change_nothing() {
        let c = controller().await;
        let v1 = manifest("web", "web", &[("nginx", "1.0-1")]);
        let first = apply(&c, &v1).await;
        let v2 = manifest("web", "web", &[("nginx", "1.1-1")]);
        let second = apply(&c, &with_resource_version(&v2, &first.resource_version)).await;
        assert_eq!(second.revision, 2);

        // first.resource_version is stale now.
        let v3 = manifest("web", "web", &[("nginx", "1.2-1")]);
        let stale = c
            .apply(
                inputs(&with_resource_version(&v3, &first.resource_version)),
                false,
            )
            .await;
        assert!(matches!(stale, Err(ApiError::Conflict { .. })), "{stale:?}");
        assert_eq!(c.get_desired_state("web").unwrap().status.revision, 2);

        // A resourceVersion for an object that does not exist is a conflict too, not a create.
        let ghost = manifest("ghost", "web", &[("tool", "1.0-1")]);
        let result = c
            .apply(inputs(&with_resource_version(&ghost, "12345")), false)
            .await;
        assert!(
            matches!(result, Err(ApiError::Conflict { .. })),
            "{result:?}"
        );
        assert!(c.get_desired_state("ghost").is_err());

        // All or nothing: a new object in the same apply as a stale one is not stored.
        let bundle = format!(
            "{}---\n{}",
            manifest("fresh", "web", &[("tool2", "1.0-1")]),
            with_resource_version(&v3, &first.resource_version)
        );
        let result = c.apply(inputs(&bundle), false).await;
        assert!(
            matches!(result, Err(ApiError::Conflict { .. })),
            "{result:?}"
        );
        assert!(c.get_desired_state("fresh").is_err());
        assert_eq!(c.store().len(Table::DesiredStates), 1);
        assert_eq!(c.store().len(Table::Revisions), 2);

        // Delete checks the version as well.
        let stale = c
            .delete_desired_state("web", Some(&first.resource_version))
            .await;
        assert!(matches!(stale, Err(ApiError::Conflict { .. })), "{stale:?}");
        assert!(c.get_desired_state("web").is_ok());
        c.delete_desired_state("web", Some(&second.resource_version))
            .await
            .unwrap();
        assert!(c.get_desired_state("web").is_err());
        assert!(matches!(
            c.delete_desired_state("web", None).await,
            Err(ApiError::NotFound { .. })
        ));
        assert_eq!(
            reasons(&c),
            vec!["Applied", "Applied", "Superseded", "Deleted"]
        );
    }

    #[tokio::test]
    async fn dry_run_reports_and_stores_nothing() {
        let c = controller().await;
        let v1 = manifest("web", "web", &[("nginx", "1.0-1")]);
        let dry = c.apply(inputs(&v1), true).await.unwrap();
        assert!(dry.dry_run);
        assert_eq!(dry.results[0].action, ApplyAction::Created);
        for table in Table::ALL {
            assert_eq!(c.store().len(table), 0, "{table:?}");
        }
        assert!(c.get_desired_state("web").is_err());

        apply(&c, &v1).await;
        let v2 = manifest("web", "web", &[("nginx", "1.1-1")]);
        let dry = c.apply(inputs(&v2), true).await.unwrap();
        assert!(dry.dry_run);
        assert_eq!(dry.results[0].action, ApplyAction::Configured);
        assert_eq!(dry.results[0].revision, 2);
        let stored = c.get_desired_state("web").unwrap();
        assert_eq!(stored.status.revision, 1);
        assert_eq!(stored.spec.components[0].version.as_deref(), Some("1.0-1"));
        assert_eq!(c.revisions("web").unwrap().len(), 1);
        assert_eq!(reasons(&c), vec!["Applied"]);

        // A dry run still checks resourceVersions.
        let read = stored.metadata.resource_version.parse::<u64>().unwrap();
        let stale = c
            .apply(
                inputs(&with_resource_version(&v2, &(read + 1).to_string())),
                true,
            )
            .await;
        assert!(matches!(stale, Err(ApiError::Conflict { .. })), "{stale:?}");
    }

    #[tokio::test]
    async fn a_component_pinned_twice_is_a_conflict_applied_by_neither() {
        let c = controller().await;
        let both = format!(
            "{}---\n{}---\n{}",
            manifest("a", "web", &[("shared", "1.0-1"), ("only-a", "1.0-1")]),
            manifest("b", "web", &[("only-b", "1.0-1"), ("shared", "2.0-1")]),
            manifest("c", "db", &[("shared", "3.0-1")]),
        );
        c.apply(inputs(&both), false).await.unwrap();
        heard(&c, "web-1", "web").await;
        heard(&c, "db-1", "db").await;
        // The rollout controller assigns the first wave (here: each group's only node).
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();

        let web = c.assignment("web-1").unwrap();
        assert_eq!(
            web.conflicts,
            vec![ComponentConflict {
                component: "shared".into(),
                desired_states: vec!["a".into(), "b".into()],
            }]
        );
        let names = |state: &AssignedState| {
            state
                .spec
                .components
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(web.states.len(), 2);
        assert_eq!(names(&web.states[0]), vec!["only-a"]);
        assert_eq!(names(&web.states[1]), vec!["only-b"]);
        let conflict = c
            .get_node("web-1")
            .unwrap()
            .status
            .conditions
            .into_iter()
            .find(|c| c.kind == "Conflict")
            .unwrap();
        assert_eq!(conflict.status, ConditionStatus::True);
        assert!(conflict.message.contains("shared"), "{}", conflict.message);

        // The other group is not affected: it gets `shared` from `c`.
        let db = c.assignment("db-1").unwrap();
        assert!(db.conflicts.is_empty());
        assert_eq!(db.states.len(), 1);
        assert_eq!(names(&db.states[0]), vec!["shared"]);

        // Removing one side ends the conflict and changes the generation.
        let before = web.generation;
        c.delete_desired_state("b", None).await.unwrap();
        let web = c.assignment("web-1").unwrap();
        assert!(web.conflicts.is_empty());
        assert_eq!(names(&web.states[0]), vec!["shared", "only-a"]);
        assert_ne!(web.generation, before);
        // The generation is a pure function of the content.
        assert_eq!(c.assignment("web-1").unwrap().generation, web.generation);
    }

    fn node(heartbeat: bool) -> NodeObject {
        NodeObject {
            metadata: ObjectInfo {
                name: "n".into(),
                ..ObjectInfo::default()
            },
            status: NodeStatus {
                last_heartbeat: heartbeat.then(SystemTime::now),
                ..NodeStatus::default()
            },
        }
    }

    fn assignment_of(states: &[(&str, u64)], conflicts: Vec<ComponentConflict>) -> NodeAssignment {
        let spec: manifests::DesiredStateSpec = serde_yaml::from_str("components: []").unwrap();
        NodeAssignment {
            node: "n".into(),
            generation: 77,
            states: states
                .iter()
                .map(|(name, revision)| AssignedState {
                    name: name.to_string(),
                    revision: *revision,
                    commit: None,
                    spec: spec.clone(),
                })
                .collect(),
            conflicts,
        }
    }

    fn status_of(conditions: &[Condition], kind: &str) -> (ConditionStatus, String) {
        let c = conditions
            .iter()
            .find(|c| c.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} in {conditions:?}"));
        (c.status, c.reason.clone())
    }

    #[tokio::test]
    async fn conditions_follow_the_report_the_assignment_and_readiness() {
        use ConditionStatus::{False, True, Unknown};
        let empty = assignment_of(&[], vec![]);

        // Never reported: everything but Conflict is unknown.
        let fresh = conditions(&node(false), &empty, false);
        let kinds: Vec<&str> = fresh.iter().map(|c| c.kind.as_str()).collect();
        assert_eq!(
            kinds,
            vec!["Ready", "Converged", "Healthy", "DiskPressure", "Conflict"]
        );
        assert_eq!(status_of(&fresh, "Ready").0, Unknown);
        assert_eq!(status_of(&fresh, "Converged").0, Unknown);
        assert_eq!(status_of(&fresh, "Healthy").0, Unknown);
        assert_eq!(status_of(&fresh, "Conflict").0, False);

        // Reported, at the assignment, healthy.
        let assignment = assignment_of(&[("web", 2)], vec![]);
        let mut good = node(true);
        good.status.report.observed_generation = assignment.generation;
        good.status.report.applied = vec![AppliedState {
            desired_state: "web".into(),
            revision: 2,
            phase: ComponentPhase::Healthy,
            commit: None,
            healthy_since: None,
        }];
        let all = conditions(&good, &assignment, true);
        assert_eq!(status_of(&all, "Ready"), (True, "Heartbeat".into()));
        assert_eq!(
            status_of(&all, "Converged"),
            (True, "AtDesiredState".into())
        );
        assert_eq!(status_of(&all, "Healthy"), (True, "ProbesPassing".into()));
        assert_eq!(status_of(&all, "DiskPressure").0, False);
        let mut full = good.clone();
        full.status.report.disk_pressure = Some("12 MiB free under /var/lib/shoal".into());
        let pressed = conditions(&full, &assignment, true);
        assert_eq!(
            status_of(&pressed, "DiskPressure"),
            (True, "LowDiskSpace".into())
        );
        assert!(pressed
            .iter()
            .any(|c| c.message == "12 MiB free under /var/lib/shoal"));
        assert_eq!(status_of(&all, "Conflict").0, False);

        // Not ready.
        let late = conditions(&good, &assignment, false);
        assert_eq!(status_of(&late, "Ready"), (False, "HeartbeatMissed".into()));

        // Healthy at an older revision: progressing.
        let newer = assignment_of(&[("web", 3)], vec![]);
        let behind = conditions(&good, &newer, true);
        let (status, reason) = status_of(&behind, "Converged");
        assert_eq!((status, reason.as_str()), (False, "Progressing"));

        // Right revisions, but the node has not acknowledged the newest generation.
        let mut stale = good.clone();
        stale.status.report.observed_generation = 1;
        assert_eq!(
            status_of(&conditions(&stale, &assignment, true), "Converged"),
            (False, "Pending".into())
        );

        // Not yet healthy at the revision.
        let mut verifying = good.clone();
        verifying.status.report.applied[0].phase = ComponentPhase::Verifying;
        assert_eq!(
            status_of(&conditions(&verifying, &assignment, true), "Converged"),
            (False, "Progressing".into())
        );

        // A failing probe or a reverted component is unhealthy.
        let mut probing = good.clone();
        probing.status.report.probes = vec![ProbeStatus {
            name: "http".into(),
            desired_state: "web".into(),
            passing: false,
            baseline_passing: Some(true),
            consecutive_failures: 3,
            output: String::new(),
        }];
        assert_eq!(
            status_of(&conditions(&probing, &assignment, true), "Healthy"),
            (False, "Unhealthy".into())
        );
        let mut reverted = good.clone();
        reverted.status.report.components = vec![ComponentStatus {
            name: "nginx".into(),
            kind: manifests::ComponentKind::Package,
            desired_state: "web".into(),
            revision: 2,
            desired_version: Some("1.1-1".into()),
            version: Some("1.0-1".into()),
            phase: ComponentPhase::Reverted,
            message: None,
            probe_output: None,
            log_tail: vec![],
        }];
        let unhealthy = conditions(&reverted, &assignment, true);
        assert_eq!(status_of(&unhealthy, "Healthy").0, False);
        assert!(unhealthy[2].message.contains("nginx"), "{unhealthy:?}");

        // A conflict shows whether or not the node has reported.
        let conflicted = assignment_of(
            &[],
            vec![ComponentConflict {
                component: "shared".into(),
                desired_states: vec!["a".into(), "b".into()],
            }],
        );
        for reported in [false, true] {
            let c = conditions(&node(reported), &conflicted, reported);
            assert_eq!(
                status_of(&c, "Conflict"),
                (True, "ComponentPinnedTwice".into())
            );
        }
    }

    #[tokio::test]
    async fn events_are_bounded_by_retention_keeping_the_newest() {
        let c = controller_with(ControllerConfig {
            event_retention: 3,
            ..ControllerConfig::default()
        })
        .await;
        for i in 0..6 {
            apply(&c, &manifest(&format!("s{i}"), "web", &[("tool", "1.0-1")])).await;
        }
        let events = c.events(0, 100, None).unwrap();
        assert_eq!(c.store().len(Table::Events), 3);
        let objects: Vec<&str> = events.iter().map(|e| e.object.as_str()).collect();
        assert_eq!(
            objects,
            vec!["desiredstate/s3", "desiredstate/s4", "desiredstate/s5"]
        );
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
        // One apply with more events than the retention keeps the newest too.
        let bundle: Vec<String> = (0..5)
            .map(|i| manifest(&format!("t{i}"), "web", &[("tool", "1.0-1")]))
            .collect();
        c.apply(inputs(&bundle.join("---\n")), false).await.unwrap();
        let objects: Vec<String> = c
            .events(0, 100, None)
            .unwrap()
            .into_iter()
            .map(|e| e.object)
            .collect();
        assert_eq!(
            objects,
            vec!["desiredstate/t2", "desiredstate/t3", "desiredstate/t4"]
        );
        // Paging and filtering.
        let after = c.events(0, 100, None).unwrap()[0].seq;
        assert_eq!(c.events(after, 100, None).unwrap().len(), 2);
        assert_eq!(c.events(0, 1, None).unwrap().len(), 1);
        assert_eq!(c.events(0, 100, Some("desiredstate/t3")).unwrap().len(), 1);
    }

    fn node_event(reason: &str, i: usize) -> NodeEvent {
        NodeEvent {
            time: SystemTime::now(),
            kind: EventType::Normal,
            reason: reason.into(),
            message: format!("event {i}"),
            desired_state: None,
            revision: None,
            component: None,
        }
    }

    #[tokio::test]
    async fn a_flooding_node_evicts_only_its_own_history() {
        let c = controller_with(ControllerConfig {
            event_retention: 100,
            ..ControllerConfig::default()
        })
        .await;
        for name in ["quiet", "loud", "other"] {
            heard(&c, name, "web").await;
        }
        let report = |name: &'static str, events: Vec<NodeEvent>| {
            let c = c.clone();
            async move {
                c.report(
                    name,
                    NodeReport {
                        events,
                        ..NodeReport::default()
                    },
                )
                .await
                .unwrap()
            }
        };
        report("quiet", (0..5).map(|i| node_event("Drift", i)).collect()).await;
        for round in 0..5 {
            report(
                "loud",
                (0..1000)
                    .map(|i| node_event("Forged", round * 1000 + i))
                    .collect(),
            )
            .await;
        }
        let about = |node: &str| c.events(0, 10_000, Some(&format!("node/{node}"))).unwrap();
        let quiet = about("quiet");
        assert_eq!(
            quiet.iter().filter(|e| e.reason == "Drift").count(),
            5,
            "{quiet:?}"
        );
        let loud = about("loud");
        assert!(
            loud.len() <= 100 / 3,
            "{} events kept for the flooder",
            loud.len()
        );
        let last = loud.last().unwrap();
        assert_eq!(last.reason, "EventsDropped", "{last:?}");
        assert!(last.message.contains("sent 1000 events"), "{last:?}");
        assert!(about("other").iter().any(|e| e.reason == "Registered"));
        assert!(c.store().len(Table::Events) <= 100);
    }

    fn ready(c: &Controller, name: &str) -> ConditionStatus {
        status_of(&c.get_node(name).unwrap().status.conditions, "Ready").0
    }

    #[tokio::test]
    async fn readiness_sweep_reports_each_transition_once() {
        let grace = Duration::from_secs(40);
        let c = controller_with(ControllerConfig {
            ready_grace: grace,
            ..ControllerConfig::default()
        })
        .await;
        register(&c, "n1", "web").await;
        register(&c, "quiet", "web").await;
        assert_eq!(ready(&c, "n1"), ConditionStatus::Unknown);
        c.report("n1", NodeReport::default()).await.unwrap();
        assert_eq!(ready(&c, "n1"), ConditionStatus::True);
        let heartbeat = c.get_node("n1").unwrap().status.last_heartbeat.unwrap();
        let readiness_events = |c: &Controller| -> Vec<(String, Option<String>)> {
            c.events(0, 1000, None)
                .unwrap()
                .into_iter()
                .filter(|e| e.reason.starts_with("Node"))
                .map(|e| (e.reason, e.node))
                .collect()
        };

        // Within the grace period nothing changes.
        c.sweep_readiness(heartbeat + grace - Duration::from_secs(1))
            .await
            .unwrap();
        assert!(readiness_events(&c).is_empty());

        // Past it: one NodeNotReady, for the node that had heartbeats only.
        let late = heartbeat + grace + Duration::from_secs(1);
        c.sweep_readiness(late).await.unwrap();
        c.sweep_readiness(late + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            readiness_events(&c),
            vec![("NodeNotReady".to_string(), Some("n1".to_string()))]
        );
        let event = c.events(0, 1000, Some("node/n1")).unwrap().pop().unwrap();
        assert_eq!(event.kind, EventType::Warning);
        assert_eq!(event.time, late);

        // Heartbeats return: one NodeReady, at once.
        c.report("n1", NodeReport::default()).await.unwrap();
        assert_eq!(ready(&c, "n1"), ConditionStatus::True);
        c.sweep_readiness(SystemTime::now()).await.unwrap();
        assert_eq!(
            readiness_events(&c),
            vec![
                ("NodeNotReady".to_string(), Some("n1".to_string())),
                ("NodeReady".to_string(), Some("n1".to_string()))
            ]
        );
    }

    #[tokio::test]
    async fn a_first_heartbeat_is_not_reported_as_resumed() {
        let c = controller().await;
        register(&c, "n1", "web").await;
        // Sweeps before the first heartbeat (the server sweeps every 2 s) …
        c.sweep_readiness(SystemTime::now()).await.unwrap();
        c.sweep_readiness(SystemTime::now() + Duration::from_secs(3600))
            .await
            .unwrap();
        // … do not turn the first heartbeat into "heartbeats resumed".
        c.report("n1", NodeReport::default()).await.unwrap();
        assert_eq!(reasons(&c), vec!["Registered"]);
    }

    #[tokio::test]
    async fn node_tokens_are_checked_and_rotated_on_registration() {
        let c = controller().await;
        let first = register(&c, "n1", "web").await;
        assert!(first.token.starts_with("n1:"));
        assert!(c.node_token_matches("n1", &first.token).unwrap());
        assert!(!c.node_token_matches("n2", &first.token).unwrap());
        assert!(!c.node_token_matches("n1", "n1:00").unwrap());
        // Only the hash is stored.
        let raw = c.store().get(Table::Nodes, b"n1").unwrap();
        let secret = first.token.split_once(':').unwrap().1;
        assert!(!String::from_utf8_lossy(&raw).contains(secret));

        let second = register(&c, "n1", "db").await;
        assert!(c.node_token_matches("n1", &second.token).unwrap());
        assert!(!c.node_token_matches("n1", &first.token).unwrap());
        assert_eq!(
            c.get_node("n1")
                .unwrap()
                .metadata
                .labels
                .get("role")
                .map(String::as_str),
            Some("db")
        );
        assert_eq!(reasons(&c), vec!["Registered", "Reregistered"]);

        for bad in ["Bad_Name", "", "register-"] {
            let result = c
                .register(
                    RegisterRequest {
                        name: bad.into(),
                        labels: BTreeMap::new(),
                    },
                    "join",
                )
                .await;
            assert!(
                matches!(result, Err(ApiError::Invalid { .. })),
                "{bad}: {result:?}"
            );
        }
        assert_eq!(c.store().len(Table::Nodes), 1);
    }

    async fn healthy(c: &Controller, node: &str, state: &str, revision: u64, since: SystemTime) {
        c.report(
            node,
            NodeReport {
                applied: vec![AppliedState {
                    desired_state: state.into(),
                    revision,
                    phase: ComponentPhase::Healthy,
                    commit: None,
                    healthy_since: Some(since),
                }],
                ..NodeReport::default()
            },
        )
        .await
        .unwrap();
    }

    /// Registers a node that has reported once (a node never heard from takes no wave).
    async fn heard(c: &Controller, name: &str, role: &str) {
        register(c, name, role).await;
        c.report(name, NodeReport::default()).await.unwrap();
    }

    fn assigned(c: &Controller, node: &str, state: &str) -> Option<u64> {
        c.assignment(node)
            .unwrap()
            .states
            .iter()
            .find(|s| s.name == state)
            .map(|s| s.revision)
    }

    #[tokio::test]
    async fn a_revision_has_its_pending_rollout_at_once_and_it_can_be_paused_before_planning() {
        let c = controller().await;
        heard(&c, "n1", "web").await;
        let result = apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
        let rollout = c.get_rollout("web").unwrap();
        assert_eq!(rollout.spec.revision, result.revision);
        assert_eq!(rollout.status.phase, RolloutPhase::Pending);
        let paused = c.set_rollout_paused("web", true).await.unwrap();
        assert_eq!(paused.status.phase, RolloutPhase::Paused);
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        assert_eq!(assigned(&c, "n1", "web"), None, "paused: nothing assigned");
        c.set_rollout_paused("web", false).await.unwrap();
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        assert_eq!(
            c.get_rollout("web").unwrap().status.phase,
            RolloutPhase::Progressing
        );
        assert_eq!(assigned(&c, "n1", "web"), Some(1), "the canary got it");
    }

    #[tokio::test]
    async fn bakes_count_from_when_the_server_received_healthy() {
        let c = controller().await;
        heard(&c, "n1", "web").await;
        let yaml = manifest("web", "web", &[("tool", "1.0")]).replace(
            "  components:",
            "  rollout: {waves: ['100%'], bakeSeconds: 1000}\n  components:",
        );
        apply(&c, &yaml).await;
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        // The node's clock says it has been healthy for a day: irrelevant.
        let day_ago = SystemTime::now() - Duration::from_secs(86_400);
        healthy(&c, "n1", "web", 1, day_ago).await;
        let first = c.get_node("n1").unwrap().status.healthy_received["web"];
        healthy(&c, "n1", "web", 1, day_ago).await;
        assert_eq!(
            c.get_node("n1").unwrap().status.healthy_received["web"].at,
            first.at,
            "the same healthy spell keeps its first receipt"
        );
        // Past the bake (1000 s), before healthyDeadlineSeconds + bakeSeconds (1600 s).
        c.reconcile_rollouts(SystemTime::now() + Duration::from_secs(1500))
            .await
            .unwrap();
        assert_eq!(
            c.get_rollout("web").unwrap().status.phase,
            RolloutPhase::Progressing,
            "no report received after the bake: not baked, however late it is"
        );
        assert_eq!(
            c.get_desired_state("web")
                .unwrap()
                .status
                .last_good_revision,
            0
        );
    }

    #[tokio::test]
    async fn a_sha256_reused_under_another_version_is_refused() {
        let c = controller().await;
        let sha = "ab".repeat(32);
        let service = |version: &str| {
            format!("apiVersion: shoal/v1\nkind: DesiredState\nmetadata:\n  name: web\nspec:\n  selector: {{matchLabels: {{role: web}}}}\n  components:\n    - {{name: web, kind: service, version: {version}, artifact: {{url: 'http://h/web-{version}.tgz', sha256: '{sha}'}}, service: {{exec: [bin/web]}}}}\n")
        };
        apply(&c, &service("1.0.0")).await;
        let refused = c.apply(inputs(&service("1.2.0")), false).await.unwrap_err();
        let text = format!("{refused:?}");
        assert!(text.contains("did you forget to update sha256"), "{text}");
        assert!(
            text.contains("spec.components[0].artifact.sha256"),
            "{text}"
        );
        assert_eq!(
            c.get_desired_state("web").unwrap().status.revision,
            1,
            "nothing stored"
        );
    }

    #[tokio::test]
    async fn a_cordoned_node_keeps_its_revision_and_a_deleted_node_is_forgotten() {
        let c = controller().await;
        heard(&c, "n1", "web").await;
        apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        assert_eq!(assigned(&c, "n1", "web"), Some(1));
        c.set_cordon("n1", true, "ops").await.unwrap();
        assert!(c.get_node("n1").unwrap().status.cordoned.is_some());
        apply(&c, &manifest("web", "web", &[("tool", "2.0")])).await;
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        assert_eq!(
            assigned(&c, "n1", "web"),
            Some(1),
            "cordoned: keeps revision 1"
        );
        let rollout = c.get_rollout("web").unwrap();
        assert!(
            rollout.status.message.contains("n1: cordoned"),
            "{rollout:?}"
        );
        c.set_cordon("n1", false, "ops").await.unwrap();
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        assert_eq!(
            assigned(&c, "n1", "web"),
            Some(2),
            "uncordoned: the waiting rollout goes on"
        );
        c.delete_node("n1", "ops").await.unwrap();
        assert!(matches!(c.get_node("n1"), Err(ApiError::NotFound { .. })));
        assert!(!c.node_token_matches("n1", "anything").unwrap());
        let reasons = reasons(&c);
        for reason in ["NodeCordoned", "NodeUncordoned", "NodeDeleted"] {
            assert!(reasons.contains(&reason.to_string()), "{reasons:?}");
        }
    }

    #[tokio::test]
    async fn a_pause_holds_across_a_new_revision() {
        let c = controller().await;
        heard(&c, "n1", "web").await;
        apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
        c.set_rollout_paused("web", true).await.unwrap();
        apply(&c, &manifest("web", "web", &[("tool", "2.0")])).await;
        let rollout = c.get_rollout("web").unwrap();
        assert_eq!(
            (rollout.spec.revision, rollout.status.phase),
            (2, RolloutPhase::Paused)
        );
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        assert_eq!(assigned(&c, "n1", "web"), None);
    }

    #[tokio::test]
    async fn a_cordoned_node_pinned_to_an_aborted_revision_goes_back_with_the_others() {
        let c = controller().await;
        heard(&c, "n1", "web").await;
        let quick = |version: &str| {
            manifest("web", "web", &[("tool", version)]).replace(
                "  components:",
                "  rollout: {waves: ['100%'], bakeSeconds: 0}\n  components:",
            )
        };
        apply(&c, &quick("1.0")).await;
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        healthy(&c, "n1", "web", 1, SystemTime::now()).await;
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        assert_eq!(
            c.get_desired_state("web")
                .unwrap()
                .status
                .last_good_revision,
            1
        );
        apply(&c, &quick("2.0")).await;
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        assert_eq!(assigned(&c, "n1", "web"), Some(2));
        c.set_cordon("n1", true, "ops").await.unwrap();
        c.report(
            "n1",
            NodeReport {
                applied: vec![AppliedState {
                    desired_state: "web".into(),
                    revision: 2,
                    phase: ComponentPhase::Reverted,
                    commit: None,
                    healthy_since: None,
                }],
                ..NodeReport::default()
            },
        )
        .await
        .unwrap();
        c.reconcile_rollouts(SystemTime::now()).await.unwrap();
        let rollout = c.get_rollout("web").unwrap();
        assert_eq!(
            rollout.status.phase,
            RolloutPhase::RolledBack,
            "{rollout:?}"
        );
        assert_eq!(
            assigned(&c, "n1", "web"),
            Some(1),
            "back to the last good revision"
        );
        let cordon = c.get_node("n1").unwrap().status.cordoned.unwrap();
        assert_eq!(
            cordon.revisions.get("web"),
            Some(&1),
            "and still cordoned there"
        );
    }

    #[tokio::test]
    async fn one_broken_rollout_does_not_stop_the_others() {
        let c = controller().await;
        heard(&c, "n1", "web").await;
        heard(&c, "n2", "db").await;
        apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
        apply(&c, &manifest("db", "db", &[("pg", "1.0")])).await;
        // web's rollout record is unreadable: its decisions fail, db's go on.
        c.store()
            .transact(|txn| txn.put(Table::Rollouts, b"web", b"{not json".to_vec()))
            .await
            .map_err(|_| ())
            .unwrap();
        c.refresh().unwrap();
        let now = SystemTime::now();
        c.reconcile_rollouts(now).await.unwrap();
        assert_eq!(assigned(&c, "n2", "db"), Some(1));
        let errors: Vec<Event> = c
            .events(0, 100, Some("rollout/web"))
            .unwrap()
            .into_iter()
            .filter(|e| e.reason == "RolloutError")
            .collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].kind, EventType::Warning);
        // Retried with backoff, one event per streak.
        c.reconcile_rollouts(now + Duration::from_secs(5))
            .await
            .unwrap();
        let again = c
            .events(0, 100, Some("rollout/web"))
            .unwrap()
            .iter()
            .filter(|e| e.reason == "RolloutError")
            .count();
        assert_eq!(again, 1);
    }

    #[tokio::test]
    async fn heartbeats_store_the_report_events_and_host_history() {
        let c = controller_with(ControllerConfig {
            host_history: 2,
            ..ControllerConfig::default()
        })
        .await;
        register(&c, "n1", "web").await;
        for cpu in [1.0, 2.0, 3.0] {
            c.report(
                "n1",
                NodeReport {
                    host: Some(HostMetrics {
                        cpu_percent: cpu,
                        ..HostMetrics::default()
                    }),
                    events: vec![NodeEvent {
                        time: SystemTime::now(),
                        kind: EventType::Warning,
                        reason: "Drift".into(),
                        message: "changed on disk".into(),
                        desired_state: Some("web".into()),
                        revision: Some(1),
                        component: Some("nginx".into()),
                    }],
                    ..NodeReport::default()
                },
            )
            .await
            .unwrap();
        }
        let node = c.get_node("n1").unwrap();
        assert_eq!(node.status.report.host.unwrap().cpu_percent, 3.0);
        assert!(node.status.report.events.is_empty());
        let history: Vec<f64> = node
            .status
            .host_history
            .iter()
            .map(|s| s.metrics.cpu_percent)
            .collect();
        assert_eq!(history, vec![2.0, 3.0]);
        let drift = c.events(0, 100, Some("node/n1")).unwrap();
        assert_eq!(
            drift.iter().filter(|e| e.reason == "Drift").count(),
            3,
            "{drift:?}"
        );
        assert!(drift.last().unwrap().message.starts_with("nginx: "));
        assert!(matches!(
            c.report("ghost", NodeReport::default()).await,
            Err(ApiError::NotFound { .. })
        ));
    }
}

#[cfg(test)]
mod replica_tests {
    use super::*;
    use crate::store::testing::TestPostgres;
    use crate::store::PostgresBackend;

    async fn replica(url: &str, lease: Duration) -> Arc<Controller> {
        let store = Store::open(PostgresBackend::connect(url).await.unwrap())
            .await
            .unwrap();
        Controller::new(
            store,
            ControllerConfig {
                lease_duration: lease,
                ..ControllerConfig::default()
            },
        )
        .unwrap()
    }

    async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(value) = check() {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_replica_leads_and_a_deposed_leaders_decision_is_refused() {
        let Some(postgres) = TestPostgres::start_or_skip("fencing a deposed leader") else {
            return;
        };
        let url = postgres.create_database("fencing").await;
        let lease = Duration::from_millis(400);
        let a = replica(&url, lease).await;
        let b = replica(&url, lease).await;
        a.lease_tick().await.unwrap();
        assert_eq!(a.leader_epoch(), Some(1));
        eventually("b sees a's lease", || {
            b.store().get(Table::Leases, LEADER).map(|_| ())
        })
        .await;
        b.lease_tick().await.unwrap();
        assert_eq!(b.leader_epoch(), None, "a's lease is fresh: b follows");
        assert_eq!(
            b.control_plane().leader.as_deref(),
            Some(a.identity.as_str())
        );

        // A rollout to decide on, written through b, seen by a.
        b.register(
            RegisterRequest {
                name: "n1".into(),
                labels: BTreeMap::from([("role".to_string(), "web".to_string())]),
            },
            "join",
        )
        .await
        .unwrap();
        let inputs = manifests::parse_str(
            "web.yaml",
            "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {role: web}}\n  components:\n    - {name: tool, kind: package, version: \"1.0\"}\n",
        );
        let inputs = inputs
            .objects
            .into_iter()
            .map(|parsed| ApplyInput {
                object: parsed.object,
                source: RevisionSource::default(),
            })
            .collect();
        b.apply(inputs, false).await.unwrap();
        let pending = eventually("a sees the rollout", || a.get_rollout("web").ok()).await;

        // a stops renewing (frozen); once its record stayed unchanged for a whole lease,
        // b takes over with the next epoch, and a no longer acts as leader by its own clock.
        let deadline = Instant::now() + Duration::from_secs(10);
        let taken = loop {
            b.lease_tick().await.unwrap();
            if let Some(epoch) = b.leader_epoch() {
                break epoch;
            }
            assert!(Instant::now() < deadline, "b never took over");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(taken, 2);
        assert_eq!(a.leader_epoch(), None, "a's own lease ran out first");

        // The decision a made before it froze still carries epoch 1: refused, nothing written.
        let decision = || {
            let mut next = pending.clone();
            next.status.phase = RolloutPhase::Progressing;
            crate::rollout::Update {
                rollout: next,
                assign: vec![("n1".to_string(), 1)],
                clear_assignments: false,
                last_good: None,
                events: vec![],
            }
        };
        let written = a
            .write_rollout(
                "web",
                Some(pending.metadata.resource_version.clone()),
                decision(),
                SystemTime::now(),
                Some(1),
            )
            .await
            .unwrap();
        assert!(!written, "a deposed leader's decision landed");
        assert_eq!(
            b.get_rollout("web").unwrap().status.phase,
            RolloutPhase::Pending
        );
        assert!(b
            .store()
            .get(Table::Assignments, &store::assignment_key("n1", "web"))
            .is_none());

        // The same decision under the current epoch lands: the fence can pass.
        let written = b
            .write_rollout(
                "web",
                Some(pending.metadata.resource_version.clone()),
                decision(),
                SystemTime::now(),
                Some(taken),
            )
            .await
            .unwrap();
        assert!(written);
        eventually("a sees b's decision", || {
            (a.get_rollout("web").ok()?.status.phase == RolloutPhase::Progressing).then_some(())
        })
        .await;
    }
}
