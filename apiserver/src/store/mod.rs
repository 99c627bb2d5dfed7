//! Storage: a small transactional key-value interface, with sled and in-memory backends.
//!
//! The object logic (revisions, resourceVersion checks, node records) lives in
//! `server::controller` and is written once against [`Txn`], so the in-memory
//! twin used by unit tests exercises exactly the code that runs on sled.

mod memory;
mod sled_store;

pub use memory::MemoryStore;
pub use sled_store::{SledStore, DEFAULT_CACHE_BYTES};

use serde::de::DeserializeOwned;
use serde::Serialize;

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
}

impl Table {
    /// Every table, in a fixed order (the sled backend opens one tree per table).
    pub const ALL: [Table; 6] = [
        Table::DesiredStates,
        Table::Revisions,
        Table::Nodes,
        Table::Rollouts,
        Table::Events,
        Table::Assignments,
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
        }
    }

    fn position(self) -> usize {
        Table::ALL.iter().position(|t| *t == self).expect("listed")
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (disk, corruption).
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
}

/// Reads and writes inside one atomic transaction.
pub trait Txn {
    /// Reads a key, seeing this transaction's own writes.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes a key.
    fn put(&mut self, table: Table, key: &[u8], value: Vec<u8>) -> Result<(), StoreError>;
    /// Removes a key.
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError>;
}

/// Why a transaction did not commit: the store failed, or the closure gave up.
#[derive(Debug)]
pub enum TxnError<E> {
    /// The closure returned an error; nothing was written.
    Aborted(E),
    /// The store failed.
    Store(StoreError),
}

/// A transactional key-value store.
pub trait Store: Send + Sync + 'static {
    /// Reads one key (outside any transaction).
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key/value whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;
    /// The first `limit` entries with key ≥ `start`, in key order.
    fn scan_from(&self, table: Table, start: &[u8], limit: usize)
        -> Result<Vec<Entry>, StoreError>;
    /// The entry with the largest key.
    fn last(&self, table: Table) -> Result<Option<Entry>, StoreError>;
    /// Number of entries in a table.
    fn len(&self, table: Table) -> Result<usize, StoreError>;
    /// Removes keys outside any transaction (event retention).
    fn remove_keys(&self, table: Table, keys: &[Vec<u8>]) -> Result<(), StoreError>;
    /// A new, strictly increasing number, durable across restarts: resourceVersions and event sequence numbers.
    fn next_version(&self) -> Result<u64, StoreError>;
    /// Runs `f` atomically: either every write of it lands or none does. The
    /// closure may run more than once (optimistic concurrency), so it must not
    /// have side effects outside the transaction.
    fn transact_raw(
        &self,
        f: &dyn Fn(&mut dyn Txn) -> Result<(), String>,
    ) -> Result<(), TxnError<String>>;
    /// Makes every committed write durable now.
    fn flush(&self) -> Result<(), StoreError>;
}

/// Runs `f` in a transaction and returns its value; an `Err` from `f` aborts and writes nothing.
pub fn transact<T, E>(
    store: &dyn Store,
    f: impl Fn(&mut dyn Txn) -> Result<T, E>,
) -> Result<T, TxnError<E>> {
    // The trait object can only carry a String error; keep the real error and value aside.
    let value = std::sync::Mutex::new(None);
    let error = std::sync::Mutex::new(None);
    let outcome = store.transact_raw(&|txn| match f(txn) {
        Ok(v) => {
            *value.lock().expect("not poisoned") = Some(v);
            Ok(())
        }
        Err(e) => {
            *error.lock().expect("not poisoned") = Some(e);
            Err(String::new())
        }
    });
    match outcome {
        Ok(()) => Ok(value
            .into_inner()
            .expect("not poisoned")
            .expect("set on success")),
        Err(TxnError::Aborted(_)) => Err(TxnError::Aborted(
            error
                .into_inner()
                .expect("not poisoned")
                .expect("set on abort"),
        )),
        Err(TxnError::Store(e)) => Err(TxnError::Store(e)),
    }
}

/// Encodes a value as stored (JSON: readable with any sled tool, and tolerant of added fields).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("stored types always serialize")
}

/// Decodes a stored value.
pub fn decode<T: DeserializeOwned>(
    table: Table,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table: table.name(),
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
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

    /// The contract every backend must meet; run against each of them.
    pub(crate) fn contract(store: &dyn Store) {
        // Writes of an aborted transaction never land.
        let aborted = transact(store, |txn| {
            txn.put(Table::Nodes, b"a", b"1".to_vec())
                .map_err(|_| "store")?;
            Err::<(), _>("no")
        });
        assert!(matches!(aborted, Err(TxnError::Aborted("no"))));
        assert_eq!(store.get(Table::Nodes, b"a").unwrap(), None);

        // A transaction sees its own writes and commits across tables.
        let seen = transact(store, |txn| -> Result<_, StoreError> {
            txn.put(Table::Nodes, b"a", b"1".to_vec())?;
            txn.put(Table::Events, &7u64.to_be_bytes(), b"e".to_vec())?;
            txn.get(Table::Nodes, b"a")
        })
        .map_err(|_| ())
        .unwrap();
        assert_eq!(seen, Some(b"1".to_vec()));
        assert_eq!(
            store.get(Table::Events, &7u64.to_be_bytes()).unwrap(),
            Some(b"e".to_vec())
        );

        // Scans are in key order and tables are separate.
        for rev in [3u64, 1, 2] {
            transact(store, |txn| {
                txn.put(Table::Revisions, &revision_key("x", rev), vec![rev as u8])
            })
            .map_err(|_| ())
            .unwrap();
        }
        transact(store, |txn| {
            txn.put(Table::Revisions, &revision_key("xy", 1), vec![9])
        })
        .map_err(|_| ())
        .unwrap();
        let revs: Vec<u8> = store
            .scan_prefix(Table::Revisions, &revision_prefix("x"))
            .unwrap()
            .into_iter()
            .map(|(_, v)| v[0])
            .collect();
        assert_eq!(revs, vec![1, 2, 3]);
        assert_eq!(store.len(Table::Revisions).unwrap(), 4);
        assert_eq!(store.last(Table::Revisions).unwrap().unwrap().1, vec![9]);
        let from = store
            .scan_from(Table::Revisions, &revision_key("x", 2), 2)
            .unwrap();
        assert_eq!(from.len(), 2);
        assert_eq!(from[0].1, vec![2]);

        // Deletes, and removal outside a transaction.
        transact(store, |txn| txn.delete(Table::Nodes, b"a"))
            .map_err(|_| ())
            .unwrap();
        assert_eq!(store.get(Table::Nodes, b"a").unwrap(), None);
        store
            .remove_keys(Table::Revisions, &[revision_key("x", 1)])
            .unwrap();
        assert_eq!(store.len(Table::Revisions).unwrap(), 3);

        // Versions strictly increase.
        let a = store.next_version().unwrap();
        let b = store.next_version().unwrap();
        assert!(b > a);
        store.flush().unwrap();
    }
}
