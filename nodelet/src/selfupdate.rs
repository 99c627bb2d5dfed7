//! The nodelet's own updates: the record of a release on trial and the launcher's decision.
//!
//! The launcher (the installed binary) runs a pinned release as its child and is the one that
//! puts a bad release back, so the decision lives here as a pure function of the trial record,
//! the release `current` points at and the clock: see docs/self-update.md.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A release on trial, kept in `releases/trial.json`; the launcher and the agents (old and
/// new) read and write it, always whole (temp file and rename).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trial {
    /// The release on trial.
    pub version: String,
    /// The release to go back to.
    pub previous: String,
    /// Wall clock (Unix seconds) when the agent switched to the release.
    pub started_at: u64,
    /// How long the release has to commit (the DesiredState's `healthyDeadlineSeconds`).
    pub deadline_seconds: u64,
    /// Times the launcher started the release.
    pub starts: u32,
    /// Starts after which a release that has not committed is put back (a crash loop).
    pub max_starts: u32,
    /// Set by the release itself once it is healthy; from then on it is the good release.
    pub committed: bool,
}

/// Why a release on trial is put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevertReason {
    /// It exited (crashed, or refused to start) this many times without committing.
    CrashLoop {
        /// Starts used up.
        starts: u32,
    },
    /// It ran but did not commit within its deadline.
    Deadline {
        /// The deadline it had.
        seconds: u64,
    },
    /// The trial record cannot be read: nothing can vouch for the current release.
    Unreadable(String),
}

impl std::fmt::Display for RevertReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevertReason::CrashLoop { starts } => write!(
                f,
                "the new nodelet exited {starts} times without becoming healthy"
            ),
            RevertReason::Deadline { seconds } => write!(
                f,
                "the new nodelet did not become healthy (heartbeat accepted, probes passing) within {seconds}s"
            ),
            RevertReason::Unreadable(why) => {
                write!(f, "the record of the nodelet's trial is unreadable: {why}")
            }
        }
    }
}

/// What the launcher does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Run the current release: there is no trial, or it committed.
    Run,
    /// The trial never began (the switch to the new release did not happen): forget the
    /// record and run the current release, whose agent redoes its step.
    Abandon,
    /// Start the release on trial for the `starts`-th time (record it before starting) and
    /// stop it if it has not committed `within` this long.
    Try {
        /// The start count to record.
        starts: u32,
        /// How long this start may run without committing.
        within: Duration,
    },
    /// Put the previous release back (`None`: the last committed one, `releases/good`).
    Revert {
        /// The release to go back to.
        to: Option<String>,
        /// Why.
        reason: RevertReason,
    },
}

/// The launcher's decision, taken when it starts, when its child exits, and when a start's
/// `within` has passed. `trial` is the record as read (`Err`: unreadable), `current` the
/// release `releases/current` points at, `now` the wall clock in Unix seconds.
///
/// The deadline is wall clock, so it runs on across a reboot; but a board's clock can jump
/// (no RTC, then NTP), so each start may run at most the whole deadline, and starts are
/// bounded: a trial ends within `maxStarts × deadline` whatever the clock does.
pub fn decide(trial: Result<Option<&Trial>, String>, current: &str, now: u64) -> Launch {
    let trial = match trial {
        Ok(None) => return Launch::Run,
        Ok(Some(trial)) => trial,
        Err(why) => {
            return Launch::Revert {
                to: None,
                reason: RevertReason::Unreadable(why),
            }
        }
    };
    if trial.committed {
        return Launch::Run;
    }
    if trial.version != current {
        return Launch::Abandon;
    }
    if trial.starts >= trial.max_starts.max(1) {
        return Launch::Revert {
            to: Some(trial.previous.clone()),
            reason: RevertReason::CrashLoop {
                starts: trial.starts,
            },
        };
    }
    let deadline = trial.deadline_seconds.max(1);
    // A clock behind the start (it jumped back) counts as no time elapsed.
    let elapsed = now.saturating_sub(trial.started_at);
    if elapsed >= deadline {
        return Launch::Revert {
            to: Some(trial.previous.clone()),
            reason: RevertReason::Deadline { seconds: deadline },
        };
    }
    Launch::Try {
        starts: trial.starts + 1,
        within: Duration::from_secs(deadline - elapsed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial() -> Trial {
        Trial {
            version: "0.2.0".into(),
            previous: "0.1.0".into(),
            started_at: 1_000,
            deadline_seconds: 120,
            starts: 0,
            max_starts: 3,
            committed: false,
        }
    }

    #[test]
    fn without_a_trial_or_after_a_commit_the_current_release_runs() {
        assert_eq!(decide(Ok(None), "0.1.0", 5_000), Launch::Run);
        let committed = Trial {
            committed: true,
            starts: 9,
            ..trial()
        };
        assert_eq!(decide(Ok(Some(&committed)), "0.2.0", 99_999), Launch::Run);
    }

    #[test]
    fn a_release_on_trial_runs_for_what_is_left_of_its_deadline() {
        assert_eq!(
            decide(Ok(Some(&trial())), "0.2.0", 1_000),
            Launch::Try {
                starts: 1,
                within: Duration::from_secs(120)
            }
        );
        let restarted = Trial {
            starts: 1,
            ..trial()
        };
        assert_eq!(
            decide(Ok(Some(&restarted)), "0.2.0", 1_100),
            Launch::Try {
                starts: 2,
                within: Duration::from_secs(20)
            }
        );
    }

    #[test]
    fn a_crash_loop_and_a_missed_deadline_put_the_previous_release_back() {
        let crashed = Trial {
            starts: 3,
            ..trial()
        };
        let revert = decide(Ok(Some(&crashed)), "0.2.0", 1_001);
        assert_eq!(
            revert,
            Launch::Revert {
                to: Some("0.1.0".into()),
                reason: RevertReason::CrashLoop { starts: 3 }
            }
        );
        let Launch::Revert { reason, .. } = revert else {
            unreachable!()
        };
        assert_eq!(
            reason.to_string(),
            "the new nodelet exited 3 times without becoming healthy"
        );
        // Exactly at the deadline, and long after it (a board that was off).
        for now in [1_120, 50_000] {
            assert_eq!(
                decide(Ok(Some(&trial())), "0.2.0", now),
                Launch::Revert {
                    to: Some("0.1.0".into()),
                    reason: RevertReason::Deadline { seconds: 120 }
                }
            );
        }
    }

    #[test]
    fn a_clock_that_jumped_back_still_bounds_the_trial() {
        // The clock reads 1970 after a reboot without an RTC: no time elapsed, a whole
        // deadline for this start, and the start still counts.
        let rebooted = Trial {
            starts: 2,
            ..trial()
        };
        assert_eq!(
            decide(Ok(Some(&rebooted)), "0.2.0", 5),
            Launch::Try {
                starts: 3,
                within: Duration::from_secs(120)
            }
        );
        let used_up = Trial {
            starts: 3,
            ..trial()
        };
        assert!(matches!(
            decide(Ok(Some(&used_up)), "0.2.0", 5),
            Launch::Revert {
                reason: RevertReason::CrashLoop { .. },
                ..
            }
        ));
    }

    #[test]
    fn a_trial_that_never_switched_is_abandoned_and_an_unreadable_one_goes_back_to_good() {
        assert_eq!(decide(Ok(Some(&trial())), "0.1.0", 1_000), Launch::Abandon);
        assert_eq!(
            decide(Err("expected value at line 1".into()), "0.2.0", 1_000),
            Launch::Revert {
                to: None,
                reason: RevertReason::Unreadable("expected value at line 1".into())
            }
        );
        // Zero limits cannot make a trial endless or refuse every start.
        let zero = Trial {
            max_starts: 0,
            deadline_seconds: 0,
            ..trial()
        };
        assert_eq!(
            decide(Ok(Some(&zero)), "0.2.0", 1_000),
            Launch::Try {
                starts: 1,
                within: Duration::from_secs(1)
            }
        );
    }
}
