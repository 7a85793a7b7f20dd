//! # moe-router
//!
//! Mixture-of-Experts top-k routing with router replay. This crate is the one door to the
//! project: it re-exports the semantics of [`moe_router_core`] (config, traits, reference router,
//! replay decorator, statistics), the traces of [`moe_router_trace`] (as [`trace`], [`policy`],
//! [`interop`], [`npy`], [`metrics`]), the CPU backend and those enabled by
//! cargo features (`cuda`, `wgpu`), and [`backend`], which picks one of them at run time by name
//! ([`AnyRouter`], [`BackendKind`]; `auto` = CUDA, then wgpu, then CPU). With the feature
//! `conformance`, `conformance` is the suite every backend (a third-party one too) must pass.
//!
//! ```
//! use moe_router::{AnyRouter, BackendKind, LogitsRef, Router, RouterConfig};
//! use ndarray::array;
//!
//! let cfg = RouterConfig::builder(4, 2).build().unwrap();
//! let router = AnyRouter::new(BackendKind::Cpu, cfg).unwrap();
//! let logits = array![[0.1f32, 2.0, -1.0, 1.5]];
//! let (ids, _weights) = router.route_host(&LogitsRef::F32(logits.view())).unwrap();
//! assert_eq!(ids.row(0).to_vec(), vec![1, 3]);
//! ```

pub mod backend;
#[cfg(feature = "conformance")]
pub mod conformance;

pub use backend::{AnyRouter, BackendKind};
pub use moe_router_core::*;
pub use moe_router_trace::{interop, metrics, npy, policy, trace};

/// The CPU backend (always compiled in).
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
