//! # moe-router-trace
//!
//! Everything about routing *traces*, on top of the semantics in [`moe_router_core`]:
//!
//! - [`trace`]: the trace model ([`Trace`], [`TraceHeader`]), the `.mrt` file format
//!   (append-only checksummed chunks, an index, memory-mapped reads, optional zstd), the
//!   background [`TraceWriter`], per-rank shards and their manifest;
//! - [`policy`]: the [`ReplayPolicy`](moe_router_core::ReplayPolicy) implementations that record
//!   into memory or a streaming file and replay from memory or a trace file;
//! - [`interop`]: importers and exporters for the formats the inference engines and RL stacks
//!   write (vLLM `.npy`, SGLang, NeMo-RL `nrlre1`, Fireworks `r3v1`, prime-rl, safetensors);
//! - [`npy`]: a NumPy `.npy` reader and writer with byte-offset errors;
//! - [`metrics`]: comparing two traces (router and token mismatch), load statistics and
//!   validation.
//!
//! Core does not depend on this crate; the facade `moe-router` re-exports it.

pub mod interop;
pub mod metrics;
pub mod npy;
pub mod policy;
pub mod trace;

pub use policy::{Record, Replay, ReplayFromFile};
pub use trace::{Trace, TraceError, TraceFile, TraceHeader, TraceWriter};
