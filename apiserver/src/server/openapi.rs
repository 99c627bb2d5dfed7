//! `/openapi.json`: the API description, with schemas generated from the wire types.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use manifests::wire::*;
use manifests::DesiredState;

/// One documented operation.
pub struct Operation {
    /// HTTP method, lowercase.
    pub method: &'static str,
    /// Path with `{name}` parameters.
    pub path: &'static str,
    /// One line.
    pub summary: &'static str,
    /// Who may call it.
    pub access: &'static str,
    /// Request body schema name, if any.
    pub request: Option<&'static str>,
    /// Response schema name (`text` for plain text).
    pub response: &'static str,
}

/// Every route the server answers; `routes()` registers exactly these (a test checks it).
pub const OPERATIONS: &[Operation] = &[
    Operation {
        method: "get",
        path: "/healthz",
        summary: "Liveness",
        access: "anyone",
        request: None,
        response: "text",
    },
    Operation {
        method: "get",
        path: "/readyz",
        summary: "Readiness: the store answers",
        access: "anyone",
        request: None,
        response: "text",
    },
    Operation {
        method: "get",
        path: "/metrics",
        summary: "Prometheus metrics",
        access: "viewer",
        request: None,
        response: "text",
    },
    Operation {
        method: "get",
        path: "/openapi.json",
        summary: "This document",
        access: "anyone",
        request: None,
        response: "object",
    },
    Operation {
        method: "get",
        path: "/api/v1/nodes",
        summary: "List nodes (?watch=true streams changes as server-sent events)",
        access: "viewer",
        request: None,
        response: "NodeObject[]",
    },
    Operation {
        method: "get",
        path: "/api/v1/nodes/{name}",
        summary: "One node",
        access: "viewer",
        request: None,
        response: "NodeObject",
    },
    Operation {
        method: "post",
        path: "/api/v1/nodes/{name}/cordon",
        summary: "Cordon a node: it takes no new revision and keeps what it has",
        access: "operator",
        request: None,
        response: "NodeObject",
    },
    Operation {
        method: "post",
        path: "/api/v1/nodes/{name}/uncordon",
        summary: "Uncordon a node: it follows its rollouts again",
        access: "operator",
        request: None,
        response: "NodeObject",
    },
    Operation {
        method: "delete",
        path: "/api/v1/nodes/{name}",
        summary: "Forget a node, its token and its assignments (it must join again)",
        access: "operator",
        request: None,
        response: "NodeObject",
    },
    Operation {
        method: "get",
        path: "/api/v1/desiredstates",
        summary: "List DesiredStates (?watch=true)",
        access: "viewer",
        request: None,
        response: "DesiredStateObject[]",
    },
    Operation {
        method: "get",
        path: "/api/v1/desiredstates/{name}",
        summary: "One DesiredState",
        access: "viewer",
        request: None,
        response: "DesiredStateObject",
    },
    Operation {
        method: "delete",
        path: "/api/v1/desiredstates/{name}",
        summary: "Delete a DesiredState (?resourceVersion= for a 409 on concurrent change)",
        access: "operator",
        request: None,
        response: "DesiredStateObject",
    },
    Operation {
        method: "get",
        path: "/api/v1/desiredstates/{name}/revisions",
        summary: "Every revision, oldest first",
        access: "viewer",
        request: None,
        response: "Revision[]",
    },
    Operation {
        method: "get",
        path: "/api/v1/rollouts",
        summary: "List rollouts (?watch=true)",
        access: "viewer",
        request: None,
        response: "RolloutObject[]",
    },
    Operation {
        method: "get",
        path: "/api/v1/rollouts/{name}",
        summary: "One rollout",
        access: "viewer",
        request: None,
        response: "RolloutObject",
    },
    Operation {
        method: "post",
        path: "/api/v1/rollouts/{name}/{action}",
        summary: "pause or resume (returns the RolloutObject); undo (?toRevision=N, default the last good revision) applies that revision's spec as a new revision (returns the ApplyResponse)",
        access: "operator",
        request: None,
        response: "object",
    },
    Operation {
        method: "post",
        path: "/api/v1/hooks/git",
        summary: "Git push webhook: starts a sync at once (GitHub X-Hub-Signature-256 or GitLab X-Gitlab-Token)",
        access: "webhook signature",
        request: None,
        response: "object",
    },
    Operation {
        method: "get",
        path: "/api/v1/gitsync",
        summary: "Git sync status: the commit in force, the newest commit, its problems with file and line",
        access: "viewer",
        request: None,
        response: "object",
    },
    Operation {
        method: "get",
        path: "/api/v1/events",
        summary: "Events, oldest first (?after=SEQ&limit=N&object=node/x, ?watch=true)",
        access: "viewer",
        request: None,
        response: "Event[]",
    },
    Operation {
        method: "get",
        path: "/api/v1/summary",
        summary: "The fleet at a glance",
        access: "viewer",
        request: None,
        response: "Summary",
    },
    Operation {
        method: "post",
        path: "/api/v1/apply",
        summary: "Apply YAML or JSON manifests, all or nothing (?dryRun=true)",
        access: "operator",
        request: Some("DesiredState"),
        response: "ApplyResponse",
    },
    Operation {
        method: "post",
        path: "/api/v1/nodes/register",
        summary: "Register a node with a join token; returns its node token",
        access: "join token",
        request: Some("RegisterRequest"),
        response: "RegisterResponse",
    },
    Operation {
        method: "put",
        path: "/api/v1/nodes/{name}/status",
        summary: "Heartbeat: the node's report",
        access: "that node's token",
        request: Some("NodeReport"),
        response: "text",
    },
    Operation {
        method: "get",
        path: "/api/v1/nodes/{name}/assignment",
        summary:
            "What the node should run (?since=GENERATION&waitSeconds=N long-polls for a change)",
        access: "that node's token, or viewer",
        request: None,
        response: "NodeAssignment",
    },
];

fn schemas() -> Map<String, Value> {
    let mut generator = SchemaSettings::openapi3().into_generator();
    macro_rules! add {
        ($($t:ty),*) => { $( let _ = generator.subschema_for::<$t>(); )* };
    }
    add!(
        DesiredState,
        DesiredStateObject,
        Revision,
        NodeObject,
        RolloutObject,
        Event,
        Summary,
        ApplyResponse,
        ApiErrorBody,
        RegisterRequest,
        RegisterResponse,
        NodeReport,
        NodeAssignment
    );
    generator.take_definitions(true)
}

fn schema_ref(name: &str) -> Value {
    match name {
        "text" => json!({"type": "string"}),
        "object" => json!({"type": "object"}),
        list if list.ends_with("[]") => {
            json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{}", &list[..list.len() - 2])}})
        }
        single => json!({"$ref": format!("#/components/schemas/{single}")}),
    }
}

/// The OpenAPI 3.0 document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in OPERATIONS {
        let content_type = if op.response == "text" {
            "text/plain"
        } else {
            "application/json"
        };
        let mut operation = json!({
            "summary": op.summary,
            "description": format!("Access: {}.", op.access),
            "responses": {
                "200": {"description": "OK", "content": {content_type: {"schema": schema_ref(op.response)}}},
                "default": {"description": "Error", "content": {"application/json": {"schema": schema_ref("ApiErrorBody")}}}
            }
        });
        if let Some(request) = op.request {
            let mut content = json!({"application/json": {"schema": schema_ref(request)}});
            if request == "DesiredState" {
                content["application/yaml"] = json!({"schema": {"type": "string", "description": "one or more YAML documents"}});
            }
            operation["requestBody"] = json!({"required": true, "content": content});
        }
        let parameters: Vec<Value> = op
            .path
            .split('/')
            .filter_map(|part| part.strip_prefix('{').and_then(|p| p.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        if op.access != "anyone" {
            operation["security"] = json!([{"bearer": []}]);
        }
        let entry = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        entry[op.method] = operation;
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "shoal apiserver", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        }
    })
}

/// Ensures a type used in `OPERATIONS` has a schema (used by tests).
pub fn has_schema<T: JsonSchema>() -> bool {
    document()["components"]["schemas"]
        .get(T::schema_name().as_ref())
        .is_some()
}
