//! The launcher: runs the pinned nodelet release as its child and puts a release on trial
//! back when it crash-loops or does not commit in time (docs/self-update.md).
//!
//! Its code is the installed binary's, never the release's: a broken release cannot break the
//! thing that reverts it. It decides with [`selfupdate::decide`]; this module only reads the
//! records, starts, watches and stops.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::signal::unix::{signal, SignalKind};

use crate::journal::{read_json, write_atomic};
use crate::selfupdate::{decide, Launch, Trial};

/// Set in the release's environment to the launcher's pid: the release is the agent, never a
/// launcher itself, and stops when that pid is no longer its parent.
pub const LAUNCHED_ENV: &str = "SHOAL_LAUNCHED";

/// The exit code with which an agent asks its launcher to start `current` right away (it
/// switched to a new release).
pub const EXIT_SWITCH: i32 = 75;

/// Lines of a release's output kept for the report of a revert.
const TAIL_LINES: usize = 20;

/// How long a stopped release has to exit before it is killed: a dpkg step in flight is let
/// finish, as under systemd (`TimeoutStopSec=60` in the unit).
const STOP_GRACE: Duration = Duration::from_secs(60);

/// What a revert left for the agent that comes back to report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// The release that was put back.
    pub version: String,
    /// The release running again.
    pub previous: String,
    /// Why, for people.
    pub reason: String,
    /// The last lines the release printed.
    pub logs: Vec<String>,
    /// Wall clock (Unix seconds) of the revert.
    pub at: u64,
}

/// `<state>/releases`: one folder per release (`<version>/nodelet`), the `current` and `good`
/// links, the trial record and a revert's outcome.
#[derive(Debug, Clone)]
pub struct Releases {
    dir: PathBuf,
}

impl Releases {
    /// The releases of the nodelet whose state dir is `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Releases {
            dir: state_dir.join("releases"),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn link(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.dir.join(name)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// The release `current` points at: what the launcher runs.
    pub fn current(&self) -> Option<String> {
        self.link("current")
    }

    /// The last release that committed (or was installed).
    pub fn good(&self) -> Option<String> {
        self.link("good")
    }

    /// Where release `version`'s binary is.
    pub fn binary(&self, version: &str) -> PathBuf {
        self.dir.join(version).join("nodelet")
    }

    /// Points `current` or `good` at `version` in one rename.
    pub fn point(&self, name: &str, version: &str) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(version, &tmp)?;
        std::fs::rename(&tmp, self.dir.join(name))
    }

    fn trial_path(&self) -> PathBuf {
        self.dir.join("trial.json")
    }

    /// The release on trial, if any (`Err`: the record is unreadable).
    pub fn trial(&self) -> Result<Option<Trial>, String> {
        read_json(&self.trial_path())
    }

    /// Records a trial, whole.
    pub fn write_trial(&self, trial: &Trial) -> std::io::Result<()> {
        let json = serde_json::to_vec(trial).expect("a trial serializes");
        write_atomic(&self.trial_path(), &json)
    }

    fn clear_trial(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.trial_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn outcome_path(&self) -> PathBuf {
        self.dir.join("outcome.json")
    }

    /// The outcome of the last revert, if one is left to report.
    pub fn outcome(&self) -> Result<Option<Outcome>, String> {
        read_json(&self.outcome_path())
    }

    fn write_outcome(&self, outcome: &Outcome) -> std::io::Result<()> {
        let json = serde_json::to_vec(outcome).expect("an outcome serializes");
        write_atomic(&self.outcome_path(), &json)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The last lines a release printed (its output also goes on to the launcher's stderr, so
/// the journal or a log file still has all of it).
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    // One copy of the reader for stdout and stderr: the board's binary has a size budget.
    fn follow(&self, stream: Box<dyn AsyncRead + Unpin + Send>) -> tokio::task::JoinHandle<()> {
        let tail = self.clone();
        tokio::spawn(async move {
            // Bytes, not `lines()`: a line that is not UTF-8 must not stop the draining, or
            // the release would block on a full pipe; and a failed write to our own stderr
            // is ignored for the same reason.
            let mut reader = BufReader::new(stream);
            let mut buffer = Vec::new();
            loop {
                buffer.clear();
                match reader.read_until(b'\n', &mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let _ = std::io::stderr().write_all(&buffer);
                let line = String::from_utf8_lossy(&buffer).trim_end().to_string();
                let mut kept = tail.0.lock().expect("not poisoned");
                kept.push_back(line);
                while kept.len() > TAIL_LINES {
                    kept.pop_front();
                }
            }
        })
    }

    fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("not poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

/// How a release's run ended.
enum Ended {
    /// It exited by itself with this code (`None`: killed by a signal).
    Exited(Option<i32>),
    /// It ran out of time on trial and was stopped.
    OutOfTime,
    /// The launcher was told to stop; the release was stopped and exited with this code.
    Stopped(Option<i32>),
}

/// Stops a release: SIGTERM, then SIGKILL after the grace period.
async fn stop(child: &mut tokio::process::Child, grace: Duration) -> Option<i32> {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok().and_then(|s| s.code()),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    }
}

/// Takes the lock at `path` for as long as the returned guard lives: one agent per state dir
/// (two would interleave their journal writes), one launcher per releases folder. The lock
/// file names the pid that holds it, for the error of the one refused.
pub fn lock(path: &Path, what: &str) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use nix::fcntl::{Flock, FlockArg};
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut held) => {
            let _ = held.set_len(0);
            let _ = writeln!(&mut *held, "{}", std::process::id());
            Ok(held)
        }
        Err((_, e)) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            Err(format!(
                "another {what} runs with {} (pid {}; {e}): stop it first",
                path.parent().unwrap_or(path).display(),
                holder.trim()
            ))
        }
    }
}

/// Waits `time`, or until a stop signal (true).
async fn pause(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
    time: Duration,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(time) => false,
        _ = term.recv() => true,
        _ = int.recv() => true,
    }
}

/// After a revert that could not be written (a full or read-only disk): wait before the
/// next try instead of spinning.
const REVERT_RETRY: Duration = Duration::from_secs(5);

/// Runs the launcher until it is told to stop; `args` are the nodelet's own arguments,
/// passed on to every release.
pub async fn run(releases: Releases, args: Vec<OsString>) -> ExitCode {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("nodelet: cannot handle signals: {e}");
            return ExitCode::from(2);
        }
    };
    let _lock = match lock(&releases.dir().join("launcher.lock"), "nodelet launcher") {
        Ok(held) => held,
        Err(message) => {
            eprintln!("nodelet: {message}");
            return ExitCode::from(2);
        }
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(current) = releases.current() else {
            eprintln!(
                "nodelet: {}/current is gone: point it at a release (ln -sfn VERSION current)",
                releases.dir().display()
            );
            return ExitCode::from(2);
        };
        let trial = releases.trial();
        let mut within = None;
        match decide(
            trial.as_ref().map(Option::as_ref).map_err(Clone::clone),
            &current,
            unix_now(),
        ) {
            Launch::Run => {
                if let Ok(Some(trial)) = &trial {
                    committed(&releases, &trial.version);
                }
            }
            Launch::Abandon => {
                tracing::warn!(
                    current,
                    "the trial never switched to its release: forgotten"
                );
                let _ = releases.clear_trial();
            }
            Launch::Try {
                starts,
                within: limit,
            } => {
                // decide tries only a trial it could read.
                let Ok(Some(mut record)) = trial else {
                    continue;
                };
                record.starts = starts;
                if let Err(e) = releases.write_trial(&record) {
                    // Without a counted start a crash loop could go on for ever: go back.
                    tracing::error!(error = %e, "cannot count the start of the release on trial; going back");
                    let done = revert(
                        &releases,
                        &record.version,
                        Some(record.previous.clone()),
                        format!("the start could not be recorded: {e}"),
                        Vec::new(),
                    );
                    if !done && pause(&mut term, &mut int, REVERT_RETRY).await {
                        return ExitCode::SUCCESS;
                    }
                    continue;
                }
                tracing::info!(
                    version = current,
                    start = starts,
                    of = record.max_starts,
                    seconds = limit.as_secs(),
                    "starting the nodelet release on trial"
                );
                within = Some(limit);
            }
            Launch::Revert { to, reason } => {
                let done = revert(&releases, &current, to, reason.to_string(), Vec::new());
                if !done && pause(&mut term, &mut int, REVERT_RETRY).await {
                    return ExitCode::SUCCESS;
                }
                continue;
            }
        }
        let binary = releases.binary(&current);
        let mut child = match tokio::process::Command::new(&binary)
            .args(&args)
            .env(LAUNCHED_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                tracing::error!(binary = %binary.display(), error = %e, "cannot start the nodelet release");
                if within.is_some() {
                    // Counted as a start: the loop ends in a revert.
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = term.recv() => return ExitCode::SUCCESS,
                    _ = int.recv() => return ExitCode::SUCCESS,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let tail = Tail::default();
        let readers: Vec<_> = [
            child.stdout.take().map(|out| tail.follow(Box::new(out))),
            child.stderr.take().map(|err| tail.follow(Box::new(err))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let started = Instant::now();
        let ended = loop {
            tokio::select! {
                status = child.wait() => break Ended::Exited(status.ok().and_then(|s| s.code())),
                _ = term.recv() => break Ended::Stopped(stop(&mut child, STOP_GRACE).await),
                _ = int.recv() => break Ended::Stopped(stop(&mut child, STOP_GRACE).await),
                _ = tokio::time::sleep(Duration::from_millis(500)), if within.is_some() => {
                    if matches!(releases.trial(), Ok(Some(t)) if t.committed) {
                        within = None;
                        committed(&releases, &current);
                    } else if within.is_some_and(|limit| started.elapsed() >= limit) {
                        tracing::warn!(version = current, "the nodelet release on trial did not commit in time: stopping it");
                        stop(&mut child, STOP_GRACE).await;
                        break Ended::OutOfTime;
                    }
                }
            }
        };
        // The last lines are still in the pipes when a release exits at once; a process it
        // left behind may hold them open, so not for ever.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for reader in readers {
                let _ = reader.await;
            }
        })
        .await;
        match ended {
            Ended::Stopped(code) => {
                return ExitCode::from(code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1));
            }
            Ended::OutOfTime => {
                // The wall clock decides whether the deadline passed; a clock that jumped
                // back only gives the release another start, which counts.
                if revert_if_due(&releases, &current, tail.lines()) == Some(false)
                    && pause(&mut term, &mut int, REVERT_RETRY).await
                {
                    return ExitCode::SUCCESS;
                }
                continue;
            }
            // Only when the release really moved `current`: otherwise a release that exits 75
            // for nothing would be restarted in a tight loop.
            Ended::Exited(Some(EXIT_SWITCH)) if releases.current().as_deref() != Some(&current) => {
                tracing::info!(
                    version = current,
                    "the nodelet switched releases: starting the current one"
                );
                backoff = Duration::from_secs(1);
                continue;
            }
            Ended::Exited(code) => {
                let on_trial = within.is_some();
                tracing::warn!(
                    version = current,
                    ?code,
                    on_trial,
                    "the nodelet release exited"
                );
                if on_trial {
                    if let Some(done) = revert_if_due(&releases, &current, tail.lines()) {
                        if !done && pause(&mut term, &mut int, REVERT_RETRY).await {
                            return ExitCode::SUCCESS;
                        }
                        continue;
                    }
                }
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                if pause(&mut term, &mut int, backoff).await {
                    return ExitCode::SUCCESS;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// A release on trial committed: it is the good one now, and its trial is over.
fn committed(releases: &Releases, version: &str) {
    tracing::info!(
        version,
        "the new nodelet committed: it is the good release now"
    );
    match releases.point("good", version) {
        Ok(()) => {
            let _ = releases.clear_trial();
        }
        Err(e) => tracing::warn!(error = %e, "could not record the committed release as good"),
    }
}

/// After a release on trial exited or ran out of time: reverts it when the trial record says
/// so (`Some(written)`), or `None` when it gets another start.
fn revert_if_due(releases: &Releases, current: &str, logs: Vec<String>) -> Option<bool> {
    let Ok(Some(trial)) = releases.trial() else {
        return None;
    };
    match decide(Ok(Some(&trial)), current, unix_now()) {
        Launch::Revert { to, reason } => {
            Some(revert(releases, current, to, reason.to_string(), logs))
        }
        _ => None,
    }
}

/// Puts `to` (or the good release) back in place of `version` and leaves the outcome for the
/// agent that comes back to report; false when it could not be written (try again later).
///
/// The outcome is written first, then `current` moves, then the trial record goes: a kill -9
/// between any two leaves either the trial to decide again (same revert) or an abandoned
/// trial whose outcome is already there to report.
fn revert(
    releases: &Releases,
    version: &str,
    to: Option<String>,
    reason: String,
    logs: Vec<String>,
) -> bool {
    let present = |v: &String| releases.binary(v).is_file();
    let Some(to) = to
        .filter(present)
        .or_else(|| releases.good().filter(present))
    else {
        // Nothing to go back to: running the release on trial beats running no agent.
        tracing::error!(
            version,
            reason,
            "no previous nodelet release on disk to go back to: keeping the current one"
        );
        let _ = releases.clear_trial();
        return true;
    };
    tracing::warn!(
        version,
        previous = to,
        reason,
        "putting the previous nodelet release back"
    );
    let outcome = Outcome {
        version: version.to_string(),
        previous: to.clone(),
        reason,
        logs,
        at: unix_now(),
    };
    if let Err(e) = releases.write_outcome(&outcome) {
        tracing::error!(error = %e, "cannot leave the revert's outcome for the agent");
        return false;
    }
    if let Err(e) = releases.point("current", &to) {
        tracing::error!(error = %e, "cannot point current back at the previous release");
        return false;
    }
    if let Err(e) = releases.clear_trial() {
        tracing::warn!(error = %e, "could not remove the reverted trial record");
    }
    true
}
