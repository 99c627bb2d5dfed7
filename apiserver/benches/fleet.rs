//! Fleet benchmark for the apiserver: N simulated nodes register, heartbeat and
//! hold their assignment long poll, each over its own connection.
//!
//! Run with `just bench-apiserver` (or `cargo bench -p apiserver --bench fleet -- --nodes 1000`).
//! It starts the release `apiserver` binary in a temp dir and prints:
//! - heartbeat p50/p99 latency with N nodes at the given interval,
//! - how long an apply takes to reach every connected node (p50/p99/max),
//! - saturated throughput of the heartbeat endpoint and of `/healthz` (a
//!   trivial axum handler) measured in the same run, and their ratio,
//! - the apiserver's peak RSS (VmHWM).
//!
//! Each node uses one HTTP/2 connection, carrying both its long poll and its
//! heartbeats: with HTTP/1.1 a node would need two sockets, and 10,000 nodes
//! would exceed this machine's 20,000 open files in the client process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// A plain mutex: each lock is a push onto a vector, never held across an await, and the
// load generator shares the two cores with the server it measures.
use std::sync::Mutex;

struct Options {
    nodes: usize,
    interval: Duration,
    steady: Duration,
    saturate: Duration,
    concurrency: usize,
    binary: String,
    /// Keep the store in a throwaway PostgreSQL cluster instead of sled.
    postgres: bool,
    /// Only open the connections (one `/healthz` each) and report the server's RSS: the
    /// floor the HTTP stack alone sets.
    floor: bool,
}

fn options() -> Options {
    let mut o = Options {
        nodes: 1000,
        interval: Duration::from_secs(10),
        steady: Duration::from_secs(30),
        saturate: Duration::from_secs(10),
        concurrency: 64,
        binary: concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/apiserver").to_string(),
        postgres: false,
        floor: false,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--nodes" => o.nodes = value.parse().expect("--nodes N"),
            "--interval" => {
                o.interval = Duration::from_secs(value.parse().expect("--interval SECONDS"))
            }
            "--steady" => o.steady = Duration::from_secs(value.parse().expect("--steady SECONDS")),
            "--saturate" => {
                o.saturate = Duration::from_secs(value.parse().expect("--saturate SECONDS"))
            }
            "--concurrency" => o.concurrency = value.parse().expect("--concurrency N"),
            "--apiserver" => o.binary = value,
            "--postgres" => {
                o.postgres = true;
                i += 1;
                continue;
            }
            "--floor" => {
                o.floor = true;
                i += 1;
                continue;
            }
            "--bench" => {
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const JOIN: &str = "bench-join-token-0123456789abcdef";
const OPERATOR: &str = "bench-operator-token-0123456789ab";

fn start(binary: &str, store: Option<&str>, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: bench, role: operator, token: {OPERATOR}}}\njoinTokens:\n  - {{name: fleet, token: {JOIN}}}\n"),
    )
    .expect("tokens file");
    let mut child = Command::new(binary)
        .args([
            "--data",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            tokens.to_str().unwrap(),
        ])
        .args(store.map(|url| ["--store", url]).into_iter().flatten())
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {binary}: {e} (build it with `cargo build --release -p apiserver`)"
            )
        });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    Server {
        child,
        url,
        _dir: dir,
    }
}

/// A memory figure of `/proc/PID/status` (`VmHWM`, `VmRSS`), in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| {
            l.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(':'))
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM")
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS")
}

/// `nodes` HTTP/2 connections that each asked `/healthz` once and stay open: the server's
/// RSS before and with them.
async fn floor(url: &str, pid: u32, nodes: usize) {
    let before = rss_mib(pid);
    let mut clients = Vec::with_capacity(nodes);
    for _ in 0..nodes {
        let c = client();
        let r = c.get(format!("{url}/healthz")).send().await.unwrap();
        assert!(r.status().is_success());
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with = rss_mib(pid);
    println!(
        "floor: {nodes} idle HTTP/2 connections: RSS {before:.1} MiB before, {with:.1} MiB with them ({:.1} KiB each)",
        (with - before) * 1024.0 / nodes as f64
    );
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn manifest(version: &str) -> String {
    format!(
        "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {{name: bench}}\nspec:\n  selector: {{matchLabels: {{role: bench}}}}\n  components:\n    - {{name: tool, kind: package, version: \"{version}\"}}\n  rollout: {{waves: [\"100%\"], bakeSeconds: 0}}\n"
    )
}

/// A heartbeat of node `i`, Healthy at `revision` of `bench` once it was assigned one (as
/// a nodelet reports, so the rollout's waves bake).
fn report_body(i: usize, revision: u64) -> String {
    let (applied, components) = if revision == 0 {
        (String::new(), String::new())
    } else {
        (
            format!(
                r#"{{"desiredState":"bench","revision":{revision},"phase":"Healthy","healthySince":"2026-01-01T00:00:{:02}Z"}}"#,
                revision % 60
            ),
            format!(
                r#"{{"name":"tool","kind":"package","desiredState":"bench","revision":{revision},"desiredVersion":"1.0","version":"1.0","phase":"Healthy"}}"#
            ),
        )
    };
    format!(
        r#"{{"nodeletVersion":"bench","observedGeneration":0,"host":{{"cpuPercent":{}.5,"memoryUsedBytes":1000000,"memoryTotalBytes":8000000000,"diskUsedBytes":5,"diskTotalBytes":10,"uptimeSeconds":100,"processCount":80}},"applied":[{applied}],"components":[{components}]}}"#,
        i % 100
    )
}

/// The part of a long poll's answer a simulated node reads.
#[derive(serde::Deserialize)]
struct Answer {
    generation: Option<u64>,
    #[serde(default)]
    states: Vec<AssignedState>,
}

#[derive(serde::Deserialize)]
struct AssignedState {
    name: String,
    revision: Option<u64>,
}

struct Node {
    name: String,
    token: String,
    client: reqwest::Client,
    /// The revision of `bench` its long poll last received (0: none yet).
    assigned: AtomicU64,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn saturate(
    url: String,
    duration: Duration,
    concurrency: usize,
    heartbeat: Option<Arc<Vec<Node>>>,
) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let count = count.clone();
        let url = url.clone();
        let nodes = heartbeat.clone();
        tasks.push(tokio::spawn(async move {
            let own = client();
            let mut i = worker;
            while Instant::now() < stop {
                let result = match &nodes {
                    None => own
                        .get(format!("{url}/healthz"))
                        .send()
                        .await
                        .map(|r| r.status()),
                    Some(nodes) => {
                        let node = &nodes[i % nodes.len()];
                        own.put(format!("{url}/api/v1/nodes/{}/status", node.name))
                            .bearer_auth(&node.token)
                            .header("content-type", "application/json")
                            .body(report_body(i, node.assigned.load(Ordering::Relaxed)))
                            .send()
                            .await
                            .map(|r| r.status())
                    }
                };
                match result {
                    Ok(status) if status.is_success() => {}
                    Ok(status) => panic!("request failed during saturation: {status}"),
                    Err(e) => panic!("request failed during saturation: {e:?}"),
                }
                count.fetch_add(1, Ordering::Relaxed);
                i += concurrency;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let o = options();
    let postgres = o.postgres.then(|| {
        apiserver::store::testing::TestPostgres::start()
            .unwrap_or_else(|e| panic!("--postgres: {e}"))
    });
    let store_url = match &postgres {
        Some(cluster) => Some(cluster.create_database("bench").await),
        None => None,
    };
    // The floor's connections carry no token: let them all in.
    let extra: &[&str] = if o.floor {
        &[
            "--max-anonymous-connections",
            "100000",
            "--max-anonymous-connections-per-peer",
            "100000",
        ]
    } else {
        &[]
    };
    let server = start(&o.binary, store_url.as_deref(), extra);
    let url = server.url.clone();
    let pid = server.child.id();
    println!(
        "apiserver {url} (pid {pid}); {} nodes, heartbeat every {}s, store {}",
        o.nodes,
        o.interval.as_secs(),
        if o.postgres { "postgres" } else { "sled" }
    );

    if o.floor {
        floor(&url, pid, o.nodes).await;
        drop(server);
        std::process::exit(0);
    }

    let admin = client();
    let apply = |version: &'static str| {
        let admin = admin.clone();
        let url = url.clone();
        async move {
            let r = admin
                .post(format!("{url}/api/v1/apply"))
                .bearer_auth(OPERATOR)
                .body(manifest(version))
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "apply failed: {}",
                r.text().await.unwrap()
            );
        }
    };
    apply("1.0").await;

    // Register every node, 64 at a time.
    let started = Instant::now();
    let mut nodes = Vec::with_capacity(o.nodes);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
    let mut handles = Vec::new();
    for i in 0..o.nodes {
        let url = url.clone();
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        handles.push(tokio::spawn(async move {
            let client = client();
            let name = format!("node-{i:05}");
            let body = format!(
                r#"{{"name":"{name}","labels":{{"role":"bench","site":"site-{}"}}}}"#,
                i % 8
            );
            let r = client
                .post(format!("{url}/api/v1/nodes/register"))
                .bearer_auth(JOIN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            let v: serde_json::Value = r.json().await.unwrap();
            drop(permit);
            Node {
                name,
                token: v["token"].as_str().unwrap().to_string(),
                client,
                assigned: AtomicU64::new(0),
            }
        }));
    }
    for h in handles {
        nodes.push(h.await.unwrap());
    }
    let register_secs = started.elapsed().as_secs_f64();
    println!(
        "registered {} nodes in {register_secs:.1}s ({:.0}/s)",
        o.nodes,
        o.nodes as f64 / register_secs
    );
    let nodes = Arc::new(nodes);

    // Every node: one long poll loop and one heartbeat loop on its own connection.
    let heartbeat_latency = Arc::new(Mutex::new(Vec::<(Instant, f64)>::new()));
    // Every long-poll answer: when, and whether it was unchanged (a timeout or a wake-up
    // that moved nothing).
    let answers = Arc::new(Mutex::new(Vec::<(Instant, bool)>::new()));
    let fleet_started = Instant::now();
    let propagation = Arc::new(Mutex::new(Vec::<f64>::new()));
    let applied_at = Arc::new(Mutex::new(None::<Instant>));
    let recording = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(true));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..nodes.len() {
        {
            let nodes = nodes.clone();
            let url = url.clone();
            let latency = heartbeat_latency.clone();
            let recording = recording.clone();
            let running = running.clone();
            let failures = failures.clone();
            let interval = o.interval;
            let phase = interval.mul_f64(i as f64 / o.nodes as f64);
            tasks.push(tokio::spawn(async move {
                let node = &nodes[i];
                tokio::time::sleep(phase).await;
                let mut tick = tokio::time::interval(interval);
                while running.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let t = Instant::now();
                    let r = node
                        .client
                        .put(format!("{url}/api/v1/nodes/{}/status", node.name))
                        .bearer_auth(&node.token)
                        .header("content-type", "application/json")
                        .body(report_body(i, node.assigned.load(Ordering::Relaxed)))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {
                            if recording.load(Ordering::Relaxed) {
                                latency
                                    .lock()
                                    .unwrap()
                                    .push((t, t.elapsed().as_secs_f64() * 1000.0));
                            }
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        let nodes = nodes.clone();
        let url = url.clone();
        let propagation = propagation.clone();
        let applied_at = applied_at.clone();
        let running = running.clone();
        let failures = failures.clone();
        let answers = answers.clone();
        tasks.push(tokio::spawn(async move {
            let node = &nodes[i];
            let mut since: Option<u64> = None;
            while running.load(Ordering::Relaxed) {
                let query = match since {
                    Some(g) => format!("?since={g}&waitSeconds=60"),
                    None => String::new(),
                };
                let r = node
                    .client
                    .get(format!(
                        "{url}/api/v1/nodes/{}/assignment{query}",
                        node.name
                    ))
                    .bearer_auth(&node.token)
                    .send()
                    .await;
                let Ok(r) = r else {
                    failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                // Only what the simulated node needs, not a document tree: the load
                // generator's CPU is taken from the server's two cores.
                let answer = match r.bytes().await {
                    Ok(body) => serde_json::from_slice::<Answer>(&body),
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let Ok(answer) = answer else {
                    failures.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let generation = answer.generation;
                if let Some(revision) = answer
                    .states
                    .iter()
                    .find(|s| s.name == "bench")
                    .and_then(|s| s.revision)
                {
                    node.assigned.store(revision, Ordering::Relaxed);
                }
                answers
                    .lock()
                    .unwrap()
                    .push((Instant::now(), generation == since));
                if since.is_some() && generation != since {
                    if let Some(at) = *applied_at.lock().unwrap() {
                        propagation
                            .lock()
                            .unwrap()
                            .push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                since = generation;
            }
        }));
    }

    // Let every node connect and settle: each sends its first heartbeat (within one
    // interval), then the first revision's rollout reaches every node (it waits for them to
    // be Ready) and completes. Only then is the fleet in steady state.
    tokio::time::sleep(o.interval).await;
    let settled = Instant::now() + Duration::from_secs(120);
    loop {
        let phase = admin
            .get(format!("{url}/api/v1/rollouts/bench"))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .ok();
        let phase = match phase {
            Some(r) => r.json::<serde_json::Value>().await.ok(),
            None => None,
        };
        if phase.as_ref().and_then(|r| r["status"]["phase"].as_str()) == Some("Complete") {
            break;
        }
        assert!(
            Instant::now() < settled,
            "the first rollout did not complete within 2 minutes: {:?}",
            phase.as_ref().map(|r| &r["status"])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    recording.store(true, Ordering::Relaxed);
    tokio::time::sleep(o.steady / 2).await;
    *applied_at.lock().unwrap() = Some(Instant::now());
    let cpu_before = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    apply("1.1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_after = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    println!(
        "CPU in the 2 s from the apply: apiserver {:.2} s, load generator {:.2} s (of 4 on two cores)",
        cpu_after.0 - cpu_before.0,
        cpu_after.1 - cpu_before.1
    );
    tokio::time::sleep((o.steady / 2).saturating_sub(Duration::from_secs(2))).await;
    recording.store(false, Ordering::Relaxed);

    let samples = heartbeat_latency.lock().unwrap().clone();
    let applied = applied_at.lock().unwrap().expect("applied");
    // Where the slow heartbeats are, by second from the apply (negative: before it).
    let mut slow: std::collections::BTreeMap<i64, usize> = Default::default();
    for (sent, ms) in &samples {
        if *ms > 50.0 {
            let at = if *sent >= applied {
                sent.duration_since(applied).as_secs_f64()
            } else {
                -applied.duration_since(*sent).as_secs_f64()
            };
            *slow.entry(at.floor() as i64).or_default() += 1;
        }
    }
    println!(
        "heartbeats over 50 ms, by second from the apply: {}",
        slow.iter()
            .map(|(s, n)| format!("{s:+}s:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut by_second: std::collections::BTreeMap<u64, (usize, usize)> = Default::default();
    for (at, unchanged) in answers.lock().unwrap().iter() {
        let entry = by_second
            .entry(at.duration_since(fleet_started).as_secs())
            .or_default();
        if *unchanged {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }
    println!(
        "long-poll answers by second from the fleet's start (changed/unchanged), apply at {:.1}s: {}",
        applied.duration_since(fleet_started).as_secs_f64(),
        by_second
            .iter()
            .map(|(s, (c, u))| format!("{s}s:{c}/{u}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut hb: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
    hb.sort_by(f64::total_cmp);
    let mut prop = propagation.lock().unwrap().clone();
    prop.sort_by(f64::total_cmp);
    let rate = hb.len() as f64 / o.steady.as_secs_f64();
    println!(
        "steady state: {} heartbeats in {}s ({rate:.0}/s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; failures {}",
        hb.len(),
        o.steady.as_secs(),
        percentile(&hb, 50.0),
        percentile(&hb, 99.0),
        hb.last().copied().unwrap_or(f64::NAN),
        failures.load(Ordering::Relaxed)
    );
    println!(
        "apply → node: {}/{} nodes saw the change: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        prop.len(),
        o.nodes,
        percentile(&prop, 50.0),
        percentile(&prop, 99.0),
        prop.last().copied().unwrap_or(f64::NAN)
    );
    let connected_peak = peak_rss_mib(pid);
    println!(
        "apiserver RSS with {} nodes connected: {:.1} MiB now, {connected_peak:.1} MiB at peak",
        o.nodes,
        rss_mib(pid)
    );

    // Saturated throughput, same server, same run (the fleet's connections stay open).
    let healthz = saturate(url.clone(), o.saturate, o.concurrency, None).await;
    let heartbeat = saturate(url.clone(), o.saturate, o.concurrency, Some(nodes.clone())).await;
    println!(
        "saturated ({} clients, {}s each): /healthz {healthz:.0} req/s, heartbeat {heartbeat:.0} req/s, ratio {:.2}",
        o.concurrency,
        o.saturate.as_secs(),
        heartbeat / healthz
    );
    println!(
        "apiserver peak RSS at the end: {:.1} MiB",
        peak_rss_mib(pid)
    );
    // One line for scripts and the issue's targets: the peak RSS is the one with the
    // fleet connected, before the saturation runs.
    println!(
        "figures: nodes={} hb_p99_ms={:.1} hb_max_ms={:.1} apply_p99_ms={:.1} rss_mib={connected_peak:.0} ratio={:.2}",
        o.nodes,
        percentile(&hb, 99.0),
        hb.last().copied().unwrap_or(f64::NAN),
        percentile(&prop, 99.0),
        heartbeat / healthz
    );
    running.store(false, Ordering::Relaxed);
    drop(server);
    std::process::exit(0);
}
