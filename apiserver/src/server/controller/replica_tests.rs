use super::*;
use crate::store::testing::TestPostgres;
use crate::store::PostgresBackend;

async fn replica(url: &str, lease: Duration) -> Arc<Controller> {
    let store = Store::open(PostgresBackend::connect(url).await.unwrap())
        .await
        .unwrap();
    Controller::new(
        store,
        ControllerConfig {
            lease_duration: lease,
            ..ControllerConfig::default()
        },
    )
    .unwrap()
}

async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_a_deposed_leaders_decision_is_refused() {
    let Some(postgres) = TestPostgres::start_or_skip("fencing a deposed leader") else {
        return;
    };
    let url = postgres.create_database("fencing").await;
    let lease = Duration::from_millis(400);
    let a = replica(&url, lease).await;
    let b = replica(&url, lease).await;
    a.lease_tick().await.unwrap();
    assert_eq!(a.leader_epoch(), Some(1));
    eventually("b sees a's lease", || {
        b.store().get(Table::Leases, LEADER).map(|_| ())
    })
    .await;
    b.lease_tick().await.unwrap();
    assert_eq!(b.leader_epoch(), None, "a's lease is fresh: b follows");
    assert_eq!(
        b.control_plane().leader.as_deref(),
        Some(a.identity.as_str())
    );

    // A rollout to decide on, written through b, seen by a.
    b.register(
        RegisterRequest {
            name: "n1".into(),
            labels: BTreeMap::from([("role".to_string(), "web".to_string())]),
        },
        "join",
    )
    .await
    .unwrap();
    let inputs = manifests::parse_str(
        "web.yaml",
        "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {role: web}}\n  components:\n    - {name: tool, kind: package, version: \"1.0\"}\n",
    );
    let inputs = inputs
        .objects
        .into_iter()
        .map(|parsed| ApplyInput {
            object: parsed.object,
            source: RevisionSource::default(),
        })
        .collect();
    b.apply(inputs, false).await.unwrap();
    let pending = eventually("a sees the rollout", || a.get_rollout("web").ok()).await;

    // a stops renewing (frozen); once its record stayed unchanged for a whole lease,
    // b takes over with the next epoch, and a no longer acts as leader by its own clock.
    let deadline = Instant::now() + Duration::from_secs(10);
    let taken = loop {
        b.lease_tick().await.unwrap();
        if let Some(epoch) = b.leader_epoch() {
            break epoch;
        }
        assert!(Instant::now() < deadline, "b never took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(taken, 2);
    assert_eq!(a.leader_epoch(), None, "a's own lease ran out first");

    // The decision a made before it froze still carries epoch 1: refused, nothing written.
    let decision = || {
        let mut next = pending.clone();
        next.status.phase = RolloutPhase::Progressing;
        crate::rollout::Update {
            rollout: next,
            assign: vec![("n1".to_string(), 1)],
            clear_assignments: false,
            last_good: None,
            events: vec![],
        }
    };
    let written = a
        .write_rollout(
            "web",
            Some(pending.metadata.resource_version.clone()),
            decision(),
            SystemTime::now(),
            Some(1),
        )
        .await
        .unwrap();
    assert!(!written, "a deposed leader's decision landed");
    assert_eq!(
        b.get_rollout("web").unwrap().status.phase,
        RolloutPhase::Pending
    );
    assert!(b
        .store()
        .get(Table::Assignments, &store::assignment_key("n1", "web"))
        .is_none());

    // The same decision under the current epoch lands: the fence can pass.
    let written = b
        .write_rollout(
            "web",
            Some(pending.metadata.resource_version.clone()),
            decision(),
            SystemTime::now(),
            Some(taken),
        )
        .await
        .unwrap();
    assert!(written);
    eventually("a sees b's decision", || {
        (a.get_rollout("web").ok()?.status.phase == RolloutPhase::Progressing).then_some(())
    })
    .await;
}
