//! # moe-router-cpu
//!
//! The CPU backend: ndarray views in, ndarray arrays out, rows processed in parallel with rayon.
//! Logits may be f32, bf16, f16 or f64; the math is the config's ([`moe_router_core::math`]):
//! portable mode is bit-identical to the [`ReferenceRouter`](moe_router_core::ReferenceRouter)
//! and so to every other backend.
//!
//! The per-row work is allocation-free: widen into a thread-local buffer, compute keys only where
//! they are needed (softmax-after selects on the logits and exponentiates K values), select by
//! threshold insertion in ascending expert order (which yields "ties → lower id" for free), and
//! weigh with the same operation order as the reference.
//!
//! ```
//! use moe_router_core::{CallSite, LogitsRef, Router, RouterConfig};
//! use moe_router_cpu::CpuRouter;
//! use ndarray::Array2;
//!
//! let router = CpuRouter::new(RouterConfig::builder(128, 8).build().unwrap());
//! let logits = Array2::<f32>::from_shape_fn((4, 128), |(t, e)| ((t * 31 + e * 17) % 128) as f32 * 0.01);
//! let out = router.route(&LogitsRef::F32(logits.view()), &CallSite::layer(0)).unwrap();
//! assert_eq!(out.ids.dim(), (4, 8));
//! ```

mod backward;
mod fast;
mod kernel;
mod simd;
#[cfg(test)]
mod tests;

pub use kernel::CpuRouter;
