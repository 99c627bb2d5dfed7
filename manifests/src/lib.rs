//! shoal's manifest language: types, parsing with positions, validation, schema, selectors and wave plans.
//!
//! This crate is pure: no I/O beyond reading the files it is asked to parse,
//! no async runtime, no storage. The apiserver, the nodelet and the CLI all
//! share it, so a manifest means the same thing everywhere.

pub mod error;
pub mod parse;
pub mod path;
pub mod plan;
pub mod position;
pub mod schema;
pub mod selector;
pub mod types;
pub mod validate;
pub mod wire;

pub use error::{Diagnostic, FieldError};
pub use parse::{load_paths, parse_str, Loaded, Parsed};
pub use types::*;
