//! The node's side of the node protocol, behind a trait so the agent can be driven without a network.

use std::collections::BTreeMap;
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

/// The HTTP implementation.
#[derive(Clone)]
pub struct HttpClient {
    base: String,
    http: reqwest::Client,
}

impl HttpClient {
    /// A client for the apiserver at `base`.
    pub fn new(base: &str) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(2)
            // The apiserver closes an HTTP/1 connection that sends no request head for 10 s
            // (its slowloris guard). Let go of idle ones first, so a heartbeat never races
            // the server's close on a connection it is about to reuse.
            .pool_idle_timeout(Duration::from_secs(8))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(HttpClient {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
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
        let response = check(
            self.http
                .post(format!("{}/api/v1/nodes/register", self.base))
                .bearer_auth(join_token)
                .json(&request)
                .timeout(Duration::from_secs(30))
                .send()
                .await,
        )
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
        let response = check(
            self.http
                .get(format!(
                    "{}/api/v1/nodes/{node}/assignment{query}",
                    self.base
                ))
                .bearer_auth(token)
                .timeout(wait + Duration::from_secs(15))
                .send()
                .await,
        )
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
        check(
            self.http
                .put(format!("{}/api/v1/nodes/{node}/status", self.base))
                .bearer_auth(token)
                .json(report)
                .timeout(Duration::from_secs(15))
                .send()
                .await,
        )
        .await?;
        Ok(())
    }
}
