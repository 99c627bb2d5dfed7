//! The shoal node agent.
