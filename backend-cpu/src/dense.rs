//! Dense rows of the CPU backward, vectorised: softmax before top-K without an aux or z-loss
//! term (OLMoE, Qwen2-MoE without renormalisation, and the literal softmax-before rules), f32
//! numerics (portable and native), logits f32, bf16 or f16. The gradient of such a row is
//! `p_e · (−t)` off the ids and `p_i · (gu_j − t)` at the ids, over the full-row softmax `p`.
//!
//! Per block of [`R`] rows, the same operations as the reference ([`vjp_row`]'s softmax and
//! weights' term), so the same bits:
//!
//! 1. **Per row, in lanes over the experts**: widen (the mode's rule), check (NaN, +∞, all −∞:
//!    such a row goes to the reference's row loop, which reports its error), the maximum `m`,
//!    and `exp(z − m)` with [`exp_nonpos`] (the bits of [`moe_router_core::math::exp`], the exp
//!    of both f32 modes, for every `x ≤ 0`). A −∞ logit stores `−0` (its exponential is `+0`):
//!    the sum is unchanged (`s + (−0) = s`, and the sum starts at `+0`), and the mark tells the
//!    output pass to write the reference's `+0`.
//! 2. **Denominators**: each row's sum in expert order, as the reference (both modes), the
//!    rows side by side ([`row_sums`]: with AVX-512 the block's sixteen rows in the lanes
//!    of one vector, transposed sixteen experts at a time; else eight scalar add chains).
//! 3. **Per row, in lanes**: the probabilities `p_e = div(exp_e, s)` in place (the mode's
//!    division: IEEE, or the portable one by the row's prepared sum, [`div_by_pos`] /
//!    [`div_by_pos_fma`], the bits of [`moe_router_core::math::div`]; the −∞ marks kept).
//! 4. **Per row, slot level (K values)**: `u_j = p_{id_j}`, the scale and normalisation of the
//!    core ([`weights_slot_grad`]), `t = Σ gu_j·u_j`.
//! 5. **Per row, in lanes**: `dz_e = ftz(p_e · (0 − t))`, then the K ids `ftz(u_j · ftz(gu_j −
//!    t))`, and `+0` at −∞ logits.

use super::{IdCheck, prefetch_row, reference_row};
use crate::fast::{FastF32, W, row_f32};
use crate::simd::row_sums;
use moe_router_core::backward::{BackwardPlan, weights_slot_grad};
use moe_router_core::math::{PosDivisor, div_by_pos, div_by_pos_fma, exp_nonpos};
use moe_router_core::{LogitsRef, RouteError, RouterConfig, ScoreFunction, SoftmaxPosition};
use ndarray::{ArrayView2, ArrayViewMut2};

/// Rows per block (the exponentials of a block: `R · E` f32, 16 KiB at E = 256).
const R: usize = 16;
/// The bits of `−0.0`: the mark of a −∞ logit in the exponentials.
const NEG_ZERO: u32 = 0x8000_0000;

/// Whether the dense kernel computes the rows of `cfg` under `plan`: softmax before top-K, no
/// aux or z-loss term, logits of at most f32 precision.
pub(crate) fn applies(cfg: &RouterConfig, plan: &BackwardPlan, logits: &LogitsRef<'_>) -> bool {
    cfg.score() == ScoreFunction::Softmax
        && cfg.softmax_position() == SoftmaxPosition::BeforeTopK
        && plan.aux.is_none()
        && plan.z_factor == 0.0
        && !matches!(logits, LogitsRef::F64(_))
}

/// Per-thread buffers of [`rows`].
pub(crate) struct DenseScratch {
    /// The exponentials of a block's rows, `R × ep` (each row padded to a multiple of [`W`]).
    ex: Vec<f32>,
    /// One widened row (non-f32 or strided logits).
    tmp: Vec<f32>,
    /// One output row (a strided destination).
    row: Vec<f32>,
    u: Vec<f32>,
    g: Vec<f32>,
    gu: Vec<f32>,
    ids: IdCheck,
}

impl DenseScratch {
    /// Buffers for rows of `e` experts.
    pub(crate) fn new(e: usize) -> Self {
        let ep = e.div_ceil(W) * W;
        DenseScratch {
            ex: vec![0.0; R * ep],
            tmp: Vec::with_capacity(e),
            row: vec![0.0; e],
            u: Vec::new(),
            g: Vec::new(),
            gu: Vec::new(),
            ids: IdCheck::new(e),
        }
    }
}

/// Rows `start..start + dst.nrows()` of the backward into `dst` (`[rows, E]`); `ids` and `grad`
/// hold the same rows (each row's ids checked here, `grad` as given: flushed here). For the
/// configs of [`applies`].
#[allow(clippy::too_many_arguments)]
#[cfg_attr(
    moe_avx512,
    multiversion::multiversion(targets(
        "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+avx+fma+f16c+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
        "x86_64+avx2+avx+fma+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
        "x86_64+sse4.1"
    ))
)]
#[cfg_attr(
    not(moe_avx512),
    multiversion::multiversion(targets("x86_64+avx2+avx+fma+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt", "x86_64+sse4.1"))
)]
pub(crate) fn rows<M: FastF32>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, f32>,
    plan: &BackwardPlan,
    start: usize,
    mut dst: ArrayViewMut2<'_, f32>,
    sc: &mut DenseScratch,
) -> Result<(), RouteError> {
    // Whether this clone may use AVX-512 (decided at compile time per clone).
    #[cfg(moe_avx512)]
    let avx512 = multiversion::target::selected_target!().supports_feature_str("avx512f");
    #[cfg(not(moe_avx512))]
    let avx512 = false;
    // Whether this clone has hardware FMA (the portable division's exact product in 2 operations).
    let fma = multiversion::target::selected_target!().supports_feature_str("fma");
    let n = dst.nrows();
    let mut r0 = 0;
    while r0 < n {
        let m = R.min(n - r0);
        block::<M>((avx512, fma), cfg, logits, ids, grad, plan, start, r0, m, &mut dst, sc)?;
        r0 += m;
    }
    Ok(())
}

/// Rows `r0..r0 + m` (of `dst`, `ids` and `grad`; row `start + r` of the logits).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<M: FastF32>(
    (avx512, fma): (bool, bool),
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, f32>,
    plan: &BackwardPlan,
    start: usize,
    r0: usize,
    m: usize,
    dst: &mut ArrayViewMut2<'_, f32>,
    sc: &mut DenseScratch,
) -> Result<(), RouteError> {
    let e = dst.ncols();
    let ep = e.div_ceil(W) * W;
    // Rows the reference's loop wrote (never: it rejects every row sent to it).
    let mut done = [false; R];
    for (r, d) in done.iter_mut().enumerate().take(m) {
        let t = start + r0 + r;
        sc.ids.row(t, ids.row(r0 + r))?;
        prefetch_row(logits, t);
        let ex = &mut sc.ex[r * ep..(r + 1) * ep];
        if !exps::<M>(logits, t, &mut sc.tmp, ex) {
            // NaN, +∞ or every logit −∞: the reference reports the row's error.
            reference_row::<M>(cfg, logits, ids, grad, plan, start, r0 + r, dst.row_mut(r0 + r))?;
            *d = true;
        }
    }
    // Denominators: expert order, the rows side by side.
    let sums = row_sums(avx512, &sc.ex, ep, e, m);
    for r in 0..m {
        if done[r] {
            continue;
        }
        let s = sums[r];
        let ex = &mut sc.ex[r * ep..(r + 1) * ep];
        probabilities::<M>(ex, s, fma);
        let ex = &*ex;
        let id_row = ids.row(r0 + r);
        // Slot level: the weights u (the full-row probabilities at the ids), gu and t.
        sc.u.clear();
        sc.u.extend(id_row.iter().map(|&i| unmark(ex[i as usize])));
        sc.g.clear();
        sc.g.extend(grad.row(r0 + r).iter().map(|&x| M::ftz(x)));
        weights_slot_grad::<M>(cfg, &sc.u, &sc.g, &mut sc.gu);
        let mut t = 0f32;
        for (&gj, &uj) in sc.gu.iter().zip(&sc.u) {
            t = M::ftz(t + M::ftz(gj * uj));
        }
        let nt = 0.0 - t;
        let mut o = dst.row_mut(r0 + r);
        let out: &mut [f32] = match o.as_slice_mut() {
            Some(s) => s,
            None => &mut sc.row,
        };
        // Every expert: p·(−t); +0 at −∞ logits.
        for (o, &x) in out.iter_mut().zip(&ex[..e]) {
            *o = off_id::<M>(x, nt);
        }
        // The ids: p·(gu − t).
        for ((&i, &gj), &uj) in id_row.iter().zip(&sc.gu).zip(&sc.u) {
            let x = ex[i as usize];
            out[i as usize] = if x.to_bits() == NEG_ZERO {
                0.0
            } else {
                M::ftz(uj * M::ftz(gj - t))
            };
        }
        if o.as_slice_mut().is_none() {
            o.assign(&ndarray::ArrayView1::from(&sc.row[..]));
        }
    }
    Ok(())
}

/// An exponential with the −∞ mark cleared (`−0` → the reference's `+0`).
#[inline(always)]
fn unmark(x: f32) -> f32 {
    if x.to_bits() == NEG_ZERO { 0.0 } else { x }
}

/// The gradient of an expert off the ids: `ftz(p · nt)`, `+0` for a −∞ logit.
#[inline(always)]
fn off_id<M: FastF32>(p: f32, nt: f32) -> f32 {
    let v = M::ftz(p * nt);
    if p.to_bits() == NEG_ZERO { 0.0 } else { v }
}

/// A row's exponentials → its probabilities `M::div(exp, s)`, in place; the −∞ marks (and the
/// padding's) stay. Portable mode divides by the prepared sum ([`div_by_pos`]: the exponentials
/// are in `[0, 1]` and `s ≥ 1`, its domain; the same bits as the general division).
#[inline(always)]
fn probabilities<M: FastF32>(ex: &mut [f32], s: f32, fma: bool) {
    match (M::PORTABLE, PosDivisor::new(s)) {
        (true, Some(d)) if fma => divide_unmarked(ex, |x| div_by_pos_fma(x, d)),
        (true, Some(d)) => divide_unmarked(ex, |x| div_by_pos(x, d)),
        _ => divide_unmarked(ex, |x| M::div(x, s)),
    }
}

/// `x ← div(x)` for every value of `ex` but the −∞ marks (one loop per division, vectorised).
#[inline(always)]
fn divide_unmarked(ex: &mut [f32], div: impl Fn(f32) -> f32) {
    for x in ex.iter_mut() {
        let v = div(*x);
        *x = if x.to_bits() == NEG_ZERO { *x } else { v };
    }
}

/// Row `t`'s exponentials `exp(z − max)` into `ex` (`ep` values; −∞ logits and the padding
/// store `−0`), widened with `M`'s rule. False when the reference rejects the row (a NaN or +∞
/// logit, or every logit −∞); `ex` is then unspecified.
#[inline(always)]
fn exps<M: FastF32>(logits: &LogitsRef<'_>, t: usize, tmp: &mut Vec<f32>, ex: &mut [f32]) -> bool {
    let src = row_f32(logits, t, tmp);
    let mut mx = [f32::NEG_INFINITY; W];
    let mut bad = [false; W];
    {
        let (sc, stail) = src.as_chunks::<W>();
        let (ec, etail) = ex.as_chunks_mut::<W>();
        debug_assert!(etail.is_empty());
        let mut lane = |c: &[f32; W], o: &mut [f32; W]| {
            for l in 0..W {
                let x = M::from_f32(c[l]);
                // NaN or +∞ in one compare (vectorises).
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                let not_below_inf = !(x < f32::INFINITY);
                bad[l] |= not_below_inf;
                mx[l] = if x > mx[l] { x } else { mx[l] };
                o[l] = x;
            }
        };
        for (c, o) in sc.iter().zip(ec.iter_mut()) {
            lane(c, o);
        }
        if !stail.is_empty() {
            let mut c = [f32::NEG_INFINITY; W];
            c[..stail.len()].copy_from_slice(stail);
            lane(&c, &mut ec[sc.len()]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in &mx {
        m = if x > m { x } else { m };
    }
    if bad.iter().any(|&b| b) || m == f32::NEG_INFINITY {
        return false;
    }
    for c in ex.as_chunks_mut::<W>().0 {
        for x in c.iter_mut() {
            let v = exp_nonpos(*x - m);
            *x = if *x == f32::NEG_INFINITY { -0.0 } else { v };
        }
    }
    true
}
