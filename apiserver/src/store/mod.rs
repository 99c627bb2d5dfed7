//! Storage: transactions over an in-memory view of the store, a revision issued inside
//! each commit, and a change feed that every cache, long poll and watcher follows.
//!
//! The shape, and why:
//!
//! - A [`Backend`] (memory, sled, PostgreSQL) keeps the tables durably and a counter, the
//!   store's *revision*. It does three things: hand over a consistent snapshot, commit a
//!   batch of writes **only if its revision is still the one the batch was computed at**,
//!   and list the batches committed after a revision (by any process sharing it).
//! - A [`Store`] holds every table in memory, derived only from that snapshot and the
//!   batches that follow it. Reads never touch the backend. A transaction runs its closure
//!   against the view as of revision `base`, buffers its writes and asks the backend to
//!   commit them at `base`. Another writer that got in first (another replica) makes the
//!   commit fail; the store then catches up from the feed and runs the closure again.
//!   Commits are thereby serial, and **commit order is revision order**: a reader that
//!   follows revisions (or event sequence numbers, which are issued the same way) can
//!   never see a later one before an earlier one lands.
//! - Each committed batch is one revision: `txn.revision()` is the `resourceVersion`
//!   of everything it writes, and `txn.next_id()` hands out further numbers (event
//!   sequence numbers) from the same counter, all inside the transaction.
//!
//! - **Nothing is shown before it is durable.** With a backend only this process writes
//!   (sled, memory), commits are queued and one task persists them in order, merging
//!   what waits into one backend commit and one flush (a group commit). Until a batch is
//!   on disk it lives in the view's *pending* layer, which only the next transactions
//!   read (they build on it); readers, the feed and everything derived from it see the
//!   batch once it is durable. A writer is answered then too, so whatever anyone was
//!   shown or acknowledged survives a kill -9.
//!
//! Serialising every write is affordable for a control plane: a commit is one short
//! backend transaction, and the closures only read memory.

mod memory;
mod postgres;
mod sled_store;
pub mod testing;

pub use memory::MemoryBackend;
pub use postgres::PostgresBackend;
pub use sled_store::{SledBackend, DEFAULT_CACHE_BYTES};

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// The tables of the store. Each is a separate keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// DesiredState name → `DesiredStateObject`.
    DesiredStates,
    /// `name\0revision(u64 BE)` → `Revision`.
    Revisions,
    /// Node name → `StoredNode` (object and token hash).
    Nodes,
    /// Rollout name → `RolloutObject`.
    Rollouts,
    /// Sequence (u64 BE) → `Event`.
    Events,
    /// `node\0desiredstate` → assigned revision (u64 BE), written by the rollout controller.
    Assignments,
    /// Lease name → `Lease`: which replica leads, until when.
    Leases,
}

impl Table {
    /// Every table, in a fixed order (the sled backend opens one tree per table).
    pub const ALL: [Table; 7] = [
        Table::DesiredStates,
        Table::Revisions,
        Table::Nodes,
        Table::Rollouts,
        Table::Events,
        Table::Assignments,
        Table::Leases,
    ];

    /// The table's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Table::DesiredStates => "desiredstates",
            Table::Revisions => "revisions",
            Table::Nodes => "nodes",
            Table::Rollouts => "rollouts",
            Table::Events => "events",
            Table::Assignments => "assignments",
            Table::Leases => "leases",
        }
    }

    /// The table called `name` on disk.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    fn position(self) -> usize {
        self as usize
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (disk, corruption, database unreachable).
    #[error("store backend failed: {0}")]
    Backend(String),
    /// A stored value did not decode.
    #[error("stored value in {table} under {key:?} is corrupt: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The key, lossily decoded.
        key: String,
        /// Why.
        reason: String,
    },
    /// Other writers kept committing first; the transaction gave up.
    #[error("the store is busy: {attempts} attempts to commit lost to other writers")]
    Contention {
        /// How often the transaction ran.
        attempts: u32,
    },
}

/// One write of a batch: `None` removes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The table.
    pub table: Table,
    /// The key.
    pub key: Vec<u8>,
    /// The new value, or `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// One committed transaction, as the change feed carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Its revision: the `resourceVersion` of what it wrote, one more than the store's
    /// revision before it.
    pub revision: u64,
    /// The store's revision after it: `revision` plus the further numbers it took.
    pub last: u64,
    /// Its writes, in order.
    pub writes: Vec<Write>,
}

/// Every entry of a backend at one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The store's revision.
    pub revision: u64,
    /// Table, key, value.
    pub entries: Vec<(Table, Vec<u8>, Vec<u8>)>,
}

/// What a backend did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// It landed.
    Done,
    /// The backend's revision was no longer the batch's base: nothing was written.
    Conflict,
}

/// Durable storage under a [`Store`].
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// What it is, for logs ("sled", "postgres").
    fn kind(&self) -> &'static str;
    /// Every entry, consistently at one revision.
    async fn load(&self) -> Result<Snapshot, StoreError>;
    /// Writes `batch` iff the backend's revision is `batch.revision - 1`, and sets the
    /// revision to `batch.last`, atomically.
    async fn commit(&self, batch: &Batch) -> Result<Committed, StoreError>;
    /// The batches committed after revision `after`, in order; `None` when the backend no
    /// longer keeps them (the caller then loads a snapshot). A backend with a single
    /// writer, this process, returns nothing.
    async fn changes_after(&self, after: u64) -> Result<Option<Vec<Batch>>, StoreError>;
    /// Ticks when another process may have committed; `None` when none can.
    fn news(&self) -> Option<watch::Receiver<u64>>;
    /// Makes every committed write durable now.
    async fn flush(&self) -> Result<(), StoreError>;
}

/// Reads and writes inside one transaction.
pub trait Txn {
    /// Reads a key, seeing this transaction's own writes.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key/value whose key starts with `prefix`, in key order, with this
    /// transaction's own writes.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;
    /// Writes a key.
    fn put(&mut self, table: Table, key: &[u8], value: Vec<u8>) -> Result<(), StoreError>;
    /// Removes a key.
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError>;
    /// The revision this transaction commits at: the `resourceVersion` of its writes.
    fn revision(&self) -> u64;
    /// A further number from the store's counter, above every number issued before
    /// (event sequence numbers): commit order is the order of these too.
    fn next_id(&mut self) -> u64;
}

/// Why a transaction did not commit: the store failed, or the closure gave up.
#[derive(Debug)]
pub enum TxnError<E> {
    /// The closure returned an error; nothing was written.
    Aborted(E),
    /// The store failed.
    Store(StoreError),
}

type Values = BTreeMap<Vec<u8>, Arc<[u8]>>;

/// Batches kept in memory for watches that resume from a revision.
const RECENT_BATCHES: usize = 4096;

/// A transaction slower than this (queued, computed and committed) is logged.
const SLOW_TRANSACTION: Duration = Duration::from_millis(200);

/// Attempts before a transaction that keeps losing to other writers gives up.
const MAX_ATTEMPTS: u32 = 64;

/// How often a store shared with other processes looks for their commits when no
/// notification came (one may be lost with a dropped connection).
const POLL_INTERVAL: Duration = Duration::from_millis(500);

struct View {
    revision: u64,
    tables: Vec<Values>,
    /// The newest batches, oldest first, for resuming watches.
    recent: VecDeque<Arc<Applied>>,
    /// Batches committed by this process but not yet durable: read by transactions only.
    pending: Pending,
}

/// Per key: `last` of the pending batch that wrote it, and the value (`None`: removed).
type PendingValues = BTreeMap<Vec<u8>, (u64, Option<Arc<[u8]>>)>;

/// The writes of committed batches not yet durable, newest value per key.
struct Pending {
    /// Per table.
    tables: Vec<PendingValues>,
    /// The revision after the newest pending batch; the view's revision when none waits.
    revision: u64,
}

impl Pending {
    fn new(revision: u64) -> Pending {
        Pending {
            tables: Table::ALL.iter().map(|_| BTreeMap::new()).collect(),
            revision,
        }
    }

    fn add(&mut self, batch: &Batch) {
        for write in &batch.writes {
            self.tables[write.table.position()].insert(
                write.key.clone(),
                (batch.last, write.value.as_deref().map(Arc::from)),
            );
        }
        self.revision = batch.last;
    }

    /// Forgets what `batch` wrote, unless a later pending batch wrote the key again.
    fn settle(&mut self, batch: &Batch) {
        for write in &batch.writes {
            let table = &mut self.tables[write.table.position()];
            if table
                .get(&write.key)
                .is_some_and(|(last, _)| *last <= batch.last)
            {
                table.remove(&write.key);
            }
        }
        self.revision = self.revision.max(batch.last);
    }
}

/// One write as applied to the view, with the value it replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The table.
    pub table: Table,
    /// The key.
    pub key: Vec<u8>,
    /// The new value; `None` when the key was removed.
    pub value: Option<Arc<[u8]>>,
    /// The value before; `None` when the key is new.
    pub previous: Option<Arc<[u8]>>,
}

/// One committed batch as the view applied it: what the change feed carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The batch's revision (the `resourceVersion` of what it wrote).
    pub revision: u64,
    /// The store's revision after it.
    pub last: u64,
    /// Its writes, in order.
    pub changes: Vec<Changed>,
}

impl View {
    fn empty() -> View {
        View {
            revision: 0,
            tables: Table::ALL.iter().map(|_| Values::new()).collect(),
            recent: VecDeque::new(),
            pending: Pending::new(0),
        }
    }

    fn from_snapshot(snapshot: Snapshot) -> View {
        let mut view = View::empty();
        view.revision = snapshot.revision;
        view.pending = Pending::new(snapshot.revision);
        for (table, key, value) in snapshot.entries {
            view.tables[table.position()].insert(key, value.into());
        }
        view
    }

    fn apply(&mut self, batch: Batch) -> Applied {
        let mut changes = Vec::with_capacity(batch.writes.len());
        for write in batch.writes {
            let table = &mut self.tables[write.table.position()];
            let value: Option<Arc<[u8]>> = write.value.map(Arc::from);
            let previous = match &value {
                Some(value) => table.insert(write.key.clone(), value.clone()),
                None => table.remove(&write.key),
            };
            changes.push(Changed {
                table: write.table,
                key: write.key,
                value,
                previous,
            });
        }
        self.revision = batch.last;
        Applied {
            revision: batch.revision,
            last: batch.last,
            changes,
        }
    }
}

/// What subscribers of the change feed receive.
#[derive(Debug, Clone)]
pub enum Feed {
    /// One committed batch, in revision order.
    Batch(Arc<Applied>),
    /// The view was reloaded from a snapshot at this revision (the feed no longer reached
    /// back far enough): everything derived from it must be rebuilt.
    Reset(u64),
}

/// The store: an in-memory view of a [`Backend`], transactions over it, and its change feed.
pub struct Store {
    backend: Arc<dyn Backend>,
    view: RwLock<View>,
    /// One transaction of this process at a time: local writers never conflict.
    writer: tokio::sync::Mutex<()>,
    /// One catch-up at a time.
    catching_up: tokio::sync::Mutex<()>,
    feed: broadcast::Sender<Feed>,
    revision: watch::Sender<u64>,
    /// Why the last attempt to read other processes' commits failed, while it stays failed.
    lagging: std::sync::Mutex<Option<StoreError>>,
    shared: bool,
    /// With a backend no other process writes (sled, memory): commits are persisted behind
    /// the view, in order, by one task (see `transact`).
    behind: Option<WriteBehind>,
}

/// The queue of committed batches not yet durable.
struct WriteBehind {
    queue: tokio::sync::mpsc::UnboundedSender<Batch>,
    /// Why persisting failed; from then on the store takes no writes.
    failed: Arc<std::sync::Mutex<Option<StoreError>>>,
}

/// Most writes persisted in one backend commit.
const MAX_WRITES_PER_PERSIST: usize = 20_000;

/// Persists queued batches in order, merging those waiting into one backend commit and
/// one flush, then shows them (view, feed, waiting writers), until the queue closes, the
/// store is dropped or the backend fails.
async fn persist(
    store: std::sync::Weak<Store>,
    backend: Arc<dyn Backend>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Batch>,
    failed: Arc<std::sync::Mutex<Option<StoreError>>>,
) {
    while let Some(first) = queue.recv().await {
        let mut batches = vec![first];
        let mut writes = batches[0].writes.len();
        while writes < MAX_WRITES_PER_PERSIST {
            match queue.try_recv() {
                Ok(next) => {
                    writes += next.writes.len();
                    batches.push(next);
                }
                Err(_) => break,
            }
        }
        let merged = if batches.len() == 1 {
            None
        } else {
            Some(Batch {
                revision: batches[0].revision,
                last: batches[batches.len() - 1].last,
                writes: batches.iter().flat_map(|b| b.writes.clone()).collect(),
            })
        };
        let merged = merged.as_ref().unwrap_or(&batches[0]);
        let started = std::time::Instant::now();
        let outcome = match backend.commit(merged).await {
            Ok(Committed::Done) => {
                let committed = started.elapsed();
                let flushed = backend.flush().await;
                let took = started.elapsed();
                if took > SLOW_TRANSACTION {
                    // Every write of this process waited this long to be shown.
                    tracing::warn!(
                        revision = merged.revision,
                        batches = batches.len(),
                        writes,
                        commit_ms = committed.as_millis() as u64,
                        flush_ms = (took - committed).as_millis() as u64,
                        "slow persist"
                    );
                }
                flushed
            }
            Ok(Committed::Conflict) => Err(StoreError::Backend(format!(
                "the stored revision is not {}: another process wrote to this store",
                merged.revision - 1
            ))),
            Err(error) => Err(error),
        };
        let Some(store) = store.upgrade() else {
            return;
        };
        match outcome {
            Ok(()) => store.publish(batches),
            Err(error) => {
                tracing::error!(%error, revision = merged.revision, "cannot persist committed changes; the store takes no more writes");
                *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
                // Wake the writers waiting for their batches: they read the failure.
                store.revision.send_modify(|_| {});
                return;
            }
        }
    }
}

impl Store {
    /// A store over `backend`, loaded from it. With a backend other processes write to, a
    /// task follows their commits for as long as the store lives.
    pub async fn open(backend: Arc<dyn Backend>) -> Result<Arc<Store>, StoreError> {
        let snapshot = backend.load().await?;
        let view = View::from_snapshot(snapshot);
        let backend_news = backend.news();
        let (feed, _) = broadcast::channel(RECENT_BATCHES);
        let (revision, _) = watch::channel(view.revision);
        let mut queued = None;
        let behind = backend_news.is_none().then(|| {
            let (queue, receiver) = tokio::sync::mpsc::unbounded_channel();
            queued = Some(receiver);
            WriteBehind {
                queue,
                failed: Arc::new(std::sync::Mutex::new(None)),
            }
        });
        let store = Arc::new(Store {
            backend,
            view: RwLock::new(view),
            writer: tokio::sync::Mutex::new(()),
            catching_up: tokio::sync::Mutex::new(()),
            feed,
            revision,
            lagging: std::sync::Mutex::new(None),
            shared: backend_news.is_some(),
            behind,
        });
        if let (Some(queue), Some(behind)) = (queued, &store.behind) {
            tokio::spawn(persist(
                Arc::downgrade(&store),
                store.backend.clone(),
                queue,
                behind.failed.clone(),
            ));
        }
        if let Some(news) = backend_news {
            tokio::spawn(follow(Arc::downgrade(&store), news));
        }
        Ok(store)
    }

    /// A store in memory only (tests).
    pub async fn memory() -> Arc<Store> {
        Store::open(Arc::new(MemoryBackend::default()))
            .await
            .expect("the memory backend cannot fail")
    }

    /// Whether this store can serve: a store shared with other processes is not while it
    /// cannot read their commits (it would serve an old view).
    pub fn check(&self) -> Result<(), StoreError> {
        if let Some(error) = self.persist_failure() {
            return Err(error);
        }
        match &*self.lagging.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Why persisting behind the view failed, if it did.
    fn persist_failure(&self) -> Option<StoreError> {
        let behind = self.behind.as_ref()?;
        behind
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether other processes write to this store too (replicas on one database).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// What the backend is.
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The revision of the newest change this store has seen.
    pub fn revision(&self) -> u64 {
        self.view().revision
    }

    /// Follows the store's revision (every change this process has seen, its own and others').
    pub fn watch_revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Every batch from now on, in revision order.
    pub fn subscribe(&self) -> broadcast::Receiver<Feed> {
        self.feed.subscribe()
    }

    /// The batches after `revision` still kept in memory, and a subscription that continues
    /// exactly where they end; `None` when `revision` is older than what is kept.
    pub fn resume(&self, revision: u64) -> Option<(Vec<Arc<Applied>>, broadcast::Receiver<Feed>)> {
        let view = self.view();
        // Subscribing under the view's lock: no batch can slip between the two.
        let receiver = self.feed.subscribe();
        if revision >= view.revision {
            return Some((Vec::new(), receiver));
        }
        let oldest = view.recent.front()?;
        if oldest.revision > revision + 1 {
            return None;
        }
        let batches = view
            .recent
            .iter()
            .filter(|b| b.revision > revision)
            .cloned()
            .collect();
        Some((batches, receiver))
    }

    /// Reads one key.
    pub fn get(&self, table: Table, key: &[u8]) -> Option<Arc<[u8]>> {
        self.view().tables[table.position()].get(key).cloned()
    }

    /// Every key/value whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Vec<(Vec<u8>, Arc<[u8]>)> {
        let view = self.view();
        prefixed(&view.tables[table.position()], prefix)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The first `limit` entries with key ≥ `start`, in key order.
    pub fn scan_from(&self, table: Table, start: &[u8], limit: usize) -> Vec<(Vec<u8>, Arc<[u8]>)> {
        let view = self.view();
        view.tables[table.position()]
            .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The entry with the largest key.
    pub fn last(&self, table: Table) -> Option<(Vec<u8>, Arc<[u8]>)> {
        let view = self.view();
        view.tables[table.position()]
            .last_key_value()
            .map(|(k, v)| (k.clone(), v.clone()))
    }

    /// Number of entries in a table.
    pub fn len(&self, table: Table) -> usize {
        self.view().tables[table.position()].len()
    }

    /// Runs `f` as one transaction and returns its value and the revision it committed at
    /// (the store's current revision when it wrote nothing), once what it wrote is durable
    /// and shown. An `Err` from `f` writes nothing. `f` may run more than once (when
    /// another replica committed first), so it must not have effects outside the
    /// transaction.
    pub async fn transact<T, E>(
        &self,
        f: impl Fn(&mut dyn Txn) -> Result<T, E>,
    ) -> Result<(T, u64), TxnError<E>> {
        let queued = std::time::Instant::now();
        let one_writer = self.writer.lock().await;
        let waited = queued.elapsed();
        for _attempt in 0..MAX_ATTEMPTS {
            let (value, batch, base) = {
                let view = self.view();
                // Built on what is committed, durable or not: commits are serial.
                let base = view.pending.revision.max(view.revision);
                let mut txn = ViewTxn {
                    view: &view,
                    writes: BTreeMap::new(),
                    order: Vec::new(),
                    revision: base + 1,
                    last: base + 1,
                };
                let value = f(&mut txn).map_err(TxnError::Aborted)?;
                (value, txn.into_batch(), base)
            };
            if batch.writes.is_empty() {
                // It may have read writes not yet durable: answer once they are.
                drop(one_writer);
                self.shown(base).await.map_err(TxnError::Store)?;
                return Ok((value, base));
            }
            let computed = queued.elapsed();
            if let Some(behind) = &self.behind {
                // No other process writes this backend, so the commit cannot conflict: it
                // joins the pending layer (the next transaction builds on it) and one task
                // persists it, in order, and then shows it.
                if let Some(error) = self.persist_failure() {
                    return Err(TxnError::Store(error));
                }
                let (revision, last) = (batch.revision, batch.last);
                self.view
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pending
                    .add(&batch);
                if behind.queue.send(batch).is_err() {
                    return Err(TxnError::Store(StoreError::Backend(
                        "the store's persisting task has stopped".into(),
                    )));
                }
                // The next writer computes while this one waits for the disk.
                drop(one_writer);
                self.shown(last).await.map_err(TxnError::Store)?;
                return Ok((value, revision));
            }
            match self.backend.commit(&batch).await.map_err(TxnError::Store)? {
                Committed::Done => {
                    let revision = batch.revision;
                    let writes = batch.writes.len();
                    self.publish(vec![batch]);
                    let took = queued.elapsed();
                    if took > SLOW_TRANSACTION {
                        // Every other writer of this process waited this long.
                        tracing::warn!(
                            revision,
                            writes,
                            waited_ms = waited.as_millis() as u64,
                            computed_ms = (computed - waited).as_millis() as u64,
                            total_ms = took.as_millis() as u64,
                            "slow transaction"
                        );
                    }
                    return Ok((value, revision));
                }
                Committed::Conflict => self.catch_up().await.map_err(TxnError::Store)?,
            }
        }
        Err(TxnError::Store(StoreError::Contention {
            attempts: MAX_ATTEMPTS,
        }))
    }

    /// Removes keys in one transaction (retention).
    pub async fn remove_keys(&self, table: Table, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        self.transact(|txn| {
            for key in keys {
                txn.delete(table, key)?;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .map(|_| ())
        .map_err(|e| match e {
            TxnError::Aborted(e) | TxnError::Store(e) => e,
        })
    }

    /// Waits until every write committed so far (queued ones too) is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        if self.behind.is_some() {
            let target = self.view().pending.revision;
            return self.shown(target).await;
        }
        self.backend.flush().await
    }

    /// Waits until the view shows revision `revision`, which this process committed: it
    /// is durable then. Fails when persisting failed.
    async fn shown(&self, revision: u64) -> Result<(), StoreError> {
        let mut shown = self.revision.subscribe();
        loop {
            if *shown.borrow_and_update() >= revision {
                return Ok(());
            }
            if let Some(error) = self.persist_failure() {
                return Err(error);
            }
            // The sender lives in `self`: it cannot close while we borrow it.
            let _ = shown.changed().await;
        }
    }

    /// Brings the view up to the backend: applies what others committed, or reloads a
    /// snapshot when the backend no longer keeps the batches this view lacks.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let _one = self.catching_up.lock().await;
        let after = self.revision();
        if let Some(batches) = self.backend.changes_after(after).await? {
            // A batch that does not follow the one before (the backend compacted
            // between two reads) cannot be applied: reload instead.
            let mut expected = after;
            let contiguous = batches.iter().all(|b| {
                let follows = b.revision == expected + 1 && b.last >= b.revision;
                expected = b.last;
                follows
            });
            if contiguous {
                self.publish(batches);
                return Ok(());
            }
        }
        let snapshot = self.backend.load().await?;
        let revision = snapshot.revision;
        {
            let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
            if revision <= view.revision {
                return Ok(());
            }
            *view = View::from_snapshot(snapshot);
        }
        tracing::warn!(
            revision,
            "the store's change feed no longer reached back; reloaded"
        );
        let _ = self.feed.send(Feed::Reset(revision));
        self.revision.send_replace(revision);
        Ok(())
    }

    /// Applies batches in order (skipping what the view already holds) and tells subscribers.
    fn publish(&self, batches: Vec<Batch>) {
        if batches.is_empty() {
            return;
        }
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        for batch in batches {
            if batch.last <= view.revision {
                continue;
            }
            if batch.revision != view.revision + 1 {
                // Never expected: the backend's commit check makes batches follow each other.
                tracing::error!(
                    have = view.revision,
                    got = batch.revision,
                    "a batch out of order was not applied"
                );
                continue;
            }
            view.pending.settle(&batch);
            let applied = Arc::new(view.apply(batch));
            if view.recent.len() == RECENT_BATCHES {
                view.recent.pop_front();
            }
            view.recent.push_back(applied.clone());
            // Sent under the view's lock, so subscribers see batches in order and
            // `resume` cannot miss one.
            let _ = self.feed.send(Feed::Batch(applied));
        }
        let revision = view.revision;
        drop(view);
        self.revision.send_replace(revision);
    }
}

/// Follows other processes' commits until the store is dropped.
async fn follow(store: std::sync::Weak<Store>, mut news: watch::Receiver<u64>) {
    loop {
        let _ = tokio::time::timeout(POLL_INTERVAL, news.changed()).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let outcome = store.catch_up().await;
        let mut lagging = store.lagging.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(()) => {
                if lagging.take().is_some() {
                    tracing::info!("reading other replicas' changes again");
                }
            }
            Err(error) => {
                if lagging.is_none() {
                    tracing::warn!(%error, "cannot read other replicas' changes; retrying");
                }
                *lagging = Some(error);
            }
        }
    }
}

fn prefixed<'a>(
    values: &'a Values,
    prefix: &'a [u8],
) -> impl Iterator<Item = (&'a Vec<u8>, &'a Arc<[u8]>)> {
    values
        .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

struct ViewTxn<'a> {
    view: &'a View,
    writes: BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
    /// Keys in the order first written, so a batch replays as it was made.
    order: Vec<(Table, Vec<u8>)>,
    revision: u64,
    last: u64,
}

impl ViewTxn<'_> {
    fn into_batch(mut self) -> Batch {
        let writes = self
            .order
            .into_iter()
            .map(|(table, key)| {
                let value = self
                    .writes
                    .remove(&(table, key.clone()))
                    .expect("every ordered key was written");
                Write { table, key, value }
            })
            .collect();
        Batch {
            revision: self.revision,
            last: self.last,
            writes,
        }
    }

    fn write(&mut self, table: Table, key: &[u8], value: Option<Vec<u8>>) {
        if self.writes.insert((table, key.to_vec()), value).is_none() {
            self.order.push((table, key.to_vec()));
        }
    }
}

impl Txn for ViewTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(write) = self.writes.get(&(table, key.to_vec())) {
            return Ok(write.clone());
        }
        if let Some((_, pending)) = self.view.pending.tables[table.position()].get(key) {
            return Ok(pending.as_deref().map(<[u8]>::to_vec));
        }
        Ok(self.view.tables[table.position()]
            .get(key)
            .map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            prefixed(&self.view.tables[table.position()], prefix)
                .map(|(k, v)| (k.clone(), v.to_vec()))
                .collect();
        let pending = &self.view.pending.tables[table.position()];
        for (key, (_, value)) in pending
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            match value {
                Some(value) => merged.insert(key.clone(), value.to_vec()),
                None => merged.remove(key),
            };
        }
        for ((t, key), value) in &self.writes {
            if *t != table || !key.starts_with(prefix) {
                continue;
            }
            match value {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn put(&mut self, table: Table, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.write(table, key, Some(value));
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        self.write(table, key, None);
        Ok(())
    }

    fn revision(&self) -> u64 {
        self.revision
    }

    fn next_id(&mut self) -> u64 {
        self.last += 1;
        self.last
    }
}

/// Encodes a value as stored (JSON: readable with any tool, and tolerant of added fields).
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("stored types always serialize")
}

/// Decodes a stored value.
fn decode<T: DeserializeOwned>(table: Table, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table: table.name(),
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// A table with the type of the values it holds. Callers name a `Typed` constant instead of
/// a `Table` and bytes, so a value can only be written to, and read from, the table whose
/// type it has; the encoding (JSON) and its error (`StoreError::Corrupt`, naming the table
/// and key) live here once.
pub struct Typed<V> {
    table: Table,
    value: std::marker::PhantomData<fn() -> V>,
}

impl<V: Serialize + DeserializeOwned> Typed<V> {
    /// The table `table`, holding values of type `V`.
    pub const fn new(table: Table) -> Self {
        Typed {
            table,
            value: std::marker::PhantomData,
        }
    }

    /// The untyped table (for matching on feed changes).
    pub fn table(&self) -> Table {
        self.table
    }

    /// Decodes a value of this table.
    pub fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<V, StoreError> {
        decode(self.table, key, bytes)
    }

    /// Reads a key inside a transaction.
    pub fn get(&self, txn: &dyn Txn, key: &[u8]) -> Result<Option<V>, StoreError> {
        txn.get(self.table, key)?
            .map(|bytes| self.decode(key, &bytes))
            .transpose()
    }

    /// Writes a key inside a transaction.
    pub fn put(&self, txn: &mut dyn Txn, key: &[u8], value: &V) -> Result<(), StoreError> {
        txn.put(self.table, key, encode(value))
    }

    /// Removes a key inside a transaction.
    pub fn delete(&self, txn: &mut dyn Txn, key: &[u8]) -> Result<(), StoreError> {
        txn.delete(self.table, key)
    }

    /// Every key and value under `prefix` inside a transaction, in key order.
    pub fn scan(&self, txn: &dyn Txn, prefix: &[u8]) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        txn.scan_prefix(self.table, prefix)?
            .into_iter()
            .map(|(key, bytes)| {
                let value = self.decode(&key, &bytes)?;
                Ok((key, value))
            })
            .collect()
    }

    /// Up to `limit` keys and values after `after` (from the first key without one) in the
    /// store's current view, in key order: a page of a list.
    pub fn read_after(
        &self,
        store: &Store,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Vec<(Vec<u8>, Result<V, StoreError>)> {
        // The smallest key greater than `after` is `after` followed by a zero byte.
        let start = after.map_or_else(Vec::new, |after| [after, &[0]].concat());
        store
            .scan_from(self.table, &start, limit)
            .into_iter()
            .map(|(key, bytes)| {
                let value = self.decode(&key, &bytes);
                (key, value)
            })
            .collect()
    }

    /// The keys under `prefix` inside a transaction, in key order, without decoding.
    pub fn keys(&self, txn: &dyn Txn, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(txn
            .scan_prefix(self.table, prefix)?
            .into_iter()
            .map(|(key, _)| key)
            .collect())
    }

    /// Reads a key from the store's current view, outside a transaction.
    pub fn read(&self, store: &Store, key: &[u8]) -> Result<Option<V>, StoreError> {
        store
            .get(self.table, key)
            .map(|bytes| self.decode(key, &bytes))
            .transpose()
    }

    /// Every key and value under `prefix` in the store's current view, in key order; a value
    /// that does not decode is that entry's error, not the whole scan's.
    pub fn read_prefix(
        &self,
        store: &Store,
        prefix: &[u8],
    ) -> Vec<(Vec<u8>, Result<V, StoreError>)> {
        store
            .scan_prefix(self.table, prefix)
            .into_iter()
            .map(|(key, bytes)| {
                let value = self.decode(&key, &bytes);
                (key, value)
            })
            .collect()
    }
}

/// Key of a revision: name, NUL, big-endian revision (so keys sort by revision).
pub fn revision_key(name: &str, revision: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 9);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(&revision.to_be_bytes());
    key
}

/// Prefix of every revision key of a DesiredState.
pub fn revision_prefix(name: &str) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key
}

/// Key of an assignment: node, NUL, DesiredState.
pub fn assignment_key(node: &str, desired_state: &str) -> Vec<u8> {
    let mut key = node.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(desired_state.as_bytes());
    key
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    async fn put(store: &Store, table: Table, key: &[u8], value: &[u8]) -> u64 {
        store
            .transact(|txn| txn.put(table, key, value.to_vec()))
            .await
            .map_err(|_| ())
            .unwrap()
            .1
    }

    /// A backend whose disk is full: every commit fails.
    struct FullDisk;

    #[async_trait::async_trait]
    impl Backend for FullDisk {
        fn kind(&self) -> &'static str {
            "full"
        }
        async fn load(&self) -> Result<Snapshot, StoreError> {
            Ok(Snapshot {
                revision: 0,
                entries: Vec::new(),
            })
        }
        async fn commit(&self, _batch: &Batch) -> Result<Committed, StoreError> {
            Err(StoreError::Backend("No space left on device".into()))
        }
        async fn changes_after(&self, _after: u64) -> Result<Option<Vec<Batch>>, StoreError> {
            Ok(Some(Vec::new()))
        }
        fn news(&self) -> Option<watch::Receiver<u64>> {
            None
        }
        async fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_store_that_cannot_persist_fails_its_writes_and_readiness_and_shows_nothing() {
        let store = Store::open(Arc::new(FullDisk)).await.unwrap();
        // The first write is refused by the disk: its writer is told so, naming the cause,
        // and nobody ever saw it.
        let error = store
            .transact(|txn| txn.put(Table::Nodes, b"n1", b"{}".to_vec()))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&error, TxnError::Store(e) if e.to_string().contains("No space left")),
            "{error:?}"
        );
        assert!(store.get(Table::Nodes, b"n1").is_none(), "never shown");
        assert!(store.flush().await.is_err());
        assert!(store.check().is_err(), "not ready");
        let refused = store
            .transact(|txn| txn.put(Table::Nodes, b"n2", b"{}".to_vec()))
            .await;
        assert!(matches!(refused, Err(TxnError::Store(_))));
        assert!(
            store.get(Table::Nodes, b"n2").is_none(),
            "a refused write is not shown"
        );
    }

    /// A memory backend whose flush (its disk) waits until the test opens the gate.
    struct SlowDisk {
        inner: MemoryBackend,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl Backend for SlowDisk {
        fn kind(&self) -> &'static str {
            "slow"
        }
        async fn load(&self) -> Result<Snapshot, StoreError> {
            self.inner.load().await
        }
        async fn commit(&self, batch: &Batch) -> Result<Committed, StoreError> {
            self.inner.commit(batch).await
        }
        async fn changes_after(&self, after: u64) -> Result<Option<Vec<Batch>>, StoreError> {
            self.inner.changes_after(after).await
        }
        fn news(&self) -> Option<watch::Receiver<u64>> {
            None
        }
        async fn flush(&self) -> Result<(), StoreError> {
            self.gate.acquire().await.expect("open").forget();
            Ok(())
        }
    }

    #[tokio::test]
    async fn nothing_is_shown_or_acknowledged_before_it_is_durable() {
        let disk = Arc::new(SlowDisk {
            inner: MemoryBackend::default(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let store = Store::open(disk.clone()).await.unwrap();
        let mut feed = store.subscribe();
        let first = store.revision() + 1;
        let write = |key: &'static [u8], value: &'static [u8]| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .transact(|txn| {
                        let seen = txn.get(Table::Nodes, b"n1")?;
                        let scanned = txn.scan_prefix(Table::Nodes, b"n")?;
                        txn.put(Table::Nodes, key, value.to_vec())?;
                        Ok::<_, StoreError>((seen, scanned.len()))
                    })
                    .await
                    .map_err(|_| ())
                    .unwrap()
            })
        };
        let pending = |revision: u64| {
            let store = store.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while store.view().pending.revision < revision {
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .expect("the transaction commits within 10 s");
            }
        };
        // Once a batch has joined the pending layer, its writer only waits for the disk,
        // which holds every flush: nobody sees it, the feed carries nothing, and its writer
        // is not answered...
        let one = write(b"n1", b"1");
        pending(first).await;
        tokio::task::yield_now().await;
        assert_eq!(store.get(Table::Nodes, b"n1"), None);
        assert_eq!(store.revision(), first - 1);
        assert!(feed.try_recv().is_err(), "the feed carries nothing yet");
        assert!(!one.is_finished(), "answered before durable");
        // ...while the next transaction builds on it (and waits likewise).
        let second = write(b"n2", b"2");
        pending(first + 1).await;
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "answered before durable");
        assert_eq!(store.get(Table::Nodes, b"n2"), None);
        let mut revision = store.watch_revision();
        // Both batches are persisted (one flush each, or one for both): open the gate once
        // per flush until the second writer is answered, and it saw the first write.
        disk.gate.add_permits(1);
        revision.wait_for(|r| *r >= first).await.unwrap();
        assert_eq!(store.get(Table::Nodes, b"n1").as_deref(), Some(&b"1"[..]));
        assert_eq!(one.await.unwrap(), ((None, 0), first));
        disk.gate.add_permits(1);
        let ((seen, scanned), at) = second.await.unwrap();
        assert_eq!((seen.as_deref(), scanned), (Some(&b"1"[..]), 1));
        assert_eq!(at, first + 1);
        assert_eq!(store.get(Table::Nodes, b"n2").as_deref(), Some(&b"2"[..]));
        let revisions: Vec<u64> = std::iter::from_fn(|| match feed.try_recv() {
            Ok(Feed::Batch(b)) => Some(b.revision),
            _ => None,
        })
        .collect();
        assert_eq!(revisions, vec![first, first + 1], "in order, each once");
    }

    /// The contract every backend must meet, through the store; run against each of them.
    /// `reopen` opens a second store on the same backend data (another replica, or the
    /// same directory after a restart).
    pub(crate) async fn contract(store: &Store) {
        let start = store.revision();
        let mut feed = store.subscribe();

        // Writes of an aborted transaction never land, and take no revision.
        let aborted = store
            .transact(|txn| {
                txn.put(Table::Nodes, b"a", b"1".to_vec())
                    .map_err(|_| "store")?;
                Err::<(), _>("no")
            })
            .await;
        assert!(matches!(aborted, Err(TxnError::Aborted("no"))));
        assert_eq!(store.get(Table::Nodes, b"a"), None);
        assert_eq!(store.revision(), start);

        // A transaction sees its own writes, commits across tables, and issues its revision
        // and further numbers above everything before.
        let ((seen, scanned, revision, id), committed) = store
            .transact(|txn| -> Result<_, StoreError> {
                txn.put(Table::Nodes, b"a", b"1".to_vec())?;
                txn.put(Table::Nodes, b"b", b"2".to_vec())?;
                txn.delete(Table::Nodes, b"b")?;
                txn.put(Table::Events, &7u64.to_be_bytes(), b"e".to_vec())?;
                let id = txn.next_id();
                Ok((
                    txn.get(Table::Nodes, b"a")?,
                    txn.scan_prefix(Table::Nodes, b"")?,
                    txn.revision(),
                    id,
                ))
            })
            .await
            .map_err(|_| ())
            .unwrap();
        assert_eq!(seen, Some(b"1".to_vec()));
        assert_eq!(scanned, vec![(b"a".to_vec(), b"1".to_vec())]);
        assert_eq!(revision, start + 1);
        assert_eq!(committed, revision);
        assert_eq!(id, revision + 1);
        assert_eq!(
            store.revision(),
            id,
            "the counter passed every number issued"
        );
        assert_eq!(
            store.get(Table::Events, &7u64.to_be_bytes()).as_deref(),
            Some(&b"e"[..])
        );
        assert_eq!(store.get(Table::Nodes, b"b"), None);

        // A transaction that writes nothing takes no revision.
        let (_, unchanged) = store
            .transact(|txn| txn.get(Table::Nodes, b"a"))
            .await
            .map_err(|_| ())
            .unwrap();
        assert_eq!(unchanged, id);

        // Scans are in key order and tables are separate.
        for rev in [3u64, 1, 2] {
            put(
                store,
                Table::Revisions,
                &revision_key("x", rev),
                &[rev as u8],
            )
            .await;
        }
        put(store, Table::Revisions, &revision_key("xy", 1), &[9]).await;
        let revs: Vec<u8> = store
            .scan_prefix(Table::Revisions, &revision_prefix("x"))
            .into_iter()
            .map(|(_, v)| v[0])
            .collect();
        assert_eq!(revs, vec![1, 2, 3]);
        assert_eq!(store.len(Table::Revisions), 4);
        assert_eq!(&*store.last(Table::Revisions).unwrap().1, &[9]);
        let from = store.scan_from(Table::Revisions, &revision_key("x", 2), 2);
        assert_eq!(from.len(), 2);
        assert_eq!(&*from[0].1, &[2]);

        // Deletes, and removal in bulk.
        store
            .transact(|txn| txn.delete(Table::Nodes, b"a"))
            .await
            .map_err(|_| ())
            .unwrap();
        assert_eq!(store.get(Table::Nodes, b"a"), None);
        store
            .remove_keys(Table::Revisions, &[revision_key("x", 1)])
            .await
            .unwrap();
        assert_eq!(store.len(Table::Revisions), 3);

        // The feed carried every commit, in revision order, each following the one before.
        let mut batches = Vec::new();
        while let Ok(Feed::Batch(batch)) = feed.try_recv() {
            batches.push(batch);
        }
        assert_eq!(batches.len(), 7);
        let mut expected = start;
        for batch in &batches {
            assert_eq!(batch.revision, expected + 1);
            expected = batch.last;
        }
        assert_eq!(expected, store.revision());
        type Seen<'a> = (Table, &'a [u8], Option<&'a [u8]>, Option<&'a [u8]>);
        let writes: Vec<Seen> = batches[0]
            .changes
            .iter()
            .map(|c| {
                (
                    c.table,
                    c.key.as_slice(),
                    c.value.as_deref(),
                    c.previous.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            writes,
            vec![
                (Table::Nodes, &b"a"[..], Some(&b"1"[..]), None),
                // Put and removed in one transaction: the batch removes it.
                (Table::Nodes, &b"b"[..], None, None),
                (
                    Table::Events,
                    &7u64.to_be_bytes()[..],
                    Some(&b"e"[..]),
                    None
                ),
            ]
        );
        // A later batch carries the value it replaced.
        let delete_a = &batches[5].changes[0];
        assert_eq!(delete_a.key, b"a".to_vec());
        assert_eq!(
            (delete_a.value.as_deref(), delete_a.previous.as_deref()),
            (None, Some(&b"1"[..]))
        );

        // A watch resumes from any revision it kept, with exactly the later batches.
        let (resumed, _) = store.resume(batches[5].revision).unwrap();
        assert_eq!(resumed, batches[6..].to_vec());
        let (none_yet, _) = store.resume(store.revision()).unwrap();
        assert!(none_yet.is_empty());

        // Concurrent transactions of one process commit one after another, each seeing the last.
        let counters = futures::future::join_all((0..20).map(|_| {
            store.transact(|txn| {
                let n = txn
                    .get(Table::Leases, b"counter")?
                    .map(|v| u64::from_be_bytes(v.try_into().expect("8 bytes")))
                    .unwrap_or(0);
                txn.put(Table::Leases, b"counter", (n + 1).to_be_bytes().to_vec())?;
                Ok::<_, StoreError>(n)
            })
        }))
        .await;
        let mut seen: Vec<u64> = counters
            .into_iter()
            .map(|r| r.map_err(|_| ()).unwrap().0)
            .collect();
        seen.sort();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        store.flush().await.unwrap();
    }

    /// Two stores on one backend's data (two replicas): each sees the other's commits
    /// within a second, a commit computed on a stale view is refused and run again on
    /// the fresh one, and neither loses a write.
    pub(crate) async fn shared_contract(a: &Store, b: &Store) {
        let key = b"shared-counter";
        async fn bump(store: &Store, key: &[u8]) -> (u64, u64) {
            store
                .transact(|txn| {
                    let n = txn
                        .get(Table::Leases, key)?
                        .map(|v| u64::from_be_bytes(v.try_into().expect("8 bytes")))
                        .unwrap_or(0);
                    txn.put(Table::Leases, key, (n + 1).to_be_bytes().to_vec())?;
                    Ok::<_, StoreError>(n + 1)
                })
                .await
                .map_err(|_| ())
                .unwrap()
        }
        // Interleaved writers on both replicas: every increment survives.
        let (from_a, from_b) = futures::future::join(
            futures::future::join_all((0..15).map(|_| bump(a, key))),
            futures::future::join_all((0..15).map(|_| bump(b, key))),
        )
        .await;
        let mut values: Vec<u64> = from_a.iter().chain(&from_b).map(|(v, _)| *v).collect();
        values.sort();
        assert_eq!(values, (1..=30).collect::<Vec<_>>(), "no increment lost");
        // Revisions are unique across both replicas.
        let mut revisions: Vec<u64> = from_a.iter().chain(&from_b).map(|(_, r)| *r).collect();
        revisions.sort();
        revisions.dedup();
        assert_eq!(revisions.len(), 30);

        // Each replica sees the other's last write within a second.
        let last = *revisions.last().unwrap();
        for store in [a, b] {
            let mut revision = store.watch_revision();
            tokio::time::timeout(Duration::from_secs(1), revision.wait_for(|r| *r >= last))
                .await
                .expect("the other replica's commit is seen within a second")
                .unwrap();
            assert_eq!(
                store.get(Table::Leases, key).as_deref(),
                Some(&30u64.to_be_bytes()[..])
            );
        }
    }

    #[tokio::test]
    async fn the_memory_backend_meets_the_store_contract() {
        contract(&*Store::memory().await).await;
    }
}
