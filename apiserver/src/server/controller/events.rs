//! Events: recorded with sequence numbers issued inside the commit, bounded by retention
//! with a per-node share, read after a sequence number.

use super::*;

/// Events one node report may carry; the rest are dropped (and that is recorded). A nodelet
/// sends at most 100 per report.
pub const MAX_EVENTS_PER_REPORT: usize = 200;

/// The fewest events any node may keep, however many nodes share the retention.
pub(super) const MIN_NODE_EVENT_SHARE: usize = 20;

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new_event(
        &self,
        seq: u64,
        time: SystemTime,
        kind: EventType,
        reason: &str,
        object: &str,
        message: String,
        node: Option<String>,
        desired_state: Option<String>,
        revision: Option<u64>,
    ) -> Result<Event, StoreError> {
        Ok(Event {
            seq,
            time,
            kind,
            reason: reason.to_string(),
            object: object.to_string(),
            message,
            node,
            desired_state,
            revision,
        })
    }

    /// Writes a Normal event about node `node` inside a transaction.
    pub(super) fn put_node_event(
        &self,
        txn: &mut dyn Txn,
        seq: u64,
        now: SystemTime,
        reason: &str,
        node: &str,
        message: String,
    ) -> Result<Event, StoreError> {
        let event = self.new_event(
            seq,
            now,
            EventType::Normal,
            reason,
            &format!("node/{node}"),
            message,
            Some(node.to_string()),
            None,
            None,
        )?;
        EVENTS.put(txn, &event.seq.to_be_bytes(), &event)?;
        Ok(event)
    }

    /// Records one event on its own.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_event(
        &self,
        time: SystemTime,
        kind: EventType,
        reason: &str,
        object: &str,
        message: String,
        node: Option<String>,
        desired_state: Option<String>,
        revision: Option<u64>,
    ) -> Result<Event, Error> {
        let (event, _) = self
            .transact(|txn| {
                let event = self.new_event(
                    txn.next_id(),
                    time,
                    kind,
                    reason,
                    object,
                    message.clone(),
                    node.clone(),
                    desired_state.clone(),
                    revision,
                )?;
                EVENTS.put(txn, &event.seq.to_be_bytes(), &event)?;
                Ok::<_, StoreError>(event)
            })
            .await?;
        self.after_events(std::slice::from_ref(&event)).await?;
        Ok(event)
    }

    pub(super) async fn after_events(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        // Each node's share of the retention: one node's flood evicts its own history only.
        let over_share: Vec<Vec<u8>> = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let nodes = live.node_events.len().max(live.heartbeats.len()).max(1);
            let share = (self.config.event_retention / nodes).max(MIN_NODE_EVENT_SHARE);
            let mut drop = Vec::new();
            // The feed handler queued these events already (the writer waited for it).
            for event in events {
                let Some(node) = &event.node else { continue };
                let queue = live.node_events.entry(node.clone()).or_default();
                while queue.len() > share {
                    if let Some(seq) = queue.pop_front() {
                        drop.push(seq.to_be_bytes().to_vec());
                    }
                }
            }
            drop
        };
        if !over_share.is_empty() {
            self.store.remove_keys(Table::Events, &over_share).await?;
        }
        let count = self.store.len(Table::Events);
        if count > self.config.event_retention {
            let excess = count - self.config.event_retention;
            let oldest = self.store.scan_from(Table::Events, b"", excess);
            {
                let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                for (key, value) in &oldest {
                    if let Ok(Event {
                        node: Some(node),
                        seq,
                        ..
                    }) = EVENTS.decode(key, value)
                    {
                        if let Some(queue) = live.node_events.get_mut(&node) {
                            queue.retain(|s| *s != seq);
                        }
                    }
                }
            }
            let keys: Vec<Vec<u8>> = oldest.into_iter().map(|(k, _)| k).collect();
            self.store.remove_keys(Table::Events, &keys).await?;
        }
        Ok(())
    }

    /// Events after sequence number `after`, oldest first, at most `limit`, optionally about one object.
    pub fn events(
        &self,
        after: u64,
        limit: usize,
        about: Option<&str>,
    ) -> Result<Vec<Event>, Error> {
        let start = (after.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        // Filtering happens after the scan, so read in pages until enough match.
        let mut cursor = start.to_vec();
        loop {
            let page = self.store.scan_from(Table::Events, &cursor, 1000);
            let done = page.len() < 1000;
            for (key, value) in &page {
                let event: Event = EVENTS.decode(key, value)?;
                let relevant = match about {
                    None => true,
                    Some(about) => {
                        event.object == about
                            || event
                                .node
                                .as_deref()
                                .is_some_and(|n| about == format!("node/{n}"))
                            || event.desired_state.as_deref().is_some_and(|d| {
                                about == format!("desiredstate/{d}")
                                    || about == format!("rollout/{d}")
                            })
                    }
                };
                if relevant {
                    out.push(event);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            match page.last() {
                Some((key, _)) if !done => {
                    let next = u64::from_be_bytes(key.as_slice().try_into().unwrap_or([0xff; 8]))
                        .saturating_add(1);
                    cursor = next.to_be_bytes().to_vec();
                }
                _ => return Ok(out),
            }
        }
    }
}
