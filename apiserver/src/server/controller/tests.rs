use super::*;

async fn controller_with(config: ControllerConfig) -> Arc<Controller> {
    Controller::new(Store::memory().await, config).expect("controller")
}

async fn controller() -> Arc<Controller> {
    controller_with(ControllerConfig::default()).await
}

/// A DesiredState selecting `role=<role>` that pins each `(component, version)` as a package.
fn manifest(name: &str, role: &str, components: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: shoal/v1\nkind: DesiredState\nmetadata:\n  name: {name}\nspec:\n  selector:\n    matchLabels: {{role: {role}}}\n  components:\n"
    );
    for (component, version) in components {
        text.push_str(&format!(
            "    - {{name: {component}, kind: package, version: \"{version}\"}}\n"
        ));
    }
    text
}

fn inputs(yaml: &str) -> Vec<ApplyInput> {
    let loaded = manifests::parse_str("test.yaml", yaml);
    assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
    loaded
        .objects
        .into_iter()
        .map(|parsed| ApplyInput {
            object: parsed.object,
            source: RevisionSource {
                kind: "apply".into(),
                actor: Some("unit".into()),
                ..RevisionSource::default()
            },
        })
        .collect()
}

fn with_resource_version(yaml: &str, version: &str) -> String {
    yaml.replacen(
        "metadata:\n",
        &format!("metadata:\n  resourceVersion: \"{version}\"\n"),
        1,
    )
}

async fn apply(c: &Controller, yaml: &str) -> ApplyResult {
    let response = c.apply(inputs(yaml), false).await.expect("apply");
    assert!(!response.dry_run);
    assert_eq!(response.results.len(), 1);
    response.results[0].clone()
}

async fn register(c: &Controller, name: &str, role: &str) -> RegisterResponse {
    c.register(
        RegisterRequest {
            name: name.into(),
            labels: BTreeMap::from([("role".to_string(), role.to_string())]),
        },
        "join",
    )
    .await
    .expect("register")
}

fn reasons(c: &Controller) -> Vec<String> {
    c.events(0, 10_000, None)
        .unwrap()
        .into_iter()
        .map(|e| e.reason)
        .collect()
}

#[tokio::test]
async fn apply_numbers_revisions_and_reports_what_happened() {
    let c = controller().await;
    let v1 = manifest("web", "web", &[("nginx", "1.0-1")]);
    let created = apply(&c, &v1).await;
    assert_eq!(created.action, ApplyAction::Created);
    assert_eq!(created.revision, 1);

    let again = apply(&c, &v1).await;
    assert_eq!(again.action, ApplyAction::Unchanged);
    assert_eq!(again.revision, 1);
    assert_eq!(again.resource_version, created.resource_version);

    let v2 = manifest("web", "web", &[("nginx", "1.1-1")]);
    let configured = apply(&c, &v2).await;
    assert_eq!(configured.action, ApplyAction::Configured);
    assert_eq!(configured.revision, 2);
    assert_ne!(configured.resource_version, created.resource_version);

    // Labels alone: a new resourceVersion, but no new revision.
    let labelled = v2.replacen("metadata:\n", "metadata:\n  labels: {team: a}\n", 1);
    let relabelled = apply(&c, &labelled).await;
    assert_eq!(relabelled.action, ApplyAction::Configured);
    assert_eq!(relabelled.revision, 2);
    assert_ne!(relabelled.resource_version, configured.resource_version);

    let object = c.get_desired_state("web").unwrap();
    assert_eq!(object.metadata.generation, 2);
    assert_eq!(object.status.revision, 2);
    assert_eq!(
        object.metadata.resource_version,
        relabelled.resource_version
    );
    assert_eq!(
        object.metadata.labels.get("team").map(String::as_str),
        Some("a")
    );

    let revisions = c.revisions("web").unwrap();
    assert_eq!(
        revisions.iter().map(|r| r.revision).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        revisions[0].spec.components[0].version.as_deref(),
        Some("1.0-1")
    );
    assert_eq!(
        revisions[1].spec.components[0].version.as_deref(),
        Some("1.1-1")
    );
    assert_eq!(revisions[1].source.actor.as_deref(), Some("unit"));
    // One Applied event per stored change; the unchanged apply records nothing; revision 2
    // replaced revision 1's rollout before it was planned.
    assert_eq!(
        reasons(&c),
        vec!["Applied", "Applied", "Superseded", "Applied"]
    );

    // Deleting removes the revisions too; re-creating starts again at 1.
    c.delete_desired_state("web", None).await.unwrap();
    assert!(matches!(c.revisions("web"), Err(Error::NotFound { .. })));
    assert!(c
        .store()
        .scan_prefix(Table::Revisions, &store::revision_prefix("web"))
        .is_empty());
    assert_eq!(apply(&c, &v2).await.revision, 1);
}

#[tokio::test]
async fn stale_resource_versions_conflict_and_change_nothing() {
    let c = controller().await;
    let v1 = manifest("web", "web", &[("nginx", "1.0-1")]);
    let first = apply(&c, &v1).await;
    let v2 = manifest("web", "web", &[("nginx", "1.1-1")]);
    let second = apply(&c, &with_resource_version(&v2, &first.resource_version)).await;
    assert_eq!(second.revision, 2);

    // first.resource_version is stale now.
    let v3 = manifest("web", "web", &[("nginx", "1.2-1")]);
    let stale = c
        .apply(
            inputs(&with_resource_version(&v3, &first.resource_version)),
            false,
        )
        .await;
    assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
    assert_eq!(c.get_desired_state("web").unwrap().status.revision, 2);

    // A resourceVersion for an object that does not exist is a conflict too, not a create.
    let ghost = manifest("ghost", "web", &[("tool", "1.0-1")]);
    let result = c
        .apply(inputs(&with_resource_version(&ghost, "12345")), false)
        .await;
    assert!(matches!(result, Err(Error::Conflict { .. })), "{result:?}");
    assert!(c.get_desired_state("ghost").is_err());

    // All or nothing: a new object in the same apply as a stale one is not stored.
    let bundle = format!(
        "{}---\n{}",
        manifest("fresh", "web", &[("tool2", "1.0-1")]),
        with_resource_version(&v3, &first.resource_version)
    );
    let result = c.apply(inputs(&bundle), false).await;
    assert!(matches!(result, Err(Error::Conflict { .. })), "{result:?}");
    assert!(c.get_desired_state("fresh").is_err());
    assert_eq!(c.store().len(Table::DesiredStates), 1);
    assert_eq!(c.store().len(Table::Revisions), 2);

    // Delete checks the version as well.
    let stale = c
        .delete_desired_state("web", Some(&first.resource_version))
        .await;
    assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
    assert!(c.get_desired_state("web").is_ok());
    c.delete_desired_state("web", Some(&second.resource_version))
        .await
        .unwrap();
    assert!(c.get_desired_state("web").is_err());
    assert!(matches!(
        c.delete_desired_state("web", None).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        reasons(&c),
        vec!["Applied", "Applied", "Superseded", "Deleted"]
    );
}

#[tokio::test]
async fn dry_run_reports_and_stores_nothing() {
    let c = controller().await;
    let v1 = manifest("web", "web", &[("nginx", "1.0-1")]);
    let dry = c.apply(inputs(&v1), true).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.results[0].action, ApplyAction::Created);
    for table in Table::ALL {
        assert_eq!(c.store().len(table), 0, "{table:?}");
    }
    assert!(c.get_desired_state("web").is_err());

    apply(&c, &v1).await;
    let v2 = manifest("web", "web", &[("nginx", "1.1-1")]);
    let dry = c.apply(inputs(&v2), true).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.results[0].action, ApplyAction::Configured);
    assert_eq!(dry.results[0].revision, 2);
    let stored = c.get_desired_state("web").unwrap();
    assert_eq!(stored.status.revision, 1);
    assert_eq!(stored.spec.components[0].version.as_deref(), Some("1.0-1"));
    assert_eq!(c.revisions("web").unwrap().len(), 1);
    assert_eq!(reasons(&c), vec!["Applied"]);

    // A dry run still checks resourceVersions.
    let read = stored.metadata.resource_version.parse::<u64>().unwrap();
    let stale = c
        .apply(
            inputs(&with_resource_version(&v2, &(read + 1).to_string())),
            true,
        )
        .await;
    assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
}

#[tokio::test]
async fn a_component_pinned_twice_is_a_conflict_applied_by_neither() {
    let c = controller().await;
    let both = format!(
        "{}---\n{}---\n{}",
        manifest("a", "web", &[("shared", "1.0-1"), ("only-a", "1.0-1")]),
        manifest("b", "web", &[("only-b", "1.0-1"), ("shared", "2.0-1")]),
        manifest("c", "db", &[("shared", "3.0-1")]),
    );
    c.apply(inputs(&both), false).await.unwrap();
    heard(&c, "web-1", "web").await;
    heard(&c, "db-1", "db").await;
    // The rollout controller assigns the first wave (here: each group's only node).
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();

    let web = c.assignment("web-1").unwrap();
    assert_eq!(
        web.conflicts,
        vec![ComponentConflict {
            component: "shared".into(),
            desired_states: vec!["a".into(), "b".into()],
        }]
    );
    let names = |state: &AssignedState| {
        state
            .spec
            .components
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(web.states.len(), 2);
    assert_eq!(names(&web.states[0]), vec!["only-a"]);
    assert_eq!(names(&web.states[1]), vec!["only-b"]);
    let conflict = c
        .get_node("web-1")
        .unwrap()
        .status
        .conditions
        .into_iter()
        .find(|c| c.kind == "Conflict")
        .unwrap();
    assert_eq!(conflict.status, ConditionStatus::True);
    assert!(conflict.message.contains("shared"), "{}", conflict.message);

    // The other group is not affected: it gets `shared` from `c`.
    let db = c.assignment("db-1").unwrap();
    assert!(db.conflicts.is_empty());
    assert_eq!(db.states.len(), 1);
    assert_eq!(names(&db.states[0]), vec!["shared"]);

    // Removing one side ends the conflict and changes the generation.
    let before = web.generation;
    c.delete_desired_state("b", None).await.unwrap();
    let web = c.assignment("web-1").unwrap();
    assert!(web.conflicts.is_empty());
    assert_eq!(names(&web.states[0]), vec!["shared", "only-a"]);
    assert_ne!(web.generation, before);
    // The generation is a pure function of the content.
    assert_eq!(c.assignment("web-1").unwrap().generation, web.generation);
}

fn node(heartbeat: bool) -> NodeObject {
    NodeObject {
        metadata: ObjectInfo {
            name: "n".into(),
            ..ObjectInfo::default()
        },
        status: NodeStatus {
            last_heartbeat: heartbeat.then(SystemTime::now),
            ..NodeStatus::default()
        },
    }
}

fn assignment_of(states: &[(&str, u64)], conflicts: Vec<ComponentConflict>) -> NodeAssignment {
    let spec: manifests::DesiredStateSpec = serde_yaml::from_str("components: []").unwrap();
    NodeAssignment {
        node: "n".into(),
        generation: 77,
        states: states
            .iter()
            .map(|(name, revision)| AssignedState {
                name: name.to_string(),
                revision: *revision,
                commit: None,
                spec: spec.clone(),
            })
            .collect(),
        conflicts,
    }
}

fn status_of(conditions: &[Condition], kind: &str) -> (ConditionStatus, String) {
    let c = conditions
        .iter()
        .find(|c| c.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} in {conditions:?}"));
    (c.status, c.reason.clone())
}

#[tokio::test]
async fn conditions_follow_the_report_the_assignment_and_readiness() {
    use ConditionStatus::{False, True, Unknown};
    let empty = assignment_of(&[], vec![]);

    // Never reported: everything but Conflict is unknown.
    let fresh = conditions(&node(false), &empty, false);
    let kinds: Vec<&str> = fresh.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(
        kinds,
        vec!["Ready", "Converged", "Healthy", "DiskPressure", "Conflict"]
    );
    assert_eq!(status_of(&fresh, "Ready").0, Unknown);
    assert_eq!(status_of(&fresh, "Converged").0, Unknown);
    assert_eq!(status_of(&fresh, "Healthy").0, Unknown);
    assert_eq!(status_of(&fresh, "Conflict").0, False);

    // Reported, at the assignment, healthy.
    let assignment = assignment_of(&[("web", 2)], vec![]);
    let mut good = node(true);
    good.status.report.observed_generation = assignment.generation;
    good.status.report.applied = vec![AppliedState {
        desired_state: "web".into(),
        revision: 2,
        phase: ComponentPhase::Healthy,
        commit: None,
        healthy_since: None,
    }];
    let all = conditions(&good, &assignment, true);
    assert_eq!(status_of(&all, "Ready"), (True, "Heartbeat".into()));
    assert_eq!(
        status_of(&all, "Converged"),
        (True, "AtDesiredState".into())
    );
    assert_eq!(status_of(&all, "Healthy"), (True, "ProbesPassing".into()));
    assert_eq!(status_of(&all, "DiskPressure").0, False);
    let mut full = good.clone();
    full.status.report.disk_pressure = Some("12 MiB free under /var/lib/shoal".into());
    let pressed = conditions(&full, &assignment, true);
    assert_eq!(
        status_of(&pressed, "DiskPressure"),
        (True, "LowDiskSpace".into())
    );
    assert!(pressed
        .iter()
        .any(|c| c.message == "12 MiB free under /var/lib/shoal"));
    assert_eq!(status_of(&all, "Conflict").0, False);

    // Not ready.
    let late = conditions(&good, &assignment, false);
    assert_eq!(status_of(&late, "Ready"), (False, "HeartbeatMissed".into()));

    // Healthy at an older revision: progressing.
    let newer = assignment_of(&[("web", 3)], vec![]);
    let behind = conditions(&good, &newer, true);
    let (status, reason) = status_of(&behind, "Converged");
    assert_eq!((status, reason.as_str()), (False, "Progressing"));

    // Right revisions, but the node has not acknowledged the newest generation.
    let mut stale = good.clone();
    stale.status.report.observed_generation = 1;
    assert_eq!(
        status_of(&conditions(&stale, &assignment, true), "Converged"),
        (False, "Pending".into())
    );

    // Not yet healthy at the revision.
    let mut verifying = good.clone();
    verifying.status.report.applied[0].phase = ComponentPhase::Verifying;
    assert_eq!(
        status_of(&conditions(&verifying, &assignment, true), "Converged"),
        (False, "Progressing".into())
    );

    // A failing probe or a reverted component is unhealthy.
    let mut probing = good.clone();
    probing.status.report.probes = vec![ProbeStatus {
        name: "http".into(),
        desired_state: "web".into(),
        passing: false,
        baseline_passing: Some(true),
        consecutive_failures: 3,
        output: String::new(),
    }];
    assert_eq!(
        status_of(&conditions(&probing, &assignment, true), "Healthy"),
        (False, "Unhealthy".into())
    );
    let mut reverted = good.clone();
    reverted.status.report.components = vec![ComponentStatus {
        name: "nginx".into(),
        kind: manifests::ComponentKind::Package,
        desired_state: "web".into(),
        revision: 2,
        desired_version: Some("1.1-1".into()),
        version: Some("1.0-1".into()),
        phase: ComponentPhase::Reverted,
        message: None,
        probe_output: None,
        log_tail: vec![],
    }];
    let unhealthy = conditions(&reverted, &assignment, true);
    assert_eq!(status_of(&unhealthy, "Healthy").0, False);
    assert!(unhealthy[2].message.contains("nginx"), "{unhealthy:?}");

    // A conflict shows whether or not the node has reported.
    let conflicted = assignment_of(
        &[],
        vec![ComponentConflict {
            component: "shared".into(),
            desired_states: vec!["a".into(), "b".into()],
        }],
    );
    for reported in [false, true] {
        let c = conditions(&node(reported), &conflicted, reported);
        assert_eq!(
            status_of(&c, "Conflict"),
            (True, "ComponentPinnedTwice".into())
        );
    }
}

#[tokio::test]
async fn events_are_bounded_by_retention_keeping_the_newest() {
    let c = controller_with(ControllerConfig {
        event_retention: 3,
        ..ControllerConfig::default()
    })
    .await;
    for i in 0..6 {
        apply(&c, &manifest(&format!("s{i}"), "web", &[("tool", "1.0-1")])).await;
    }
    let events = c.events(0, 100, None).unwrap();
    assert_eq!(c.store().len(Table::Events), 3);
    let objects: Vec<&str> = events.iter().map(|e| e.object.as_str()).collect();
    assert_eq!(
        objects,
        vec!["desiredstate/s3", "desiredstate/s4", "desiredstate/s5"]
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    // One apply with more events than the retention keeps the newest too.
    let bundle: Vec<String> = (0..5)
        .map(|i| manifest(&format!("t{i}"), "web", &[("tool", "1.0-1")]))
        .collect();
    c.apply(inputs(&bundle.join("---\n")), false).await.unwrap();
    let objects: Vec<String> = c
        .events(0, 100, None)
        .unwrap()
        .into_iter()
        .map(|e| e.object)
        .collect();
    assert_eq!(
        objects,
        vec!["desiredstate/t2", "desiredstate/t3", "desiredstate/t4"]
    );
    // Paging and filtering.
    let after = c.events(0, 100, None).unwrap()[0].seq;
    assert_eq!(c.events(after, 100, None).unwrap().len(), 2);
    assert_eq!(c.events(0, 1, None).unwrap().len(), 1);
    assert_eq!(c.events(0, 100, Some("desiredstate/t3")).unwrap().len(), 1);
}

fn node_event(reason: &str, i: usize) -> NodeEvent {
    NodeEvent {
        time: SystemTime::now(),
        kind: EventType::Normal,
        reason: reason.into(),
        message: format!("event {i}"),
        desired_state: None,
        revision: None,
        component: None,
    }
}

#[tokio::test]
async fn a_flooding_node_evicts_only_its_own_history() {
    let c = controller_with(ControllerConfig {
        event_retention: 100,
        ..ControllerConfig::default()
    })
    .await;
    for name in ["quiet", "loud", "other"] {
        heard(&c, name, "web").await;
    }
    let report = |name: &'static str, events: Vec<NodeEvent>| {
        let c = c.clone();
        async move {
            report_stored(
                &c,
                name,
                NodeReport {
                    events,
                    ..NodeReport::default()
                },
            )
            .await
            .unwrap()
        }
    };
    report("quiet", (0..5).map(|i| node_event("Drift", i)).collect()).await;
    for round in 0..5 {
        report(
            "loud",
            (0..1000)
                .map(|i| node_event("Forged", round * 1000 + i))
                .collect(),
        )
        .await;
    }
    let about = |node: &str| c.events(0, 10_000, Some(&format!("node/{node}"))).unwrap();
    let quiet = about("quiet");
    assert_eq!(
        quiet.iter().filter(|e| e.reason == "Drift").count(),
        5,
        "{quiet:?}"
    );
    let loud = about("loud");
    assert!(
        loud.len() <= 100 / 3,
        "{} events kept for the flooder",
        loud.len()
    );
    let last = loud.last().unwrap();
    assert_eq!(last.reason, "EventsDropped", "{last:?}");
    assert!(last.message.contains("sent 1000 events"), "{last:?}");
    assert!(about("other").iter().any(|e| e.reason == "Registered"));
    assert!(c.store().len(Table::Events) <= 100);
}

fn ready(c: &Controller, name: &str) -> ConditionStatus {
    status_of(&c.get_node(name).unwrap().status.conditions, "Ready").0
}

#[tokio::test]
async fn readiness_sweep_reports_each_transition_once() {
    let grace = Duration::from_secs(40);
    let c = controller_with(ControllerConfig {
        ready_grace: grace,
        ..ControllerConfig::default()
    })
    .await;
    register(&c, "n1", "web").await;
    register(&c, "quiet", "web").await;
    assert_eq!(ready(&c, "n1"), ConditionStatus::Unknown);
    report_stored(&c, "n1", NodeReport::default())
        .await
        .unwrap();
    assert_eq!(ready(&c, "n1"), ConditionStatus::True);
    let heartbeat = c.get_node("n1").unwrap().status.last_heartbeat.unwrap();
    let readiness_events = |c: &Controller| -> Vec<(String, Option<String>)> {
        c.events(0, 1000, None)
            .unwrap()
            .into_iter()
            .filter(|e| e.reason.starts_with("Node"))
            .map(|e| (e.reason, e.node))
            .collect()
    };

    // Within the grace period nothing changes.
    c.sweep_readiness(heartbeat + grace - Duration::from_secs(1))
        .await
        .unwrap();
    assert!(readiness_events(&c).is_empty());

    // Past it: one NodeNotReady, for the node that had heartbeats only.
    let late = heartbeat + grace + Duration::from_secs(1);
    c.sweep_readiness(late).await.unwrap();
    c.sweep_readiness(late + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        readiness_events(&c),
        vec![("NodeNotReady".to_string(), Some("n1".to_string()))]
    );
    let event = c.events(0, 1000, Some("node/n1")).unwrap().pop().unwrap();
    assert_eq!(event.kind, EventType::Warning);
    assert_eq!(event.time, late);

    // Heartbeats return: one NodeReady, at once.
    report_stored(&c, "n1", NodeReport::default())
        .await
        .unwrap();
    assert_eq!(ready(&c, "n1"), ConditionStatus::True);
    c.sweep_readiness(SystemTime::now()).await.unwrap();
    assert_eq!(
        readiness_events(&c),
        vec![
            ("NodeNotReady".to_string(), Some("n1".to_string())),
            ("NodeReady".to_string(), Some("n1".to_string()))
        ]
    );
}

#[tokio::test]
async fn a_first_heartbeat_is_not_reported_as_resumed() {
    let c = controller().await;
    register(&c, "n1", "web").await;
    // Sweeps before the first heartbeat (the server sweeps every 2 s) …
    c.sweep_readiness(SystemTime::now()).await.unwrap();
    c.sweep_readiness(SystemTime::now() + Duration::from_secs(3600))
        .await
        .unwrap();
    // … do not turn the first heartbeat into "heartbeats resumed".
    report_stored(&c, "n1", NodeReport::default())
        .await
        .unwrap();
    assert_eq!(reasons(&c), vec!["Registered"]);
}

#[tokio::test]
async fn node_tokens_are_checked_and_rotated_on_registration() {
    let c = controller().await;
    let first = register(&c, "n1", "web").await;
    assert!(first.token.starts_with("n1:"));
    assert!(c.node_token_matches("n1", &first.token).unwrap());
    assert!(!c.node_token_matches("n2", &first.token).unwrap());
    assert!(!c.node_token_matches("n1", "n1:00").unwrap());
    // Only the hash is stored.
    let raw = c.store().get(Table::Nodes, b"n1").unwrap();
    let secret = first.token.split_once(':').unwrap().1;
    assert!(!String::from_utf8_lossy(&raw).contains(secret));

    let second = register(&c, "n1", "db").await;
    assert!(c.node_token_matches("n1", &second.token).unwrap());
    assert!(!c.node_token_matches("n1", &first.token).unwrap());
    assert_eq!(
        c.get_node("n1")
            .unwrap()
            .metadata
            .labels
            .get("role")
            .map(String::as_str),
        Some("db")
    );
    assert_eq!(reasons(&c), vec!["Registered", "Reregistered"]);

    for bad in ["Bad_Name", "", "register-"] {
        let result = c
            .register(
                RegisterRequest {
                    name: bad.into(),
                    labels: BTreeMap::new(),
                },
                "join",
            )
            .await;
        assert!(
            matches!(result, Err(Error::Invalid { .. })),
            "{bad}: {result:?}"
        );
    }
    assert_eq!(c.store().len(Table::Nodes), 1);
}

async fn healthy(c: &Controller, node: &str, state: &str, revision: u64, since: SystemTime) {
    report_stored(
        c,
        node,
        NodeReport {
            applied: vec![AppliedState {
                desired_state: state.into(),
                revision,
                phase: ComponentPhase::Healthy,
                commit: None,
                healthy_since: Some(since),
            }],
            ..NodeReport::default()
        },
    )
    .await
    .unwrap();
}

/// Registers a node that has reported once (a node never heard from takes no wave).
async fn heard(c: &Controller, name: &str, role: &str) {
    register(c, name, role).await;
    report_stored(c, name, NodeReport::default()).await.unwrap();
}

fn assigned(c: &Controller, node: &str, state: &str) -> Option<u64> {
    c.assignment(node)
        .unwrap()
        .states
        .iter()
        .find(|s| s.name == state)
        .map(|s| s.revision)
}

#[tokio::test]
async fn a_revision_has_its_pending_rollout_at_once_and_it_can_be_paused_before_planning() {
    let c = controller().await;
    heard(&c, "n1", "web").await;
    let result = apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
    let rollout = c.get_rollout("web").unwrap();
    assert_eq!(rollout.spec.revision, result.revision);
    assert_eq!(rollout.status.phase, RolloutPhase::Pending);
    let paused = c.set_rollout_paused("web", true).await.unwrap();
    assert_eq!(paused.status.phase, RolloutPhase::Paused);
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    assert_eq!(assigned(&c, "n1", "web"), None, "paused: nothing assigned");
    c.set_rollout_paused("web", false).await.unwrap();
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    assert_eq!(
        c.get_rollout("web").unwrap().status.phase,
        RolloutPhase::Progressing
    );
    assert_eq!(assigned(&c, "n1", "web"), Some(1), "the canary got it");
}

#[tokio::test]
async fn bakes_count_from_when_the_server_received_healthy() {
    let c = controller().await;
    heard(&c, "n1", "web").await;
    let yaml = manifest("web", "web", &[("tool", "1.0")]).replace(
        "  components:",
        "  rollout: {waves: ['100%'], bakeSeconds: 1000}\n  components:",
    );
    apply(&c, &yaml).await;
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    // The node's clock says it has been healthy for a day: irrelevant.
    let day_ago = SystemTime::now() - Duration::from_secs(86_400);
    healthy(&c, "n1", "web", 1, day_ago).await;
    let first = c.get_node("n1").unwrap().status.healthy_received["web"];
    healthy(&c, "n1", "web", 1, day_ago).await;
    assert_eq!(
        c.get_node("n1").unwrap().status.healthy_received["web"].at,
        first.at,
        "the same healthy spell keeps its first receipt"
    );
    // Past the bake (1000 s), before healthyDeadlineSeconds + bakeSeconds (1600 s).
    c.reconcile_rollouts(SystemTime::now() + Duration::from_secs(1500))
        .await
        .unwrap();
    assert_eq!(
        c.get_rollout("web").unwrap().status.phase,
        RolloutPhase::Progressing,
        "no report received after the bake: not baked, however late it is"
    );
    assert_eq!(
        c.get_desired_state("web")
            .unwrap()
            .status
            .last_good_revision,
        0
    );
}

#[tokio::test]
async fn a_sha256_reused_under_another_version_is_refused() {
    let c = controller().await;
    let sha = "ab".repeat(32);
    let service = |version: &str| {
        format!("apiVersion: shoal/v1\nkind: DesiredState\nmetadata:\n  name: web\nspec:\n  selector: {{matchLabels: {{role: web}}}}\n  components:\n    - {{name: web, kind: service, version: {version}, artifact: {{url: 'http://h/web-{version}.tgz', sha256: '{sha}'}}, service: {{exec: [bin/web]}}}}\n")
    };
    apply(&c, &service("1.0.0")).await;
    let refused = c.apply(inputs(&service("1.2.0")), false).await.unwrap_err();
    let text = format!("{refused:?}");
    assert!(text.contains("did you forget to update sha256"), "{text}");
    assert!(
        text.contains("spec.components[0].artifact.sha256"),
        "{text}"
    );
    assert_eq!(
        c.get_desired_state("web").unwrap().status.revision,
        1,
        "nothing stored"
    );
}

#[tokio::test]
async fn a_cordoned_node_keeps_its_revision_and_a_deleted_node_is_forgotten() {
    let c = controller().await;
    heard(&c, "n1", "web").await;
    apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    assert_eq!(assigned(&c, "n1", "web"), Some(1));
    c.set_cordon("n1", true, "ops").await.unwrap();
    assert!(c.get_node("n1").unwrap().status.cordoned.is_some());
    apply(&c, &manifest("web", "web", &[("tool", "2.0")])).await;
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    assert_eq!(
        assigned(&c, "n1", "web"),
        Some(1),
        "cordoned: keeps revision 1"
    );
    let rollout = c.get_rollout("web").unwrap();
    assert!(
        rollout.status.message.contains("n1: cordoned"),
        "{rollout:?}"
    );
    c.set_cordon("n1", false, "ops").await.unwrap();
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    assert_eq!(
        assigned(&c, "n1", "web"),
        Some(2),
        "uncordoned: the waiting rollout goes on"
    );
    c.delete_node("n1", "ops").await.unwrap();
    assert!(matches!(c.get_node("n1"), Err(Error::NotFound { .. })));
    assert!(!c.node_token_matches("n1", "anything").unwrap());
    let reasons = reasons(&c);
    for reason in ["NodeCordoned", "NodeUncordoned", "NodeDeleted"] {
        assert!(reasons.contains(&reason.to_string()), "{reasons:?}");
    }
}

#[tokio::test]
async fn a_pause_holds_across_a_new_revision() {
    let c = controller().await;
    heard(&c, "n1", "web").await;
    apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
    c.set_rollout_paused("web", true).await.unwrap();
    apply(&c, &manifest("web", "web", &[("tool", "2.0")])).await;
    let rollout = c.get_rollout("web").unwrap();
    assert_eq!(
        (rollout.spec.revision, rollout.status.phase),
        (2, RolloutPhase::Paused)
    );
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    assert_eq!(assigned(&c, "n1", "web"), None);
}

#[tokio::test]
async fn a_cordoned_node_pinned_to_an_aborted_revision_goes_back_with_the_others() {
    let c = controller().await;
    heard(&c, "n1", "web").await;
    let quick = |version: &str| {
        manifest("web", "web", &[("tool", version)]).replace(
            "  components:",
            "  rollout: {waves: ['100%'], bakeSeconds: 0}\n  components:",
        )
    };
    apply(&c, &quick("1.0")).await;
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    healthy(&c, "n1", "web", 1, SystemTime::now()).await;
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    assert_eq!(
        c.get_desired_state("web")
            .unwrap()
            .status
            .last_good_revision,
        1
    );
    apply(&c, &quick("2.0")).await;
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    assert_eq!(assigned(&c, "n1", "web"), Some(2));
    c.set_cordon("n1", true, "ops").await.unwrap();
    report_stored(
        &c,
        "n1",
        NodeReport {
            applied: vec![AppliedState {
                desired_state: "web".into(),
                revision: 2,
                phase: ComponentPhase::Reverted,
                commit: None,
                healthy_since: None,
            }],
            ..NodeReport::default()
        },
    )
    .await
    .unwrap();
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    let rollout = c.get_rollout("web").unwrap();
    assert_eq!(
        rollout.status.phase,
        RolloutPhase::RolledBack,
        "{rollout:?}"
    );
    assert_eq!(
        assigned(&c, "n1", "web"),
        Some(1),
        "back to the last good revision"
    );
    let cordon = c.get_node("n1").unwrap().status.cordoned.unwrap();
    assert_eq!(
        cordon.revisions.get("web"),
        Some(&1),
        "and still cordoned there"
    );
}

#[tokio::test]
async fn one_broken_rollout_does_not_stop_the_others() {
    let c = controller().await;
    heard(&c, "n1", "web").await;
    heard(&c, "n2", "db").await;
    apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
    apply(&c, &manifest("db", "db", &[("pg", "1.0")])).await;
    // web's rollout record is unreadable: its decisions fail, db's go on.
    c.store()
        .transact(|txn| txn.put(Table::Rollouts, b"web", b"{not json".to_vec()))
        .await
        .map_err(|_| ())
        .unwrap();
    c.refresh().unwrap();
    let now = SystemTime::now();
    c.reconcile_rollouts(now).await.unwrap();
    assert_eq!(assigned(&c, "n2", "db"), Some(1));
    let errors: Vec<Event> = c
        .events(0, 100, Some("rollout/web"))
        .unwrap()
        .into_iter()
        .filter(|e| e.reason == "RolloutError")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind, EventType::Warning);
    // Retried with backoff, one event per streak.
    c.reconcile_rollouts(now + Duration::from_secs(5))
        .await
        .unwrap();
    let again = c
        .events(0, 100, Some("rollout/web"))
        .unwrap()
        .iter()
        .filter(|e| e.reason == "RolloutError")
        .count();
    assert_eq!(again, 1);
}

#[tokio::test]
async fn heartbeats_store_the_report_events_and_host_history() {
    let c = controller_with(ControllerConfig {
        host_history: 2,
        ..ControllerConfig::default()
    })
    .await;
    register(&c, "n1", "web").await;
    for cpu in [1.0, 2.0, 3.0] {
        // Stored heartbeat times have whole milliseconds: two in one are one heartbeat.
        tokio::time::sleep(Duration::from_millis(2)).await;
        report_stored(
            &c,
            "n1",
            NodeReport {
                host: Some(HostMetrics {
                    cpu_percent: cpu,
                    ..HostMetrics::default()
                }),
                events: vec![NodeEvent {
                    time: SystemTime::now(),
                    kind: EventType::Warning,
                    reason: "Drift".into(),
                    message: "changed on disk".into(),
                    desired_state: Some("web".into()),
                    revision: Some(1),
                    component: Some("nginx".into()),
                }],
                ..NodeReport::default()
            },
        )
        .await
        .unwrap();
    }
    let node = c.get_node("n1").unwrap();
    assert_eq!(node.status.report.host.unwrap().cpu_percent, 3.0);
    assert!(node.status.report.events.is_empty());
    let history: Vec<f64> = node
        .status
        .host_history
        .iter()
        .map(|s| s.metrics.cpu_percent)
        .collect();
    assert_eq!(history, vec![2.0, 3.0]);
    let drift = c.events(0, 100, Some("node/n1")).unwrap();
    assert_eq!(
        drift.iter().filter(|e| e.reason == "Drift").count(),
        3,
        "{drift:?}"
    );
    assert!(drift.last().unwrap().message.starts_with("nginx: "));
    assert!(matches!(
        report_stored(&c, "ghost", NodeReport::default()).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_resync_tells_every_watcher_to_list_again() {
    let c = controller().await;
    let mut watcher = c.subscribe();
    c.resync();
    let change = tokio::time::timeout(Duration::from_secs(5), watcher.recv())
        .await
        .expect("a change within 5 s")
        .expect("not lagged");
    assert_eq!(change.change, ChangeType::Resync);
}

#[tokio::test]
async fn a_registration_wakes_only_that_nodes_long_poll_and_nodes_alike_share_one_assignment() {
    let c = controller().await;
    register(&c, "n1", "web").await;
    let mut n1 = c.assignment_changes("n1");
    let later = c.assignment_changes("n3");
    // Another node registers: its commit is applied to everything derived (register waits
    // for that), and n1's long poll is not woken.
    register(&c, "n2", "web").await;
    assert!(!n1.node.has_changed().unwrap());
    // The node itself registering (new labels) wakes its own.
    register(&c, "n3", "db").await;
    assert!(
        later.node.has_changed().unwrap(),
        "n3's own registration wakes it"
    );
    assert!(!n1.node.has_changed().unwrap());
    let mut later = later;
    later.node.borrow_and_update();
    // A new DesiredState moves no assignment until the rollout controller assigns its
    // first revision; that wakes the nodes it selects, together, and no other.
    for node in ["n1", "n2", "n3"] {
        report_stored(&c, node, NodeReport::default())
            .await
            .unwrap();
    }
    let one_wave = format!(
        "{}  rollout: {{waves: [\"100%\"]}}\n",
        manifest("web", "web", &[("nginx", "1.0-1")])
    );
    apply(&c, &one_wave).await;
    assert!(!n1.node.has_changed().unwrap(), "nothing to run yet");
    c.reconcile_rollouts(SystemTime::now()).await.unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(5), n1.changed())
        .await
        .expect("the first wave wakes n1");
    assert_eq!(woke, Wake::Changed { together: 2 }, "n1 and n2");
    assert!(
        !later.node.has_changed().unwrap(),
        "n3 (db) is not selected"
    );
    // Nodes alike get the same assignment (and generation), each under its own name.
    let (a1, a2, a3) = (
        c.assignment("n1").unwrap(),
        c.assignment("n2").unwrap(),
        c.assignment("n3").unwrap(),
    );
    assert_eq!((a1.node.as_str(), a2.node.as_str()), ("n1", "n2"));
    assert_eq!(a1.generation, a2.generation);
    assert_eq!(
        serde_json::to_value(&a1.states).unwrap(),
        serde_json::to_value(&a2.states).unwrap()
    );
    assert_eq!(a3.node, "n3");
    // The long poll's answer, written from the shared serialization, is the assignment.
    for node in ["n1", "n2", "n3"] {
        let (generation, body) = c.assignment_body(node).unwrap();
        let expected = c.assignment(node).unwrap();
        assert_eq!(generation, expected.generation);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::to_value(&expected).unwrap()
        );
    }
    assert!(matches!(
        c.assignment_body("nobody"),
        Err(Error::NotFound { .. })
    ));
    // Computed once for the two web nodes and once for the db node.
    assert_eq!(c.assignments_memo.lock().unwrap().by_inputs.len(), 2);
}

#[tokio::test]
async fn only_a_desired_state_change_that_can_change_an_assignment_wakes_long_polls() {
    let c = controller().await;
    apply(&c, &manifest("web", "web", &[("tool", "1.0")])).await;
    let base = c.get_desired_state("web").unwrap();
    let bytes = |d: &DesiredStateObject| -> Option<Arc<[u8]>> {
        Some(serde_json::to_vec(d).unwrap().into())
    };
    let change = |before: Option<&DesiredStateObject>, after: Option<&DesiredStateObject>| {
        feed::desired_state_change(&store::Changed {
            table: Table::DesiredStates,
            key: b"web".to_vec(),
            value: after.and_then(bytes),
            previous: before.and_then(bytes),
        })
    };
    let mut counted = base.clone();
    counted.status.selected_nodes += 7;
    counted.metadata.resource_version = "99".into();
    assert_eq!(
        change(Some(&base), Some(&counted)),
        feed::DesiredStateChange {
            new_revision: false,
            assignments: false
        },
        "status the rollout writes as it waits wakes nobody"
    );
    let mut good = base.clone();
    good.status.last_good_revision += 1;
    assert_eq!(
        change(Some(&base), Some(&good)),
        feed::DesiredStateChange {
            new_revision: false,
            assignments: true
        }
    );
    let mut newer = base.clone();
    newer.status.revision += 1;
    newer.spec.components[0].version = Some("2.0".into());
    assert_eq!(
        change(Some(&base), Some(&newer)),
        feed::DesiredStateChange {
            new_revision: true,
            assignments: true
        }
    );
    for (before, after) in [(None, Some(&base)), (Some(&base), None)] {
        assert_eq!(
            change(before, after),
            feed::DesiredStateChange {
                new_revision: true,
                assignments: true
            }
        );
    }
    // Bytes that do not decode wake, as any change did before.
    let garbage = feed::desired_state_change(&store::Changed {
        table: Table::DesiredStates,
        key: b"web".to_vec(),
        value: Some(b"{not json".to_vec().into()),
        previous: bytes(&base),
    });
    assert!(garbage.assignments);
}

#[tokio::test]
async fn heartbeats_that_arrive_together_share_a_commit_and_a_gone_node_fails_alone() {
    let c = controller().await;
    for i in 0..40 {
        register(&c, &format!("n{i}"), "web").await;
    }
    let before = c.store.revision();
    let mut names: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
    names.insert(20, "gone".into());
    let answers = futures::future::join_all(names.iter().map(|name| {
        let report = NodeReport {
            events: vec![NodeEvent {
                time: SystemTime::now(),
                kind: EventType::Normal,
                reason: "Hello".into(),
                message: format!("from {name}"),
                desired_state: None,
                revision: None,
                component: None,
            }],
            ..NodeReport::default()
        };
        report_stored(&c, name, report)
    }))
    .await;
    for (name, answer) in names.iter().zip(&answers) {
        match name.as_str() {
            "gone" => assert!(
                matches!(answer, Err(Error::NotFound { .. })),
                "{name}: {answer:?}"
            ),
            _ => assert!(answer.is_ok(), "{name}: {answer:?}"),
        }
    }
    // Every report of a known node is stored, with its event, and none of the gone one's.
    for name in names.iter().filter(|n| *n != "gone") {
        let node = c.get_node(name).unwrap();
        assert!(node.status.last_heartbeat.is_some(), "{name}");
    }
    let hellos: Vec<String> = c
        .events(0, 1000, None)
        .unwrap()
        .into_iter()
        .filter(|e| e.reason == "Hello")
        .map(|e| e.message)
        .collect();
    assert_eq!(hellos.len(), 40);
    assert!(!hellos.iter().any(|m| m.contains("gone")));
    // The first report commits alone; the 40 that queued behind it share one or a few.
    let commits = c
        .store
        .resume(before)
        .unwrap()
        .0
        .into_iter()
        .filter(|b| b.changes.iter().any(|w| w.table == Table::Nodes))
        .count();
    assert!(commits <= 4, "{commits} commits for 41 heartbeats");
}

#[tokio::test]
async fn a_heartbeat_request_dropped_by_its_client_takes_no_other_heartbeat_along() {
    let c = controller().await;
    for name in ["a", "b", "c"] {
        register(&c, name, "web").await;
    }
    // `a`'s request (it carries an event, so it waits for its commit) is queued and then
    // dropped (its connection closed) before its commit.
    let with_event = NodeReport {
        events: vec![NodeEvent {
            time: SystemTime::now(),
            kind: EventType::Normal,
            reason: "Hello".into(),
            message: "from a".into(),
            desired_state: None,
            revision: None,
            component: None,
        }],
        ..NodeReport::default()
    };
    let mut dropped = Box::pin(c.report("a", with_event));
    assert!(futures::poll!(&mut dropped).is_pending());
    drop(dropped);
    let (b, cc) = futures::future::join(
        report_stored(&c, "b", NodeReport::default()),
        report_stored(&c, "c", NodeReport::default()),
    )
    .await;
    assert!(b.is_ok() && cc.is_ok(), "{b:?} {cc:?}");
    // The queued report was committed all the same, by the task that commits the queue.
    assert!(c.get_node("a").unwrap().status.last_heartbeat.is_some());
}

#[tokio::test]
async fn a_heartbeat_without_events_is_answered_before_its_commit_and_stored_after() {
    let c = controller().await;
    register(&c, "a", "web").await;
    // Nothing is committed while the test holds the committer: the answer cannot have
    // waited for a commit.
    let committer = c.report_committer.lock().await;
    c.report("a", NodeReport::default()).await.unwrap();
    assert!(c.get_node("a").unwrap().status.last_heartbeat.is_none());
    // An unknown node is refused at once, as its commit would refuse it.
    assert!(matches!(
        c.report("ghost", NodeReport::default()).await,
        Err(Error::NotFound { .. })
    ));
    drop(committer);
    c.store_queued_reports().await;
    assert!(c.get_node("a").unwrap().status.last_heartbeat.is_some());
}

/// A report, and then every queued report stored: what a test reads next includes it.
async fn report_stored(c: &Controller, name: &str, report: NodeReport) -> Result<(), Error> {
    let answer = c.report(name, report).await;
    c.store_queued_reports().await;
    answer
}

#[tokio::test]
async fn an_unchanged_heartbeat_is_heard_in_memory_and_stored_only_when_old() {
    let c = controller().await;
    register(&c, "a", "web").await;
    let host = |cpu: f64| NodeReport {
        host: Some(HostMetrics {
            cpu_percent: cpu,
            ..HostMetrics::default()
        }),
        ..NodeReport::default()
    };
    report_stored(&c, "a", host(1.0)).await.unwrap();
    let stored = c.get_node("a").unwrap().status.last_heartbeat.unwrap();
    let revision = c.store.revision();
    // Stored times have whole milliseconds: the next heartbeat comes in a later one.
    tokio::time::sleep(Duration::from_millis(2)).await;
    // The same report with other host figures: no commit, but the node shows it.
    report_stored(&c, "a", host(2.0)).await.unwrap();
    assert_eq!(
        c.store.revision(),
        revision,
        "an unchanged heartbeat was stored"
    );
    let node = c.get_node("a").unwrap();
    assert!(node.status.last_heartbeat.unwrap() > stored);
    assert_eq!(node.status.report.host.as_ref().unwrap().cpu_percent, 2.0);
    assert_eq!(node.status.host_history.len(), 2);
    // Something new is stored at once.
    let mut changed = host(3.0);
    changed.nodelet_version = "2.0.0".into();
    report_stored(&c, "a", changed).await.unwrap();
    assert!(c.store.revision() > revision);
}
