//! The one way the nodelet runs a program: arguments as a vector, exit status
//! checked, stderr in the error, a time limit.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// A program that failed to run or exited non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started.
    #[error("'{program}' could not be started: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited non-zero.
    #[error("'{program}' failed ({status}) - stderr: {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
        /// Its standard output, trimmed.
        stdout: String,
    },
    /// It ran longer than allowed and was killed.
    #[error("'{program}' did not finish within {seconds}s and was killed")]
    Timeout {
        /// The program.
        program: String,
        /// The limit.
        seconds: u64,
    },
}

/// What a finished program printed.
#[derive(Debug, Clone)]
pub struct Output {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Keeps the end of long output: the last lines are the ones that explain a failure.
pub fn tail(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// Runs `program args…` with extra environment, and returns its output if it exits 0.
pub async fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    env: &[(&str, &str)],
    limit: Duration,
) -> Result<Output, CommandError> {
    run_in(program, args, env, None, limit).await
}

/// `run` in a working directory.
pub async fn run_in<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    env: &[(&str, &str)],
    cwd: Option<&Path>,
    limit: Duration,
) -> Result<Output, CommandError> {
    run_full(program, args, env, cwd, None, limit).await
}

/// `run` with `input` on standard input (`dpkg --set-selections` reads its orders there).
pub async fn run_with_input<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    env: &[(&str, &str)],
    input: Vec<u8>,
    limit: Duration,
) -> Result<Output, CommandError> {
    run_full(program, args, env, None, Some(input), limit).await
}

async fn run_full<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    env: &[(&str, &str)],
    cwd: Option<&Path>,
    input: Option<Vec<u8>>,
    limit: Duration,
) -> Result<Output, CommandError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn().map_err(|source| CommandError::Spawn {
        program: program.to_string(),
        source,
    })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // Written beside the wait: a program that prints before it has read everything must
        // not block on a full pipe. Dropping stdin at the end is the end of input.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&input).await;
        });
    }
    let output = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(result) => result.map_err(|source| CommandError::Spawn {
            program: program.to_string(),
            source,
        })?,
        Err(_) => {
            return Err(CommandError::Timeout {
                program: program.to_string(),
                seconds: limit.as_secs(),
            })
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(CommandError::Failed {
            program: program.to_string(),
            status: output.status.to_string(),
            stderr: tail(&stderr, 2000),
            stdout: tail(&stdout, 2000),
        });
    }
    Ok(Output { stdout, stderr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_exit_status_and_keeps_stderr() {
        let ok = run("sh", &["-c", "echo hi"], &[], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ok.stdout.trim(), "hi");
        let err = run(
            "sh",
            &["-c", "echo boom >&2; exit 3"],
            &[],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "'sh' failed (exit status: 3) - stderr: boom"
        );
        let err = run("sleep", &["5"], &[], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }));
        let err = run(
            "/nonexistent/program",
            &[] as &[&str],
            &[],
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }

    #[tokio::test]
    async fn input_reaches_standard_input() {
        let out = run_with_input(
            "sh",
            &["-c", "read line; echo \"got $line\""],
            &[],
            b"hold\n".to_vec(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(out.stdout.trim(), "got hold");
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail(" ab ", 3), "ab");
    }
}
