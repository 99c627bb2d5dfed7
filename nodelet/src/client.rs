//! The node's side of the node protocol, behind a trait so the agent can be driven without a network.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use manifests::wire::{
    ApiErrorBody, NodeAssignment, NodeReport, RegisterRequest, RegisterResponse,
};

/// Why a call to the apiserver failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: the node keeps enforcing what it has.
    #[error("apiserver unreachable: {0}")]
    Unreachable(String),
    /// An answer that refuses the call.
    #[error("apiserver answered {status}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The error text.
        message: String,
    },
}

/// The calls a nodelet makes.
// Only used with concrete types inside this crate.
#[allow(async_fn_in_trait)]
pub trait ApiClient: Send + Sync {
    /// Registers with a join token; returns the node token.
    async fn register(
        &self,
        join_token: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, ClientError>;
    /// The node's assignment; with `since`, waits up to `wait` for a different one.
    async fn assignment(
        &self,
        token: &str,
        node: &str,
        since: Option<u64>,
        wait: Duration,
    ) -> Result<NodeAssignment, ClientError>;
    /// Sends a heartbeat.
    async fn report(&self, token: &str, node: &str, report: &NodeReport)
        -> Result<(), ClientError>;
}

/// The HTTP implementation, over one apiserver or several replicas: a call goes to the
/// replica that answered last and moves on to the next when that one cannot be reached.
#[derive(Clone)]
pub struct HttpClient {
    bases: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    http: reqwest::Client,
}

/// Whether an answer means "this replica cannot serve now, another may".
fn unavailable(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// The apiserver URLs in `servers` (each possibly several, comma-separated), checked.
pub fn server_urls(servers: &[String]) -> Result<Vec<String>, String> {
    let bases: Vec<String> = servers
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if bases.is_empty() {
        return Err("no apiserver URL: pass --server URL (repeated or comma-separated for replicas) or set SHOAL_SERVER".into());
    }
    if let Some(bad) = bases
        .iter()
        .find(|b| reqwest::Url::parse(b).map_or(true, |u| !matches!(u.scheme(), "http" | "https")))
    {
        return Err(format!(
            "--server {bad}: not an http(s) URL (expected https://HOST:PORT)"
        ));
    }
    Ok(bases)
}

impl HttpClient {
    /// A client for the apiserver at `servers` (URLs, each possibly several
    /// comma-separated) that trusts `cas` besides the platform's roots.
    pub fn new(servers: &[String], cas: &[reqwest::Certificate]) -> Result<Self, String> {
        let bases = server_urls(servers)?;
        let http = cas
            .iter()
            .fold(reqwest::Client::builder(), |builder, ca| {
                builder.add_root_certificate(ca.clone())
            })
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(2)
            // The apiserver closes an HTTP/1 connection that sends no request head for 10 s
            // (its slowloris guard). Let go of idle ones first, so a heartbeat never races
            // the server's close on a connection it is about to reuse.
            .pool_idle_timeout(Duration::from_secs(8))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(HttpClient {
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            http,
        })
    }

    /// Sends the request `build` makes for a replica, starting with the one that answered
    /// last; the next replica is tried when one is unreachable or answers 502-504. Every
    /// call of the node protocol may be repeated (a heartbeat or a read), so a timed-out
    /// one is tried elsewhere too.
    async fn send(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let count = self.bases.len();
        let first = self.current.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (first + step) % count;
            let base = &self.bases[index];
            match build(base).send().await {
                Ok(response) if unavailable(response.status()) && step + 1 < count => {
                    failures.push(format!("{base} answered {}", response.status()));
                }
                Ok(response) => {
                    if index != first {
                        tracing::info!(server = %base, "talking to another apiserver replica");
                    }
                    self.current.store(index, Ordering::Relaxed);
                    return check(Ok(response)).await;
                }
                Err(e) => match shoal_tls::refused_certificate(&e) {
                    // Said as what it is (not "unreachable"), with the names and the issuer:
                    // reading those takes a second handshake, off the async workers.
                    Some(reason) => {
                        let url = base.clone();
                        let problem =
                            tokio::task::spawn_blocking(move || shoal_tls::diagnose(&reason, &url))
                                .await
                                .map(|p| p.to_string())
                                .unwrap_or_else(|_| e.to_string());
                        failures.push(format!("{base}: {problem}"));
                    }
                    None => failures.push(format!("{base}: {e}")),
                },
            }
        }
        Err(ClientError::Unreachable(failures.join("; ")))
    }
}

async fn check(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<reqwest::Response, ClientError> {
    let response = response.map_err(|e| ClientError::Unreachable(e.to_string()))?;
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let message = match response.json::<ApiErrorBody>().await {
        Ok(body) => match body.hint {
            Some(hint) => format!("{}; {hint}", body.error),
            None => body.error,
        },
        Err(_) => "no error body".into(),
    };
    Err(ClientError::Rejected { status, message })
}

impl ApiClient for HttpClient {
    async fn register(
        &self,
        join_token: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, ClientError> {
        let request = RegisterRequest {
            name: name.to_string(),
            labels: labels.clone(),
        };
        let response = self
            .send(|base| {
                self.http
                    .post(format!("{base}/api/v1/nodes/register"))
                    .bearer_auth(join_token)
                    .json(&request)
                    .timeout(Duration::from_secs(30))
            })
            .await?;
        let body: RegisterResponse = response
            .json()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        Ok(body.token)
    }

    async fn assignment(
        &self,
        token: &str,
        node: &str,
        since: Option<u64>,
        wait: Duration,
    ) -> Result<NodeAssignment, ClientError> {
        let query = match since {
            Some(generation) => format!("?since={generation}&waitSeconds={}", wait.as_secs()),
            None => String::new(),
        };
        let response = self
            .send(|base| {
                self.http
                    .get(format!("{base}/api/v1/nodes/{node}/assignment{query}"))
                    .bearer_auth(token)
                    .timeout(wait + Duration::from_secs(15))
            })
            .await?;
        response
            .json()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))
    }

    async fn report(
        &self,
        token: &str,
        node: &str,
        report: &NodeReport,
    ) -> Result<(), ClientError> {
        self.send(|base| {
            self.http
                .put(format!("{base}/api/v1/nodes/{node}/status"))
                .bearer_auth(token)
                .json(report)
                .timeout(Duration::from_secs(15))
        })
        .await?;
        Ok(())
    }
}
