//! Faults, caused for real against real nodelets and a real apiserver: kill -9 in every phase
//! of a change, a download that never answers beside another DesiredState's bad release,
//! SIGTERM while work is stuck, and a boot with the apiserver down and new labels.
//! (Tests that need root for a tmpfs print `SKIPPED:` without it.)

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::*;

const LONG: Duration = Duration::from_secs(90);

fn event(server: &Apiserver, node: &str, reason: &str, revision: u64) -> Option<serde_json::Value> {
    server
        .node_events(node)
        .into_iter()
        .find(|e| e["reason"] == reason && e["revision"] == revision)
}

/// Serves the files of `dir` over HTTP/1.0 after holding every request for `delay`: a slow
/// mirror, so a change stays Pending (downloading) long enough to be killed there.
fn slow_server(dir: std::path::PathBuf, delay: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buffer = [0u8; 2048];
                let n = stream.read(&mut buffer).unwrap_or(0);
                let request = String::from_utf8_lossy(&buffer[..n]).to_string();
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                std::thread::sleep(delay);
                match std::fs::read(dir.join(path.trim_start_matches('/'))) {
                    Ok(body) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(&body);
                    }
                    Err(_) => {
                        let _ = stream
                            .write_all(b"HTTP/1.0 404 Not Found\r\ncontent-length: 0\r\n\r\n");
                    }
                }
            });
        }
    });
    url
}

/// Accepts connections and never answers: a download that hangs forever.
fn black_hole() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/never.tar.gz", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream); // kept open, never read, never answered
        }
    });
    (url, handle)
}

/// Two services (a, b) started in that order, their http probes, and a "gate" exec probe the
/// test opens and closes to hold a change in Verifying.
#[allow(clippy::too_many_arguments)]
fn two_services(
    version: &str,
    url: &str,
    sha: &str,
    ports: (u16, u16),
    gate: &std::path::Path,
) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: pair}}
spec:
  selector: {{matchLabels: {{role: pair}}}}
  components:
    - name: demo-a
      kind: service
      version: {version}
      artifact: {{url: "{url}", sha256: "{sha}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:{a}"], startSeconds: 3}}
    - name: demo-b
      kind: service
      version: {version}
      artifact: {{url: "{url}", sha256: "{sha}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:{b}"], startSeconds: 3}}
  probes:
    - {{name: a-http, http: {{url: "http://127.0.0.1:{a}/healthz"}}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}
    - {{name: b-http, http: {{url: "http://127.0.0.1:{b}/healthz"}}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}
    - {{name: gate, exec: {{command: [test, -e, "{gate}"]}}, periodSeconds: 1, failureThreshold: 1000}}
  rollout:
    waves: ["100%"]
    bakeSeconds: 4
    healthyDeadlineSeconds: 60
"#,
        a = ports.0,
        b = ports.1,
        gate = gate.display()
    )
}

fn change_of(node: &Nodelet) -> serde_json::Value {
    node.journal()["changes"]["pair"].clone()
}

/// Where to kill the nodelet during a change.
#[derive(Debug, Clone, Copy)]
enum KillIn {
    Pending,
    DuringFirstStep,
    AfterFirstStep,
    Verifying,
    Baking,
}

#[test]
fn kill_9_in_every_phase_of_a_good_release_converges_without_a_revert() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let slow = slow_server(artifacts.dir.clone(), Duration::from_secs(4));
    let ports = (free_port(), free_port());
    let gate = tmp.path().join("gate");
    std::fs::write(&gate, b"open").unwrap();
    let mut node = Nodelet::start(
        &server.url,
        "phoenix",
        "role=pair",
        &tmp.path().join("node"),
    );
    let (file, sha) = demo_tarball(&artifacts.dir, "1.0.0", None);
    server.apply(&two_services(
        "1.0.0",
        &artifacts.url_of(&file),
        &sha,
        ports,
        &gate,
    ));
    wait_for(LONG, "1.0.0 baked", || {
        event(&server, "phoenix", "Baked", 1)
    });

    let phases = [
        KillIn::Pending,
        KillIn::DuringFirstStep,
        KillIn::AfterFirstStep,
        KillIn::Verifying,
        KillIn::Baking,
    ];
    for (i, phase) in phases.into_iter().enumerate() {
        let revision = i as u64 + 2;
        let version = format!("1.{}.0", i + 1);
        let (file, sha) = demo_tarball(&artifacts.dir, &version, None);
        let url = match phase {
            KillIn::Pending => format!("{slow}/{file}"),
            _ => artifacts.url_of(&file),
        };
        server.apply(&two_services(&version, &url, &sha, ports, &gate));
        wait_for(LONG, &format!("{phase:?} of revision {revision}"), || {
            let change = change_of(&node);
            if change["target"]["revision"] != revision {
                return None;
            }
            let steps = &change["steps"];
            let hit = match phase {
                KillIn::Pending => change["phase"] == "Pending",
                KillIn::DuringFirstStep => steps[0]["state"] == "Started",
                KillIn::AfterFirstStep => {
                    steps[0]["state"] == "Done" && steps[1]["state"] != "Done"
                }
                KillIn::Verifying => {
                    // Hold it there: the gate probe fails (below its threshold) until reopened.
                    if change["phase"] == "Applying" {
                        let _ = std::fs::remove_file(&gate);
                    }
                    change["phase"] == "Verifying" && !gate.exists()
                }
                KillIn::Baking => change["phase"] == "Baking",
            };
            hit.then_some(())
        });
        node.kill9();
        node.restart();
        if matches!(phase, KillIn::Verifying) {
            // After the restart the change is still waiting for the gate; open it.
            wait_for(LONG, "the restarted nodelet to be verifying", || {
                (change_of(&node)["phase"] == "Verifying").then_some(())
            });
            std::fs::write(&gate, b"open").unwrap();
        }
        wait_for(
            LONG,
            &format!("revision {revision} baked after a kill in {phase:?}"),
            || event(&server, "phoenix", "Baked", revision),
        );
        assert!(
            event(&server, "phoenix", "Reverted", revision).is_none()
                && event(&server, "phoenix", "Reverting", revision).is_none(),
            "a good release was reverted after a kill in {phase:?}: {:?}\n{}",
            server.node_events("phoenix"),
            node.log()
        );
        for port in [ports.0, ports.1] {
            assert_eq!(
                http_get(&format!("http://127.0.0.1:{port}/version")).map(|v| v.trim().to_string()),
                Some(version.clone()),
                "after a kill in {phase:?}"
            );
        }
    }
    // Every orphan of the killed nodelets is gone: one process per service.
    for service in ["demo-a", "demo-b"] {
        let dir = node
            .root
            .join("var/lib/shoal/services")
            .join(service)
            .display()
            .to_string();
        wait_for(Duration::from_secs(10), "one process per service", || {
            (processes_mentioning(&dir) == 1).then_some(())
        });
    }
}

fn web_manifest(version: &str, url: &str, sha: &str, port: u16) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: web}}
spec:
  selector: {{matchLabels: {{role: mixed}}}}
  components:
    - name: web
      kind: service
      version: {version}
      artifact: {{url: "{url}", sha256: "{sha}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:{port}"], startSeconds: 1}}
  probes:
    - {{name: web-http, http: {{url: "http://127.0.0.1:{port}/healthz"}}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}
  rollout:
    waves: ["100%"]
    bakeSeconds: 20
    healthyDeadlineSeconds: 30
"#
    )
}

#[test]
fn a_hanging_download_never_delays_another_revert_and_sigterm_still_stops_the_nodelet() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let (hole, _hole) = black_hole();
    let port = free_port();
    let mut node = Nodelet::start(&server.url, "mixed", "role=mixed", &tmp.path().join("node"));
    let (good, good_sha) = demo_tarball(&artifacts.dir, "1.0.0", None);
    server.apply(&web_manifest(
        "1.0.0",
        &artifacts.url_of(&good),
        &good_sha,
        port,
    ));
    wait_for(LONG, "web 1.0.0 healthy", || {
        event(&server, "mixed", "Healthy", 1)
    });

    // Another DesiredState whose artifact server accepts and never answers.
    server.apply(&format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: stalled}}
spec:
  selector: {{matchLabels: {{role: mixed}}}}
  components:
    - name: stuck
      kind: service
      version: 9.9.9
      artifact: {{url: "{hole}", sha256: "{zero}"}}
      service: {{exec: ["bin/demo-service"]}}
"#,
        zero = "0".repeat(64)
    ));
    wait_for(LONG, "the stalled change to be downloading", || {
        (node.journal()["changes"]["stalled"]["phase"] == "Pending").then_some(())
    });

    // A bad web release (healthz fails 2 s after start) while that download hangs.
    let (bad, bad_sha) = demo_tarball(&artifacts.dir, "1.1.0", Some(2));
    server.apply(&web_manifest(
        "1.1.0",
        &artifacts.url_of(&bad),
        &bad_sha,
        port,
    ));
    let revision = server.get("/api/v1/desiredstates/web").unwrap()["metadata"]["revision"]
        .as_u64()
        .unwrap_or(0);
    let started = Instant::now();
    wait_for(LONG, "the bad web release to be reverted", || {
        let journal = node.journal();
        let applied = &journal["applied"]["web"];
        (applied["phase"] == "Reverted" && applied["reverted_revision"].as_u64().unwrap_or(0) >= 2)
            .then_some(())
    });
    // Probe budget: 2 s until it goes bad + 2 failures at 1 s + the step's start time, and slack.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the revert took {:?} (revision {revision})",
        started.elapsed()
    );
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{port}/version")).map(|v| v.trim().to_string()),
        Some("1.0.0".to_string())
    );
    assert_eq!(
        node.journal()["changes"]["stalled"]["phase"],
        "Pending",
        "the stalled download is still waiting (so the revert did not wait for it)"
    );

    // SIGTERM while the download still hangs: out within 10 s.
    let proc = node.proc.as_mut().unwrap();
    let pid = proc.child.id();
    let sent = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = wait_for(Duration::from_secs(20), "the nodelet to exit", || {
        proc.child.try_wait().ok().flatten().map(|_| sent.elapsed())
    });
    assert!(
        exited < Duration::from_secs(10),
        "SIGTERM took {exited:?} with a download hanging"
    );
}

#[test]
fn a_boot_with_the_apiserver_down_and_changed_labels_runs_services_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let port = free_port();
    let mut node = Nodelet::start(
        &server.url,
        "island",
        "role=island",
        &tmp.path().join("node"),
    );
    let (file, sha) = demo_tarball(&artifacts.dir, "1.0.0", None);
    server.apply(&demo_manifest(
        "island",
        "island",
        "1.0.0",
        &artifacts.url_of(&file),
        &sha,
        port,
        1,
        1,
    ));
    wait_for(LONG, "1.0.0 baked", || event(&server, "island", "Baked", 1));
    // Power cut: the nodelet goes (and its supervised service with it), the apiserver too.
    node.proc.as_mut().unwrap().terminate();
    wait_for(Duration::from_secs(10), "the service to stop", || {
        http_get(&format!("http://127.0.0.1:{port}/version"))
            .is_none()
            .then_some(())
    });
    server.kill9();
    // It boots with a new kernel: its self-labels changed, so it must register again.
    node.labels = "role=island,kernel-flavour=new".into();
    let booted = Instant::now();
    node.restart();
    let up = wait_for(Duration::from_secs(30), "the service to run again", || {
        http_get(&format!("http://127.0.0.1:{port}/version")).map(|_| booted.elapsed())
    });
    assert!(
        up < Duration::from_secs(5),
        "services took {up:?} to come back without the apiserver\n{}",
        node.log()
    );
    // And once the apiserver is back, the registration with the new labels goes through.
    server.restart();
    wait_for(LONG, "the new labels to reach the apiserver", || {
        let node = server.get("/api/v1/nodes/island")?;
        (node["metadata"]["labels"]["kernel-flavour"] == "new").then_some(())
    });
}
