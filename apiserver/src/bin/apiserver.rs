//! Placeholder until the apiserver issue lands.
fn main() {}
