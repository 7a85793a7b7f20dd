//! The backward on the device (DESIGN §2b): [`CudaRouter`]'s
//! [`Router::weights_vjp`](moe_router_core::Router::weights_vjp).
//!
//! One launch of the gradient kernel (`kernels/backward.cu`, a warp per row) writes `dz[T, E]`.
//! With an aux term, a counting kernel runs first: it counts the aux top-K per sequence on the
//! device; the small `[S, E]` counts come back to the host, which builds the aux table with the
//! shared code ([`BackwardPlan::from_counts`], so every backend uses the same bits) and uploads
//! it for the gradient kernel. Errors in the data (invalid ids, NaN / `+∞`, rows of `−∞` only)
//! are latched in a status word and decoded into the reference's [`RouteError`].

use crate::buffers::{DeviceGrad, DeviceIds, DeviceLogits, DeviceWeights};
use crate::device::{BACKEND, dev_err};
use crate::kernels::{BackwardVariant, BwdKernel, BwdParams, ScoreKind, bwd_launch, bwd_layout, decode_status};
use crate::router::CudaRouter;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use moe_router_core::backward::{BackwardPlan, LossGrads, row_sequences};
use moe_router_core::{Numerics, RouteError, Router, ScoreFunction, SoftmaxPosition};

impl CudaRouter {
    /// The backward of `weights_vjp`: checks shapes and inputs in the reference's order, then
    /// counts (aux term only), builds the plan and launches the gradient kernel.
    pub(crate) fn backward(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        losses: &LossGrads<'_>,
    ) -> Result<DeviceGrad, RouteError> {
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
        let variant = BackwardVariant {
            dtype: logits.dtype(),
            portable: cfg.numerics() == Numerics::Portable,
            score: ScoreKind::of(cfg.score(), cfg.softmax_position()),
        };
        let kern = dev.backward_kernels(variant)?;
        let status = s.alloc_zeros::<u64>(1).map_err(dev_err)?;
        let (lptr, _g) = logits.raw_ptr(s);
        let lb = logits.dtype().size() as u64;
        let vec =
            lptr.is_multiple_of(16) && (e as u64 * lb).is_multiple_of(16) && (logits.ld as u64 * lb).is_multiple_of(16);
        let base = crate::kernels::config_params(cfg);
        let mut p = BwdParams {
            logits: lptr,
            ids: ids.buf.device_ptr(s).0,
            grad: grad.buf.device_ptr(s).0,
            dz: dz.device_ptr(s).0,
            status: status.device_ptr(s).0,
            t: t as i64,
            ld: logits.ld as i64,
            e: e as i32,
            k: k as i32,
            norm: base.norm,
            norm_param: base.norm_param,
            scale: base.scale,
            vec: i32::from(vec),
            ..BwdParams::default()
        };

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
            self.backward_status(&status, ids)?;
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

        // The dense kernel when a term covers every expert: the softmax (before top-K, a softmax
        // aux loss, the z-loss) or the aux scores.
        let before = cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
        let aux = aux_buf.is_some();
        let softmax = before || (aux && cfg.score() == ScoreFunction::Softmax) || p.zf != 0.0;
        if softmax || aux {
            self.launch_backward(&kern.grad_dense, p, BwdKernel::Dense, softmax, aux, t)?;
        } else {
            self.launch_backward(&kern.grad_sparse, p, BwdKernel::Sparse, false, false, t)?;
        }
        self.backward_status(&status, ids)?;
        drop((aux_buf, seq_buf));
        Ok(DeviceGrad {
            buf: dz,
            rows: t,
            cols: e,
        })
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
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(warps).min(1 << 30) as u32, 1, 1),
            block_dim: ((warps * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
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
    fn backward_status(&self, status: &CudaSlice<u64>, ids: &DeviceIds) -> Result<(), RouteError> {
        let s = &self.device().stream;
        let w = s.clone_dtoh(status).map_err(dev_err)?;
        let k = ids.k;
        decode_status(w.first().copied().unwrap_or(0), self.config().num_experts(), k, |row| {
            s.clone_dtoh(&ids.buf.slice(row * k..(row + 1) * k)).ok()
        })
    }
}
