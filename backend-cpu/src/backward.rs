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

use moe_router_core::backward::{BackwardPlan, LossGrads, VjpScratch, vjp_row, vjp_rows};
use moe_router_core::math::Math;
use moe_router_core::{LogitsRef, RouteError, RouterConfig, ScoreFunction, SoftmaxPosition};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use num_traits::{Float, Zero};
use rayon::prelude::*;

/// Rows per parallel task.
const CHUNK: usize = 256;

/// The gradient on the logits `[T, E]` of the weights of `ids` (checked by the caller) under the
/// upstream gradient `grad` `[T, K]`.
pub(crate) fn vjp<M: Math>(
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
pub(crate) fn vjp_into<M: Math>(
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
            } else {
                chunk::<M>(cfg, logits, ids_c, g_c, &plan, a, out_c)
            }
        })
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

#[multiversion::multiversion(targets("x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt", "x86_64+sse4.1"))]
fn chunk<M: Math>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    out: ArrayViewMut2<'_, M::F>,
) -> Result<(), RouteError> {
    vjp_rows::<M>(cfg, logits, ids, grad, plan, start, out)
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

/// Sparse rows (see the module docs); `zeroed`: `out` is zero on entry (else each row is
/// cleared first).
#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt", "x86_64+sse4.1"))]
fn sparse_chunk<M: Math>(
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
    let mut scratch = VjpScratch::new();
    let mut zc: Vec<M::F> = Vec::with_capacity(k + 1);
    let mut g: Vec<M::F> = Vec::with_capacity(k);
    let mut dzc = vec![M::F::zero(); k + 1];
    // The compact row's ids: slot j reads compact logit j.
    let idc: Vec<u32> = (0..k as u32).collect();
    for r in 0..out.nrows() {
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
            let rr = ndarray::s![r..r + 1, ..];
            vjp_rows::<M>(cfg, logits, ids.slice(rr), grad.slice(rr), plan, t, out.slice_mut(rr))?;
            continue;
        }
        // A finite placeholder that no slot reads: the row has a finite logit.
        zc.push(M::F::zero());
        g.clear();
        g.extend(grad.row(r).iter().copied());
        vjp_row::<M>(cfg, &zc, &idc, &g, None, M::F::zero(), t, &mut scratch, &mut dzc)?;
        let mut o = out.row_mut(r);
        if !zeroed {
            o.fill(M::F::zero());
        }
        for (&i, &d) in id_row.iter().zip(dzc.iter()) {
            o[i as usize] = d;
        }
    }
    Ok(())
}
