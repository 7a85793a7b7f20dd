//! The CPU backward: the core's row definition ([`moe_router_core::backward::vjp_row`]) over
//! chunks of rows in parallel, compiled for AVX2 and SSE4.1 with run-time selection. Portable
//! mode runs the reference's code, so the gradient is the same bits.
//!
//! Two things keep it at the speed of the forward:
//!
//! - **Sparse rows.** Without a full-row term (softmax before top-K, an aux loss, the z-loss) a
//!   row's gradient is zero except at its K ids. Such rows are checked in one pass over the
//!   logits (NaN, +∞, all −∞: the reference's errors, through the reference path), then
//!   [`vjp_row`] runs on the K selected logits only (plus one finite placeholder, so that its
//!   all-masked check sees what the full row has) and the K results are scattered into a row
//!   that is already zero. The values are those of the full-row call: in these cases it reads
//!   the selected logits only, and its sums run over the K slots.
//! - **The output's memory.** The `[T, E]` gradient is allocated zeroed and untouched (the
//!   operating system maps zero pages on first write): sparse rows store K values each, not E.
//!   The page faults of a fresh `[T, E]` array remain (64 MiB at T = 65536, E = 256); asking for
//!   transparent huge pages (`MADV_HUGEPAGE`) made them slower on the machine measured.

use dense::DenseScratch;
use moe_router_core::backward::{BackwardPlan, LossGrads, VjpScratch, vjp_row, vjp_rows};
use moe_router_core::math::Math;
use moe_router_core::math::{NativeF32, NativeF64, Portable};
use moe_router_core::{LogitsRef, RouteError, RouterConfig, ScoreFunction, SoftmaxPosition};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use num_traits::{Float, Zero};
use rayon::prelude::*;
use stream::Plain;

#[path = "dense.rs"]
mod dense;
#[path = "stream.rs"]
mod stream;

/// Rows per parallel task.
const CHUNK: usize = 256;

/// The gradient on the logits `[T, E]` of the weights of `ids` (checked by the caller) under the
/// upstream gradient `grad` `[T, K]`.
pub(crate) fn vjp<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    losses: &LossGrads<'_>,
) -> Result<Array2<M::F>, RouteError> {
    let (t, e) = logits.dim();
    let mut out = zeroed_output::<M::F>(t, e);
    vjp_into::<M>(cfg, logits, ids, grad, losses, out.view_mut(), true)?;
    Ok(out)
}

/// [`vjp`] into `out` (`[T, E]`, checked by the caller); `zeroed`: `out` holds zeros already.
pub(crate) fn vjp_into<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    losses: &LossGrads<'_>,
    mut out: ArrayViewMut2<'_, M::F>,
    zeroed: bool,
) -> Result<(), RouteError> {
    let plan = BackwardPlan::new(cfg, logits, losses)?;
    let sparse = is_sparse(cfg, &plan) && !matches!(logits, LogitsRef::F64(_));
    let dense = M::DENSE && dense::applies(cfg, &plan, logits);
    out.axis_chunks_iter_mut(Axis(0), CHUNK)
        .into_par_iter()
        .enumerate()
        .try_for_each(|(ci, out_c)| {
            let a = ci * CHUNK;
            let b = a + out_c.nrows();
            let ids_c = ids.slice(ndarray::s![a..b, ..]);
            let g_c = grad.slice(ndarray::s![a..b, ..]);
            if sparse {
                sparse_chunk::<M>(cfg, logits, ids_c, g_c, &plan, a, out_c, zeroed)
            } else if dense {
                dense_chunk::<M>(cfg, logits, ids_c, g_c, &plan, a, out_c, zeroed)
            } else {
                chunk::<M>(cfg, logits, ids_c, g_c, &plan, a, out_c, zeroed)
            }
        })
}

/// The numerics modes of the CPU backward.
pub(crate) trait BackwardMath: Math<F: Plain> {
    /// Whether [`BackwardMath::dense_rows`] computes the [`dense`] kernel's rows (f32 modes).
    const DENSE: bool;
    /// [`dense::rows`] in this mode (not called where [`BackwardMath::DENSE`] is false).
    #[allow(clippy::too_many_arguments)]
    fn dense_rows(
        cfg: &RouterConfig,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        grad: ArrayView2<'_, Self::F>,
        plan: &BackwardPlan,
        start: usize,
        dst: ArrayViewMut2<'_, Self::F>,
        sc: &mut DenseScratch,
    ) -> Result<(), RouteError>;
}

macro_rules! dense_f32 {
    ($m:ty) => {
        impl BackwardMath for $m {
            const DENSE: bool = true;
            fn dense_rows(
                cfg: &RouterConfig,
                logits: &LogitsRef<'_>,
                ids: ArrayView2<'_, u32>,
                grad: ArrayView2<'_, f32>,
                plan: &BackwardPlan,
                start: usize,
                dst: ArrayViewMut2<'_, f32>,
                sc: &mut DenseScratch,
            ) -> Result<(), RouteError> {
                dense::rows::<$m>(cfg, logits, ids, grad, plan, start, dst, sc)
            }
        }
    };
}
dense_f32!(Portable);
dense_f32!(NativeF32);

impl BackwardMath for NativeF64 {
    const DENSE: bool = false;
    fn dense_rows(
        _: &RouterConfig,
        _: &LogitsRef<'_>,
        _: ArrayView2<'_, u32>,
        _: ArrayView2<'_, f64>,
        _: &BackwardPlan,
        _: usize,
        _: ArrayViewMut2<'_, f64>,
        _: &mut DenseScratch,
    ) -> Result<(), RouteError> {
        Err(RouteError::unsupported(
            "cpu",
            "the dense backward kernel computes in f32",
        ))
    }
}

/// Dense rows by the vectorised kernel ([`dense`]); `zeroed`: `out` is fresh (written in
/// place), else a block of rows at a time is built in [`Block`] and streamed out.
#[allow(clippy::too_many_arguments)]
fn dense_chunk<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    mut out: ArrayViewMut2<'_, M::F>,
    zeroed: bool,
) -> Result<(), RouteError> {
    let mut sc = DenseScratch::new(out.ncols());
    let blk = if zeroed {
        None
    } else {
        Block::<M::F>::new(&out, 16 * 1024)
    };
    match blk {
        Some(mut b) => {
            let e = out.ncols();
            let res = b.run(e, &mut out, |r0, dst| {
                let rr = ndarray::s![r0..r0 + dst.nrows(), ..];
                M::dense_rows(
                    cfg,
                    logits,
                    ids.slice(rr),
                    grad.slice(rr),
                    plan,
                    start + r0,
                    dst.view_mut(),
                    &mut sc,
                )
            });
            stream::fence();
            res
        }
        None => M::dense_rows(cfg, logits, ids, grad, plan, start, out, &mut sc),
    }
}

/// Whether every row's gradient is zero outside its ids: no softmax over all experts (softmax
/// before top-K), no aux term, no z-loss term.
fn is_sparse(cfg: &RouterConfig, plan: &BackwardPlan) -> bool {
    let before = cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
    !before && plan.aux.is_none() && plan.z_factor == 0.0
}

/// A zeroed `[rows, cols]` array whose pages are not touched yet (a zeroed allocation: the
/// operating system maps zero pages on first write, so untouched entries cost no store).
fn zeroed_output<F: Float>(rows: usize, cols: usize) -> Array2<F> {
    Array2::<F>::zeros((rows, cols))
}

/// Full rows through the reference's row loop ([`vjp_rows`]); `zeroed`: `out` is fresh (written
/// in place), else a block of rows at a time is built in [`Block`] and streamed out.
#[allow(clippy::too_many_arguments)]
fn chunk<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    mut out: ArrayViewMut2<'_, M::F>,
    zeroed: bool,
) -> Result<(), RouteError> {
    let blk = if zeroed {
        None
    } else {
        Block::<M::F>::new(&out, 64 * 1024)
    };
    match blk {
        Some(mut b) => {
            let e = out.ncols();
            let res = b.run(e, &mut out, |r0, dst| {
                let rr = ndarray::s![r0..r0 + dst.nrows(), ..];
                vjp_rows::<M>(
                    cfg,
                    logits,
                    ids.slice(rr),
                    grad.slice(rr),
                    plan,
                    start + r0,
                    dst.view_mut(),
                )
            });
            stream::fence();
            res
        }
        None => vjp_rows::<M>(cfg, logits, ids, grad, plan, start, out),
    }
}

/// Whether a row has a NaN or +∞ logit, or only −∞ ones (the rows the reference rejects).
#[inline(always)]
fn row_rejected(row: impl Iterator<Item = f32>) -> bool {
    let mut bad = false;
    let mut all_masked = true;
    for x in row {
        // NaN or +inf in one compare (vectorises).
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        let not_below_inf = !(x < f32::INFINITY);
        bad |= not_below_inf;
        all_masked &= x == f32::NEG_INFINITY;
    }
    bad || all_masked
}

/// Sparse rows (see the module docs); `zeroed`: `out` is zero on entry (K stores per row into
/// the untouched zero pages); else the rows are built in [`Block`] and streamed out (or, for a
/// strided `out`, cleared and written in place).
#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt", "x86_64+sse4.1"))]
fn sparse_chunk<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    mut out: ArrayViewMut2<'_, M::F>,
    zeroed: bool,
) -> Result<(), RouteError> {
    let k = ids.ncols();
    let e = out.ncols();
    let mut scratch = VjpScratch::new();
    let mut zc: Vec<M::F> = Vec::with_capacity(k + 1);
    let mut g: Vec<M::F> = Vec::with_capacity(k);
    let mut dzc = vec![M::F::zero(); k + 1];
    // The compact row's ids: slot j reads compact logit j.
    let idc: Vec<u32> = (0..k as u32).collect();
    let mut blk = if zeroed {
        None
    } else {
        Block::<M::F>::new(&out, 16 * 1024)
    };
    let mut row_values = |r: usize, dst: &mut ArrayViewMut2<'_, M::F>, dr: usize| -> Result<(), RouteError> {
        let t = start + r;
        let id_row = ids.row(r);
        let rejected = match logits {
            LogitsRef::F32(l) => {
                let row = l.row(t);
                zc.clear();
                zc.extend(id_row.iter().map(|&i| M::from_f32(row[i as usize])));
                match row.as_slice() {
                    Some(s) => row_rejected(s.iter().copied()),
                    None => row_rejected(row.iter().copied()),
                }
            }
            LogitsRef::Bf16(l) => {
                let row = l.row(t);
                zc.clear();
                zc.extend(id_row.iter().map(|&i| M::from_f32(row[i as usize].to_f32())));
                row_rejected(row.iter().map(|x| x.to_f32()))
            }
            LogitsRef::F16(l) => {
                let row = l.row(t);
                zc.clear();
                zc.extend(id_row.iter().map(|&i| M::from_f32(row[i as usize].to_f32())));
                row_rejected(row.iter().map(|x| x.to_f32()))
            }
            // Not taken (`vjp` sends f64 logits down the full-row path).
            LogitsRef::F64(_) => true,
        };
        if rejected {
            // The reference path reports the row's error exactly as the reference does.
            let (rr, dd) = (ndarray::s![r..r + 1, ..], ndarray::s![dr..dr + 1, ..]);
            return vjp_rows::<M>(cfg, logits, ids.slice(rr), grad.slice(rr), plan, t, dst.slice_mut(dd));
        }
        // A finite placeholder that no slot reads: the row has a finite logit.
        zc.push(M::F::zero());
        g.clear();
        g.extend(grad.row(r).iter().copied());
        vjp_row::<M>(cfg, &zc, &idc, &g, None, M::F::zero(), t, &mut scratch, &mut dzc)?;
        let mut o = dst.row_mut(dr);
        if !zeroed {
            o.fill(M::F::zero());
        }
        for (&i, &d) in id_row.iter().zip(dzc.iter()) {
            o[i as usize] = d;
        }
        Ok(())
    };
    match blk.as_mut() {
        Some(b) => {
            let res = b.run(e, &mut out, |r0, dst| {
                (0..dst.nrows()).try_for_each(|dr| row_values(r0 + dr, dst, dr))
            });
            stream::fence();
            res
        }
        None => {
            for r in 0..out.nrows() {
                row_values(r, &mut out, r)?;
            }
            Ok(())
        }
    }
}

/// A few rows' scratch (a few KiB: stays in L1 or L2) for an output written with streaming
/// stores ([`stream::stream_copy`]): rows are built here, then copied out a block at a time.
struct Block<F> {
    buf: Vec<F>,
    rows: usize,
}

impl<F: Plain + Zero> Block<F> {
    /// Scratch of about `bytes` for `out`'s rows, when `out` is contiguous (row-major, no
    /// gaps): else `None` (rows are written in place).
    fn new(out: &ArrayViewMut2<'_, F>, bytes: usize) -> Option<Self> {
        let e = out.ncols();
        if e == 0 || !out.is_standard_layout() {
            return None;
        }
        let rows = (bytes / (e * std::mem::size_of::<F>())).clamp(1, CHUNK);
        Some(Block {
            buf: vec![F::zero(); rows * e],
            rows,
        })
    }

    /// Builds `out`'s rows a block at a time: `rows(r0, dst)` writes rows `r0..r0 + dst.nrows()`
    /// of `out` into `dst` (the block's scratch), then the block is streamed out. Stops at the
    /// first error (earlier blocks are written). The caller calls [`stream::fence`] after.
    fn run(
        &mut self,
        e: usize,
        out: &mut ArrayViewMut2<'_, F>,
        mut rows: impl FnMut(usize, &mut ArrayViewMut2<'_, F>) -> Result<(), RouteError>,
    ) -> Result<(), RouteError> {
        let n = out.nrows();
        let flat = out.as_slice_mut().expect("a standard-layout view is contiguous");
        let mut r0 = 0;
        while r0 < n {
            let m = self.rows.min(n - r0);
            let mut dst = ArrayViewMut2::from_shape((m, e), &mut self.buf[..m * e]).expect("the block's shape");
            rows(r0, &mut dst)?;
            stream::stream_copy(&self.buf[..m * e], &mut flat[r0 * e..(r0 + m) * e]);
            r0 += m;
        }
        Ok(())
    }
}
