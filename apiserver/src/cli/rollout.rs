//! `shoal rollout …` and `shoal plan`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use manifests::plan::{plan_waves, PlanNode};
use manifests::wire::*;
use serde::Serialize;

use super::client::{CliError, Client};
use super::table::{age, render};
use super::{load_valid, print_structured, Output, RolloutVerb, EXIT_DIFFERENT, EXIT_OK};

/// Runs a rollout verb.
pub fn run(client: &Client, verb: &RolloutVerb, output: Output) -> Result<u8, CliError> {
    match verb {
        RolloutVerb::Status { name, watch } => status(client, name, *watch, output),
        RolloutVerb::History { name } => history(client, name, output),
        RolloutVerb::Pause { name } => act(client, name, "pause", output),
        RolloutVerb::Resume { name } => act(client, name, "resume", output),
        RolloutVerb::Undo { name, to_revision } => {
            let path = match to_revision {
                Some(r) => format!("/api/v1/rollouts/{name}/undo?toRevision={r}"),
                None => format!("/api/v1/rollouts/{name}/undo"),
            };
            let response: ApplyResponse = client.post(&path, "application/json", String::new())?;
            match output {
                Output::Table => {
                    for r in &response.results {
                        println!(
                            "desiredstate/{} rolled back: revision {} ({:?}); a rollout starts",
                            r.name, r.revision, r.action
                        );
                    }
                }
                _ => print_structured(&response, output),
            }
            Ok(EXIT_OK)
        }
    }
}

fn act(client: &Client, name: &str, action: &str, output: Output) -> Result<u8, CliError> {
    let rollout: RolloutObject = client.post(
        &format!("/api/v1/rollouts/{name}/{action}"),
        "application/json",
        String::new(),
    )?;
    match output {
        Output::Table => println!("rollout/{name} {}", rollout.status.phase.as_str()),
        _ => print_structured(&rollout, output),
    }
    Ok(EXIT_OK)
}

fn terminal(phase: RolloutPhase) -> bool {
    matches!(
        phase,
        RolloutPhase::Complete | RolloutPhase::Aborted | RolloutPhase::RolledBack
    )
}

fn exit_of(phase: RolloutPhase) -> u8 {
    match phase {
        RolloutPhase::Aborted | RolloutPhase::RolledBack => EXIT_DIFFERENT,
        _ => EXIT_OK,
    }
}

fn render_status(rollout: &RolloutObject, nodes: &[NodeObject]) -> String {
    let name = &rollout.metadata.name;
    let by_name: BTreeMap<&str, &NodeObject> = nodes
        .iter()
        .map(|n| (n.metadata.name.as_str(), n))
        .collect();
    let mut out = format!(
        "rollout/{name}: revision {} → {}, {} (started {} ago)\n",
        rollout.spec.from_revision,
        rollout.spec.revision,
        rollout.status.phase.as_str(),
        age(Some(rollout.status.started))
    );
    if !rollout.status.message.is_empty() {
        out += &format!("  {}\n", rollout.status.message);
    }
    let mut rows = Vec::new();
    for wave in &rollout.spec.plan {
        let marker = if wave.index == rollout.status.current_wave && !terminal(rollout.status.phase)
        {
            "▶"
        } else {
            ""
        };
        for node in &wave.nodes {
            let applied = by_name.get(node.as_str()).and_then(|n| {
                n.status
                    .report
                    .applied
                    .iter()
                    .find(|a| &a.desired_state == name)
            });
            let state = match applied {
                Some(a) => format!("{:?} @{}", a.phase, a.revision),
                None => "-".into(),
            };
            let failed = rollout
                .status
                .failed_nodes
                .get(node)
                .cloned()
                .unwrap_or_default();
            rows.push(vec![
                format!("{marker}{}", wave.index + 1),
                wave.step.to_string(),
                node.clone(),
                state,
                failed,
            ]);
        }
    }
    out += &render(&["WAVE", "STEP", "NODE", "STATE", "FAILED"], &rows);
    out
}

fn status(client: &Client, name: &str, watch: bool, output: Output) -> Result<u8, CliError> {
    let mut last = String::new();
    loop {
        let rollout: RolloutObject = client.get(&format!("/api/v1/rollouts/{name}"))?;
        if output != Output::Table {
            print_structured(&rollout, output);
            return Ok(exit_of(rollout.status.phase));
        }
        let nodes: Vec<NodeObject> = client.get("/api/v1/nodes")?;
        let text = render_status(&rollout, &nodes);
        if text != last {
            print!("{text}");
            if watch {
                println!();
            }
            last = text;
        }
        if !watch || terminal(rollout.status.phase) {
            return Ok(exit_of(rollout.status.phase));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HistoryRow {
    revision: u64,
    created: String,
    source: String,
    by: String,
    outcome: String,
    versions: String,
}

fn history(client: &Client, name: &str, output: Output) -> Result<u8, CliError> {
    let revisions: Vec<Revision> =
        client.get(&format!("/api/v1/desiredstates/{name}/revisions"))?;
    let events: Vec<Event> =
        client.get(&format!("/api/v1/events?object=rollout/{name}&limit=10000"))?;
    let state: DesiredStateObject = client.get(&format!("/api/v1/desiredstates/{name}"))?;
    let mut rows = Vec::new();
    for revision in &revisions {
        // The latest rollout event about a revision tells how its rollout ended (or where it is).
        let outcome = events
            .iter()
            .rev()
            .find(|e| {
                e.revision == Some(revision.revision) && e.object == format!("rollout/{name}")
            })
            .map(|e| match e.reason.as_str() {
                "RolloutComplete" => "Complete".to_string(),
                "RolledBack" | "RolloutAborted" => "RolledBack".to_string(),
                "Superseded" => "Superseded".to_string(),
                other => format!("Progressing ({other})"),
            })
            .unwrap_or_else(|| "-".into());
        let outcome = if revision.revision == state.status.last_good_revision {
            format!("{outcome} (last good)")
        } else {
            outcome
        };
        let versions: Vec<String> = revision
            .spec
            .components
            .iter()
            .map(|c| format!("{}={}", c.name, c.version.as_deref().unwrap_or("absent")))
            .collect();
        rows.push(HistoryRow {
            revision: revision.revision,
            created: age(Some(revision.created)),
            source: match &revision.source.commit {
                Some(commit) => format!("git {}", &commit[..commit.len().min(12)]),
                None => revision.source.kind.clone(),
            },
            by: revision
                .source
                .actor
                .clone()
                .or_else(|| revision.source.author.clone())
                .unwrap_or_default(),
            outcome,
            versions: versions.join(","),
        });
    }
    match output {
        Output::Table => {
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.revision.to_string(),
                        r.created.clone(),
                        r.source.clone(),
                        r.by.clone(),
                        r.outcome.clone(),
                        r.versions.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render(
                    &["REVISION", "AGE", "SOURCE", "BY", "ROLLOUT", "VERSIONS"],
                    &table
                )
            );
        }
        _ => print_structured(&rows, output),
    }
    Ok(EXIT_OK)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlannedNode {
    node: String,
    canary: bool,
    changes: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlannedWave {
    wave: usize,
    step: String,
    nodes: Vec<PlannedNode>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlannedState {
    desired_state: String,
    nodes: usize,
    waves: Vec<PlannedWave>,
}

/// `shoal plan -f`: the waves the apiserver would run, computed with the same planner.
pub fn plan(client: &Client, files: &[PathBuf], output: Output) -> Result<u8, CliError> {
    let objects = load_valid(files, "plan")?;
    let nodes: Vec<NodeObject> = client.get("/api/v1/nodes")?;
    let mut planned = Vec::new();
    for parsed in &objects {
        let state = &parsed.object;
        let group: Vec<&NodeObject> = nodes
            .iter()
            .filter(|n| state.spec.selector.matches(&n.metadata.labels))
            .collect();
        let plan_nodes: Vec<PlanNode> = group
            .iter()
            .map(|n| PlanNode {
                name: n.metadata.name.clone(),
                labels: n.metadata.labels.clone(),
            })
            .collect();
        let waves = plan_waves(&state.metadata.name, &plan_nodes, &state.spec.rollout);
        let by_name: BTreeMap<&str, &NodeObject> = group
            .iter()
            .map(|n| (n.metadata.name.as_str(), *n))
            .collect();
        let mut out = PlannedState {
            desired_state: state.metadata.name.clone(),
            nodes: group.len(),
            waves: vec![],
        };
        for wave in &waves {
            let mut planned_wave = PlannedWave {
                wave: wave.index + 1,
                step: wave.step.to_string(),
                nodes: vec![],
            };
            for name in &wave.nodes {
                let node = by_name[name.as_str()];
                let installed: BTreeMap<&str, Option<&str>> = node
                    .status
                    .report
                    .components
                    .iter()
                    .map(|c| (c.name.as_str(), c.version.as_deref()))
                    .collect();
                let changes: Vec<String> = state
                    .spec
                    .components
                    .iter()
                    .filter_map(|c| {
                        let have = installed.get(c.name.as_str()).copied().flatten();
                        let want = match c.state {
                            manifests::ComponentState::Present => c.version.as_deref(),
                            manifests::ComponentState::Absent => None,
                        };
                        (have != want).then(|| {
                            format!(
                                "{} {}→{}",
                                c.name,
                                have.unwrap_or("-"),
                                want.unwrap_or("absent")
                            )
                        })
                    })
                    .collect();
                planned_wave.nodes.push(PlannedNode {
                    node: name.clone(),
                    canary: node
                        .metadata
                        .labels
                        .get(manifests::CANARY_LABEL)
                        .map(String::as_str)
                        == Some("true"),
                    changes,
                });
            }
            out.waves.push(planned_wave);
        }
        planned.push(out);
    }
    match output {
        Output::Table => {
            for state in &planned {
                println!(
                    "desiredstate/{}: {} nodes in {} waves",
                    state.desired_state,
                    state.nodes,
                    state.waves.len()
                );
                let mut rows = Vec::new();
                for wave in &state.waves {
                    for node in &wave.nodes {
                        rows.push(vec![
                            wave.wave.to_string(),
                            wave.step.clone(),
                            format!(
                                "{}{}",
                                node.node,
                                if node.canary { " (canary)" } else { "" }
                            ),
                            if node.changes.is_empty() {
                                "no change".into()
                            } else {
                                node.changes.join(", ")
                            },
                        ]);
                    }
                }
                if !rows.is_empty() {
                    print!("{}", render(&["WAVE", "STEP", "NODE", "CHANGES"], &rows));
                }
            }
        }
        _ => print_structured(&planned, output),
    }
    Ok(EXIT_OK)
}
