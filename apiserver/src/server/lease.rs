//! Leader election over the store: one replica runs the rollout controller, the readiness
//! sweep and git sync; every replica serves reads, writes, long polls and watches.
//!
//! The lease is a record in the store (`Table::Leases`, key `leader`) that its holder renews
//! every third of its duration. Like client-go's leader election, a follower never compares
//! its clock with the holder's: it notes when it first saw the current record, on its own
//! monotonic clock, and takes over only when that record has stayed unchanged for a whole
//! lease duration. Each change of holder increments `epoch`, the fencing token: a leader's
//! writes check, inside their transaction, that the lease still names it with its epoch,
//! and commits are serial in the store, so a deposed leader's write either sees the new
//! lease (and is refused) or conflicts with it (and runs again, and is refused).

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// Which replica leads (its identity: host, process, start).
    pub holder: String,
    /// Increments at every change of holder: the fencing token.
    pub epoch: u64,
    /// When the holder last renewed it, by the holder's clock (for people; never compared).
    #[serde(with = "manifests::wire::rfc3339::required")]
    pub renewed: SystemTime,
    /// How long a record left unrenewed stays valid, in milliseconds.
    pub duration_ms: u64,
}

/// The key of the leader lease.
pub const LEADER: &[u8] = b"leader";

/// A lease record as a follower first saw it, on its own clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The record.
    pub lease: Lease,
    /// When this replica first saw exactly this record.
    pub since: Instant,
}

/// What a replica does with the lease on one tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write this lease (a renewal of ours, or a takeover) if the store still holds `expected`.
    Write {
        /// The record the decision was made on.
        expected: Option<Lease>,
        /// The record to write.
        lease: Lease,
    },
    /// Another replica leads; look again later.
    Follow {
        /// Who.
        holder: String,
    },
}

/// Updates what this replica has observed of the record: a changed record restarts the clock.
pub fn observe(
    previous: Option<Observed>,
    record: Option<&Lease>,
    now: Instant,
) -> Option<Observed> {
    let record = record?;
    match previous {
        Some(seen) if seen.lease == *record => Some(seen),
        _ => Some(Observed {
            lease: record.clone(),
            since: now,
        }),
    }
}

/// The decision of replica `me`, given the stored record and when it was first observed.
pub fn decide(
    record: Option<&Lease>,
    observed: Option<&Observed>,
    me: &str,
    now: Instant,
    wall: SystemTime,
    duration: Duration,
) -> Decision {
    let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let fresh = |epoch: u64| Lease {
        holder: me.to_string(),
        epoch,
        renewed: wall,
        duration_ms,
    };
    let Some(current) = record else {
        return Decision::Write {
            expected: None,
            lease: fresh(1),
        };
    };
    if current.holder == me {
        return Decision::Write {
            expected: Some(current.clone()),
            lease: fresh(current.epoch),
        };
    }
    // The holder's own duration, not ours: replicas may be configured differently.
    let valid_for = Duration::from_millis(current.duration_ms);
    let unchanged_for = observed
        .filter(|o| o.lease == *current)
        .map(|o| now.saturating_duration_since(o.since))
        .unwrap_or_default();
    if unchanged_for >= valid_for {
        return Decision::Write {
            expected: Some(current.clone()),
            lease: fresh(current.epoch + 1),
        };
    }
    Decision::Follow {
        holder: current.holder.clone(),
    }
}

/// Until when a replica that renewed at `renewed` (its monotonic clock, taken before it
/// wrote) may act as leader: a margin short of the lease, so it stops before any follower
/// can have seen the record unchanged for the whole duration.
pub fn acts_until(renewed: Instant, duration: Duration) -> Instant {
    renewed + duration.mul_f64(0.8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(10);

    fn lease(holder: &str, epoch: u64) -> Lease {
        Lease {
            holder: holder.into(),
            epoch,
            renewed: SystemTime::UNIX_EPOCH,
            duration_ms: 10_000,
        }
    }

    #[test]
    fn the_first_replica_takes_an_absent_lease_at_epoch_one() {
        let now = Instant::now();
        match decide(None, None, "a", now, SystemTime::now(), D) {
            Decision::Write {
                expected: None,
                lease,
            } => {
                assert_eq!(lease.holder, "a");
                assert_eq!(lease.epoch, 1);
                assert_eq!(lease.duration_ms, 10_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_holder_renews_keeping_its_epoch() {
        let now = Instant::now();
        let held = lease("a", 4);
        let seen = observe(None, Some(&held), now);
        match decide(Some(&held), seen.as_ref(), "a", now, SystemTime::now(), D) {
            Decision::Write { expected, lease } => {
                assert_eq!(expected, Some(held));
                assert_eq!((lease.holder.as_str(), lease.epoch), ("a", 4));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_follower_takes_over_only_after_a_record_unchanged_for_a_whole_lease() {
        let start = Instant::now();
        let held = lease("a", 4);
        let seen = observe(None, Some(&held), start);
        // However old the holder's timestamp looks, a follower that just saw it waits.
        assert_eq!(
            decide(Some(&held), seen.as_ref(), "b", start, SystemTime::now(), D),
            Decision::Follow { holder: "a".into() }
        );
        let almost = start + D - Duration::from_millis(1);
        assert!(matches!(
            decide(
                Some(&held),
                seen.as_ref(),
                "b",
                almost,
                SystemTime::now(),
                D
            ),
            Decision::Follow { .. }
        ));
        match decide(
            Some(&held),
            seen.as_ref(),
            "b",
            start + D,
            SystemTime::now(),
            D,
        ) {
            Decision::Write { expected, lease } => {
                assert_eq!(expected, Some(held));
                assert_eq!((lease.holder.as_str(), lease.epoch), ("b", 5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_renewal_restarts_the_followers_clock() {
        let start = Instant::now();
        let first = lease("a", 4);
        let seen = observe(None, Some(&first), start);
        let mut renewed = first.clone();
        renewed.renewed = SystemTime::UNIX_EPOCH + Duration::from_secs(3);
        let later = start + D;
        let seen = observe(seen, Some(&renewed), later);
        assert_eq!(seen.as_ref().unwrap().since, later);
        assert!(matches!(
            decide(
                Some(&renewed),
                seen.as_ref(),
                "b",
                later,
                SystemTime::now(),
                D
            ),
            Decision::Follow { .. }
        ));
        // Unchanged observations keep the first sighting.
        let again = observe(seen.clone(), Some(&renewed), later + D);
        assert_eq!(again.unwrap().since, later);
    }

    #[test]
    fn the_holders_duration_counts_not_the_followers() {
        let start = Instant::now();
        let mut long = lease("a", 1);
        long.duration_ms = 60_000;
        let seen = observe(None, Some(&long), start);
        assert!(matches!(
            decide(
                Some(&long),
                seen.as_ref(),
                "b",
                start + D,
                SystemTime::now(),
                D
            ),
            Decision::Follow { .. }
        ));
    }

    #[test]
    fn a_leader_stops_acting_before_any_follower_can_take_over() {
        let renewed = Instant::now();
        assert!(acts_until(renewed, D) < renewed + D);
    }
}
