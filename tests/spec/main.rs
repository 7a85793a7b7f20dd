//! The specification of moe-router, one module per area.

#![allow(missing_docs)]

#[allow(dead_code)]
mod conformance;
mod cpu;
mod golden;
mod import;
mod math;
mod routing;
#[cfg(feature = "wgpu")]
mod wgpu;
