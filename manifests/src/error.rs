//! Diagnostics: an error a person can act on, with file, line, column, field path and hint.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One problem found in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Diagnostic {
    /// The file as the user named it (`<stdin>` for standard input).
    pub file: String,
    /// 1-based line; 0 when unknown.
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// The field path (`spec.components[1].artifact.sha256`); empty for the document as a whole.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// What would be valid, or what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Prefix of every diagnostic about unreadable YAML or JSON.
pub const SYNTAX_PREFIX: &str = "invalid YAML: ";

impl Diagnostic {
    /// True when the text could not be read at all (as opposed to read and found invalid).
    pub fn is_syntax(&self) -> bool {
        self.message.starts_with(SYNTAX_PREFIX)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

/// A problem found by validation, before it is given a place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where, as a field path.
    pub path: crate::path::FieldPath,
    /// What is wrong.
    pub message: String,
    /// What would be valid.
    pub hint: Option<String>,
}

impl FieldError {
    /// An error without a hint.
    pub fn new(path: crate::path::FieldPath, message: impl Into<String>) -> Self {
        FieldError {
            path,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds what would be valid.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_root() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}
