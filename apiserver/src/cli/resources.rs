//! `shoal get` and `shoal describe`: the status API as tables and reports.

use manifests::wire::*;

use super::client::{CliError, Client};
use super::table::{age, render};
use super::{print_structured, Output, EXIT_OK};

/// The object kinds `get` and `describe` know, by every name a person might type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Nodes,
    DesiredStates,
    Rollouts,
    Events,
}

fn resource(kind: &str) -> Result<Resource, CliError> {
    match kind.to_ascii_lowercase().as_str() {
        "node" | "nodes" | "no" => Ok(Resource::Nodes),
        "desiredstate" | "desiredstates" | "ds" => Ok(Resource::DesiredStates),
        "rollout" | "rollouts" | "ro" => Ok(Resource::Rollouts),
        "event" | "events" | "ev" => Ok(Resource::Events),
        other => Err(CliError::new(
            format!("unknown resource type `{other}`"),
            "use one of: nodes, desiredstates, rollouts, events",
        )),
    }
}

pub(super) fn condition<'a>(node: &'a NodeObject, kind: &str) -> Option<&'a Condition> {
    node.status.conditions.iter().find(|c| c.kind == kind)
}

fn condition_text(node: &NodeObject, kind: &str) -> String {
    match condition(node, kind).map(|c| c.status) {
        Some(ConditionStatus::True) => "True".into(),
        Some(ConditionStatus::False) => "False".into(),
        _ => "Unknown".into(),
    }
}

fn versions(node: &NodeObject) -> String {
    let list: Vec<String> = node
        .status
        .report
        .components
        .iter()
        .map(|c| match &c.version {
            Some(v) => format!("{}={v}", c.name),
            None => format!("{}=-", c.name),
        })
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(",")
    }
}

fn node_rows(nodes: &[NodeObject]) -> Vec<Vec<String>> {
    nodes
        .iter()
        .map(|n| {
            let mut ready = condition_text(n, "Ready");
            if condition(n, "Conflict").is_some_and(|c| c.status == ConditionStatus::True) {
                ready.push_str(",Conflict");
            }
            if n.status.cordoned.is_some() {
                // As kubectl shows a cordoned node.
                ready.push_str(",SchedulingDisabled");
            }
            vec![
                n.metadata.name.clone(),
                ready,
                condition_text(n, "Healthy"),
                condition_text(n, "Converged"),
                n.metadata
                    .labels
                    .get("site")
                    .cloned()
                    .unwrap_or_else(|| "-".into()),
                age(n.status.last_heartbeat),
                versions(n),
            ]
        })
        .collect()
}

fn desired_state_rows(states: &[DesiredStateObject]) -> Vec<Vec<String>> {
    states
        .iter()
        .map(|s| {
            let source = match (&s.status.source.commit, &s.status.source.actor) {
                (Some(commit), _) => format!("git {}", &commit[..commit.len().min(12)]),
                (None, Some(actor)) => format!("{} by {actor}", s.status.source.kind),
                (None, None) => s.status.source.kind.clone(),
            };
            vec![
                s.metadata.name.clone(),
                s.status.revision.to_string(),
                s.status.last_good_revision.to_string(),
                s.status.selected_nodes.to_string(),
                s.spec.components.len().to_string(),
                source,
                age(s.metadata.creation_timestamp),
            ]
        })
        .collect()
}

fn rollout_rows(rollouts: &[RolloutObject]) -> Vec<Vec<String>> {
    rollouts
        .iter()
        .map(|r| {
            let waves = r.spec.plan.len();
            let wave = if r.status.current_wave >= waves {
                format!("{waves}/{waves}")
            } else {
                format!("{}/{waves}", r.status.current_wave + 1)
            };
            vec![
                r.metadata.name.clone(),
                format!("{} → {}", r.spec.from_revision, r.spec.revision),
                r.status.phase.as_str().to_string(),
                wave,
                r.status.failed_nodes.len().to_string(),
                age(Some(r.status.started)),
            ]
        })
        .collect()
}

fn event_rows(events: &[Event]) -> Vec<Vec<String>> {
    events
        .iter()
        .map(|e| {
            vec![
                age(Some(e.time)),
                format!("{:?}", e.kind),
                e.reason.clone(),
                e.object.clone(),
                e.message.replace('\n', " ⏎ "),
            ]
        })
        .collect()
}

const NODE_HEADER: &[&str] = &[
    "NAME",
    "READY",
    "HEALTHY",
    "CONVERGED",
    "SITE",
    "HEARTBEAT",
    "VERSIONS",
];
const DS_HEADER: &[&str] = &[
    "NAME",
    "REVISION",
    "GOOD",
    "NODES",
    "COMPONENTS",
    "SOURCE",
    "AGE",
];
const ROLLOUT_HEADER: &[&str] = &["NAME", "REVISIONS", "PHASE", "WAVE", "FAILED", "AGE"];
const EVENT_HEADER: &[&str] = &["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"];

/// `shoal get KIND [NAME]`.
pub fn get(
    client: &Client,
    kind: &str,
    name: Option<&str>,
    output: Output,
) -> Result<u8, CliError> {
    let resource = resource(kind)?;
    macro_rules! show {
        ($path:expr, $t:ty, $header:expr, $rows:expr) => {{
            match name {
                Some(name) => {
                    let one: $t = client.get(&format!("{}/{name}", $path))?;
                    match output {
                        Output::Table => {
                            print!("{}", render($header, &$rows(std::slice::from_ref(&one))))
                        }
                        _ => print_structured(&one, output),
                    }
                }
                None => {
                    let all: Vec<$t> = client.get($path)?;
                    match output {
                        Output::Table if all.is_empty() => {
                            eprintln!("no {} found", $path.rsplit('/').next().unwrap_or("objects"))
                        }
                        Output::Table => print!("{}", render($header, &$rows(&all))),
                        _ => print_structured(&all, output),
                    }
                }
            }
        }};
    }
    match resource {
        Resource::Nodes => show!("/api/v1/nodes", NodeObject, NODE_HEADER, node_rows),
        Resource::DesiredStates => show!(
            "/api/v1/desiredstates",
            DesiredStateObject,
            DS_HEADER,
            desired_state_rows
        ),
        Resource::Rollouts => show!(
            "/api/v1/rollouts",
            RolloutObject,
            ROLLOUT_HEADER,
            rollout_rows
        ),
        Resource::Events => {
            let path = match name {
                Some(object) => format!("/api/v1/events?object={object}&limit=10000"),
                None => "/api/v1/events?limit=10000".to_string(),
            };
            let events: Vec<Event> = client.get(&path)?;
            match output {
                Output::Table if events.is_empty() => eprintln!("no events found"),
                Output::Table => print!("{}", render(EVENT_HEADER, &event_rows(&events))),
                _ => print_structured(&events, output),
            }
        }
    }
    Ok(EXIT_OK)
}

fn recent_events(client: &Client, object: &str) -> Result<String, CliError> {
    let events: Vec<Event> = client.get(&format!("/api/v1/events?object={object}&limit=10000"))?;
    let last: Vec<Event> = events.into_iter().rev().take(15).rev().collect();
    if last.is_empty() {
        return Ok("Events: <none>\n".into());
    }
    Ok(format!(
        "Events:\n{}",
        indent(&render(EVENT_HEADER, &event_rows(&last)))
    ))
}

/// An indented table under a heading, or `<none>`.
fn section(header: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        "  <none>\n".to_string()
    } else {
        indent(&render(header, rows))
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `shoal describe KIND NAME`.
pub fn describe(client: &Client, kind: &str, name: &str) -> Result<u8, CliError> {
    let mut out = String::new();
    match resource(kind)? {
        Resource::Nodes => {
            let node: NodeObject = client.get(&format!("/api/v1/nodes/{name}"))?;
            let report = &node.status.report;
            out += &format!("Name:        {}\n", node.metadata.name);
            let labels: Vec<String> = node
                .metadata
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            out += &format!(
                "Labels:      {}\n",
                if labels.is_empty() {
                    "<none>".into()
                } else {
                    labels.join(", ")
                }
            );
            out += &format!("Heartbeat:   {} ago\n", age(node.status.last_heartbeat));
            out += &format!(
                "Nodelet:     {}\n",
                if report.nodelet_version.is_empty() {
                    "-"
                } else {
                    &report.nodelet_version
                }
            );
            out += "Conditions:\n";
            let rows: Vec<Vec<String>> = node
                .status
                .conditions
                .iter()
                .map(|c| {
                    vec![
                        c.kind.clone(),
                        format!("{:?}", c.status),
                        c.reason.clone(),
                        c.message.clone(),
                    ]
                })
                .collect();
            out += &indent(&render(&["TYPE", "STATUS", "REASON", "MESSAGE"], &rows));
            out += "Desired states:\n";
            if report.applied.is_empty() {
                out += "  <none>\n";
            }
            for applied in &report.applied {
                let commit = applied
                    .commit
                    .as_deref()
                    .map(|c| format!(" (git {})", &c[..c.len().min(12)]))
                    .unwrap_or_default();
                out += &format!(
                    "  {} revision {}: {:?}{commit}\n",
                    applied.desired_state, applied.revision, applied.phase
                );
            }
            out += "Components:\n";
            let rows: Vec<Vec<String>> = report
                .components
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.kind.to_string(),
                        c.version.clone().unwrap_or_else(|| "-".into()),
                        c.desired_version.clone().unwrap_or_else(|| "absent".into()),
                        format!("{:?}", c.phase),
                        c.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            out += &section(
                &["NAME", "KIND", "INSTALLED", "DESIRED", "PHASE", "MESSAGE"],
                &rows,
            );
            for c in report
                .components
                .iter()
                .filter(|c| c.probe_output.is_some() || !c.log_tail.is_empty())
            {
                if let Some(output) = &c.probe_output {
                    out += &format!("  {} probe output:\n{}", c.name, indent(&indent(output)));
                }
                if !c.log_tail.is_empty() {
                    out += &format!(
                        "  {} log tail:\n{}",
                        c.name,
                        indent(&indent(&c.log_tail.join("\n")))
                    );
                }
            }
            out += "Probes:\n";
            let rows: Vec<Vec<String>> = report
                .probes
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        if p.passing {
                            "passing".into()
                        } else {
                            format!("failing ({}x)", p.consecutive_failures)
                        },
                        match p.baseline_passing {
                            Some(true) => "passed".into(),
                            Some(false) => "failed".into(),
                            None => "-".into(),
                        },
                        p.output.lines().next().unwrap_or("").to_string(),
                    ]
                })
                .collect();
            out += &section(&["NAME", "NOW", "BASELINE", "OUTPUT"], &rows);
            if let Some(host) = &report.host {
                out += "Host:\n";
                out += &format!(
                    "  CPU {:.1}%, memory {} / {} MiB, disk {} / {} MiB, {} processes, up {}s",
                    host.cpu_percent,
                    host.memory_used_bytes >> 20,
                    host.memory_total_bytes >> 20,
                    host.disk_used_bytes >> 20,
                    host.disk_total_bytes >> 20,
                    host.process_count,
                    host.uptime_seconds
                );
                if let Some(t) = host.temperature_celsius {
                    out += &format!(", {t:.1} °C");
                }
                out += "\n";
            }
            out += &recent_events(client, &format!("node/{name}"))?;
        }
        Resource::DesiredStates => {
            let state: DesiredStateObject = client.get(&format!("/api/v1/desiredstates/{name}"))?;
            let revisions: Vec<Revision> =
                client.get(&format!("/api/v1/desiredstates/{name}/revisions"))?;
            out += &format!("Name:          {}\n", state.metadata.name);
            out += &format!(
                "Revision:      {} (last good {})\n",
                state.status.revision, state.status.last_good_revision
            );
            out += &format!("Selected:      {} nodes\n", state.status.selected_nodes);
            out += &format!(
                "Created:       {} ago\n",
                age(state.metadata.creation_timestamp)
            );
            out += "Selector:\n";
            out += &indent(
                serde_yaml::to_string(&state.spec.selector)
                    .expect("yaml")
                    .trim_end(),
            );
            out += "Components:\n";
            let rows: Vec<Vec<String>> = state
                .spec
                .components
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.kind.to_string(),
                        c.version.clone().unwrap_or_else(|| "-".into()),
                        format!("{:?}", c.state).to_lowercase(),
                        c.artifact
                            .as_ref()
                            .map(|a| a.url.clone())
                            .unwrap_or_else(|| "(apt)".into()),
                    ]
                })
                .collect();
            out += &indent(&render(
                &["NAME", "KIND", "VERSION", "STATE", "ARTIFACT"],
                &rows,
            ));
            out += &format!(
                "Probes:        {}\n",
                state
                    .spec
                    .probes
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let r = &state.spec.rollout;
            out += &format!(
                "Rollout:       waves [{}], bake {}s, deadline {}s, maxFailures {}, spreadBy {}, autoRevert {}\n",
                r.waves.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(", "),
                r.bake_seconds,
                r.healthy_deadline_seconds,
                r.max_failures,
                r.spread_by.as_deref().unwrap_or("-"),
                r.auto_revert
            );
            out += "Revisions:\n";
            let rows: Vec<Vec<String>> = revisions
                .iter()
                .map(|rev| {
                    vec![
                        rev.revision.to_string(),
                        age(Some(rev.created)),
                        rev.source.kind.clone(),
                        rev.source
                            .actor
                            .clone()
                            .or_else(|| rev.source.author.clone())
                            .unwrap_or_default(),
                        rev.source
                            .commit
                            .as_deref()
                            .map(|c| c[..c.len().min(12)].to_string())
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            out += &indent(&render(
                &["REVISION", "AGE", "SOURCE", "BY", "COMMIT"],
                &rows,
            ));
            out += &recent_events(client, &format!("desiredstate/{name}"))?;
        }
        Resource::Rollouts => {
            let rollout: RolloutObject = client.get(&format!("/api/v1/rollouts/{name}"))?;
            out += &format!("Name:       {}\n", rollout.metadata.name);
            out += &format!(
                "Revisions:  {} → {}\n",
                rollout.spec.from_revision, rollout.spec.revision
            );
            out += &format!("Phase:      {}\n", rollout.status.phase.as_str());
            if !rollout.status.message.is_empty() {
                out += &format!("Message:    {}\n", rollout.status.message);
            }
            out += "Waves:\n";
            for wave in &rollout.spec.plan {
                let marker = if wave.index == rollout.status.current_wave {
                    "▶"
                } else {
                    " "
                };
                out += &format!(
                    "  {marker} {} ({}): {}\n",
                    wave.index + 1,
                    wave.step,
                    wave.nodes.join(", ")
                );
            }
            for (node, why) in &rollout.status.failed_nodes {
                out += &format!("  failed: {node}: {why}\n");
            }
            out += &recent_events(client, &format!("rollout/{name}"))?;
        }
        Resource::Events => {
            return Err(CliError::new(
                "events cannot be described",
                "use `shoal get events [OBJECT]`, e.g. `shoal get events node/gw-1`",
            ));
        }
    }
    print!("{out}");
    Ok(EXIT_OK)
}
