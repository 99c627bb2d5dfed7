//! Everything derived from the store, kept current from its change feed: the cache of
//! DesiredStates, revisions in use, assignments and rollouts; heartbeats and node shapes;
//! long polls and watchers. The only place derived state changes.

use super::*;

/// Applies the store's change feed to a controller until either is dropped.
pub(super) async fn follow_feed(
    controller: std::sync::Weak<Controller>,
    mut feed: broadcast::Receiver<Feed>,
) {
    loop {
        let item = feed.recv().await;
        let Some(controller) = controller.upgrade() else {
            return;
        };
        match item {
            Ok(Feed::Batch(applied)) => {
                // One batch's trouble (a panic deriving state from it) must not stop the feed.
                let started = std::time::Instant::now();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    controller.on_batch(&applied)
                }));
                let took = started.elapsed();
                if took > Duration::from_millis(100) {
                    // Every writer waiting to read its own write waited this long.
                    tracing::warn!(
                        revision = applied.revision,
                        changes = applied.changes.len(),
                        took_ms = took.as_millis() as u64,
                        "slow change feed batch"
                    );
                }
                if outcome.is_err() {
                    tracing::error!(
                        revision = applied.revision,
                        "deriving state from a batch panicked"
                    );
                    controller.resync();
                }
            }
            Ok(Feed::Reset(_)) | Err(broadcast::error::RecvError::Lagged(_)) => controller.resync(),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// What a DesiredState change means for the rollout loop and the long polls.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct DesiredStateChange {
    /// It brings a revision to roll out, or removes one: the rollout loop acts at once. Its
    /// own writes (status) wait for its next tick, so a rollout still steps once a second.
    pub(super) new_revision: bool,
    /// Its selector, spec, newest or last good revision changed (or it came or went): an
    /// assignment may have changed. Other status (what the rollout writes as it waits)
    /// wakes no long poll: at 10,000 nodes each wake costs every long poll a round.
    pub(super) assignments: bool,
}

pub(super) fn desired_state_change(change: &store::Changed) -> DesiredStateChange {
    let decode = |bytes: &Option<Arc<[u8]>>| {
        bytes
            .as_ref()
            .and_then(|b| DESIRED_STATES.decode(&change.key, b).ok())
    };
    let (before, after) = (decode(&change.previous), decode(&change.value));
    let revision = |d: &Option<DesiredStateObject>| d.as_ref().map(|d| d.status.revision);
    let shape = |d: &Option<DesiredStateObject>| {
        d.as_ref().map(|d| {
            (
                serde_json::to_value(&d.spec).ok(),
                d.status.revision,
                d.status.last_good_revision,
            )
        })
    };
    DesiredStateChange {
        new_revision: revision(&before) != revision(&after),
        // Undecodable either side: wake, as before.
        assignments: before.is_none() != change.previous.is_none()
            || after.is_none() != change.value.is_none()
            || shape(&before) != shape(&after),
    }
}

impl Controller {
    /// Applies one committed batch to everything derived from the store, and tells
    /// watchers and long polls. The only place derived state changes, for this replica's
    /// commits and every other replica's alike.
    pub(super) fn on_batch(&self, applied: &Applied) {
        let now = SystemTime::now();
        let watching = self.changes.receiver_count() > 0;
        let mut refresh = false;
        let mut wake = false;
        for change in &applied.changes {
            match change.table {
                Table::DesiredStates => {
                    refresh = true;
                    let what = desired_state_change(change);
                    wake |= what.assignments;
                    if what.new_revision {
                        self.desired_states_changed.send_modify(|n| *n += 1);
                    }
                }
                Table::Assignments => {
                    refresh = true;
                    wake = true;
                }
                // A rollout's own record changes no assignment (the assignments it makes
                // are their own table); a revision matters once a DesiredState names it.
                Table::Rollouts | Table::Revisions => refresh = true,
                Table::Nodes | Table::Events | Table::Leases => {}
            }
        }
        let before = self.cache();
        if refresh && before.revision < applied.last {
            if let Err(error) = self.refresh() {
                tracing::error!(%error, "cannot rebuild the cache from the store");
            }
        }
        for change in &applied.changes {
            let name = String::from_utf8_lossy(&change.key).into_owned();
            match change.table {
                Table::DesiredStates if watching => {
                    let (kind, bytes) = match (&change.value, &change.previous) {
                        (Some(value), None) => (ChangeType::Added, value),
                        (Some(value), Some(_)) => (ChangeType::Modified, value),
                        (None, Some(previous)) => (ChangeType::Deleted, previous),
                        (None, None) => continue,
                    };
                    if let Ok(object) = DESIRED_STATES.decode(&change.key, bytes) {
                        let object = match kind {
                            ChangeType::Deleted => object,
                            _ => with_selected(&object, &self.node_facts()),
                        };
                        self.publish(Kind::DesiredState, kind, &name, &object);
                    }
                }
                Table::Rollouts if watching => {
                    if let Some(Ok(rollout)) = change
                        .value
                        .as_ref()
                        .map(|v| ROLLOUTS.decode(&change.key, v))
                    {
                        self.publish(Kind::Rollout, ChangeType::Modified, &name, &rollout);
                    }
                }
                Table::Nodes => {
                    self.on_node_change(&name, change, now, watching);
                }
                Table::Events => {
                    let Some(Ok(event)) =
                        change.value.as_ref().map(|v| EVENTS.decode(&change.key, v))
                    else {
                        continue;
                    };
                    if let Some(node) = &event.node {
                        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                        let queue = live.node_events.entry(node.clone()).or_default();
                        // Sequence numbers arrive in order: the newest goes last.
                        if queue.back().is_none_or(|last| *last < event.seq) {
                            queue.push_back(event.seq);
                        }
                    }
                    if watching {
                        self.publish(
                            Kind::Event,
                            ChangeType::Added,
                            &event.seq.to_string(),
                            &event,
                        );
                    }
                }
                _ => {}
            }
        }
        if wake {
            self.wake_moved_assignments();
        }
        self.processed.send_replace(applied.last);
    }

    /// A node record written or removed: heartbeats, readiness, watchers and, when its
    /// labels or cordon changed (or it came or went), its long polls follow.
    pub(super) fn on_node_change(
        &self,
        name: &str,
        change: &store::Changed,
        now: SystemTime,
        watching: bool,
    ) {
        match &change.value {
            Some(bytes) => {
                let Ok(stored) = NODES.decode(&change.key, bytes) else {
                    return;
                };
                let facts = NodeFacts::of(&stored);
                let inputs = facts.inputs.clone();
                let reshaped = {
                    let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(at) = stored.object.status.last_heartbeat {
                        // Never backwards: a heartbeat kept in memory may be newer, or be
                        // this one (heard when it was queued, with more than the
                        // milliseconds stored).
                        let known = live.heartbeats.get(name).copied();
                        let heard = known.is_none_or(|known| nodes::whole_millis(known) < at);
                        if heard {
                            live.heartbeats.insert(name.to_string(), at);
                        }
                        // Host history follows the feed, so every replica keeps the same one
                        // whichever replica the node reports to.
                        if let (true, Some(host)) = (heard, &stored.object.status.report.host) {
                            live.add_host_sample(name, at, host.clone(), self.config.host_history);
                        }
                    }
                    // Only a change of labels or cordon: a heartbeat does not wake long polls.
                    let reshaped = live
                        .nodes
                        .get(name)
                        .is_none_or(|known| known.inputs != facts.inputs);
                    live.nodes.insert(name.to_string(), Arc::new(facts));
                    reshaped
                };
                if watching {
                    if let Ok(object) = self.decorate(stored.object, now) {
                        let kind = if change.previous.is_none() {
                            ChangeType::Added
                        } else {
                            ChangeType::Modified
                        };
                        self.publish(Kind::Node, kind, name, &object);
                    }
                }
                if reshaped {
                    self.wake_reshaped_node(name, &inputs);
                }
            }
            None => {
                {
                    let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                    live.heartbeats.remove(name);
                    live.stored_reports.remove(name);
                    live.ready.remove(name);
                    live.host_history.remove(name);
                    live.nodes.remove(name);
                    // Its history stays (it is about what happened) and ages out with the rest.
                    live.node_events.remove(name);
                }
                if watching {
                    if let Some(Ok(stored)) = change
                        .previous
                        .as_ref()
                        .map(|v| NODES.decode(&change.key, v))
                    {
                        self.publish(Kind::Node, ChangeType::Deleted, name, &stored.object);
                    }
                }
                self.generations
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(name);
                self.wake_nodes(std::iter::once(name));
            }
        }
    }

    /// Rebuilds everything derived from the store after the feed could not be followed
    /// (this replica fell too far behind).
    pub(super) fn resync(&self) {
        tracing::warn!("rebuilding derived state from the store after missing changes");
        if let Err(error) = self.refresh() {
            tracing::error!(%error, "cannot rebuild the cache from the store");
        }
        if let Ok(nodes) = self.list_nodes_raw() {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            for node in nodes {
                let name = node.object.metadata.name.clone();
                live.nodes
                    .insert(name.clone(), Arc::new(NodeFacts::of(&node)));
                if let Some(at) = node.object.status.last_heartbeat {
                    live.heartbeats.insert(name, at);
                }
            }
        }
        // What this replica missed may have moved any assignment, and what it last told
        // each node is not to be trusted: every long poll looks again.
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.wake_moved_assignments();
        self.processed.send_replace(self.store.revision());
        let _ = self.changes.send(Change {
            kind: Kind::DesiredState,
            change: ChangeType::Resync,
            name: String::new(),
            object: Arc::new(serde_json::Value::Null),
        });
    }

    /// Reloads the cache of DesiredStates, revisions in use and assignments from the store.
    pub fn refresh(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self
            .refreshing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut cache = Cache {
            revision: self.store.revision(),
            ..Cache::default()
        };
        for (key, object) in ROLLOUTS.read_prefix(&self.store, b"") {
            let name = String::from_utf8_lossy(&key).into_owned();
            cache.rollouts.insert(name, object.map(Arc::new));
        }
        for (_, object) in DESIRED_STATES.read_prefix(&self.store, b"") {
            let object = object?;
            cache
                .states
                .insert(object.metadata.name.clone(), Arc::new(object));
        }
        for (key, revision) in ASSIGNMENTS.read_prefix(&self.store, b"") {
            let Some(split) = key.iter().position(|b| *b == 0) else {
                continue;
            };
            let node = String::from_utf8_lossy(&key[..split]).into_owned();
            let state = String::from_utf8_lossy(&key[split + 1..]).into_owned();
            let revision = revision?;
            cache
                .assignments
                .entry(node)
                .or_default()
                .insert(state, revision);
        }
        let mut wanted: Vec<(String, u64)> = Vec::new();
        for state in cache.states.values() {
            wanted.push((state.metadata.name.clone(), state.status.revision));
            wanted.push((state.metadata.name.clone(), state.status.last_good_revision));
        }
        for per_node in cache.assignments.values() {
            wanted.extend(per_node.iter().map(|(s, r)| (s.clone(), *r)));
        }
        let old = self
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (state, revision) in wanted {
            if revision == 0 || cache.revisions.contains_key(&(state.clone(), revision)) {
                continue;
            }
            let revision_object = match old.revisions.get(&(state.clone(), revision)) {
                Some(cached) => Some(cached.clone()),
                None => self.stored_revision(&state, revision)?.map(Arc::new),
            };
            if let Some(revision_object) = revision_object {
                cache.revisions.insert((state, revision), revision_object);
            }
        }
        let mut current = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        // A refresh that read an older view than the one shown must not replace it.
        if current.revision <= cache.revision {
            *current = Arc::new(cache);
        }
        Ok(())
    }
}
