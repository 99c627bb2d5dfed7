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

use manifests::wire::{
    DesiredStateObject, Event, NodeObject, NodeReport, RegisterRequest, RevisionSource,
    RolloutObject,
};

use super::auth::{Principal, Role, Tokens};
use super::controller::{ApplyInput, Change, ChangeType, Controller, Kind, Wake};
use super::error::ApiError;
use super::limits::{Ticket, WatchSlot, WatchSlots};
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
    /// Open watches, capped per token and in total.
    pub watches: Arc<WatchSlots>,
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
        let caller = Caller::authenticate(parts, state)?;
        // A connection that showed a valid token is no longer anonymous (see `limits`).
        if let Some(ticket) = parts.extensions.get::<Arc<Ticket>>() {
            ticket.known();
        }
        Ok(caller)
    }
}

impl Caller {
    /// Who sent the request, from its bearer token.
    fn authenticate(parts: &Parts, state: &AppState) -> Result<Caller, ApiError> {
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

/// Seconds a request refused over the connection limits is told to wait.
const RETRY_AFTER_OVER_LIMIT: u64 = 1;

/// On a connection accepted over the limits on anonymous connections (see `limits`): a
/// request with a valid token is served (and the connection counts as known from then on), a
/// health probe is answered, anything else is `503` with `Retry-After`; both of the latter
/// close the connection.
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(ticket) = request.extensions().get::<Arc<Ticket>>().cloned() else {
        return next.run(request).await;
    };
    if !ticket.restricted() {
        return next.run(request).await;
    }
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz");
    let http1 = request.version() <= axum::http::Version::HTTP_11;
    let (parts, body) = request.into_parts();
    let has_token = parts.headers.contains_key(header::AUTHORIZATION);
    let identified = has_token && Caller::authenticate(&parts, &state).is_ok();
    let request = Request::from_parts(parts, body);
    if identified {
        ticket.known();
        return next.run(request).await;
    }
    let mut response = if probe {
        next.run(request).await
    } else {
        ApiError::Unavailable {
            message: "too many connections without a token; this one is refused".into(),
            hint:
                "retry after the Retry-After seconds; requests with a valid token are always served"
                    .into(),
            retry_after_seconds: RETRY_AFTER_OVER_LIMIT,
        }
        .into_response()
    };
    if http1 {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
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
    let open_watches = state.watches.open();
    let text = tokio::task::spawn_blocking(move || metrics.render(&controller, open_watches))
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

/// The first part of a watch: the objects as they are, each as the JSON text of one ADDED
/// event. An `Err` ends the watch (a page could not be read: the client lists again).
type Initial = futures::stream::BoxStream<'static, Result<String, ()>>;

/// Objects a watch lists per read: a client that does not read holds one page of text,
/// never a copy of the whole list.
const WATCH_PAGE: usize = 8;

/// Pages of watches' lists being read at once. Listing decodes and decorates objects; a
/// thousand new watchers must not take every core from requests.
static LISTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

#[derive(Serialize)]
struct WatchEvent<'a, T> {
    #[serde(rename = "type")]
    change: &'a str,
    object: &'a T,
}

/// One watch event's JSON text.
fn watch_event<T: Serialize>(change: &str, object: &T) -> String {
    serde_json::to_string(&WatchEvent { change, object }).expect("json")
}

/// The single object of a watch on one object.
fn initial_one<T: Serialize>(object: &T) -> Initial {
    stream::iter(vec![Ok(watch_event("ADDED", object))]).boxed()
}

/// A list read a page at a time, as the client takes it: `page(controller, after, limit)`
/// gives up to `limit` objects after the one keyed `after`, and `key` names an object.
fn paged<T, P>(controller: Arc<Controller>, page: P, key: fn(&T) -> String) -> Initial
where
    T: Serialize + Send + 'static,
    P: Fn(&Controller, Option<&str>, usize) -> Result<Vec<T>, ApiError> + Send + Sync + 'static,
{
    let page = Arc::new(page);
    stream::unfold(Some(None::<String>), move |cursor| {
        let controller = controller.clone();
        let page = page.clone();
        async move {
            let after = cursor?;
            let _turn = LISTING.acquire().await.ok()?;
            // A page decodes and decorates objects: the blocking pool, not a worker.
            let read = tokio::task::spawn_blocking(move || {
                let items = page(&controller, after.as_deref(), WATCH_PAGE)?;
                let last = items.last().map(key);
                let texts: Vec<String> = items.iter().map(|i| watch_event("ADDED", i)).collect();
                Ok::<_, ApiError>((texts, last))
            })
            .await;
            match read {
                Ok(Ok((texts, last))) => {
                    let next = (texts.len() == WATCH_PAGE).then_some(last);
                    let items: Vec<Result<String, ()>> = texts.into_iter().map(Ok).collect();
                    Some((stream::iter(items), next))
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "a watch could not list; it ends");
                    Some((stream::iter(vec![Err(())]), None))
                }
                Err(_) => Some((stream::iter(vec![Err(())]), None)),
            }
        }
    })
    .flatten()
    .boxed()
}

/// Streams `initial` as ADDED, then every change of `kind` (named `name`, if given), for as
/// long as `slot` is held (it is dropped with the stream).
fn watch_stream(
    kind: Kind,
    name: Option<String>,
    receiver: tokio::sync::broadcast::Receiver<Change>,
    initial: Initial,
    slot: Option<WatchSlot>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let first = initial.map(|item| item.map(|data| SseEvent::default().event("ADDED").data(data)));
    let changes = BroadcastStream::new(receiver).filter_map(move |item| {
        std::future::ready(match item {
            // A watcher that fell behind, or whose replica missed changes of the store, must
            // list again rather than miss changes silently.
            Err(_) => Some(Err(())),
            Ok(change) if change.change == ChangeType::Resync => Some(Err(())),
            Ok(change)
                if change.kind == kind && name.as_ref().is_none_or(|n| *n == change.name) =>
            {
                let label = serde_json::to_value(change.change).expect("json");
                let label = label.as_str().unwrap_or("MODIFIED").to_string();
                let data = watch_event(&label, &*change.object);
                Some(Ok(SseEvent::default().event(label).data(data)))
            }
            Ok(_) => None,
        })
    });
    let events = first
        .chain(changes)
        .take_while(|item| std::future::ready(item.is_ok()))
        .map(move |item| {
            let _held = &slot;
            Ok(item.expect("errors end the stream above"))
        });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Answers a list: the objects as JSON, or with `?watch=true` a stream of them (read a page
/// at a time) and then their changes. Subscribing happens before reading, so no change
/// between the two is missed.
fn list_or_watch<T, P>(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    watch: bool,
    page: P,
    key: fn(&T) -> String,
) -> Result<Response, ApiError>
where
    T: Serialize + Send + 'static,
    P: Fn(&Controller, Option<&str>, usize) -> Result<Vec<T>, ApiError> + Send + Sync + 'static,
{
    let token = caller.viewer()?;
    if watch {
        let slot = state.watches.acquire(token)?;
        let receiver = state.controller.subscribe();
        let initial = paged(state.controller.clone(), page, key);
        return Ok(watch_stream(kind, None, receiver, initial, Some(slot)).into_response());
    }
    Ok(Json(page(&state.controller, None, usize::MAX)?).into_response())
}

/// Answers a read of one object: it as JSON, or with `?watch=true` a stream of it and its
/// changes.
fn get_or_watch<T: Serialize>(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    name: String,
    watch: bool,
    read: impl FnOnce(&Controller) -> Result<T, ApiError>,
) -> Result<Response, ApiError> {
    let token = caller.viewer()?;
    if watch {
        let slot = state.watches.acquire(token)?;
        let receiver = state.controller.subscribe();
        let initial = initial_one(&read(&state.controller)?);
        return Ok(watch_stream(kind, Some(name), receiver, initial, Some(slot)).into_response());
    }
    Ok(Json(read(&state.controller)?).into_response())
}

async fn list_nodes(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(
        &state,
        &caller,
        Kind::Node,
        q.watch,
        |c, after, limit| c.nodes_after(after, limit),
        |n: &NodeObject| n.metadata.name.clone(),
    )
}

async fn get_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    get_or_watch(&state, &caller, Kind::Node, name.clone(), q.watch, |c| {
        c.get_node(&name)
    })
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

/// Waking a long poll costs about this much; a fleet-wide wake is spread over the waiters.
const WAKE_COST: Duration = Duration::from_micros(70);

/// The most a woken long poll is held back.
const MAX_WAKE_SPREAD: Duration = Duration::from_millis(700);

/// How long the long poll of `node` waits before answering a wake, when `waiting` long
/// polls woke with it: a stable share of `waiting × WAKE_COST` (at most 250 ms), so a fleet
/// is answered evenly over that time, not all in one burst.
fn wake_spread(node: &str, waiting: usize) -> Duration {
    use std::hash::{Hash, Hasher};
    let spread = (WAKE_COST * waiting.min(1 << 20) as u32).min(MAX_WAKE_SPREAD);
    if spread < Duration::from_millis(2) {
        return Duration::ZERO;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut hasher);
    let share = (hasher.finish() % 1024) as u32;
    spread * share / 1024
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
    let mut changes = state.controller.assignment_changes(&name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait_seconds).min(MAX_WAIT);
    let json = |body: Vec<u8>| {
        (
            [(header::CONTENT_TYPE, "application/json")],
            axum::body::Bytes::from(body),
        )
            .into_response()
    };
    loop {
        let (generation, body) = state.controller.assignment_body(&name)?;
        if q.since != Some(generation) || q.wait_seconds == 0 {
            return Ok(json(body));
        }
        tokio::select! {
            woke = changes.changed() => match woke {
                Wake::Closed => return Ok(json(body)),
                // A change for the whole fleet wakes every waiting node at once; answering
                // them spread over a moment keeps heartbeats and probes answered meanwhile.
                Wake::Changed { together } => {
                    tokio::time::sleep(wake_spread(&name, together)).await;
                }
            },
            _ = tokio::time::sleep_until(deadline) => return Ok(json(body)),
        }
    }
}

async fn list_desired_states(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(
        &state,
        &caller,
        Kind::DesiredState,
        q.watch,
        |c, after, limit| c.desired_states_after(after, limit),
        |d: &DesiredStateObject| d.metadata.name.clone(),
    )
}

async fn get_desired_state(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    get_or_watch(
        &state,
        &caller,
        Kind::DesiredState,
        name.clone(),
        q.watch,
        |c| c.get_desired_state(&name),
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
    list_or_watch(
        &state,
        &caller,
        Kind::Rollout,
        q.watch,
        |c, after, limit| c.rollouts_after(after, limit),
        |r: &RolloutObject| r.metadata.name.clone(),
    )
}

async fn get_rollout(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    get_or_watch(&state, &caller, Kind::Rollout, name.clone(), q.watch, |c| {
        c.get_rollout(&name)
    })
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
    let token = caller.viewer()?;
    let limit = q.limit.unwrap_or(500).min(10_000);
    if q.watch {
        let slot = state.watches.acquire(token)?;
        let receiver = state.controller.subscribe();
        let (first, object) = (q.after, q.object.clone());
        let page = move |c: &Controller, after: Option<&str>, n: usize| {
            // Keys are sequence numbers this stream wrote itself.
            let after = after.and_then(|k| k.parse().ok()).unwrap_or(first);
            c.events(after, n, object.as_deref())
        };
        let initial = paged(state.controller.clone(), page, |e: &Event| {
            e.seq.to_string()
        })
        .take(limit)
        .boxed();
        return Ok(watch_stream(Kind::Event, None, receiver, initial, Some(slot)).into_response());
    }
    let events = state
        .controller
        .events(q.after, limit, q.object.as_deref())?;
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
        let listed = initial_one(&serde_json::json!({ "name": "listed" }));
        let response = watch_stream(Kind::Node, None, receiver, listed, None).into_response();
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

    #[test]
    fn a_fleet_wide_wake_is_spread_evenly_and_briefly() {
        assert_eq!(
            wake_spread("n1", 10),
            Duration::ZERO,
            "a few waiters answer at once"
        );
        let spreads: Vec<Duration> = (0..10_000)
            .map(|i| wake_spread(&format!("node-{i}"), 10_000))
            .collect();
        assert!(spreads.iter().all(|d| *d <= MAX_WAKE_SPREAD));
        assert_eq!(wake_spread("node-7", 10_000), spreads[7], "stable per node");
        // Evenly: each tenth of the spread gets about a tenth of the nodes.
        for tenth in 0..10u32 {
            let low = MAX_WAKE_SPREAD * tenth / 10;
            let high = MAX_WAKE_SPREAD * (tenth + 1) / 10;
            let n = spreads.iter().filter(|d| **d >= low && **d < high).count();
            assert!((700..1300).contains(&n), "{n} nodes in tenth {tenth}");
        }
        assert!(wake_spread("n1", 1 << 30) <= MAX_WAKE_SPREAD);
    }

    #[tokio::test]
    async fn a_watch_that_falls_behind_ends_instead_of_skipping_changes() {
        let (sender, receiver) = tokio::sync::broadcast::channel(2);
        let response =
            watch_stream(Kind::Node, None, receiver, stream::empty().boxed(), None).into_response();
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
