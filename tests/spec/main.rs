//! The specification of moe-router, one module per area.

#![allow(missing_docs)]

mod backward;
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
mod families;
mod golden;
mod import;
mod interop;
mod math;
mod replay;
mod replay_features;
mod routing;
mod trace;
#[cfg(feature = "wgpu")]
mod wgpu;

/// Without the `cuda` feature the CUDA specification is not compiled: say so, visibly.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_backend_spec_is_skipped_without_the_cuda_feature() {
    println!(
        "skipped: the CUDA backend's spec tests need `--features cuda` and a GPU (run them on the GPU machine: tests/spec/cuda.rs)"
    );
}
