//! The shoal control plane and CLI.
