//! The object logic: applies and revisions, node records, assignments, conditions, events.
//!
//! It knows the store and nothing of HTTP. Every write is one store
//! transaction, so a crash leaves either all of an apply or none of it.
//! After a commit, an in-memory cache of DesiredStates and the revisions in
//! use is rebuilt, nodes waiting for their assignment are woken, and watchers
//! are told.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use manifests::wire::*;
use manifests::{DesiredState, API_VERSION, KIND_DESIRED_STATE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use super::error::ApiError;
use crate::store::{self, decode, encode, transact, Store, StoreError, Table, Txn};

/// Tunables of the controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Events kept; older ones are dropped.
    pub event_retention: usize,
    /// A node whose last heartbeat is older than this is not Ready.
    pub ready_grace: Duration,
    /// Host metrics samples kept per node (in memory).
    pub host_history: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            event_retention: 10_000,
            ready_grace: Duration::from_secs(40),
            host_history: 60,
        }
    }
}

/// The kinds of object a watch can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// DesiredState.
    DesiredState,
    /// Node.
    Node,
    /// Rollout.
    Rollout,
    /// Event.
    Event,
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ChangeType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

/// One change, as watchers receive it.
#[derive(Debug, Clone)]
pub struct Change {
    /// Kind of object.
    pub kind: Kind,
    /// What happened.
    pub change: ChangeType,
    /// Object name.
    pub name: String,
    /// The object after the change (before it, for deletes).
    pub object: Arc<serde_json::Value>,
}

/// A node as stored: the object and the hash of its token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredNode {
    token_sha256: String,
    /// The join token it registered with.
    joined_with: String,
    object: NodeObject,
}

/// One manifest of an apply, with where it came from.
#[derive(Debug, Clone)]
pub struct ApplyInput {
    /// The validated manifest.
    pub object: DesiredState,
    /// Provenance recorded on a new revision.
    pub source: RevisionSource,
}

#[derive(Default)]
struct Cache {
    states: BTreeMap<String, Arc<DesiredStateObject>>,
    /// Revisions in use: newest, last good and assigned ones.
    revisions: HashMap<(String, u64), Arc<Revision>>,
    /// node → DesiredState → revision, as the rollout controller assigned.
    assignments: HashMap<String, BTreeMap<String, u64>>,
}

#[derive(Default)]
struct Live {
    host_history: HashMap<String, VecDeque<HostSample>>,
    /// Readiness last seen by the readiness sweep, to report transitions once.
    ready: HashMap<String, bool>,
}

/// The apiserver's object logic.
pub struct Controller {
    store: Arc<dyn Store>,
    config: ControllerConfig,
    changes: broadcast::Sender<Change>,
    epoch: watch::Sender<u64>,
    cache: RwLock<Arc<Cache>>,
    live: Mutex<Live>,
}

/// Why an apply transaction stopped: a real error, or a dry run that must not commit.
enum ApplyStop {
    Error(ApiError),
    DryRun(Vec<ApplyResult>),
}

impl From<StoreError> for ApplyStop {
    fn from(e: StoreError) -> Self {
        ApplyStop::Error(ApiError::Store(e))
    }
}

impl From<ApiError> for ApplyStop {
    fn from(e: ApiError) -> Self {
        ApplyStop::Error(e)
    }
}

fn get_json<T: serde::de::DeserializeOwned>(
    txn: &dyn Txn,
    table: Table,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    txn.get(table, key)?
        .map(|bytes| decode(table, key, &bytes))
        .transpose()
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Controller {
    /// A controller over `store`; loads its cache.
    pub fn new(store: Arc<dyn Store>, config: ControllerConfig) -> Result<Arc<Self>, StoreError> {
        let (changes, _) = broadcast::channel(4096);
        let (epoch, _) = watch::channel(0);
        let controller = Arc::new(Controller {
            store,
            config,
            changes,
            epoch,
            cache: RwLock::new(Arc::new(Cache::default())),
            live: Mutex::new(Live::default()),
        });
        controller.refresh()?;
        // Readiness as it stands at start: transitions are reported from here on.
        let now = SystemTime::now();
        let ready: HashMap<String, bool> = controller
            .list_nodes_raw()?
            .into_iter()
            .map(|n| {
                let ready = controller.is_ready(&n.object, now);
                (n.object.metadata.name, ready)
            })
            .collect();
        controller.live.lock().expect("not poisoned").ready = ready;
        Ok(controller)
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Subscribes to every change.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Subscribes to "some assignment may have changed".
    pub fn assignment_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    fn publish(&self, kind: Kind, change: ChangeType, name: &str, object: impl Serialize) {
        // Serializing is the expensive part; skip it when nobody watches.
        if self.changes.receiver_count() > 0 {
            let object = Arc::new(serde_json::to_value(object).expect("objects serialize"));
            let _ = self.changes.send(Change {
                kind,
                change,
                name: name.to_string(),
                object,
            });
        }
    }

    fn bump_epoch(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Reloads the cache of DesiredStates, revisions in use and assignments from the store.
    pub fn refresh(&self) -> Result<(), StoreError> {
        let mut cache = Cache::default();
        for (key, value) in self.store.scan_prefix(Table::DesiredStates, b"")? {
            let object: DesiredStateObject = decode(Table::DesiredStates, &key, &value)?;
            cache
                .states
                .insert(object.metadata.name.clone(), Arc::new(object));
        }
        for (key, value) in self.store.scan_prefix(Table::Assignments, b"")? {
            let Some(split) = key.iter().position(|b| *b == 0) else {
                continue;
            };
            let node = String::from_utf8_lossy(&key[..split]).into_owned();
            let state = String::from_utf8_lossy(&key[split + 1..]).into_owned();
            let revision: u64 = decode(Table::Assignments, &key, &value)?;
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
        let old = self.cache.read().expect("not poisoned").clone();
        for (state, revision) in wanted {
            if revision == 0 || cache.revisions.contains_key(&(state.clone(), revision)) {
                continue;
            }
            let revision_object = match old.revisions.get(&(state.clone(), revision)) {
                Some(cached) => Some(cached.clone()),
                None => self
                    .store
                    .get(Table::Revisions, &store::revision_key(&state, revision))?
                    .map(|bytes| {
                        decode::<Revision>(
                            Table::Revisions,
                            &store::revision_key(&state, revision),
                            &bytes,
                        )
                    })
                    .transpose()?
                    .map(Arc::new),
            };
            if let Some(revision_object) = revision_object {
                cache.revisions.insert((state, revision), revision_object);
            }
        }
        *self.cache.write().expect("not poisoned") = Arc::new(cache);
        Ok(())
    }

    fn cache(&self) -> Arc<Cache> {
        self.cache.read().expect("not poisoned").clone()
    }

    // ---- DesiredStates ------------------------------------------------------

    /// Stores every manifest in one transaction. With `dry_run`, reports what would happen and stores nothing.
    pub fn apply(&self, inputs: Vec<ApplyInput>, dry_run: bool) -> Result<ApplyResponse, ApiError> {
        let version = self.store.next_version()?.to_string();
        let seqs = self.seqs(inputs.len())?;
        let now = SystemTime::now();
        let outcome = transact(self.store.as_ref(), |txn| -> Result<_, ApplyStop> {
            let mut results = Vec::new();
            let mut written: Vec<(ChangeType, DesiredStateObject, Option<Revision>)> = Vec::new();
            for input in &inputs {
                let manifest = &input.object;
                let name = &manifest.metadata.name;
                let existing: Option<DesiredStateObject> =
                    get_json(txn, Table::DesiredStates, name.as_bytes())?;
                if let Some(expected) = &manifest.metadata.resource_version {
                    let actual = existing
                        .as_ref()
                        .map(|e| e.metadata.resource_version.as_str());
                    if actual != Some(expected.as_str()) {
                        return Err(ApplyStop::Error(ApiError::Conflict {
                            message: match actual {
                                Some(actual) => format!("DesiredState `{name}` changed since it was read: resourceVersion is {actual}, not {expected}"),
                                None => format!("DesiredState `{name}` does not exist, but the manifest names resourceVersion {expected}"),
                            },
                            hint: "fetch it again (`shoal get desiredstate NAME -o yaml`), redo your change, or drop metadata.resourceVersion to overwrite".into(),
                        }));
                    }
                }
                let (action, object, revision) = match existing {
                    None => {
                        let revision = Revision {
                            desired_state: name.clone(),
                            revision: 1,
                            created: now,
                            source: input.source.clone(),
                            spec: manifest.spec.clone(),
                        };
                        let object = DesiredStateObject {
                            api_version: API_VERSION.into(),
                            kind: KIND_DESIRED_STATE.into(),
                            metadata: StoredMeta {
                                name: name.clone(),
                                labels: manifest.metadata.labels.clone(),
                                annotations: manifest.metadata.annotations.clone(),
                                resource_version: version.clone(),
                                generation: 1,
                                creation_timestamp: Some(now),
                            },
                            spec: manifest.spec.clone(),
                            status: DesiredStateStatus {
                                revision: 1,
                                // Without the rollout controller, a revision is good as soon as it is stored.
                                last_good_revision: 1,
                                source: input.source.clone(),
                                selected_nodes: 0,
                            },
                        };
                        (ApplyAction::Created, object, Some(revision))
                    }
                    Some(mut object) => {
                        let spec_changed = object.spec != manifest.spec;
                        let meta_changed = object.metadata.labels != manifest.metadata.labels
                            || object.metadata.annotations != manifest.metadata.annotations;
                        if !spec_changed && !meta_changed {
                            results.push(ApplyResult {
                                kind: KIND_DESIRED_STATE.into(),
                                name: name.clone(),
                                action: ApplyAction::Unchanged,
                                revision: object.status.revision,
                                resource_version: object.metadata.resource_version.clone(),
                            });
                            continue;
                        }
                        object.metadata.labels = manifest.metadata.labels.clone();
                        object.metadata.annotations = manifest.metadata.annotations.clone();
                        object.metadata.resource_version = version.clone();
                        let mut revision = None;
                        if spec_changed {
                            let number = object.status.revision + 1;
                            revision = Some(Revision {
                                desired_state: name.clone(),
                                revision: number,
                                created: now,
                                source: input.source.clone(),
                                spec: manifest.spec.clone(),
                            });
                            object.spec = manifest.spec.clone();
                            object.metadata.generation = number;
                            object.status.revision = number;
                            object.status.last_good_revision = number;
                            object.status.source = input.source.clone();
                        }
                        (ApplyAction::Configured, object, revision)
                    }
                };
                results.push(ApplyResult {
                    kind: KIND_DESIRED_STATE.into(),
                    name: name.clone(),
                    action,
                    revision: object.status.revision,
                    resource_version: version.clone(),
                });
                txn.put(Table::DesiredStates, name.as_bytes(), encode(&object))?;
                if let Some(revision) = &revision {
                    txn.put(
                        Table::Revisions,
                        &store::revision_key(name, revision.revision),
                        encode(revision),
                    )?;
                }
                let change = if action == ApplyAction::Created {
                    ChangeType::Added
                } else {
                    ChangeType::Modified
                };
                written.push((change, object, revision));
            }
            if dry_run {
                return Err(ApplyStop::DryRun(results));
            }
            let mut events = Vec::new();
            for ((change, object, revision), seq) in written.iter().zip(&seqs) {
                let name = &object.metadata.name;
                let message = match (change, revision) {
                    (ChangeType::Added, _) => {
                        format!("created at revision {}", object.status.revision)
                    }
                    (_, Some(revision)) => format!("spec changed: revision {}", revision.revision),
                    _ => "labels or annotations changed".to_string(),
                };
                let event = self.new_event(
                    *seq,
                    now,
                    EventType::Normal,
                    "Applied",
                    &format!("desiredstate/{name}"),
                    message,
                    None,
                    Some(name.clone()),
                    revision.as_ref().map(|r| r.revision),
                )?;
                txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
                events.push(event);
            }
            Ok((results, written, events))
        });
        let (results, written, events) = match outcome {
            Ok(done) => done,
            Err(store::TxnError::Aborted(ApplyStop::DryRun(results))) => {
                return Ok(ApplyResponse {
                    dry_run: true,
                    results,
                })
            }
            Err(store::TxnError::Aborted(ApplyStop::Error(e))) => return Err(e),
            Err(store::TxnError::Store(e)) => return Err(e.into()),
        };
        if !written.is_empty() {
            self.refresh()?;
            self.bump_epoch();
            for (change, object, _) in &written {
                self.publish(Kind::DesiredState, *change, &object.metadata.name, object);
            }
            self.after_events(&events)?;
        }
        Ok(ApplyResponse { dry_run, results })
    }

    /// Removes a DesiredState, its revisions and assignments. Nodes stop managing its components.
    pub fn delete_desired_state(
        &self,
        name: &str,
        expected_version: Option<&str>,
    ) -> Result<DesiredStateObject, ApiError> {
        let revisions = self
            .store
            .scan_prefix(Table::Revisions, &store::revision_prefix(name))?;
        let assignments: Vec<Vec<u8>> = self
            .cache()
            .assignments
            .iter()
            .filter(|(_, per_node)| per_node.contains_key(name))
            .map(|(node, _)| store::assignment_key(node, name))
            .collect();
        let now = SystemTime::now();
        let seq = self.store.next_version()?;
        let (object, event) = transact(self.store.as_ref(), |txn| -> Result<_, ApiError> {
            let object: DesiredStateObject = get_json(txn, Table::DesiredStates, name.as_bytes())?
                .ok_or_else(|| ApiError::NotFound {
                    kind: "DesiredState",
                    name: name.to_string(),
                })?;
            if let Some(expected) = expected_version {
                if object.metadata.resource_version != expected {
                    return Err(ApiError::Conflict {
                        message: format!(
                            "DesiredState `{name}` changed since it was read: resourceVersion is {}, not {expected}",
                            object.metadata.resource_version
                        ),
                        hint: "read it again and retry, or delete without a resourceVersion".into(),
                    });
                }
            }
            txn.delete(Table::DesiredStates, name.as_bytes())?;
            for (key, _) in &revisions {
                txn.delete(Table::Revisions, key)?;
            }
            for key in &assignments {
                txn.delete(Table::Assignments, key)?;
            }
            txn.delete(Table::Rollouts, name.as_bytes())?;
            let event = self.new_event(
                seq,
                now,
                EventType::Normal,
                "Deleted",
                &format!("desiredstate/{name}"),
                "deleted; nodes stop managing its components".into(),
                None,
                Some(name.to_string()),
                None,
            )?;
            txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
            Ok((object, event))
        })?;
        self.refresh()?;
        self.bump_epoch();
        self.publish(Kind::DesiredState, ChangeType::Deleted, name, &object);
        self.after_events(&[event])?;
        Ok(object)
    }

    /// One DesiredState, with the number of nodes it selects now.
    pub fn get_desired_state(&self, name: &str) -> Result<DesiredStateObject, ApiError> {
        let cache = self.cache();
        let object = cache.states.get(name).ok_or_else(|| ApiError::NotFound {
            kind: "DesiredState",
            name: name.to_string(),
        })?;
        let mut object = (**object).clone();
        object.status.selected_nodes = self.count_selected(&object)?;
        Ok(object)
    }

    /// Every DesiredState, by name.
    pub fn list_desired_states(&self) -> Result<Vec<DesiredStateObject>, ApiError> {
        let cache = self.cache();
        let nodes = self.list_nodes_raw()?;
        Ok(cache
            .states
            .values()
            .map(|object| {
                let mut object = (**object).clone();
                object.status.selected_nodes = nodes
                    .iter()
                    .filter(|n| object.spec.selector.matches(&n.object.metadata.labels))
                    .count() as u64;
                object
            })
            .collect())
    }

    fn count_selected(&self, object: &DesiredStateObject) -> Result<u64, ApiError> {
        Ok(self
            .list_nodes_raw()?
            .iter()
            .filter(|n| object.spec.selector.matches(&n.object.metadata.labels))
            .count() as u64)
    }

    /// Every revision of a DesiredState, oldest first.
    pub fn revisions(&self, name: &str) -> Result<Vec<Revision>, ApiError> {
        if !self.cache().states.contains_key(name) {
            return Err(ApiError::NotFound {
                kind: "DesiredState",
                name: name.to_string(),
            });
        }
        self.store
            .scan_prefix(Table::Revisions, &store::revision_prefix(name))?
            .into_iter()
            .map(|(k, v)| decode(Table::Revisions, &k, &v).map_err(ApiError::from))
            .collect()
    }

    // ---- Nodes --------------------------------------------------------------

    /// Registers (or re-registers) a node and issues a fresh node token.
    pub fn register(
        &self,
        request: RegisterRequest,
        join_token: &str,
    ) -> Result<RegisterResponse, ApiError> {
        if !manifests::validate::is_dns_label(&request.name) {
            return Err(ApiError::invalid_field(
                "name",
                format!("`{}` is not a valid node name", request.name),
                "a node name is a DNS label: lowercase letters, digits and '-', at most 63 characters (nodelet --name)",
            ));
        }
        for (key, value) in &request.labels {
            if !manifests::validate::is_label_key(key)
                || !manifests::validate::is_label_value(value)
            {
                return Err(ApiError::invalid_field(
                    &format!("labels.{key}"),
                    format!("`{key}={value}` is not a valid label"),
                    "label keys are `name` or `prefix/name`, values at most 63 letters, digits, '-', '_' or '.'",
                ));
            }
        }
        let secret: [u8; 32] = rand::random();
        let token = format!("{}:{}", request.name, hex::encode(secret));
        let token_sha256 = sha256_hex(&token);
        let version = self.store.next_version()?.to_string();
        let seq = self.store.next_version()?;
        let now = SystemTime::now();
        let (node, event) = transact(self.store.as_ref(), |txn| -> Result<_, ApiError> {
            let existing: Option<StoredNode> =
                get_json(txn, Table::Nodes, request.name.as_bytes())?;
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
            txn.put(Table::Nodes, request.name.as_bytes(), encode(&stored))?;
            let event = self.new_event(
                seq,
                now,
                EventType::Normal,
                if reregistered {
                    "Reregistered"
                } else {
                    "Registered"
                },
                &format!("node/{}", request.name),
                format!(
                    "joined with token `{join_token}`, labels {}",
                    format_labels(&request.labels)
                ),
                Some(request.name.clone()),
                None,
                None,
            )?;
            txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
            Ok((object, event))
        })?;
        self.bump_epoch();
        self.publish(Kind::Node, ChangeType::Added, &request.name, &node);
        self.after_events(&[event])?;
        Ok(RegisterResponse {
            name: request.name,
            token,
        })
    }

    /// True when `token` is the node token of `name` (compared in constant time).
    pub fn node_token_matches(&self, name: &str, token: &str) -> Result<bool, ApiError> {
        use subtle::ConstantTimeEq;
        let Some(bytes) = self.store.get(Table::Nodes, name.as_bytes())? else {
            return Ok(false);
        };
        let stored: StoredNode = decode(Table::Nodes, name.as_bytes(), &bytes)?;
        let presented = sha256_hex(token);
        Ok(bool::from(
            presented.as_bytes().ct_eq(stored.token_sha256.as_bytes()),
        ))
    }

    /// Stores a node's heartbeat report and turns its events into Events.
    pub fn report(&self, name: &str, mut report: NodeReport) -> Result<(), ApiError> {
        let now = SystemTime::now();
        let node_events = std::mem::take(&mut report.events);
        let version = self.store.next_version()?.to_string();
        let seqs = self.seqs(node_events.len())?;
        let (object, events) =
            transact(self.store.as_ref(), |txn| -> Result<_, ApiError> {
                let mut stored: StoredNode = get_json(txn, Table::Nodes, name.as_bytes())?
                    .ok_or_else(|| ApiError::NotFound {
                        kind: "Node",
                        name: name.to_string(),
                    })?;
                stored.object.status.last_heartbeat = Some(now);
                stored.object.status.report = report.clone();
                stored.object.metadata.resource_version = version.clone();
                txn.put(Table::Nodes, name.as_bytes(), encode(&stored))?;
                let mut events = Vec::new();
                for (node_event, seq) in node_events.iter().zip(&seqs) {
                    let event = self.new_event(
                        *seq,
                        node_event.time,
                        node_event.kind,
                        &node_event.reason,
                        &format!("node/{name}"),
                        match &node_event.component {
                            Some(component) => format!("{component}: {}", node_event.message),
                            None => node_event.message.clone(),
                        },
                        Some(name.to_string()),
                        node_event.desired_state.clone(),
                        node_event.revision,
                    )?;
                    txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))?;
                    events.push(event);
                }
                Ok((stored.object, events))
            })?;
        if let Some(host) = &report.host {
            let mut live = self.live.lock().expect("not poisoned");
            let history = live.host_history.entry(name.to_string()).or_default();
            history.push_back(HostSample {
                time: now,
                metrics: host.clone(),
            });
            while history.len() > self.config.host_history {
                history.pop_front();
            }
        }
        let was_ready = self
            .live
            .lock()
            .expect("not poisoned")
            .ready
            .insert(name.to_string(), true);
        if was_ready == Some(false) {
            self.node_readiness_event(name, true, now)?;
        }
        if self.changes.receiver_count() > 0 {
            let object = self.decorate(object, now)?;
            self.publish(Kind::Node, ChangeType::Modified, name, &object);
        }
        self.after_events(&events)?;
        Ok(())
    }

    fn list_nodes_raw(&self) -> Result<Vec<StoredNode>, StoreError> {
        self.store
            .scan_prefix(Table::Nodes, b"")?
            .into_iter()
            .map(|(k, v)| decode(Table::Nodes, &k, &v))
            .collect()
    }

    fn is_ready(&self, node: &NodeObject, now: SystemTime) -> bool {
        node.status
            .last_heartbeat
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() <= self.config.ready_grace)
    }

    /// Adds the computed conditions and the host history to a stored node.
    fn decorate(&self, mut node: NodeObject, now: SystemTime) -> Result<NodeObject, ApiError> {
        let assignment = self.assignment_for(&node);
        node.status.conditions = conditions(&node, &assignment, self.is_ready(&node, now));
        if let Some(history) = self
            .live
            .lock()
            .expect("not poisoned")
            .host_history
            .get(&node.metadata.name)
        {
            node.status.host_history = history.iter().cloned().collect();
        }
        Ok(node)
    }

    /// One node with its conditions.
    pub fn get_node(&self, name: &str) -> Result<NodeObject, ApiError> {
        let bytes = self
            .store
            .get(Table::Nodes, name.as_bytes())?
            .ok_or_else(|| ApiError::NotFound {
                kind: "Node",
                name: name.to_string(),
            })?;
        let stored: StoredNode = decode(Table::Nodes, name.as_bytes(), &bytes)?;
        self.decorate(stored.object, SystemTime::now())
    }

    /// Every node with its conditions, by name.
    pub fn list_nodes(&self) -> Result<Vec<NodeObject>, ApiError> {
        let now = SystemTime::now();
        self.list_nodes_raw()?
            .into_iter()
            .map(|n| self.decorate(n.object, now))
            .collect()
    }

    /// Reports nodes whose readiness changed since the last sweep; run periodically.
    pub fn sweep_readiness(&self, now: SystemTime) -> Result<(), ApiError> {
        let nodes = self.list_nodes_raw()?;
        let mut flipped = Vec::new();
        {
            let mut live = self.live.lock().expect("not poisoned");
            for node in &nodes {
                let ready = self.is_ready(&node.object, now);
                let name = &node.object.metadata.name;
                if live.ready.insert(name.clone(), ready) != Some(ready)
                    && node.object.status.last_heartbeat.is_some()
                {
                    flipped.push((name.clone(), ready));
                }
            }
        }
        for (name, ready) in flipped {
            self.node_readiness_event(&name, ready, now)?;
        }
        Ok(())
    }

    fn node_readiness_event(
        &self,
        name: &str,
        ready: bool,
        now: SystemTime,
    ) -> Result<(), ApiError> {
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
        )?;
        if self.changes.receiver_count() > 0 {
            if let Ok(node) = self.get_node(name) {
                self.publish(Kind::Node, ChangeType::Modified, name, &node);
            }
        }
        Ok(())
    }

    // ---- Assignments --------------------------------------------------------

    /// What `node` should run now.
    pub fn assignment(&self, node: &str) -> Result<NodeAssignment, ApiError> {
        let bytes = self
            .store
            .get(Table::Nodes, node.as_bytes())?
            .ok_or_else(|| ApiError::NotFound {
                kind: "Node",
                name: node.to_string(),
            })?;
        let stored: StoredNode = decode(Table::Nodes, node.as_bytes(), &bytes)?;
        Ok(self.assignment_for(&stored.object))
    }

    fn assignment_for(&self, node: &NodeObject) -> NodeAssignment {
        let cache = self.cache();
        let name = &node.metadata.name;
        let assigned = cache.assignments.get(name);
        let mut states = Vec::new();
        for state in cache.states.values() {
            if !state.spec.selector.matches(&node.metadata.labels) {
                continue;
            }
            let state_name = &state.metadata.name;
            let revision = assigned
                .and_then(|a| a.get(state_name).copied())
                .unwrap_or(state.status.last_good_revision);
            if revision == 0 {
                continue; // nothing good to run yet; the rollout controller assigns the first revision
            }
            let Some(revision_object) = cache.revisions.get(&(state_name.clone(), revision)) else {
                continue;
            };
            states.push(AssignedState {
                name: state_name.clone(),
                revision,
                commit: revision_object.source.commit.clone(),
                spec: revision_object.spec.clone(),
            });
        }
        // A component pinned by two DesiredStates is applied by neither.
        let mut owners: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for state in &states {
            for component in &state.spec.components {
                owners
                    .entry(component.name.as_str())
                    .or_default()
                    .push(state.name.clone());
            }
        }
        let conflicts: Vec<ComponentConflict> = owners
            .into_iter()
            .filter(|(_, owners)| owners.len() > 1)
            .map(|(component, desired_states)| ComponentConflict {
                component: component.to_string(),
                desired_states,
            })
            .collect();
        if !conflicts.is_empty() {
            for state in &mut states {
                state.spec.components.retain(|c| {
                    !conflicts
                        .iter()
                        .any(|conflict| conflict.component == c.name)
                });
            }
        }
        let mut assignment = NodeAssignment {
            node: name.clone(),
            generation: 0,
            states,
            conflicts,
        };
        let digest =
            Sha256::digest(serde_json::to_vec(&assignment).expect("assignments serialize"));
        // 53 bits, so that JavaScript clients read the number exactly.
        assignment.generation = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) >> 11;
        assignment
    }

    // ---- Events -------------------------------------------------------------

    /// Sequence numbers for events, taken before a transaction: sled cannot hand out
    /// ids inside one (it would wait for the transaction's own lock).
    fn seqs(&self, count: usize) -> Result<Vec<u64>, StoreError> {
        (0..count).map(|_| self.store.next_version()).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn new_event(
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

    /// Records one event on its own.
    #[allow(clippy::too_many_arguments)]
    pub fn record_event(
        &self,
        time: SystemTime,
        kind: EventType,
        reason: &str,
        object: &str,
        message: String,
        node: Option<String>,
        desired_state: Option<String>,
        revision: Option<u64>,
    ) -> Result<Event, ApiError> {
        let seq = self.store.next_version()?;
        let event = self.new_event(
            seq,
            time,
            kind,
            reason,
            object,
            message,
            node,
            desired_state,
            revision,
        )?;
        transact(self.store.as_ref(), |txn| {
            txn.put(Table::Events, &event.seq.to_be_bytes(), encode(&event))
        })?;
        self.after_events(std::slice::from_ref(&event))?;
        Ok(event)
    }

    fn after_events(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        for event in events {
            self.publish(
                Kind::Event,
                ChangeType::Added,
                &event.seq.to_string(),
                event,
            );
        }
        let count = self.store.len(Table::Events)?;
        if count > self.config.event_retention {
            let excess = count - self.config.event_retention;
            let oldest: Vec<Vec<u8>> = self
                .store
                .scan_from(Table::Events, b"", excess)?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            self.store.remove_keys(Table::Events, &oldest)?;
        }
        Ok(())
    }

    /// Events after sequence number `after`, oldest first, at most `limit`, optionally about one object.
    pub fn events(
        &self,
        after: u64,
        limit: usize,
        about: Option<&str>,
    ) -> Result<Vec<Event>, ApiError> {
        let start = (after.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        // Filtering happens after the scan, so read in pages until enough match.
        let mut cursor = start.to_vec();
        loop {
            let page = self.store.scan_from(Table::Events, &cursor, 1000)?;
            let done = page.len() < 1000;
            for (key, value) in &page {
                let event: Event = decode(Table::Events, key, value)?;
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

    // ---- Rollouts (stored by the rollout controller) ------------------------

    /// One rollout.
    pub fn get_rollout(&self, name: &str) -> Result<RolloutObject, ApiError> {
        let bytes = self
            .store
            .get(Table::Rollouts, name.as_bytes())?
            .ok_or_else(|| ApiError::NotFound {
                kind: "Rollout",
                name: name.to_string(),
            })?;
        Ok(decode(Table::Rollouts, name.as_bytes(), &bytes)?)
    }

    /// Every rollout, by name.
    pub fn list_rollouts(&self) -> Result<Vec<RolloutObject>, ApiError> {
        self.store
            .scan_prefix(Table::Rollouts, b"")?
            .into_iter()
            .map(|(k, v)| decode(Table::Rollouts, &k, &v).map_err(ApiError::from))
            .collect()
    }

    // ---- Summary ------------------------------------------------------------

    /// The fleet at a glance.
    pub fn summary(&self) -> Result<Summary, ApiError> {
        let nodes = self.list_nodes()?;
        let mut summary = Summary {
            nodes: nodes.len() as u64,
            ..Summary::default()
        };
        for node in &nodes {
            for condition in &node.status.conditions {
                let key = match (condition.kind.as_str(), condition.status) {
                    ("Ready", ConditionStatus::True) => "Ready",
                    ("Ready", _) => "NotReady",
                    (other, ConditionStatus::True) => other,
                    _ => continue,
                };
                *summary.by_condition.entry(key.to_string()).or_default() += 1;
            }
            let site = node
                .metadata
                .labels
                .get("site")
                .cloned()
                .unwrap_or_else(|| "(none)".into());
            *summary.by_site.entry(site).or_default() += 1;
            for component in &node.status.report.components {
                let version = component
                    .version
                    .clone()
                    .unwrap_or_else(|| "(absent)".into());
                *summary
                    .by_component_version
                    .entry(component.name.clone())
                    .or_default()
                    .entry(version)
                    .or_default() += 1;
            }
        }
        summary.desired_states = self.cache().states.len() as u64;
        for rollout in self.list_rollouts()? {
            *summary
                .rollouts_by_phase
                .entry(rollout.status.phase.as_str().to_string())
                .or_default() += 1;
        }
        Ok(summary)
    }
}

fn format_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "(none)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn condition(kind: &str, holds: bool, reason: &str, message: String) -> Condition {
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
