//! Nodes and their tokens: registration, reports (heartbeats), readiness, cordon and
//! delete, and the conditions derived from a node's report and assignment.

use super::*;

/// A node as stored: the object and the hash of its token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StoredNode {
    pub(super) token_sha256: String,
    /// The join token it registered with.
    pub(super) joined_with: String,
    pub(super) object: NodeObject,
}

/// What the feed keeps of each node: enough that authenticating a node's request, its long
/// poll, the rollout loop and the node counts of DesiredStates decode no node record (at
/// 10,000 nodes, decoding every record took the rollout loop ~0.2 s a tick).
pub(super) struct NodeFacts {
    pub(super) token_sha256: String,
    /// Labels and cordon: what its assignment depends on.
    pub(super) inputs: Arc<assignments::AssignmentInputs>,
    pub(super) last_heartbeat: Option<SystemTime>,
    /// What it reports per DesiredState.
    pub(super) applied: Vec<AppliedState>,
    pub(super) healthy_received: BTreeMap<String, HealthyReceived>,
    /// Per DesiredState, why its components failed (only those that did).
    pub(super) failures: BTreeMap<String, String>,
}

impl NodeFacts {
    pub(super) fn of(stored: &StoredNode) -> Self {
        let node = &stored.object;
        let report = &node.status.report;
        let mut failing: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for component in report
            .components
            .iter()
            .filter(|c| matches!(c.phase, ComponentPhase::Reverted | ComponentPhase::Failed))
        {
            failing
                .entry(component.desired_state.clone())
                .or_default()
                .push(failure_text(component));
        }
        NodeFacts {
            token_sha256: stored.token_sha256.clone(),
            inputs: Arc::new(assignments::AssignmentInputs::of(node)),
            last_heartbeat: node.status.last_heartbeat,
            applied: report.applied.clone(),
            healthy_received: node.status.healthy_received.clone(),
            failures: failing
                .into_iter()
                .map(|(state, texts)| (state, texts.join("; ")))
                .collect(),
        }
    }

    pub(super) fn labels(&self) -> &BTreeMap<String, String> {
        &self.inputs.labels
    }
}

/// Why a component failed, as the rollout says it: its phase and message, the first line of
/// its probe's output, and its own last words (what an operator reads first).
fn failure_text(c: &ComponentStatus) -> String {
    let mut text = format!("{} {:?}", c.name, c.phase);
    if let Some(message) = &c.message {
        text.push_str(&format!(": {message}"));
    }
    if let Some(output) = &c.probe_output {
        text.push_str(&format!(
            " (probe: {})",
            output.lines().next().unwrap_or("")
        ));
    }
    let tail: Vec<&str> = c
        .log_tail
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if !tail.is_empty() {
        let log: String = tail.join(" / ").chars().take(300).collect();
        text.push_str(&format!(" (log: {log})"));
    }
    text
}

/// A node's stored record inside a transaction, or 404.
pub(super) fn node_in(txn: &dyn Txn, name: &str) -> Result<StoredNode, Error> {
    NODES
        .get(txn, name.as_bytes())?
        .ok_or_else(|| Error::NotFound {
            kind: "Node",
            name: name.to_string(),
        })
}

/// When the server first received Healthy for each DesiredState the report says is Healthy:
/// kept while the node reports the same healthy spell (revision and its own `healthySince`),
/// restarted with a new one, dropped when it is not Healthy. The server's clock only.
/// Heartbeats committed in one transaction at most.
const MAX_REPORTS_PER_COMMIT: usize = 256;

/// A heartbeat waiting for its commit (see `Controller::report`).
pub(super) struct QueuedReport {
    name: String,
    /// The report, without its events.
    report: NodeReport,
    node_events: Vec<NodeEvent>,
    /// When the server received it.
    now: SystemTime,
    /// See `report_digest`.
    digest: u64,
    /// The request waiting for the commit; `None` for a report that was answered when it
    /// was queued (it carried no events, so the node forgets nothing on the answer).
    done: Option<tokio::sync::oneshot::Sender<Result<(), Error>>>,
}

/// Heartbeats waiting for their group commit, in arrival order. A node has at most one
/// report answered early in the queue: a newer one takes its place, so the queue is bounded
/// by the fleet however fast nodes (or a flood of one node) report.
#[derive(Default)]
pub(super) struct ReportQueue {
    entries: VecDeque<QueuedReport>,
    /// Sequence number of `entries[0]`.
    head: u64,
    /// Per node, the sequence number of its report answered early, while still queued.
    early: HashMap<String, u64>,
    /// Per node, how many of its reports are queued or being stored.
    per_node: HashMap<String, usize>,
}

impl ReportQueue {
    /// Queues `queued`; a report answered early replaces the node's earlier one of that
    /// kind still in the queue unless a waiting report of the node queued after it (only
    /// the newest state of a node matters, and reports are stored in the order sent).
    fn push(&mut self, queued: QueuedReport) {
        if queued.done.is_some() {
            // Stored after the node's earlier reports, and before any later one: a later
            // report answered early queues behind it instead of taking an earlier place.
            self.early.remove(&queued.name);
        } else {
            if let Some(&seq) = self.early.get(&queued.name) {
                let at = (seq - self.head) as usize;
                self.entries[at] = queued;
                return;
            }
            let seq = self.head + self.entries.len() as u64;
            self.early.insert(queued.name.clone(), seq);
        }
        *self.per_node.entry(queued.name.clone()).or_default() += 1;
        self.entries.push_back(queued);
    }

    /// Whether a report of `name` is queued or being stored.
    fn holds(&self, name: &str) -> bool {
        self.per_node.contains_key(name)
    }

    /// Takes up to `most` of the oldest reports.
    fn take(&mut self, most: usize) -> Vec<QueuedReport> {
        let take = self.entries.len().min(most);
        let batch: Vec<QueuedReport> = self.entries.drain(..take).collect();
        for (i, queued) in batch.iter().enumerate() {
            if queued.done.is_none()
                && self.early.get(&queued.name) == Some(&(self.head + i as u64))
            {
                self.early.remove(&queued.name);
            }
        }
        self.head += take as u64;
        batch
    }

    /// Reports of `names` taken earlier are stored (or failed): they are no longer in
    /// flight.
    fn finished<'a>(&mut self, names: impl Iterator<Item = &'a str>) {
        for name in names {
            if let Some(count) = self.per_node.get_mut(name) {
                *count -= 1;
                if *count == 0 {
                    self.per_node.remove(name);
                }
            }
        }
    }
}

/// `time` without what RFC 3339 with milliseconds drops.
pub(super) fn whole_millis(time: SystemTime) -> SystemTime {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => {
            SystemTime::UNIX_EPOCH
                + Duration::from_millis(since.as_millis().min(u64::MAX as u128) as u64)
        }
        Err(_) => time,
    }
}

/// A digest of what a report says apart from host metrics and events: two reports with the
/// same digest differ only in figures that are kept in memory between stored reports.
pub(super) fn report_digest(report: &NodeReport) -> u64 {
    use std::hash::{Hash, Hasher};
    let lasting = (
        &report.nodelet_version,
        report.observed_generation,
        &report.applied,
        &report.components,
        &report.probes,
        &report.disk_pressure,
    );
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // Serialising cannot fail for these types; an empty text still hashes consistently.
    serde_json::to_vec(&lasting)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// Whether a report must be stored: it carries events, it says something the stored one
/// does not, the stored heartbeat is `interval` old, or other replicas read heartbeats
/// from the store. `stored` is the digest and arrival of the report this process stored last.
pub(super) fn must_store(
    digest: u64,
    has_events: bool,
    shared: bool,
    stored: Option<(u64, SystemTime)>,
    now: SystemTime,
    interval: Duration,
) -> bool {
    if has_events || shared {
        return true;
    }
    match stored {
        None => true,
        Some((known, at)) => {
            // A clock that went back stores at once rather than after the jump.
            known != digest || now.duration_since(at).map_or(true, |age| age >= interval)
        }
    }
}

pub(super) fn healthy_received(
    before: &BTreeMap<String, HealthyReceived>,
    report: &NodeReport,
    now: SystemTime,
) -> BTreeMap<String, HealthyReceived> {
    report
        .applied
        .iter()
        .filter(|a| a.phase == ComponentPhase::Healthy)
        .map(|a| {
            let kept = before
                .get(&a.desired_state)
                .filter(|h| h.revision == a.revision && same_millis(h.node_since, a.healthy_since))
                .copied();
            let mark = kept.unwrap_or(HealthyReceived {
                revision: a.revision,
                node_since: a.healthy_since,
                at: now,
            });
            (a.desired_state.clone(), mark)
        })
        .collect()
}

/// Equal at the wire's resolution (RFC 3339 with milliseconds): a time read back from the
/// store is compared with one that has not been through it yet.
pub(super) fn same_millis(a: Option<SystemTime>, b: Option<SystemTime>) -> bool {
    let millis = |t: Option<SystemTime>| {
        t.map(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        })
    };
    millis(a) == millis(b)
}

pub(super) fn format_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "(none)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn condition(kind: &str, holds: bool, reason: &str, message: String) -> Condition {
    Condition {
        kind: kind.to_string(),
        status: if holds {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.to_string(),
        message,
    }
}

/// The four node conditions, from the stored report, the current assignment and readiness.
pub fn conditions(node: &NodeObject, assignment: &NodeAssignment, ready: bool) -> Vec<Condition> {
    let report = &node.status.report;
    let mut out = Vec::new();
    if node.status.last_heartbeat.is_none() {
        let unknown = |kind: &str| Condition {
            kind: kind.to_string(),
            status: ConditionStatus::Unknown,
            reason: "NoHeartbeat".into(),
            message: "the node has not reported yet".into(),
        };
        out.push(unknown("Ready"));
        out.push(unknown("Converged"));
        out.push(unknown("Healthy"));
        out.push(unknown("DiskPressure"));
    } else {
        out.push(if ready {
            condition("Ready", true, "Heartbeat", String::new())
        } else {
            condition(
                "Ready",
                false,
                "HeartbeatMissed",
                "no recent heartbeat".into(),
            )
        });
        let behind: Vec<String> = assignment
            .states
            .iter()
            .filter(|want| {
                !report.applied.iter().any(|have| {
                    have.desired_state == want.name
                        && have.revision == want.revision
                        && have.phase == ComponentPhase::Healthy
                })
            })
            .map(|want| format!("{}@{}", want.name, want.revision))
            .collect();
        let converged = behind.is_empty() && report.observed_generation == assignment.generation;
        out.push(if converged {
            condition("Converged", true, "AtDesiredState", String::new())
        } else if behind.is_empty() {
            condition(
                "Converged",
                false,
                "Pending",
                "the node has not picked up its newest assignment".into(),
            )
        } else {
            condition(
                "Converged",
                false,
                "Progressing",
                format!("not yet healthy at {}", behind.join(", ")),
            )
        });
        let broken: Vec<String> = report
            .components
            .iter()
            .filter(|c| {
                matches!(
                    c.phase,
                    ComponentPhase::Reverted | ComponentPhase::Failed | ComponentPhase::Reverting
                )
            })
            .map(|c| format!("{} {:?}", c.name, c.phase))
            .chain(
                report
                    .probes
                    .iter()
                    .filter(|p| !p.passing)
                    .map(|p| format!("probe {} failing", p.name)),
            )
            .collect();
        out.push(if broken.is_empty() {
            condition("Healthy", true, "ProbesPassing", String::new())
        } else {
            condition("Healthy", false, "Unhealthy", broken.join("; "))
        });
        out.push(match &report.disk_pressure {
            Some(message) => condition("DiskPressure", true, "LowDiskSpace", message.clone()),
            None => condition("DiskPressure", false, "EnoughDiskSpace", String::new()),
        });
    }
    out.push(if assignment.conflicts.is_empty() {
        condition("Conflict", false, "NoConflict", String::new())
    } else {
        condition(
            "Conflict",
            true,
            "ComponentPinnedTwice",
            assignment
                .conflicts
                .iter()
                .map(|c| {
                    format!(
                        "{} is pinned by {}",
                        c.component,
                        c.desired_states.join(" and ")
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    });
    out
}

impl Controller {
    /// Registers (or re-registers) a node and issues a fresh node token.
    pub async fn register(
        &self,
        request: RegisterRequest,
        join_token: &str,
    ) -> Result<RegisterResponse, Error> {
        if !manifests::validate::is_dns_label(&request.name) {
            return Err(Error::invalid_field(
                "name",
                format!("`{}` is not a valid node name", request.name),
                "a node name is a DNS label: lowercase letters, digits and '-', at most 63 characters (nodelet --name)",
            ));
        }
        for (key, value) in &request.labels {
            if !manifests::validate::is_label_key(key)
                || !manifests::validate::is_label_value(value)
            {
                return Err(Error::invalid_field(
                    &format!("labels.{key}"),
                    format!("`{key}={value}` is not a valid label"),
                    "label keys are `name` or `prefix/name`, values at most 63 letters, digits, '-', '_' or '.'",
                ));
            }
        }
        let secret: [u8; 32] = rand::random();
        let token = format!("{}:{}", request.name, hex::encode(secret));
        let token_sha256 = sha256_hex(&token);
        let now = SystemTime::now();
        let ((node, event), _) = self
            .transact(|txn| -> Result<_, Error> {
                let version = txn.revision().to_string();
                let seq = txn.next_id();
                let existing: Option<StoredNode> = NODES.get(txn, request.name.as_bytes())?;
                let reregistered = existing.is_some();
                let mut object = existing.map(|n| n.object).unwrap_or_else(|| NodeObject {
                    metadata: ObjectInfo {
                        name: request.name.clone(),
                        labels: BTreeMap::new(),
                        resource_version: String::new(),
                        creation_timestamp: Some(now),
                    },
                    status: NodeStatus::default(),
                });
                object.metadata.labels = request.labels.clone();
                object.metadata.resource_version = version.clone();
                let stored = StoredNode {
                    token_sha256: token_sha256.clone(),
                    joined_with: join_token.to_string(),
                    object: object.clone(),
                };
                NODES.put(txn, request.name.as_bytes(), &stored)?;
                let event = self.put_node_event(
                    txn,
                    seq,
                    now,
                    if reregistered {
                        "Reregistered"
                    } else {
                        "Registered"
                    },
                    &request.name,
                    format!(
                        "joined with token `{join_token}`, labels {}",
                        format_labels(&request.labels)
                    ),
                )?;
                Ok((object, event))
            })
            .await?;
        // Durable once answered (as every awaited write): the node keeps only the token, and
        // losing its hash in a crash would lock the node out.
        let _ = node;
        self.after_events(&[event]).await?;
        Ok(RegisterResponse {
            name: request.name,
            token,
        })
    }

    /// True when `token` is the node token of `name` (compared in constant time).
    pub fn node_token_matches(&self, name: &str, token: &str) -> Result<bool, Error> {
        use subtle::ConstantTimeEq;
        let known = self.facts_of(name).map(|facts| facts.token_sha256.clone());
        let expected = match known {
            Some(hash) => hash,
            // Not (yet) known to the feed: the store decides.
            None => match self.find_node(name)? {
                Some(stored) => stored.token_sha256,
                None => return Ok(false),
            },
        };
        let presented = sha256_hex(token);
        Ok(bool::from(presented.as_bytes().ct_eq(expected.as_bytes())))
    }

    /// Stores a node's heartbeat report and turns its events into Events.
    pub async fn report(&self, name: &str, mut report: NodeReport) -> Result<(), Error> {
        let now = SystemTime::now();
        let mut node_events = std::mem::take(&mut report.events);
        if node_events.len() > MAX_EVENTS_PER_REPORT {
            // A flood (or a forgery) keeps its newest events and says what it lost.
            let sent = node_events.len();
            node_events.drain(..sent - MAX_EVENTS_PER_REPORT);
            node_events.push(NodeEvent {
                time: now,
                kind: EventType::Warning,
                reason: "EventsDropped".into(),
                message: format!(
                    "the node sent {sent} events in one report; kept the newest {MAX_EVENTS_PER_REPORT}"
                ),
                desired_state: None,
                revision: None,
                component: None,
            });
        }
        // A report with events is answered once durable, as every write: the node forgets
        // its events once they are acknowledged. One without events holds nothing the node
        // would forget — it sends its whole state again within one interval — so it is
        // answered at once and committed with the next group; until then nobody is shown
        // it, and a crash loses only a heartbeat the next one replaces. Heartbeats thereby
        // never wait for a disk flush (a 10,000-assignment wave took 200–500 ms to persist).
        let waits = !node_events.is_empty();
        let digest = report_digest(&report);
        // A report of the node still queued is newer than the stored one: until it is
        // stored, what the node says is compared with nothing (and so stored, in order).
        let in_flight = self
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .holds(name);
        let stored = match in_flight {
            true => None,
            false => self
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .stored_reports
                .get(name)
                .copied(),
        };
        // It says exactly what the stored report says: its time can be shown, and taken
        // as evidence with the stored state, before it is stored itself. Not with replicas:
        // another one may have stored something else of the node since this one did.
        let same = !self.store.is_shared() && stored.is_some_and(|(known, _)| known == digest);
        let store_it = must_store(
            digest,
            waits,
            self.store.is_shared(),
            stored,
            now,
            self.config.heartbeat_persist_interval,
        );
        if !waits {
            // What a commit would refuse, refused now: an unknown node, a store that
            // cannot persist.
            if self.facts_of(name).is_none() && self.find_node(name)?.is_none() {
                return Err(Error::NotFound {
                    kind: "Node",
                    name: name.to_string(),
                });
            }
            self.store.check()?;
        }
        if !store_it {
            // Nothing new but the host's figures: heard, and kept in memory until the next
            // stored report (at 10,000 nodes, storing every heartbeat was most of what the
            // store wrote, and every write waits for a disk flush).
            return self.heard(name, now, report.host).await;
        }
        if same && !waits {
            self.heard(name, now, report.host.clone()).await?;
        }
        let (done, committed) = if waits {
            let (done, committed) = tokio::sync::oneshot::channel();
            (Some(done), Some(committed))
        } else {
            (None, None)
        };
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(QueuedReport {
                name: name.to_string(),
                report,
                node_events,
                now,
                digest,
                done,
            });
        // A task of its own commits what is queued: a request dropped by its client (the
        // connection closed) must not take the other nodes' heartbeats of its batch along.
        if !self
            .report_drainer
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            if let Some(me) = self.me.upgrade() {
                tokio::spawn(async move { me.store_queued_reports().await });
            }
        }
        match committed {
            Some(committed) => committed.await.map_err(|_| {
                Error::Store(StoreError::Backend(
                    "the heartbeat's commit was dropped".into(),
                ))
            })?,
            None => Ok(()),
        }
    }

    /// Commits every queued heartbeat, in batches; whoever holds the committer commits
    /// what queued meanwhile, so concurrent heartbeats share transactions. Returns once
    /// everything queued before the call is stored (shutdown calls it for the heartbeats
    /// answered before their commit).
    pub async fn store_queued_reports(&self) {
        let _committer = self.report_committer.lock().await;
        loop {
            // Cleared before taking: a report queued after the take starts a task of its
            // own (which waits for this one), one queued before it is in this batch.
            self.report_drainer
                .store(false, std::sync::atomic::Ordering::Release);
            let batch = self
                .reports
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(MAX_REPORTS_PER_COMMIT);
            if batch.is_empty() {
                return;
            }
            self.commit_reports(batch).await;
        }
    }

    /// Stores queued heartbeats in one transaction and answers each: a report of a node
    /// that is gone gets its own error, and does not fail the others.
    async fn commit_reports(&self, batch: Vec<QueuedReport>) {
        let names: Vec<String> = batch.iter().map(|q| q.name.clone()).collect();
        self.store_reports(batch).await;
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .finished(names.iter().map(String::as_str));
    }

    async fn store_reports(&self, batch: Vec<QueuedReport>) {
        let outcome = self
            .transact(|txn| -> Result<Vec<Result<Vec<Event>, Error>>, Error> {
                let version = txn.revision().to_string();
                let mut answers = Vec::with_capacity(batch.len());
                for queued in &batch {
                    answers.push(self.put_report(txn, queued, &version)?);
                }
                Ok(answers)
            })
            .await;
        match outcome {
            Ok((answers, _)) => {
                for (queued, answer) in batch.into_iter().zip(answers) {
                    let answer = match answer {
                        Ok(events) => {
                            self.live
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .stored_reports
                                .insert(queued.name.clone(), (queued.digest, queued.now));
                            self.after_report(&queued.name, queued.now, &events).await
                        }
                        Err(error) => Err(error),
                    };
                    match (queued.done, answer) {
                        (Some(done), answer) => {
                            let _ = done.send(answer);
                        }
                        (None, Ok(())) => {}
                        (None, Err(error)) => tracing::warn!(
                            node = %queued.name,
                            %error,
                            "a heartbeat answered before its commit was not stored"
                        ),
                    }
                }
            }
            Err(error) => {
                let error = Error::from(error);
                let text = error.to_string();
                for queued in batch {
                    match queued.done {
                        Some(done) => {
                            let _ = done.send(Err(Error::Store(StoreError::Backend(text.clone()))));
                        }
                        None => tracing::warn!(
                            node = %queued.name,
                            error = %text,
                            "a heartbeat answered before its commit was not stored"
                        ),
                    }
                }
            }
        }
    }

    /// A heartbeat kept in memory: the node is heard (Ready again, an event if it was not),
    /// and its host figures join its history.
    async fn heard(
        &self,
        name: &str,
        now: SystemTime,
        host: Option<HostMetrics>,
    ) -> Result<(), Error> {
        if let Some(metrics) = host {
            self.live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .add_host_sample(name, now, metrics, self.config.host_history);
        }
        self.after_report(name, now, &[]).await
    }

    /// What follows a stored heartbeat: the node is heard (and Ready again, an event if it
    /// was not), and its events count against its share of the retention.
    async fn after_report(
        &self,
        name: &str,
        now: SystemTime,
        events: &[Event],
    ) -> Result<(), Error> {
        let was_ready = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            live.heartbeats.insert(name.to_string(), now);
            live.ready.insert(name.to_string(), true)
        };
        // Readiness events are the leader's to raise (a follower's view of who was NotReady
        // is its own); the leader's sweep notices a node heard by another replica.
        if was_ready == Some(false) && self.leader_epoch().is_some() {
            self.node_readiness_event(name, true, now).await?;
        }
        self.after_events(events).await?;
        Ok(())
    }

    /// Writes one heartbeat inside a batch's transaction: `Ok(Err(_))` is this report's own
    /// failure (nothing of it written), `Err(_)` the store's (the whole batch fails).
    fn put_report(
        &self,
        txn: &mut dyn Txn,
        queued: &QueuedReport,
        version: &str,
    ) -> Result<Result<Vec<Event>, Error>, Error> {
        let QueuedReport {
            name,
            report,
            node_events,
            now,
            ..
        } = queued;
        let mut stored = match node_in(txn, name) {
            Ok(stored) => stored,
            Err(error @ Error::Store(_)) => return Err(error),
            Err(error) => return Ok(Err(error)),
        };
        let mut events = Vec::new();
        for node_event in node_events {
            let seq = txn.next_id();
            let event = self.new_event(
                seq,
                node_event.time,
                node_event.kind,
                &node_event.reason,
                &format!("node/{name}"),
                match &node_event.component {
                    // "demo: demo 1.2.0 failed" would say the name twice.
                    Some(component) if !node_event.message.starts_with(component.as_str()) => {
                        format!("{component}: {}", node_event.message)
                    }
                    _ => node_event.message.clone(),
                },
                Some(name.to_string()),
                node_event.desired_state.clone(),
                node_event.revision,
            )?;
            events.push(event);
        }
        stored.object.status.last_heartbeat = Some(*now);
        stored.object.status.healthy_received =
            healthy_received(&stored.object.status.healthy_received, report, *now);
        stored.object.status.report = report.clone();
        stored.object.metadata.resource_version = version.to_string();
        NODES.put(txn, name.as_bytes(), &stored)?;
        for event in &events {
            EVENTS.put(txn, &event.seq.to_be_bytes(), event)?;
        }
        Ok(Ok(events))
    }

    /// What the feed keeps of `name`, if it knows the node.
    pub(super) fn facts_of(&self, name: &str) -> Option<Arc<NodeFacts>> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .nodes
            .get(name)
            .cloned()
    }

    /// What the feed keeps of every node, in no particular order.
    pub(super) fn node_facts(&self) -> Vec<Arc<NodeFacts>> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .nodes
            .values()
            .cloned()
            .collect()
    }

    pub(super) fn list_nodes_raw(&self) -> Result<Vec<StoredNode>, StoreError> {
        NODES
            .read_prefix(&self.store, b"")
            .into_iter()
            .map(|(_, node)| node)
            .collect()
    }

    /// Whether a heartbeat at `heartbeat` still makes its node Ready at `now`. One this
    /// process heard counts for `ready_grace`; one known only from the store (from before
    /// this process started) may be up to `heartbeat_persist_interval` older than the node's
    /// last heartbeat, since unchanged heartbeats are not all stored.
    pub(super) fn fresh(&self, heartbeat: SystemTime, now: SystemTime) -> bool {
        let mut grace = self.config.ready_grace;
        // Stored times have whole milliseconds: one of the start's millisecond was heard here.
        if heartbeat < whole_millis(self.started) {
            grace += self.config.heartbeat_persist_interval;
        }
        now.duration_since(heartbeat).unwrap_or_default() <= grace
    }

    pub(super) fn is_ready(&self, node: &NodeObject, now: SystemTime) -> bool {
        node.status
            .last_heartbeat
            .is_some_and(|t| self.fresh(t, now))
    }

    /// Adds the computed conditions and the host history to a stored node.
    pub(super) fn decorate(
        &self,
        mut node: NodeObject,
        now: SystemTime,
    ) -> Result<NodeObject, Error> {
        {
            // A heartbeat kept in memory is newer than the stored one: show it, and its
            // host figures (the newest of the history).
            let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let name = &node.metadata.name;
            if let Some(&heard) = live.heartbeats.get(name) {
                // The stored time has whole milliseconds; the same heartbeat in memory has more.
                if node
                    .status
                    .last_heartbeat
                    .is_none_or(|stored| stored < whole_millis(heard))
                {
                    node.status.last_heartbeat = Some(heard);
                    if let Some(sample) = live.host_history.get(name).and_then(|h| h.back()) {
                        node.status.report.host = Some(sample.metrics.clone());
                    }
                }
            }
            if let Some(history) = live.host_history.get(name) {
                node.status.host_history = history.iter().cloned().collect();
            }
        }
        let assignment = self.assignment_for(&node);
        node.status.conditions = conditions(&node, &assignment, self.is_ready(&node, now));
        Ok(node)
    }

    /// A node's stored record, if it is registered.
    pub(super) fn find_node(&self, name: &str) -> Result<Option<StoredNode>, StoreError> {
        NODES.read(&self.store, name.as_bytes())
    }

    /// A node's stored record, or 404.
    pub(super) fn stored_node(&self, name: &str) -> Result<StoredNode, Error> {
        self.find_node(name)?.ok_or_else(|| Error::NotFound {
            kind: "Node",
            name: name.to_string(),
        })
    }

    /// One node with its conditions.
    pub fn get_node(&self, name: &str) -> Result<NodeObject, Error> {
        self.decorate(self.stored_node(name)?.object, SystemTime::now())
    }

    /// Every node with its conditions, by name.
    pub fn list_nodes(&self) -> Result<Vec<NodeObject>, Error> {
        self.nodes_after(None, usize::MAX)
    }

    /// Up to `limit` nodes named after `after`, by name: a page of the list.
    pub fn nodes_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<NodeObject>, Error> {
        let now = SystemTime::now();
        NODES
            .read_after(&self.store, after.map(str::as_bytes), limit)
            .into_iter()
            .map(|(_, node)| self.decorate(node?.object, now))
            .collect()
    }

    /// Reports nodes whose readiness changed since the last sweep; run periodically.
    pub async fn sweep_readiness(&self, now: SystemTime) -> Result<(), Error> {
        // From the in-memory heartbeat times: with 10,000 nodes, decoding every record
        // every two seconds was a visible share of the apiserver's CPU.
        let mut flipped = Vec::new();
        {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let states: Vec<(String, bool)> = live
                .heartbeats
                .iter()
                .map(|(name, at)| (name.clone(), self.fresh(*at, now)))
                .collect();
            for (name, ready) in states {
                // A node seen for the first time (its first heartbeat, or one another
                // replica heard) turns nothing.
                if live.ready.insert(name.clone(), ready) == Some(!ready) {
                    flipped.push((name, ready));
                }
            }
        }
        // Every replica tracks readiness; only the leader reports its transitions.
        if self.leader_epoch().is_none() {
            return Ok(());
        }
        for (name, ready) in flipped {
            self.node_readiness_event(&name, ready, now).await?;
        }
        Ok(())
    }

    pub(super) async fn node_readiness_event(
        &self,
        name: &str,
        ready: bool,
        now: SystemTime,
    ) -> Result<(), Error> {
        let (kind, reason, message) = if ready {
            (
                EventType::Normal,
                "NodeReady",
                "heartbeats resumed".to_string(),
            )
        } else {
            (
                EventType::Warning,
                "NodeNotReady",
                format!(
                    "no heartbeat for more than {}s",
                    self.config.ready_grace.as_secs()
                ),
            )
        };
        self.record_event(
            now,
            kind,
            reason,
            &format!("node/{name}"),
            message,
            Some(name.to_string()),
            None,
            None,
        )
        .await?;
        if self.changes.receiver_count() > 0 {
            if let Ok(node) = self.get_node(name) {
                self.publish(Kind::Node, ChangeType::Modified, name, &node);
            }
        }
        Ok(())
    }

    /// Cordons a node (it takes no new revision and keeps the ones it is assigned now) or
    /// uncordons it. Idempotent, like `kubectl cordon`.
    pub async fn set_cordon(
        &self,
        name: &str,
        cordon: bool,
        actor: &str,
    ) -> Result<NodeObject, Error> {
        let stored = self.stored_node(name)?;
        if stored.object.status.cordoned.is_some() == cordon {
            return self.get_node(name);
        }
        let now = SystemTime::now();
        let states: Vec<String> = self.cache().states.keys().cloned().collect();
        let ((node, event), _) = self
            .transact(|txn| -> Result<_, Error> {
                let version = txn.revision().to_string();
                let seq = txn.next_id();
                let mut stored = node_in(txn, name)?;
                // What it is assigned now, read in this transaction: a wave that starts
                // meanwhile either lands before (and is kept) or conflicts and retries.
                let mut keep = BTreeMap::new();
                for state_name in &states {
                    let Some(state) = DESIRED_STATES.get(txn, state_name.as_bytes())? else {
                        continue;
                    };
                    if !state.spec.selector.matches(&stored.object.metadata.labels) {
                        continue;
                    }
                    let key = store::assignment_key(name, state_name);
                    let revision = ASSIGNMENTS
                        .get(txn, &key)?
                        .unwrap_or(state.status.last_good_revision);
                    if revision > 0 {
                        keep.insert(state_name.clone(), revision);
                    }
                }
                let (reason, message) = if cordon {
                    stored.object.status.cordoned = Some(Cordon {
                        since: now,
                        by: actor.to_string(),
                        revisions: keep.clone(),
                    });
                    let kept = if keep.is_empty() {
                        "nothing".to_string()
                    } else {
                        keep.iter()
                            .map(|(s, r)| format!("{s}@{r}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    (
                        "NodeCordoned",
                        format!("cordoned by {actor}: takes no new revision, keeps {kept}"),
                    )
                } else {
                    stored.object.status.cordoned = None;
                    (
                        "NodeUncordoned",
                        format!("uncordoned by {actor}: follows its rollouts again"),
                    )
                };
                stored.object.metadata.resource_version = version.clone();
                NODES.put(txn, name.as_bytes(), &stored)?;
                let event = self.put_node_event(txn, seq, now, reason, name, message)?;
                Ok((stored.object, event))
            })
            .await?;
        let node = self.decorate(node, now)?;
        self.after_events(&[event]).await?;
        Ok(node)
    }

    /// Forgets a node: its record, its token and its assignments. A nodelet that comes back
    /// must join again.
    pub async fn delete_node(&self, name: &str, actor: &str) -> Result<NodeObject, Error> {
        // Every DesiredState's key, not only those the cache shows assigned: a wave that
        // started since the cache was built must not leave a row for a rejoining namesake.
        let assignments: Vec<Vec<u8>> = self
            .cache()
            .states
            .keys()
            .map(|state| store::assignment_key(name, state))
            .collect();
        let now = SystemTime::now();
        let ((node, event), _) = self.transact(|txn| -> Result<_, Error> {
            let seq = txn.next_id();
            let stored = node_in(txn, name)?;
            NODES.delete(txn, name.as_bytes())?;
            for key in &assignments {
                ASSIGNMENTS.delete(txn, key)?;
            }
            let event = self.put_node_event(
                txn,
                seq,
                now,
                "NodeDeleted",
                name,
                format!("deleted by {actor}: its token no longer works; a nodelet that comes back must join again"),
            )?;
            Ok((stored.object, event))
        })
        .await?;
        self.after_events(&[event]).await?;
        Ok(node)
    }
}

#[cfg(test)]
mod report_queue_tests {
    use super::*;

    #[test]
    fn a_report_is_stored_when_it_says_something_new_or_the_stored_one_is_old() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let minute = Duration::from_secs(60);
        let later = |s: u64| t0 + Duration::from_secs(s);
        // Nothing stored yet by this process.
        assert!(must_store(1, false, false, None, t0, minute));
        // The same report 10 s later: memory only; 60 s later: stored again.
        assert!(!must_store(
            1,
            false,
            false,
            Some((1, t0)),
            later(10),
            minute
        ));
        assert!(must_store(
            1,
            false,
            false,
            Some((1, t0)),
            later(60),
            minute
        ));
        // Something new, events, or replicas reading the store: stored.
        assert!(must_store(
            2,
            false,
            false,
            Some((1, t0)),
            later(10),
            minute
        ));
        assert!(must_store(1, true, false, Some((1, t0)), later(10), minute));
        assert!(must_store(1, false, true, Some((1, t0)), later(10), minute));
        // A clock that went back does not keep a report out of the store for ever.
        assert!(must_store(
            1,
            false,
            false,
            Some((1, t0)),
            t0 - minute,
            minute
        ));
    }

    #[test]
    fn the_digest_ignores_host_figures_and_events_but_nothing_else() {
        let base = NodeReport {
            applied: vec![AppliedState {
                desired_state: "web".into(),
                revision: 2,
                phase: ComponentPhase::Healthy,
                commit: None,
                healthy_since: None,
            }],
            ..NodeReport::default()
        };
        let mut busier = base.clone();
        busier.host = Some(HostMetrics {
            cpu_percent: 99.0,
            ..HostMetrics::default()
        });
        assert_eq!(report_digest(&base), report_digest(&busier));
        let mut reverted = base.clone();
        reverted.applied[0].phase = ComponentPhase::Reverted;
        assert_ne!(report_digest(&base), report_digest(&reverted));
        let mut pressed = base.clone();
        pressed.disk_pressure = Some("/var: 99%".into());
        assert_ne!(report_digest(&base), report_digest(&pressed));
    }

    fn queued(name: &str, cpu: f64, waits: bool) -> QueuedReport {
        QueuedReport {
            name: name.to_string(),
            report: NodeReport {
                host: Some(HostMetrics {
                    cpu_percent: cpu,
                    ..HostMetrics::default()
                }),
                ..NodeReport::default()
            },
            node_events: Vec::new(),
            now: SystemTime::UNIX_EPOCH,
            digest: 0,
            done: waits.then(|| tokio::sync::oneshot::channel().0),
        }
    }

    fn cpu(q: &QueuedReport) -> f64 {
        q.report.host.as_ref().unwrap().cpu_percent
    }

    #[test]
    fn a_report_answered_early_replaces_the_nodes_queued_one_in_place() {
        let mut queue = ReportQueue::default();
        queue.push(queued("a", 1.0, false));
        queue.push(queued("b", 2.0, false));
        queue.push(queued("a", 3.0, false));
        let batch = queue.take(10);
        assert_eq!(batch.len(), 2);
        assert_eq!((batch[0].name.as_str(), cpu(&batch[0])), ("a", 3.0));
        assert_eq!((batch[1].name.as_str(), cpu(&batch[1])), ("b", 2.0));
    }

    #[test]
    fn a_report_that_waits_for_its_commit_is_never_replaced_nor_overtaken() {
        let mut queue = ReportQueue::default();
        queue.push(queued("a", 1.0, true));
        queue.push(queued("a", 2.0, false));
        queue.push(queued("a", 3.0, false));
        queue.push(queued("a", 4.0, true));
        queue.push(queued("a", 5.0, false));
        queue.push(queued("a", 6.0, false));
        let batch = queue.take(10);
        let seen: Vec<f64> = batch.iter().map(cpu).collect();
        // Stored in the order sent, so the newest state is the one that stays; early
        // reports merge only with those queued since the last waiting one.
        assert_eq!(seen, vec![1.0, 3.0, 4.0, 6.0]);
    }

    #[test]
    fn after_a_partial_take_new_reports_find_their_place() {
        let mut queue = ReportQueue::default();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            queue.push(queued(name, i as f64, false));
        }
        let first = queue.take(2);
        assert_eq!(first.len(), 2);
        // "a" left the queue: its next report queues anew; "c" is still queued: replaced.
        queue.push(queued("a", 10.0, false));
        queue.push(queued("c", 20.0, false));
        let rest = queue.take(10);
        let seen: Vec<(&str, f64)> = rest.iter().map(|q| (q.name.as_str(), cpu(q))).collect();
        assert_eq!(seen, vec![("c", 20.0), ("a", 10.0)]);
        assert!(queue.take(10).is_empty());
        queue.push(queued("c", 30.0, false));
        assert_eq!(queue.take(10).len(), 1);
    }

    #[test]
    fn a_node_is_in_flight_from_its_report_queued_until_that_report_is_stored() {
        let mut queue = ReportQueue::default();
        assert!(!queue.holds("a"));
        queue.push(queued("a", 1.0, false));
        queue.push(queued("a", 2.0, false));
        queue.push(queued("a", 3.0, true));
        let batch = queue.take(10);
        assert_eq!(batch.len(), 2);
        // Taken is not stored yet.
        assert!(queue.holds("a"));
        queue.finished(batch.iter().map(|q| q.name.as_str()));
        assert!(!queue.holds("a"));
    }
}
