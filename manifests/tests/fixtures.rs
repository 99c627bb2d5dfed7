//! Pins error quality and generated artefacts: every invalid fixture must produce
//! exactly the diagnostics in its `.expected` file, every valid one must parse,
//! and the committed schema and field reference must match the types.
//!
//! After an intended change, regenerate with `SHOAL_BLESS=1 cargo test -p manifests --test fixtures`
//! and review the diff.

use std::path::{Path, PathBuf};

fn bless() -> bool {
    std::env::var_os("SHOAL_BLESS").is_some()
}

fn fixtures(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new("tests/data").join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in tests/data/{dir}");
    files
}

/// Compares `actual` with the golden file, or rewrites it when blessing.
fn check_golden(golden: &Path, actual: &str) -> Result<(), String> {
    if bless() {
        std::fs::write(golden, actual).unwrap();
        return Ok(());
    }
    let expected = std::fs::read_to_string(golden).map_err(|e| {
        format!(
            "{}: {e} (run with SHOAL_BLESS=1 to create it)",
            golden.display()
        )
    })?;
    if expected == actual {
        Ok(())
    } else {
        Err(format!(
            "{} differs from the output:\n--- expected\n{expected}\n--- actual\n{actual}",
            golden.display()
        ))
    }
}

#[test]
fn valid_fixtures_parse() {
    for file in fixtures("valid") {
        let loaded = manifests::load_paths(&[&file]);
        let errors: Vec<String> = loaded.diagnostics.iter().map(|d| d.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
        assert!(!loaded.objects.is_empty(), "{}", file.display());
    }
}

#[test]
fn examples_validate() {
    let loaded = manifests::load_paths(&["../examples"]);
    let errors: Vec<String> = loaded.diagnostics.iter().map(|d| d.to_string()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(loaded.objects.len() >= 3);
}

#[test]
fn invalid_fixtures_produce_their_pinned_messages() {
    let mut failures = Vec::new();
    for file in fixtures("invalid") {
        let loaded = manifests::load_paths(&[&file]);
        assert!(loaded.objects.is_empty() || !loaded.diagnostics.is_empty());
        let mut actual: String = loaded
            .diagnostics
            .iter()
            .map(|d| format!("{d}\n"))
            .collect();
        if actual.is_empty() {
            actual = "(no error)\n".into();
        }
        if let Err(failure) = check_golden(&file.with_extension("expected"), &actual) {
            failures.push(failure);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn committed_schema_and_reference_are_current() {
    let schema = check_golden(
        Path::new("../docs/desiredstate.schema.json"),
        &manifests::schema::desired_state_schema_pretty(),
    );
    let reference = check_golden(
        Path::new("../docs/manifest-reference.md"),
        &manifests::schema::reference_markdown(),
    );
    let failures: Vec<String> = [schema, reference]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(
        failures.is_empty(),
        "{}\n\nthe schema drifted from the types: run `just schema` and commit docs/",
        failures.join("\n\n")
    );
}
