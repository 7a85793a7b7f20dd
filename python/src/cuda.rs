//! CUDA tensors in and out without a copy: `_native.CudaLaunch` enqueues the router's kernels
//! on device memory owned by torch (or any DLPack producer) and on torch's current stream,
//! through [`moe_router::cuda::external::ExternalLaunch`].
//!
//! The Python layer (`moe_router/_cuda.py`) allocates the outputs with torch on the same device
//! and stream, passes the raw addresses and the stream handle, and keeps every tensor alive
//! across the call; the kernels are then ordered on that stream like any torch kernel.
#![allow(unsafe_code)]

use crate::config::PyRouterConfig;
use crate::{Error, detached, guarded};
use moe_router::cuda::CudaRouter;
use moe_router::cuda::LogitsDtype;
use moe_router::cuda::external::{ExternalLaunch, ExternalOp, RawLogits};
use pyo3::prelude::*;

fn dtype_named(s: &str) -> Result<LogitsDtype, Error> {
    match s {
        "float32" => Ok(LogitsDtype::F32),
        "bfloat16" => Ok(LogitsDtype::Bf16),
        "float16" => Ok(LogitsDtype::F16),
        other => Err(Error::Route(format!(
            "CUDA logits must be float32, bfloat16 or float16 (got {other}); convert with .float()"
        ))),
    }
}

/// Kernel launches of one routing rule on one CUDA device, on caller-owned memory and streams.
#[pyclass(name = "CudaLaunch", module = "moe_router._native", frozen)]
pub struct PyCudaLaunch {
    pub(crate) launch: ExternalLaunch,
}

#[pymethods]
impl PyCudaLaunch {
    /// Launches for `config` (with the selection `bias`, if given) on CUDA device `ordinal`.
    /// Raises :class:`RouteError` when CUDA is unavailable, with the reason.
    #[new]
    #[pyo3(signature = (config, ordinal, bias = None))]
    fn new(py: Python<'_>, config: &PyRouterConfig, ordinal: usize, bias: Option<Vec<f32>>) -> PyResult<Self> {
        let mut cfg = config.cfg.clone();
        if let Some(b) = bias {
            guarded(|| Ok(cfg.set_expert_bias(b)?))?;
        }
        detached(py, move || {
            let r = CudaRouter::on_device(cfg, ordinal)?;
            Ok(PyCudaLaunch {
                launch: ExternalLaunch::new(&r)?,
            })
        })
    }

    /// The CUDA device ordinal.
    #[getter]
    fn ordinal(&self) -> usize {
        self.launch.ordinal()
    }

    /// Compiles the kernels for logits of `dtype` ("float32", "bfloat16", "float16").
    fn warm_up(&self, py: Python<'_>, dtype: &str) -> PyResult<()> {
        let d = dtype_named(dtype)?;
        detached(py, || Ok(self.launch.warm_up(d)?))
    }

    /// Enqueues `op` ("route" or "replay") on `stream`. Addresses are those of live tensors of
    /// this device that the caller keeps alive until the stream has passed the launch (the
    /// Python layer holds them; torch's caching allocator orders reuse on the same stream).
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        py: Python<'_>,
        op: &str,
        logits: u64,
        dtype: &str,
        rows: usize,
        cols: usize,
        ld: usize,
        ids: u64,
        weights: u64,
        status: u64,
        stream: u64,
    ) -> PyResult<()> {
        let op = match op {
            "route" => ExternalOp::Route,
            "replay" => ExternalOp::Replay,
            other => return Err(Error::Value(format!("unknown op {other:?}")).into()),
        };
        let raw = RawLogits {
            ptr: logits,
            dtype: dtype_named(dtype)?,
            rows,
            cols,
            ld,
        };
        detached(py, || {
            // SAFETY: the addresses come from live torch tensors on this device that the Python
            // caller (moe_router/_cuda.py) holds for the duration of the call, allocated by
            // torch on the stream passed here, so any reuse of their memory is ordered after
            // this launch; `stream` is torch's current stream of that device.
            unsafe { Ok(self.launch.enqueue(op, raw, ids, weights, status, stream)?) }
        })
    }

    /// Enqueues the backward (no aux-loss term) on `stream`: `dz` `[rows, E]` f32 of
    /// `Σ grad∘w + grad_z_loss·zloss`. Same contract on the addresses as `enqueue`.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_backward(
        &self,
        py: Python<'_>,
        logits: u64,
        dtype: &str,
        rows: usize,
        cols: usize,
        ld: usize,
        ids: u64,
        grad: u64,
        dz: u64,
        status: u64,
        grad_z_loss: f64,
        stream: u64,
    ) -> PyResult<()> {
        let raw = RawLogits {
            ptr: logits,
            dtype: dtype_named(dtype)?,
            rows,
            cols,
            ld,
        };
        detached(py, || {
            // SAFETY: as in `enqueue`: live torch tensors of this device (logits, int32 ids,
            // float32 grad, float32 dz, the status word) held by the Python caller, allocated on
            // `stream`, torch's current stream.
            unsafe {
                Ok(self
                    .launch
                    .enqueue_backward(raw, ids, grad, dz, status, grad_z_loss, stream)?)
            }
        })
    }

    /// Benchmark helper (python/benches): enqueues `op` `iters` times from Rust on `stream` and
    /// returns ``(host_ns, wall_ns)`` per launch: the time until the loop of launches returned
    /// (what the caller pays to enqueue) and until the stream had run them all (one wait at
    /// the end). With `sync_each` every launch is waited for (the synchronous latency).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (op, logits, dtype, rows, cols, ld, ids, weights, status, stream, iters, sync_each = false))]
    fn bench_ns(
        &self,
        py: Python<'_>,
        op: &str,
        logits: u64,
        dtype: &str,
        rows: usize,
        cols: usize,
        ld: usize,
        ids: u64,
        weights: u64,
        status: u64,
        stream: u64,
        iters: usize,
        sync_each: bool,
    ) -> PyResult<(f64, f64)> {
        use moe_router::cuda::cudarc::driver::{result, sys};
        let op = match op {
            "route" => ExternalOp::Route,
            "replay" => ExternalOp::Replay,
            other => return Err(Error::Value(format!("unknown op {other:?}")).into()),
        };
        let raw = RawLogits {
            ptr: logits,
            dtype: dtype_named(dtype)?,
            rows,
            cols,
            ld,
        };
        let n = iters.max(1);
        detached(py, || {
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                // SAFETY: as in `enqueue`: live tensors of this device held by the caller.
                unsafe { self.launch.enqueue(op, raw, ids, weights, status, stream)? };
                if sync_each {
                    // SAFETY: `stream` is a valid stream of this device's primary context, bound
                    // to this thread by the launch above.
                    unsafe { result::stream::synchronize(stream as sys::CUstream) }
                        .map_err(|e| Error::Route(format!("CUDA stream synchronize: {e}")))?;
                }
            }
            let host = t0.elapsed();
            // SAFETY: `status` is the caller's live status word; waits for the stream.
            unsafe { self.launch.read_status(status, None, stream)? };
            let wall = t0.elapsed();
            Ok((host.as_nanos() as f64 / n as f64, wall.as_nanos() as f64 / n as f64))
        })
    }

    /// Waits for `stream`, then raises the first error latched in the status word since the
    /// last check (and clears it).
    #[pyo3(signature = (status, stream, ids = None))]
    fn read_status(&self, py: Python<'_>, status: u64, stream: u64, ids: Option<u64>) -> PyResult<()> {
        detached(py, || {
            // SAFETY: `status` is the router's live int64 status tensor on this device and
            // `ids` (when given) live replay ids, both held by the Python caller.
            unsafe { Ok(self.launch.read_status(status, ids, stream)?) }
        })
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCudaLaunch>()?;
    Ok(())
}
