//! `shoal rollout …` and `shoal plan`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
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
        RolloutVerb::Status {
            name,
            revision,
            watch,
            timeout,
        } => status(client, name, *revision, *watch, *timeout, output),
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
    phase.is_terminal()
}

fn exit_of(phase: RolloutPhase) -> u8 {
    match phase {
        RolloutPhase::Aborted | RolloutPhase::RolledBack | RolloutPhase::Superseded => {
            EXIT_DIFFERENT
        }
        _ => EXIT_OK,
    }
}

/// What one look at the server says about revision `revision` of `name`.
enum Seen {
    /// Its rollout, as stored (it may be finished).
    Rollout(Box<RolloutObject>),
    /// A newer revision's rollout replaced the object; how this one ended, from its events
    /// (Complete, RolledBack, Aborted, or Superseded when it never ended).
    Replaced(u64, RolloutPhase),
}

/// How revision `revision`'s rollout ended, from the events, once a newer one replaced it.
fn ended(client: &Client, name: &str, revision: u64) -> Result<RolloutPhase, CliError> {
    let events: Vec<Event> =
        client.get(&format!("/api/v1/events?object=rollout/{name}&limit=10000"))?;
    Ok(events
        .iter()
        .rev()
        .filter(|e| e.revision == Some(revision) && e.object == format!("rollout/{name}"))
        .find_map(|e| match e.reason.as_str() {
            "RolloutComplete" => Some(RolloutPhase::Complete),
            "RolledBack" => Some(RolloutPhase::RolledBack),
            "RolloutAborted" => Some(RolloutPhase::Aborted),
            _ => None,
        })
        .unwrap_or(RolloutPhase::Superseded))
}

/// Reads the rollout of exactly `revision`: never an older one.
fn look(client: &Client, name: &str, revision: u64) -> Result<Option<Seen>, CliError> {
    let state: DesiredStateObject = client.get(&format!("/api/v1/desiredstates/{name}"))?;
    if state.status.revision < revision {
        return Err(CliError::new(
            format!(
                "DesiredState `{name}` has no revision {revision} (its newest is {})",
                state.status.revision
            ),
            "use the revision `shoal apply` printed, or see `shoal rollout history NAME`",
        ));
    }
    let rollout: Option<RolloutObject> =
        client.get_optional(&format!("/api/v1/rollouts/{name}"))?;
    Ok(match rollout {
        Some(r) if r.spec.revision == revision => Some(Seen::Rollout(Box::new(r))),
        Some(r) if r.spec.revision > revision => Some(Seen::Replaced(
            r.spec.revision,
            ended(client, name, revision)?,
        )),
        _ if state.status.revision > revision => Some(Seen::Replaced(
            state.status.revision,
            ended(client, name, revision)?,
        )),
        // Stored before the server created rollouts with their revisions: the controller
        // creates it within a tick.
        _ => None,
    })
}

/// Follows `name`'s rollout of `revision` until it ends or `deadline` passes.
fn follow(
    client: &Client,
    name: &str,
    revision: u64,
    watch: bool,
    deadline: Option<std::time::Instant>,
    output: Output,
) -> Result<u8, CliError> {
    let redraw = watch && output == Output::Table && std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut last_lines = 0usize;
    loop {
        let seen = look(client, name, revision)?;
        let (text, phase, rollout) = match &seen {
            Some(Seen::Replaced(newer, RolloutPhase::Superseded)) => (
                format!("rollout/{name}: revision {revision} Superseded by revision {newer}\n"),
                Some(RolloutPhase::Superseded),
                None,
            ),
            Some(Seen::Replaced(newer, phase)) => (
                format!(
                    "rollout/{name}: revision {revision} {} (revision {newer} is rolling out now)\n",
                    phase.as_str()
                ),
                Some(*phase),
                None,
            ),
            Some(Seen::Rollout(rollout)) => {
                let nodes: Vec<NodeObject> = if output == Output::Table {
                    client.get("/api/v1/nodes")?
                } else {
                    vec![]
                };
                (
                    render_status(rollout, &nodes),
                    Some(rollout.status.phase),
                    Some(rollout.as_ref()),
                )
            }
            None => (
                format!("rollout/{name}: revision {revision} is not planned yet\n"),
                None,
                None,
            ),
        };
        let done = phase.is_some_and(terminal);
        if output != Output::Table && (done || !watch) {
            match rollout {
                Some(r) => print_structured(r, output),
                None => print_structured(
                    &serde_json::json!({"desiredState": name, "revision": revision, "phase": phase.map(|p| p.as_str())}),
                    output,
                ),
            }
        } else if output == Output::Table
            && (redraw && text != last || without_age(&text) != without_age(&last))
        {
            if redraw && last_lines > 0 {
                // Up over the last drawing and clear to the end of the screen.
                print!("\x1b[{last_lines}A\x1b[J");
            }
            print!("{text}");
            if watch && !redraw {
                println!();
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
            last_lines = text.lines().count();
            last = text;
        }
        if done || !watch {
            return Ok(phase.map_or(EXIT_OK, exit_of));
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            let at = phase.map_or("not planned yet", |p| p.as_str());
            eprintln!(
                "error: timed out waiting for revision {revision} of {name}: its rollout is {at}\n  hint: follow it with `shoal rollout status {name} --revision {revision} --watch`, or pause it with `shoal rollout pause {name}`"
            );
            return Ok(super::EXIT_ERROR);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `shoal apply --wait`: follows each applied object's rollout in turn, within one overall
/// timeout. The worst outcome is the exit code (2 > 1 > 0).
pub fn wait_for_all(
    client: &Client,
    applied: &ApplyResponse,
    timeout: Option<Duration>,
) -> Result<u8, CliError> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut worst = EXIT_OK;
    for result in &applied.results {
        if result.action == ApplyAction::Pruned {
            continue;
        }
        let code = follow(
            client,
            &result.name,
            result.revision,
            true,
            deadline,
            Output::Table,
        )?;
        worst = worst.max(code);
    }
    Ok(worst)
}

/// The status text without its "(started 25s ago)": a log (not a terminal) gets a new
/// drawing when something changed, not every second.
fn without_age(text: &str) -> String {
    match (text.find(" (started "), text.find(" ago)\n")) {
        (Some(start), Some(end)) if start < end => {
            format!("{}{}", &text[..start], &text[end + 5..])
        }
        _ => text.to_string(),
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
            let failed = match (
                rollout.status.failed_nodes.get(node),
                rollout.status.unavailable_nodes.get(node),
            ) {
                (Some(why), _) => why.clone(),
                (None, Some(why)) => format!("went on without it: {why}"),
                (None, None) => String::new(),
            };
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

fn status(
    client: &Client,
    name: &str,
    revision: Option<u64>,
    watch: bool,
    timeout: Option<Duration>,
    output: Output,
) -> Result<u8, CliError> {
    // Without --revision: the newest revision, read once, so a watch never switches to an
    // older rollout or silently to a newer one.
    let revision = match revision {
        Some(r) => r,
        None => {
            let state: DesiredStateObject = client.get(&format!("/api/v1/desiredstates/{name}"))?;
            state.status.revision
        }
    };
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    follow(client, name, revision, watch, deadline, output)
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

#[cfg(test)]
mod age_tests {
    #[test]
    fn the_age_is_left_out_of_the_comparison() {
        let a = "rollout/web: revision 1 → 2, Progressing (started 3s ago)\n  wave 1 of 2\n";
        let b = "rollout/web: revision 1 → 2, Progressing (started 4s ago)\n  wave 1 of 2\n";
        assert_eq!(super::without_age(a), super::without_age(b));
        assert_eq!(
            super::without_age(a),
            "rollout/web: revision 1 → 2, Progressing\n  wave 1 of 2\n"
        );
    }
}
