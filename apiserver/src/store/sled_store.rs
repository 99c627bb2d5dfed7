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
    /// Commits run here, one after the other (the store persists its batches in order).
    writer: Background,
    /// Flushes run here, beside commits: a flush waits on the disk, a commit need not.
    flusher: Background,
}

/// A thread of its own at a lower scheduling priority (nice 10), for sled's CPU work.
///
/// The store's view takes writes at once and persists them behind it, so persisting is
/// never what a request waits for — except a flush, which waits for what came before it.
/// At 10,000 nodes, persisting a rollout wave (10,000 assignments) costs sled most of a
/// second of CPU; at normal priority that second was taken from the async workers while
/// every node's heartbeat waited. At nice 10 the kernel gives the workers the cores first
/// and sled what is left, which on an idle-enough server is all it needs. sled's own
/// threads (its flusher) are started from here and inherit the priority.
struct Background {
    jobs: std::sync::mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

/// The nice value the background threads ask for.
const BACKGROUND_NICE: u8 = 25; // `thread_priority`'s 0–99 scale: about nice +10 on Linux

impl Background {
    fn start(name: &str) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                lower_current_thread_priority();
                // Ends when the backend (the only sender) is dropped.
                while let Ok(job) = queue.recv() {
                    job();
                }
            })?;
        Ok(Background { jobs })
    }

    /// Runs `f` on this thread and waits for its result without blocking an async worker.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = done.send(f());
            }))
            .map_err(|_| StoreError::Backend("the sled worker thread is gone".into()))?;
        result
            .await
            .map_err(|_| StoreError::Backend("the sled worker thread stopped mid-job".into()))
    }
}

/// Lowers the calling thread's priority; failing (a sandbox that forbids it, a process
/// already niced further) leaves it as it was, which only costs latency elsewhere.
fn lower_current_thread_priority() {
    use thread_priority::{set_current_thread_priority, ThreadPriority, ThreadPriorityValue};
    let Ok(value) = ThreadPriorityValue::try_from(BACKGROUND_NICE) else {
        return;
    };
    if let Err(error) = set_current_thread_priority(ThreadPriority::Crossplatform(value)) {
        tracing::debug!(?error, "cannot lower the sled threads' priority");
    }
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
        let thread = |name| {
            Background::start(name)
                .map_err(|e| StoreError::Backend(format!("cannot start a thread: {e}")))
        };
        let writer = thread("sled-writer")?;
        let flusher = thread("sled-flusher")?;
        // Opened on the writer's thread, so that the threads sled starts share its priority.
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(200));
        let (opened, result) = std::sync::mpsc::channel();
        writer
            .jobs
            .send(Box::new(move || {
                let _ = opened.send(config.open());
            }))
            .map_err(|_| StoreError::Backend("the sled worker thread is gone".into()))?;
        let db = result
            .recv()
            .map_err(|_| StoreError::Backend("the sled worker thread stopped".into()))?
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
        Ok(SledBackend {
            db,
            trees,
            writer,
            flusher,
        })
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
        // Off the async workers: a sled transaction can wait on sled's own I/O (its flusher,
        // a large batch), and an async worker that waits stalls every request on it.
        let trees = self.trees.clone();
        let batch = batch.clone();
        self.writer
            .run(move || Self::commit_now(&trees, &batch))
            .await?
    }

    async fn changes_after(&self, _after: u64) -> Result<Option<Vec<Batch>>, StoreError> {
        Ok(Some(Vec::new()))
    }

    fn news(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // On its own thread, and awaited to the end: sled's own `flush_async` leaves a
        // worker holding the database (and its directory lock) after it resolves.
        let db = self.db.clone();
        self.flusher
            .run(move || db.flush())
            .await?
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
