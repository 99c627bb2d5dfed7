//! A throwaway PostgreSQL cluster for tests: `initdb` in a temporary directory, one
//! `postgres` process on a loopback port, removed on drop. No system service is needed.
//!
//! Public so that integration tests of other crates can start one too.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PostgreSQL cluster owned by a test.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    /// The user the server runs as when the test runs as root (PostgreSQL refuses root).
    uid: Option<(u32, u32)>,
}

fn newest_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// uid and gid of a user, from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    // The owner of a file this process just made is this process's user.
    let probe = tempfile::NamedTempFile::new().expect("temporary file");
    std::os::unix::fs::MetadataExt::uid(&probe.as_file().metadata().expect("metadata")) == 0
}

impl TestPostgres {
    /// Starts a cluster, or says why it cannot (PostgreSQL not installed, no user to run it as).
    pub fn start() -> Result<TestPostgres, String> {
        let bin = newest_bin_dir().ok_or(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)",
        )?;
        let uid =
            if is_root() {
                Some(user_ids("postgres").ok_or(
                    "running as root, and there is no 'postgres' user to run PostgreSQL as",
                )?)
            } else {
                None
            };
        let dir = tempfile::Builder::new()
            .prefix("shoal-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = uid {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| e.to_string())?;
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let mut cluster = TestPostgres {
            port: 0,
            dir,
            child: None,
            bin,
            uid,
        };
        let out = cluster
            .command("initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "shoal", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        cluster.port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let log = std::fs::File::create(cluster.dir.path().join("postgres.log"))
            .map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = uid {
            std::os::unix::fs::chown(
                cluster.dir.path().join("postgres.log"),
                Some(uid),
                Some(gid),
            )
            .map_err(|e| e.to_string())?;
        }
        let socket_dir = cluster.dir.path().to_path_buf();
        let child = cluster
            .command("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &cluster.port.to_string()])
            .arg("-k")
            .arg(&socket_dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                // A test cluster: nothing has to survive a power cut, so spare the disk.
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        cluster.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = cluster
                .command("pg_isready")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &cluster.port.to_string(),
                    "-U",
                    "shoal",
                    "-q",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(cluster);
            }
            if let Some(Ok(Some(status))) = cluster.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("postgres exited ({status}): {}", cluster.log()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres did not come up in 60 s: {}",
                    cluster.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts a cluster, or prints a loud `SKIPPED:` line naming `what` and returns `None`.
    pub fn start_or_skip(what: &str) -> Option<TestPostgres> {
        match TestPostgres::start() {
            Ok(cluster) => Some(cluster),
            Err(reason) => {
                // In CI, PostgreSQL is installed on purpose: its absence is a failure there.
                if std::env::var_os("CI").is_some_and(|v| v == "true") {
                    panic!("{what}: cannot start PostgreSQL in CI: {reason}");
                }
                eprintln!("SKIPPED: {what}: {reason}");
                None
            }
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.uid {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The cluster's directory (its log is `postgres.log` in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://shoal@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        drop(client);
        let _ = driver.await;
        self.url(name)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: immediate shutdown, the server's children go with it.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
