//! The reference router: plain, obviously-correct code for DESIGN §2, written against the
//! [`Math`] of the config's numerics mode. It is the oracle every backend is tested against.
//!
//! Per row:
//! 1. widen logits to the compute type; NaN or +∞ is an error naming the row;
//! 2. scores: softmax-before → `s = softmax(z)` over E (max-subtracted, sum in expert order);
//!    softmax-after → the key is the logit itself; sigmoid / sqrt-softplus elementwise;
//! 3. key = score (+ bias, flushed);
//! 4. group limit: group score = sum of the group's top-n keys in descending order, or its max;
//!    keep the best groups (ties → lower group index), other keys become −∞;
//! 5. top-K by key descending, ties → lower expert id;
//! 6. weights ([`weights_row`]): unbiased score at the id, or softmax over the K selected logits;
//!    normalise (sum in slot order); scale; flush.

use crate::config::{GroupScore, Normalization, RouterConfig, ScoreFunction, SoftmaxPosition};
use crate::error::RouteError;
use crate::logits::LogitsRef;
use crate::math::Math;
use num_traits::{Float, Zero};
use std::cmp::Ordering;

/// Widens row `t` of `logits` and checks it: NaN and +∞ are errors.
pub fn widen_checked<M: Math>(logits: &LogitsRef<'_>, t: usize, out: &mut Vec<M::F>) -> Result<(), RouteError> {
    logits.widen_row(t, out, M::from_f32, M::from_f64);
    for (e, &x) in out.iter().enumerate() {
        if x.is_nan() || x == M::F::infinity() {
            return Err(RouteError::NonFiniteLogit {
                row: t,
                expert: e,
                value: format!("{x:?}"),
            });
        }
    }
    Ok(())
}

/// Descending by key, ties → lower index. Keys are never NaN here.
fn key_order<F: Float>(keys: &[F], a: usize, b: usize) -> Ordering {
    keys[b].partial_cmp(&keys[a]).unwrap_or(Ordering::Equal).then(a.cmp(&b))
}

/// Full-row softmax probabilities (max-subtracted, sum in expert order). Errors when every logit
/// is −∞.
pub fn softmax_row<M: Math>(z: &[M::F], row: usize) -> Result<Vec<M::F>, RouteError> {
    let m = z
        .iter()
        .copied()
        .fold(M::F::neg_infinity(), |a, b| if b > a { b } else { a });
    if m == M::F::neg_infinity() {
        return Err(RouteError::AllMasked { row });
    }
    let e: Vec<M::F> = z.iter().map(|&x| M::exp(x - m)).collect();
    let mut s = M::F::zero();
    for &x in &e {
        s = s + x;
    }
    Ok(e.iter().map(|&x| M::div(x, s)).collect())
}

/// Selection keys for a widened row (steps 2–3).
pub fn keys_row<M: Math>(
    cfg: &RouterConfig,
    z: &[M::F],
    bias: Option<&[f32]>,
    row: usize,
) -> Result<Vec<M::F>, RouteError> {
    let mut keys: Vec<M::F> = match (cfg.score(), cfg.softmax_position()) {
        (ScoreFunction::Softmax, SoftmaxPosition::BeforeTopK) => softmax_row::<M>(z, row)?,
        (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK) => z.to_vec(),
        (ScoreFunction::Sigmoid, _) => z.iter().map(|&x| M::sigmoid(x)).collect(),
        (ScoreFunction::SqrtSoftplus, _) => z.iter().map(|&x| M::sqrt_softplus(x)).collect(),
    };
    if let Some(b) = bias {
        for (k, &bb) in keys.iter_mut().zip(b) {
            *k = M::ftz(*k + M::from_f32(bb));
        }
    }
    Ok(keys)
}

/// Applies the group limit to keys in place (step 4).
pub fn group_mask<M: Math>(cfg: &RouterConfig, keys: &mut [M::F]) {
    let Some(g) = cfg.group_limit() else { return };
    let per = cfg.num_experts() / g.num_groups;
    let mut gscores = Vec::with_capacity(g.num_groups);
    for gi in 0..g.num_groups {
        let gk = &keys[gi * per..(gi + 1) * per];
        let mut order: Vec<usize> = (0..per).collect();
        order.sort_by(|&a, &b| key_order(gk, a, b));
        let score = match g.score {
            GroupScore::Max => gk[order[0]],
            GroupScore::SumTopN(n) => {
                let mut s = gk[order[0]];
                for &i in &order[1..n] {
                    s = M::ftz(s + gk[i]);
                }
                s
            }
        };
        gscores.push(score);
    }
    let mut gorder: Vec<usize> = (0..g.num_groups).collect();
    gorder.sort_by(|&a, &b| key_order(&gscores, a, b));
    let mut keep = vec![false; g.num_groups];
    for &gi in &gorder[..g.groups_selected] {
        keep[gi] = true;
    }
    for (e, k) in keys.iter_mut().enumerate() {
        if !keep[e / per] {
            *k = M::F::neg_infinity();
        }
    }
}

/// Selects K ids for a widened row (steps 2–5), in slot order.
pub fn select_row<M: Math>(
    cfg: &RouterConfig,
    z: &[M::F],
    bias: Option<&[f32]>,
    row: usize,
) -> Result<Vec<u32>, RouteError> {
    let mut keys = keys_row::<M>(cfg, z, bias, row)?;
    group_mask::<M>(cfg, &mut keys);
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| key_order(&keys, a, b));
    Ok(order[..cfg.top_k()].iter().map(|&i| i as u32).collect())
}

/// Weights for `ids` (slot order kept) on a widened row (step 6, and the replay entry point).
pub fn weights_row<M: Math>(cfg: &RouterConfig, z: &[M::F], ids: &[u32], row: usize) -> Result<Vec<M::F>, RouteError> {
    let mut w: Vec<M::F> = match (cfg.score(), cfg.softmax_position()) {
        (ScoreFunction::Softmax, SoftmaxPosition::BeforeTopK) => {
            let s = softmax_row::<M>(z, row)?;
            ids.iter().map(|&i| s[i as usize]).collect()
        }
        (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK) => {
            let v: Vec<M::F> = ids.iter().map(|&i| z[i as usize]).collect();
            let m = v
                .iter()
                .copied()
                .fold(M::F::neg_infinity(), |a, b| if b > a { b } else { a });
            if m == M::F::neg_infinity() {
                return Err(RouteError::AllMasked { row });
            }
            let e: Vec<M::F> = v.iter().map(|&x| M::exp(x - m)).collect();
            let mut s = M::F::zero();
            for &x in &e {
                s = s + x;
            }
            e.iter().map(|&x| M::div(x, s)).collect()
        }
        (ScoreFunction::Sigmoid | ScoreFunction::SqrtSoftplus, _) => {
            // One rule for every score function: a row whose logits are all −∞ has no expert to
            // score (softmax finds it on its own; sigmoid and sqrt-softplus would route on the
            // bias alone with all-zero weights).
            if z.iter().all(|&x| x == M::F::neg_infinity()) {
                return Err(RouteError::AllMasked { row });
            }
            if cfg.score() == ScoreFunction::Sigmoid {
                ids.iter().map(|&i| M::sigmoid(z[i as usize])).collect()
            } else {
                ids.iter().map(|&i| M::sqrt_softplus(z[i as usize])).collect()
            }
        }
    };
    match cfg.normalization() {
        Normalization::None => {}
        Normalization::Sum { eps } => {
            let mut s = M::F::zero();
            for &x in &w {
                s = s + x;
            }
            let d = s + M::from_f32(eps);
            for x in &mut w {
                *x = M::div(*x, d);
            }
        }
        Normalization::SumClampMin { min } => {
            let mut s = M::F::zero();
            for &x in &w {
                s = s + x;
            }
            let mn = M::from_f32(min);
            let d = if s > mn { s } else { mn };
            for x in &mut w {
                *x = M::div(*x, d);
            }
        }
    }
    let scale = M::from_f32(cfg.scaling_factor());
    for x in &mut w {
        *x = M::ftz(*x * scale);
    }
    Ok(w)
}

use crate::backward::{BackwardPlan, LossGrads, vjp_rows};
use crate::config::{ComputeDtype, Numerics};
use crate::math::{NativeF32, NativeF64, Portable};
use crate::router::{CallSite, HostGrad, HostMatrix, HostWeights, Routed, Router, validate_ids};
use ndarray::{Array2, ArrayView2};

fn check_shape(cfg: &RouterConfig, logits: &LogitsRef<'_>) -> Result<(), RouteError> {
    cfg.check_ready()?;
    let (t, e) = logits.dim();
    if e != cfg.num_experts() {
        return Err(RouteError::LogitsShape {
            expected_experts: cfg.num_experts(),
            rows: t,
            cols: e,
        });
    }
    Ok(())
}

fn route_all<M: Math>(cfg: &RouterConfig, logits: &LogitsRef<'_>) -> Result<(Array2<u32>, Array2<M::F>), RouteError> {
    check_shape(cfg, logits)?;
    let (t, _) = logits.dim();
    let k = cfg.top_k();
    let mut ids = Array2::<u32>::zeros((t, k));
    let mut w = Array2::<M::F>::from_elem((t, k), M::F::zero());
    let mut z = Vec::new();
    for r in 0..t {
        widen_checked::<M>(logits, r, &mut z)?;
        let sel = select_row::<M>(cfg, &z, cfg.expert_bias(), r)?;
        let ww = weights_row::<M>(cfg, &z, &sel, r)?;
        for j in 0..k {
            ids[[r, j]] = sel[j];
            w[[r, j]] = ww[j];
        }
    }
    Ok((ids, w))
}

fn weights_all<M: Math>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
) -> Result<Array2<M::F>, RouteError> {
    check_shape(cfg, logits)?;
    let (t, _) = logits.dim();
    let k = cfg.top_k();
    validate_ids(ids, t, cfg.num_experts(), k, &[])?;
    let mut w = Array2::<M::F>::from_elem((t, k), M::F::zero());
    let mut z = Vec::new();
    for r in 0..t {
        widen_checked::<M>(logits, r, &mut z)?;
        let row: Vec<u32> = ids.row(r).to_vec();
        let ww = weights_row::<M>(cfg, &z, &row, r)?;
        for j in 0..k {
            w[[r, j]] = ww[j];
        }
    }
    Ok(w)
}

fn vjp_all<M: Math>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    losses: &LossGrads<'_>,
) -> Result<Array2<M::F>, RouteError> {
    check_shape(cfg, logits)?;
    let (t, e) = logits.dim();
    let k = cfg.top_k();
    validate_ids(ids, t, e, k, &[])?;
    if grad.dim() != (t, k) {
        return Err(RouteError::GradShape {
            expected_rows: t,
            expected_k: k,
            rows: grad.nrows(),
            cols: grad.ncols(),
        });
    }
    let plan = BackwardPlan::new(cfg, logits, losses)?;
    let mut out = Array2::<M::F>::from_elem((t, e), M::F::zero());
    vjp_rows::<M>(cfg, logits, ids, grad, &plan, 0, out.view_mut())?;
    Ok(out)
}

/// A host matrix in the compute precision of `cfg` (f64 for f64 compute, f32 otherwise): what
/// host routers use for [`Router::weights_from_host`].
pub fn host_in_compute_precision(cfg: &RouterConfig, m: &HostMatrix) -> HostMatrix {
    match (cfg.compute_dtype(), m) {
        (ComputeDtype::F64, HostMatrix::F64(a)) => HostMatrix::F64(a.clone()),
        (ComputeDtype::F64, HostMatrix::F32(a)) => HostMatrix::F64(a.mapv(f64::from)),
        (ComputeDtype::F32, HostMatrix::F32(a)) => HostMatrix::F32(a.clone()),
        (ComputeDtype::F32, HostMatrix::F64(a)) => HostMatrix::F32(a.mapv(|x| x as f32)),
    }
}

/// The reference router as a [`Router`] on host logits: slow, simple, the oracle.
#[derive(Debug, Clone)]
pub struct ReferenceRouter {
    cfg: RouterConfig,
}

impl ReferenceRouter {
    /// A reference router for `cfg`.
    pub fn new(cfg: RouterConfig) -> Self {
        ReferenceRouter { cfg }
    }

    /// Routes `logits` with the config's math, returning host ids and weights.
    fn route_rows(&self, logits: &LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError> {
        match (self.cfg.compute_dtype(), self.cfg.numerics()) {
            (ComputeDtype::F64, _) => route_all::<NativeF64>(&self.cfg, logits).map(|(i, w)| (i, HostWeights::F64(w))),
            (ComputeDtype::F32, Numerics::Portable) => {
                route_all::<Portable>(&self.cfg, logits).map(|(i, w)| (i, HostWeights::F32(w)))
            }
            (ComputeDtype::F32, Numerics::Native) => {
                route_all::<NativeF32>(&self.cfg, logits).map(|(i, w)| (i, HostWeights::F32(w)))
            }
        }
    }

    /// Weights of the given ids on `logits`, with the config's math.
    fn weigh_rows(&self, logits: &LogitsRef<'_>, ids: ArrayView2<'_, u32>) -> Result<HostWeights, RouteError> {
        match (self.cfg.compute_dtype(), self.cfg.numerics()) {
            (ComputeDtype::F64, _) => weights_all::<NativeF64>(&self.cfg, logits, ids).map(HostWeights::F64),
            (ComputeDtype::F32, Numerics::Portable) => {
                weights_all::<Portable>(&self.cfg, logits, ids).map(HostWeights::F32)
            }
            (ComputeDtype::F32, Numerics::Native) => {
                weights_all::<NativeF32>(&self.cfg, logits, ids).map(HostWeights::F32)
            }
        }
    }
}

impl Router for ReferenceRouter {
    type Logits<'a> = LogitsRef<'a>;
    type Ids = Array2<u32>;
    type Weights = HostWeights;
    type LogitsGrad = HostGrad;

    fn config(&self) -> &RouterConfig {
        &self.cfg
    }
    fn backend_name(&self) -> &'static str {
        "reference"
    }
    fn weights_vjp(
        &self,
        logits: &LogitsRef<'_>,
        ids: &Array2<u32>,
        grad: &HostWeights,
        losses: &LossGrads<'_>,
        _site: &CallSite<'_>,
    ) -> Result<HostGrad, RouteError> {
        let cfg = &self.cfg;
        match (cfg.compute_dtype(), cfg.numerics()) {
            (ComputeDtype::F64, _) => {
                vjp_all::<NativeF64>(cfg, logits, ids.view(), grad.to_f64().view(), losses).map(HostMatrix::F64)
            }
            (ComputeDtype::F32, Numerics::Portable) => vjp_all::<Portable>(
                cfg,
                logits,
                ids.view(),
                grad.to_f32().mapv(crate::math::ftz).view(),
                losses,
            )
            .map(HostMatrix::F32),
            (ComputeDtype::F32, Numerics::Native) => {
                vjp_all::<NativeF32>(cfg, logits, ids.view(), grad.to_f32().view(), losses).map(HostMatrix::F32)
            }
        }
    }
    fn weights_from_host(&self, weights: &HostMatrix) -> Result<HostWeights, RouteError> {
        Ok(host_in_compute_precision(&self.cfg, weights))
    }
    fn logits_grad_to_host(&self, grad: &HostGrad) -> Result<HostGrad, RouteError> {
        Ok(grad.clone())
    }
    fn batch_rows(&self, logits: &LogitsRef<'_>) -> usize {
        logits.rows()
    }
    fn route(
        &self,
        logits: &LogitsRef<'_>,
        _site: &CallSite<'_>,
    ) -> Result<Routed<Array2<u32>, HostWeights>, RouteError> {
        let (ids, weights) = self.route_rows(logits)?;
        Ok(Routed { ids, weights })
    }
    fn weights_for(
        &self,
        logits: &LogitsRef<'_>,
        ids: &Array2<u32>,
        _site: &CallSite<'_>,
    ) -> Result<HostWeights, RouteError> {
        self.weigh_rows(logits, ids.view())
    }
    fn ids_from_host(&self, ids: ArrayView2<'_, u32>) -> Result<Array2<u32>, RouteError> {
        Ok(ids.to_owned())
    }
    fn ids_to_host(&self, ids: &Array2<u32>) -> Result<Array2<u32>, RouteError> {
        Ok(ids.clone())
    }
    fn weights_to_host(&self, weights: &HostWeights) -> Result<HostWeights, RouteError> {
        Ok(weights.clone())
    }
    fn with_host_logits<T, F>(&self, logits: &LogitsRef<'_>, f: F) -> Result<T, RouteError>
    where
        F: for<'l> FnOnce(&LogitsRef<'l>) -> Result<T, RouteError>,
    {
        f(logits)
    }
}
