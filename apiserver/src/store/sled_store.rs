//! The sled backend, the embedded default: one tree per table plus a `meta` tree holding
//! the revision, written together in one multi-tree transaction.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use tokio::sync::watch;

use super::{Backend, Batch, Committed, Snapshot, StoreError, Table};

/// Page cache for sled. Its default is 1 GiB; the apiserver has to fit beside
/// everything else on an 8 GB ARM board, and its working set (manifests,
/// node records) is far smaller than this.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

const REVISION_KEY: &[u8] = b"revision";

/// The sled-backed store. sled locks its directory, so this process is its only writer.
pub struct SledBackend {
    db: sled::Db,
    /// The table trees in `Table::ALL` order, then the meta tree.
    trees: Vec<sled::Tree>,
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn revision_of(bytes: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        table: "meta",
        key: "revision".into(),
        reason: format!("{} bytes, not 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

impl SledBackend {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // No flusher of sled's own: the store flushes after every group commit (nothing is
            // shown before), so a periodic fsync besides would only add disk work. (Turning it
            // off did not remove sled's occasional 100–450 ms single-write commits on a slow
            // disk; docs/benchmarks.md.)
            .flush_every_ms(None)
            .open()
            .map_err(|e| {
                StoreError::Backend(format!(
                    "cannot open the data directory {}: {e} (is another apiserver using it?)",
                    dir.display()
                ))
            })?;
        let mut trees = Table::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        let meta = db.open_tree("meta").map_err(backend)?;
        if meta.get(REVISION_KEY).map_err(backend)?.is_none() {
            // A data directory from before the revision counter: its versions came from
            // sled's id generator, which is persisted ahead of use, so starting above its
            // next id keeps every new revision above every old one.
            let start = db.generate_id().map_err(backend)? + 1;
            meta.insert(REVISION_KEY, &start.to_be_bytes())
                .map_err(backend)?;
            db.flush().map_err(backend)?;
        }
        trees.push(meta);
        Ok(SledBackend { db, trees })
    }

    fn meta(&self) -> &sled::Tree {
        self.trees.last().expect("meta tree opened")
    }
}

#[async_trait::async_trait]
impl Backend for SledBackend {
    fn kind(&self) -> &'static str {
        "sled"
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        // Only this process writes, and it loads before its first write: consistent.
        let revision = match self.meta().get(REVISION_KEY).map_err(backend)? {
            Some(bytes) => revision_of(&bytes)?,
            None => 0,
        };
        let mut entries = Vec::new();
        for (table, tree) in Table::ALL.iter().zip(&self.trees) {
            for item in tree.iter() {
                let (key, value) = item.map_err(backend)?;
                entries.push((*table, key.to_vec(), value.to_vec()));
            }
        }
        Ok(Snapshot { revision, entries })
    }

    async fn commit(&self, batch: &Batch) -> Result<Committed, StoreError> {
        // On the blocking pool: a sled transaction can wait on sled's own I/O (its flusher,
        // a large batch), and an async worker that waits stalls every request on it.
        let trees = self.trees.clone();
        let batch = batch.clone();
        tokio::task::spawn_blocking(move || Self::commit_now(&trees, &batch))
            .await
            .map_err(|e| StoreError::Backend(format!("commit: {e}")))?
    }

    async fn changes_after(&self, _after: u64) -> Result<Option<Vec<Batch>>, StoreError> {
        Ok(Some(Vec::new()))
    }

    fn news(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // On the blocking pool, and awaited to the end: sled's own `flush_async` leaves a
        // worker holding the database (and its directory lock) after it resolves.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Backend(format!("flush: {e}")))?
            .map(|_| ())
            .map_err(backend)
    }
}

impl SledBackend {
    /// Commits `batch` if the stored revision is the one before it.
    fn commit_now(trees: &[sled::Tree], batch: &Batch) -> Result<Committed, StoreError> {
        let result =
            Transactional::<Committed>::transaction(trees, |trees: &Vec<TransactionalTree>| {
                let meta = trees.last().expect("meta tree opened");
                let current = meta
                    .get(REVISION_KEY)?
                    .map(|bytes| revision_of(&bytes))
                    .transpose()
                    .map_err(|_| ConflictableTransactionError::Abort(Committed::Conflict))?
                    .unwrap_or(0);
                if current + 1 != batch.revision {
                    return Err(ConflictableTransactionError::Abort(Committed::Conflict));
                }
                for write in &batch.writes {
                    let tree = &trees[write.table as usize];
                    match &write.value {
                        Some(value) => tree.insert(write.key.as_slice(), value.as_slice())?,
                        None => tree.remove(write.key.as_slice())?,
                    };
                }
                meta.insert(REVISION_KEY, &batch.last.to_be_bytes())?;
                Ok(())
            });
        match result {
            Ok(()) => Ok(Committed::Done),
            Err(TransactionError::Abort(outcome)) => Ok(outcome),
            Err(TransactionError::Storage(e)) => Err(backend(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::Store;
    use super::*;

    /// Opens `dir` again once the dropped database lets go of it: sled's flusher thread
    /// holds the directory lock until its next tick.
    async fn reopen(dir: &Path) -> SledBackend {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledBackend::open(dir, DEFAULT_CACHE_BYTES) {
                Ok(backend) => return backend,
                Err(e)
                    if std::time::Instant::now() < deadline && e.to_string().contains("lock") =>
                {
                    // Asleep in the runtime: the dropped store's persisting task lets go of
                    // the database when it runs.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[tokio::test]
    async fn meets_the_store_contract_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let revision = {
            let backend = SledBackend::open(dir.path(), DEFAULT_CACHE_BYTES).unwrap();
            let store = Store::open(Arc::new(backend)).await.unwrap();
            super::super::tests::contract(&store).await;
            // Durable once flushed: commits are persisted behind the view.
            store.flush().await.unwrap();
            store.revision()
        };
        let store = Store::open(Arc::new(reopen(dir.path()).await))
            .await
            .unwrap();
        assert_eq!(store.revision(), revision);
        assert_eq!(
            store.get(Table::Events, &7u64.to_be_bytes()).as_deref(),
            Some(&b"e"[..])
        );
        assert_eq!(store.len(Table::Revisions), 3);
    }

    #[tokio::test]
    async fn a_data_directory_from_before_the_counter_continues_above_its_versions() {
        let dir = tempfile::tempdir().unwrap();
        let old_version = {
            // What an older apiserver left: tables and sled's id generator, no meta tree.
            let db = sled::open(dir.path()).unwrap();
            let mut version = 0;
            for _ in 0..5 {
                version = db.generate_id().unwrap() + 1;
            }
            db.open_tree("nodes")
                .unwrap()
                .insert("old", &b"{}"[..])
                .unwrap();
            db.flush().unwrap();
            version
        };
        let store = Store::open(Arc::new(reopen(dir.path()).await))
            .await
            .unwrap();
        assert!(store.revision() > old_version);
        assert!(store.get(Table::Nodes, b"old").is_some());
        let (_, revision) = store
            .transact(|txn| txn.put(Table::Nodes, b"new", b"{}".to_vec()))
            .await
            .map_err(|_| ())
            .unwrap();
        assert!(revision > old_version);
    }
}
