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
    BWD_WARPS, BackwardVariant, BwdKernel, BwdParams, LogitsDtype, Params, ScoreKind, bwd_launch, bwd_layout,
    bwd_rows_fit, bwd_rows_grid, decode_status,
};
use crate::router::CudaRouter;
use cudarc::driver::{result, sys};
use moe_router_core::backward::{BackwardPlan, LossGrads};
use moe_router_core::{Numerics, RouteError, Router, RouterConfig, ScoreFunction, SoftmaxPosition};
use std::ffi::c_void;
use std::sync::Arc;

/// Row counts whose kernels `warm_up` compiles: a decode batch (warp kernels) and a large one.
const WARM_ROWS: [usize; 2] = [1, 1 << 16];

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
    /// A router of the same config and device: its plans (warp, tile or row kernels) and
    /// launches, aimed at the caller's memory and stream.
    router: CudaRouter,
}

impl ExternalLaunch {
    /// Launches for `router`'s config on `router`'s device. The selection bias (if any) is
    /// uploaded once here (and waited for); a rule that expects one and has none can still run
    /// the backward ([`ExternalLaunch::enqueue_backward`]).
    pub fn new(router: &CudaRouter) -> Result<Self, RouteError> {
        let cfg = router.config().clone();
        let dev = router.device().clone();
        let own = CudaRouter::on_device(cfg.clone(), dev.ctx.ordinal())?;
        // The bias upload is ordered on the router's stream; launches on other streams read it.
        own.stream().synchronize().map_err(dev_err)?;
        let base = crate::kernels::config_params(&cfg);
        Ok(ExternalLaunch {
            dev,
            cfg,
            base,
            router: own,
        })
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
        for rows in WARM_ROWS {
            self.router.warm_up_for(rows, dtype)?;
        }
        Ok(())
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
        // As the other routers: a rule that expects a selection bias neither routes nor replays
        // until it is installed (the backward does not use it).
        self.cfg.check_ready()?;
        if logits.rows == 0 {
            return Ok(());
        }
        // SAFETY: forwarded from the caller (this function's contract is `enqueue_on`'s).
        unsafe {
            self.router.enqueue_on(
                logits.ptr,
                logits.dtype,
                logits.rows,
                logits.cols,
                logits.ld,
                (ids, weights, status),
                op == ExternalOp::Replay,
                stream as sys::CUstream,
            )
        }
    }

    /// Enqueues the backward (DESIGN §2b) on `stream`: the gradient `dz` (`[rows, E]` f32,
    /// output, rows `E` elements apart) of `Σ grad∘w + grad_z_loss·zloss` for the weights `w` of
    /// `ids` (`[rows, K]` u32 / int32) on `logits`, `grad` being `[rows, K]` f32. The aux-loss
    /// term needs its token counts on the host first and is not taken here (use
    /// [`Router::weights_vjp`]). Errors are latched into `status` as for [`ExternalLaunch::enqueue`].
    ///
    /// # Safety
    ///
    /// As for [`ExternalLaunch::enqueue`], with `grad` (`rows * K` f32) and `dz` (`rows * E` f32)
    /// live device memory of this device until `stream` has passed the launch.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn enqueue_backward(
        &self,
        logits: RawLogits,
        ids: u64,
        grad: u64,
        dz: u64,
        status: u64,
        grad_z_loss: f64,
        stream: u64,
    ) -> Result<(), RouteError> {
        let cfg = &self.cfg;
        let (t, e) = (logits.rows, logits.cols);
        if e != cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: cfg.num_experts(),
                rows: t,
                cols: e,
            });
        }
        if logits.ld < e {
            return Err(RouteError::RowRange {
                start: 0,
                end: t,
                rows: t,
                stride: logits.ld,
                cols: e,
            });
        }
        let losses = LossGrads::default().z_loss(grad_z_loss);
        losses.check(t, e)?;
        if t == 0 {
            return Ok(());
        }
        let plan = BackwardPlan::from_counts(cfg, t, &losses, &[])?;
        self.dev.ctx.bind_to_thread().map_err(dev_err)?;
        let variant = BackwardVariant {
            dtype: logits.dtype,
            portable: cfg.numerics() == Numerics::Portable,
            score: ScoreKind::of(cfg.score(), cfg.softmax_position()),
        };
        let kern = self.dev.backward_kernels(variant)?;
        let lb = logits.dtype.size() as u64;
        let vec = logits.ptr.is_multiple_of(16)
            && (e as u64 * lb).is_multiple_of(16)
            && (logits.ld as u64 * lb).is_multiple_of(16);
        let mut p = BwdParams {
            logits: logits.ptr,
            ids,
            grad,
            dz,
            status,
            t: t as i64,
            ld: logits.ld as i64,
            e: e as i32,
            k: cfg.top_k() as i32,
            norm: self.base.norm,
            norm_param: self.base.norm_param,
            scale: self.base.scale,
            vec: i32::from(vec),
            zf: plan.z_factor_f32(),
            ..BwdParams::default()
        };
        // As `CudaRouter`'s backward without the aux term: the dense kernel when the softmax
        // covers every expert (softmax before top-K, or the z-loss), else the sparse one.
        let before = cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
        let softmax = before || p.zf != 0.0;
        let (f, kernel) = if softmax {
            (&kern.grad_dense, BwdKernel::Dense)
        } else if bwd_rows_fit(&p, p.dz.is_multiple_of(16)) {
            (kern.grad_rows(p.k, p.e), BwdKernel::Rows)
        } else {
            (&kern.grad_sparse, BwdKernel::Sparse)
        };
        let per_warp = bwd_layout(&mut p, kernel, softmax, false);
        let Some((warps, smem)) = bwd_launch(per_warp, self.dev.smem_optin) else {
            return Err(RouteError::unsupported(
                BACKEND,
                format!(
                    "the backward needs {per_warp} bytes of shared memory per warp, the device allows {} per block",
                    self.dev.smem_optin
                ),
            ));
        };
        let grid = if kernel == BwdKernel::Rows {
            ((bwd_rows_grid(t), 1, 1), ((BWD_WARPS * 32) as u32, 1, 1), 0u32)
        } else {
            (
                (t.div_ceil(warps).min(1 << 30) as u32, 1, 1),
                ((warps * 32) as u32, 1, 1),
                smem as u32,
            )
        };
        let mut args = [&mut p as *mut BwdParams as *mut c_void];
        // SAFETY: the kernel takes one `BwdParams` by value (layout checked in kernels.rs); the
        // caller guarantees logits, ids, grad, dz and status are live device memory of the sizes
        // the kernel indexes until `stream` passes the launch; no aux table or row sequence is
        // used (0). `stream` is the caller's valid stream of this (primary) context.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                grid.0,
                grid.1,
                grid.2,
                stream as sys::CUstream,
                &mut args,
            )
        }
        .map_err(dev_err)
    }

    /// Whether `stream` is being captured into a CUDA graph now (any capture mode). Memory a
    /// captured launch writes belongs to the graph: a caller that recycles output buffers
    /// between calls must not do so while capturing.
    ///
    /// # Safety
    ///
    /// `stream` must be a valid `CUstream` of this device's primary context (0: the legacy
    /// default stream).
    pub unsafe fn is_capturing(&self, stream: u64) -> Result<bool, RouteError> {
        self.dev.ctx.bind_to_thread().map_err(dev_err)?;
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: a valid stream of the bound context (caller); `status` is a valid out-pointer.
        unsafe { sys::cuStreamIsCapturing(stream as sys::CUstream, &mut status) }
            .result()
            .map_err(dev_err)?;
        Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
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
