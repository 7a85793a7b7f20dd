//! The CPU backward: the core's row definition ([`moe_router_core::backward::vjp_rows`]) over
//! chunks of rows in parallel, compiled for AVX2 and SSE4.1 with run-time selection. Portable
//! mode is the reference's code, so the gradient is the same bits.

use moe_router_core::backward::{BackwardPlan, LossGrads, vjp_rows};
use moe_router_core::math::Math;
use moe_router_core::{LogitsRef, RouteError, RouterConfig};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use num_traits::Zero;
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
    let plan = BackwardPlan::new(cfg, logits, losses)?;
    let mut out = Array2::<M::F>::from_elem((t, e), M::F::zero());
    out.axis_chunks_iter_mut(Axis(0), CHUNK)
        .into_par_iter()
        .enumerate()
        .try_for_each(|(ci, out_c)| {
            let a = ci * CHUNK;
            let b = a + out_c.nrows();
            let ids_c = ids.slice(ndarray::s![a..b, ..]);
            let g_c = grad.slice(ndarray::s![a..b, ..]);
            chunk::<M>(cfg, logits, ids_c, g_c, &plan, a, out_c)
        })?;
    Ok(out)
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
