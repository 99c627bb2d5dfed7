//! Label selectors: which nodes a `DesiredState` applies to, with Kubernetes semantics.

use std::collections::BTreeMap;

use crate::plan::PlanNode;
use crate::types::{LabelSelector, SelectorOperator, SelectorRequirement};

impl LabelSelector {
    /// Whether a node with these labels belongs to the group.
    ///
    /// Every `matchLabels` pair must be present with exactly that value, and every
    /// expression must hold (see [`SelectorRequirement::matches`]). An empty selector
    /// matches every node, as in Kubernetes.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self.match_expressions.iter().all(|req| req.matches(labels))
    }

    /// The nodes this selector picks, in the order they were given.
    pub fn select<'a>(&self, nodes: impl IntoIterator<Item = &'a PlanNode>) -> Vec<&'a PlanNode> {
        nodes
            .into_iter()
            .filter(|node| self.matches(&node.labels))
            .collect()
    }

    /// Whether the selector has no requirement at all, and so selects every node.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

impl SelectorRequirement {
    /// Whether this one requirement holds for a node with these labels.
    ///
    /// `In` with no values matches nothing and `NotIn` with no values matches
    /// everything; validation rejects both, but the answer stays the one the
    /// set semantics give rather than a panic. `Exists` and `DoesNotExist`
    /// ignore `values`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            // Kubernetes: an absent label satisfies NotIn.
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![SelectorRequirement {
                key: key.to_string(),
                operator,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let sel = LabelSelector::default();
        assert!(sel.is_empty());
        assert!(sel.matches(&labels(&[])));
        assert!(sel.matches(&labels(&[("role", "gateway")])));
    }

    #[test]
    fn match_labels_need_every_pair_with_the_exact_value() {
        let sel = LabelSelector {
            match_labels: labels(&[("role", "gateway"), ("arch", "aarch64")]),
            match_expressions: vec![],
        };
        assert!(sel.matches(&labels(&[
            ("role", "gateway"),
            ("arch", "aarch64"),
            ("x", "y")
        ])));
        assert!(!sel.matches(&labels(&[("role", "gateway")])));
        assert!(!sel.matches(&labels(&[("role", "gateway"), ("arch", "x86_64")])));
        assert!(!sel.matches(&labels(&[])));
    }

    #[test]
    fn operator_in() {
        let sel = expr("arch", SelectorOperator::In, &["aarch64", "armv7"]);
        assert!(sel.matches(&labels(&[("arch", "aarch64")])));
        assert!(sel.matches(&labels(&[("arch", "armv7")])));
        assert!(!sel.matches(&labels(&[("arch", "x86_64")])));
        assert!(
            !sel.matches(&labels(&[])),
            "In needs the label to be present"
        );
        assert!(!expr("arch", SelectorOperator::In, &[]).matches(&labels(&[("arch", "")])));
    }

    #[test]
    fn operator_not_in() {
        let sel = expr("arch", SelectorOperator::NotIn, &["x86_64"]);
        assert!(sel.matches(&labels(&[("arch", "aarch64")])));
        assert!(!sel.matches(&labels(&[("arch", "x86_64")])));
        assert!(sel.matches(&labels(&[])), "an absent label satisfies NotIn");
    }

    #[test]
    fn operator_exists() {
        let sel = expr("gpu", SelectorOperator::Exists, &[]);
        assert!(sel.matches(&labels(&[("gpu", "")])));
        assert!(sel.matches(&labels(&[("gpu", "a100")])));
        assert!(!sel.matches(&labels(&[("cpu", "x")])));
    }

    #[test]
    fn operator_does_not_exist() {
        let sel = expr("shoal/canary", SelectorOperator::DoesNotExist, &[]);
        assert!(sel.matches(&labels(&[("role", "gateway")])));
        assert!(!sel.matches(&labels(&[("shoal/canary", "false")])));
    }

    #[test]
    fn labels_and_expressions_must_all_hold() {
        let mut sel = expr("arch", SelectorOperator::In, &["aarch64"]);
        sel.match_labels = labels(&[("role", "gateway")]);
        sel.match_expressions.push(SelectorRequirement {
            key: "site".into(),
            operator: SelectorOperator::NotIn,
            values: vec!["lab".into()],
        });
        assert!(sel.matches(&labels(&[("role", "gateway"), ("arch", "aarch64")])));
        assert!(!sel.matches(&labels(&[
            ("role", "gateway"),
            ("arch", "aarch64"),
            ("site", "lab")
        ])));
        assert!(!sel.matches(&labels(&[("role", "db"), ("arch", "aarch64")])));
        assert!(!sel.matches(&labels(&[("role", "gateway"), ("arch", "x86_64")])));
    }

    #[test]
    fn select_keeps_input_order() {
        let node = |name: &str, pairs: &[(&str, &str)]| PlanNode {
            name: name.to_string(),
            labels: labels(pairs),
        };
        let nodes = [
            node("c", &[("role", "gateway")]),
            node("a", &[("role", "db")]),
            node("b", &[("role", "gateway")]),
        ];
        let sel = LabelSelector {
            match_labels: labels(&[("role", "gateway")]),
            match_expressions: vec![],
        };
        let names: Vec<&str> = sel.select(&nodes).iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["c", "b"]);
    }
}
