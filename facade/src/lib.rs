//! # moe-router
//!
//! Mixture-of-Experts top-k routing with router replay. This facade re-exports
//! [`moe_router_core`] (config, traits, reference router, replay, traces) and the backends
//! enabled by cargo features: `cpu` (default).

pub use moe_router_core::*;

/// The CPU backend (feature `cpu`).
#[cfg(feature = "cpu")]
pub use moe_router_cpu as cpu;

/// The wgpu backend (feature `wgpu`): WGSL compute kernels on Vulkan / GL adapters.
#[cfg(feature = "wgpu")]
pub use moe_router_wgpu as wgpu;

/// The CUDA backend (feature `cuda`): NVRTC-compiled kernels through cudarc (driver and NVRTC
/// loaded at run time; a machine without them gets a typed "unavailable" error).
#[cfg(feature = "cuda")]
pub use moe_router_cuda as cuda;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
