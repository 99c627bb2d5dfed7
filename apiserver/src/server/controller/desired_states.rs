//! DesiredStates and their revisions: apply (with dry run and resourceVersion checks),
//! delete, reads.

use super::*;

/// One manifest of an apply, with where it came from.
#[derive(Debug, Clone)]
pub struct ApplyInput {
    /// The validated manifest.
    pub object: DesiredState,
    /// Provenance recorded on a new revision.
    pub source: RevisionSource,
}

/// Why an apply transaction stopped: a real error, or a dry run that must not commit.
pub(super) enum ApplyStop {
    Error(Error),
    DryRun(Vec<ApplyResult>),
}

impl From<StoreError> for ApplyStop {
    fn from(e: StoreError) -> Self {
        ApplyStop::Error(Error::Store(e))
    }
}

impl From<Error> for ApplyStop {
    fn from(e: Error) -> Self {
        ApplyStop::Error(e)
    }
}

pub(super) fn version_text(version: &Option<String>) -> &str {
    version.as_deref().unwrap_or("(no version)")
}

pub(super) fn artifact_name(artifact: &Option<manifests::Artifact>) -> String {
    artifact
        .as_ref()
        .map(|a| a.url.rsplit('/').next().unwrap_or(&a.url).to_string())
        .unwrap_or_default()
}

/// A stored DesiredState with the number of nodes its selector picks among `nodes`.
pub(super) fn with_selected(
    object: &DesiredStateObject,
    nodes: &[Arc<NodeFacts>],
) -> DesiredStateObject {
    let mut object = object.clone();
    object.status.selected_nodes = nodes
        .iter()
        .filter(|n| object.spec.selector.matches(n.labels()))
        .count() as u64;
    object
}

impl Controller {
    /// Stores every manifest in one transaction. With `dry_run`, reports what would happen and stores nothing.
    pub async fn apply(
        &self,
        inputs: Vec<ApplyInput>,
        dry_run: bool,
    ) -> Result<ApplyResponse, Error> {
        for input in &inputs {
            self.check_artifact_reuse(&input.object)?;
        }
        let now = SystemTime::now();
        let outcome = self.transact(|txn| -> Result<_, ApplyStop> {
            let version = txn.revision().to_string();
            // An Applied event per manifest, and a Superseded one where a rollout is replaced.
            let seqs: Vec<u64> = (0..inputs.len() * 2).map(|_| txn.next_id()).collect();
            let mut results = Vec::new();
            let mut written: Vec<(ChangeType, DesiredStateObject, Option<Revision>)> = Vec::new();
            for input in &inputs {
                let manifest = &input.object;
                let name = &manifest.metadata.name;
                let existing: Option<DesiredStateObject> =
                    DESIRED_STATES.get(txn, name.as_bytes())?;
                if let Some(expected) = &manifest.metadata.resource_version {
                    let actual = existing
                        .as_ref()
                        .map(|e| e.metadata.resource_version.as_str());
                    if actual != Some(expected.as_str()) {
                        return Err(ApplyStop::Error(Error::Conflict {
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
                                // Nothing is good yet: the rollout controller assigns revision 1 wave by wave.
                                last_good_revision: 0,
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
                DESIRED_STATES.put(txn, name.as_bytes(), &object)?;
                if let Some(revision) = &revision {
                    REVISIONS.put(txn, &store::revision_key(name, revision.revision), revision)?;
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
            for ((change, object, revision), seq) in written.iter().zip(seqs.iter().copied()) {
                let name = &object.metadata.name;
                let message = match (change, revision) {
                    (ChangeType::Added, _) => {
                        format!("created at revision {}", object.status.revision)
                    }
                    (_, Some(revision)) => format!("spec changed: revision {}", revision.revision),
                    _ => "labels or annotations changed".to_string(),
                };
                let event = self.new_event(
                    seq,
                    now,
                    EventType::Normal,
                    "Applied",
                    &format!("desiredstate/{name}"),
                    message,
                    None,
                    Some(name.clone()),
                    revision.as_ref().map(|r| r.revision),
                )?;
                EVENTS.put(txn, &event.seq.to_be_bytes(), &event)?;
                events.push(event);
            }
            let mut rollouts = Vec::new();
            let mut seqs = seqs[inputs.len()..].iter().copied();
            for (_, object, revision) in &written {
                let seq = seqs.next().expect("one per input");
                let Some(revision) = revision else { continue };
                // The rollout exists from the moment its revision does, so `rollout status
                // --revision N`, `apply --wait` and `rollout pause` find it at once.
                let name = &object.metadata.name;
                let previous: Option<RolloutObject> =
                    ROLLOUTS.get(txn, name.as_bytes())?;
                // A pause holds across a new revision, as `kubectl rollout pause` does: the
                // operator stopped the group for a reason.
                let paused = previous
                    .as_ref()
                    .is_some_and(|r| r.status.phase == RolloutPhase::Paused);
                if let Some(old) = previous.filter(|r| !r.status.phase.is_terminal()) {
                    let event = self.new_event(
                        seq,
                        now,
                        EventType::Normal,
                        "Superseded",
                        &format!("rollout/{name}"),
                        format!(
                            "the rollout of revision {} ({}) is superseded by revision {}",
                            old.spec.revision,
                            old.status.phase.as_str(),
                            revision.revision
                        ),
                        None,
                        Some(name.clone()),
                        Some(old.spec.revision),
                    )?;
                    EVENTS.put(txn, &event.seq.to_be_bytes(), &event)?;
                    events.push(event);
                }
                let mut rollout = crate::rollout::pending(object, now);
                rollout.metadata.resource_version = version.clone();
                if paused {
                    rollout.status.phase = RolloutPhase::Paused;
                    rollout.status.message = format!(
                        "paused, as the rollout it replaced was: `shoal rollout resume {name}` starts revision {}",
                        revision.revision
                    );
                }
                ROLLOUTS.put(txn, name.as_bytes(), &rollout)?;
                rollouts.push(rollout);
            }
            Ok((results, written, events, rollouts))
        })
        .await;
        let ((results, written, events, _rollouts), revision) = match outcome {
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
            self.caught_up(revision).await;
            self.after_events(&events).await?;
        }
        Ok(ApplyResponse { dry_run, results })
    }

    /// Refuses a component that pins an artifact an earlier revision pinned under another
    /// version: the node's cache is content-addressed, so it would serve the old file under
    /// the new version (a forgotten sha256, which no canary can catch).
    pub(super) fn check_artifact_reuse(&self, manifest: &DesiredState) -> Result<(), Error> {
        let name = &manifest.metadata.name;
        let pinned: Vec<(usize, &manifests::Component, &str)> = manifest
            .spec
            .components
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.artifact.as_ref().map(|a| (i, c, a.sha256.as_str())))
            .collect();
        if pinned.is_empty() {
            return Ok(());
        }
        for (_, revision) in REVISIONS.read_prefix(&self.store, &store::revision_prefix(name)) {
            let revision = revision?;
            for earlier in &revision.spec.components {
                let Some(artifact) = &earlier.artifact else {
                    continue;
                };
                for (index, component, sha256) in &pinned {
                    if earlier.name == component.name
                        && artifact.sha256.eq_ignore_ascii_case(sha256)
                        && earlier.version != component.version
                    {
                        return Err(Error::invalid_field(
                            &format!("spec.components[{index}].artifact.sha256"),
                            format!(
                                "`{}` {} pins sha256 {sha256}, which revision {} of DesiredState `{name}` pinned for version {}",
                                component.name, version_text(&component.version), revision.revision, version_text(&earlier.version)
                            ),
                            format!(
                                "did you forget to update sha256? Nodes that have {} would run it as {}: put the sha256 of {} there",
                                version_text(&earlier.version), version_text(&component.version), artifact_name(&component.artifact)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes a DesiredState, its revisions and assignments. Nodes stop managing its components.
    pub async fn delete_desired_state(
        &self,
        name: &str,
        expected_version: Option<&str>,
    ) -> Result<DesiredStateObject, Error> {
        let assignments = self.assignment_keys(name);
        let now = SystemTime::now();
        let ((object, event), _) = self.transact(|txn| -> Result<_, Error> {
            let seq = txn.next_id();
            // Keys only: a revision that no longer decodes is deleted with the rest.
            let revisions = REVISIONS.keys(txn, &store::revision_prefix(name))?;
            let object: DesiredStateObject = DESIRED_STATES.get(txn, name.as_bytes())?
                .ok_or_else(|| Error::NotFound {
                    kind: "DesiredState",
                    name: name.to_string(),
                })?;
            if let Some(expected) = expected_version {
                if object.metadata.resource_version != expected {
                    return Err(Error::Conflict {
                        message: format!(
                            "DesiredState `{name}` changed since it was read: resourceVersion is {}, not {expected}",
                            object.metadata.resource_version
                        ),
                        hint: "read it again and retry, or delete without a resourceVersion".into(),
                    });
                }
            }
            DESIRED_STATES.delete(txn, name.as_bytes())?;
            for key in &revisions {
                REVISIONS.delete(txn, key)?;
            }
            for key in &assignments {
                ASSIGNMENTS.delete(txn, key)?;
            }
            ROLLOUTS.delete(txn, name.as_bytes())?;
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
            EVENTS.put(txn, &event.seq.to_be_bytes(), &event)?;
            Ok((object, event))
        })
        .await?;
        self.after_events(&[event]).await?;
        Ok(object)
    }

    /// One DesiredState, with the number of nodes it selects now.
    pub fn get_desired_state(&self, name: &str) -> Result<DesiredStateObject, Error> {
        let cache = self.cache();
        let object = cache.states.get(name).ok_or_else(|| Error::NotFound {
            kind: "DesiredState",
            name: name.to_string(),
        })?;
        Ok(with_selected(object, &self.node_facts()))
    }

    /// Every DesiredState, by name.
    pub fn list_desired_states(&self) -> Result<Vec<DesiredStateObject>, Error> {
        self.desired_states_after(None, usize::MAX)
    }

    /// Up to `limit` DesiredStates named after `after`, by name: a page of the list.
    pub fn desired_states_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DesiredStateObject>, Error> {
        let cache = self.cache();
        let page: Vec<_> = match after {
            Some(after) => cache
                .states
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .take(limit)
                .collect(),
            None => cache.states.iter().take(limit).collect(),
        };
        if page.is_empty() {
            return Ok(vec![]);
        }
        let nodes = self.node_facts();
        Ok(page
            .into_iter()
            .map(|(_, object)| with_selected(object, &nodes))
            .collect())
    }

    /// Every revision of a DesiredState, oldest first.
    pub fn revisions(&self, name: &str) -> Result<Vec<Revision>, Error> {
        if !self.cache().states.contains_key(name) {
            return Err(Error::NotFound {
                kind: "DesiredState",
                name: name.to_string(),
            });
        }
        REVISIONS
            .read_prefix(&self.store, &store::revision_prefix(name))
            .into_iter()
            .map(|(_, revision)| revision.map_err(Error::from))
            .collect()
    }
}
