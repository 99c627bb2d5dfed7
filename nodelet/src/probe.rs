//! Probes: http, tcp, exec and host resources, each with a time limit and an
//! output a person can read in a failure report.

use std::time::Duration;

use manifests::{Probe, ProbeCheck};

use crate::command;
use crate::host::HostSampler;

/// The result of one probe run.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Passed.
    pub passed: bool,
    /// What it saw, shortened.
    pub output: String,
}

impl Outcome {
    fn pass(output: impl Into<String>) -> Self {
        Outcome {
            passed: true,
            output: output.into(),
        }
    }
    fn fail(output: impl Into<String>) -> Self {
        Outcome {
            passed: false,
            output: output.into(),
        }
    }
}

/// Runs one probe.
pub async fn run(probe: &Probe, http: &reqwest::Client, host: &HostSampler) -> Outcome {
    let limit = Duration::from_secs(probe.timeout_seconds.max(1).into());
    match probe.check() {
        None => Outcome::fail("the probe has no single check (rejected by validation)"),
        Some(ProbeCheck::Http(check)) => {
            let request = http.get(&check.url).timeout(limit).send().await;
            match request {
                Err(e) if e.is_timeout() => Outcome::fail(format!(
                    "GET {}: no answer within {}s",
                    check.url,
                    limit.as_secs()
                )),
                Err(e) => Outcome::fail(format!("GET {}: {}", check.url, error_chain(&e))),
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    let body = command::tail(&body, 300);
                    let passed = match check.expected_status {
                        Some(expected) => status == expected,
                        None => (200..300).contains(&status),
                    };
                    let output = format!("GET {} → {status}: {body}", check.url);
                    if passed {
                        Outcome::pass(output)
                    } else {
                        Outcome::fail(output)
                    }
                }
            }
        }
        Some(ProbeCheck::Tcp(check)) => {
            match tokio::time::timeout(limit, tokio::net::TcpStream::connect(&check.address)).await
            {
                Ok(Ok(_)) => Outcome::pass(format!("connected to {}", check.address)),
                Ok(Err(e)) => Outcome::fail(format!("connect {}: {e}", check.address)),
                Err(_) => Outcome::fail(format!(
                    "connect {}: no answer within {}s",
                    check.address,
                    limit.as_secs()
                )),
            }
        }
        Some(ProbeCheck::Exec(check)) => {
            let (program, args) = check.command.split_first().expect("validated non-empty");
            match command::run(program, args, &[], limit).await {
                Ok(output) => Outcome::pass(command::tail(
                    &format!("{}{}", output.stdout, output.stderr),
                    500,
                )),
                Err(e) => Outcome::fail(command::tail(&e.to_string(), 500)),
            }
        }
        Some(ProbeCheck::Resource(check)) => {
            let metrics = host.sample();
            let mut failures = Vec::new();
            let mut seen = Vec::new();
            let percent = |used: u64, total: u64| {
                if total == 0 {
                    0.0
                } else {
                    used as f64 * 100.0 / total as f64
                }
            };
            let mut test = |name: &str, value: Option<f64>, limit: Option<f64>| {
                if let Some(limit) = limit {
                    match value {
                        Some(value) if value < limit => {
                            seen.push(format!("{name} {value:.1} < {limit}"))
                        }
                        Some(value) => failures.push(format!("{name} {value:.1} ≥ {limit}")),
                        None => seen.push(format!("{name} not measurable here")),
                    }
                }
            };
            test(
                "memory %",
                Some(percent(
                    metrics.memory_used_bytes,
                    metrics.memory_total_bytes,
                )),
                check.memory_used_percent_below,
            );
            test(
                "cpu %",
                Some(metrics.cpu_percent),
                check.cpu_used_percent_below,
            );
            test(
                "disk %",
                Some(percent(metrics.disk_used_bytes, metrics.disk_total_bytes)),
                check.disk_used_percent_below,
            );
            test(
                "temperature °C",
                metrics.temperature_celsius,
                check.temperature_celsius_below,
            );
            if failures.is_empty() {
                Outcome::pass(seen.join(", "))
            } else {
                Outcome::fail(failures.join(", "))
            }
        }
    }
}

/// An error with its causes, which reqwest keeps apart ("error sending request: … connection refused").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifests::{ExecCheck, HttpCheck, ResourceCheck, TcpCheck};

    fn probe() -> Probe {
        Probe {
            name: "p".into(),
            http: None,
            tcp: None,
            exec: None,
            resource: None,
            period_seconds: 1,
            failure_threshold: 1,
            timeout_seconds: 2,
            required: false,
        }
    }

    #[tokio::test]
    async fn each_kind_passes_and_fails() {
        let http = reqwest::Client::new();
        let host = HostSampler::new(std::path::Path::new("/"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buffer = [0u8; 1024];
                let n = socket.read(&mut buffer).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buffer[..n]);
                let reply = if request.starts_with("GET /ok") {
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nsick"
                };
                let _ = socket.write_all(reply.as_bytes()).await;
            }
        });
        let mut p = probe();
        p.http = Some(HttpCheck {
            url: format!("http://{address}/ok"),
            expected_status: None,
        });
        assert!(run(&p, &http, &host).await.passed);
        p.http = Some(HttpCheck {
            url: format!("http://{address}/bad"),
            expected_status: None,
        });
        let outcome = run(&p, &http, &host).await;
        assert!(!outcome.passed);
        assert!(outcome.output.contains("503: sick"), "{}", outcome.output);
        p.http = Some(HttpCheck {
            url: format!("http://{address}/bad"),
            expected_status: Some(503),
        });
        assert!(run(&p, &http, &host).await.passed);

        let mut p = probe();
        p.tcp = Some(TcpCheck {
            address: address.clone(),
        });
        assert!(run(&p, &http, &host).await.passed);
        p.tcp = Some(TcpCheck {
            address: "127.0.0.1:1".into(),
        });
        assert!(!run(&p, &http, &host).await.passed);

        let mut p = probe();
        p.exec = Some(ExecCheck {
            command: vec!["sh".into(), "-c".into(), "echo fine".into()],
        });
        assert_eq!(run(&p, &http, &host).await, Outcome::pass("fine"));
        p.exec = Some(ExecCheck {
            command: vec!["sh".into(), "-c".into(), "echo broken >&2; exit 1".into()],
        });
        let outcome = run(&p, &http, &host).await;
        assert!(!outcome.passed && outcome.output.contains("broken"));

        let mut p = probe();
        p.resource = Some(ResourceCheck {
            memory_used_percent_below: Some(100.0),
            ..Default::default()
        });
        assert!(run(&p, &http, &host).await.passed);
        p.resource = Some(ResourceCheck {
            memory_used_percent_below: Some(0.001),
            ..Default::default()
        });
        assert!(!run(&p, &http, &host).await.passed);
    }
}
