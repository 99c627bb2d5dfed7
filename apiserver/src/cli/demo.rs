//! `shoal demo`: a whole fleet on one machine, telling shoal's story in the terminal.
//!
//! It starts an apiserver (sled in a temp dir), an artifact server, and N
//! nodelets, each with its own sandbox root, state dir and service port, in
//! two sites with one canary. Then: v1.0.0 everywhere; v1.1.0 through canary,
//! bake and waves; v1.2.0 — which starts fine and then fails `/healthz` —
//! reverts on the canary by itself, the rollout rolls back, and no other node
//! ever runs it. Everything is removed on Ctrl-C.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use manifests::wire::*;
use sha2::{Digest, Sha256};

use super::client::{CliError, Client};
use super::{resources, Output, EXIT_DIFFERENT, EXIT_OK};

const OPERATOR: &str = "demo-operator-token-2f9c61aa";
const JOIN: &str = "demo-join-token-7d01be55c3";

/// Options of `shoal demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Bake time of every wave, seconds. At least 4: the bad release fails 2 s after it
    /// starts, and a bake shorter than that would let it through — which is the point of baking.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(4..))]
    pub bake_seconds: u64,
    /// Tell the story and exit (for tests and CI) instead of leaving the fleet running.
    #[arg(long)]
    pub no_wait: bool,
}

struct Fleet {
    children: Vec<(String, Child)>,
    dir: Option<tempfile::TempDir>,
}

impl Fleet {
    fn stop(&mut self) {
        // Nodelets first (SIGTERM: they stop their services), then the rest.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, child) in self.children.iter_mut() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| CliError::new(format!("no free port: {e}"), "free some ports on 127.0.0.1"))
}

fn sibling(name: &str) -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new(e.to_string(), "run shoal from the build folder"))?;
    let path = exe.parent().unwrap_or(Path::new(".")).join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(CliError::new(
            format!("{} is missing next to shoal", path.display()),
            "build every binary first: `cargo build --release` at the top of the workspace",
        ))
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |e| {
        CliError::new(
            format!("{what}: {e}"),
            "check the temp dir and free disk space",
        )
    }
}

fn sha256(path: &Path) -> Result<String, CliError> {
    Ok(hex::encode(Sha256::digest(
        std::fs::read(path).map_err(io("reading an artifact"))?,
    )))
}

/// The demo service as `demo-service-<version>.tar.gz`: binary, VERSION, and the fault switch.
fn tarball(
    dir: &Path,
    binary: &Path,
    version: &str,
    fail_after: Option<u64>,
) -> Result<(String, String), CliError> {
    let staging = dir.join(format!("stage-{version}"));
    std::fs::create_dir_all(staging.join("bin")).map_err(io("staging"))?;
    std::fs::copy(binary, staging.join("bin/demo-service")).map_err(io("copying demo-service"))?;
    std::fs::write(staging.join("VERSION"), format!("{version}\n")).map_err(io("staging"))?;
    if let Some(seconds) = fail_after {
        std::fs::write(
            staging.join("fail-healthz-after-seconds"),
            format!("{seconds}\n"),
        )
        .map_err(io("staging"))?;
    }
    let file = format!("demo-service-{version}.tar.gz");
    let out = dir.join(&file);
    let archive = std::fs::File::create(&out).map_err(io("writing the tarball"))?;
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        archive,
        flate2::Compression::default(),
    ));
    builder
        .append_dir_all(".", &staging)
        .map_err(io("packing"))?;
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(io("packing"))?;
    let sha = sha256(&out)?;
    Ok((file, sha))
}

/// A small real `.deb` (a message of the day), built with dpkg-deb.
fn deb(dir: &Path, version: &str) -> Result<(String, String), CliError> {
    let staging = dir.join(format!("deb-{version}"));
    std::fs::create_dir_all(staging.join("DEBIAN")).map_err(io("staging"))?;
    std::fs::create_dir_all(staging.join("usr/share/shoal-demo-motd")).map_err(io("staging"))?;
    std::fs::write(
        staging.join("DEBIAN/control"),
        format!("Package: shoal-demo-motd\nVersion: {version}\nArchitecture: all\nMaintainer: shoal demo <demo@shoal.invalid>\nDescription: message of the day for shoal's demo fleet\n"),
    )
    .map_err(io("staging"))?;
    std::fs::write(
        staging.join("usr/share/shoal-demo-motd/motd"),
        "Welcome to a shoal-managed node.\n",
    )
    .map_err(io("staging"))?;
    let file = format!("shoal-demo-motd_{version}_all.deb");
    let output = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&staging)
        .arg(dir.join(&file))
        .output()
        .map_err(|e| {
            CliError::new(
                format!("cannot run dpkg-deb: {e}"),
                "the demo needs dpkg (Debian or Ubuntu): apt-get install dpkg",
            )
        })?;
    if !output.status.success() {
        return Err(CliError::new(
            format!(
                "dpkg-deb failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
            "see the message above",
        ));
    }
    let sha = sha256(&dir.join(&file))?;
    Ok((file, sha))
}

fn manifest(
    version: &str,
    base: &str,
    service: &(String, String),
    motd: &(String, String),
    bake: u64,
) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: demo}}
spec:
  selector: {{matchLabels: {{role: demo}}}}
  components:
    - name: shoal-demo-motd
      kind: package
      version: "1.0-1"
      artifact: {{url: "{base}/{}", sha256: "{}"}}
    - name: demo-service
      kind: service
      version: {version}
      artifact: {{url: "{base}/{}", sha256: "{}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:${{PORT}}"], startSeconds: 1}}
  probes:
    - {{name: http, http: {{url: "http://127.0.0.1:${{PORT}}/healthz"}}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}
  rollout:
    waves: ["1", "50%", "100%"]
    bakeSeconds: {bake}
    healthyDeadlineSeconds: 60
    maxFailures: 0
    spreadBy: site
"#,
        motd.0, motd.1, service.0, service.1
    )
}

/// Serves the artifact folder over HTTP on loopback, from a thread of its own.
fn serve_artifacts(dir: PathBuf) -> Result<String, CliError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("artifact server"))?;
    let url = format!(
        "http://{}",
        listener.local_addr().map_err(io("artifact server"))?
    );
    listener
        .set_nonblocking(true)
        .map_err(io("artifact server"))?;
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().route(
                "/{file}",
                axum::routing::get(
                    move |axum::extract::Path(file): axum::extract::Path<String>| {
                        let dir = dir.clone();
                        async move {
                            // Only plain names inside the folder.
                            if file.contains('/') || file.starts_with('.') {
                                return (axum::http::StatusCode::NOT_FOUND, Vec::new());
                            }
                            match tokio::fs::read(dir.join(file)).await {
                                Ok(bytes) => (axum::http::StatusCode::OK, bytes),
                                Err(_) => (axum::http::StatusCode::NOT_FOUND, Vec::new()),
                            }
                        }
                    },
                ),
            );
            let _ = axum::serve(listener, app).await;
        });
    });
    Ok(url)
}

struct Story<'a> {
    client: &'a Client,
    after: u64,
    started: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Story<'_> {
    /// Prints every event since the last call, as a line of the story.
    fn tell(&mut self) -> Result<Vec<Event>, CliError> {
        let events: Vec<Event> = self
            .client
            .get(&format!("/api/v1/events?after={}&limit=1000", self.after))?;
        for event in &events {
            self.after = self.after.max(event.seq);
            if event.reason == "Registered"
                || event.reason == "Applied" && event.object.starts_with("desiredstate/")
            {
                continue;
            }
            let mark = if event.kind == EventType::Warning {
                "!"
            } else {
                " "
            };
            let message = event.message.lines().next().unwrap_or("");
            println!(
                "  {:>5.1}s {mark} {:<14} {:<13} {message}",
                self.started.elapsed().as_secs_f64(),
                event.object,
                event.reason
            );
            if event.reason == "Reverted" {
                for line in event.message.lines().skip(1).take(6) {
                    println!("  {:>6}   {:<14} {:<13}   {line}", "", "", "");
                }
            }
        }
        Ok(events)
    }

    fn until(
        &mut self,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&Client) -> Result<bool, CliError>,
    ) -> Result<(), CliError> {
        let deadline = Instant::now() + limit;
        loop {
            if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(CliError::new(
                    "interrupted",
                    "the fleet was stopped and its folder removed",
                ));
            }
            self.tell()?;
            if done(self.client)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CliError::new(
                    format!("the demo got stuck waiting for {what}"),
                    "look at the nodelet logs in the demo folder",
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn rollout_phase(client: &Client, revision: u64) -> Result<Option<RolloutPhase>, CliError> {
    let rollout: Option<RolloutObject> = client.get_optional("/api/v1/rollouts/demo")?;
    Ok(rollout
        .filter(|r| r.spec.revision == revision)
        .map(|r| r.status.phase))
}

/// Runs the demo; returns the exit code (0: the story went as it should).
pub fn run(args: &DemoArgs) -> Result<u8, CliError> {
    let apiserver = sibling("apiserver")?;
    let nodelet = sibling("nodelet")?;
    let demo_service = sibling("demo-service")?;
    let dir = tempfile::Builder::new()
        .prefix("shoal-demo-")
        .tempdir()
        .map_err(io("temp dir"))?;
    let root = dir.path().to_path_buf();
    let mut fleet = Fleet {
        children: Vec::new(),
        dir: Some(dir),
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc_handler(move || stop.store(true, std::sync::atomic::Ordering::SeqCst));
    }

    println!(
        "shoal demo: a fleet of {} nodes on this machine, in {}",
        args.nodes,
        root.display()
    );
    let artifacts = root.join("artifacts");
    std::fs::create_dir_all(&artifacts).map_err(io("artifacts"))?;
    let v100 = tarball(&artifacts, &demo_service, "1.0.0", None)?;
    let v110 = tarball(&artifacts, &demo_service, "1.1.0", None)?;
    let v120 = tarball(&artifacts, &demo_service, "1.2.0", Some(2))?;
    let motd = deb(&artifacts, "1.0-1")?;
    let base = serve_artifacts(artifacts.clone())?;
    println!("  artifacts with real sha256s at {base}: demo-service 1.0.0, 1.1.0, 1.2.0 (tar.gz), shoal-demo-motd 1.0-1 (.deb)");

    let tokens = root.join("tokens.yaml");
    std::fs::write(&tokens, format!("tokens:\n  - {{name: demo-operator, role: operator, token: {OPERATOR}}}\njoinTokens:\n  - {{name: demo-fleet, token: {JOIN}}}\n")).map_err(io("tokens"))?;
    let port = free_port()?;
    let mut child = Command::new(&apiserver)
        .arg("--data")
        .arg(root.join("apiserver"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--ready-grace-seconds",
            "10",
        ])
        .arg("--tokens")
        .arg(&tokens)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(root.join("apiserver.log")).map_err(io("log"))?)
        .spawn()
        .map_err(|e| {
            CliError::new(
                format!("cannot start {}: {e}", apiserver.display()),
                "build it with `cargo build --release`",
            )
        })?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .map_err(io("apiserver"))?;
    fleet.children.push(("apiserver".into(), child));
    let server = format!("http://127.0.0.1:{port}");
    println!("  apiserver at {server}");

    let mut ports = BTreeMap::new();
    for i in 0..args.nodes {
        let name = format!("node-{}", i + 1);
        let site = if i % 2 == 0 { "east" } else { "west" };
        let canary = if i == 0 { ",shoal/canary=true" } else { "" };
        let node_root = root.join(&name);
        std::fs::create_dir_all(&node_root).map_err(io("node root"))?;
        let service_port = free_port()?;
        ports.insert(name.clone(), service_port);
        let child = Command::new(&nodelet)
            .args([
                "--server",
                &server,
                "--join-token",
                JOIN,
                "--name",
                &name,
                "--heartbeat-seconds",
                "1",
            ])
            .arg("--root")
            .arg(&node_root)
            .args([
                "--labels",
                &format!("role=demo,site={site}{canary}"),
                "--var",
                &format!("PORT={service_port}"),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(node_root.join("nodelet.log")).map_err(io("log"))?)
            .spawn()
            .map_err(|e| {
                CliError::new(
                    format!("cannot start {}: {e}", nodelet.display()),
                    "build it with `cargo build --release`",
                )
            })?;
        fleet.children.push((name.clone(), child));
        println!(
            "  {name}: site {site}{}, sandbox root {}, service port {service_port}",
            if i == 0 { ", canary" } else { "" },
            node_root.display()
        );
    }
    let client = Client::new(&server, Some(OPERATOR.into()))?;
    let mut story = Story {
        client: &client,
        after: 0,
        started: Instant::now(),
        stop: stop.clone(),
    };
    let expected = args.nodes;
    story.until(Duration::from_secs(30), "the nodes to register", |c| {
        Ok(c.get::<Vec<NodeObject>>("/api/v1/nodes")?.len() >= expected)
    })?;

    let apply = |version: &str, service: &(String, String)| -> Result<u64, CliError> {
        let response: ApplyResponse = client.post(
            "/api/v1/apply",
            "application/yaml",
            manifest(version, &base, service, &motd, args.bake_seconds),
        )?;
        Ok(response.results[0].revision)
    };
    let long = Duration::from_secs(60 + 10 * args.bake_seconds);

    println!(
        "\n▶ 1. apply demo-service 1.0.0 (+ the motd .deb): waves [1 canary, 50%, 100%], bake {}s",
        args.bake_seconds
    );
    let r1 = apply("1.0.0", &v100)?;
    story.until(long, "revision 1", |c| {
        Ok(rollout_phase(c, r1)? == Some(RolloutPhase::Complete))
    })?;
    println!("\n▶ 2. apply demo-service 1.1.0: canary first, bake, then the next waves");
    let r2 = apply("1.1.0", &v110)?;
    story.until(long, "revision 2", |c| {
        Ok(rollout_phase(c, r2)? == Some(RolloutPhase::Complete))
    })?;
    println!("\n▶ 3. apply demo-service 1.2.0: it starts fine, then fails /healthz after 2 s");
    let r3 = apply("1.2.0", &v120)?;
    story.until(long, "revision 3 to roll back", |c| {
        Ok(matches!(
            rollout_phase(c, r3)?,
            Some(RolloutPhase::RolledBack | RolloutPhase::Aborted)
        ))
    })?;
    story.until(
        Duration::from_secs(30),
        "every node to be back at 1.1.0",
        |_| {
            Ok(ports
                .values()
                .all(|p| version_of(*p).as_deref() == Some("1.1.0")))
        },
    )?;
    // What the services answer leads what the nodes report by up to a heartbeat: the table below
    // shows the reports, so wait for them too.
    story.until(
        Duration::from_secs(30),
        "every node to report itself healthy and converged at 1.1.0",
        |c| {
            Ok(c.get::<Vec<NodeObject>>("/api/v1/nodes")?.iter().all(|n| {
                let holds = |kind| {
                    resources::condition(n, kind).is_some_and(|c| c.status == ConditionStatus::True)
                };
                holds("Healthy")
                    && holds("Converged")
                    && n.status
                        .report
                        .components
                        .iter()
                        .any(|c| c.name == "demo-service" && c.version.as_deref() == Some("1.1.0"))
            }))
        },
    )?;

    // The promise: a bad version reaches one canary, reverts itself, and stops there.
    let events: Vec<Event> = client.get("/api/v1/events?limit=10000")?;
    let ran_bad: Vec<String> = events
        .iter()
        .filter(|e| e.revision == Some(r3) && e.reason == "Applying")
        .filter_map(|e| e.node.clone())
        .collect();
    let canary = "node-1".to_string();
    let contained = ran_bad == vec![canary.clone()];
    println!();
    if contained {
        println!("✔ 1.2.0 reached only the canary ({canary}), which reverted by itself; no other node ever ran it.");
    } else {
        println!("✘ 1.2.0 reached {ran_bad:?}; expected only the canary.");
    }
    println!("\n$ shoal get nodes");
    resources::get(&client, "nodes", None, Output::Table)?;
    println!("\n$ shoal rollout history demo");
    super::rollout::run(
        &client,
        &super::RolloutVerb::History {
            name: "demo".into(),
        },
        Output::Table,
    )?;
    let code = if contained { EXIT_OK } else { EXIT_DIFFERENT };
    if args.no_wait {
        fleet.stop();
        return Ok(code);
    }
    println!(
        "\nThe fleet keeps running. Explore it:\n  export SHOAL_SERVER={server} SHOAL_TOKEN={OPERATOR}\n  shoal get nodes\n  shoal describe node node-1\n  shoal rollout status demo\n  shoal get events\n  curl -H 'Authorization: Bearer {OPERATOR}' {server}/api/v1/summary\n  curl http://127.0.0.1:{}/version\nPress Ctrl-C to stop everything and remove {}.",
        ports["node-1"],
        root.display()
    );
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nstopping the fleet…");
    fleet.stop();
    println!("done: every process stopped and {} removed", root.display());
    Ok(code)
}

fn version_of(port: u16) -> Option<String> {
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?
        .get(format!("http://127.0.0.1:{port}/version"))
        .send()
        .ok()?;
    response.text().ok().map(|t| t.trim().to_string())
}

/// Installs a Ctrl-C (SIGINT) and SIGTERM handler on a helper thread.
fn ctrlc_handler(on_signal: impl Fn() + Send + 'static) -> std::io::Result<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        on_signal();
    });
    Ok(())
}
