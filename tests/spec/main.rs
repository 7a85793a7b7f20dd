//! The specification of moe-router, one module per area.

#![allow(missing_docs)]

mod bad_input;
mod capacity_stats;
mod cli_route;
mod cli_trace;
#[allow(dead_code)]
mod conformance;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod demo;
mod golden;
mod import;
mod interop;
mod math;
mod replay;
mod routing;
mod trace;
#[cfg(feature = "wgpu")]
mod wgpu;
