//! Sparse rows of the CPU backward, [`R`] rows side by side: the rows whose gradient is zero
//! outside their K ids (no softmax over all experts, no aux or z-loss term), logits of at most
//! f32 precision.
//!
//! Per block of [`R`] rows:
//!
//! 1. **Per row**: its ids checked as [`validate_ids`](moe_router_core::validate_ids) checks
//!    them (in range, no repeat: the same error for the row), its logits checked in lanes (NaN,
//!    +∞, all −∞: such a row goes to the reference's row loop, which reports its error), and the
//!    K selected logits (widened by the mode's rule) and upstream gradients (flushed by the
//!    mode's rule) stored slot-major: slot `j` of the block's rows is one array of [`R`] lanes.
//! 2. **The slot level in lanes over the rows**: the reference's operations on the K selected
//!    values ([`vjp_row`](moe_router_core::backward::vjp_row) without a full-row term), each sum
//!    over the slots in slot order — so every row gets the reference's bits, and the K
//!    exponentials, divisions and sigmoids of sixteen rows run as a few vector operations.
//! 3. **Output**: the K values of each row scattered into a zero row. Into a reused buffer
//!    (`zeroed` false, contiguous), the block's rows are built in a scratch kept zero (only the
//!    K entries per row written, then cleared again) and copied out with streaming stores
//!    ([`stream`]); into a fresh zeroed array, K stores per row.

use super::stream::{self, Plain};
use super::{BackwardMath, IdCheck, prefetch_row, reference_row};
use crate::fast::row_f32;
use moe_router_core::backward::BackwardPlan;
use moe_router_core::{LogitsRef, Normalization, RouteError, RouterConfig, ScoreFunction};
use ndarray::{ArrayView2, ArrayViewMut2};
use num_traits::{Float, One, Zero};

/// Rows side by side (the lanes of the slot-level arithmetic).
const R: usize = 16;
/// Lanes of the logits check.
const W: usize = 16;

/// Per-thread buffers of [`rows`].
pub(crate) struct SparseScratch<F> {
    /// The selected logits, slot-major (`K` arrays of [`R`] rows).
    z: Vec<[F; R]>,
    /// The upstream gradient, slot-major.
    g: Vec<[F; R]>,
    /// The weights `u`, slot-major.
    u: Vec<[F; R]>,
    /// `gu`, then the gradient at the ids, slot-major.
    d: Vec<[F; R]>,
    /// One widened row (non-f32 or strided logits).
    tmp: Vec<f32>,
    /// [`R`] output rows kept zero between blocks (the streamed output).
    buf: Vec<F>,
    ids: IdCheck,
}

impl<F: Float> SparseScratch<F> {
    /// Buffers for rows of `e` experts and `k` slots.
    pub(crate) fn new(e: usize, k: usize) -> Self {
        let lanes = vec![[F::zero(); R]; k];
        SparseScratch {
            z: lanes.clone(),
            g: lanes.clone(),
            u: lanes.clone(),
            d: lanes,
            tmp: Vec::with_capacity(e),
            buf: Vec::new(),
            ids: IdCheck::new(e),
        }
    }
}

/// Rows `start..start + out.nrows()` of the backward into `out` (`[rows, E]`); `ids` and
/// `grad` hold the same rows (`grad` as given: flushed here). `zeroed`: `out` holds zeros
/// already (only the K values per row are stored). For the configs of
/// [`is_sparse`](super::is_sparse) with logits of at most f32 precision.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(
    moe_avx512,
    multiversion::multiversion(targets(
        "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+avx+fma+f16c+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
        "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
        "x86_64+sse4.1"
    ))
)]
#[cfg_attr(
    not(moe_avx512),
    multiversion::multiversion(targets("x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt", "x86_64+sse4.1"))
)]
pub(crate) fn rows<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    mut out: ArrayViewMut2<'_, M::F>,
    zeroed: bool,
    sc: &mut SparseScratch<M::F>,
) -> Result<(), RouteError> {
    let (n, e) = out.dim();
    let streamed = !zeroed && e > 0 && out.is_standard_layout();
    if streamed && sc.buf.len() != R * e {
        sc.buf = vec![M::F::zero(); R * e];
    }
    let mut r0 = 0;
    while r0 < n {
        let m = R.min(n - r0);
        let mut refer = [false; R];
        for (r, refer) in refer.iter_mut().enumerate().take(m) {
            *refer = !gather::<M>(logits, ids.row(r0 + r), grad.row(r0 + r), start + r0 + r, r, sc)?;
        }
        for r in m..R {
            for j in 0..sc.z.len() {
                sc.z[j][r] = M::F::zero();
                sc.g[j][r] = M::F::zero();
            }
        }
        let selected_masked = lanes::<M>(cfg, sc);
        for (r, refer) in refer.iter_mut().enumerate().take(m) {
            *refer |= selected_masked[r];
        }
        let ids_b = ids.slice(ndarray::s![r0..r0 + m, ..]);
        if streamed {
            let flat = out.as_slice_mut().expect("a standard-layout view is contiguous");
            let buf = &mut sc.buf[..m * e];
            scatter(ids_b, &sc.d, &refer, e, buf, false);
            stream::stream_copy(buf, &mut flat[r0 * e..(r0 + m) * e]);
            scatter(ids_b, &sc.d, &refer, e, buf, true);
        } else {
            for (r, &refer) in refer.iter().enumerate().take(m) {
                let mut o = out.row_mut(r0 + r);
                if !zeroed {
                    o.fill(M::F::zero());
                }
                if !refer {
                    for (j, &i) in ids_b.row(r).iter().enumerate() {
                        o[i as usize] = sc.d[j][r];
                    }
                }
            }
        }
        if refer.iter().any(|&b| b) {
            stream::fence();
            for r in (0..m).filter(|&r| refer[r]) {
                let rr = r0 + r;
                reference_row::<M>(cfg, logits, ids, grad, plan, start, rr, out.row_mut(rr))?;
            }
        }
        r0 += m;
    }
    if streamed {
        stream::fence();
    }
    Ok(())
}

/// Row `t`'s ids checked, and its selected logits and upstream gradient stored in lane `r` of
/// the slot arrays. False when the reference rejects the row's logits (a NaN or +∞ logit, or
/// every logit −∞).
#[inline(always)]
fn gather<M: BackwardMath>(
    logits: &LogitsRef<'_>,
    ids: ndarray::ArrayView1<'_, u32>,
    grad: ndarray::ArrayView1<'_, M::F>,
    t: usize,
    r: usize,
    sc: &mut SparseScratch<M::F>,
) -> Result<bool, RouteError> {
    sc.ids.row(t, ids)?;
    prefetch_row(logits, t);
    let src = row_f32(logits, t, &mut sc.tmp);
    for (j, (&i, &g)) in ids.iter().zip(grad.iter()).enumerate() {
        sc.z[j][r] = M::from_f32(src[i as usize]);
        sc.g[j][r] = M::ftz(g);
    }
    Ok(!rejected(src))
}

/// Whether the reference rejects a row of logits: a NaN or +∞, or only −∞ (in lanes: a flag
/// and a maximum per lane).
#[inline(always)]
pub(crate) fn rejected(src: &[f32]) -> bool {
    let mut bad = [0u32; W];
    let mut mx = [f32::NEG_INFINITY; W];
    let mut lane = |c: &[f32; W]| {
        for l in 0..W {
            // NaN or +∞ in one compare (vectorises).
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            let not_below_inf = !(c[l] < f32::INFINITY);
            bad[l] |= u32::from(not_below_inf);
            mx[l] = if c[l] > mx[l] { c[l] } else { mx[l] };
        }
    };
    let (chunks, tail) = src.as_chunks::<W>();
    for c in chunks {
        lane(c);
    }
    if !tail.is_empty() {
        let mut c = [f32::NEG_INFINITY; W];
        c[..tail.len()].copy_from_slice(tail);
        lane(&c);
    }
    bad.iter().any(|&b| b != 0) || mx.iter().all(|&x| x == f32::NEG_INFINITY)
}

/// The slot level of the block's rows in lanes: from the selected logits `z` and the upstream
/// gradient `g`, the gradient at the ids into `d` — the operations of
/// [`vjp_row`](moe_router_core::backward::vjp_row) (and of
/// [`weights_slot_grad`](moe_router_core::backward::weights_slot_grad) inside it) on each row.
/// Returns the rows whose selected logits are all −∞ under softmax after top-K (rejected by the
/// reference).
#[inline(always)]
fn lanes<M: BackwardMath>(cfg: &RouterConfig, sc: &mut SparseScratch<M::F>) -> [bool; R] {
    let ftz = M::ftz;
    let zero = M::F::zero();
    let one = M::F::one();
    let ninf = M::F::neg_infinity();
    let SparseScratch { z, g, u, d, .. } = sc;
    let mut masked = [false; R];
    // The weights u.
    match cfg.score() {
        ScoreFunction::Softmax => {
            // Softmax after top-K: max, exp(z − max), the sum in slot order, one division each.
            let mut mx = [ninf; R];
            for zj in z.iter() {
                for l in 0..R {
                    mx[l] = if zj[l] > mx[l] { zj[l] } else { mx[l] };
                }
            }
            for (uj, zj) in u.iter_mut().zip(z.iter()) {
                for l in 0..R {
                    uj[l] = M::exp_nonpos(zj[l] - mx[l]);
                }
            }
            let s = slot_sum(u);
            for uj in u.iter_mut() {
                for l in 0..R {
                    uj[l] = M::div(uj[l], s[l]);
                }
            }
            for l in 0..R {
                masked[l] = mx[l] == ninf;
            }
        }
        ScoreFunction::Sigmoid => {
            for (uj, zj) in u.iter_mut().zip(z.iter()) {
                for l in 0..R {
                    uj[l] = M::sigmoid(zj[l]);
                }
            }
        }
        ScoreFunction::SqrtSoftplus => {
            for (uj, zj) in u.iter_mut().zip(z.iter()) {
                for l in 0..R {
                    uj[l] = M::sqrt_softplus(zj[l]);
                }
            }
        }
    }
    // Scale, then normalisation: gu = (gs − Σ gs∘wn) / S (weights_slot_grad).
    let scale = M::from_f32(cfg.scaling_factor());
    for (dj, gj) in d.iter_mut().zip(g.iter()) {
        for l in 0..R {
            dj[l] = ftz(gj[l] * scale);
        }
    }
    let denom = match cfg.normalization() {
        Normalization::None => None,
        Normalization::Sum { eps } => {
            let eps = M::from_f32(eps);
            Some((slot_sum(u).map(|s| s + eps), [true; R]))
        }
        Normalization::SumClampMin { min } => {
            let mn = M::from_f32(min);
            let s = slot_sum(u);
            Some((s.map(|s| if s > mn { s } else { mn }), s.map(|s| s > mn)))
        }
    };
    if let Some((den, varies)) = denom {
        let mut dot = [zero; R];
        for (dj, uj) in d.iter().zip(u.iter()) {
            for l in 0..R {
                dot[l] = ftz(dot[l] + ftz(dj[l] * M::div(uj[l], den[l])));
            }
        }
        for l in 0..R {
            dot[l] = if varies[l] { dot[l] } else { zero };
        }
        for dj in d.iter_mut() {
            for l in 0..R {
                dj[l] = M::div(ftz(dj[l] - dot[l]), den[l]);
            }
        }
    }
    // The score function's derivative at the ids.
    match cfg.score() {
        ScoreFunction::Softmax => {
            let mut rr = [zero; R];
            for (dj, uj) in d.iter().zip(u.iter()) {
                for l in 0..R {
                    rr[l] = ftz(rr[l] + ftz(dj[l] * uj[l]));
                }
            }
            for (dj, uj) in d.iter_mut().zip(u.iter()) {
                for l in 0..R {
                    dj[l] = ftz(uj[l] * ftz(dj[l] - rr[l]));
                }
            }
        }
        ScoreFunction::Sigmoid => {
            for (dj, uj) in d.iter_mut().zip(u.iter()) {
                for l in 0..R {
                    dj[l] = ftz(dj[l] * ftz(uj[l] * ftz(one - uj[l])));
                }
            }
        }
        ScoreFunction::SqrtSoftplus => {
            for ((dj, uj), zj) in d.iter_mut().zip(u.iter()).zip(z.iter()) {
                for l in 0..R {
                    let v = ftz(dj[l] * M::div(M::sigmoid(zj[l]), uj[l] + uj[l]));
                    dj[l] = if uj[l] == zero { zero } else { v };
                }
            }
        }
    }
    // −∞ logits get 0.
    for (dj, zj) in d.iter_mut().zip(z.iter()) {
        for l in 0..R {
            dj[l] = if zj[l] == ninf { zero } else { dj[l] };
        }
    }
    masked
}

/// Each lane's sum over the slots, in slot order from `+0` (the reference's sums).
#[inline(always)]
fn slot_sum<F: Float>(v: &[[F; R]]) -> [F; R] {
    let mut s = [F::zero(); R];
    for vj in v {
        for l in 0..R {
            s[l] = s[l] + vj[l];
        }
    }
    s
}

/// The values `d` (slot-major) of the block's rows not marked in `skip` stored at their ids in
/// `buf` (`[rows, e]`); `clear`: zeros stored there instead (the scratch made zero again).
#[inline(always)]
fn scatter<F: Plain + Zero>(
    ids: ArrayView2<'_, u32>,
    d: &[[F; R]],
    skip: &[bool; R],
    e: usize,
    buf: &mut [F],
    clear: bool,
) {
    for (r, id_row) in ids.outer_iter().enumerate() {
        if skip[r] {
            continue;
        }
        let row = &mut buf[r * e..(r + 1) * e];
        for (j, &i) in id_row.iter().enumerate() {
            row[i as usize] = if clear { F::zero() } else { d[j][r] };
        }
    }
}
