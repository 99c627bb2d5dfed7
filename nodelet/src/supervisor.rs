//! A small process supervisor for hosts without systemd: starts a service,
//! restarts it with backoff when it crashes, keeps the last lines of its
//! output, and stops its whole process group.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

/// Lines of output kept in memory per service.
pub const LOG_LINES: usize = 200;

/// How to run one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// Service name.
    pub name: String,
    /// Program (absolute).
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: PathBuf,
}

#[derive(Default)]
struct Status {
    running: AtomicBool,
    pid: AtomicU32,
    restarts: AtomicU32,
    logs: Mutex<VecDeque<String>>,
}

impl Status {
    fn log(&self, line: String) {
        let mut logs = self.logs.lock().expect("not poisoned");
        logs.push_back(line);
        while logs.len() > LOG_LINES {
            logs.pop_front();
        }
    }
}

struct Supervised {
    spec: RunSpec,
    stop: Option<oneshot::Sender<()>>,
    status: Arc<Status>,
    task: tokio::task::JoinHandle<()>,
}

/// Supervises services as children of the nodelet.
pub struct Supervisor {
    services: tokio::sync::Mutex<HashMap<String, Supervised>>,
    pid_dir: PathBuf,
    log_dir: PathBuf,
    /// Logs of services that stopped, so a revert report can still show them.
    last_logs: Mutex<HashMap<String, Vec<String>>>,
}

impl Supervisor {
    /// A supervisor keeping pid files and logs under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Supervisor {
            services: tokio::sync::Mutex::new(HashMap::new()),
            pid_dir: state_dir.join("pids"),
            log_dir: state_dir.join("logs"),
            last_logs: Mutex::new(HashMap::new()),
        }
    }

    /// Kills services left running by a nodelet that died (kill -9 leaves its children
    /// behind). A pid is only killed when its command line still names the recorded program,
    /// so a recycled pid is never hit.
    pub fn reap_orphans(&self) {
        let Ok(entries) = std::fs::read_dir(&self.pid_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut lines = text.lines();
            let pid: Option<i32> = lines.next().and_then(|p| p.trim().parse().ok());
            let program = lines.next().unwrap_or("").to_string();
            if let Some(pid) = pid {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let first = cmdline.split(|b| *b == 0).next().unwrap_or(&[]);
                if !program.is_empty() && first == program.as_bytes() {
                    tracing::warn!(
                        pid,
                        program,
                        "killing a service left over from a previous nodelet"
                    );
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Starts `spec`, stopping whatever ran under that name first.
    pub async fn start(&self, spec: RunSpec) {
        self.stop(&spec.name).await;
        let status = Arc::new(Status::default());
        let (stop, stopped) = oneshot::channel();
        let (spawned, first_spawn) = oneshot::channel();
        let task = tokio::spawn(supervise(
            spec.clone(),
            status.clone(),
            stopped,
            spawned,
            self.pid_dir.clone(),
            self.log_dir.clone(),
        ));
        self.services.lock().await.insert(
            spec.name.clone(),
            Supervised {
                spec,
                stop: Some(stop),
                status,
                task,
            },
        );
        // Return once the first spawn was attempted, so `running` means something to the caller.
        let _ = first_spawn.await;
    }

    /// Stops a service and its process group (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(&self, name: &str) {
        let supervised = self.services.lock().await.remove(name);
        if let Some(mut supervised) = supervised {
            if let Some(stop) = supervised.stop.take() {
                let _ = stop.send(());
            }
            let _ = (&mut supervised.task).await;
            let logs: Vec<String> = supervised
                .status
                .logs
                .lock()
                .expect("not poisoned")
                .iter()
                .cloned()
                .collect();
            self.last_logs
                .lock()
                .expect("not poisoned")
                .insert(name.to_string(), logs);
        }
    }

    /// Stops everything (nodelet shutdown).
    pub async fn stop_all(&self) {
        let names: Vec<String> = self.services.lock().await.keys().cloned().collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    /// The spec a service runs with, if supervised.
    pub async fn spec(&self, name: &str) -> Option<RunSpec> {
        self.services.lock().await.get(name).map(|s| s.spec.clone())
    }

    /// True while the service's process is up.
    pub async fn running(&self, name: &str) -> bool {
        self.services
            .lock()
            .await
            .get(name)
            .is_some_and(|s| s.status.running.load(Ordering::SeqCst))
    }

    /// How often it was restarted after exiting.
    pub async fn restarts(&self, name: &str) -> u32 {
        self.services
            .lock()
            .await
            .get(name)
            .map_or(0, |s| s.status.restarts.load(Ordering::SeqCst))
    }

    /// The last `n` lines of its output.
    pub fn log_tail(&self, name: &str, n: usize) -> Vec<String> {
        let live = self.services.try_lock().ok().and_then(|services| {
            services.get(name).map(|s| {
                s.status
                    .logs
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
            })
        });
        let lines = live
            .filter(|l| !l.is_empty())
            .or_else(|| {
                self.last_logs
                    .lock()
                    .expect("not poisoned")
                    .get(name)
                    .cloned()
            })
            .unwrap_or_default();
        let start = lines.len().saturating_sub(n);
        lines[start..].to_vec()
    }
}

async fn supervise(
    spec: RunSpec,
    status: Arc<Status>,
    mut stopped: oneshot::Receiver<()>,
    spawned: oneshot::Sender<()>,
    pid_dir: PathBuf,
    log_dir: PathBuf,
) {
    let pid_file = pid_dir.join(format!("{}.pid", spec.name));
    let _ = tokio::fs::create_dir_all(&pid_dir).await;
    let _ = tokio::fs::create_dir_all(&log_dir).await;
    let log_path = log_dir.join(format!("{}.log", spec.name));
    let mut backoff = Duration::from_secs(1);
    let mut spawned = Some(spawned);
    loop {
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .envs(&spec.env)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let started = Instant::now();
        match command.spawn() {
            Err(e) => {
                status.log(format!(
                    "shoal: cannot start {}: {e}",
                    spec.program.display()
                ));
                if let Some(spawned) = spawned.take() {
                    let _ = spawned.send(());
                }
            }
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                status.pid.store(pid, Ordering::SeqCst);
                status.running.store(true, Ordering::SeqCst);
                if let Some(spawned) = spawned.take() {
                    let _ = spawned.send(());
                }
                let _ = tokio::fs::write(&pid_file, format!("{pid}\n{}\n", spec.program.display()))
                    .await;
                for stream in [
                    child
                        .stdout
                        .take()
                        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                    child
                        .stderr
                        .take()
                        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                ]
                .into_iter()
                .flatten()
                {
                    let status = status.clone();
                    let log_path = log_path.clone();
                    tokio::spawn(async move {
                        let mut lines = BufReader::new(stream).lines();
                        let mut file = tokio::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&log_path)
                            .await
                            .ok();
                        while let Ok(Some(line)) = lines.next_line().await {
                            if let Some(file) = file.as_mut() {
                                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                            }
                            status.log(line);
                        }
                    });
                }
                tokio::select! {
                    exit = child.wait() => {
                        status.running.store(false, Ordering::SeqCst);
                        status.restarts.fetch_add(1, Ordering::SeqCst);
                        let what = exit.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                        status.log(format!("shoal: {} exited ({what}); restarting in {}s", spec.name, backoff.as_secs()));
                    }
                    _ = &mut stopped => {
                        terminate(&mut child, pid).await;
                        status.running.store(false, Ordering::SeqCst);
                        let _ = tokio::fs::remove_file(&pid_file).await;
                        return;
                    }
                }
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stopped => {
                let _ = tokio::fs::remove_file(&pid_file).await;
                return;
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// SIGTERM to the process group, SIGKILL after 5 s.
async fn terminate(child: &mut tokio::process::Child, pid: u32) {
    let group = Pid::from_raw(-(pid as i32));
    let _ = kill(group, Signal::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = kill(group, Signal::SIGKILL);
        let _ = child.kill().await;
    }
    // Anything else left in the group goes too.
    let _ = kill(group, Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, script: &str, dir: &Path) -> RunSpec {
        RunSpec {
            name: name.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            cwd: dir.to_path_buf(),
        }
    }

    #[tokio::test]
    async fn runs_restarts_and_stops() {
        let tmp = tempfile::tempdir().unwrap();
        let supervisor = Supervisor::new(tmp.path());
        supervisor
            .start(spec("svc", "echo $GREETING; exec sleep 30", tmp.path()))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(supervisor.running("svc").await);
        assert_eq!(supervisor.log_tail("svc", 5), vec!["hello".to_string()]);
        assert!(tmp.path().join("pids/svc.pid").exists());
        supervisor.stop("svc").await;
        assert!(!supervisor.running("svc").await);
        assert!(!tmp.path().join("pids/svc.pid").exists());

        supervisor
            .start(spec("crash", "echo dying; exit 7", tmp.path()))
            .await;
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert!(supervisor.restarts("crash").await >= 1);
        let logs = supervisor.log_tail("crash", 10);
        assert!(
            logs.iter().any(|l| l.contains("exited (exit status: 7)")),
            "{logs:?}"
        );
        supervisor.stop_all().await;
    }
}
