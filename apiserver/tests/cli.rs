//! Runs the real `shoal` binary as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shoal(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .current_dir(dir)
        .args(args)
        .env_remove("SHOAL_SERVER")
        .env_remove("SHOAL_TOKEN")
        .output()
        .expect("shoal runs")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn validate_accepts_the_examples() {
    let out = shoal(&workspace(), &["validate", "-f", "examples/"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("desiredstate/edge-gateways valid"),
        "{stdout}"
    );
    assert!(stdout.contains("desiredstate/kiosks valid"), "{stdout}");
}

#[test]
fn validate_rejects_each_invalid_fixture_with_its_pinned_message() {
    let manifests = workspace().join("manifests");
    let dir = manifests.join("tests/data/invalid");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let relative = path
            .strip_prefix(&manifests)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let out = shoal(&manifests, &["validate", "-f", &relative]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{relative}: {stderr}");
        let expected = std::fs::read_to_string(path.with_extension("expected")).unwrap();
        assert!(
            stderr.starts_with(&expected),
            "{relative}:\n{stderr}\nexpected:\n{expected}"
        );
        assert!(
            stderr.contains("fix them and run `shoal validate` again"),
            "{stderr}"
        );
        assert!(
            out.stdout.is_empty() || relative.contains("duplicate-names"),
            "{relative}"
        );
        checked += 1;
    }
    assert!(checked >= 10);
}

#[test]
fn validate_reads_standard_input_and_reports_json() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["-o", "json", "validate", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: x}\nspec: {components: [{name: tool, kind: package, version: '1.0', colour: red}]}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["errors"][0]["file"], "<stdin>");
    assert_eq!(report["errors"][0]["field"], "spec.components[0].colour");
    assert_eq!(report["errors"][0]["line"], 4);
}

#[test]
fn missing_path_and_usage_errors_exit_2() {
    let out = shoal(&workspace(), &["validate", "-f", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    let out = shoal(&workspace(), &["validate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn schema_matches_the_committed_copy() {
    let out = shoal(&workspace(), &["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let committed = std::fs::read(workspace().join("docs/desiredstate.schema.json")).unwrap();
    assert_eq!(out.stdout, committed);
    let out = shoal(&workspace(), &["schema", "--markdown"]);
    let committed = std::fs::read(workspace().join("docs/manifest-reference.md")).unwrap();
    assert_eq!(out.stdout, committed);
}

/// The README's first command, end to end: six real nodelets, real artifacts, the whole story.
/// Needs every workspace binary next to `shoal` (scripts/test builds them first).
#[test]
fn the_demo_stops_a_bad_release_at_the_canary_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["demo", "--no-wait", "--bake-seconds", "4"])
        .env_remove("SHOAL_SERVER")
        .env_remove("SHOAL_TOKEN")
        .output()
        .expect("shoal demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("✔ 1.2.0 reached only the canary (node-1)"),
        "{stdout}"
    );
    // Final state of every node: back at 1.1.0, with the package installed.
    let nodes: Vec<&str> = stdout.lines().filter(|l| l.starts_with("node-")).collect();
    assert_eq!(nodes.len(), 6, "{stdout}");
    for line in nodes {
        assert!(
            line.contains("demo-service=1.1.0") && line.contains("shoal-demo-motd=1.0-1"),
            "{line}"
        );
        assert!(
            line.contains("True    True      True"),
            "ready, healthy, converged: {line}"
        );
    }
    // The rollout history: 1 and 2 complete, 3 rolled back.
    let history: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("shoal rollout history demo"))
        .collect();
    assert!(
        history
            .iter()
            .any(|l| l.starts_with("1 ") && l.contains("Complete")),
        "{stdout}"
    );
    assert!(
        history
            .iter()
            .any(|l| l.starts_with("2 ") && l.contains("Complete (last good)")),
        "{stdout}"
    );
    assert!(
        history
            .iter()
            .any(|l| l.starts_with("3 ") && l.contains("RolledBack")),
        "{stdout}"
    );
    // Nothing left running or on disk.
    let folder = stdout
        .lines()
        .next()
        .and_then(|l| l.rsplit(" in ").next())
        .unwrap()
        .trim()
        .to_string();
    assert!(
        !std::path::Path::new(&folder).exists(),
        "{folder} was left behind"
    );
    let leftovers = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&folder))
        })
        .count();
    assert_eq!(leftovers, 0, "processes of the demo are still running");
}
