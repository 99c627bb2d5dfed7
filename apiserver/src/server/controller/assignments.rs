//! What each node is told to run: the revisions the rollout controller assigned it, or the
//! newest, resolved against conflicts between DesiredStates.

use super::*;

/// What of a node its assignment depends on besides the revisions assigned to it. Two are
/// equal when their keys are (the key is both, as JSON).
pub(super) struct AssignmentInputs {
    pub(super) labels: BTreeMap<String, String>,
    pub(super) cordoned: Option<Cordon>,
    /// Both as JSON: the memo's key.
    key: String,
}

impl PartialEq for AssignmentInputs {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl AssignmentInputs {
    pub(super) fn of(node: &NodeObject) -> Self {
        AssignmentInputs {
            labels: node.metadata.labels.clone(),
            cordoned: node.status.cordoned.clone(),
            key: serde_json::to_string(&(&node.metadata.labels, &node.status.cordoned))
                .expect("nodes serialize"),
        }
    }
}

/// One computed assignment (its `node` empty) and its JSON after the name.
pub(super) struct SharedAssignment {
    pub(super) assignment: NodeAssignment,
    tail: Vec<u8>,
}

impl Controller {
    /// The store keys of every node's assignment to DesiredState `name`, as the cache knows
    /// them (what a delete or a rollout write replaces).
    pub(super) fn assignment_keys(&self, name: &str) -> Vec<Vec<u8>> {
        self.cache()
            .assignments
            .iter()
            .filter(|(_, per_node)| per_node.contains_key(name))
            .map(|(node, _)| store::assignment_key(node, name))
            .collect()
    }

    /// What `node` should run now.
    pub fn assignment(&self, node: &str) -> Result<NodeAssignment, Error> {
        let inputs = self.assignment_inputs(node)?;
        let mut assignment = self.shared_assignment(&inputs, node).assignment.clone();
        assignment.node = node.to_string();
        Ok(assignment)
    }

    /// What `node` should run now, as its generation and the JSON of the answer: nodes alike
    /// share one serialization, and only their names are written per node.
    pub fn assignment_body(&self, node: &str) -> Result<(u64, Vec<u8>), Error> {
        let inputs = self.assignment_inputs(node)?;
        let shared = self.shared_assignment(&inputs, node);
        let name = serde_json::to_string(node).expect("strings serialize");
        let mut body = Vec::with_capacity(name.len() + shared.tail.len() + 10);
        body.extend_from_slice(b"{\"node\":");
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&shared.tail);
        Ok((shared.assignment.generation, body))
    }

    /// What of `node` its assignment depends on, from what the feed keeps (no decoding).
    fn assignment_inputs(&self, node: &str) -> Result<Arc<AssignmentInputs>, Error> {
        let known = self.facts_of(node).map(|facts| facts.inputs.clone());
        match known {
            Some(inputs) => Ok(inputs),
            None => Ok(Arc::new(AssignmentInputs::of(
                &self.stored_node(node)?.object,
            ))),
        }
    }

    pub(super) fn assignment_for(&self, node: &NodeObject) -> NodeAssignment {
        let name = &node.metadata.name;
        let mut assignment = self
            .shared_assignment(&AssignmentInputs::of(node), name)
            .assignment
            .clone();
        assignment.node = name.clone();
        assignment
    }

    /// The assignment of nodes with `inputs` and `node`'s assigned revisions, computed once
    /// per distinct (labels, cordon, assigned revisions) for the current cache.
    pub(super) fn shared_assignment(
        &self,
        inputs: &AssignmentInputs,
        node: &str,
    ) -> Arc<SharedAssignment> {
        let cache = self.cache();
        let assigned = cache.assignments.get(node);
        let key = format!(
            "{}|{}",
            inputs.key,
            serde_json::to_string(&assigned).expect("revisions serialize")
        );
        {
            let mut memo = self
                .assignments_memo
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if memo.revision != cache.revision {
                memo.revision = cache.revision;
                memo.by_inputs.clear();
            }
            if let Some(shared) = memo.by_inputs.get(&key) {
                return shared.clone();
            }
        }
        let assignment = self.compute_assignment(&cache, inputs, assigned);
        let full = serde_json::to_vec(&assignment).expect("assignments serialize");
        // `{"node":"",` is where each node's name goes.
        let tail = full[br#"{"node":"""#.len()..].to_vec();
        let shared = Arc::new(SharedAssignment { assignment, tail });
        let mut memo = self
            .assignments_memo
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if memo.revision == cache.revision {
            memo.by_inputs.insert(key, shared.clone());
        }
        shared
    }

    /// The assignment of a node with these labels, cordon and assigned revisions, without
    /// its name (the generation does not depend on it, so nodes alike share one).
    fn compute_assignment(
        &self,
        cache: &Cache,
        node: &AssignmentInputs,
        assigned: Option<&BTreeMap<String, u64>>,
    ) -> NodeAssignment {
        let mut states = Vec::new();
        for state in cache.states.values() {
            if !state.spec.selector.matches(&node.labels) {
                continue;
            }
            let state_name = &state.metadata.name;
            let revision = match &node.cordoned {
                // Cordoned: what it had, and nothing new.
                Some(cordon) => cordon.revisions.get(state_name).copied().unwrap_or(0),
                None => assigned
                    .and_then(|a| a.get(state_name).copied())
                    .unwrap_or(state.status.last_good_revision),
            };
            if revision == 0 {
                continue; // nothing good to run yet; the rollout controller assigns the first revision
            }
            let revision_object = match cache.revisions.get(&(state_name.clone(), revision)) {
                Some(cached) => cached.clone(),
                // Only a cordoned node keeps a revision the cache may not hold.
                // An unreadable one is skipped like a missing one: the node keeps what it runs.
                None => match self.stored_revision(state_name, revision) {
                    Ok(Some(stored)) => Arc::new(stored),
                    _ => continue,
                },
            };
            states.push(AssignedState {
                name: state_name.clone(),
                revision,
                commit: revision_object.source.commit.clone(),
                spec: revision_object.spec.clone(),
            });
        }
        // A component pinned by two DesiredStates that select this node is applied by neither —
        // judged on their newest specs too, so a conflict shows before any rollout reaches the node.
        let mut owners: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for state in cache
            .states
            .values()
            .filter(|s| s.spec.selector.matches(&node.labels))
        {
            let assigned = states.iter().find(|a| a.name == state.metadata.name);
            let names: std::collections::BTreeSet<&str> = state
                .spec
                .components
                .iter()
                .chain(assigned.iter().flat_map(|a| a.spec.components.iter()))
                .map(|c| c.name.as_str())
                .collect();
            for component in names {
                owners
                    .entry(component)
                    .or_default()
                    .push(state.metadata.name.clone());
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
            node: String::new(),
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

    /// One revision as stored, if it exists.
    pub(super) fn stored_revision(
        &self,
        name: &str,
        revision: u64,
    ) -> Result<Option<Revision>, StoreError> {
        let key = store::revision_key(name, revision);
        REVISIONS.read(&self.store, &key)
    }
}
