//! The shared conformance suite lives in the facade (`moe_router::conformance`, feature
//! `conformance`) so that a third-party backend can run it too; every backend of this workspace
//! runs it from its own spec file (cpu.rs, wgpu.rs, cuda.rs).

pub use moe_router::conformance::*;
