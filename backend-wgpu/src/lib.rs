//! # moe-router-wgpu
//!
//! The wgpu backend of moe-router: Mixture-of-Experts top-k routing in WGSL compute shaders on
//! any Vulkan or GL adapter (NVIDIA, AMD, Intel GPUs, and Mesa's llvmpipe / lavapipe software
//! rasterisers used in CI).
//!
//! - [`WgpuRouter`] implements [`moe_router_core::Router`] for logits on the device
//!   ([`DeviceLogits`], a view of your buffer or of a [`LogitsBuffer`] uploaded by
//!   [`WgpuRouter::upload_logits`]), returning ids and weights in device buffers
//!   ([`DeviceIds`], [`DeviceWeights`]);
//!   [`Router::route_host`](moe_router_core::Router::route_host) and
//!   [`Router::weights_host`](moe_router_core::Router::weights_host) are host-in, host-out
//!   conveniences. Launch-only routing into preallocated [`RouteBuffers`]:
//!   [`WgpuRouter::enqueue_route`], [`WgpuRouter::enqueue_replay`], then
//!   [`WgpuRouter::take_status`]. The names are the CUDA backend's.
//! - **Portable numerics** (the default) are bit-identical to the reference router (ids and
//!   weight bits), also on drivers that fuse `a·b + c` into FMA: the WGSL mirror of
//!   `moe_router_core::math` passes every product that feeds an add through an XOR with an
//!   opaque zero read from a uniform, so no compiler can fuse or regroup the arithmetic (see
//!   `shaders/math.wgsl`).
//! - Kernels ([`KernelPath`]), specialised per routing rule by generated WGSL constants: row
//!   kernels, where the lanes of a subgroup (adapters with subgroup operations, feature-detected
//!   and probed at run time: [`WgpuContext::subgroup_lanes`]) or of a workgroup (workgroup
//!   memory and barriers) route one row together with coalesced loads and exact lane
//!   reductions; and one invocation per token (no subgroup operations, no workgroup memory).
//!   Every path gives the same bits. Pipelines are compiled once per device ([`WgpuContext`])
//!   and shared by routers; batches larger than the device's storage binding limit are split.
//! - Adapter choice: the best available (discrete GPU first), overridable by [`ENV_BACKEND`] /
//!   [`ENV_ADAPTER`] or [`AdapterOptions`]. No adapter → [`moe_router_core::RouteError::Unavailable`].

mod buffers;
mod context;
mod kernels;
mod router;
pub mod selftest;
pub mod stats;

pub use buffers::{DeviceGrad, DeviceIds, DeviceLogits, DeviceWeights, LogitsBuffer, RouteBuffers};
pub use context::{AdapterDescription, AdapterOptions, ENV_ADAPTER, ENV_BACKEND, WgpuContext};
pub use moe_router_core::LogitsDtype;
pub use router::{BackwardBuffers, ENV_KERNEL, KernelPath, SMALL_BATCH_ROWS, WgpuRouter};

/// The `wgpu` crate this backend is built on (for callers that build their own buffers and
/// command encoders).
pub use wgpu;
