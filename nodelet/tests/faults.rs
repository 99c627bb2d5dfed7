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

/// `wait_for`, printing the node's journal, events and log when it times out.
fn wait_or_dump<T>(
    node: &Nodelet,
    server: &Apiserver,
    what: &str,
    check: impl FnMut() -> Option<T>,
) -> T {
    wait_or_dump_within(LONG, node, server, what, check)
}

/// `wait_or_dump` with its own time limit.
fn wait_or_dump_within<T>(
    limit: Duration,
    node: &Nodelet,
    server: &Apiserver,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "timed out after {limit:?} waiting for {what}\njournal: {}\nevents: {:?}\nlog:\n{}",
                node.journal(),
                server.node_events(&node.name),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

fn web_manifest(version: &str, url: &str, sha: &str, port: u16, bake: u64) -> String {
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
    bakeSeconds: {bake}
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
        1,
    ));
    // The last good revision, so that the next one is a change from it (a revision applied
    // while this one still rolls out would withdraw it from the node).
    wait_for(LONG, "web 1.0.0 to be the last good revision", || {
        server.rollout_complete("web", 1)
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
        20,
    ));
    let revision = server.get("/api/v1/desiredstates/web").unwrap()["metadata"]["revision"]
        .as_u64()
        .unwrap_or(0);
    let started = Instant::now();
    wait_or_dump(&node, &server, "the bad web release to be reverted", || {
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

/// A nodelet with extra flags (limits).
fn nodelet_with(
    server: &str,
    name: &str,
    labels: &str,
    root: &std::path::Path,
    extra: &[&str],
) -> Nodelet {
    let extra = extra.iter().map(|s| s.to_string()).collect();
    Nodelet::start_with_args(server, name, labels, root, 1, extra)
}

/// Answers every request with an endless body of zeros (no length announced).
fn endless_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/endless.tar.gz", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buffer = [0u8; 2048];
                let _ = stream.read(&mut buffer);
                let _ =
                    stream.write_all(b"HTTP/1.0 200 OK\r\ncontent-type: application/gzip\r\n\r\n");
                let zeros = vec![0u8; 64 * 1024];
                while stream.write_all(&zeros).is_ok() {}
            });
        }
    });
    url
}

/// A tar.gz of a few hundred bytes whose one entry claims 8 GiB: a bomb unpacked blindly.
fn gzip_bomb(dir: &std::path::Path) -> (String, String) {
    let mut header = tar::Header::new_gnu();
    header.set_path("bin/demo-service").unwrap();
    header.set_size(8 << 30);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let file = "bomb.tar.gz";
    let out = std::fs::File::create(dir.join(file)).unwrap();
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::best());
    gz.write_all(header.as_bytes()).unwrap();
    gz.write_all(&vec![0u8; 1 << 20]).unwrap();
    gz.finish().unwrap();
    let sha = sha256(&dir.join(file));
    (file.to_string(), sha)
}

fn service_manifest(name: &str, role: &str, version: &str, url: &str, sha: &str) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: {name}}}
spec:
  selector: {{matchLabels: {{role: {role}}}}}
  components:
    - name: {name}
      kind: service
      version: {version}
      artifact: {{url: "{url}", sha256: "{sha}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:1"]}}
"#
    )
}

/// Bytes under a folder.
fn du(path: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let meta = entry.metadata().unwrap();
            total += if meta.is_dir() {
                du(&entry.path())
            } else {
                meta.len()
            };
        }
    }
    total
}

fn no_partials(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |entries| {
        entries
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".partial"))
    })
}

#[test]
fn an_endless_download_and_a_gzip_bomb_are_refused_with_the_limit_named_and_nothing_left() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let node = nodelet_with(
        &server.url,
        "limits",
        "role=limits",
        &tmp.path().join("node"),
        &["--max-artifact-bytes", "8388608"],
    );
    let cache = node.state_dir().join("artifacts");
    let zero = "0".repeat(64);
    server.apply(&service_manifest(
        "endless",
        "limits",
        "1.0.0",
        &endless_server(),
        &zero,
    ));
    server.apply(&service_manifest(
        "zeros",
        "limits",
        "1.0.0",
        "file:///dev/zero",
        &zero,
    ));
    let (bomb, bomb_sha) = gzip_bomb(&artifacts.dir);
    server.apply(&service_manifest(
        "bomb",
        "limits",
        "1.0.0",
        &artifacts.url_of(&bomb),
        &bomb_sha,
    ));
    for url_part in ["endless.tar.gz", "file:///dev/zero"] {
        let refused = wait_for(LONG, &format!("{url_part} refused"), || {
            server.node_events("limits").into_iter().find(|e| {
                e["reason"] == "Reverted"
                    && e["message"].as_str().is_some_and(|m| {
                        m.contains(url_part)
                            && m.contains("exceeds --max-artifact-bytes (8388608 bytes)")
                    })
            })
        });
        assert!(
            refused["message"]
                .as_str()
                .unwrap()
                .contains("nothing was changed"),
            "{refused}"
        );
    }
    let bombed = wait_for(LONG, "the bomb refused", || {
        server.node_events("limits").into_iter().find(|e| {
            e["reason"] == "Reverted"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("unpack cap on bytes"))
        })
    });
    assert!(
        bombed["message"]
            .as_str()
            .unwrap()
            .contains("bin/demo-service"),
        "{bombed}"
    );
    assert!(
        no_partials(&cache),
        "a .partial was left in {}",
        cache.display()
    );
    // Disk use stayed bounded: the cache holds the small bomb, nothing of the endless ones.
    assert!(du(&cache) < 4 << 20, "{} bytes in the cache", du(&cache));
    let services = node.root.join("var/lib/shoal/services/bomb");
    let left: Vec<String> = std::fs::read_dir(&services)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|n| n.starts_with(".") && n.ends_with(".json")),
        "a half-made version folder is left: {left:?}"
    );
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn condition(server: &Apiserver, node: &str, kind: &str) -> Option<(String, String)> {
    let node = server.get(&format!("/api/v1/nodes/{node}"))?;
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
}

#[test]
fn a_full_disk_gives_disk_pressure_keeps_services_running_and_the_nodelet_up() {
    if !is_root() {
        println!("SKIPPED: a_full_disk_gives_disk_pressure_keeps_services_running_and_the_nodelet_up needs root to mount a tmpfs");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let root = tmp.path().join("node");
    std::fs::create_dir_all(&root).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=200m",
            "tmpfs",
            root.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    if !mounted.success() {
        println!("SKIPPED: a_full_disk_gives_disk_pressure_keeps_services_running_and_the_nodelet_up: mount -t tmpfs failed here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .args(["-l", self.0.to_str().unwrap()])
                .status();
        }
    }
    let _unmount = Unmount(root.clone());
    let port = free_port();
    let mut node = nodelet_with(
        &server.url,
        "full",
        "role=full",
        &root,
        &["--min-free-bytes", "33554432"],
    );
    let (v1, sha1) = demo_tarball(&artifacts.dir, "1.0.0", None);
    server.apply(&demo_manifest(
        "full",
        "full",
        "1.0.0",
        &artifacts.url_of(&v1),
        &sha1,
        port,
        1,
        1,
    ));
    wait_for(LONG, "1.0.0 baked", || event(&server, "full", "Baked", 1));
    assert_eq!(
        condition(&server, "full", "DiskPressure")
            .map(|c| c.0)
            .as_deref(),
        Some("False")
    );

    // Something else on the node fills its disk to the last byte.
    let _ = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", root.join("filler").display()),
            "bs=1M",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    let (_, message) = wait_for(LONG, "DiskPressure", || {
        condition(&server, "full", "DiskPressure").filter(|c| c.0 == "True")
    });
    assert!(message.contains("MiB free"), "{message}");
    // A new release cannot be downloaded: it waits, and changes nothing.
    let (v2, sha2) = demo_tarball(&artifacts.dir, "1.1.0", None);
    // A deadline longer than the outage: the rollout waits for this node instead of failing it.
    server.apply(
        &demo_manifest(
            "full",
            "full",
            "1.1.0",
            &artifacts.url_of(&v2),
            &sha2,
            port,
            1,
            1,
        )
        .replace("healthyDeadlineSeconds: 30", "healthyDeadlineSeconds: 600"),
    );
    wait_for(LONG, "the release to wait for space", || {
        server
            .node_events("full")
            .into_iter()
            .find(|e| e["reason"] == "DiskPressure" && e["revision"] == 2)
    });
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{port}/version")).map(|v| v.trim().to_string()),
        Some("1.0.0".to_string()),
        "the running service was touched"
    );
    assert!(
        !node.exited(),
        "the nodelet exited on a full disk\n{}",
        node.log()
    );
    // Space comes back: the condition clears and the release goes through.
    std::fs::remove_file(root.join("filler")).unwrap();
    wait_for(LONG, "DiskPressure to clear", || {
        condition(&server, "full", "DiskPressure").filter(|c| c.0 == "False")
    });
    wait_for(LONG, "1.1.0 baked once there is room", || {
        event(&server, "full", "Baked", 2)
    });
    node.proc.as_mut().unwrap().terminate();
}

/// A `.deb` whose postinst takes `seconds`: its install (and a revert to it) is slow.
fn slow_deb(dir: &std::path::Path, version: &str, seconds: u64) -> (String, String) {
    let staging = dir.join(format!("slowpkg-{version}"));
    std::fs::create_dir_all(staging.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(staging.join("usr/share/slowpkg")).unwrap();
    std::fs::write(staging.join("usr/share/slowpkg/VERSION"), version).unwrap();
    std::fs::write(
        staging.join("DEBIAN/control"),
        format!("Package: slowpkg\nVersion: {version}\nArchitecture: all\nMaintainer: shoal tests <t@example.invalid>\nDescription: a package that configures slowly\n"),
    )
    .unwrap();
    let postinst = staging.join("DEBIAN/postinst");
    std::fs::write(&postinst, format!("#!/bin/sh\nsleep {seconds}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&postinst, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = format!("slowpkg_{version}_all.deb");
    let status = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&staging)
        .arg(dir.join(&file))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let sha = sha256(&dir.join(&file));
    (file, sha)
}

#[allow(clippy::too_many_arguments)]
fn slow_pair(pkg: (&str, &str, &str), demo: (&str, &str, &str), port: u16) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: slow}}
spec:
  selector: {{matchLabels: {{role: slow}}}}
  components:
    - name: slowpkg
      kind: package
      version: {pv}
      artifact: {{url: "{pu}", sha256: "{ps}"}}
    - name: demo
      kind: service
      version: {dv}
      artifact: {{url: "{du}", sha256: "{ds}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:{port}"], startSeconds: 1}}
  probes:
    - {{name: demo-http, http: {{url: "http://127.0.0.1:{port}/healthz"}}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}
  rollout:
    waves: ["100%"]
    bakeSeconds: 10
    healthyDeadlineSeconds: 60
"#,
        pv = pkg.0,
        pu = pkg.1,
        ps = pkg.2,
        dv = demo.0,
        du = demo.1,
        ds = demo.2,
    )
}

#[test]
fn kill_9_while_reverting_a_bad_release_still_reverts_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let port = free_port();
    let mut node = Nodelet::start(&server.url, "undo", "role=slow", &tmp.path().join("node"));
    let (p1, p1sha) = slow_deb(&artifacts.dir, "1.0-1", 4);
    let (p2, p2sha) = slow_deb(&artifacts.dir, "2.0-1", 4);
    let (d1, d1sha) = demo_tarball(&artifacts.dir, "1.0.0", None);
    let (d2, d2sha) = demo_tarball(&artifacts.dir, "1.1.0", Some(3));
    let (p1u, p2u, d1u, d2u) = (
        artifacts.url_of(&p1),
        artifacts.url_of(&p2),
        artifacts.url_of(&d1),
        artifacts.url_of(&d2),
    );
    server.apply(&slow_pair(
        ("1.0-1", &p1u, &p1sha),
        ("1.0.0", &d1u, &d1sha),
        port,
    ));
    wait_for(LONG, "revision 1 baked", || {
        event(&server, "undo", "Baked", 1)
    });

    // A bad release: healthz fails 3 s after start. The revert puts the service back, then
    // reinstalls the old package, whose postinst takes 4 s: the nodelet dies right there,
    // leaving its dpkg running as an orphan.
    server.apply(&slow_pair(
        ("2.0-1", &p2u, &p2sha),
        ("1.1.0", &d2u, &d2sha),
        port,
    ));
    wait_or_dump(&node, &server, "the package being put back", || {
        let change = node.journal()["changes"]["slow"].clone();
        (change["phase"] == "Reverting"
            && change["steps"][1]["state"] == "Reverted"
            && change["steps"][0]["state"] != "Reverted")
            .then_some(())
    });
    node.kill9();
    node.restart();
    wait_for(LONG, "the revert to finish after the restart", || {
        server.node_events("undo").into_iter().find(|e| {
            (e["reason"] == "Reverted" || e["reason"] == "RevertFailed") && e["revision"] == 2
        })
    });
    assert!(
        event(&server, "undo", "RevertFailed", 2).is_none(),
        "the revert failed after the restart: {:?}\n{}",
        server.node_events("undo"),
        node.log()
    );
    assert_eq!(
        dpkg_version(&node.root, "slowpkg").as_deref(),
        Some("1.0-1")
    );
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{port}/version")).map(|v| v.trim().to_string()),
        Some("1.0.0".to_string())
    );
    let journal = node.journal();
    assert!(
        journal["changes"].as_object().is_some_and(|c| c.is_empty()),
        "nothing left in flight: {journal}"
    );
}

/// `shoal rollout undo` while the only node of the group bakes the new version: the apiserver
/// withdraws that revision from the node's assignment (it now holds the undo's revision, the
/// old spec). The node puts the old version back at once — without finishing its 300 s bake
/// or waiting for a probe to fail — reports it as a withdrawal, not a failure, and then runs
/// the assigned revision, Healthy, with nothing left to change.
#[test]
fn an_undo_while_a_node_bakes_reverts_it_at_once_and_the_assigned_revision_is_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let port = free_port();
    let node = Nodelet::start(&server.url, "undone", "role=undo", &tmp.path().join("node"));
    let (v1, sha1) = demo_tarball(&artifacts.dir, "1.0.0", None);
    let (v2, sha2) = demo_tarball(&artifacts.dir, "1.1.0", None);
    let version_url = format!("http://127.0.0.1:{port}/version");
    let manifest = |version: &str, file: &str, sha: &str, bake: u64| {
        demo_manifest(
            "undo",
            "undo",
            version,
            &artifacts.url_of(file),
            sha,
            port,
            bake,
            1,
        )
    };

    server.apply(&manifest("1.0.0", &v1, &sha1, 1));
    wait_or_dump(&node, &server, "revision 1 to be the last good one", || {
        server.rollout_complete("undo", 1)
    });
    server.apply(&manifest("1.1.0", &v2, &sha2, 300));
    wait_or_dump(&node, &server, "revision 2 baking", || {
        let change = &node.journal()["changes"]["undo"];
        (change["target"]["revision"] == 2 && change["phase"] == "Baking").then_some(())
    });
    assert_eq!(http_get(&version_url).as_deref(), Some("1.1.0"));

    let undone = Instant::now();
    let undo = server.post("/api/v1/rollouts/undo/undo");
    let revision = undo["results"][0]["revision"].as_u64().unwrap_or(0);
    assert_eq!(
        revision, 3,
        "the undo applies revision 1's spec as revision 3: {undo}"
    );
    // Within a few seconds, not after the bake: the old version serves again.
    wait_or_dump_within(
        Duration::from_secs(8),
        &node,
        &server,
        "1.0.0 back after the undo",
        || {
            (node.service_current("demo").as_deref() == Some("1.0.0")
                && http_get(&version_url).as_deref() == Some("1.0.0"))
            .then_some(())
        },
    );
    eprintln!("1.0.0 served again {:?} after the undo", undone.elapsed());
    wait_or_dump_within(
        Duration::from_secs(8),
        &node,
        &server,
        "revision 3 reported Healthy",
        || (server.applied("undone", "undo") == Some(("Healthy".into(), 3))).then_some(()),
    );

    let events = server.node_events("undone");
    let of = |reason: &str| {
        events
            .iter()
            .find(|e| e["reason"] == reason && e["revision"] == 2)
            .cloned()
    };
    let withdrawn = of("Withdrawn").expect("a Withdrawn event");
    assert!(
        withdrawn["message"]
            .as_str()
            .unwrap()
            .contains("revision 2 was withdrawn by the apiserver"),
        "{withdrawn}"
    );
    let reverted = of("Reverted").expect("a Reverted event");
    let message = reverted["message"].as_str().unwrap();
    assert_eq!(
        reverted["type"], "Normal",
        "a withdrawal is no failure: {reverted}"
    );
    assert!(
        message.contains("withdrawn") && message.contains("demo back at 1.0.0"),
        "{message}"
    );
    assert!(
        !message.contains("probe"),
        "not reported as a probe failure: {message}"
    );
    assert!(of("Reverting").is_none(), "no failure revert: {events:?}");
    assert!(
        of("Baked").is_none(),
        "the bake was not finished: {events:?}"
    );
    // Not remembered as a revision that failed here.
    let journal = node.journal();
    assert!(
        journal["failed_revisions"]["undo"]
            .as_array()
            .is_none_or(|r| r.is_empty()),
        "{journal}"
    );
    assert!(journal["changes"]["undo"].is_null(), "{journal}");
    // The report: the component at its version, Healthy, at the assigned revision.
    let report = server.get("/api/v1/nodes/undone").unwrap();
    let component = &report["status"]["report"]["components"][0];
    assert_eq!(component["version"], "1.0.0", "{report}");
    assert_eq!(component["phase"], "Healthy", "{report}");
    assert_eq!(component["revision"], 3, "{report}");
    // And the undo's rollout goes through on that report.
    wait_or_dump(
        &node,
        &server,
        "the rollout of revision 3 to complete",
        || {
            server
                .rollout("undo")
                .filter(|r| r["spec"]["revision"] == 3 && r["status"]["phase"] == "Complete")
        },
    );
}

/// Puts a nodelet release under `<state>/releases/VERSION/nodelet`: a copy of the nodelet
/// being tested, or a script standing for a broken one.
fn release(releases: &std::path::Path, version: &str, script: Option<&str>) {
    use std::os::unix::fs::PermissionsExt;
    let dir = releases.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nodelet");
    match script {
        Some(script) => std::fs::write(&path, script).unwrap(),
        None => {
            std::fs::copy(bin("nodelet"), &path).unwrap();
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn point(releases: &std::path::Path, link: &str, version: &str) {
    let path = releases.join(link);
    let _ = std::fs::remove_file(&path);
    std::os::unix::fs::symlink(version, path).unwrap();
}

fn link(releases: &std::path::Path, name: &str) -> String {
    std::fs::read_link(releases.join(name))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn put_on_trial(releases: &std::path::Path, version: &str, deadline_seconds: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let trial = serde_json::json!({
        "version": version, "previous": "0.1.0", "startedAt": now,
        "deadlineSeconds": deadline_seconds, "starts": 0, "maxStarts": 3, "committed": false,
    });
    std::fs::write(releases.join("trial.json"), trial.to_string()).unwrap();
    point(releases, "current", version);
}

/// A heartbeat the apiserver accepted after `after` (RFC 3339 strings compare in order).
fn heartbeat_after(server: &Apiserver, node: &str, after: &str) -> Option<String> {
    let beat = server.get(&format!("/api/v1/nodes/{node}"))?["status"]["lastHeartbeat"]
        .as_str()?
        .to_string();
    (beat.as_str() > after).then_some(beat)
}

/// The launcher (docs/self-update.md), with real processes: a nodelet release on trial that
/// crash-loops is put back after its starts, one that runs but never commits is stopped and
/// put back at its deadline, and each time the release running again is an agent that
/// heartbeats, with the outcome left for it to report; a release that commits stays and
/// becomes the good one. SIGTERM to the launcher stops the agent it runs.
#[test]
fn the_launcher_puts_back_a_nodelet_release_that_crash_loops_or_never_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("server"));
    let root = tmp.path().join("node");
    let releases = root.join("var/lib/shoal/nodelet/releases");
    release(&releases, "0.1.0", None);
    point(&releases, "good", "0.1.0");

    // 1. A release that exits at once, three starts in a row.
    release(
        &releases,
        "0.2.0",
        Some("#!/bin/sh\necho 'broken release 0.2.0 cannot start' >&2\nexit 3\n"),
    );
    put_on_trial(&releases, "0.2.0", 120);
    let mut node = Nodelet::start(&server.url, "self-1", "role=self", &root);
    let outcome: serde_json::Value =
        wait_or_dump(&node, &server, "the crash loop is put back", || {
            serde_json::from_slice(&std::fs::read(releases.join("outcome.json")).ok()?).ok()
        });
    assert_eq!(outcome["version"], "0.2.0", "{outcome}");
    assert_eq!(outcome["previous"], "0.1.0", "{outcome}");
    assert!(
        outcome["reason"]
            .as_str()
            .unwrap()
            .contains("exited 3 times without becoming healthy"),
        "{outcome}"
    );
    assert!(
        outcome["logs"]
            .to_string()
            .contains("broken release 0.2.0 cannot start"),
        "{outcome}"
    );
    assert_eq!(link(&releases, "current"), "0.1.0");
    assert!(!releases.join("trial.json").exists());
    let beat = wait_or_dump(&node, &server, "0.1.0 registers and heartbeats", || {
        heartbeat_after(&server, "self-1", "")
    });
    wait_or_dump(&node, &server, "0.1.0 heartbeats again", || {
        heartbeat_after(&server, "self-1", &beat)
    });

    // 2. A release that runs and never commits: stopped at its 6 s deadline.
    node.proc.as_mut().unwrap().terminate();
    assert!(node.exited(), "SIGTERM stops the launcher and its agent");
    std::fs::remove_file(releases.join("outcome.json")).unwrap();
    release(
        &releases,
        "0.3.0",
        Some("#!/bin/sh\necho 'release 0.3.0 hangs'\nexec sleep 3617\n"),
    );
    put_on_trial(&releases, "0.3.0", 6);
    node.restart();
    let hung = "sleep\u{0}3617";
    wait_or_dump(&node, &server, "the hanging release runs", || {
        (processes_mentioning(hung) == 1).then_some(())
    });
    let outcome: serde_json::Value = wait_or_dump(&node, &server, "the hang is put back", || {
        serde_json::from_slice(&std::fs::read(releases.join("outcome.json")).ok()?).ok()
    });
    assert_eq!(outcome["version"], "0.3.0", "{outcome}");
    assert!(
        outcome["reason"].as_str().unwrap().contains("within 6s"),
        "{outcome}"
    );
    assert!(
        outcome["logs"].to_string().contains("release 0.3.0 hangs"),
        "{outcome}"
    );
    assert_eq!(link(&releases, "current"), "0.1.0");
    wait_or_dump(&node, &server, "the hung release is stopped", || {
        (processes_mentioning(hung) == 0).then_some(())
    });
    let now = server.get("/api/v1/nodes/self-1").unwrap()["status"]["lastHeartbeat"]
        .as_str()
        .unwrap()
        .to_string();
    wait_or_dump(&node, &server, "0.1.0 heartbeats after the revert", || {
        heartbeat_after(&server, "self-1", &now)
    });

    // 3. A release that commits (the agent's part, stood in for here by the record) stays.
    node.proc.as_mut().unwrap().terminate();
    std::fs::remove_file(releases.join("outcome.json")).unwrap();
    release(&releases, "0.4.0", None);
    put_on_trial(&releases, "0.4.0", 120);
    node.restart();
    let agent = releases.join("0.4.0/nodelet");
    wait_or_dump(&node, &server, "0.4.0 runs", || {
        (processes_mentioning(agent.to_str().unwrap()) == 1).then_some(())
    });
    let mut trial: serde_json::Value =
        serde_json::from_slice(&std::fs::read(releases.join("trial.json")).unwrap()).unwrap();
    assert_eq!(trial["starts"], 1, "{trial}");
    trial["committed"] = true.into();
    std::fs::write(releases.join("trial.json"), trial.to_string()).unwrap();
    wait_or_dump(&node, &server, "0.4.0 is the good release", || {
        (link(&releases, "good") == "0.4.0" && !releases.join("trial.json").exists()).then_some(())
    });
    assert_eq!(link(&releases, "current"), "0.4.0");
    assert!(!releases.join("outcome.json").exists());
    let now = server.get("/api/v1/nodes/self-1").unwrap()["status"]["lastHeartbeat"]
        .as_str()
        .unwrap()
        .to_string();
    wait_or_dump(&node, &server, "0.4.0 heartbeats", || {
        heartbeat_after(&server, "self-1", &now)
    });
    assert_eq!(processes_mentioning(agent.to_str().unwrap()), 1);

    // 4. One launcher per releases folder, one agent per state dir: a second of either is
    // refused at once, naming the one that runs.
    let second = |launched: Option<u32>| {
        let mut command = command("nodelet");
        command.args([
            "--server",
            &server.url,
            "--join-token",
            JOIN,
            "--name",
            "self-1",
            "--root",
            root.to_str().unwrap(),
        ]);
        if let Some(pid) = launched {
            // An agent whose launcher is this test.
            command.env("SHOAL_LAUNCHED", pid.to_string());
        }
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = second(None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("another nodelet launcher runs"), "{stderr}");
    let (code, stderr) = second(Some(std::process::id()));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("another nodelet agent runs"), "{stderr}");
    assert_eq!(processes_mentioning(agent.to_str().unwrap()), 1);
}
