//! Rollouts as the rollout controller stores them: reads, the per-wave node views, the
//! reconcile loop (leader only), pause, resume and undo.

use super::*;

/// A DesiredState whose rollout decision keeps failing.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    pub(super) failures: u32,
    pub(super) retry_at: SystemTime,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            failures: 0,
            retry_at: SystemTime::UNIX_EPOCH,
        }
    }
}

/// A rollout decision slower than this (nodes read, judged and written) is logged.
const SLOW_DECISION: Duration = Duration::from_millis(200);
/// How often pause or resume reads again when the rollout loop wrote the rollout meanwhile;
/// the waits between attempts double from 10 ms (about 1.3 s in all).
const PAUSE_ATTEMPTS: u32 = 8;

impl Controller {
    /// One rollout.
    pub fn get_rollout(&self, name: &str) -> Result<RolloutObject, Error> {
        // From the cache, which shows a rollout only together with the assignments it made.
        match self.cache().rollouts.get(name) {
            Some(Ok(rollout)) => Ok(RolloutObject::clone(rollout)),
            Some(Err(e)) => Err(Error::Store(e.clone())),
            None => Err(Error::NotFound {
                kind: "Rollout",
                name: name.to_string(),
            }),
        }
    }

    /// Every rollout, by name.
    pub fn list_rollouts(&self) -> Result<Vec<RolloutObject>, Error> {
        self.rollouts_after(None, usize::MAX)
    }

    /// Up to `limit` rollouts named after `after`, by name: a page of the list. One that
    /// does not decode is left out (reading it by name says why).
    pub fn rollouts_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RolloutObject>, Error> {
        let cache = self.cache();
        let readable = |(_, r): (&String, &Result<Arc<RolloutObject>, StoreError>)| {
            r.as_ref().ok().map(|r| RolloutObject::clone(r))
        };
        Ok(match after {
            Some(after) => cache
                .rollouts
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .filter_map(readable)
                .take(limit)
                .collect(),
            None => cache
                .rollouts
                .iter()
                .filter_map(readable)
                .take(limit)
                .collect(),
        })
    }

    /// The rollout controller's view of every node for one DesiredState.
    pub fn node_views(
        &self,
        desired_state: &str,
        now: SystemTime,
    ) -> Result<Vec<crate::rollout::NodeView>, Error> {
        let cache = self.cache();
        // DesiredStates that pin a component this one pins: a node both select is in conflict.
        let rivals: Vec<(Arc<DesiredStateObject>, Vec<String>)> =
            match cache.states.get(desired_state) {
                None => vec![],
                Some(own) => cache
                    .states
                    .values()
                    .filter(|other| other.metadata.name != desired_state)
                    .filter_map(|other| {
                        let shared: Vec<String> = own
                            .spec
                            .components
                            .iter()
                            .filter(|c| other.spec.components.iter().any(|o| o.name == c.name))
                            .map(|c| c.name.clone())
                            .collect();
                        (!shared.is_empty()).then(|| (other.clone(), shared))
                    })
                    .collect(),
            };
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let nodes: Vec<(String, Arc<NodeFacts>)> = live
            .nodes
            .iter()
            .map(|(name, facts)| (name.clone(), facts.clone()))
            .collect();
        let heard: HashMap<String, SystemTime> = live.heartbeats.clone();
        drop(live);
        let mut views: Vec<crate::rollout::NodeView> = nodes
            .into_iter()
            .map(|(name, node)| {
                let labels = node.labels();
                let conflicts: Vec<String> = rivals
                    .iter()
                    .filter(|(other, _)| other.spec.selector.matches(labels))
                    .flat_map(|(other, shared)| {
                        shared.iter().map(move |c| {
                            format!(
                                "{c} is pinned by {desired_state} and {}",
                                other.metadata.name
                            )
                        })
                    })
                    .collect();
                // Heard, stored or not: a heartbeat kept in memory says the same as the
                // stored report (only host figures differ), so it is fresh evidence too.
                let last_report = match (node.last_heartbeat, heard.get(&name)) {
                    (Some(stored), Some(&heard)) => Some(stored.max(heard)),
                    (stored, heard) => stored.or(heard.copied()),
                };
                crate::rollout::NodeView {
                    // A node that registered and never reported is not available: a wave
                    // goes on without it (within maxUnavailable) or waits for it.
                    ready: last_report.is_some_and(|t| self.fresh(t, now)),
                    cordoned: node.inputs.cordoned.is_some(),
                    last_report,
                    healthy_received: node
                        .healthy_received
                        .get(desired_state)
                        .map(|h| (h.revision, h.at)),
                    labels: labels.clone(),
                    applied: node
                        .applied
                        .iter()
                        .find(|a| a.desired_state == desired_state)
                        .cloned(),
                    failure: node.failures.get(desired_state).cloned(),
                    conflict: (!conflicts.is_empty()).then(|| conflicts.join("; ")),
                    name,
                }
            })
            .collect();
        // By name, as the store lists them: waves are planned in a stable order.
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(views)
    }

    /// One tick of the rollout controller over every DesiredState. One DesiredState's
    /// failure (an error, or a panic in its decision) is that DesiredState's problem: it is
    /// logged, raises a Warning event on it, and is retried with backoff, while every other
    /// DesiredState keeps rolling (kube-rs's `error_policy`).
    pub async fn reconcile_rollouts(&self, now: SystemTime) -> Result<(), Error> {
        // Only the leader decides; its decisions carry its epoch, so a deposed leader's
        // last decision is refused by the store.
        let Some(epoch) = self.leader_epoch() else {
            return Ok(());
        };
        let states: Vec<Arc<DesiredStateObject>> = self.cache().states.values().cloned().collect();
        for state in states {
            let name = state.metadata.name.clone();
            let due = {
                let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                live.rollout_backoff
                    .get(&name)
                    .is_none_or(|b| now >= b.retry_at)
            };
            if !due {
                continue;
            }
            let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                self.reconcile_one(&state, now, epoch),
            ))
            .await;
            let error = match outcome {
                Ok(Ok(())) => {
                    let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                    if live.rollout_backoff.remove(&name).is_some() {
                        tracing::info!(desired_state = %name, "rollout decisions work again");
                    }
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(panic) => format!(
                    "the rollout decision panicked: {}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)")
                ),
            };
            let (failures, delay) = {
                let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                let backoff = live.rollout_backoff.entry(name.clone()).or_default();
                backoff.failures = backoff.failures.saturating_add(1);
                // 1 s, 2 s, 4 s … up to 5 minutes.
                let delay = Duration::from_secs(1u64 << (backoff.failures - 1).min(9))
                    .min(Duration::from_secs(300));
                backoff.retry_at = now + delay;
                (backoff.failures, delay)
            };
            tracing::error!(desired_state = %name, failures, error = %error, retry_in = ?delay, "rollout decision failed");
            // One event per failure streak, not one per retry.
            if failures == 1 {
                let _ = self
                    .record_event(
                        now,
                        EventType::Warning,
                        "RolloutError",
                        &format!("rollout/{name}"),
                        format!(
                            "{error}; retried with backoff, other DesiredStates are not affected"
                        ),
                        None,
                        Some(name.clone()),
                        Some(state.status.revision),
                    )
                    .await;
            }
        }
        Ok(())
    }

    pub(super) async fn reconcile_one(
        &self,
        state: &DesiredStateObject,
        now: SystemTime,
        epoch: u64,
    ) -> Result<(), Error> {
        let name = &state.metadata.name;
        let current = match self.get_rollout(name) {
            Ok(rollout) => Some(rollout),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        // Only a pending revision or a rollout in flight has anything to decide (exactly when
        // `step` can return an update); skip reading every node otherwise.
        let revision = state.status.revision;
        let untracked = revision > state.status.last_good_revision
            && current.as_ref().is_none_or(|r| r.spec.revision != revision);
        let in_flight = current.as_ref().is_some_and(|r| {
            matches!(
                r.status.phase,
                RolloutPhase::Pending | RolloutPhase::Progressing
            ) && r.spec.revision == revision
        });
        if !untracked && !in_flight {
            return Ok(());
        }
        let started = std::time::Instant::now();
        // Every node of the fleet is read and judged: not on an async worker, where it would
        // hold up every request behind it (a multi-threaded runtime moves them elsewhere).
        let nodes = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.node_views(name, now))?
            }
            _ => self.node_views(name, now)?,
        };
        // After a restart, nodes get a heartbeat's grace to be heard before deadlines count:
        // an outage of the apiserver is not the nodes' silence.
        // Likewise after a takeover: nodes that talked to the old leader need a moment to
        // find this one.
        let judge_from = self.leading_since() + self.config.ready_grace;
        let decision =
            crate::rollout::decide(state, current.as_ref(), &nodes, now, Some(judge_from));
        let decided = started.elapsed();
        if let Some(update) = decision {
            let assigned = update.assign.len();
            self.write_rollout(
                name,
                current
                    .as_ref()
                    .map(|r| r.metadata.resource_version.clone()),
                update,
                now,
                Some(epoch),
            )
            .await?;
            // An apply reaches nodes only after this: a slow one is worth a line.
            if started.elapsed() > SLOW_DECISION {
                tracing::warn!(
                    desired_state = %name,
                    nodes = nodes.len(),
                    assigned,
                    decide_ms = decided.as_millis() as u64,
                    total_ms = started.elapsed().as_millis() as u64,
                    "slow rollout decision"
                );
            }
        }
        Ok(())
    }

    /// Stores a rollout decision in one transaction: the rollout, assignments, last good revision, events.
    pub(super) async fn write_rollout(
        &self,
        name: &str,
        expected: Option<String>,
        update: crate::rollout::Update,
        now: SystemTime,
        fence: Option<u64>,
    ) -> Result<bool, Error> {
        let existing_assignments = self.assignment_keys(name);
        let base_rollout = update.rollout.clone();
        // Rolled back: a cordoned node pinned to the aborted revision (or to any revision
        // that never became good) goes back to the last good one like every other node.
        let rolled_back = update.clear_assignments
            && update.last_good.is_none()
            && base_rollout.status.phase == RolloutPhase::RolledBack;
        let pinned: Vec<String> = if rolled_back {
            let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            live.nodes
                .iter()
                .filter(|(_, n)| {
                    n.inputs.cordoned.as_ref().is_some_and(|c| {
                        c.revisions
                            .get(name)
                            .is_some_and(|r| *r > base_rollout.spec.from_revision)
                    })
                })
                .map(|(name, _)| name.clone())
                .collect()
        } else {
            vec![]
        };
        let events = self
            .transact(|txn| -> Result<_, Error> {
                if let Some(epoch) = fence {
                    self.fence(txn, epoch)?;
                }
                let version = txn.revision().to_string();
                let seqs: Vec<u64> = update.events.iter().map(|_| txn.next_id()).collect();
                let mut rollout = base_rollout.clone();
                rollout.metadata.resource_version = version.clone();
                // Another writer (pause, undo) got there first: decide again next tick.
                let stored: Option<RolloutObject> = ROLLOUTS.get(txn, name.as_bytes())?;
                if stored.map(|r| r.metadata.resource_version) != expected {
                    return Err(Error::Conflict {
                        message: "rollout changed meanwhile".into(),
                        hint: String::new(),
                    });
                }
                // Deleted since the tick read it: a rollout must not outlive its DesiredState.
                // Applied since: the decision was about an older revision.
                let state: Option<DesiredStateObject> = DESIRED_STATES.get(txn, name.as_bytes())?;
                if state.is_none_or(|s| s.status.revision != rollout.spec.revision) {
                    return Err(Error::Conflict {
                        message: "DesiredState deleted or applied meanwhile".into(),
                        hint: String::new(),
                    });
                }
                ROLLOUTS.put(txn, name.as_bytes(), &rollout)?;
                for node_name in &pinned {
                    if let Some(mut node) = NODES.get(txn, node_name.as_bytes())? {
                        if let Some(cordon) = &mut node.object.status.cordoned {
                            match rollout.spec.from_revision {
                                0 => cordon.revisions.remove(name),
                                good => cordon.revisions.insert(name.to_string(), good),
                            };
                        }
                        node.object.metadata.resource_version = version.clone();
                        NODES.put(txn, node_name.as_bytes(), &node)?;
                    }
                }
                if update.clear_assignments {
                    for key in &existing_assignments {
                        ASSIGNMENTS.delete(txn, key)?;
                    }
                }
                for (node, revision) in &update.assign {
                    ASSIGNMENTS.put(txn, &store::assignment_key(node, name), revision)?;
                }
                if let Some(good) = update.last_good {
                    if let Some(mut state) = DESIRED_STATES.get(txn, name.as_bytes())? {
                        state.status.last_good_revision = good;
                        state.metadata.resource_version = version.clone();
                        DESIRED_STATES.put(txn, name.as_bytes(), &state)?;
                    }
                }
                let mut events = Vec::new();
                for ((kind, reason, message), seq) in update.events.iter().zip(&seqs) {
                    let event = self.new_event(
                        *seq,
                        now,
                        *kind,
                        reason,
                        &format!("rollout/{name}"),
                        message.clone(),
                        None,
                        Some(name.to_string()),
                        Some(rollout.spec.revision),
                    )?;
                    EVENTS.put(txn, &event.seq.to_be_bytes(), &event)?;
                    events.push(event);
                }
                Ok((events, rollout))
            })
            .await;
        let events = match events {
            Err(store::TxnError::Aborted(Error::Conflict { .. })) => return Ok(false),
            other => other?.0 .0,
        };
        self.after_events(&events).await?;
        Ok(true)
    }

    /// Pause or resume a rollout (operator verbs).
    pub async fn set_rollout_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<RolloutObject, Error> {
        // The rollout loop writes the same object (an apply cues it at once): when it wrote
        // between our read and our write, read again and decide again, a few times, before
        // giving up. The phase check is made afresh each time.
        for attempt in 0..PAUSE_ATTEMPTS {
            if let Some(rollout) = self.try_set_rollout_paused(name, paused).await? {
                return Ok(rollout);
            }
            // The read comes from the cache, which follows the store's change feed: read at
            // once again, it can still show the version the loop just replaced (CI saw five
            // immediate attempts all conflict on a loaded machine). Give it time to catch up.
            tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
        }
        Err(Error::Conflict {
            message: format!("rollout `{name}` changed while pausing or resuming it"),
            hint: "look at `shoal rollout status NAME` and try again".into(),
        })
    }

    /// One read-decide-write of `set_rollout_paused`; `None` when the rollout changed between
    /// the read and the write.
    async fn try_set_rollout_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<Option<RolloutObject>, Error> {
        let current = self.get_rollout(name)?;
        // A rollout is paused before its first wave as well as during one (`apply` then
        // `rollout pause` at once); resumed, an unplanned one is planned on the next tick.
        let (from, to): (&[RolloutPhase], RolloutPhase) = if paused {
            (
                &[RolloutPhase::Pending, RolloutPhase::Progressing],
                RolloutPhase::Paused,
            )
        } else {
            (&[RolloutPhase::Paused], RolloutPhase::Progressing)
        };
        if !from.contains(&current.status.phase) {
            return Err(Error::Conflict {
                message: format!(
                    "rollout `{name}` of revision {} is {}, not {}",
                    current.spec.revision,
                    current.status.phase.as_str(),
                    from.iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
                hint: "see `shoal rollout status NAME`".into(),
            });
        }
        let mut next = current.clone();
        next.status.phase = to;
        if !paused && next.status.wave_started.is_some() {
            // A pause must not eat the wave's deadline.
            next.status.wave_started = Some(SystemTime::now());
        }
        let reason = if paused {
            "RolloutPaused"
        } else {
            "RolloutResumed"
        };
        let update = crate::rollout::Update {
            rollout: next,
            assign: vec![],
            clear_assignments: false,
            last_good: None,
            events: vec![(
                EventType::Normal,
                reason.into(),
                format!("revision {}", current.spec.revision),
            )],
        };
        let written = self
            .write_rollout(
                name,
                Some(current.metadata.resource_version.clone()),
                update,
                SystemTime::now(),
                None,
            )
            .await?;
        if !written {
            return Ok(None);
        }
        self.get_rollout(name).map(Some)
    }

    /// Rolls back by applying an earlier revision's spec as a new revision (`undo`).
    pub async fn undo(
        &self,
        name: &str,
        to_revision: Option<u64>,
        actor: &str,
    ) -> Result<ApplyResponse, Error> {
        let state = self.get_desired_state(name)?;
        let target = match to_revision {
            Some(r) => r,
            None if state.status.last_good_revision > 0
                && state.status.last_good_revision < state.status.revision =>
            {
                state.status.last_good_revision
            }
            None => state.status.revision.saturating_sub(1),
        };
        let revision = self.stored_revision(name, target)?.ok_or_else(|| {
            Error::invalid_field(
                "toRevision",
                format!("DesiredState `{name}` has no revision {target}"),
                "list them with `shoal rollout history NAME`",
            )
        })?;
        let manifest = DesiredState {
            api_version: API_VERSION.into(),
            kind: KIND_DESIRED_STATE.into(),
            metadata: manifests::ObjectMeta {
                name: name.to_string(),
                labels: state.metadata.labels.clone(),
                annotations: state.metadata.annotations.clone(),
                resource_version: None,
            },
            spec: revision.spec,
        };
        let source = RevisionSource {
            kind: "undo".into(),
            actor: Some(actor.to_string()),
            subject: Some(format!("undo to revision {target}")),
            ..RevisionSource::default()
        };
        self.apply(
            vec![ApplyInput {
                object: manifest,
                source,
            }],
            false,
        )
        .await
    }
}
