//! shoal's control plane: the store, the HTTP API, the rollout controller, git sync, and the `shoal` CLI.

pub mod cli;
pub mod command;
pub mod gitsync;
pub mod install;
pub mod rollout;
pub mod server;
pub mod store;
