//! The JSON Schema of `DesiredState`, and lookups in it (valid field names at a path).

use serde_json::{Map, Value};

use crate::path::{FieldPath, Segment};
use crate::types::DesiredState;

/// The JSON Schema (draft 2020-12) of a `DesiredState` manifest.
pub fn desired_state_schema() -> Value {
    let schema = schemars::schema_for!(DesiredState);
    serde_json::to_value(schema).expect("a schema is always JSON")
}

/// The schema as pretty JSON with a trailing newline, as committed in docs/.
pub fn desired_state_schema_pretty() -> String {
    let mut text =
        serde_json::to_string_pretty(&desired_state_schema()).expect("a schema is always JSON");
    text.push('\n');
    text
}

/// Follows `$ref` and the non-null branch of `anyOf`/`oneOf` to the schema that has content.
fn resolve<'a>(root: &'a Value, mut schema: &'a Value) -> &'a Value {
    for _ in 0..16 {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let name = reference.trim_start_matches("#/$defs/");
            match root.get("$defs").and_then(|defs| defs.get(name)) {
                Some(target) => {
                    schema = target;
                    continue;
                }
                None => return schema,
            }
        }
        let branches = schema
            .get("anyOf")
            .or_else(|| schema.get("oneOf"))
            .and_then(Value::as_array);
        if let Some(branches) = branches {
            let non_null = branches
                .iter()
                .find(|branch| branch.get("type").and_then(Value::as_str) != Some("null"));
            if let Some(branch) = non_null {
                if branch.get("properties").is_some() || branch.get("$ref").is_some() {
                    schema = branch;
                    continue;
                }
            }
        }
        return schema;
    }
    schema
}

/// The schema of the node at `path`, if the schema describes it.
pub fn schema_at<'a>(root: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    let mut schema = resolve(root, root);
    for segment in &path.0 {
        let next = match segment {
            Segment::Key(key) => {
                let properties = schema.get("properties").and_then(Value::as_object);
                match properties.and_then(|p| p.get(key)) {
                    Some(property) => property,
                    None => schema
                        .get("additionalProperties")
                        .filter(|v| v.is_object())?,
                }
            }
            Segment::Index(_) => schema.get("items")?,
        };
        schema = resolve(root, next);
    }
    Some(schema)
}

/// The field names an object at `path` accepts, in schema order (alphabetical).
pub fn fields_at(root: &Value, path: &FieldPath) -> Vec<String> {
    schema_at(root, path)
        .and_then(|schema| schema.get("properties"))
        .and_then(Value::as_object)
        .map(|properties: &Map<String, Value>| properties.keys().cloned().collect())
        .unwrap_or_default()
}

/// The candidate closest to `word`, when it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            let score = strsim::jaro_winkler(&lower, &candidate.to_ascii_lowercase());
            (score, candidate)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// The manifest field reference (Markdown), generated from the schema so the two never disagree.
pub fn reference_markdown() -> String {
    let root = desired_state_schema();
    let mut out = String::new();
    out.push_str("# Manifest reference (`shoal/v1`)\n\n");
    out.push_str("<!-- Generated from the JSON Schema by `shoal schema --markdown` (`just schema`); do not edit by hand. -->\n\n");
    out.push_str("Unknown fields are errors. Fields without a default are required unless their type allows `null`.\n");
    out.push_str(
        "The schema itself is [`desiredstate.schema.json`](desiredstate.schema.json).\n\n",
    );
    let mut sections: Vec<(String, &Value)> = vec![("DesiredState".to_string(), &root)];
    if let Some(defs) = root.get("$defs").and_then(Value::as_object) {
        sections.extend(defs.iter().map(|(name, schema)| (name.clone(), schema)));
    }
    for (name, schema) in sections {
        out.push_str(&format!("## {name}\n\n"));
        if let Some(description) = schema.get("description").and_then(Value::as_str) {
            out.push_str(&format!("{}\n\n", description.replace('\n', " ")));
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out.push_str("| field | type | required | default | description |\n");
            out.push_str("| --- | --- | --- | --- | --- |\n");
            for (field, property) in properties {
                let default = property
                    .get("default")
                    .map(|d| format!("`{}`", serde_json::to_string(d).unwrap_or_default()))
                    .unwrap_or_default();
                let description = property
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .replace('\n', " ")
                    .replace('|', "\\|");
                let is_required = if required.contains(&field.as_str()) {
                    "yes"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "| `{field}` | {} | {is_required} | {default} | {description} |\n",
                    type_name(property)
                ));
            }
            out.push('\n');
        } else if let Some(choices) = schema.get("oneOf").and_then(Value::as_array) {
            for choice in choices {
                match (
                    choice.get("const"),
                    choice.get("description").and_then(Value::as_str),
                ) {
                    (Some(value), Some(description)) => out.push_str(&format!(
                        "- `{}`: {description}\n",
                        value.as_str().unwrap_or("?")
                    )),
                    (None, _) => out.push_str(&format!("- {}\n", type_name(choice))),
                    (Some(value), None) => out.push_str(&format!("- `{value}`\n")),
                }
            }
            out.push('\n');
        }
    }
    out
}

/// A short human name for a property's type, linking to the section of a referenced type.
fn type_name(schema: &Value) -> String {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.trim_start_matches("#/$defs/");
        return format!("[{name}](#{})", name.to_ascii_lowercase());
    }
    if let Some(branches) = schema.get("anyOf").and_then(Value::as_array) {
        let names: Vec<String> = branches
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) != Some("null"))
            .map(type_name)
            .collect();
        return names.join(" or ");
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        return format!("string matching `{pattern}`");
    }
    let kinds: Vec<&str> = match schema.get("type") {
        Some(Value::String(kind)) => vec![kind.as_str()],
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .filter(|k| *k != "null")
            .collect(),
        _ => vec![],
    };
    match kinds.first().copied() {
        Some("array") => format!(
            "list of {}",
            schema.get("items").map(type_name).unwrap_or_default()
        ),
        Some("object") => match schema.get("additionalProperties") {
            Some(values) if values.is_object() => format!("map of {}", type_name(values)),
            _ => "object".to_string(),
        },
        Some(kind) => kind.to_string(),
        None => "any".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_through_refs_and_options() {
        let root = desired_state_schema();
        let rollout = FieldPath::root().key("spec").key("rollout");
        assert!(fields_at(&root, &rollout).contains(&"bakeSeconds".to_string()));
        let artifact = FieldPath::root()
            .key("spec")
            .key("components")
            .index(3)
            .key("artifact");
        assert_eq!(fields_at(&root, &artifact), vec!["sha256", "size", "url"]);
        let labels = FieldPath::root().key("metadata").key("labels");
        assert!(fields_at(&root, &labels).is_empty());
    }

    #[test]
    fn suggests_close_names_only() {
        let fields = ["waves", "bakeSeconds", "spreadBy"];
        assert_eq!(did_you_mean("bakeSecond", fields), Some("bakeSeconds"));
        assert_eq!(did_you_mean("bakeseconds", fields), Some("bakeSeconds"));
        assert_eq!(did_you_mean("zzz", fields), None);
    }
}
