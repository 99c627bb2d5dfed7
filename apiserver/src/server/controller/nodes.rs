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
    done: tokio::sync::oneshot::Sender<Result<Vec<Event>, Error>>,
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
        // Answered once durable, as every write (the node forgets its events once they are
        // acknowledged), and committed together with the heartbeats that arrive meanwhile.
        let (done, committed) = tokio::sync::oneshot::channel();
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(QueuedReport {
                name: name.to_string(),
                report,
                node_events,
                now,
                done,
            });
        // A task of its own commits what is queued: a request dropped by its client (the
        // connection closed) must not take the other nodes' heartbeats of its batch along.
        if !self
            .report_drainer
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            if let Some(me) = self.me.upgrade() {
                tokio::spawn(async move { me.commit_queued_reports().await });
            }
        }
        let events = committed.await.map_err(|_| {
            Error::Store(StoreError::Backend(
                "the heartbeat's commit was dropped".into(),
            ))
        })??;
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
        self.after_events(&events).await?;
        Ok(())
    }

    /// Commits every queued heartbeat, in batches; whoever holds the committer commits
    /// what queued meanwhile, so concurrent heartbeats share transactions.
    async fn commit_queued_reports(&self) {
        let _committer = self.report_committer.lock().await;
        loop {
            // Cleared before taking: a report queued after the take starts a task of its
            // own (which waits for this one), one queued before it is in this batch.
            self.report_drainer
                .store(false, std::sync::atomic::Ordering::Release);
            let batch: Vec<QueuedReport> = {
                let mut queue = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
                let take = queue.len().min(MAX_REPORTS_PER_COMMIT);
                queue.drain(..take).collect()
            };
            if batch.is_empty() {
                return;
            }
            self.commit_reports(batch).await;
        }
    }

    /// Stores queued heartbeats in one transaction and answers each: a report of a node
    /// that is gone gets its own error, and does not fail the others.
    async fn commit_reports(&self, batch: Vec<QueuedReport>) {
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
                    let _ = queued.done.send(answer);
                }
            }
            Err(error) => {
                let error = Error::from(error);
                let text = error.to_string();
                for queued in batch {
                    let _ = queued
                        .done
                        .send(Err(Error::Store(StoreError::Backend(text.clone()))));
                }
            }
        }
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

    pub(super) fn fresh(&self, heartbeat: SystemTime, now: SystemTime) -> bool {
        now.duration_since(heartbeat).unwrap_or_default() <= self.config.ready_grace
    }

    pub(super) fn is_ready(&self, node: &NodeObject, now: SystemTime) -> bool {
        node.status
            .last_heartbeat
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() <= self.config.ready_grace)
    }

    /// Adds the computed conditions and the host history to a stored node.
    pub(super) fn decorate(
        &self,
        mut node: NodeObject,
        now: SystemTime,
    ) -> Result<NodeObject, Error> {
        let assignment = self.assignment_for(&node);
        node.status.conditions = conditions(&node, &assignment, self.is_ready(&node, now));
        if let Some(history) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .host_history
            .get(&node.metadata.name)
        {
            node.status.host_history = history.iter().cloned().collect();
        }
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
