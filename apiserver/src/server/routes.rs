//! HTTP routes: authentication, request parsing, and the mapping onto the controller.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::BroadcastStream;

use manifests::wire::{NodeReport, RegisterRequest, RevisionSource};

use super::auth::{Principal, Role, Tokens};
use super::controller::{ApplyInput, Change, ChangeType, Controller, Kind};
use super::error::ApiError;
use super::metrics::{Metrics, RequestLabels};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Object logic.
    pub controller: Arc<Controller>,
    /// Configured tokens.
    pub tokens: Arc<Tokens>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Largest accepted request body, bytes.
    pub max_body: usize,
    /// Git sync, when configured.
    pub git: Option<Arc<crate::gitsync::GitSync>>,
    /// Wakes git sync at once (the webhook).
    pub git_wake: Arc<tokio::sync::Notify>,
}

/// Every route of the API (see `openapi::OPERATIONS`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/nodes/register", post(register))
        .route("/api/v1/nodes/{name}", get(get_node).delete(delete_node))
        .route("/api/v1/nodes/{name}/cordon", post(cordon_node))
        .route("/api/v1/nodes/{name}/uncordon", post(uncordon_node))
        .route("/api/v1/nodes/{name}/status", put(put_status))
        .route("/api/v1/nodes/{name}/assignment", get(get_assignment))
        .route("/api/v1/desiredstates", get(list_desired_states))
        .route(
            "/api/v1/desiredstates/{name}",
            get(get_desired_state).delete(delete_desired_state),
        )
        .route("/api/v1/desiredstates/{name}/revisions", get(revisions))
        .route("/api/v1/rollouts", get(list_rollouts))
        .route("/api/v1/rollouts/{name}", get(get_rollout))
        .route("/api/v1/rollouts/{name}/{action}", post(rollout_action))
        .route("/api/v1/events", get(events))
        .route("/api/v1/summary", get(summary))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/hooks/git", post(git_hook))
        .route("/api/v1/gitsync", get(git_status))
        .fallback(not_found)
}

async fn not_found() -> ApiError {
    ApiError::NotFound {
        kind: "Route",
        name: "this path".into(),
    }
}

/// Records request latency by route pattern; watches and long polls are left out
/// since their duration is the client's choice.
pub async fn track_latency(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let query = request.uri().query().unwrap_or("");
    let long = query.contains("watch=true") || query.contains("waitSeconds");
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(request).await;
    if !long {
        state.metrics.observe_request(
            RequestLabels {
                method,
                route,
                status: response.status().as_u16(),
            },
            started.elapsed().as_secs_f64(),
        );
    }
    response
}

/// The authenticated caller.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        let bearer = match header {
            None => None,
            Some(value) => match value.strip_prefix("Bearer ") {
                Some(token) => Some(token.trim()),
                None => {
                    return Err(ApiError::Unauthorized(
                        "the Authorization header is not `Bearer <token>`".into(),
                    ))
                }
            },
        };
        let anonymous = Principal::User {
            name: "anonymous".into(),
            role: Role::Operator,
        };
        let Some(bearer) = bearer else {
            return if state.tokens.is_open() {
                Ok(Caller(anonymous))
            } else {
                Err(ApiError::Unauthorized(
                    "no token: this apiserver requires one".into(),
                ))
            };
        };
        if let Some(principal) = state.tokens.authenticate(bearer) {
            return Ok(Caller(principal));
        }
        // Node tokens are `<node>:<secret>`; their hashes live in the store.
        if let Some((node, _)) = bearer.split_once(':') {
            if state.controller.node_token_matches(node, bearer)? {
                return Ok(Caller(Principal::Node {
                    name: node.to_string(),
                }));
            }
        }
        if state.tokens.is_open() {
            Ok(Caller(anonymous))
        } else {
            Err(ApiError::Unauthorized("the token is not valid".into()))
        }
    }
}

impl Caller {
    fn require(&self, needed: Role) -> Result<&str, ApiError> {
        match &self.0 {
            Principal::User { name, role } if *role >= needed => Ok(name),
            Principal::User { name, .. } => Err(ApiError::Forbidden(format!(
                "token `{name}` is a viewer token; this needs an operator token"
            ))),
            Principal::Join { name } => Err(ApiError::Forbidden(format!(
                "token `{name}` is a join token: it can only register nodes"
            ))),
            Principal::Node { name } => Err(ApiError::Forbidden(format!(
                "node `{name}`'s token can only read its own assignment and write its own status"
            ))),
        }
    }

    fn viewer(&self) -> Result<&str, ApiError> {
        self.require(Role::Viewer)
    }

    fn operator(&self) -> Result<&str, ApiError> {
        self.require(Role::Operator)
    }

    fn the_node(&self, node: &str) -> Result<(), ApiError> {
        match &self.0 {
            Principal::Node { name } if name == node => Ok(()),
            Principal::Node { name } => Err(ApiError::Forbidden(format!(
                "node `{name}`'s token cannot act for node `{node}`"
            ))),
            _ => Err(ApiError::Forbidden(format!(
                "only node `{node}`'s own token can do this"
            ))),
        }
    }
}

/// Reads the body, turning an over-limit body into a JSON 413.
fn body(body: Result<Bytes, BytesRejection>, state: &AppState) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: state.max_body,
            }
        } else {
            ApiError::bad_request(
                format!("cannot read the request body: {rejection}"),
                "send the body again",
            )
        }
    })
}

fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        ApiError::BadRequest {
            message: format!("invalid {what}: {}", e.inner()),
            field: (field != ".").then_some(field),
            hint: Some(format!("send a JSON {what} as described in /openapi.json")),
            details: vec![],
        }
    })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.controller.readiness()?;
    Ok("ok\n")
}

async fn metrics(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.viewer()?;
    let controller = state.controller.clone();
    let metrics = state.metrics.clone();
    let text = tokio::task::spawn_blocking(move || metrics.render(&controller))
        .await
        .expect("metrics rendering does not panic")?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn openapi() -> Json<serde_json::Value> {
    Json(super::openapi::document())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    #[serde(default)]
    watch: bool,
}

/// Streams `initial` as ADDED, then every change of `kind` (named `name`, if given).
fn watch_stream(
    kind: Kind,
    name: Option<String>,
    receiver: tokio::sync::broadcast::Receiver<Change>,
    initial: Vec<serde_json::Value>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    #[derive(Serialize)]
    struct WatchEvent<'a> {
        #[serde(rename = "type")]
        change: &'a str,
        object: &'a serde_json::Value,
    }
    let first = stream::iter(initial.into_iter().map(|object| {
        let data = serde_json::to_string(&WatchEvent {
            change: "ADDED",
            object: &object,
        })
        .expect("json");
        Ok(SseEvent::default().event("ADDED").data(data))
    }));
    let changes = BroadcastStream::new(receiver)
        .take_while(|item| {
            // A watcher that fell behind, or whose replica missed changes of the store, must
            // list again rather than miss changes silently.
            std::future::ready(matches!(item, Ok(change) if change.change != ChangeType::Resync))
        })
        .filter_map(move |item| {
            let keep = match &item {
                Ok(change) => {
                    change.kind == kind && name.as_ref().is_none_or(|n| *n == change.name)
                }
                Err(_) => false,
            };
            std::future::ready(if keep {
                let change = item.expect("checked");
                let label = serde_json::to_value(change.change).expect("json");
                let label = label.as_str().unwrap_or("MODIFIED").to_string();
                let data = serde_json::to_string(&WatchEvent {
                    change: &label,
                    object: &change.object,
                })
                .expect("json");
                Some(Ok(SseEvent::default().event(label).data(data)))
            } else {
                None
            })
        });
    Sse::new(first.chain(changes)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn to_values<T: Serialize>(items: &[T]) -> Vec<serde_json::Value> {
    items
        .iter()
        .map(|i| serde_json::to_value(i).expect("json"))
        .collect()
}

/// Answers a read: the object(s) as JSON, or with `?watch=true` a stream of them and their changes.
/// Subscribing happens before reading, so no change between the two is missed.
fn read_or_watch<T: Serialize>(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    name: Option<String>,
    watch: bool,
    read: impl FnOnce(&Controller) -> Result<T, ApiError>,
    items: impl FnOnce(&T) -> Vec<serde_json::Value>,
) -> Result<Response, ApiError> {
    caller.viewer()?;
    let receiver = state.controller.subscribe();
    let value = read(&state.controller)?;
    if watch {
        return Ok(watch_stream(kind, name, receiver, items(&value)).into_response());
    }
    Ok(Json(value).into_response())
}

/// [`read_or_watch`] for rollouts, whose reads run on the blocking pool: a rollout read waits
/// while the rollout controller makes a decision durable (commit, sled flush, cache refresh), and
/// that wait must not hold an async worker.
async fn read_or_watch_rollouts<T: Serialize + Send + 'static>(
    state: &AppState,
    caller: &Caller,
    name: Option<String>,
    watch: bool,
    read: impl FnOnce(&Controller) -> Result<T, ApiError> + Send + 'static,
    items: impl FnOnce(&T) -> Vec<serde_json::Value>,
) -> Result<Response, ApiError> {
    caller.viewer()?;
    let receiver = state.controller.subscribe();
    let controller = state.controller.clone();
    let value = tokio::task::spawn_blocking(move || read(&controller))
        .await
        .expect("rollout reads do not panic")?;
    if watch {
        return Ok(watch_stream(Kind::Rollout, name, receiver, items(&value)).into_response());
    }
    Ok(Json(value).into_response())
}

fn one<T: Serialize>(item: &T) -> Vec<serde_json::Value> {
    to_values(std::slice::from_ref(item))
}

// `&Vec` because it is called as `FnOnce(&T)` with `T = Vec<_>`.
#[allow(clippy::ptr_arg)]
fn many<T: Serialize>(items: &Vec<T>) -> Vec<serde_json::Value> {
    to_values(items)
}

async fn list_nodes(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    read_or_watch(
        &state,
        &caller,
        Kind::Node,
        None,
        q.watch,
        |c| c.list_nodes(),
        many,
    )
}

async fn get_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    read_or_watch(
        &state,
        &caller,
        Kind::Node,
        Some(name.clone()),
        q.watch,
        |c| c.get_node(&name),
        one,
    )
}

async fn delete_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<manifests::wire::NodeObject>, ApiError> {
    let actor = caller.operator()?.to_string();
    state.controller.delete_node(&name, &actor).await.map(Json)
}

async fn cordon_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<manifests::wire::NodeObject>, ApiError> {
    set_cordon(state, caller, name, true).await
}

async fn uncordon_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<manifests::wire::NodeObject>, ApiError> {
    set_cordon(state, caller, name, false).await
}

async fn set_cordon(
    state: AppState,
    caller: Caller,
    name: String,
    cordoned: bool,
) -> Result<Json<manifests::wire::NodeObject>, ApiError> {
    let actor = caller.operator()?.to_string();
    state
        .controller
        .set_cordon(&name, cordoned, &actor)
        .await
        .map(Json)
}

async fn register(
    State(state): State<AppState>,
    caller: Caller,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let via = match &caller.0 {
        Principal::Join { name } => name.clone(),
        Principal::User { name, .. } if state.tokens.is_open() => name.clone(),
        _ => {
            return Err(ApiError::Forbidden(
                "registering a node needs a join token".into(),
            ))
        }
    };
    let bytes = body(raw, &state)?;
    let request: RegisterRequest = json_body(&bytes, "registration")?;
    if request.name == "register" {
        return Err(ApiError::invalid_field(
            "name",
            "`register` is reserved",
            "choose another node name",
        ));
    }
    let response = state.controller.register(request, &via).await?;
    Ok((StatusCode::CREATED, Json(response)).into_response())
}

async fn put_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    caller.the_node(&name)?;
    let bytes = body(raw, &state)?;
    let report: NodeReport = json_body(&bytes, "node report")?;
    state.controller.report(&name, report).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssignmentQuery {
    since: Option<u64>,
    #[serde(default)]
    wait_seconds: u64,
}

/// Longest long poll; clients simply ask again.
const MAX_WAIT: Duration = Duration::from_secs(300);

async fn get_assignment(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<AssignmentQuery>,
) -> Result<Response, ApiError> {
    if caller.the_node(&name).is_err() {
        caller.viewer()?;
    }
    // Subscribe before reading, so a change between the read and the wait is not missed.
    let mut epoch = state.controller.assignment_epoch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait_seconds).min(MAX_WAIT);
    loop {
        let assignment = state.controller.assignment(&name)?;
        if q.since != Some(assignment.generation) || q.wait_seconds == 0 {
            return Ok(Json(assignment).into_response());
        }
        tokio::select! {
            changed = epoch.changed() => {
                if changed.is_err() {
                    return Ok(Json(assignment).into_response());
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Ok(Json(assignment).into_response()),
        }
    }
}

async fn list_desired_states(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    read_or_watch(
        &state,
        &caller,
        Kind::DesiredState,
        None,
        q.watch,
        |c| c.list_desired_states(),
        many,
    )
}

async fn get_desired_state(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    read_or_watch(
        &state,
        &caller,
        Kind::DesiredState,
        Some(name.clone()),
        q.watch,
        |c| c.get_desired_state(&name),
        one,
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteQuery {
    resource_version: Option<String>,
}

async fn delete_desired_state(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Json<manifests::wire::DesiredStateObject>, ApiError> {
    caller.operator()?;
    Ok(Json(
        state
            .controller
            .delete_desired_state(&name, q.resource_version.as_deref())
            .await?,
    ))
}

async fn revisions(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Vec<manifests::wire::Revision>>, ApiError> {
    caller.viewer()?;
    Ok(Json(state.controller.revisions(&name)?))
}

async fn list_rollouts(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    read_or_watch_rollouts(&state, &caller, None, q.watch, |c| c.list_rollouts(), many).await
}

async fn get_rollout(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let read_name = name.clone();
    read_or_watch_rollouts(
        &state,
        &caller,
        Some(name),
        q.watch,
        move |c| c.get_rollout(&read_name),
        one,
    )
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    object: Option<String>,
    #[serde(default)]
    watch: bool,
}

async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<EventQuery>,
) -> Result<Response, ApiError> {
    caller.viewer()?;
    let receiver = state.controller.subscribe();
    let limit = q.limit.unwrap_or(500).min(10_000);
    let events = state
        .controller
        .events(q.after, limit, q.object.as_deref())?;
    if q.watch {
        return Ok(watch_stream(Kind::Event, None, receiver, to_values(&events)).into_response());
    }
    Ok(Json(events).into_response())
}

async fn summary(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<manifests::wire::Summary>, ApiError> {
    caller.viewer()?;
    // The summary counts rollouts, whose reads wait out a rollout decision's flush.
    let controller = state.controller.clone();
    let summary = tokio::task::spawn_blocking(move || controller.summary())
        .await
        .expect("the summary does not panic")?;
    Ok(Json(summary))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ApplyQuery>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<manifests::wire::ApplyResponse>, ApiError> {
    let actor = caller.operator()?.to_string();
    let bytes = body(raw, &state)?;
    // Parsing is CPU work bounded by the parser's budget, not I/O: on the blocking pool, so
    // a large or hostile body never stalls the async workers that answer everyone else.
    let inputs = tokio::task::spawn_blocking(move || {
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            ApiError::bad_request("the body is not UTF-8 text", "send YAML or JSON manifests")
        })?;
        let loaded = manifests::parse_str("<request>", text);
        if !loaded.is_ok() {
            return Err(ApiError::from_diagnostics(loaded.diagnostics));
        }
        let inputs = loaded
            .objects
            .into_iter()
            .map(|parsed| ApplyInput {
                object: parsed.object,
                source: RevisionSource {
                    kind: "apply".into(),
                    actor: Some(actor.clone()),
                    ..RevisionSource::default()
                },
            })
            .collect::<Vec<_>>();
        Ok::<_, ApiError>(inputs)
    })
    .await
    .expect("parsing does not panic")?;
    let response = state.controller.apply(inputs, q.dry_run).await?;
    if !response.dry_run {
        for result in &response.results {
            state.metrics.count_apply(match result.action {
                manifests::wire::ApplyAction::Created => "created",
                manifests::wire::ApplyAction::Configured => "configured",
                manifests::wire::ApplyAction::Unchanged => "unchanged",
                manifests::wire::ApplyAction::Pruned => "pruned",
            });
        }
    }
    Ok(Json(response))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UndoQuery {
    to_revision: Option<u64>,
}

async fn rollout_action(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, action)): Path<(String, String)>,
    Query(q): Query<UndoQuery>,
) -> Result<Response, ApiError> {
    let actor = caller.operator()?.to_string();
    let controller = &state.controller;
    match action.as_str() {
        "pause" => Ok(Json(controller.set_rollout_paused(&name, true).await?).into_response()),
        "resume" => Ok(Json(controller.set_rollout_paused(&name, false).await?).into_response()),
        "undo" => Ok(Json(controller.undo(&name, q.to_revision, &actor).await?).into_response()),
        other => Err(ApiError::NotFound {
            kind: "Rollout action",
            name: other.to_string(),
        }),
    }
}

fn git_sync(state: &AppState) -> Result<&Arc<crate::gitsync::GitSync>, ApiError> {
    state.git.as_ref().ok_or_else(|| ApiError::NotFound {
        kind: "Git sync",
        name: "(not configured: start the apiserver with --git-repo)".into(),
    })
}

/// A push webhook: verified against the configured secret, then a sync starts at once.
/// The signature is the authentication, so no bearer token is needed.
async fn git_hook(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let git = git_sync(&state)?;
    let bytes = body(raw, &state)?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if !git.verify_webhook(
        &bytes,
        header("x-hub-signature-256"),
        header("x-gitlab-token"),
    ) {
        return Err(ApiError::Unauthorized(
            "the webhook's X-Hub-Signature-256 or X-Gitlab-Token does not match the configured secret".into(),
        ));
    }
    state.git_wake.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"sync": "started"})),
    )
        .into_response())
}

async fn git_status(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.viewer()?;
    Ok(Json(git_sync(&state)?.status()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: Kind, change: ChangeType, name: &str) -> Change {
        Change {
            kind,
            change,
            name: name.into(),
            object: Arc::new(serde_json::json!({ "name": name })),
        }
    }

    /// The body of a watch until it ends, or `None` if it is still open after 10 s.
    async fn body_until_end(response: Response) -> Option<String> {
        let body = response.into_body();
        let bytes =
            tokio::time::timeout(Duration::from_secs(10), axum::body::to_bytes(body, 1 << 20))
                .await
                .ok()?
                .expect("body");
        Some(String::from_utf8(bytes.to_vec()).expect("utf-8"))
    }

    #[tokio::test]
    async fn a_watch_streams_its_kind_and_ends_when_its_replica_resyncs() {
        let (sender, receiver) = tokio::sync::broadcast::channel(16);
        let response = watch_stream(
            Kind::Node,
            None,
            receiver,
            vec![serde_json::json!({ "name": "listed" })],
        )
        .into_response();
        sender
            .send(change(Kind::Node, ChangeType::Modified, "n1"))
            .unwrap();
        sender
            .send(change(Kind::Rollout, ChangeType::Modified, "r1"))
            .unwrap();
        sender
            .send(change(Kind::Node, ChangeType::Resync, ""))
            .unwrap();
        // Sent after the resync: never streamed, the client lists again instead.
        sender
            .send(change(Kind::Node, ChangeType::Added, "late"))
            .unwrap();
        let body = body_until_end(response).await.expect("the watch ended");
        assert!(
            body.contains("event: ADDED") && body.contains("listed"),
            "{body}"
        );
        assert!(
            body.contains("event: MODIFIED") && body.contains("n1"),
            "{body}"
        );
        assert!(!body.contains("r1"), "another kind leaked: {body}");
        assert!(!body.contains("late") && !body.contains("RESYNC"), "{body}");
    }

    #[tokio::test]
    async fn a_watch_that_falls_behind_ends_instead_of_skipping_changes() {
        let (sender, receiver) = tokio::sync::broadcast::channel(2);
        let response = watch_stream(Kind::Node, None, receiver, vec![]).into_response();
        for i in 0..5 {
            sender
                .send(change(Kind::Node, ChangeType::Modified, &format!("n{i}")))
                .unwrap();
        }
        let body = body_until_end(response).await.expect("the watch ended");
        assert!(
            !body.contains("n4"),
            "changes after the gap were streamed: {body}"
        );
    }
}
