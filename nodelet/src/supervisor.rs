//! A small process supervisor for hosts without systemd: starts a service,
//! restarts it with backoff when it crashes, keeps the last lines of its
//! output (and all of it, rotated by size, in `<state>/logs/<name>.log`), and stops its
//! whole process group.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};

/// Lines of output kept in memory per service.
pub const LOG_LINES: usize = 200;

/// Size at which a service's log file is rotated, unless [`Supervisor::with_log_limit`] says otherwise.
pub const DEFAULT_LOG_LIMIT: u64 = 10 * 1024 * 1024;

/// Rotated log files kept per service (`<name>.log.1` …), unless [`Supervisor::with_log_limit`] says otherwise.
pub const DEFAULT_LOG_KEEP: usize = 1;

/// Lines queued for a service's log file. A disk slower than the service is noisy drops
/// lines from the file (they stay in memory) instead of blocking the pipe the service writes
/// to: a blocked pipe would stall the service itself.
const LOG_QUEUE: usize = 4096;

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
    /// Who the process runs as; `None`: as the nodelet (root).
    pub account: Option<Account>,
}

/// The user and group a service runs as, resolved on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// `service.user` as the manifest names it (`None`: the nodelet's user).
    pub user: Option<String>,
    /// `service.group` as the manifest names it, if it does.
    pub group: Option<String>,
    /// The user's id, when a user is named.
    pub uid: Option<u32>,
    /// The group's id: `group`'s, else the user's primary group.
    pub gid: Option<u32>,
    /// The user's home folder, for `HOME` (`/` when the user database has none).
    pub home: PathBuf,
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
    log_limit: u64,
    log_keep: usize,
    /// Lines that did not reach a log file (see [`Supervisor::log_write_errors`]).
    log_write_errors: Arc<AtomicU64>,
}

impl Supervisor {
    /// A supervisor keeping pid files and logs under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Supervisor {
            services: tokio::sync::Mutex::new(HashMap::new()),
            pid_dir: state_dir.join("pids"),
            log_dir: state_dir.join("logs"),
            last_logs: Mutex::new(HashMap::new()),
            log_limit: DEFAULT_LOG_LIMIT,
            log_keep: DEFAULT_LOG_KEEP,
            log_write_errors: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Rotates a service's log file once it would grow past `bytes`, keeping `keep` rotated
    /// files (`<name>.log.1` is the newest); `keep = 0` keeps none. Applies to services
    /// started after the call.
    pub fn with_log_limit(mut self, bytes: u64, keep: usize) -> Self {
        self.log_limit = bytes.max(1);
        self.log_keep = keep;
        self
    }

    /// Lines of output that did not reach a log file since the supervisor started: the disk
    /// failed the write (full, read-only) or could not keep up. Those lines are still in the
    /// in-memory tail; the service never waits for its log file.
    pub fn log_write_errors(&self) -> u64 {
        self.log_write_errors.load(Ordering::Relaxed)
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
            LogFile::new(
                self.log_dir.join(format!("{}.log", spec.name)),
                self.log_limit,
                self.log_keep,
            ),
            self.log_write_errors.clone(),
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

    /// Stops everything (nodelet shutdown), all at once: services that ignore SIGTERM cost
    /// one 5 s grace period together, not one each.
    pub async fn stop_all(&self) {
        let names: Vec<String> = self.services.lock().await.keys().cloned().collect();
        futures::future::join_all(names.iter().map(|name| self.stop(name))).await;
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
    log_file: LogFile,
    log_write_errors: Arc<AtomicU64>,
) {
    let pid_file = pid_dir.join(format!("{}.pid", spec.name));
    let _ = tokio::fs::create_dir_all(&pid_dir).await;
    // One writer for stdout and stderr, and for every restart: rotation sees every line.
    let (log_lines, queued) = mpsc::channel(LOG_QUEUE);
    tokio::spawn(write_logs(queued, log_file, log_write_errors.clone()));
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
            .kill_on_drop(true)
            // The nodelet's own secrets and its launcher's mark are not the service's.
            .env_remove("SHOAL_JOIN_TOKEN")
            .env_remove("SHOAL_NODE_TOKEN")
            .env_remove(crate::launcher::LAUNCHED_ENV);
        if let Some(account) = &spec.account {
            if let Some(user) = &account.user {
                // What systemd's User= gives a service, set before the manifest's env so
                // that env can still override them.
                command
                    .env("USER", user)
                    .env("LOGNAME", user)
                    .env("HOME", &account.home)
                    .envs(&spec.env);
            }
            // std drops the supplementary groups (setgroups to none) when a root parent
            // changes the uid: the service gets its uid and gid only (docs/security.md).
            if let Some(uid) = account.uid {
                command.uid(uid);
            }
            if let Some(gid) = account.gid {
                command.gid(gid);
            }
        }
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
                    let log_lines = log_lines.clone();
                    let log_write_errors = log_write_errors.clone();
                    tokio::spawn(async move {
                        let mut lines = BufReader::new(stream).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            if log_lines.try_send(line.clone()).is_err() {
                                log_write_errors.fetch_add(1, Ordering::Relaxed);
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

/// Writes queued lines to the log file in batches, on the blocking pool: a slow or full disk
/// holds up this task, never the async workers or the service.
async fn write_logs(mut queued: mpsc::Receiver<String>, mut file: LogFile, errors: Arc<AtomicU64>) {
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match queued.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        let written = tokio::task::spawn_blocking(move || {
            let failed = file.write_lines(&batch);
            (file, failed)
        })
        .await;
        match written {
            Ok((back, failed)) => {
                file = back;
                errors.fetch_add(failed, Ordering::Relaxed);
            }
            // The runtime is shutting down.
            Err(_) => return,
        }
    }
}

/// A service's log file, rotated by size: `<name>.log` is the newest, `<name>.log.1` the one
/// before, up to `<name>.log.<keep>`.
struct LogFile {
    path: PathBuf,
    limit: u64,
    keep: usize,
    /// Open while writes succeed; dropped on an error and opened again for the next line, so
    /// logging resumes by itself once the disk has room.
    file: Option<std::fs::File>,
    len: u64,
}

impl LogFile {
    fn new(path: PathBuf, limit: u64, keep: usize) -> Self {
        LogFile {
            path,
            limit,
            keep,
            file: None,
            len: 0,
        }
    }

    /// Appends `lines`, rotating first whenever a line would take the file past the limit;
    /// returns how many lines could not be written.
    fn write_lines(&mut self, lines: &[String]) -> u64 {
        // Learn the size of a file an earlier run left, before deciding to rotate. A failure
        // shows again, and is counted, when the lines are written.
        let _ = self.open();
        let mut failed = 0;
        let mut pending: Vec<u8> = Vec::new();
        let mut pending_lines = 0u64;
        for line in lines {
            let size = line.len() as u64 + 1;
            if self.len + pending.len() as u64 + size > self.limit
                && self.len + pending.len() as u64 > 0
            {
                failed += self.flush(&mut pending, &mut pending_lines);
                self.rotate();
            }
            pending.extend_from_slice(line.as_bytes());
            pending.push(b'\n');
            pending_lines += 1;
        }
        failed + self.flush(&mut pending, &mut pending_lines)
    }

    /// Writes `pending` (holding `lines` lines); returns the lines lost to an error.
    fn flush(&mut self, pending: &mut Vec<u8>, lines: &mut u64) -> u64 {
        if pending.is_empty() {
            return 0;
        }
        let result = self.open().and_then(|file| file.write_all(pending));
        let size = pending.len() as u64;
        let lost = std::mem::take(lines);
        pending.clear();
        match result {
            Ok(()) => {
                self.len += size;
                0
            }
            Err(_) => {
                // Part of the batch may have reached the file: `open` learns its size afresh.
                self.file = None;
                lost
            }
        }
    }

    fn open(&mut self) -> std::io::Result<&mut std::fs::File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.len = file.metadata()?.len();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// `.log.<keep-1>` → `.log.<keep>` … `.log` → `.log.1`. Errors are ignored: at worst the
    /// file is not rotated and is appended to again, the same as a write error would do.
    fn rotate(&mut self) {
        self.file = None;
        self.len = 0;
        // A smaller `keep` than the last run's leaves no stale oldest file behind.
        let _ = std::fs::remove_file(self.rotated(self.keep + 1));
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
        }
        let _ = std::fs::rename(&self.path, self.rotated(1));
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
            account: None,
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

    /// Waits until `check` holds, for at most 10 s.
    async fn eventually(mut check: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        check()
    }

    #[tokio::test]
    async fn a_noisy_service_log_is_rotated_by_size() {
        let tmp = tempfile::tempdir().unwrap();
        let limit = 64 * 1024;
        let supervisor = Supervisor::new(tmp.path()).with_log_limit(limit, 1);
        // About 250 KB, on stdout and stderr alike; then, once the writer had time to drain
        // its queue, one line on each. A writer slower than the burst (under qemu-user, in
        // the aarch64 tests) drops and counts lines of the burst, by design; the two last
        // lines must arrive all the same.
        let script = "i=0; while [ $i -lt 5000 ]; do echo \"line $i: the quick brown fox jumps\"; \
                      [ $((i % 7)) = 0 ] && echo \"err $i\" >&2; i=$((i+1)); done; \
                      sleep 2; echo \"last line: the quick brown fox jumps\"; echo \"last err\" >&2; exec sleep 30";
        supervisor.start(spec("noisy", script, tmp.path())).await;
        let log = tmp.path().join("logs/noisy.log");
        let rotated = tmp.path().join("logs/noisy.log.1");
        // stdout and stderr are read apart, so either of the last two lines may come last.
        let last_lines = || {
            let text = std::fs::read_to_string(&rotated).unwrap_or_default()
                + &std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("last line:") && text.contains("last err")
        };
        assert!(
            eventually(last_lines).await,
            "the last lines never reached the file: {:?}, {} lines not written",
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .last(),
            supervisor.log_write_errors()
        );
        let longest_line = "line 4999: the quick brown fox jumps\n".len() as u64;
        for file in [&log, &rotated] {
            let size = std::fs::metadata(file).unwrap().len();
            assert!(
                size <= limit + longest_line,
                "{}: {size} bytes",
                file.display()
            );
            assert!(size > 0, "{}", file.display());
        }
        assert!(!tmp.path().join("logs/noisy.log.2").exists(), "keep = 1");
        assert!(supervisor.running("noisy").await);
        supervisor.stop_all().await;
    }

    #[test]
    fn rotation_keeps_the_newest_files_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("logs/svc.log");
        let mut file = LogFile::new(path.clone(), 20, 2);
        // Nine bytes a line (with its newline): two lines fit in 20 bytes, a third does not.
        let lines: Vec<String> = (0..9).map(|i| format!("line-{i:03}")).collect();
        assert_eq!(file.write_lines(&lines[..5]), 0);
        assert_eq!(file.write_lines(&lines[5..]), 0);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), "line-008\n");
        assert_eq!(read(&file.rotated(1)), "line-006\nline-007\n");
        assert_eq!(read(&file.rotated(2)), "line-004\nline-005\n");
        assert!(!file.rotated(3).exists());

        // A new writer (a restart) goes on with the size the file has.
        let mut again = LogFile::new(path.clone(), 20, 2);
        assert_eq!(again.write_lines(&lines[..1]), 0);
        assert_eq!(read(&path), "line-008\nline-000\n");
        assert_eq!(read(&again.rotated(1)), "line-006\nline-007\n");
    }

    #[tokio::test]
    async fn a_full_disk_loses_file_lines_not_the_service() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("logs")).unwrap();
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        std::os::unix::fs::symlink("/dev/full", tmp.path().join("logs/full.log")).unwrap();
        let supervisor = Supervisor::new(tmp.path());
        supervisor
            .start(spec(
                "full",
                "echo one; echo two; exec sleep 30",
                tmp.path(),
            ))
            .await;
        assert!(eventually(|| supervisor.log_write_errors() >= 2).await);
        assert_eq!(supervisor.log_tail("full", 5), vec!["one", "two"]);
        assert!(supervisor.running("full").await);
        supervisor.stop_all().await;
    }

    #[tokio::test]
    async fn stop_all_stops_stubborn_services_together() {
        let tmp = tempfile::tempdir().unwrap();
        let supervisor = Supervisor::new(tmp.path());
        for name in ["a", "b", "c"] {
            // An ignored SIGTERM is inherited by the sleeps too: only SIGKILL ends these.
            let script = "trap '' TERM; echo up; while :; do sleep 0.1; done";
            supervisor.start(spec(name, script, tmp.path())).await;
        }
        for name in ["a", "b", "c"] {
            assert!(eventually(|| supervisor.log_tail(name, 1) == ["up"]).await);
        }
        let started = Instant::now();
        supervisor.stop_all().await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(5),
            "SIGTERM was ignored: {took:?}"
        );
        assert!(
            took < Duration::from_secs(8),
            "one grace period, not three: {took:?}"
        );
        for name in ["a", "b", "c"] {
            assert!(!supervisor.running(name).await);
        }
    }
}
