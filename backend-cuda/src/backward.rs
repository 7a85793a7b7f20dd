//! The backward on the device (DESIGN §2b): [`CudaRouter`]'s
//! [`Router::weights_vjp`](moe_router_core::Router::weights_vjp).
//!
//! One launch of the gradient kernel (`kernels/backward.cu`, a warp per row) writes `dz[T, E]`.
//! With an aux term, a counting kernel runs first: it counts the aux top-K per sequence on the
//! device; the small `[S, E]` counts come back to the host, which builds the aux table with the
//! shared code ([`BackwardPlan::from_counts`], so every backend uses the same bits) and uploads
//! it for the gradient kernel. Errors in the data (invalid ids, NaN / `+∞`, rows of `−∞` only)
//! are latched in a status word and decoded into the reference's [`RouteError`].

use crate::buffers::{DeviceGrad, DeviceIds, DeviceLogits, DeviceWeights, GradBuffers};
use crate::device::{BACKEND, BackwardKernels, dev_err};
use crate::kernels::{
    BWD_WARPS, BackwardVariant, BwdKernel, BwdParams, ScoreKind, bwd_launch, bwd_layout, bwd_rows_fit, bwd_rows_grid,
    decode_status,
};
use crate::router::CudaRouter;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use moe_router_core::backward::{BackwardPlan, LossGrads, row_sequences};
use moe_router_core::{Numerics, RouteError, Router, ScoreFunction, SoftmaxPosition};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Instantiations of the rows kernel of the sparse gradient for K <= 8 (`bwd_grad_rows8*` in
/// kernels/backward.cu: a warp per tile of 32 rows). `bench-cuda --backward` measures them against
/// each other; every one computes the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BackwardRowsVariant {
    /// The planned choice, by the number of experts (from the H200 measurements in
    /// docs/benchmarks.md): [`BackwardRowsVariant::Staged`] for `E >= 256` (a row of wide zeros
    /// per slot store already keeps enough bytes in flight; the piped order's second tile only
    /// adds registers), [`BackwardRowsVariant::Piped`] below (short rows need the next tile's
    /// loads to cover the slot math).
    Default = 0,
    /// The piped order: [`BackwardRowsVariant::Staged`] on a resident grid (2 blocks per SM, a
    /// warp walks several tiles), each tile's zeros and slot stores issued while the warp's next
    /// tile's first loads are in flight.
    Piped = 1,
    /// The early order with the row's ids and upstream gradient read 16 bytes at a time, 16-bit
    /// logits classified two per 32-bit word, and the slot stores staged in shared memory (2 KiB
    /// per warp) so that one store instruction writes the slots of 4 rows rather than one slot
    /// of 32 rows; one tile per warp.
    Staged = 2,
    /// The early order: the row's ids, upstream gradient and logits at the slot ids loaded with
    /// the tile's flat pass (8 pieces of 16 bytes in flight per lane), the slot values computed
    /// while the pass's second batch is in flight (used only if the row's checks pass) and
    /// stored right after the zeros, so that no zeroed sector has left L2 when its slot is
    /// written; one tile per warp.
    Early = 3,
    /// The late order: the slot values computed and stored after the zeros and the checks; on
    /// the H200 its scattered slot stores re-read a third more DRAM than the gradient's size
    /// (zeroed sectors already evicted).
    Late = 4,
}

impl BackwardRowsVariant {
    /// Every variant, the default first.
    pub const ALL: [BackwardRowsVariant; 5] = [
        BackwardRowsVariant::Default,
        BackwardRowsVariant::Piped,
        BackwardRowsVariant::Staged,
        BackwardRowsVariant::Early,
        BackwardRowsVariant::Late,
    ];

    /// The instantiation this variant runs for a router of `num_experts` experts (never
    /// [`BackwardRowsVariant::Default`]).
    pub fn resolve(self, num_experts: usize) -> BackwardRowsVariant {
        match self {
            BackwardRowsVariant::Default if num_experts >= 256 => BackwardRowsVariant::Staged,
            BackwardRowsVariant::Default => BackwardRowsVariant::Piped,
            v => v,
        }
    }
}

static ROWS_VARIANT: AtomicU8 = AtomicU8::new(0);

/// Selects the K <= 8 rows kernel for every later backward launch in this process (for
/// benchmarks; [`BackwardRowsVariant::Default`] unless set).
pub fn set_backward_rows_variant(v: BackwardRowsVariant) {
    ROWS_VARIANT.store(v as u8, Ordering::Relaxed);
}

/// The K <= 8 rows kernel selected (see [`BackwardRowsVariant::resolve`] for what the default
/// runs).
pub fn backward_rows_variant() -> BackwardRowsVariant {
    match ROWS_VARIANT.load(Ordering::Relaxed) {
        1 => BackwardRowsVariant::Piped,
        2 => BackwardRowsVariant::Staged,
        3 => BackwardRowsVariant::Early,
        4 => BackwardRowsVariant::Late,
        _ => BackwardRowsVariant::Default,
    }
}

impl CudaRouter {
    /// Checks the shapes and the loss inputs in the reference's order: logits, ids, gradient,
    /// then [`LossGrads::check`]. Returns `(T, E, K)`.
    fn backward_shapes(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        losses: &LossGrads<'_>,
    ) -> Result<(usize, usize, usize), RouteError> {
        let cfg = self.config();
        let (t, e) = logits.dim();
        if e != cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: cfg.num_experts(),
                rows: t,
                cols: e,
            });
        }
        let k = cfg.top_k();
        if ids.dim() != (t, k) {
            return Err(RouteError::IdsShape {
                expected_rows: t,
                expected_k: k,
                rows: ids.rows,
                cols: ids.k,
            });
        }
        if grad.dim() != (t, k) {
            return Err(RouteError::GradShape {
                expected_rows: t,
                expected_k: k,
                rows: grad.rows,
                cols: grad.k,
            });
        }
        losses.check(t, e)?;
        Ok((t, e, k))
    }

    /// The kernels of this router's variant for `logits`.
    fn backward_module(&self, logits: &DeviceLogits<'_>) -> Result<Arc<BackwardKernels>, RouteError> {
        let cfg = self.config();
        self.device().backward_kernels(BackwardVariant {
            dtype: logits.dtype(),
            portable: cfg.numerics() == Numerics::Portable,
            score: ScoreKind::of(cfg.score(), cfg.softmax_position()),
        })
    }

    /// The parameter block of a call (pointers to logits, ids, gradient, output and status; no
    /// aux table, no z-loss factor yet).
    fn backward_params(
        &self,
        logits: &DeviceLogits<'_>,
        lptr: u64,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        dz: &CudaSlice<f32>,
        status: &CudaSlice<u64>,
    ) -> BwdParams {
        let cfg = self.config();
        let s = &self.device().stream;
        let (t, e) = logits.dim();
        let lb = logits.dtype().size() as u64;
        let vec =
            lptr.is_multiple_of(16) && (e as u64 * lb).is_multiple_of(16) && (logits.ld as u64 * lb).is_multiple_of(16);
        let base = crate::kernels::config_params(cfg);
        BwdParams {
            logits: lptr,
            ids: ids.buf.device_ptr(s).0,
            grad: grad.buf.device_ptr(s).0,
            dz: dz.device_ptr(s).0,
            status: status.device_ptr(s).0,
            t: t as i64,
            ld: logits.ld as i64,
            e: e as i32,
            k: cfg.top_k() as i32,
            norm: base.norm,
            norm_param: base.norm_param,
            scale: base.scale,
            vec: i32::from(vec),
            ..BwdParams::default()
        }
    }

    /// Enqueues the gradient kernel for `p` (aux table and z-loss factor set): the dense kernel
    /// when a term covers every expert (the softmax before top-K, a softmax aux loss, the
    /// z-loss; or the aux scores), the sparse one otherwise.
    fn launch_gradient(&self, kern: &BackwardKernels, p: BwdParams, rows: usize) -> Result<(), RouteError> {
        let cfg = self.config();
        let before = cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
        let aux = p.aux != 0;
        let softmax = before || (aux && cfg.score() == ScoreFunction::Softmax) || p.zf != 0.0;
        if softmax || aux {
            self.launch_backward(&kern.grad_dense, p, BwdKernel::Dense, softmax, aux, rows)
        } else if bwd_rows_fit(&p, p.dz.is_multiple_of(16)) {
            self.launch_backward(kern.grad_rows(p.k, p.e), p, BwdKernel::Rows, false, false, rows)
        } else {
            self.launch_backward(&kern.grad_sparse, p, BwdKernel::Sparse, false, false, rows)
        }
    }

    /// The backward of `weights_vjp`: checks shapes and inputs in the reference's order, then
    /// counts (aux term only), builds the plan and launches the gradient kernel.
    pub(crate) fn backward(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        losses: &LossGrads<'_>,
    ) -> Result<DeviceGrad, RouteError> {
        let (t, e, _) = self.backward_shapes(logits, ids, grad, losses)?;
        let cfg = self.config();
        let dev = self.device();
        let s = &dev.stream;
        // SAFETY: uninitialised device memory; every element of the T rows is written by the
        // gradient kernel before it can be read (a call that reports an error returns none).
        let dz = unsafe { s.alloc::<f32>((t * e).max(1)) }.map_err(dev_err)?;
        if t == 0 {
            return Ok(DeviceGrad {
                buf: dz,
                rows: 0,
                cols: e,
            });
        }
        let kern = self.backward_module(logits)?;
        let status = s.alloc_zeros::<u64>(1).map_err(dev_err)?;
        let (lptr, _g) = logits.raw_ptr(s);
        let mut p = self.backward_params(logits, lptr, ids, grad, &dz, &status);

        // Aux counts on the device, the table on the host.
        let mut seq_buf: Option<CudaSlice<u32>> = None;
        let plan = if losses.has_aux(cfg) {
            let nseq = losses.seq_lens.map_or(1, <[usize]>::len);
            if let Some(l) = losses.seq_lens.filter(|l| l.len() > 1) {
                seq_buf = Some(s.clone_htod(&row_sequences(l)).map_err(dev_err)?);
            }
            let counts = s.alloc_zeros::<u32>((nseq * e).max(1)).map_err(dev_err)?;
            let mut pc = p;
            pc.row_seq = seq_buf.as_ref().map_or(0, |b| b.device_ptr(s).0);
            pc.counts = counts.device_ptr(s).0;
            self.launch_backward(&kern.aux_counts, pc, BwdKernel::AuxCounts, false, false, t)?;
            self.backward_status(&status, Some(ids))?;
            let c = s.clone_dtoh(&counts).map_err(dev_err)?;
            let counts: Vec<Vec<u64>> = (0..nseq)
                .map(|i| c[i * e..(i + 1) * e].iter().map(|&x| u64::from(x)).collect())
                .collect();
            BackwardPlan::from_counts(cfg, t, losses, &counts)?
        } else {
            BackwardPlan::from_counts(cfg, t, losses, &[])?
        };
        let aux_buf = match &plan.aux {
            Some(a) => Some(s.clone_htod(&a.coefficients_f32()).map_err(dev_err)?),
            None => None,
        };
        if let Some(a) = &aux_buf {
            p.aux = a.device_ptr(s).0;
            p.row_seq = seq_buf.as_ref().map_or(0, |b| b.device_ptr(s).0);
        }
        p.zf = plan.z_factor_f32();
        self.launch_gradient(&kern, p, t)?;
        self.backward_status(&status, Some(ids))?;
        drop((aux_buf, seq_buf));
        Ok(DeviceGrad {
            buf: dz,
            rows: t,
            cols: e,
        })
    }

    /// Allocates a gradient and status word for [`CudaRouter::enqueue_backward`] of up to
    /// `max_tokens` rows.
    pub fn alloc_grad_buffers(&self, max_tokens: usize) -> Result<GradBuffers, RouteError> {
        let e = self.config().num_experts();
        let s = &self.device().stream;
        Ok(GradBuffers {
            // SAFETY: rows 0..T are written by the kernel before they are meant to be read.
            dz: unsafe { s.alloc::<f32>((max_tokens * e).max(1)) }.map_err(dev_err)?,
            status: s.alloc_zeros::<u64>(1).map_err(dev_err)?,
            max_tokens,
            cols: e,
            rows: 0,
        })
    }

    /// Enqueues the backward ([`Router::weights_vjp`]) into `out` without allocating or
    /// synchronising: safe to capture into a CUDA graph. The aux term needs its counts on the
    /// host first, so a `losses` with an aux term is [`RouteError::Unsupported`] here (use
    /// `weights_vjp`); the z-loss is taken. Errors in the data are latched in `out` and
    /// returned by [`CudaRouter::take_backward_status`].
    pub fn enqueue_backward(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        losses: &LossGrads<'_>,
        out: &mut GradBuffers,
    ) -> Result<(), RouteError> {
        let (t, e, _) = self.backward_shapes(logits, ids, grad, losses)?;
        let cfg = self.config();
        if losses.has_aux(cfg) {
            return Err(RouteError::unsupported(
                BACKEND,
                "the launch-only backward takes no aux term (its counts go through the host): use weights_vjp",
            ));
        }
        if t > out.max_tokens || out.cols != e {
            return Err(RouteError::BufferTooSmall {
                buffer: "gradient buffers",
                detail: format!(
                    "they hold {} rows of E = {}, the call needs {t} rows of E = {e}",
                    out.max_tokens, out.cols
                ),
            });
        }
        out.rows = t;
        if t == 0 {
            return Ok(());
        }
        let kern = self.backward_module(logits)?;
        let s = &self.device().stream;
        let (lptr, _g) = logits.raw_ptr(s);
        let mut p = self.backward_params(logits, lptr, ids, grad, &out.dz, &out.status);
        p.zf = BackwardPlan::from_counts(cfg, t, losses, &[])?.z_factor_f32();
        self.launch_gradient(&kern, p, t)
    }

    /// Waits for the router's stream, returns the first error latched in `out` since the last
    /// call (in the reference's order) and clears it. `ids`: the ids of the call, to name the
    /// slot of an invalid id.
    pub fn take_backward_status(&self, out: &mut GradBuffers, ids: Option<&DeviceIds>) -> Result<(), RouteError> {
        let r = self.backward_status(&out.status, ids);
        self.device().stream.memset_zeros(&mut out.status).map_err(dev_err)?;
        r
    }

    /// Enqueues one backward kernel over `rows` rows (a warp per row).
    fn launch_backward(
        &self,
        f: &CudaFunction,
        mut p: BwdParams,
        kernel: BwdKernel,
        softmax: bool,
        aux: bool,
        rows: usize,
    ) -> Result<(), RouteError> {
        let dev = self.device();
        let per_warp = bwd_layout(&mut p, kernel, softmax, aux);
        let Some((warps, smem)) = bwd_launch(per_warp, dev.smem_optin) else {
            return Err(RouteError::unsupported(
                BACKEND,
                format!(
                    "the backward needs {per_warp} bytes of shared memory per warp, the device allows {} per block",
                    dev.smem_optin
                ),
            ));
        };
        let cfg = if kernel == BwdKernel::Rows {
            // The piped instantiation needs several tiles per warp: a resident grid (2 blocks per
            // SM); the others take one tile per warp.
            let mut grid = bwd_rows_grid(rows);
            if p.k <= 8 && backward_rows_variant().resolve(p.e as usize) == BackwardRowsVariant::Piped {
                grid = grid.min((2 * dev.sms.max(1)).min(1 << 30) as u32);
            }
            LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: ((BWD_WARPS * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            LaunchConfig {
                grid_dim: (rows.div_ceil(warps).min(1 << 30) as u32, 1, 1),
                block_dim: ((warps * 32) as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            }
        };
        let mut b = dev.stream.launch_builder(f);
        b.arg(&p);
        // SAFETY: the kernel takes one `BwdParams` by value (layout checked in kernels.rs); every
        // pointer in it refers to a live device buffer of at least the sizes the kernel indexes
        // (logits [T, ld], ids/grad [T, K], aux [S, E], row_seq [T], dz [T, E], counts [S, E],
        // one status word), kept alive by the caller until it has read the status word.
        unsafe { b.launch(cfg) }.map_err(dev_err)?;
        Ok(())
    }

    /// Waits for the stream and decodes the status word (ids errors name the row's ids).
    fn backward_status(&self, status: &CudaSlice<u64>, ids: Option<&DeviceIds>) -> Result<(), RouteError> {
        let s = &self.device().stream;
        let w = s.clone_dtoh(status).map_err(dev_err)?;
        let k = self.config().top_k();
        decode_status(w.first().copied().unwrap_or(0), self.config().num_experts(), k, |row| {
            let ids = ids?;
            s.clone_dtoh(&ids.buf.slice(row * k..(row + 1) * k)).ok()
        })
    }
}
