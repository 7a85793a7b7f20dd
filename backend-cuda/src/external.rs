//! Routing on device memory owned by someone else (a PyTorch, CuPy or JAX tensor), on a stream
//! owned by someone else (e.g. torch's current stream): [`ExternalLaunch`].
//!
//! The caller hands raw device addresses (from DLPack or `tensor.data_ptr()`) and a raw
//! `CUstream`; the route or replay kernel is enqueued on that stream, so it is ordered after
//! the work the caller queued before it and before the work queued after it, with no copy and no
//! synchronisation. Errors in the data (NaN or +∞ logits, all-masked rows, invalid replay ids)
//! are latched in a caller-owned u64 status word, as with [`crate::RouteBuffers`], and decoded by
//! [`ExternalLaunch::read_status`]. The kernels and the portable numerics are those of
//! [`CudaRouter`]: results are bit-identical to it.

use crate::device::{BACKEND, Device, dev_err};
use crate::kernels::{
    LogitsDtype, Params, Part, RouterVariant, ScoreKind, TILE_KMAX, TILE_WARPS, decode_status, row_launch, tile_slot,
    tile_smem,
};
use crate::router::CudaRouter;
use cudarc::driver::{CudaSlice, DevicePtr, result, sys};
use moe_router_core::{Numerics, RouteError, Router, RouterConfig};
use std::ffi::c_void;
use std::sync::Arc;

/// Batches with at least this many rows use the tile kernels (as [`CudaRouter`] does).
const TILE_MIN_ROWS: usize = 2048;
/// With at most this many experts the tile kernels win at every T.
const TILE_MAX_SMALL_E: usize = 32;

/// Caller-owned device logits `[rows, cols]`, rows `ld` elements apart.
#[derive(Debug, Clone, Copy)]
pub struct RawLogits {
    /// Device address of element `[0, 0]`.
    pub ptr: u64,
    /// Element type.
    pub dtype: LogitsDtype,
    /// Rows T.
    pub rows: usize,
    /// Columns E.
    pub cols: usize,
    /// Row stride in elements (`>= cols`).
    pub ld: usize,
}

/// What an external launch computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalOp {
    /// Select K experts and weigh them: writes ids and weights.
    Route,
    /// Weigh the given ids (replay): reads ids, writes weights.
    Replay,
}

/// Launches the router's kernels on caller-owned memory and a caller-owned stream (see the
/// module docs). Create it from a [`CudaRouter`] (same device, config and kernels).
#[derive(Debug)]
pub struct ExternalLaunch {
    dev: Arc<Device>,
    cfg: RouterConfig,
    base: Params,
    bias: Option<CudaSlice<f32>>,
}

impl ExternalLaunch {
    /// Launches for `router`'s config on `router`'s device. The selection bias (if any) is
    /// uploaded once here (and waited for).
    pub fn new(router: &CudaRouter) -> Result<Self, RouteError> {
        let cfg = router.config().clone();
        cfg.check_ready()?;
        let dev = router.device().clone();
        let bias = match cfg.expert_bias() {
            Some(b) => {
                let s = dev.stream.clone_htod(b).map_err(dev_err)?;
                dev.stream.synchronize().map_err(dev_err)?;
                Some(s)
            }
            None => None,
        };
        let base = crate::kernels::config_params(&cfg);
        Ok(ExternalLaunch { dev, cfg, base, bias })
    }

    /// The routing rule.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// The CUDA device ordinal.
    pub fn ordinal(&self) -> usize {
        self.dev.ctx.ordinal()
    }

    /// Compiles (or fetches) the kernels of `dtype` now, so that the first launch does not pay
    /// NVRTC's compile time.
    pub fn warm_up(&self, dtype: LogitsDtype) -> Result<(), RouteError> {
        self.dev.router_kernels(self.variant(dtype, Part::Row))?;
        if let Some(ki) = tile_slot(&self.base, false) {
            self.dev
                .router_kernels(self.variant(dtype, Part::Tile(TILE_KMAX[ki])))?;
        }
        Ok(())
    }

    fn variant(&self, dtype: LogitsDtype, part: Part) -> RouterVariant {
        RouterVariant {
            part,
            dtype,
            portable: self.cfg.numerics() == Numerics::Portable,
            score: ScoreKind::of(self.cfg.score(), self.cfg.softmax_position()),
        }
    }

    /// Enqueues `op` on `stream`: logits from `logits`, ids at `ids` (`[rows, K]` u32 / int32,
    /// output of [`ExternalOp::Route`], input of [`ExternalOp::Replay`]), weights at `weights`
    /// (`[rows, K]` f32, output), errors latched into the u64 at `status` (which must hold 0, or
    /// an earlier latched error, when the kernel runs). Returns once the launch is enqueued.
    ///
    /// # Safety
    ///
    /// Every address must point to live device memory of this router's device (context) with at
    /// least the extent given (logits `(rows - 1) * ld + cols` elements of `dtype`; ids and
    /// weights `rows * K` elements; one u64 status word), and stay alive until `stream` has
    /// passed the launch. `stream` must be a valid `CUstream` of the device's primary context
    /// (0: the legacy default stream).
    pub unsafe fn enqueue(
        &self,
        op: ExternalOp,
        logits: RawLogits,
        ids: u64,
        weights: u64,
        status: u64,
        stream: u64,
    ) -> Result<(), RouteError> {
        if logits.cols != self.cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: self.cfg.num_experts(),
                rows: logits.rows,
                cols: logits.cols,
            });
        }
        if logits.ld < logits.cols {
            return Err(RouteError::RowRange {
                start: 0,
                end: logits.rows,
                rows: logits.rows,
                stride: logits.ld,
                cols: logits.cols,
            });
        }
        if logits.rows == 0 {
            return Ok(());
        }
        let replay = op == ExternalOp::Replay;
        let lb = logits.dtype.size() as u64;
        let aligned = logits.ptr.is_multiple_of(16)
            && (logits.cols as u64 * lb).is_multiple_of(16)
            && (logits.ld as u64 * lb).is_multiple_of(16);
        let big = logits.rows >= TILE_MIN_ROWS || logits.cols <= TILE_MAX_SMALL_E;
        let tile = match tile_slot(&self.base, replay) {
            Some(ki) if big && aligned => Some(ki),
            _ => None,
        };
        let part = match tile {
            Some(ki) => Part::Tile(TILE_KMAX[ki]),
            None => Part::Row,
        };
        self.dev.ctx.bind_to_thread().map_err(dev_err)?;
        let kern = self.dev.router_kernels(self.variant(logits.dtype, part))?;
        let f = if replay { &kern.replay } else { &kern.route };
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.device_ptr(&self.dev.stream).0)
            .unwrap_or(0);
        let mut p = Params {
            logits: logits.ptr,
            bias,
            ids,
            weights,
            status,
            t: logits.rows as i64,
            ld: logits.ld as i64,
            ..self.base
        };
        let (grid, block, smem) = match tile {
            Some(ki) => (
                logits.rows.div_ceil(TILE_WARPS * 32),
                TILE_WARPS * 32,
                tile_smem(&p, ki, replay),
            ),
            None => {
                let (block, smem) = row_launch(&p);
                (logits.rows.min(1 << 30), block, smem)
            }
        };
        if smem > self.dev.smem_optin {
            return Err(RouteError::unsupported(
                BACKEND,
                format!(
                    "this config needs {smem} bytes of shared memory per block, the device allows {}",
                    self.dev.smem_optin
                ),
            ));
        }
        let mut args = [&mut p as *mut Params as *mut c_void];
        // SAFETY: the kernel takes one `Params` by value (layout checked in kernels.rs); the
        // caller guarantees every address in it (logits, ids, weights, status) is live device
        // memory of the sizes the kernel indexes until `stream` passes the launch; the bias is
        // owned by `self`, uploaded and synchronised in `new`. `stream` is the caller's valid
        // stream of this (primary) context, bound to the thread above.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (grid as u32, 1, 1),
                (block as u32, 1, 1),
                smem as u32,
                stream as sys::CUstream,
                &mut args,
            )
        }
        .map_err(dev_err)
    }

    /// Waits for `stream`, reads the status word at `status`, clears it (on `stream`) and
    /// returns the first error latched there since the last call, decoded as the reference
    /// router names it. `ids` (the replay ids `[rows, K]`, when the launch was a replay) lets a
    /// replay-id error name the offending ids.
    ///
    /// # Safety
    ///
    /// `status` (one u64) and `ids` (when given, as many rows as the error can name) must be
    /// live device memory of this device; `stream` a valid `CUstream` of its primary context.
    pub unsafe fn read_status(&self, status: u64, ids: Option<u64>, stream: u64) -> Result<(), RouteError> {
        self.dev.ctx.bind_to_thread().map_err(dev_err)?;
        let s = stream as sys::CUstream;
        let mut word = [0u64; 1];
        // SAFETY: `status` is a live u64 on this device (caller); the copy is ordered on `s`
        // after the kernels that write it and waited for before `word` is read.
        unsafe {
            result::memcpy_dtoh_async(&mut word, status, s).map_err(dev_err)?;
            result::stream::synchronize(s).map_err(dev_err)?;
        }
        let k = self.cfg.top_k();
        let r = decode_status(word[0], self.cfg.num_experts(), k, |row| {
            let base = ids?;
            let mut v = vec![0u32; k];
            // SAFETY: the replay ids `[rows, K]` are live (caller) and `row` is one of their
            // rows (the kernel latched it); the stream was synchronised above.
            unsafe { result::memcpy_dtoh_sync(&mut v, base + (row * k * 4) as u64) }.ok()?;
            Some(v)
        });
        if word[0] != 0 {
            // SAFETY: `status` is a live u64 of this device; the memset is ordered on `s`.
            unsafe { result::memset_d8_async(status, 0, 8, s) }.map_err(dev_err)?;
        }
        r
    }
}
