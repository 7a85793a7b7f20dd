//! Replay policies.
