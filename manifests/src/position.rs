//! Maps field paths to line and column, from the YAML event stream.
//!
//! serde_yaml forgets positions once a document is a `Value`, so a second,
//! event-level pass with yaml-rust2 records where every key and value starts.
//! Errors found later (unknown fields, validation) are then placed exactly.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use crate::path::FieldPath;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl Pos {
    fn from_marker(mark: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Pos {
            line: mark.line(),
            column: mark.col() + 1,
        }
    }
}

/// Where one node of a document sits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Place {
    /// The key of a mapping entry, when the node is a mapping value.
    pub key: Option<Pos>,
    /// The value itself.
    pub value: Pos,
}

/// The places of every node of one document, by field path.
#[derive(Debug, Clone, Default)]
pub struct DocumentPositions {
    /// Where the document starts.
    pub start: Pos,
    places: HashMap<String, Place>,
}

impl DocumentPositions {
    /// The place of the node at `path`, or of its nearest ancestor that exists.
    pub fn find(&self, path: &FieldPath) -> Pos {
        self.place(path).map(|p| p.value).unwrap_or(self.start)
    }

    /// Where the key of the entry at `path` sits (for unknown fields), else its value.
    pub fn find_key(&self, path: &FieldPath) -> Pos {
        self.place(path)
            .map(|p| p.key.unwrap_or(p.value))
            .unwrap_or(self.start)
    }

    fn place(&self, path: &FieldPath) -> Option<Place> {
        let mut path = path.clone();
        loop {
            if let Some(place) = self.places.get(&path.to_string()) {
                return Some(*place);
            }
            if path.is_root() {
                return None;
            }
            path = path.parent();
        }
    }
}

enum Frame {
    Map {
        path: FieldPath,
        key: Option<(String, Pos)>,
    },
    Seq {
        path: FieldPath,
        next: usize,
    },
    /// A complex (non-scalar) mapping key: its contents have no field path.
    Skip {
        depth: usize,
    },
}

#[derive(Default)]
struct Indexer {
    docs: Vec<DocumentPositions>,
    stack: Vec<Frame>,
}

impl Indexer {
    fn current(&mut self) -> &mut DocumentPositions {
        if self.docs.is_empty() {
            self.docs.push(DocumentPositions::default());
        }
        self.docs.last_mut().expect("just pushed")
    }

    /// Records a node starting at `pos`, and returns its path (None inside a complex key),
    /// or takes a scalar as the pending key of a mapping.
    fn place_node(&mut self, scalar_key: Option<&str>, pos: Pos) -> Option<FieldPath> {
        let (path, key_pos) = match self.stack.last_mut() {
            None => (FieldPath::root(), None),
            Some(Frame::Skip { .. }) => return None,
            Some(Frame::Seq { path, next }) => {
                let child = path.index(*next);
                *next += 1;
                (child, None)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some((name, key_pos)) => (path.key(name), Some(key_pos)),
                None => match scalar_key {
                    Some(name) => {
                        *key = Some((name.to_string(), pos));
                        // yaml-rust2 marks a block mapping at its first ':'; the first key is
                        // where a person sees the mapping start.
                        let map_path = path.to_string();
                        if let Some(place) = self.current().places.get_mut(&map_path) {
                            if (pos.line, pos.column) < (place.value.line, place.value.column) {
                                place.value = pos;
                            }
                        }
                        return None;
                    }
                    None => {
                        // A mapping or sequence used as a key: skip it, then expect its value.
                        *key = Some(("?".to_string(), pos));
                        self.stack.push(Frame::Skip { depth: 0 });
                        return None;
                    }
                },
            },
        };
        self.current().places.insert(
            path.to_string(),
            Place {
                key: key_pos,
                value: pos,
            },
        );
        Some(path)
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let pos = Pos::from_marker(mark);
        match event {
            Event::DocumentStart => {
                self.docs.push(DocumentPositions {
                    start: pos,
                    places: HashMap::new(),
                });
                self.stack.clear();
            }
            Event::Scalar(value, ..) => {
                self.place_node(Some(&value), pos);
            }
            Event::Alias(_) => {
                self.place_node(Some("*alias"), pos);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                if let Some(Frame::Skip { depth }) = self.stack.last_mut() {
                    *depth += 1;
                    return;
                }
                let is_map = matches!(event, Event::MappingStart(..));
                if let Some(path) = self.place_node(None, pos) {
                    self.stack.push(if is_map {
                        Frame::Map { path, key: None }
                    } else {
                        Frame::Seq { path, next: 0 }
                    });
                }
            }
            Event::MappingEnd | Event::SequenceEnd => match self.stack.last_mut() {
                Some(Frame::Skip { depth }) if *depth > 0 => *depth -= 1,
                _ => {
                    self.stack.pop();
                }
            },
            Event::DocumentEnd | Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
}

/// Indexes every document of `text`. Returns None when yaml-rust2 cannot parse
/// it; the caller then reports positions from serde_yaml's own error instead.
pub fn index_documents(text: &str) -> Option<Vec<DocumentPositions>> {
    let mut indexer = Indexer::default();
    Parser::new_from_str(text).load(&mut indexer, true).ok()?;
    Some(indexer.docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_keys_values_and_items() {
        let text = "a: 1\nspec:\n  list:\n    - x\n    - {name: y, v: 2}\n---\nb: 2\n";
        let docs = index_documents(text).unwrap();
        assert_eq!(docs.len(), 2);
        let path = FieldPath::root().key("spec").key("list").index(1).key("v");
        assert_eq!(
            docs[0].find(&path),
            Pos {
                line: 5,
                column: 20
            }
        );
        assert_eq!(
            docs[0].find_key(&path),
            Pos {
                line: 5,
                column: 17
            }
        );
        let item = FieldPath::root().key("spec").key("list").index(0);
        assert_eq!(docs[0].find(&item), Pos { line: 4, column: 7 });
        // A missing field falls back to its nearest ancestor.
        let missing = FieldPath::root()
            .key("spec")
            .key("list")
            .index(1)
            .key("nope");
        assert_eq!(docs[0].find(&missing), Pos { line: 5, column: 7 });
        assert_eq!(
            docs[1].find(&FieldPath::root().key("b")),
            Pos { line: 7, column: 4 }
        );
    }
}
