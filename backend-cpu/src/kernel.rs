//! The CPU router and its per-row kernels.

use crate::fast;
use moe_router_core::backend::with_router_rows_marked;
use moe_router_core::math::{Math, NativeF32, NativeF64, Portable};
use moe_router_core::reference::{select_row, weights_row};
use moe_router_core::{
    CallSite, ComputeDtype, GroupScore, HostGrad, HostMatrix, HostWeights, LogitsRef, LossGrads, Normalization,
    Numerics, ROUTER_SELECTS, RouteError, Routed, Router, RouterConfig, ScoreFunction, SoftmaxPosition, validate_ids,
};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

/// Rows per parallel task.
const CHUNK: usize = 256;
/// Largest K handled by the stack buffers of the fast path.
const MAX_K: usize = 64;

/// The CPU backend router.
#[derive(Debug, Clone)]
pub struct CpuRouter {
    cfg: RouterConfig,
}

impl CpuRouter {
    /// A CPU router for `cfg`.
    pub fn new(cfg: RouterConfig) -> Self {
        CpuRouter { cfg }
    }

    /// Replaces the selection bias (e.g. after an expert-bias update).
    pub fn set_expert_bias(&mut self, bias: Vec<f32>) -> Result<(), moe_router_core::ConfigError> {
        self.cfg.set_expert_bias(bias)
    }

    /// The backward ([`Router::weights_vjp`]) into a caller's f32 buffer `out` `[T, E]`, for
    /// configs that compute in f32: the same values as `weights_vjp`, without allocating (and
    /// faulting in) a fresh `[T, E]` array per call — a training loop can reuse one gradient
    /// buffer. `ids` and `grad` are `[T, K]` in slot order (ids validated as in `weights_vjp`).
    /// Shapes are checked first, each error naming both shapes; on any error the contents of
    /// `out` are unspecified (rows before the failing one may be written).
    pub fn weights_vjp_into(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        grad: ArrayView2<'_, f32>,
        losses: &LossGrads<'_>,
        mut out: ArrayViewMut2<'_, f32>,
    ) -> Result<(), RouteError> {
        self.backward(logits, ids, grad.dim(), || {
            let (t, e) = logits.dim();
            if out.dim() != (t, e) {
                return Err(RouteError::BackwardInput {
                    what: "out",
                    detail: format!(
                        "shape [{}, {}], expected the logits' [{t}, {e}]",
                        out.nrows(),
                        out.ncols()
                    ),
                });
            }
            losses.check(t, e)?;
            let cfg = &self.cfg;
            match (cfg.compute_dtype(), cfg.numerics()) {
                (ComputeDtype::F64, _) => Err(RouteError::unsupported(
                    "cpu",
                    "weights_vjp_into writes f32 and this config computes in f64: use weights_vjp",
                )),
                (ComputeDtype::F32, Numerics::Portable) => {
                    crate::backward::vjp_into::<Portable>(cfg, logits, ids, grad, losses, out.view_mut(), false)
                }
                (ComputeDtype::F32, Numerics::Native) => {
                    crate::backward::vjp_into::<NativeF32>(cfg, logits, ids, grad, losses, out.view_mut(), false)
                }
            }
        })
    }

    /// Routes host logits, returning host ids and weights.
    fn route_rows(&self, logits: &LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError> {
        self.check(logits)?;
        match (self.cfg.compute_dtype(), self.cfg.numerics()) {
            (ComputeDtype::F64, _) => run::<NativeF64>(&self.cfg, logits, None).map(|(i, w)| (i, HostWeights::F64(w))),
            (ComputeDtype::F32, Numerics::Portable) => {
                run::<Portable>(&self.cfg, logits, None).map(|(i, w)| (i, HostWeights::F32(w)))
            }
            (ComputeDtype::F32, Numerics::Native) => {
                run::<NativeF32>(&self.cfg, logits, None).map(|(i, w)| (i, HostWeights::F32(w)))
            }
        }
    }

    /// Weights of the given ids (slot order kept) on host logits.
    fn weigh_rows(&self, logits: &LogitsRef<'_>, ids: ArrayView2<'_, u32>) -> Result<HostWeights, RouteError> {
        self.check(logits)?;
        validate_ids(ids, logits.rows(), self.cfg.num_experts(), self.cfg.top_k(), &[])?;
        match (self.cfg.compute_dtype(), self.cfg.numerics()) {
            (ComputeDtype::F64, _) => run::<NativeF64>(&self.cfg, logits, Some(ids)).map(|(_, w)| HostWeights::F64(w)),
            (ComputeDtype::F32, Numerics::Portable) => {
                run::<Portable>(&self.cfg, logits, Some(ids)).map(|(_, w)| HostWeights::F32(w))
            }
            (ComputeDtype::F32, Numerics::Native) => {
                run::<NativeF32>(&self.cfg, logits, Some(ids)).map(|(_, w)| HostWeights::F32(w))
            }
        }
    }

    /// Replay with fallback rows: forced ids weighed, the rows in `router_rows` (whose ids are
    /// ignored) selected, in one pass over the batch.
    fn replay_rows(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
    ) -> Result<(Array2<u32>, HostWeights), RouteError> {
        self.check(logits)?;
        validate_ids(
            ids,
            logits.rows(),
            self.cfg.num_experts(),
            self.cfg.top_k(),
            router_rows,
        )?;
        with_router_rows_marked(ids, router_rows, |forced| {
            let given = Some(forced);
            match (self.cfg.compute_dtype(), self.cfg.numerics()) {
                (ComputeDtype::F64, _) => {
                    run::<NativeF64>(&self.cfg, logits, given).map(|(i, w)| (i, HostWeights::F64(w)))
                }
                (ComputeDtype::F32, Numerics::Portable) => {
                    run::<Portable>(&self.cfg, logits, given).map(|(i, w)| (i, HostWeights::F32(w)))
                }
                (ComputeDtype::F32, Numerics::Native) => {
                    run::<NativeF32>(&self.cfg, logits, given).map(|(i, w)| (i, HostWeights::F32(w)))
                }
            }
        })
    }

    /// The backward on checked shapes ([`CpuRouter::backward`]); `grad` as given (the kernels
    /// flush it where they read it).
    fn vjp_checked(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        grad: &HostMatrix,
        losses: &LossGrads<'_>,
    ) -> Result<HostGrad, RouteError> {
        use crate::backward::vjp;
        let cfg = &self.cfg;
        match (cfg.compute_dtype(), cfg.numerics(), grad) {
            (ComputeDtype::F64, _, HostMatrix::F64(g)) => {
                vjp::<NativeF64>(cfg, logits, ids, g.view(), losses).map(HostMatrix::F64)
            }
            (ComputeDtype::F64, _, HostMatrix::F32(g)) => {
                vjp::<NativeF64>(cfg, logits, ids, g.mapv(f64::from).view(), losses).map(HostMatrix::F64)
            }
            (ComputeDtype::F32, Numerics::Portable, HostMatrix::F32(g)) => {
                vjp::<Portable>(cfg, logits, ids, g.view(), losses).map(HostMatrix::F32)
            }
            (ComputeDtype::F32, Numerics::Native, HostMatrix::F32(g)) => {
                vjp::<NativeF32>(cfg, logits, ids, g.view(), losses).map(HostMatrix::F32)
            }
            (ComputeDtype::F32, Numerics::Portable, g) => {
                vjp::<Portable>(cfg, logits, ids, g.to_f32().view(), losses).map(HostMatrix::F32)
            }
            (ComputeDtype::F32, Numerics::Native, g) => {
                vjp::<NativeF32>(cfg, logits, ids, g.to_f32().view(), losses).map(HostMatrix::F32)
            }
        }
    }

    /// A backward call: the checks of the reference's order — the config and the logits'
    /// shape, the ids' shape, then `body` (the upstream gradient's shape, the call's own checks,
    /// the kernels, which check the ids' values as they read them or first). On any error of
    /// `body`, a bad id ([`validate_ids`]: the first bad row) is reported instead, as the
    /// reference checks every id before anything else.
    fn backward<T>(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        grad_dim: (usize, usize),
        body: impl FnOnce() -> Result<T, RouteError>,
    ) -> Result<T, RouteError> {
        self.check(logits)?;
        let (t, e) = logits.dim();
        let k = self.cfg.top_k();
        if ids.dim() != (t, k) {
            // validate_ids's shape error.
            validate_ids(ids, t, e, k, &[])?;
        }
        let res = if grad_dim != (t, k) {
            Err(RouteError::GradShape {
                expected_rows: t,
                expected_k: k,
                rows: grad_dim.0,
                cols: grad_dim.1,
            })
        } else {
            body()
        };
        res.map_err(|err| validate_ids(ids, t, e, k, &[]).err().unwrap_or(err))
    }

    fn check(&self, logits: &LogitsRef<'_>) -> Result<(), RouteError> {
        self.cfg.check_ready()?;
        let (t, e) = logits.dim();
        if e != self.cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: self.cfg.num_experts(),
                rows: t,
                cols: e,
            });
        }
        Ok(())
    }
}

impl Router for CpuRouter {
    type Logits<'a> = LogitsRef<'a>;
    type Ids = Array2<u32>;
    type Weights = HostWeights;
    type LogitsGrad = HostGrad;

    fn config(&self) -> &RouterConfig {
        &self.cfg
    }
    fn backend_name(&self) -> &'static str {
        "cpu"
    }
    fn weights_vjp(
        &self,
        logits: &LogitsRef<'_>,
        ids: &Array2<u32>,
        grad: &HostWeights,
        losses: &LossGrads<'_>,
        _site: &CallSite<'_>,
    ) -> Result<HostGrad, RouteError> {
        self.backward(logits, ids.view(), grad.dim(), || {
            self.vjp_checked(logits, ids.view(), grad, losses)
        })
    }
    /// As the trait's default (same checks, same result), without its copies: the ids and the
    /// upstream gradient are read in place and the `[T, E]` gradient is returned as computed
    /// (the host is this backend's device, so there is nothing to download).
    fn weights_vjp_host_at(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        grad: &HostMatrix,
        losses: &LossGrads<'_>,
        _site: &CallSite<'_>,
    ) -> Result<HostGrad, RouteError> {
        self.backward(logits, ids, grad.dim(), || {
            let (t, e) = logits.dim();
            losses.check(t, e)?;
            self.vjp_checked(logits, ids, grad, losses)
        })
    }
    fn weights_from_host(&self, weights: &HostMatrix) -> Result<HostWeights, RouteError> {
        Ok(moe_router_core::reference::host_in_compute_precision(
            &self.cfg, weights,
        ))
    }
    fn logits_grad_to_host(&self, grad: &HostGrad) -> Result<HostGrad, RouteError> {
        Ok(grad.clone())
    }
    fn first_differing_row(&self, a: &Array2<u32>, b: &Array2<u32>) -> Result<Option<usize>, RouteError> {
        if a.dim() != b.dim() {
            return Ok(Some(0));
        }
        Ok(a.outer_iter().zip(b.outer_iter()).position(|(x, y)| x != y))
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
    fn replay_with_fallback(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
        _site: &CallSite<'_>,
    ) -> Result<Routed<Array2<u32>, HostWeights>, RouteError> {
        let (ids, weights) = self.replay_rows(logits, ids, router_rows)?;
        Ok(Routed { ids, weights })
    }
}

/// Per-thread scratch of the generic kernel.
pub(crate) struct Scratch<F> {
    z: Vec<F>,
    keys: Vec<F>,
    biased: Vec<F>,
    masked: Vec<F>,
    gscore: Vec<F>,
    gkeep: Vec<bool>,
}

impl<F: Float> Scratch<F> {
    fn new(e: usize, groups: usize) -> Self {
        Scratch {
            z: Vec::with_capacity(e),
            keys: vec![F::zero(); e],
            biased: vec![F::zero(); e],
            masked: vec![F::zero(); e],
            gscore: vec![F::zero(); groups],
            gkeep: vec![false; groups],
        }
    }
}

/// The numerics modes of the CPU kernels: the f32 modes take the fast kernels of
/// [`crate::fast`] where the rule has one, f64 the generic kernel.
pub(crate) trait CpuMath: Math {
    /// The fast-kernel plan of `cfg` in this mode (`None`: the generic kernel).
    fn plan(cfg: &RouterConfig) -> Option<fast::Plan>;
    /// Routes or weighs the rows `base..` of one chunk (`ids`/`w` are `[rows, K]` row-major).
    #[allow(clippy::too_many_arguments)]
    fn rows(
        plan: Option<&fast::Plan>,
        cfg: &RouterConfig,
        logits: &LogitsRef<'_>,
        base: usize,
        ids: &mut [u32],
        w: &mut [Self::F],
        s: &mut Scratch<Self::F>,
        fs: &mut fast::FastScratch,
        route: bool,
    ) -> Result<(), RouteError>;
}

impl CpuMath for NativeF64 {
    fn plan(_cfg: &RouterConfig) -> Option<fast::Plan> {
        None
    }
    fn rows(
        _plan: Option<&fast::Plan>,
        cfg: &RouterConfig,
        logits: &LogitsRef<'_>,
        base: usize,
        ids: &mut [u32],
        w: &mut [f64],
        s: &mut Scratch<f64>,
        _fs: &mut fast::FastScratch,
        route: bool,
    ) -> Result<(), RouteError> {
        chunk::<Self>(cfg, logits, base, ids, w, s, route)
    }
}

macro_rules! fast_f32 {
    ($m:ty) => {
        impl CpuMath for $m {
            fn plan(cfg: &RouterConfig) -> Option<fast::Plan> {
                let p = fast::Plan::new(cfg, <$m as fast::FastF32>::PORTABLE);
                (p.rule != fast::Rule::Generic).then_some(p)
            }
            fn rows(
                plan: Option<&fast::Plan>,
                cfg: &RouterConfig,
                logits: &LogitsRef<'_>,
                base: usize,
                ids: &mut [u32],
                w: &mut [f32],
                s: &mut Scratch<f32>,
                fs: &mut fast::FastScratch,
                route: bool,
            ) -> Result<(), RouteError> {
                match plan {
                    Some(p) => fast::chunk::<Self>(p, cfg, logits, base, ids, w, fs, s, route),
                    None => chunk::<Self>(cfg, logits, base, ids, w, s, route),
                }
            }
        }
    };
}
fast_f32!(Portable);
fast_f32!(NativeF32);

/// Routes (ids = None) or weighs given ids over all rows in parallel chunks; given rows marked
/// [`ROUTER_SELECTS`] are routed.
#[allow(clippy::type_complexity)]
fn run<M: CpuMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    given: Option<ArrayView2<'_, u32>>,
) -> Result<(Array2<u32>, Array2<M::F>), RouteError> {
    let (t, e) = logits.dim();
    let k = cfg.top_k();
    let mut ids = match given {
        Some(g) => g.to_owned(),
        None => Array2::<u32>::zeros((t, k)),
    };
    let mut w = Array2::<M::F>::from_elem((t, k), M::F::zero());
    let groups = cfg.group_limit().map_or(1, |g| g.num_groups);
    let route = given.is_none();
    let plan = M::plan(cfg);
    let ep = if plan.is_some() {
        e.div_ceil(fast::W) * fast::W
    } else {
        0
    };
    ids.axis_chunks_iter_mut(Axis(0), CHUNK)
        .into_par_iter()
        .zip(w.axis_chunks_iter_mut(Axis(0), CHUNK).into_par_iter())
        .enumerate()
        .try_for_each_init(
            || (Scratch::<M::F>::new(e, groups), fast::FastScratch::new(ep)),
            |(s, fs), (ci, (mut ids_c, mut w_c))| -> Result<(), RouteError> {
                let ids_s = ids_c.as_slice_mut().ok_or_else(|| RouteError::BufferTooSmall {
                    buffer: "ids chunk",
                    detail: "not contiguous".into(),
                })?;
                let w_s = w_c.as_slice_mut().ok_or_else(|| RouteError::BufferTooSmall {
                    buffer: "weights chunk",
                    detail: "not contiguous".into(),
                })?;
                M::rows(plan.as_ref(), cfg, logits, ci * CHUNK, ids_s, w_s, s, fs, route)
            },
        )?;
    Ok((ids, w))
}

/// One row by the generic kernel: widen, then route (`route`, with the sigmoid pruning when
/// `prune`) or weigh the given ids.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route_one<M: Math>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    row: usize,
    ids: &mut [u32],
    w: &mut [M::F],
    s: &mut Scratch<M::F>,
    route: bool,
    prune: bool,
) -> Result<(), RouteError> {
    widen::<M>(logits, row, &mut s.z)?;
    if route {
        route_row::<M>(cfg, s, row, ids, w, prune)
    } else {
        weigh_row::<M>(cfg, &s.z, row, ids, w, None)
    }
}

/// Routes or weighs the rows `base..` of one chunk (`ids`/`w` are `[rows, K]` row-major),
/// compiled for AVX2 and SSE4.1 with run-time selection.
#[multiversion::multiversion(targets("x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt", "x86_64+sse4.1"))]
fn chunk<M: Math>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    base: usize,
    ids: &mut [u32],
    w: &mut [M::F],
    s: &mut Scratch<M::F>,
    route: bool,
) -> Result<(), RouteError> {
    let k = cfg.top_k();
    for (r, (ids_s, w_s)) in ids.chunks_exact_mut(k).zip(w.chunks_exact_mut(k)).enumerate() {
        let row = base + r;
        widen::<M>(logits, row, &mut s.z)?;
        // Replay rows marked ROUTER_SELECTS (fallback rows) are selected like routed rows.
        if route || ids_s[0] == ROUTER_SELECTS {
            route_row::<M>(cfg, s, row, ids_s, w_s, true)?;
        } else {
            weigh_row::<M>(cfg, &s.z, row, ids_s, w_s, None)?;
        }
    }
    Ok(())
}

/// Widens a row into `z`, checking for NaN and +∞.
#[inline(always)]
fn widen<M: Math>(logits: &LogitsRef<'_>, row: usize, z: &mut Vec<M::F>) -> Result<(), RouteError> {
    match logits {
        LogitsRef::F32(a) if a.row(row).as_slice().is_some() => {
            let r = a.row(row);
            let sl = r.as_slice().unwrap_or(&[]);
            z.clear();
            z.extend(sl.iter().map(|&x| M::from_f32(x)));
        }
        _ => logits.widen_row(row, z, M::from_f32, M::from_f64),
    }
    let inf = M::F::infinity();
    // Branch-free scan first; locate the culprit only on failure.
    let bad = z.iter().fold(false, |acc, &x| acc | (x.is_nan() | (x == inf)));
    if bad {
        let e = z.iter().position(|&x| x.is_nan() || x == inf).unwrap_or(0);
        return Err(RouteError::NonFiniteLogit {
            row,
            expert: e,
            value: format!("{:?}", z[e]),
        });
    }
    Ok(())
}

/// Inserts (key, id) into the descending top list if it beats the current last entry. Experts
/// arrive in ascending id order, so "strictly greater" keeps ties with the lower id.
#[inline(always)]
fn insert<F: Float>(top_k: &mut [F], top_i: &mut [u32], key: F, id: u32) {
    let k = top_k.len();
    if key.partial_cmp(&top_k[k - 1]) != Some(std::cmp::Ordering::Greater) {
        return;
    }
    let mut j = k - 1;
    while j > 0 && key > top_k[j - 1] {
        top_k[j] = top_k[j - 1];
        top_i[j] = top_i[j - 1];
        j -= 1;
    }
    top_k[j] = key;
    top_i[j] = id;
}

/// Column width of the block-maximum filter.
const S: usize = 32;

/// Branch-free insertion of (key, id) into a descending list: every slot takes its new value by
/// selects, so an unpredictable key costs no misprediction. Equal keys stay ahead of the newcomer
/// (ids arrive ascending, so ties keep the lower id). A key not above the last entry changes
/// nothing.
#[inline(always)]
fn insert_bf<F: Float>(tk: &mut [F], ti: &mut [u32], key: F, id: u32) {
    let k = tk.len();
    for j in (1..k).rev() {
        let gt = key > tk[j];
        let gt_prev = key > tk[j - 1];
        let (nk, ni) = if gt_prev { (tk[j - 1], ti[j - 1]) } else { (key, id) };
        tk[j] = if gt { nk } else { tk[j] };
        ti[j] = if gt { ni } else { ti[j] };
    }
    let gt = key > tk[0];
    tk[0] = if gt { key } else { tk[0] };
    ti[0] = if gt { id } else { ti[0] };
}

/// Branch-free insertion of a value into a descending list of values (no ids).
#[inline(always)]
fn insert_value<F: Float>(tk: &mut [F], key: F) {
    for j in (1..tk.len()).rev() {
        let m = if key < tk[j - 1] { key } else { tk[j - 1] };
        tk[j] = if m > tk[j] { m } else { tk[j] };
    }
    tk[0] = if key > tk[0] { key } else { tk[0] };
}

/// Exact top-K (key descending, ties → lower id) of a full row of keys; `tk`/`ti` start at −∞.
/// Returns false when fewer than K keys exceed −∞ (the caller then uses the reference path).
///
/// Filter: view the row as rows of 32 and take the 32 column maxima (vertical, vectorised). Their
/// K-th largest, τ, is a lower bound of the K-th largest key (the K largest column maxima are K
/// distinct keys), so every selected key is ≥ τ. Only keys ≥ τ (found with a vectorised compare
/// into a bit mask) are inserted, in ascending id order — the same result as inserting every key.
#[inline(always)]
fn top_k_row_n<F: Float, const N: usize>(keys: &[F], tk: &mut [F], ti: &mut [u32]) -> bool {
    let k = if N == 0 { tk.len() } else { N };
    let (tk, ti) = (&mut tk[..k], &mut ti[..k]);
    let e = keys.len();
    let tau = if e >= 2 * S && k <= S {
        let full = e / S;
        let mut colmax = [F::neg_infinity(); S];
        for r in 0..full {
            for (c, &x) in colmax.iter_mut().zip(&keys[r * S..(r + 1) * S]) {
                *c = if x > *c { x } else { *c };
            }
        }
        let mut ck = [F::neg_infinity(); S];
        for &c in &colmax {
            insert_value(&mut ck[..k], c);
        }
        ck[k - 1]
    } else {
        F::neg_infinity()
    };
    for (r, block) in keys.chunks(S).enumerate() {
        let mut m: u32 = 0;
        for (j, &x) in block.iter().enumerate() {
            m |= u32::from(x >= tau) << j;
        }
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            m &= m - 1;
            insert_bf(tk, ti, block[j], (r * S + j) as u32);
        }
    }
    tk[k - 1] != F::neg_infinity()
}

/// [`top_k_row_n`] with K known at compile time for the common K (lists live in registers).
#[inline(always)]
fn top_k_row<F: Float>(keys: &[F], tk: &mut [F], ti: &mut [u32]) -> bool {
    match tk.len() {
        1 => top_k_row_n::<F, 1>(keys, tk, ti),
        2 => top_k_row_n::<F, 2>(keys, tk, ti),
        4 => top_k_row_n::<F, 4>(keys, tk, ti),
        6 => top_k_row_n::<F, 6>(keys, tk, ti),
        8 => top_k_row_n::<F, 8>(keys, tk, ti),
        _ => top_k_row_n::<F, 0>(keys, tk, ti),
    }
}

/// Top-K of `keys` restricted to experts whose group is kept (`masked` is scratch of length E);
/// false when a −∞ key is selected (the reference's global tie order on −∞ then decides; the
/// caller falls back to it).
#[inline(always)]
fn top_k_keys<F: Float>(keys: &[F], per: usize, keep: Option<&[bool]>, masked: &mut [F], out: &mut [u32]) -> bool {
    let k = out.len();
    let mut tk = [F::neg_infinity(); MAX_K];
    let mut ti = [u32::MAX; MAX_K];
    let (tk, ti) = (&mut tk[..k], &mut ti[..k]);
    let ok = match keep {
        None => top_k_row(keys, tk, ti),
        Some(kp) => {
            for ((gi, src), dst) in keys.chunks(per).enumerate().zip(masked.chunks_mut(per)) {
                if kp[gi] {
                    dst.copy_from_slice(src);
                } else {
                    dst.iter_mut().for_each(|x| *x = F::neg_infinity());
                }
            }
            top_k_row(masked, tk, ti)
        }
    };
    if !ok {
        return false;
    }
    out.copy_from_slice(ti);
    true
}

#[inline(always)]
fn route_row<M: Math>(
    cfg: &RouterConfig,
    s: &mut Scratch<M::F>,
    row: usize,
    ids: &mut [u32],
    w: &mut [M::F],
    prune: bool,
) -> Result<(), RouteError> {
    let k = cfg.top_k();
    let Scratch {
        z,
        keys: kbuf,
        biased,
        masked,
        gscore,
        gkeep,
    } = s;
    let z: &[M::F] = z;
    if k > MAX_K {
        return slow_row::<M>(cfg, z, row, ids, w);
    }
    let per = cfg.experts_per_group();
    if prune
        && M::SIGMOID_PRUNABLE
        && cfg.score() == ScoreFunction::Sigmoid
        && sigmoid_pruned::<M>(cfg, z, kbuf, masked, gscore, gkeep, row, ids, w)?
    {
        return Ok(());
    }
    let softmax_before = cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
    // Keys.
    let keys: &[M::F] = match cfg.score() {
        ScoreFunction::Softmax if !softmax_before => z,
        ScoreFunction::Softmax => {
            let m = z
                .iter()
                .copied()
                .fold(M::F::neg_infinity(), |a, b| if b > a { b } else { a });
            if m == M::F::neg_infinity() {
                return Err(RouteError::AllMasked { row });
            }
            let mut sum = M::F::zero();
            for (kk, &x) in kbuf.iter_mut().zip(z) {
                *kk = M::exp(x - m);
            }
            for &x in kbuf.iter() {
                sum = sum + x;
            }
            for kk in kbuf.iter_mut() {
                *kk = M::div(*kk, sum);
            }
            kbuf
        }
        ScoreFunction::Sigmoid => {
            M::sigmoid_slice(z, kbuf);
            kbuf
        }
        ScoreFunction::SqrtSoftplus => {
            M::sqrt_softplus_slice(z, kbuf);
            kbuf
        }
    };
    // Unbiased scores stay in `keys` for the weights; biased keys go to their own buffer.
    let sel_keys: &[M::F] = if let Some(b) = cfg.expert_bias() {
        for ((o, &x), &bb) in biased.iter_mut().zip(keys).zip(b) {
            *o = M::ftz(x + M::from_f32(bb));
        }
        biased
    } else {
        keys
    };
    // Group limit.
    let keep: Option<&[bool]> = if let Some(g) = cfg.group_limit() {
        for (gi, chunk) in sel_keys.chunks(per).enumerate() {
            gscore[gi] = match g.score {
                GroupScore::Max => chunk
                    .iter()
                    .copied()
                    .fold(M::F::neg_infinity(), |a, b| if b > a { b } else { a }),
                GroupScore::SumTopN(n) => {
                    let mut tk = [M::F::neg_infinity(); MAX_K];
                    let mut ti = [0u32; MAX_K];
                    if n > MAX_K {
                        return slow_row::<M>(cfg, z, row, ids, w);
                    }
                    let (tk, ti) = (&mut tk[..n], &mut ti[..n]);
                    let mut filled = 0;
                    for (j, &key) in chunk.iter().enumerate() {
                        if filled < n {
                            let mut p = filled;
                            while p > 0 && key > tk[p - 1] {
                                tk[p] = tk[p - 1];
                                ti[p] = ti[p - 1];
                                p -= 1;
                            }
                            tk[p] = key;
                            ti[p] = j as u32;
                            filled += 1;
                        } else {
                            insert(tk, ti, key, j as u32);
                        }
                    }
                    let mut sum = tk[0];
                    for &x in &tk[1..] {
                        sum = M::ftz(sum + x);
                    }
                    sum
                }
            };
        }
        let mut order_k = [M::F::neg_infinity(); 256];
        let mut order_i = [0u32; 256];
        if g.num_groups > 256 {
            return slow_row::<M>(cfg, z, row, ids, w);
        }
        let (ok, oi) = (&mut order_k[..g.groups_selected], &mut order_i[..g.groups_selected]);
        let mut filled = 0;
        for (gi, &key) in gscore.iter().enumerate().take(g.num_groups) {
            if filled < ok.len() {
                let mut p = filled;
                while p > 0 && key > ok[p - 1] {
                    ok[p] = ok[p - 1];
                    oi[p] = oi[p - 1];
                    p -= 1;
                }
                ok[p] = key;
                oi[p] = gi as u32;
                filled += 1;
            } else {
                insert(ok, oi, key, gi as u32);
            }
        }
        gkeep.iter_mut().for_each(|x| *x = false);
        for &gi in oi.iter() {
            gkeep[gi as usize] = true;
        }
        Some(&gkeep[..])
    } else {
        None
    };
    if !top_k_keys(sel_keys, per, keep, masked, ids) {
        return slow_row::<M>(cfg, z, row, ids, w);
    }
    let scores = if cfg.score() != ScoreFunction::Softmax || softmax_before {
        Some(keys)
    } else {
        None
    };
    weigh_row::<M>(cfg, z, row, ids, w, scores)
}

/// Portable sigmoid routing by pruning: select on cheap keys `1/(1+exp(-z)) + b` (same `exp`,
/// hardware division), which differ from the exact keys by at most `δ = 2⁻²⁰·(2 + max|b|)`
/// (portable division is within 2 ulp, the hardware one within ½ ulp, and the sum with the bias
/// rounds once more); then compute exact keys only where the cheap ones cannot decide.
///
/// - Groups: if the gap between the g-th and (g+1)-th cheap group score exceeds the group score's
///   error bound, the kept set is the exact one; otherwise this returns `false` and the caller
///   takes the exact path.
/// - Experts: with τ̃ the K-th largest cheap key among kept experts, every expert of the exact
///   top-K (and every expert tied with its K-th key) has a cheap key ≥ τ̃ − 2δ; those candidates
///   get exact keys and the exact top-K among them, in ascending id order, is the exact result.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn sigmoid_pruned<M: Math>(
    cfg: &RouterConfig,
    z: &[M::F],
    approx: &mut [M::F],
    masked: &mut [M::F],
    gscore: &mut [M::F],
    gkeep: &mut [bool],
    row: usize,
    ids: &mut [u32],
    w: &mut [M::F],
) -> Result<bool, RouteError> {
    let k = cfg.top_k();
    let one = M::F::one();
    let bias = cfg.expert_bias();
    let bmax = bias.map_or(0.0, |b| b.iter().fold(0.0f32, |a, &x| a.max(x.abs())));
    let delta = M::from_f64((2.0 + f64::from(bmax)) * 2f64.powi(-20));
    match bias {
        Some(b) => {
            for ((a, &x), &bb) in approx.iter_mut().zip(z).zip(b) {
                *a = one / (one + M::exp(-x)) + M::from_f32(bb);
            }
        }
        None => {
            for (a, &x) in approx.iter_mut().zip(z) {
                *a = one / (one + M::exp(-x));
            }
        }
    }
    let per = cfg.experts_per_group();
    let mut all_kept = true;
    if let Some(g) = cfg.group_limit() {
        let n = match g.score {
            GroupScore::SumTopN(n) => n,
            GroupScore::Max => 1,
        };
        if n > MAX_K || g.groups_selected + 1 > MAX_K.min(g.num_groups + 1) {
            return Ok(false);
        }
        for (gi, chunk) in approx.chunks(per).enumerate() {
            let mut top = [M::F::neg_infinity(); MAX_K];
            for &x in chunk {
                insert_value(&mut top[..n], x);
            }
            let mut sum = top[0];
            for &x in &top[1..n] {
                sum = sum + x;
            }
            gscore[gi] = sum;
        }
        let sel = g.groups_selected;
        if sel < g.num_groups {
            let mut gk = [M::F::neg_infinity(); MAX_K];
            let mut gi_ = [u32::MAX; MAX_K];
            for (gi, &x) in gscore.iter().enumerate().take(g.num_groups) {
                insert_bf(&mut gk[..sel + 1], &mut gi_[..sel + 1], x, gi as u32);
            }
            let nf = n as f64;
            let margin = delta * M::from_f64(4.0 * nf * nf + 4.0);
            if (gk[sel - 1] - gk[sel]).partial_cmp(&margin) != Some(std::cmp::Ordering::Greater) {
                return Ok(false);
            }
            gkeep.iter_mut().for_each(|x| *x = false);
            for &gi in &gi_[..sel] {
                gkeep[gi as usize] = true;
            }
            all_kept = false;
        }
    }
    for ((gi, src), dst) in approx.chunks(per).enumerate().zip(masked.chunks_mut(per)) {
        if all_kept || gkeep[gi] {
            dst.copy_from_slice(src);
        } else {
            dst.iter_mut().for_each(|x| *x = M::F::neg_infinity());
        }
    }
    let mut tk = [M::F::neg_infinity(); MAX_K];
    let mut ti = [u32::MAX; MAX_K];
    if !top_k_row(masked, &mut tk[..k], &mut ti[..k]) {
        return Ok(false);
    }
    let thr = tk[k - 1] - (delta + delta);
    let mut ek = [M::F::neg_infinity(); MAX_K];
    let mut ei = [u32::MAX; MAX_K];
    for (r, block) in masked.chunks(S).enumerate() {
        let mut m: u32 = 0;
        for (j, &x) in block.iter().enumerate() {
            m |= u32::from(x >= thr) << j;
        }
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            m &= m - 1;
            let id = r * S + j;
            let mut key = M::sigmoid(z[id]);
            if let Some(b) = bias {
                key = M::ftz(key + M::from_f32(b[id]));
            }
            insert_bf(&mut ek[..k], &mut ei[..k], key, id as u32);
        }
    }
    if ek[k - 1] == M::F::neg_infinity() {
        return Ok(false);
    }
    ids.copy_from_slice(&ei[..k]);
    weigh_row::<M>(cfg, z, row, ids, w, None)?;
    Ok(true)
}

/// Every score function refuses a row whose logits are all −∞ (DESIGN §2, one rule): softmax
/// finds it on its own, sigmoid and sqrt-softplus would route on the bias alone. The row is only
/// scanned when the K chosen logits are −∞, which a row with a finite logit rarely gives.
#[inline(always)]
fn all_masked_row<M: Math>(z: &[M::F], ids: &[u32], row: usize) -> Result<(), RouteError> {
    let ninf = M::F::neg_infinity();
    if ids.iter().all(|&i| z[i as usize] == ninf) && z.iter().all(|&x| x == ninf) {
        return Err(RouteError::AllMasked { row });
    }
    Ok(())
}

/// Weights for `ids` on widened row `z`; `scores` holds the precomputed unbiased scores when the
/// caller has them (sigmoid, sqrt-softplus, softmax-before).
#[inline(always)]
fn weigh_row<M: Math>(
    cfg: &RouterConfig,
    z: &[M::F],
    row: usize,
    ids: &[u32],
    w: &mut [M::F],
    scores: Option<&[M::F]>,
) -> Result<(), RouteError> {
    match (cfg.score(), cfg.softmax_position()) {
        (ScoreFunction::Softmax, SoftmaxPosition::BeforeTopK) => {
            if let Some(s) = scores {
                for (x, &i) in w.iter_mut().zip(ids) {
                    *x = s[i as usize];
                }
            } else {
                let m = z
                    .iter()
                    .copied()
                    .fold(M::F::neg_infinity(), |a, b| if b > a { b } else { a });
                if m == M::F::neg_infinity() {
                    return Err(RouteError::AllMasked { row });
                }
                let mut sum = M::F::zero();
                for &x in z {
                    sum = sum + M::exp(x - m);
                }
                for (x, &i) in w.iter_mut().zip(ids) {
                    *x = M::div(M::exp(z[i as usize] - m), sum);
                }
            }
        }
        (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK) => {
            let mut m = M::F::neg_infinity();
            for &i in ids {
                let v = z[i as usize];
                if v > m {
                    m = v;
                }
            }
            if m == M::F::neg_infinity() {
                return Err(RouteError::AllMasked { row });
            }
            let mut sum = M::F::zero();
            for (x, &i) in w.iter_mut().zip(ids) {
                *x = M::exp(z[i as usize] - m);
                sum = sum + *x;
            }
            for x in w.iter_mut() {
                *x = M::div(*x, sum);
            }
        }
        (ScoreFunction::Sigmoid, _) => {
            all_masked_row::<M>(z, ids, row)?;
            for (x, &i) in w.iter_mut().zip(ids) {
                *x = match scores {
                    Some(s) => s[i as usize],
                    None => M::sigmoid(z[i as usize]),
                };
            }
        }
        (ScoreFunction::SqrtSoftplus, _) => {
            all_masked_row::<M>(z, ids, row)?;
            for (x, &i) in w.iter_mut().zip(ids) {
                *x = match scores {
                    Some(s) => s[i as usize],
                    None => M::sqrt_softplus(z[i as usize]),
                };
            }
        }
    }
    match cfg.normalization() {
        Normalization::None => {}
        Normalization::Sum { eps } => {
            let mut s = M::F::zero();
            for &x in w.iter() {
                s = s + x;
            }
            let d = s + M::from_f32(eps);
            for x in w.iter_mut() {
                *x = M::div(*x, d);
            }
        }
        Normalization::SumClampMin { min } => {
            let mut s = M::F::zero();
            for &x in w.iter() {
                s = s + x;
            }
            let mn = M::from_f32(min);
            let d = if s > mn { s } else { mn };
            for x in w.iter_mut() {
                *x = M::div(*x, d);
            }
        }
    }
    let scale = M::from_f32(cfg.scaling_factor());
    for x in w.iter_mut() {
        *x = M::ftz(*x * scale);
    }
    Ok(())
}

/// The reference path for the rare rows the fast path does not decide (−∞ among the selected,
/// very large K or group counts).
#[cold]
fn slow_row<M: Math>(
    cfg: &RouterConfig,
    z: &[M::F],
    row: usize,
    ids: &mut [u32],
    w: &mut [M::F],
) -> Result<(), RouteError> {
    let sel = select_row::<M>(cfg, z, cfg.expert_bias(), row)?;
    let ww = weights_row::<M>(cfg, z, &sel, row)?;
    ids.copy_from_slice(&sel);
    w.copy_from_slice(&ww);
    Ok(())
}
