//! nodelet binary.
fn main() {}
