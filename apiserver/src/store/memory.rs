//! The in-memory twin of the sled store, for unit tests of the object logic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Entry, Store, StoreError, Table, Txn, TxnError};

type Tables = BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>;

/// A store that keeps everything in memory and loses it on drop.
#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
    version: AtomicU64,
    /// Set while a transaction runs: sled deadlocks when asked for an id inside one,
    /// so the twin refuses loudly instead of hiding the bug from unit tests.
    in_transaction: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Tables) -> T) -> T {
        f(&mut self.tables.lock().expect("not poisoned"))
    }
}

struct MemoryTxn<'a> {
    base: &'a Tables,
    /// Pending writes: `None` is a delete.
    writes: BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
}

impl Txn for MemoryTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(write) = self.writes.get(&(table, key.to_vec())) {
            return Ok(write.clone());
        }
        Ok(self.base.get(&table).and_then(|t| t.get(key)).cloned())
    }
    fn put(&mut self, table: Table, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.writes.insert((table, key.to_vec()), Some(value));
        Ok(())
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        self.writes.insert((table, key.to_vec()), None);
        Ok(())
    }
}

impl Store for MemoryStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.with(|t| t.get(&table).and_then(|t| t.get(key)).cloned()))
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        Ok(self.with(|t| {
            t.get(&table)
                .map(|t| {
                    t.range(prefix.to_vec()..)
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
        }))
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        Ok(self.with(|t| {
            t.get(&table)
                .map(|t| {
                    t.range(start.to_vec()..)
                        .take(limit)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
        }))
    }

    fn last(&self, table: Table) -> Result<Option<Entry>, StoreError> {
        Ok(self.with(|t| {
            t.get(&table)
                .and_then(|t| t.last_key_value())
                .map(|(k, v)| (k.clone(), v.clone()))
        }))
    }

    fn len(&self, table: Table) -> Result<usize, StoreError> {
        Ok(self.with(|t| t.get(&table).map_or(0, BTreeMap::len)))
    }

    fn remove_keys(&self, table: Table, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        self.with(|t| {
            if let Some(t) = t.get_mut(&table) {
                for key in keys {
                    t.remove(key);
                }
            }
        });
        Ok(())
    }

    fn next_version(&self) -> Result<u64, StoreError> {
        assert!(
            !self.in_transaction.load(Ordering::SeqCst),
            "next_version inside a transaction deadlocks on sled; allocate before transact"
        );
        Ok(self.version.fetch_add(1, Ordering::SeqCst) + 1)
    }

    fn transact_raw(
        &self,
        f: &dyn Fn(&mut dyn Txn) -> Result<(), String>,
    ) -> Result<(), TxnError<String>> {
        // One lock for the whole transaction: trivially serializable.
        let mut tables = self.tables.lock().expect("not poisoned");
        let mut txn = MemoryTxn {
            base: &tables,
            writes: BTreeMap::new(),
        };
        f(&mut txn).map_err(TxnError::Aborted)?;
        let writes = std::mem::take(&mut txn.writes);
        for ((table, key), value) in writes {
            let t = tables.entry(table).or_default();
            match value {
                Some(value) => t.insert(key, value),
                None => t.remove(&key),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn meets_the_store_contract() {
        super::super::tests::contract(&super::MemoryStore::new());
    }
}
