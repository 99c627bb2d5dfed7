//! Runs a program for the apiserver (git): arguments as a vector, exit status checked, stderr in the error.

use std::time::Duration;

/// Runs `program args…` and returns its standard output, or an error naming the program with its stderr.
pub async fn run(program: &str, args: &[&str], limit: Duration) -> Result<String, String> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("'{program}' could not be started: {e}"))?;
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| format!("'{program}' did not finish within {}s", limit.as_secs()))?
        .map_err(|e| format!("'{program}' failed: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "'{program}' failed ({}) - stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
