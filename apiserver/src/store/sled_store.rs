//! The sled backend: one tree per table, multi-tree transactions, a bounded page cache.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use super::{Entry, Store, StoreError, Table, Txn, TxnError};

/// Page cache for sled. Its default is 1 GiB; the apiserver has to fit beside
/// everything else on an 8 GB ARM board, and its working set (manifests,
/// node records) is far smaller than this.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(200))
            .open()
            .map_err(|e| {
                StoreError::Backend(format!(
                    "cannot open the data directory {}: {e} (is another apiserver using it?)",
                    dir.display()
                ))
            })?;
        let trees = Table::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(SledStore { db, trees })
    }

    fn tree(&self, table: Table) -> &sled::Tree {
        &self.trees[table.position()]
    }
}

struct SledTxn<'a> {
    trees: &'a [TransactionalTree],
}

fn txn_backend(e: sled::transaction::UnabortableTransactionError) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl Txn for SledTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.trees[table.position()]
            .get(key)
            .map_err(txn_backend)?
            .map(|v| v.to_vec()))
    }
    fn put(&mut self, table: Table, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.trees[table.position()]
            .insert(key, value)
            .map_err(txn_backend)?;
        Ok(())
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        self.trees[table.position()]
            .remove(key)
            .map_err(txn_backend)?;
        Ok(())
    }
}

fn pairs(
    iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
) -> Result<Vec<Entry>, StoreError> {
    iter.map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(backend))
        .collect()
}

impl Store for SledStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(table)
            .get(key)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        pairs(self.tree(table).scan_prefix(prefix))
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        pairs(self.tree(table).range(start.to_vec()..).take(limit))
    }

    fn last(&self, table: Table) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .tree(table)
            .last()
            .map_err(backend)?
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn len(&self, table: Table) -> Result<usize, StoreError> {
        Ok(self.tree(table).len())
    }

    fn remove_keys(&self, table: Table, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key.as_slice());
        }
        self.tree(table).apply_batch(batch).map_err(backend)
    }

    fn next_version(&self) -> Result<u64, StoreError> {
        // sled persists the id generator ahead of use, so ids stay increasing after a crash.
        self.db.generate_id().map_err(backend).map(|id| id + 1)
    }

    fn transact_raw(
        &self,
        f: &dyn Fn(&mut dyn Txn) -> Result<(), String>,
    ) -> Result<(), TxnError<String>> {
        let result = Transactional::<String>::transaction(
            self.trees.as_slice(),
            |trees: &Vec<TransactionalTree>| {
                let mut txn = SledTxn { trees };
                match f(&mut txn) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(ConflictableTransactionError::Abort(e)),
                }
            },
        );
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(TxnError::Aborted(e)),
            Err(TransactionError::Storage(e)) => Err(TxnError::Store(backend(e))),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meets_the_store_contract_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), DEFAULT_CACHE_BYTES).unwrap();
            super::super::tests::contract(&store);
        }
        let store = SledStore::open(dir.path(), DEFAULT_CACHE_BYTES).unwrap();
        assert_eq!(
            store.get(Table::Events, &7u64.to_be_bytes()).unwrap(),
            Some(b"e".to_vec())
        );
        assert!(store.next_version().unwrap() > 2);
    }
}
