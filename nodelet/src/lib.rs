//! The shoal node agent: reconciles services, drivers and packages against the
//! assigned DesiredStates, probes health, and reverts by itself on regression.

pub mod agent;
pub mod artifact;
pub mod backend;
pub mod client;
pub mod command;
pub mod host;
pub mod install;
pub mod journal;
pub mod launcher;
pub mod lifecycle;
pub mod plan;
pub mod probe;
pub mod selfupdate;
pub mod supervisor;
