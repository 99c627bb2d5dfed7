//! Test support: real binaries (apiserver, nodelet, demo-service) in temp dirs on loopback,
//! real artifacts (tar.gz, .deb) served over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The folder holding the workspace's binaries (target/debug), found from this test's own path;
/// or `SHOAL_TEST_BIN_DIR`, when the binaries under test are another target's (scripts/arm-test
/// runs the tests against aarch64 builds).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHOAL_TEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// `SHOAL_TEST_RUNNER`: the emulator that runs the binaries under test (`qemu-aarch64-static`;
/// this machine has no binfmt registration, so an aarch64 binary cannot be executed directly).
pub fn runner() -> Option<String> {
    std::env::var("SHOAL_TEST_RUNNER")
        .ok()
        .filter(|r| !r.is_empty())
}

/// A command that runs workspace binary `name`, through the runner when there is one.
pub fn command(name: &str) -> Command {
    match runner() {
        Some(runner) => {
            let mut command = Command::new(runner);
            command.arg(bin(name));
            command
        }
        None => Command::new(bin(name)),
    }
}

/// A workspace binary; scripts/test builds them all before the tests.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `check` to return `Some`, or panics with `what` after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (the nodelet stops its services on the way out).
    pub fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

pub const OPERATOR: &str = "test-operator-token-0123456789";
pub const JOIN: &str = "test-join-token-0123456789abcd";

/// A real apiserver with a tokens file, on a fixed port so it can be restarted in place.
pub struct Apiserver {
    pub proc: Option<Proc>,
    pub url: String,
    pub port: u16,
    pub dir: PathBuf,
    /// The address it listens on (loopback, or a test network's bridge).
    pub host: String,
    /// Extra arguments (`--store URL`, `--tls-cert …`).
    pub args: Vec<String>,
    /// The CA (PEM) that issued its certificate, when it serves HTTPS under a private CA.
    pub ca_pem: Option<String>,
}

impl Apiserver {
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, "127.0.0.1")
    }

    /// Listens on `host` (an address of a network the test made) instead of loopback.
    pub fn start_on(dir: &Path, host: &str) -> Self {
        Self::start_with(dir, host, Vec::new())
    }

    /// Starts with extra arguments, e.g. `--store postgres://…`.
    pub fn start_with(dir: &Path, host: &str, args: Vec<String>) -> Self {
        let mut server = Apiserver {
            proc: None,
            url: String::new(),
            port: free_port(),
            dir: dir.to_path_buf(),
            host: host.to_string(),
            args,
            ca_pem: None,
        };
        server.restart();
        server
    }

    pub fn restart(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let tokens = self.dir.join("tokens.yaml");
        std::fs::write(&tokens, format!("tokens:\n  - {{name: tester, role: operator, token: {OPERATOR}}}\njoinTokens:\n  - {{name: nodes, token: {JOIN}}}\n")).unwrap();
        let mut child = command("apiserver")
            .args([
                "--data",
                self.dir.join("data").to_str().unwrap(),
                "--listen",
                &format!("{}:{}", self.host, self.port),
                "--tokens",
                tokens.to_str().unwrap(),
                "--ready-grace-seconds",
                "5",
            ])
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("listening"),
            "apiserver did not start: {line}"
        );
        let scheme = if line.contains("https://") {
            "https"
        } else {
            "http"
        };
        self.url = format!("{scheme}://{}:{}", self.host, self.port);
        self.proc = Some(Proc {
            child,
            name: "apiserver".into(),
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
    }

    fn client(&self) -> reqwest::blocking::Client {
        let builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
        match &self.ca_pem {
            Some(pem) => builder.add_root_certificate(
                reqwest::Certificate::from_pem(pem.as_bytes()).expect("a PEM certificate"),
            ),
            None => builder,
        }
        .build()
        .unwrap()
    }

    pub fn apply(&self, yaml: &str) -> serde_json::Value {
        self.post_body("/api/v1/apply", yaml.to_string())
    }

    /// POSTs an empty body to `path` (e.g. `/api/v1/rollouts/NAME/undo`), as the operator.
    pub fn post(&self, path: &str) -> serde_json::Value {
        self.post_body(path, String::new())
    }

    /// POSTs `body` to `path` as the operator; the reply must be a success.
    fn post_body(&self, path: &str, body: String) -> serde_json::Value {
        let response = self
            .client()
            .post(format!("{}{path}", self.url))
            .bearer_auth(OPERATOR)
            .body(body)
            .send()
            .unwrap();
        let status = response.status();
        let body: serde_json::Value = response.json().unwrap();
        assert!(status.is_success(), "POST {path} failed: {body}");
        body
    }

    pub fn get(&self, path: &str) -> Option<serde_json::Value> {
        let response = self
            .client()
            .get(format!("{}{path}", self.url))
            .bearer_auth(OPERATOR)
            .send()
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().ok()
    }

    /// Events about a node, oldest first.
    pub fn node_events(&self, node: &str) -> Vec<serde_json::Value> {
        self.get(&format!("/api/v1/events?object=node/{node}&limit=10000"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The rollout of a DesiredState.
    pub fn rollout(&self, name: &str) -> Option<serde_json::Value> {
        self.get(&format!("/api/v1/rollouts/{name}"))
    }

    /// The rollout of `revision`, once it is Complete (the revision is then the last good one:
    /// the server bakes a wave on its own clock, after the node's own bake).
    pub fn rollout_complete(&self, name: &str, revision: u64) -> Option<serde_json::Value> {
        self.rollout(name)
            .filter(|r| r["spec"]["revision"] == revision && r["status"]["phase"] == "Complete")
    }

    /// Events about a rollout, oldest first.
    pub fn rollout_events(&self, name: &str) -> Vec<serde_json::Value> {
        self.get(&format!("/api/v1/events?object=rollout/{name}&limit=10000"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The node's reported phase and revision for a DesiredState.
    pub fn applied(&self, node: &str, desired_state: &str) -> Option<(String, u64)> {
        let node = self.get(&format!("/api/v1/nodes/{node}"))?;
        node["status"]["report"]["applied"]
            .as_array()?
            .iter()
            .find(|a| a["desiredState"] == desired_state)
            .map(|a| {
                (
                    a["phase"].as_str().unwrap_or("").to_string(),
                    a["revision"].as_u64().unwrap_or(0),
                )
            })
    }
}

/// A real nodelet with its own sandbox root and state dir.
pub struct Nodelet {
    pub proc: Option<Proc>,
    pub name: String,
    pub root: PathBuf,
    pub server: String,
    pub labels: String,
    pub heartbeat_seconds: u64,
    /// Extra arguments, e.g. `--var PORT=18081`.
    pub extra_args: Vec<String>,
    /// The network namespace it runs in (`ip netns exec`), if not the test's own.
    pub netns: Option<String>,
}

impl Nodelet {
    pub fn start(server: &str, name: &str, labels: &str, root: &Path) -> Self {
        Self::start_with_heartbeat(server, name, labels, root, 1)
    }

    /// Starts a nodelet with `--var` settings.
    pub fn start_with_vars(
        server: &str,
        name: &str,
        labels: &str,
        root: &Path,
        vars: &[(&str, String)],
    ) -> Self {
        let extra = vars
            .iter()
            .flat_map(|(k, v)| ["--var".to_string(), format!("{k}={v}")])
            .collect();
        Self::start_with_args(server, name, labels, root, 1, extra)
    }

    pub fn start_with_heartbeat(
        server: &str,
        name: &str,
        labels: &str,
        root: &Path,
        heartbeat_seconds: u64,
    ) -> Self {
        Self::start_with_args(server, name, labels, root, heartbeat_seconds, Vec::new())
    }

    /// Starts a nodelet with extra arguments (`--var …`, limits such as `--min-free-bytes`).
    pub fn start_with_args(
        server: &str,
        name: &str,
        labels: &str,
        root: &Path,
        heartbeat_seconds: u64,
        extra_args: Vec<String>,
    ) -> Self {
        let mut node = Self::unstarted(server, name, labels, root, extra_args);
        node.heartbeat_seconds = heartbeat_seconds;
        node.restart();
        node
    }

    /// Starts a nodelet (heartbeat 1 s) inside network namespace `netns`.
    pub fn start_in(
        netns: &str,
        server: &str,
        name: &str,
        labels: &str,
        root: &Path,
        extra_args: Vec<String>,
    ) -> Self {
        let mut node = Self::unstarted(server, name, labels, root, extra_args);
        node.netns = Some(netns.to_string());
        node.restart();
        node
    }

    fn unstarted(
        server: &str,
        name: &str,
        labels: &str,
        root: &Path,
        extra_args: Vec<String>,
    ) -> Self {
        std::fs::create_dir_all(root).unwrap();
        Nodelet {
            proc: None,
            name: name.into(),
            root: root.to_path_buf(),
            server: server.into(),
            labels: labels.into(),
            heartbeat_seconds: 1,
            extra_args,
            netns: None,
        }
    }

    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("nodelet.log"))
            .unwrap();
        // `ip netns exec` execs the nodelet, so the child is the nodelet itself.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]);
                if let Some(runner) = runner() {
                    c.arg(runner);
                }
                c.arg(bin("nodelet"));
                c
            }
            None => command("nodelet"),
        };
        let child = command
            .args([
                "--server",
                &self.server,
                "--join-token",
                JOIN,
                "--name",
                &self.name,
                "--labels",
                &self.labels,
                "--root",
                self.root.to_str().unwrap(),
                "--heartbeat-seconds",
                &self.heartbeat_seconds.to_string(),
            ])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(Proc {
            child,
            name: self.name.clone(),
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill9();
        }
    }

    /// True once the nodelet's process has exited (or was never started).
    pub fn exited(&mut self) -> bool {
        self.proc
            .as_mut()
            .is_none_or(|p| p.child.try_wait().unwrap().is_some())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("var/lib/shoal/nodelet")
    }

    /// The journal, as the nodelet last wrote it.
    pub fn journal(&self) -> serde_json::Value {
        std::fs::read(self.state_dir().join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn service_current(&self, service: &str) -> Option<String> {
        std::fs::read_link(
            self.root
                .join("var/lib/shoal/services")
                .join(service)
                .join("current"),
        )
        .ok()
        .map(|p| p.display().to_string())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("nodelet.log")).unwrap_or_default()
    }
}

/// Serves the files of a folder over HTTP on loopback.
/// One request the artifact server answered: the client's address, when, which file.
pub type Fetch = (String, std::time::SystemTime, String);

pub struct ArtifactServer {
    pub url: String,
    pub dir: PathBuf,
    fetches: std::sync::Arc<std::sync::Mutex<Vec<Fetch>>>,
    _runtime: tokio::runtime::Runtime,
}

impl ArtifactServer {
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, "127.0.0.1")
    }

    /// Serves on `host` and records who fetched what (which node, in a test network).
    pub fn start_on(dir: &Path, host: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((host, 0)))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let root = dir.to_path_buf();
        let fetches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = fetches.clone();
        let app = axum::Router::new().route(
            "/{file}",
            axum::routing::get(
                move |axum::extract::Path(file): axum::extract::Path<String>,
                      axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
                    std::net::SocketAddr,
                >| {
                    let root = root.clone();
                    let log = log.clone();
                    async move {
                        log.lock().unwrap().push((
                            peer.ip().to_string(),
                            std::time::SystemTime::now(),
                            file.clone(),
                        ));
                        match std::fs::read(root.join(file)) {
                            Ok(bytes) => (axum::http::StatusCode::OK, bytes),
                            Err(_) => (axum::http::StatusCode::NOT_FOUND, Vec::new()),
                        }
                    }
                },
            ),
        );
        runtime.spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
            .unwrap()
        });
        ArtifactServer {
            url,
            dir: dir.to_path_buf(),
            fetches,
            _runtime: runtime,
        }
    }

    /// Every request so far, oldest first.
    pub fn fetches(&self) -> Vec<Fetch> {
        self.fetches.lock().unwrap().clone()
    }

    pub fn url_of(&self, file: &str) -> String {
        format!("{}/{file}", self.url)
    }
}

pub fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The demo service packaged as `demo-<version>.tar.gz`: the binary, VERSION, and the fault switch.
pub fn demo_tarball(dir: &Path, version: &str, fail_after: Option<u64>) -> (String, String) {
    demo_tarball_of(&bin("demo-service"), dir, version, fail_after)
}

/// `demo_tarball` with a given demo-service binary (the VM test packages a stripped one).
pub fn demo_tarball_of(
    program: &Path,
    dir: &Path,
    version: &str,
    fail_after: Option<u64>,
) -> (String, String) {
    let staging = dir.join(format!("stage-{version}"));
    std::fs::create_dir_all(staging.join("bin")).unwrap();
    match runner() {
        // The nodelet (itself under the emulator) execs bin/demo-service as a host program:
        // without binfmt, that is a script that hands the other target's binary to the runner.
        Some(runner) => {
            std::fs::copy(program, staging.join("bin/demo-service.bin")).unwrap();
            let script = staging.join("bin/demo-service");
            std::fs::write(
                &script,
                format!("#!/bin/sh\nexec {runner} \"$(dirname \"$0\")/demo-service.bin\" \"$@\"\n"),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        None => {
            std::fs::copy(program, staging.join("bin/demo-service")).unwrap();
        }
    }
    std::fs::write(staging.join("VERSION"), format!("{version}\n")).unwrap();
    if let Some(seconds) = fail_after {
        std::fs::write(
            staging.join("fail-healthz-after-seconds"),
            format!("{seconds}\n"),
        )
        .unwrap();
    }
    let file = format!("demo-{version}.tar.gz");
    let status = Command::new("tar")
        .args([
            "-czf",
            dir.join(&file).to_str().unwrap(),
            "-C",
            staging.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let sha = sha256(&dir.join(&file));
    (file, sha)
}

/// A real `.deb` built with dpkg-deb; `healthy` puts /usr/share/<name>/healthy in it.
pub fn deb(dir: &Path, name: &str, version: &str, healthy: bool) -> (String, String) {
    let staging = dir.join(format!("deb-{name}-{version}"));
    std::fs::create_dir_all(staging.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(staging.join(format!("usr/share/{name}"))).unwrap();
    std::fs::write(
        staging.join("DEBIAN/control"),
        format!("Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: shoal tests <tests@shoal.invalid>\nDescription: shoal test package\n"),
    )
    .unwrap();
    std::fs::write(
        staging.join(format!("usr/share/{name}/VERSION")),
        format!("{version}\n"),
    )
    .unwrap();
    if healthy {
        std::fs::write(staging.join(format!("usr/share/{name}/healthy")), "yes\n").unwrap();
    }
    let file = format!("{name}_{version}_all.deb");
    let output = Command::new("dpkg-deb")
        .args([
            "--root-owner-group",
            "--build",
            staging.to_str().unwrap(),
            dir.join(&file).to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "dpkg-deb: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sha = sha256(&dir.join(&file));
    (file, sha)
}

/// The installed version of a package in a sandbox root, read with dpkg-query.
pub fn dpkg_version(root: &Path, package: &str) -> Option<String> {
    let (status, version) = dpkg_query(root, package)?;
    // `ii` or `hi`: installed, whether or not the nodelet holds it against `apt-get upgrade`.
    (status.get(1..2) == Some("i")).then_some(version)
}

/// Whether `package` is selected `hold` in the sandbox's dpkg database.
pub fn dpkg_held(root: &Path, package: &str) -> bool {
    dpkg_query(root, package).is_some_and(|(status, _)| status.starts_with('h'))
}

/// `(db:Status-Abbrev, Version)` of `package` in the dpkg database under `root`.
fn dpkg_query(root: &Path, package: &str) -> Option<(String, String)> {
    let output = Command::new("dpkg-query")
        .args([
            &format!("--admindir={}", root.join("var/lib/dpkg").display()),
            "-W",
            "-f=${db:Status-Abbrev}|${Version}",
            package,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (status, version) = text.split_once('|')?;
    Some((status.to_string(), version.to_string()))
}

/// GET a URL's body, if it answers 200.
pub fn http_get(url: &str) -> Option<String> {
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .get(url)
        .send()
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().ok().map(|t| t.trim().to_string())
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .count()
}

/// A service manifest for the demo.
#[allow(clippy::too_many_arguments)]
pub fn demo_manifest(
    name: &str,
    selector_role: &str,
    version: &str,
    url: &str,
    sha: &str,
    port: u16,
    bake: u64,
    start_seconds: u64,
) -> String {
    format!(
        r#"apiVersion: shoal/v1
kind: DesiredState
metadata: {{name: {name}}}
spec:
  selector: {{matchLabels: {{role: {selector_role}}}}}
  components:
    - name: demo
      kind: service
      version: {version}
      artifact: {{url: "{url}", sha256: "{sha}"}}
      service: {{exec: ["bin/demo-service", "--listen", "127.0.0.1:{port}"], startSeconds: {start_seconds}}}
  probes:
    - {{name: demo-http, http: {{url: "http://127.0.0.1:{port}/healthz"}}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}
  rollout:
    waves: ["100%"]
    bakeSeconds: {bake}
    healthyDeadlineSeconds: 30
"#
    )
}
