//! The CLI's HTTP client: one place that turns transport and API errors into messages that say what to do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use manifests::wire::ApiErrorBody;
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;

/// An error the CLI reports and exits 2 on.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong.
    pub message: String,
    /// Lines with details (one per manifest problem).
    pub details: Vec<String>,
    /// What to do next.
    pub hint: Option<String>,
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
}

impl CliError {
    /// An error with a hint.
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            details: vec![],
            hint: Some(hint.into()),
            status: None,
        }
    }

    /// Prints the error to stderr.
    pub fn print(&self) {
        eprintln!("error: {}", self.message);
        for line in &self.details {
            eprintln!("  {line}");
        }
        if let Some(hint) = &self.hint {
            eprintln!("hint: {hint}");
        }
    }
}

/// Talks to the apiserver: one of several replicas, failing over to the next when one
/// cannot be reached.
pub struct Client {
    bases: Vec<String>,
    /// The replica that answered last: tried first.
    current: AtomicUsize,
    token: Option<String>,
    http: Http,
}

/// The apiserver URLs in `servers`: each may hold several, comma-separated (`--server`
/// repeated, or `SHOAL_SERVER=https://a:7070,https://b:7070`).
pub fn server_list(servers: &[String]) -> Vec<String> {
    servers
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Whether an answer means "this replica cannot serve now, another may".
fn unavailable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Which certificates the CLI accepts from the apiserver.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// CA certificates (PEM) trusted besides the platform's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Accept any certificate (`--insecure-skip-tls-verify`).
    pub skip_verify: bool,
}

impl Client {
    /// A client for `server` (one URL, or several comma-separated), sending `token` if given.
    pub fn new(server: &str, token: Option<String>) -> Result<Self, CliError> {
        Client::with_servers(&[server.to_string()], token, &Trust::default())
    }

    /// A client for several replicas of the apiserver.
    pub fn with_servers(
        servers: &[String],
        token: Option<String>,
        trust: &Trust,
    ) -> Result<Self, CliError> {
        let bases = server_list(servers);
        if bases.is_empty() {
            return Err(CliError::new(
                "no apiserver URL given",
                "pass --server http://HOST:PORT or set SHOAL_SERVER",
            ));
        }
        if let Some(bad) = bases.iter().find(|b| reqwest::Url::parse(b).is_err()) {
            return Err(CliError::new(
                format!("`{bad}` is not a URL"),
                "pass --server http://HOST:PORT (repeated, or comma-separated, for replicas) or set SHOAL_SERVER",
            ));
        }
        let mut http = Http::builder();
        if let Some(path) = &trust.ca_file {
            for certificate in shoal_tls::read_ca_file(path).map_err(|e| {
                CliError::new(e, "pass a PEM file with the CA certificate(s) that issued the apiserver's certificate")
            })? {
                http = http.add_root_certificate(certificate);
            }
        }
        let http = http
            .danger_accept_invalid_certs(trust.skip_verify)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            // Under the apiserver's 10 s header-read timeout: a watch that waits never
            // reuses a connection the server is closing.
            .pool_idle_timeout(Duration::from_secs(8))
            .build()
            .map_err(|e| {
                CliError::new(
                    format!("cannot build an HTTP client: {e}"),
                    "this is a bug; please report it",
                )
            })?;
        Ok(Client {
            bases,
            current: AtomicUsize::new(0),
            token,
            http,
        })
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends the request `build` makes for a replica's base URL, starting with the replica
    /// that answered last. Another replica is tried when one cannot be reached, or answers
    /// that it cannot serve (502, 503, 504); a timed-out request only when `idempotent`,
    /// since it may have been carried out.
    fn send(
        &self,
        idempotent: bool,
        build: impl Fn(&str) -> RequestBuilder,
    ) -> Result<Response, CliError> {
        let first = self.current.load(Ordering::Relaxed) % self.bases.len();
        let mut failures = Vec::new();
        // The hint for the first replica whose certificate was refused.
        let mut certificate = None;
        for step in 0..self.bases.len() {
            let index = (first + step) % self.bases.len();
            let base = &self.bases[index];
            match self.authorize(build(base)).send() {
                Ok(response) if unavailable(response.status()) && step + 1 < self.bases.len() => {
                    failures.push(format!("{base}: answered {}", response.status()));
                }
                Ok(response) => {
                    self.current.store(index, Ordering::Relaxed);
                    if response.status().is_success() {
                        return Ok(response);
                    }
                    return Err(api_error(response));
                }
                Err(e) => {
                    if let Some(problem) = shoal_tls::certificate_problem(&e, base) {
                        failures.push(format!("{base}: {}", problem.message));
                        certificate.get_or_insert(problem.hint);
                        continue;
                    }
                    let reason = if e.is_connect() {
                        "connection refused or host unreachable".to_string()
                    } else if e.is_timeout() {
                        "timed out".to_string()
                    } else {
                        e.to_string()
                    };
                    failures.push(format!("{base}: {reason}"));
                    if e.is_timeout() && !idempotent {
                        break;
                    }
                }
            }
        }
        if let Some(hint) = certificate {
            return Err(CliError::new(failures.join("; "), hint));
        }
        Err(CliError::new(
            format!("cannot reach the apiserver at {}", failures.join("; ")),
            "is `apiserver` running? point the CLI at it with --server URL or SHOAL_SERVER",
        ))
    }

    /// GET a JSON resource.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let response = self.send(true, |base| self.http.get(format!("{base}{path}")))?;
        decode(response)
    }

    /// GET that returns `None` on 404.
    pub fn get_optional<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, CliError> {
        match self.get(path) {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.status == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// POST a body and decode the JSON answer.
    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: String,
    ) -> Result<T, CliError> {
        decode(self.send(false, |base| {
            self.http
                .post(format!("{base}{path}"))
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body.clone())
        })?)
    }

    /// DELETE a resource and decode the JSON answer.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        decode(self.send(false, |base| self.http.delete(format!("{base}{path}")))?)
    }
}

fn decode<T: DeserializeOwned>(response: Response) -> Result<T, CliError> {
    let url = response.url().to_string();
    response.json().map_err(|e| {
        CliError::new(
            format!("the answer from {url} is not what this CLI understands: {e}"),
            "check that the CLI and the apiserver are the same version (`shoal --version`)",
        )
    })
}

fn api_error(response: Response) -> CliError {
    let status = response.status();
    let body: Option<ApiErrorBody> = response.json().ok();
    let message = body
        .as_ref()
        .map(|b| b.error.clone())
        .unwrap_or_else(|| format!("the apiserver answered {status}"));
    let details: Vec<String> = body
        .as_ref()
        .map(|b| b.details.iter().map(|d| d.to_string()).collect())
        .unwrap_or_default();
    let hint = match status {
        StatusCode::UNAUTHORIZED => Some("pass a valid token with --token or SHOAL_TOKEN".to_string()),
        StatusCode::FORBIDDEN => Some(
            "this token's role does not allow it: reads need a viewer token, changes an operator token".to_string(),
        ),
        StatusCode::CONFLICT => Some(
            body.as_ref()
                .and_then(|b| b.hint.clone())
                .unwrap_or_else(|| "someone changed the object; fetch it again and retry".into()),
        ),
        _ => body.as_ref().and_then(|b| b.hint.clone()),
    };
    // With details, the first detail repeats the message's content; keep the list only.
    let message = if details.len() > 1 {
        format!(
            "the apiserver rejected the request ({status}): {} problems",
            details.len()
        )
    } else {
        message
    };
    CliError {
        message,
        details,
        hint,
        status: Some(status.as_u16()),
    }
}
