//! The specification of moe-router, one module per area.

#![allow(missing_docs)]

mod bad_input;
mod capacity_stats;
mod cli_route;
#[allow(dead_code)]
mod conformance;
mod cpu;
mod demo;
#[cfg(feature = "cuda")]
mod cuda;
mod golden;
mod import;
mod interop;
mod cli_trace;
mod math;
mod routing;
#[cfg(feature = "wgpu")]
mod wgpu;
mod replay;
mod trace;
