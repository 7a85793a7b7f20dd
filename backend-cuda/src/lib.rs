//! # moe-router-cuda
//!
//! The CUDA backend of moe-router: fused routing kernels compiled at run time by NVRTC (no CUDA
//! toolkit at build time; the driver and NVRTC are loaded dynamically through cudarc).
//!
//! - [`CudaRouter`] implements [`moe_router_core::Router`] on device logits ([`DeviceLogits`]),
//!   returning [`DeviceIds`] and [`DeviceWeights`] that stay on the device until copied.
//! - Portable numerics reproduce the reference router bit for bit (same ids, same weight bits):
//!   the portable math of `core` is mirrored in CUDA C and compiled with `--fmad=false`.
//!   Native numerics use the fast intrinsics.
//! - Recording ([`moe_router_core::Router::record_ids`]) copies ids into pinned host memory on a
//!   side stream and hands them to the sink from a worker thread, without synchronising the
//!   routing stream. [`RouteBuffers`] give a CUDA-graph-friendly mode with preallocated outputs
//!   and a record buffer `[max_tokens, layers, K]` written by the route kernel itself.
//! - The backward ([`moe_router_core::Router::weights_vjp`]): the gradient on the logits
//!   ([`DeviceGrad`]) by one kernel (a warp per row), bit-identical to the reference in portable
//!   mode; with an aux term, a counting kernel first (the aux table is built on the host from
//!   the counts, as every backend does).
//! - Statistics: tokens per expert, aux losses and z-loss on the device; capacity dropping as a
//!   documented host step ([`Router::apply_capacity`](moe_router_core::Router::apply_capacity)).
//!
//! A machine without a CUDA driver, NVRTC or device gets [`RouteError::Unavailable`] from
//! [`CudaRouter::new`], never a panic.

#![allow(unsafe_code)]

mod backward;
mod buffers;
mod device;
pub mod external;
pub mod kernels;
mod record;
mod router;
mod stats;

pub use backward::{BackwardRowsVariant, backward_rows_variant, set_backward_rows_variant};
pub use buffers::{
    DeviceGrad, DeviceIds, DeviceLogits, DeviceWeights, GradBuffers, LogitsBuffer, LogitsView, RouteBuffers,
};
pub use device::{precompile, probe, probe_nvrtc};
pub use kernels::LogitsDtype;
pub use record::RecordStats;
pub use router::{CudaRouter, KernelChoice, MAX_EXPERTS, MAX_TOP_K};
pub use stats::AuxBatchStats;

pub use cudarc;
pub use moe_router_core::RouteError;
