//! Trace benchmarks.
fn main() {}
