//! Footprint benchmark for the nodelet (`just bench-nodelet`).
//!
//! Starts the release apiserver and one release nodelet in a sandbox root with a
//! handful of components (two services, two packages, three probes), heartbeat
//! every 10 s, and measures once everything has baked:
//! - idle RSS of the nodelet process (VmRSS; its services are separate processes),
//! - idle CPU as a share of one core (utime+stime from /proc over the window),
//! - revert time: from the moment the nodelet detects a regression (the time of
//!   its `Reverting` event) to the previous version answering `/version` again,
//!   over several bad releases; median and worst.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant, SystemTime};

use support::*;

fn proc_stat_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn clock_ticks() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0)
}

#[allow(clippy::too_many_arguments)]
fn manifest(
    version: &str,
    url: &str,
    sha: &str,
    port: u16,
    port2: u16,
    svc2: (&str, &str),
    debs: &[(String, String)],
    base: &str,
    root: &std::path::Path,
) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: bench}}
spec:
  selector: {{matchLabels: {{role: bench}}}}
  components:
    - name: demo
      kind: service
      version: {version}
      artifact: {{url: "{url}", sha256: "{sha}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:{port}"], startSeconds: 1}}
    - name: sidecar
      kind: service
      version: 1.0.0
      artifact: {{url: "{base}/{}", sha256: "{}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:{port2}"], startSeconds: 1}}
    - name: bench-pkg-a
      kind: package
      version: "1.0-1"
      artifact: {{url: "{base}/{}", sha256: "{}"}}
    - name: bench-pkg-b
      kind: package
      version: "1.0-1"
      artifact: {{url: "{base}/{}", sha256: "{}"}}
  probes:
    - {{name: demo-http, http: {{url: "http://127.0.0.1:{port}/healthz"}}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}
    - {{name: sidecar-tcp, tcp: {{address: "127.0.0.1:{port2}"}}, periodSeconds: 10}}
    - {{name: pkg-files, exec: {{command: [test, -f, "{}/usr/share/bench-pkg-a/healthy"]}}, periodSeconds: 10}}
  rollout:
    waves: ["100%"]
    bakeSeconds: 30
"#,
        svc2.0,
        svc2.1,
        debs[0].0,
        debs[0].1,
        debs[1].0,
        debs[1].1,
        root.display()
    )
}

fn main() {
    let window = std::env::args()
        .skip_while(|a| a != "--window")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60u64);
    let reverts = std::env::args()
        .skip_while(|a| a != "--reverts")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5usize);
    let tmp = tempfile::tempdir().unwrap();
    let server = Apiserver::start(&tmp.path().join("api"));
    let artifacts = ArtifactServer::start(&tmp.path().join("artifacts"));
    let root = tmp.path().join("node");
    let node = Nodelet::start_with_heartbeat(&server.url, "bench-node", "role=bench", &root, 10);
    let pid = node.proc.as_ref().unwrap().child.id();
    let (port, port2) = (free_port(), free_port());
    let good = demo_tarball(&artifacts.dir, "1.1.0", None);
    let sidecar = demo_tarball(&artifacts.dir, "1.0.0", None);
    let debs = vec![
        deb(&artifacts.dir, "bench-pkg-a", "1.0-1", true),
        deb(&artifacts.dir, "bench-pkg-b", "1.0-1", true),
    ];
    let base = artifacts.url.clone();
    let m = |version: &str, file: &(String, String)| {
        manifest(
            version,
            &artifacts.url_of(&file.0),
            &file.1,
            port,
            port2,
            (&sidecar.0, &sidecar.1),
            &debs,
            &base,
            &root,
        )
    };

    server.apply(&m("1.1.0", &good));
    let baked = |revision: u64| {
        server
            .node_events("bench-node")
            .into_iter()
            .any(|e| e["reason"] == "Baked" && e["revision"] == revision)
    };
    wait_for(Duration::from_secs(180), "the fleet of one to bake", || {
        baked(1).then_some(())
    });
    println!("nodelet pid {pid}: converged (2 services, 2 packages, 3 probes + 2 alive probes), heartbeat 10 s");

    // Idle: nothing changes; the nodelet probes, inventories and heartbeats.
    std::thread::sleep(Duration::from_secs(5));
    let ticks = clock_ticks();
    let before = proc_stat_ticks(pid);
    let started = Instant::now();
    let mut rss = Vec::new();
    while started.elapsed() < Duration::from_secs(window) {
        rss.push(rss_kib(pid));
        std::thread::sleep(Duration::from_secs(1));
    }
    let cpu_seconds = (proc_stat_ticks(pid) - before) as f64 / ticks;
    let cpu_percent = cpu_seconds * 100.0 / started.elapsed().as_secs_f64();
    rss.sort();
    println!(
        "idle over {window} s: RSS median {:.1} MiB, max {:.1} MiB; CPU {cpu_percent:.2} % of one core",
        rss[rss.len() / 2] as f64 / 1024.0,
        *rss.last().unwrap() as f64 / 1024.0
    );

    // Revert time, over several bad releases.
    let mut times = Vec::new();
    for i in 0..reverts {
        let version = format!("1.2.{i}");
        let bad = demo_tarball(&artifacts.dir, &version, Some(2));
        let revision = 2 + i as u64;
        server.apply(&m(&version, &bad));
        let version_url = format!("http://127.0.0.1:{port}/version");
        wait_for(Duration::from_secs(60), "the bad version to serve", || {
            (http_get(&version_url).as_deref() == Some(version.as_str())).then_some(())
        });
        // Poll fast until the old version answers again.
        let back = wait_fast(Duration::from_secs(60), || {
            http_get(&version_url).as_deref() == Some("1.1.0")
        });
        let reverting = wait_for(Duration::from_secs(30), "the Reverting event", || {
            server
                .node_events("bench-node")
                .into_iter()
                .find(|e| e["reason"] == "Reverting" && e["revision"] == revision)
        });
        let detected =
            manifests::wire::rfc3339::parse(reverting["time"].as_str().unwrap()).unwrap();
        let seconds = back
            .duration_since(detected)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        println!("  bad release {version}: previous version serving {:.0} ms after the regression was detected", seconds * 1000.0);
        times.push(seconds);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "revert: median {:.0} ms, worst {:.0} ms over {} bad releases",
        times[times.len() / 2] * 1000.0,
        times.last().unwrap() * 1000.0,
        times.len()
    );
    println!(
        "nodelet RSS after the reverts: {:.1} MiB",
        rss_kib(pid) as f64 / 1024.0
    );
}

/// Polls every 10 ms; returns the wall-clock time the condition first held.
fn wait_fast(limit: Duration, mut check: impl FnMut() -> bool) -> SystemTime {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return SystemTime::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the previous version never came back");
}
