//! Reads manifests from text, files and directories, and reports every problem with its place.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

use crate::error::{Diagnostic, FieldError};
use crate::path::FieldPath;
use crate::position::{index_documents, DocumentPositions, Pos};
use crate::schema::{desired_state_schema, did_you_mean, fields_at};
use crate::types::{DesiredState, API_VERSION, KIND_DESIRED_STATE};
use crate::validate::validate;

/// A manifest that parsed and validated, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The file as the user named it.
    pub file: String,
    /// 0-based index of the document in its file.
    pub document: usize,
    /// Line where the document starts.
    pub line: usize,
    /// The manifest.
    pub object: DesiredState,
}

/// Everything read from some inputs: the manifests that are valid and the problems of the others.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Valid manifests, in input order.
    pub objects: Vec<Parsed>,
    /// Every problem found, in input order.
    pub diagnostics: Vec<Diagnostic>,
}

impl Loaded {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.diagnostics.is_empty()
    }

    fn extend(&mut self, other: Loaded) {
        self.objects.extend(other.objects);
        self.diagnostics.extend(other.diagnostics);
    }

    /// Reports a second manifest of the same name: a name is unique per kind.
    fn check_duplicate_names(&mut self) {
        let mut first_seen: std::collections::HashMap<String, (String, usize)> = Default::default();
        let mut keep = Vec::with_capacity(self.objects.len());
        for parsed in self.objects.drain(..) {
            let name = parsed.object.metadata.name.clone();
            match first_seen.get(&name) {
                Some((file, line)) => self.diagnostics.push(Diagnostic {
                    file: parsed.file.clone(),
                    line: parsed.line,
                    column: 1,
                    field: "metadata.name".into(),
                    message: format!(
                        "DesiredState `{name}` is defined twice (first at {file}:{line})"
                    ),
                    hint: Some(
                        "names are unique per kind; rename one of them or merge them".into(),
                    ),
                }),
                None => {
                    first_seen.insert(name, (parsed.file.clone(), parsed.line));
                    keep.push(parsed);
                }
            }
        }
        self.objects = keep;
    }
}

/// Parses every document of `text` (YAML or JSON). `file` names the source in diagnostics.
pub fn parse_str(file: &str, text: &str) -> Loaded {
    let mut loaded = parse_documents(file, text);
    loaded.check_duplicate_names();
    loaded
}

/// Flow collections (`[…]`, `{…}`) nested deeper than this are refused before parsing: the
/// YAML parser takes time quadratic in that depth (100,000 levels in 200 KB took 25 s), and
/// no manifest needs more than a handful.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Lines plus flow items a text may hold: the parsed form costs some hundred bytes per item,
/// so this bounds a parse's memory (a real manifest has a few hundred).
pub const MAX_ITEMS: usize = 50_000;

/// Checks the budget in one pass over the bytes, before any parser sees them.
fn within_budget(file: &str, text: &str) -> Result<(), Diagnostic> {
    let refuse = |line: usize, column: usize, message: String, hint: &str| Diagnostic {
        file: file.to_string(),
        line,
        column,
        field: String::new(),
        message: format!("{}{message}", crate::error::SYNTAX_PREFIX),
        hint: Some(hint.to_string()),
    };
    let (mut line, mut column) = (1usize, 0usize);
    let mut depth = 0usize;
    let mut items = 0usize;
    let mut quote: Option<u8> = None;
    let mut comment = false;
    // The last byte that was not a space: a quote or a bracket only opens at a token's start.
    let mut previous = b'\n';
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        column += 1;
        if byte == b'\n' {
            line += 1;
            column = 0;
            items += 1;
            comment = false;
            previous = b'\n';
            i += 1;
            continue;
        }
        if comment {
            i += 1;
            continue;
        }
        match quote {
            Some(b'"') if byte == b'\\' => i += 1, // skip the escaped byte
            Some(q) if byte == q => {
                if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                    i += 1; // '' inside single quotes
                } else {
                    quote = None;
                }
            }
            Some(_) => {}
            None => {
                // Not after a word: `key: it's` and `a "b` are plain scalars, and so is a
                // bracket inside one (`see [docs`) outside a flow collection.
                let at_token_start = matches!(previous, b'\n' | b'[' | b'{' | b',' | b':' | b'-');
                match byte {
                    b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => comment = true,
                    b'\'' | b'"' if at_token_start => quote = Some(byte),
                    b'[' | b'{' if at_token_start || depth > 0 => {
                        depth += 1;
                        if depth > MAX_FLOW_DEPTH {
                            return Err(refuse(
                                line,
                                column,
                                format!("collections nested deeper than {MAX_FLOW_DEPTH} levels"),
                                "a manifest is a few levels deep; this input was refused before parsing",
                            ));
                        }
                    }
                    b']' | b'}' if depth > 0 => depth -= 1,
                    b',' if depth > 0 => items += 1,
                    _ => {}
                }
            }
        }
        if items > MAX_ITEMS {
            return Err(refuse(
                line,
                column,
                format!("more than {MAX_ITEMS} lines and list items"),
                "a manifest holds a few hundred; split the input, or this is not a manifest",
            ));
        }
        if byte != b' ' && byte != b'\t' {
            previous = byte;
        }
        i += 1;
    }
    Ok(())
}

fn parse_documents(file: &str, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    if let Err(refused) = within_budget(file, text) {
        loaded.diagnostics.push(refused);
        return loaded;
    }
    let mut values = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        match Value::deserialize(document) {
            Ok(value) => values.push(value),
            Err(err) => {
                loaded.diagnostics.push(syntax_error(file, &err));
                return loaded;
            }
        }
    }
    // Positions are only trusted when both parsers see the same documents.
    let positions = index_documents(text).filter(|docs| docs.len() == values.len());
    let schema = desired_state_schema();
    let mut found_any = false;
    for (index, value) in values.into_iter().enumerate() {
        if value.is_null() {
            continue; // an empty document, as between two `---`
        }
        found_any = true;
        let doc_positions = positions.as_ref().map(|docs| &docs[index]);
        let place = Placer {
            file,
            positions: doc_positions,
        };
        match parse_document(value, &schema) {
            Ok(object) => loaded.objects.push(Parsed {
                file: file.to_string(),
                document: index,
                line: place.start().line,
                object,
            }),
            Err(errors) => loaded.diagnostics.extend(place.all(errors)),
        }
    }
    if !found_any {
        loaded.diagnostics.push(Diagnostic {
            file: file.to_string(),
            line: 0,
            column: 0,
            field: String::new(),
            message: "no manifest found (the input is empty)".into(),
            hint: Some(
                "a manifest starts with `apiVersion: shoal/v1` and `kind: DesiredState`".into(),
            ),
        });
    }
    loaded
}

/// Where a problem goes: as close to the offending node as the positions allow.
enum Where {
    Value(FieldPath),
    Key(FieldPath),
}

struct Located {
    at: Where,
    error: FieldError,
}

struct Placer<'a> {
    file: &'a str,
    positions: Option<&'a DocumentPositions>,
}

impl Placer<'_> {
    fn start(&self) -> Pos {
        self.positions.map(|p| p.start).unwrap_or_default()
    }

    fn all(&self, errors: Vec<Located>) -> Vec<Diagnostic> {
        let mut diagnostics: Vec<Diagnostic> = errors
            .into_iter()
            .map(|located| {
                let pos = match (&located.at, self.positions) {
                    (Where::Value(path), Some(p)) => p.find(path),
                    (Where::Key(path), Some(p)) => p.find_key(path),
                    (_, None) => Pos::default(),
                };
                Diagnostic {
                    file: self.file.to_string(),
                    line: pos.line,
                    column: pos.column,
                    field: located.error.path.to_string(),
                    message: located.error.message,
                    hint: located.error.hint,
                }
            })
            .collect();
        diagnostics.sort_by_key(|d| (d.line, d.column));
        diagnostics
    }
}

fn parse_document(value: Value, schema: &serde_json::Value) -> Result<DesiredState, Vec<Located>> {
    check_type_header(&value)?;
    let mut errors = Vec::new();
    let mut unknown = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(FieldPath::from(&path));
    let result: Result<DesiredState, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut on_unknown));
    for path in unknown {
        errors.push(unknown_field(schema, path));
    }
    match result {
        Ok(object) => {
            if errors.is_empty() {
                let problems = validate(&object);
                if problems.is_empty() {
                    return Ok(object);
                }
                errors.extend(problems.into_iter().map(|error| Located {
                    at: Where::Value(error.path.clone()),
                    error,
                }));
            }
        }
        Err(err) => errors.push(type_error(
            FieldPath::from(err.path()),
            &err.inner().to_string(),
        )),
    }
    Err(errors)
}

/// Checks `apiVersion` and `kind` first: with the wrong kind, field errors would only confuse.
fn check_type_header(value: &Value) -> Result<(), Vec<Located>> {
    let root = FieldPath::root();
    let Some(mapping) = value.as_mapping() else {
        return Err(vec![Located {
            at: Where::Value(root.clone()),
            error: FieldError::new(
                root,
                format!("expected a manifest (a mapping), found {}", describe(value)),
            )
            .hint("a manifest is a mapping with apiVersion, kind, metadata and spec"),
        }]);
    };
    let mut errors = Vec::new();
    let kind = mapping.get("kind");
    match kind.and_then(Value::as_str) {
        Some(KIND_DESIRED_STATE) => {}
        Some(other) => {
            let hint = match did_you_mean(other, [KIND_DESIRED_STATE]) {
                Some(suggestion) => {
                    format!("did you mean `{suggestion}`? shoal/v1 knows the kind DesiredState")
                }
                None => "shoal/v1 knows the kind DesiredState".to_string(),
            };
            errors.push(Located {
                at: Where::Value(root.key("kind")),
                error: FieldError::new(root.key("kind"), format!("unknown kind `{other}`"))
                    .hint(hint),
            })
        }
        None => errors.push(Located {
            at: Where::Value(if kind.is_some() {
                root.key("kind")
            } else {
                root.clone()
            }),
            error: FieldError::new(root.key("kind"), "missing field `kind`")
                .hint("add `kind: DesiredState`"),
        }),
    }
    let api_version = mapping.get("apiVersion");
    match api_version.and_then(Value::as_str) {
        Some(API_VERSION) => {}
        Some(other) => errors.push(Located {
            at: Where::Value(root.key("apiVersion")),
            error: FieldError::new(
                root.key("apiVersion"),
                format!("unknown apiVersion `{other}`"),
            )
            .hint(format!("use `apiVersion: {API_VERSION}`")),
        }),
        None => errors.push(Located {
            at: Where::Value(if api_version.is_some() {
                root.key("apiVersion")
            } else {
                root.clone()
            }),
            error: FieldError::new(root.key("apiVersion"), "missing field `apiVersion`")
                .hint(format!("add `apiVersion: {API_VERSION}`")),
        }),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn unknown_field(schema: &serde_json::Value, path: FieldPath) -> Located {
    let name = path.last_key().unwrap_or("?").to_string();
    let valid = fields_at(schema, &path.parent());
    let suggestion = did_you_mean(&name, valid.iter().map(String::as_str));
    let hint = match suggestion {
        Some(suggestion) => format!(
            "did you mean `{suggestion}`? valid fields here: {}",
            valid.join(", ")
        ),
        None => format!("valid fields here: {}", valid.join(", ")),
    };
    Located {
        at: Where::Key(path.clone()),
        error: FieldError::new(path, format!("unknown field `{name}`")).hint(hint),
    }
}

/// Turns serde's message into one that says what would be valid.
fn type_error(path: FieldPath, message: &str) -> Located {
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let path = path.key(field);
        return Located {
            at: Where::Value(path.parent()),
            error: FieldError::new(path, format!("missing required field `{field}`")),
        };
    }
    if let Some((found, expected)) = message
        .strip_prefix("unknown variant `")
        .and_then(|rest| rest.split_once("`, expected "))
    {
        let choices: Vec<&str> = expected
            .split('`')
            .enumerate()
            .filter_map(|(i, part)| (i % 2 == 1).then_some(part))
            .collect();
        let mut error = FieldError::new(path.clone(), format!("unknown value `{found}`"));
        error = match did_you_mean(found, choices.iter().copied()) {
            Some(suggestion) => error.hint(format!(
                "did you mean `{suggestion}`? valid values: {}",
                choices.join(", ")
            )),
            None => error.hint(format!("valid values: {}", choices.join(", "))),
        };
        return Located {
            at: Where::Value(path),
            error,
        };
    }
    let mut error = FieldError::new(path.clone(), friendly_types(message));
    if message.starts_with("invalid type: floating point") && message.ends_with("expected a string")
    {
        error = error.hint("YAML read this as a number; quote it, e.g. version: \"1.10\"");
    } else if message.starts_with("invalid type:") && message.ends_with("expected a string") {
        error = error.hint("quote the value");
    }
    Located {
        at: Where::Value(path),
        error,
    }
}

fn friendly_types(message: &str) -> String {
    let mut text = message.to_string();
    for (rust, person) in [
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u32", "expected a whole number (0 or more)"),
        ("expected u64", "expected a whole number (0 or more)"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        if let Some(stripped) = text.strip_suffix(rust) {
            text = format!("{stripped}{person}");
        }
    }
    text
}

fn syntax_error(file: &str, err: &serde_yaml::Error) -> Diagnostic {
    // The position goes in front, as in every other diagnostic; drop serde_yaml's copies of it.
    let mut message = err.to_string();
    while let Some(start) = message.find(" at line ") {
        let rest = &message[start + " at line ".len()..];
        let end = rest
            .find(" column ")
            .map(|c| c + " column ".len())
            .map(|c| {
                c + rest[c..]
                    .find(|ch: char| !ch.is_ascii_digit())
                    .unwrap_or(rest.len() - c)
            })
            .unwrap_or(0);
        message.replace_range(start..start + " at line ".len() + end, "");
    }
    let (line, column) = err
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    Diagnostic {
        file: file.to_string(),
        line,
        column,
        field: String::new(),
        message: format!("{}{message}", crate::error::SYNTAX_PREFIX),
        hint: Some("check the indentation and quoting around this place".into()),
    }
}

/// The label used for standard input.
pub const STDIN_LABEL: &str = "<stdin>";

/// Reads files, directories (recursively: `*.yaml`, `*.yml`, `*.json`, sorted) and `-` for standard input.
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Loaded {
    let mut loaded = Loaded::default();
    for path in paths {
        let path = path.as_ref();
        if path == Path::new("-") {
            let mut text = String::new();
            match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
                Ok(_) => loaded.extend(parse_documents(STDIN_LABEL, &text)),
                Err(err) => loaded.diagnostics.push(io_error(STDIN_LABEL, &err, "")),
            }
            continue;
        }
        let label = path.display().to_string();
        if path.is_dir() {
            let mut files = Vec::new();
            if let Err(err) = collect_manifests(path, &mut files) {
                loaded.diagnostics.push(io_error(&label, &err, ""));
                continue;
            }
            if files.is_empty() {
                loaded.diagnostics.push(Diagnostic {
                    file: label,
                    line: 0,
                    column: 0,
                    field: String::new(),
                    message: "no manifests found in this directory".into(),
                    hint: Some("manifests are files ending in .yaml, .yml or .json".into()),
                });
            }
            for file in files {
                loaded.extend(load_file(&file));
            }
        } else {
            loaded.extend(load_file(path));
        }
    }
    loaded.check_duplicate_names();
    loaded
}

fn load_file(path: &Path) -> Loaded {
    let label = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_documents(&label, &text),
        Err(err) => Loaded {
            objects: Vec::new(),
            diagnostics: vec![io_error(
                &label,
                &err,
                "check the path; -f takes files, directories or - for standard input",
            )],
        },
    }
}

fn io_error(label: &str, err: &std::io::Error, hint: &str) -> Diagnostic {
    Diagnostic {
        file: label.to_string(),
        line: 0,
        column: 0,
        field: String::new(),
        message: format!("cannot read: {err}"),
        hint: (!hint.is_empty()).then(|| hint.to_string()),
    }
}

fn collect_manifests(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // .git and editor droppings are never manifests
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_manifests(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    const HEAD: &str = "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: x}\nspec: ";

    #[test]
    fn deep_flow_nesting_is_refused_before_parsing() {
        let n = 100_000;
        let text = format!("{HEAD}{}{}\n", "[".repeat(n), "]".repeat(n));
        let loaded = parse_str("deep.yaml", &text);
        assert_eq!(loaded.diagnostics.len(), 1);
        let d = &loaded.diagnostics[0];
        assert!(d.message.contains("nested deeper than 64 levels"), "{d}");
        assert_eq!((d.line, d.column), (4, 6 + 65), "{d}");
        // Quotes hide brackets only where YAML sees a quoted scalar.
        let inside_a_word = format!("{HEAD}[a \"{}]\n", "[".repeat(100));
        assert!(parse_str("w.yaml", &inside_a_word).diagnostics[0]
            .message
            .contains("nested deeper"));
        let quoted = format!("{HEAD}{{x: \"{}\"}}\n", "[".repeat(100));
        assert!(!parse_str("q.yaml", &quoted)
            .diagnostics
            .iter()
            .any(|d| d.message.contains("nested deeper")));
    }

    #[test]
    fn a_huge_flat_input_is_refused_before_parsing() {
        let lines = format!("{HEAD}\n  components:\n{}", "  - 1\n".repeat(60_000));
        let d = &parse_str("flat.yaml", &lines).diagnostics[0];
        assert!(d.message.contains("more than 50000 lines"), "{d}");
        let flow = format!("{HEAD}[{}1]\n", "1,".repeat(60_000));
        let d = &parse_str("flow.yaml", &flow).diagnostics[0];
        assert!(d.message.contains("more than 50000"), "{d}");
    }

    #[test]
    fn real_manifests_are_within_budget() {
        let text = "apiVersion: shoal/v1\nkind: DesiredState\nmetadata: {name: web, annotations: {note: \"it's [ok]\"}}\nspec:\n  selector: {matchLabels: {role: web}}  # see [docs\n  components:\n    - {name: tool, kind: package, version: '1.0', }\n  probes:\n    - {name: x, exec: {command: [sh, -c, 'test [ -e /x ] && echo ''{''']}}\n";
        let loaded = parse_str("ok.yaml", text);
        assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"apiVersion: shoal/v1
kind: DesiredState
metadata:
  name: demo
spec:
  components:
    - name: agent
      kind: service
      version: 1.0.0
      artifact: {url: "http://127.0.0.1:1/agent.tar.gz", sha256: "0000000000000000000000000000000000000000000000000000000000000000"}
      service: {exec: [bin/agent]}
"#;

    #[test]
    fn parses_a_good_manifest_with_defaults() {
        let loaded = parse_str("good.yaml", GOOD);
        assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
        let object = &loaded.objects[0].object;
        assert_eq!(object.spec.rollout.bake_seconds, 300);
        assert!(object.spec.rollout.auto_revert);
    }

    #[test]
    fn reports_every_unknown_field_with_position() {
        let text = GOOD
            .replace("kind: service\n", "kind: service\n      verison: 1\n")
            .replace("metadata:\n", "metadata:\n  nmae: x\n");
        let loaded = parse_str("bad.yaml", &text);
        let messages: Vec<String> = loaded.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with(
                "bad.yaml:4:3: metadata.nmae: unknown field `nmae`; did you mean `name`?"
            ),
            "{}",
            messages[0]
        );
        assert!(messages[1].starts_with("bad.yaml:10:7: spec.components[0].verison: unknown field `verison`; did you mean `version`?"), "{}", messages[1]);
    }

    #[test]
    fn json_is_accepted() {
        let value: serde_json::Value = serde_yaml::from_str(GOOD).unwrap();
        let loaded = parse_str("good.json", &serde_json::to_string_pretty(&value).unwrap());
        assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
    }

    #[test]
    fn empty_documents_are_skipped_and_names_unique() {
        let text = format!("---\n{GOOD}---\n---\n{GOOD}");
        let loaded = parse_str("two.yaml", &text);
        assert_eq!(loaded.objects.len(), 1);
        assert_eq!(loaded.diagnostics.len(), 1);
        assert!(loaded.diagnostics[0].message.contains("defined twice"));
    }
}
