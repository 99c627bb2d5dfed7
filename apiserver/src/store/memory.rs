//! The in-memory backend: the store's view is all there is, so it keeps only the revision.

use std::sync::Mutex;

use tokio::sync::watch;

use super::{Backend, Batch, Committed, Snapshot, StoreError};

/// A backend that keeps nothing but the counter and loses everything on drop (tests).
#[derive(Default)]
pub struct MemoryBackend {
    revision: Mutex<u64>,
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        // A memory backend opens once per store: there is never anything to load.
        Ok(Snapshot {
            revision: *self.revision.lock().expect("not poisoned"),
            entries: Vec::new(),
        })
    }

    async fn commit(&self, batch: &Batch) -> Result<Committed, StoreError> {
        let mut revision = self.revision.lock().expect("not poisoned");
        if *revision + 1 != batch.revision {
            return Ok(Committed::Conflict);
        }
        *revision = batch.last;
        Ok(Committed::Done)
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
