//! Leader election over the store: a lease with an epoch; the leader's rollout writes are
//! fenced by that epoch, so a deposed leader's decisions are refused.

use super::*;

/// This replica's part in leader election.
#[derive(Default)]
pub(super) struct LeaseState {
    pub(super) observed: Option<lease::Observed>,
    /// Our epoch while we lead, and until when we may act on it.
    pub(super) held: Option<(u64, Instant)>,
    /// When this replica last became leader.
    pub(super) since: Option<SystemTime>,
}

/// This replica's name in the leader lease: host, process and a random tag (a restarted
/// process is another replica).
pub(super) fn replica_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "apiserver".into());
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A lease record that does not decode is no lease (it is overwritten); a store that fails
/// is an error.
fn no_lease_if_corrupt(
    read: Result<Option<Lease>, StoreError>,
) -> Result<Option<Lease>, StoreError> {
    match read {
        Err(StoreError::Corrupt { .. }) => Ok(None),
        other => other,
    }
}

impl Controller {
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
                LEASES
                    .read(&self.store, LEADER)
                    .ok()
                    .flatten()
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
    pub(super) fn leading_since(&self) -> SystemTime {
        if !self.store.is_shared() {
            return self.started;
        }
        let state = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        state.since.unwrap_or(self.started).max(self.started)
    }

    /// One round of leader election; the server runs it every third of the lease duration.
    pub async fn lease_tick(&self) -> Result<(), Error> {
        if !self.store.is_shared() {
            return Ok(());
        }
        let started = Instant::now();
        let duration = self.config.lease_duration;
        // A record that does not decode is no lease: it is overwritten.
        let record = no_lease_if_corrupt(LEASES.read(&self.store, LEADER))?;
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
                if no_lease_if_corrupt(LEASES.get(txn, LEADER))? != expected {
                    return Err(Error::Conflict {
                        message: "the lease changed meanwhile".into(),
                        hint: String::new(),
                    });
                }
                LEASES.put(txn, LEADER, &next)?;
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
    pub(super) fn fence(&self, txn: &dyn Txn, epoch: u64) -> Result<(), Error> {
        if !self.store.is_shared() {
            return Ok(());
        }
        match LEASES.get(txn, LEADER)? {
            Some(lease) if lease.holder == self.identity && lease.epoch == epoch => Ok(()),
            _ => Err(Error::Conflict {
                message: "this replica no longer leads".into(),
                hint: String::new(),
            }),
        }
    }
}
