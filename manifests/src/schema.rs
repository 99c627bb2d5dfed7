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
        assert_eq!(fields_at(&root, &artifact), vec!["sha256", "url"]);
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
