//! The trace CLI contract: convert / inspect / validate / diff.
