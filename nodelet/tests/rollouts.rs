//! Rollouts under faults, across a real network: every nodelet runs in its own network
//! namespace on a bridge (veth), with the apiserver and the artifact server on the bridge's
//! address. The faults are caused for real: a blackhole route cuts a canary off, SIGSTOP
//! freezes the apiserver, kill -9 powers a node off, a file makes one node's probe fail.
//! These tests need root for `ip netns`; without it they print `SKIPPED:` and pass.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use support::*;

const LONG: Duration = Duration::from_secs(120);
/// Every node has its own network namespace, so every node's service uses this port.
const PORT: u16 = 18080;

fn sh(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn must(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge in the root namespace and one namespace per node, each with a veth on it.
struct Net {
    bridge: String,
    subnet: String,
    namespaces: Vec<String>,
}

impl Net {
    /// `None` (after printing `SKIPPED:`) when network namespaces cannot be made here.
    fn new(index: u8, nodes: usize) -> Option<Net> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            println!("SKIPPED: rollout fault tests need root for network namespaces (ip netns)");
            return None;
        }
        let tag = format!("{}{index}", std::process::id() % 10_000);
        let net = Net {
            bridge: format!("shbr{tag}"),
            subnet: format!("10.{}.{}", 120 + index, std::process::id() % 250),
            namespaces: (0..nodes).map(|k| format!("shoal-{tag}-{k}")).collect(),
        };
        if !sh("ip", &["link", "add", &net.bridge, "type", "bridge"]) {
            println!("SKIPPED: cannot create a bridge (ip link add type bridge) on this machine");
            return None;
        }
        must(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}.1/24", net.subnet),
                "dev",
                &net.bridge,
            ],
        );
        must("ip", &["link", "set", &net.bridge, "up"]);
        for (k, ns) in net.namespaces.iter().enumerate() {
            let host_side = format!("shv{tag}{k}");
            must("ip", &["netns", "add", ns]);
            must(
                "ip",
                &[
                    "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            );
            must("ip", &["link", "set", &host_side, "master", &net.bridge]);
            must("ip", &["link", "set", &host_side, "up"]);
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
                all.extend_from_slice(args);
                must("ip", &all);
            };
            inside(&["link", "set", "lo", "up"]);
            inside(&["addr", "add", &format!("{}/24", net.ip(k)), "dev", "eth0"]);
            inside(&["link", "set", "eth0", "up"]);
        }
        Some(net)
    }

    /// The bridge's address: the apiserver and the artifact server listen here.
    fn host(&self) -> String {
        format!("{}.1", self.subnet)
    }

    fn ip(&self, k: usize) -> String {
        format!("{}.{}", self.subnet, 10 + k)
    }

    /// Blackholes node `k`'s route to the apiserver (and the artifact server).
    fn cut(&self, k: usize) {
        self.blackhole(k, "add");
    }

    fn heal(&self, k: usize) {
        self.blackhole(k, "del");
    }

    fn blackhole(&self, k: usize, verb: &str) {
        let host = format!("{}/32", self.host());
        let ns = self.namespaces[k].as_str();
        must(
            "ip",
            &["netns", "exec", ns, "ip", "route", verb, "blackhole", &host],
        );
    }

    /// `GET http://127.0.0.1:PORT/path` inside node `k`'s namespace.
    fn get(&self, k: usize, path: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.namespaces[k],
                "curl",
                "-sf",
                "-m",
                "2",
            ])
            .arg(format!("http://127.0.0.1:{PORT}{path}"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Services of a node that was kill -9ed outlive it: end them with the namespace.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = sh("kill", &["-9", pid]);
                }
            }
            let _ = sh("ip", &["netns", "del", ns]);
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
    }
}

/// The fleet of one test: the network, the apiserver, the artifacts and the nodelets.
struct Fleet {
    // Dropped in this order: nodelets (and their services) first, the network last.
    nodes: Vec<Nodelet>,
    artifacts: ArtifactServer,
    server: Apiserver,
    net: Net,
    dir: PathBuf,
}

impl Fleet {
    fn new(index: u8, size: usize, dir: &Path) -> Option<Fleet> {
        let net = Net::new(index, size)?;
        let server = Apiserver::start_on(&dir.join("api"), &net.host());
        let artifacts = ArtifactServer::start_on(&dir.join("artifacts"), &net.host());
        Some(Fleet {
            nodes: Vec::new(),
            artifacts,
            server,
            net,
            dir: dir.to_path_buf(),
        })
    }

    fn name(k: usize) -> String {
        format!("node-{k}")
    }

    /// The file whose existence makes node `k`'s `fault` probe fail.
    fn fault(&self, k: usize) -> PathBuf {
        self.dir.join(format!("fault-{k}"))
    }

    /// Starts node `k` in its namespace; node 0 is the canary.
    fn start(&mut self, k: usize) {
        let labels = format!("role=web{}", if k == 0 { ",shoal/canary=true" } else { "" });
        let node = Nodelet::start_in(
            &self.net.namespaces[k],
            &self.server.url,
            &Self::name(k),
            &labels,
            &self.dir.join(Self::name(k)),
            vec!["--var".into(), format!("FAULT={}", self.fault(k).display())],
        );
        if k >= self.nodes.len() {
            self.nodes.push(node);
        } else {
            self.nodes[k] = node;
        }
    }

    fn start_all(&mut self, size: usize) {
        for k in 0..size {
            self.start(k);
        }
        wait_for(LONG, "every node to register and report", || {
            let nodes = self.server.get("/api/v1/nodes")?;
            let ready = nodes
                .as_array()?
                .iter()
                .filter(|n| !n["status"]["lastHeartbeat"].is_null())
                .count();
            (ready == size).then_some(())
        });
    }

    /// A demo release: the tarball and its manifest.
    fn release(&self, version: &str, fail_after: Option<u64>, bake: u64, extra: &str) -> String {
        let (file, sha) = demo_tarball(&self.artifacts.dir, version, fail_after);
        format!(
            r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: web}}
spec:
  selector: {{matchLabels: {{role: web}}}}
  components:
    - name: demo
      kind: service
      version: {version}
      artifact: {{url: "{url}", sha256: "{sha}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:{PORT}"], startSeconds: 1}}
  probes:
    - {{name: demo-http, http: {{url: "http://127.0.0.1:{PORT}/healthz"}}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}
    - {{name: fault, exec: {{command: ["sh", "-c", "test ! -e ${{FAULT}}"]}}, periodSeconds: 1, failureThreshold: 2}}
  rollout:
    waves: ["1", "50%", "100%"]
    bakeSeconds: {bake}
    healthyDeadlineSeconds: 60
{extra}"#,
            url = self.artifacts.url_of(&file),
        )
    }

    fn rollout(&self) -> Value {
        self.server.rollout("web").unwrap_or(Value::Null)
    }

    /// Waits for revision `revision` to reach `phase`, printing every node's log if it does not.
    fn until_phase(&self, revision: u64, phase: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let rollout = self.rollout();
            if rollout["spec"]["revision"] == revision && rollout["status"]["phase"] == phase {
                return rollout;
            }
            if Instant::now() > deadline {
                self.dump();
                panic!("revision {revision} never became {phase}: {rollout}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn dump(&self) {
        for node in &self.nodes {
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            eprintln!(
                "== {}: journal {}\n{}",
                node.name,
                node.journal(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        eprintln!("== events: {:?}", self.server.rollout_events("web"));
    }

    /// The revision of `web` that node `k` is assigned now.
    fn assigned(&self, k: usize) -> Option<u64> {
        let assignment = self
            .server
            .get(&format!("/api/v1/nodes/{}/assignment", Self::name(k)))?;
        assignment["states"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "web")
            .and_then(|s| s["revision"].as_u64())
    }

    /// When the server first received Healthy from node `k` at `revision` (server clock).
    fn heard_healthy(&self, k: usize, revision: u64) -> Option<SystemTime> {
        let node = self
            .server
            .get(&format!("/api/v1/nodes/{}", Self::name(k)))?;
        let mark = &node["status"]["healthyReceived"]["web"];
        (mark["revision"] == revision)
            .then(|| humantime::parse_rfc3339(mark["at"].as_str()?).ok())
            .flatten()
    }

    /// Which nodes (by index) ever fetched `file` from the artifact server.
    fn fetched_by(&self, file: &str) -> BTreeSet<usize> {
        self.artifacts
            .fetches()
            .into_iter()
            .filter(|(_, _, f)| f == file)
            .filter_map(|(ip, _, _)| (0..self.net.namespaces.len()).find(|k| self.net.ip(*k) == ip))
            .collect()
    }

    fn shoal(&self, args: &[&str]) -> (i32, String) {
        let out = command("shoal")
            .args(["--server", &self.server.url, "--token", OPERATOR])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn apply_file(&self, name: &str, yaml: &str, wait: bool) -> (i32, String) {
        let path = self.dir.join(name);
        std::fs::write(&path, yaml).unwrap();
        let path = path.to_str().unwrap().to_string();
        if wait {
            self.shoal(&["apply", "-f", &path, "--wait", "--timeout", "3m"])
        } else {
            self.shoal(&["apply", "-f", &path])
        }
    }

    /// Five nodes running a good first release (node 0 the canary), or None when skipped.
    fn running(index: u8, dir: &Path) -> Option<Fleet> {
        let mut fleet = Fleet::new(index, 5, dir)?;
        fleet.start_all(5);
        fleet.baseline();
        Some(fleet)
    }

    /// When node `k` reported (node clock) that it reverted `revision`.
    fn reverted_at(&self, k: usize, revision: u64) -> SystemTime {
        let event = self
            .server
            .node_events(&Self::name(k))
            .into_iter()
            .find(|e| e["reason"] == "Reverted" && e["revision"] == revision)
            .unwrap_or_else(|| panic!("node-{k} reported no revert of revision {revision}"));
        humantime::parse_rfc3339(event["time"].as_str().unwrap()).unwrap()
    }

    /// Applies a good first release and waits until every node runs it.
    fn baseline(&self) {
        let (code, out) = self.apply_file("v1.yaml", &self.release("1.0.0", None, 2, ""), true);
        if code != 0 {
            self.dump();
        }
        assert_eq!(code, 0, "apply --wait of a good release: {out}");
    }
}

fn file_of(version: &str) -> String {
    format!("demo-{version}.tar.gz")
}

#[test]
fn a_canary_cut_off_during_its_bake_holds_the_wave_and_apply_wait_tells_bad_from_good() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fleet) = Fleet::running(0, tmp.path()) else {
        return;
    };

    // A bad release: healthy at first, failing 8 s after it starts. Bake 10 s.
    let bake = 10;
    let bad = fleet.release("2.0.0", Some(8), bake, "");
    let (code, out) = fleet.apply_file("v2.yaml", &bad, false);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("(revision 2)"),
        "apply prints the revision: {out}"
    );
    let heard = wait_for(LONG, "the canary's first Healthy at revision 2", || {
        fleet.heard_healthy(0, 2)
    });
    fleet.net.cut(0);
    let cut_at = SystemTime::now();
    // Cut off for longer than the bake has left: the bake elapses on the server's clock while
    // the canary is silent. The wave must hold the whole time.
    let until = heard + Duration::from_secs(bake + 8);
    while SystemTime::now() < until {
        let rollout = fleet.rollout();
        assert_eq!(rollout["spec"]["revision"], 2, "{rollout}");
        assert_eq!(
            rollout["status"]["currentWave"], 0,
            "wave 2 started while the canary was silent: {rollout}"
        );
        for k in 1..5 {
            assert_eq!(fleet.assigned(k), Some(1), "node-{k} got the bad revision");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        SystemTime::now().duration_since(heard).unwrap() > Duration::from_secs(bake),
        "the bake elapsed during the cut, so a wave could have started"
    );
    fleet.net.heal(0);
    // Heard again: it reverted while cut off, and the rollout rolls back.
    let rolled_back = fleet.until_phase(2, "RolledBack", Duration::from_secs(60));
    assert!(
        rolled_back["status"]["failedNodes"]["node-0"]
            .as_str()
            .is_some_and(|why| why.contains("demo")),
        "the failure names the changed component: {rolled_back}"
    );
    assert!(
        fleet.reverted_at(0, 2) > cut_at,
        "reverted during the cut, on its own"
    );
    assert_eq!(
        fleet.fetched_by(&file_of("2.0.0")),
        BTreeSet::from([0]),
        "only the canary ever fetched the bad version"
    );
    wait_for(LONG, "the canary back on 1.0.0", || {
        (fleet.net.get(0, "/version")? == "1.0.0").then_some(())
    });

    // `apply --wait` follows exactly the revision it created: a bad one exits 1, a good one
    // applied right after exits 0.
    let (code, out) = fleet.apply_file("v3.yaml", &fleet.release("3.0.0", Some(3), 20, ""), true);
    assert_eq!(code, 1, "apply --wait of a bad release: {out}");
    assert!(out.contains("RolledBack"), "{out}");
    let (code, out) = fleet.apply_file("v4.yaml", &fleet.release("4.0.0", None, 2, ""), true);
    assert_eq!(code, 0, "apply --wait of a good release right after: {out}");
    for k in 0..5 {
        assert_eq!(
            fleet.net.get(k, "/version").as_deref(),
            Some("4.0.0"),
            "node-{k}"
        );
    }
    assert_eq!(fleet.fetched_by(&file_of("3.0.0")), BTreeSet::from([0]));
}

#[test]
fn an_apiserver_frozen_across_the_canary_bake_and_revert_lets_nothing_through() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fleet) = Fleet::running(1, tmp.path()) else {
        return;
    };
    let bake = 10;
    fleet
        .server
        .apply(&fleet.release("2.0.0", Some(8), bake, ""));
    let heard = wait_for(LONG, "the canary's first Healthy at revision 2", || {
        fleet.heard_healthy(0, 2)
    });
    let pid = fleet.server.proc.as_ref().unwrap().child.id().to_string();
    must("kill", &["-STOP", &pid]);
    let frozen_at = SystemTime::now();
    // The fault's duration: frozen past the end of the bake and the canary's revert.
    std::thread::sleep(Duration::from_secs(bake + 8));
    must("kill", &["-CONT", &pid]);
    assert!(SystemTime::now().duration_since(heard).unwrap() > Duration::from_secs(bake));
    let rolled_back = fleet.until_phase(2, "RolledBack", Duration::from_secs(60));
    let events = fleet.server.rollout_events("web");
    assert!(
        !events
            .iter()
            .any(|e| e["reason"] == "WaveStarted" && e["revision"] == 2),
        "a second wave started: {events:?}"
    );
    assert_eq!(rolled_back["status"]["currentWave"], 0);
    assert_eq!(fleet.fetched_by(&file_of("2.0.0")), BTreeSet::from([0]));
    assert!(
        fleet.reverted_at(0, 2) > frozen_at,
        "it reverted while the apiserver was frozen"
    );
}

#[test]
fn an_abort_brings_wave_two_nodes_in_flight_back_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fleet) = Fleet::running(2, tmp.path()) else {
        return;
    };
    // A release that is fine, except on the one wave-2 node whose fault file appears: its
    // probe fails there, it reverts, the rollout aborts while the other wave-2 node bakes.
    let bake = 15;
    fleet.server.apply(&fleet.release("2.0.0", None, bake, ""));
    let started = fleet.until_phase(2, "Progressing", LONG);
    let _ = started;
    let wave2 = wait_for(LONG, "wave 2 of revision 2", || {
        let rollout = fleet.rollout();
        (rollout["status"]["currentWave"] == 1).then(|| {
            rollout["spec"]["plan"][1]["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    n.as_str().unwrap()["node-".len()..]
                        .parse::<usize>()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
    });
    assert_eq!(wave2.len(), 2, "{wave2:?}");
    let (failing, in_flight) = (wave2[0], wave2[1]);
    // Both have begun (their baseline is taken): then the fault appears on one.
    wait_for(LONG, "both wave-2 nodes healthy at revision 2", || {
        (fleet.heard_healthy(failing, 2).is_some() && fleet.heard_healthy(in_flight, 2).is_some())
            .then_some(())
    });
    std::fs::write(fleet.fault(failing), "injected").unwrap();
    let rolled_back = fleet.until_phase(2, "RolledBack", Duration::from_secs(60));
    let aborted_at = Instant::now();
    assert!(
        rolled_back["status"]["failedNodes"][format!("node-{failing}")]
            .as_str()
            .is_some_and(|why| why.contains("fault")),
        "{rolled_back}"
    );
    // The node in flight drops revision 2 at its next assignment read (the long poll wakes
    // it), without finishing its bake: back on 1.0.0 in seconds, not after bakeSeconds.
    wait_for(
        Duration::from_secs(4),
        "the wave-2 node in flight back on 1.0.0",
        || (fleet.net.get(in_flight, "/version")? == "1.0.0").then_some(()),
    );
    let back_after = aborted_at.elapsed();
    wait_for(
        Duration::from_secs(10),
        "it reports revision 1 Healthy",
        || {
            (fleet.server.applied(&Fleet::name(in_flight), "web")? == ("Healthy".to_string(), 1))
                .then_some(())
        },
    );
    eprintln!("wave-2 node in flight back on the last good revision {back_after:?} after the abort was seen");
    assert!(back_after < Duration::from_secs(bake / 2));
    let third: BTreeSet<usize> = (0..5).filter(|k| *k != 0 && !wave2.contains(k)).collect();
    assert!(
        fleet.fetched_by(&file_of("2.0.0")).is_disjoint(&third),
        "a wave-3 node fetched revision 2"
    );
}

#[test]
fn a_desired_state_applied_before_any_node_canaries_its_first_joiner() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut fleet) = Fleet::new(3, 3, tmp.path()) else {
        return;
    };
    // Manifests first, boards later (the GitOps order).
    let (code, out) = fleet.apply_file("v1.yaml", &fleet.release("1.0.0", None, 4, ""), false);
    assert_eq!(code, 0, "{out}");
    let waiting = fleet.until_phase(1, "Progressing", LONG);
    assert!(
        waiting["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with("waiting for nodes"),
        "{waiting}"
    );
    let state = fleet.server.get("/api/v1/desiredstates/web").unwrap();
    assert_eq!(
        state["status"]["lastGoodRevision"], 0,
        "it ran nowhere: not last good"
    );
    fleet.start(0);
    wait_for(LONG, "the first joiner assigned revision 1", || {
        (fleet.assigned(0) == Some(1)).then_some(())
    });
    // The others join while the first one bakes: they wait for it.
    fleet.start(1);
    fleet.start(2);
    let complete = fleet.until_phase(1, "Complete", LONG);
    assert_eq!(
        complete["spec"]["plan"][0]["nodes"],
        serde_json::json!(["node-0"])
    );
    let done = humantime::parse_rfc3339(complete["status"]["finished"].as_str().unwrap()).unwrap();
    for (_, at, file) in fleet.artifacts.fetches() {
        assert_eq!(file, file_of("1.0.0"));
        let _ = at;
    }
    for k in [1, 2] {
        let first = fleet
            .artifacts
            .fetches()
            .into_iter()
            .filter(|(ip, _, _)| *ip == fleet.net.ip(k))
            .map(|(_, at, _)| at)
            .min();
        assert!(
            first.is_none_or(|at| at >= done - Duration::from_millis(5)),
            "node-{k} fetched the revision before the canary proved it"
        );
        wait_for(LONG, "the later joiners on 1.0.0", || {
            (fleet.net.get(k, "/version")? == "1.0.0").then_some(())
        });
    }
    let state = fleet.server.get("/api/v1/desiredstates/web").unwrap();
    assert_eq!(state["status"]["lastGoodRevision"], 1);
}

#[test]
fn a_powered_off_node_is_skipped_within_max_unavailable_and_delete_node_frees_a_held_rollout() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut fleet) = Fleet::running(4, tmp.path()) else {
        return;
    };
    // node-4 loses power (its services stay as they were) and goes NotReady.
    fleet.nodes[4].kill9();
    wait_for(LONG, "node-4 NotReady", || {
        let node = fleet.server.get("/api/v1/nodes/node-4")?;
        node["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "False")
            .then_some(())
    });
    // Within maxUnavailable: the rollout goes on without it.
    let (code, out) = fleet.apply_file(
        "v2.yaml",
        &fleet.release("2.0.0", None, 2, "    maxUnavailable: 1\n"),
        true,
    );
    assert_eq!(code, 0, "{out}");
    let complete = fleet.rollout();
    assert!(
        complete["status"]["unavailableNodes"]["node-4"]
            .as_str()
            .is_some_and(|why| why.contains("NotReady")),
        "{complete}"
    );
    assert!(!fleet.fetched_by(&file_of("2.0.0")).contains(&4));
    // Past the budget (0): the rollout waits, with the reason, instead of failing.
    fleet.server.apply(&fleet.release("3.0.0", None, 2, ""));
    let held = wait_for(LONG, "the rollout of revision 3 held by node-4", || {
        let rollout = fleet.rollout();
        (rollout["spec"]["revision"] == 3
            && rollout["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("maxUnavailable allows 0")))
        .then_some(rollout)
    });
    assert_eq!(held["status"]["phase"], "Progressing", "{held}");
    assert!(held["status"]["failedNodes"].is_null(), "{held}");
    let (code, out) = fleet.shoal(&["delete", "node", "node-4"]);
    assert_eq!(code, 0, "{out}");
    fleet.until_phase(3, "Complete", LONG);
    assert!(
        fleet.server.get("/api/v1/nodes/node-4").is_none(),
        "forgotten"
    );
    for k in 0..4 {
        assert_eq!(
            fleet.net.get(k, "/version").as_deref(),
            Some("3.0.0"),
            "node-{k}"
        );
    }
}
