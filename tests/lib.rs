//! Specification tests live in `spec/`; this library is empty.
