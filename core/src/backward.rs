//! The backward pass (DESIGN §2b): the gradient of `Σ g∘w + a·aux + c·zloss` with respect to the
//! logits, for the weights `w` of given ids (routed or replayed). Selection is piecewise constant
//! and passes no gradient; the weights of the live logits do.
//!
//! This module is the one definition every backend mirrors:
//! - [`LossGrads`]: the scalars `a` and `c` and what the aux-loss variants need (sequence lengths,
//!   global counts);
//! - [`AuxTable`]: the aux loss reduced to one coefficient per (sequence, expert), built on the
//!   host from token counts by [`AuxTable::build`] so that every backend uses the same bits;
//! - [`vjp_row`]: one row of the gradient, written against [`Math`]; in portable mode every
//!   result is flushed by the subnormal rule and every sum has a fixed order, so the CUDA and WGSL
//!   kernels that mirror it produce the same bits.
//!
//! Order of the terms of one row: the weights' term (scale, normalisation, score function), then
//! `+` the aux term, then `+` the z-loss term, then `0` wherever the logit is `−∞`.

use crate::config::{AuxLossKind, Normalization, RouterConfig, ScoreFunction, SoftmaxPosition};
use crate::error::RouteError;
use crate::logits::LogitsRef;
use crate::math::Math;
use crate::reference::widen_checked;
use num_traits::{Float, One, Zero};

/// What the backward differentiates besides the weights: the factors of the aux loss and the
/// z-loss that the same call reports, and the inputs the aux-loss variants need.
///
/// `LossGrads::default()` differentiates the weights only.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossGrads<'a> {
    /// `a`: the upstream gradient of the aux loss (the sum of the config's aux-loss variants, as
    /// [`crate::stats`] computes it). 0 adds nothing.
    pub aux_loss: f64,
    /// `c`: the upstream gradient of the z-loss (`coeff · mean_t lse_t²`). 0 adds nothing.
    pub z_loss: f64,
    /// Lengths of the consecutive sequences of the batch, for the per-sequence aux loss
    /// (`seq_aux_loss`); `None` treats the batch as one sequence (as `moe-router route` does).
    pub seq_lens: Option<&'a [usize]>,
    /// Token counts per expert of the global aux loss (`global_aux_loss`: the running mean over
    /// the micro-batches of the global batch, [`crate::stats::GlobalAuxLoss::counts`]); `None`
    /// uses this batch's own counts (a fresh accumulator, as `moe-router route` does).
    pub global_counts: Option<&'a [f64]>,
}

impl<'a> LossGrads<'a> {
    /// Sets `a`, the factor of the aux loss.
    pub fn aux_loss(mut self, a: f64) -> Self {
        self.aux_loss = a;
        self
    }
    /// Sets `c`, the factor of the z-loss.
    pub fn z_loss(mut self, c: f64) -> Self {
        self.z_loss = c;
        self
    }
    /// Sets the sequence lengths of the per-sequence aux loss.
    pub fn seq_lens(mut self, lens: &'a [usize]) -> Self {
        self.seq_lens = Some(lens);
        self
    }
    /// Sets the global aux loss's token counts.
    pub fn global_counts(mut self, counts: &'a [f64]) -> Self {
        self.global_counts = Some(counts);
        self
    }

    /// Whether the aux term is present for `cfg`: `a ≠ 0` and a variant with a positive
    /// coefficient.
    pub fn has_aux(&self, cfg: &RouterConfig) -> bool {
        self.aux_loss != 0.0 && cfg.aux_losses().iter().any(|l| l.coeff > 0.0)
    }

    /// Whether the z-loss term is present for `cfg`: `c ≠ 0` and a positive z-loss coefficient.
    pub fn has_z_loss(&self, cfg: &RouterConfig) -> bool {
        self.z_loss != 0.0 && cfg.z_loss_coeff() > 0.0
    }

    /// The factor of the z-loss term of a batch of `rows` rows: `c · coeff · 2 / T` (0 when the
    /// term is absent).
    pub fn z_factor(&self, cfg: &RouterConfig, rows: usize) -> f64 {
        if !self.has_z_loss(cfg) || rows == 0 {
            return 0.0;
        }
        self.z_loss * cfg.z_loss_coeff() * 2.0 / rows as f64
    }

    /// Checks the inputs against a batch of `rows` rows and E experts: the sequence lengths
    /// must cover the rows, the global counts must have E entries, both scalars finite.
    pub fn check(&self, rows: usize, num_experts: usize) -> Result<(), RouteError> {
        for (name, v) in [("grad_aux_loss", self.aux_loss), ("grad_z_loss", self.z_loss)] {
            if !v.is_finite() {
                return Err(RouteError::BackwardInput {
                    what: name,
                    detail: format!("must be finite, got {v}"),
                });
            }
        }
        if let Some(l) = self.seq_lens {
            let total: usize = l.iter().sum();
            if total != rows {
                return Err(RouteError::LayoutRows {
                    layout_rows: total,
                    batch_rows: rows,
                });
            }
        }
        if let Some(g) = self.global_counts {
            if g.len() != num_experts {
                return Err(RouteError::BackwardInput {
                    what: "global_counts",
                    detail: format!("has {} entries, expected num_experts = {num_experts}", g.len()),
                });
            }
            if let Some((e, v)) = g.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
                return Err(RouteError::BackwardInput {
                    what: "global_counts",
                    detail: format!("entry {e} is {v}; counts are finite and >= 0"),
                });
            }
        }
        Ok(())
    }
}

/// Sequence index of every row for `seq_lens` (consecutive sequences covering the rows).
pub fn row_sequences(seq_lens: &[usize]) -> Vec<u32> {
    let mut out = Vec::with_capacity(seq_lens.iter().sum());
    for (s, &l) in seq_lens.iter().enumerate() {
        out.extend(std::iter::repeat_n(s as u32, l));
    }
    out
}

/// The aux-loss token counts of one row: its K largest logits (ties → lower expert id, `−∞`
/// allowed), the experts Megatron's aux loss counts (`topk` over the aux scores, which are
/// monotone in the logits: softmax, or per-token normalised sigmoid / sqrt-softplus). Writes
/// the K ids into `out` (descending).
pub fn aux_topk_row(z: &[f32], top_k: usize, out: &mut Vec<u32>) {
    out.clear();
    for _ in 0..top_k.min(z.len()) {
        let mut best: Option<usize> = None;
        for (e, &x) in z.iter().enumerate() {
            if out.contains(&(e as u32)) {
                continue;
            }
            if best.is_none_or(|b| x > z[b]) {
                best = Some(e);
            }
        }
        if let Some(b) = best {
            out.push(b as u32);
        }
    }
}

/// Aux-loss token counts `[S][E]` of host logits: per sequence of `seq_lens` (one sequence of
/// every row when `None`), the experts of [`aux_topk_row`]. Logits are rounded to f32 first (as
/// the statistics and every backend see them). NaN / +∞ is an error naming the row.
pub fn aux_counts(
    logits: &LogitsRef<'_>,
    top_k: usize,
    seq_lens: Option<&[usize]>,
) -> Result<Vec<Vec<u64>>, RouteError> {
    let (t, e) = logits.dim();
    let one = [t];
    let lens = seq_lens.unwrap_or(&one);
    let mut counts = vec![vec![0u64; e]; lens.len()];
    let mut z = Vec::new();
    let mut sel = Vec::new();
    let mut row = 0;
    for (s, &l) in lens.iter().enumerate() {
        for _ in 0..l {
            widen_checked::<crate::math::NativeF32>(logits, row, &mut z)?;
            aux_topk_row(&z, top_k, &mut sel);
            for &i in &sel {
                counts[s][i as usize] += 1;
            }
            row += 1;
        }
    }
    Ok(counts)
}

/// The aux loss of a batch reduced to coefficients `q[s][e]`: the gradient of `a · aux` with
/// respect to the aux score `p[t, e]` of a row `t` of sequence `s` (token counts held constant).
///
/// For the config's variants with coefficient `α` (E experts, K, T rows, S sequences of
/// lengths `L_s`, counts `C` of [`aux_counts`]):
/// - micro-batch: `α·E/(K·T²) · Σ_s C[s][e]`;
/// - per sequence: `α·E/(K·L_s²·S) · C[s][e]`;
/// - global: `α·E/(K·T²) · G[e]` (`G` = [`LossGrads::global_counts`], or `Σ_s C[s][e]`);
///
/// summed in that order in f64, times `a`, and rounded once to the compute type. Built on the
/// host by every backend, so the table is the same bits everywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct AuxTable {
    /// Sequences S (1 without per-sequence lengths).
    pub sequences: usize,
    /// Experts E.
    pub num_experts: usize,
    /// `q` as f64, `[S * E]` row-major.
    pub coef: Vec<f64>,
    /// The sequence of every row (`None`: every row is in sequence 0).
    pub row_seq: Option<Vec<u32>>,
}

impl AuxTable {
    /// Builds the table from the per-sequence counts of [`aux_counts`] (`counts.len()` = the
    /// number of sequences of `losses.seq_lens`, or 1). `None` when the aux term is absent.
    pub fn build(
        cfg: &RouterConfig,
        rows: usize,
        losses: &LossGrads<'_>,
        counts: &[Vec<u64>],
    ) -> Result<Option<AuxTable>, RouteError> {
        if !losses.has_aux(cfg) || rows == 0 {
            return Ok(None);
        }
        let e = cfg.num_experts();
        let k = cfg.top_k() as f64;
        let one = [rows];
        let lens = losses.seq_lens.unwrap_or(&one);
        if counts.len() != lens.len() || counts.iter().any(|c| c.len() != e) {
            return Err(RouteError::BackwardInput {
                what: "aux counts",
                detail: format!(
                    "expected {} sequences of {e} counts, got {} sequences",
                    lens.len(),
                    counts.len()
                ),
            });
        }
        let t2 = (rows as f64) * (rows as f64);
        let nseq = lens.len() as f64;
        let batch: Vec<f64> = (0..e).map(|x| counts.iter().map(|c| c[x] as f64).sum()).collect();
        let mut coef = vec![0f64; lens.len() * e];
        for (s, &l) in lens.iter().enumerate() {
            for x in 0..e {
                let mut q = 0f64;
                for al in cfg.aux_losses().iter().filter(|a| a.coeff > 0.0) {
                    let f = al.coeff * e as f64 / k;
                    q += match al.kind {
                        AuxLossKind::MicroBatch => f / t2 * batch[x],
                        AuxLossKind::PerSequence if l > 0 => f / ((l as f64) * (l as f64) * nseq) * counts[s][x] as f64,
                        AuxLossKind::PerSequence => 0.0,
                        AuxLossKind::Global => f / t2 * losses.global_counts.map_or(batch[x], |g| g[x]),
                    };
                }
                coef[s * e + x] = losses.aux_loss * q;
            }
        }
        let row_seq = losses.seq_lens.filter(|l| l.len() > 1).map(row_sequences);
        Ok(Some(AuxTable {
            sequences: lens.len(),
            num_experts: e,
            coef,
            row_seq,
        }))
    }

    /// The coefficients of sequence `s` rounded to the compute type of `M`.
    pub fn row_coefficients<M: Math>(&self, s: usize) -> Vec<M::F> {
        self.coef[s * self.num_experts..(s + 1) * self.num_experts]
            .iter()
            .map(|&x| M::from_f64(x))
            .collect()
    }

    /// The coefficients of every sequence as f32 (what the device kernels read), `[S * E]`.
    pub fn coefficients_f32(&self) -> Vec<f32> {
        self.coef.iter().map(|&x| crate::math::ftz(x as f32)).collect()
    }

    /// The sequence of row `t`.
    pub fn sequence_of(&self, t: usize) -> usize {
        self.row_seq.as_ref().map_or(0, |r| r[t] as usize)
    }
}

/// Reusable buffers of [`vjp_row`] (no allocation per row).
#[derive(Debug, Clone, Default)]
pub struct VjpScratch<F> {
    probs: Vec<F>,
    scores: Vec<F>,
    u: Vec<F>,
    gu: Vec<F>,
}

impl<F> VjpScratch<F> {
    /// Empty buffers; they grow on first use.
    pub fn new() -> Self {
        VjpScratch {
            probs: Vec::new(),
            scores: Vec::new(),
            u: Vec::new(),
            gu: Vec::new(),
        }
    }
}

/// Softmax over the row with the forward's operations ([`crate::reference::softmax_row`]: max,
/// `exp(z − m)` in expert order, one sum, one division per expert). Returns `(m, sum)`.
fn softmax_into<M: Math>(z: &[M::F], out: &mut Vec<M::F>, row: usize) -> Result<(M::F, M::F), RouteError> {
    let m = z
        .iter()
        .copied()
        .fold(M::F::neg_infinity(), |a, b| if b > a { b } else { a });
    if m == M::F::neg_infinity() {
        return Err(RouteError::AllMasked { row });
    }
    out.clear();
    out.extend(z.iter().map(|&x| M::exp(x - m)));
    let mut s = M::F::zero();
    for &x in out.iter() {
        s = s + x;
    }
    for x in out.iter_mut() {
        *x = M::div(*x, s);
    }
    Ok((m, s))
}

/// The scale and the normalisation of [`vjp_row`] on the slot level: from the unnormalised
/// weights `u` and the upstream gradient `g` (K values each, slot order), the gradient on `u`
/// into `gu`: `gu = (gs − Σ gs∘wn) / S` with `gs = g · scale` (without normalisation, `gs`).
/// [`vjp_row`] runs it; a backend that computes `u` its own way (the same bits) runs it too.
pub fn weights_slot_grad<M: Math>(cfg: &RouterConfig, u: &[M::F], g: &[M::F], gu: &mut Vec<M::F>) {
    let ftz = M::ftz;
    let zero = M::F::zero();
    let scale = M::from_f32(cfg.scaling_factor());
    gu.clear();
    gu.extend(g.iter().map(|&x| ftz(x * scale)));
    let denom = match cfg.normalization() {
        Normalization::None => None,
        Normalization::Sum { eps } => {
            let mut s = zero;
            for &x in u.iter() {
                s = s + x;
            }
            Some((s + M::from_f32(eps), true))
        }
        Normalization::SumClampMin { min } => {
            let mut s = zero;
            for &x in u.iter() {
                s = s + x;
            }
            let mn = M::from_f32(min);
            if s > mn { Some((s, true)) } else { Some((mn, false)) }
        }
    };
    if let Some((d, varies)) = denom {
        let mut dot = zero;
        if varies {
            for (&gs, &uj) in gu.iter().zip(u.iter()) {
                dot = ftz(dot + ftz(gs * M::div(uj, d)));
            }
        }
        for x in gu.iter_mut() {
            *x = M::div(ftz(*x - dot), d);
        }
    }
}

/// One row of the backward (DESIGN §2b) on a widened row `z` (E values), the row's ids (slot
/// order, valid and distinct) and the upstream gradient `g` (K values). `aux_q` holds the row's
/// aux coefficients ([`AuxTable`], E values) when the aux term is present; `z_factor` is
/// [`LossGrads::z_factor`] (0: no z-loss term). Writes `dz` (E values).
///
/// Every intermediate the forward computes is recomputed with the forward's own operations (so
/// the weights are those the forward returned, bit for bit); every new result is flushed by the
/// subnormal rule; sums run in slot order (over K) or expert order (over E).
///
/// A selection bias takes no part: it moves the selection only (the `ids` given here), while the
/// weights are the unbiased scores — with softmax before top-K (ERNIE-4.5, LongCat-Flash) the
/// gradient flows through the full-row probabilities at the ids, exactly as without a bias.
#[allow(clippy::too_many_arguments)]
pub fn vjp_row<M: Math>(
    cfg: &RouterConfig,
    z: &[M::F],
    ids: &[u32],
    g: &[M::F],
    aux_q: Option<&[M::F]>,
    z_factor: M::F,
    row: usize,
    scratch: &mut VjpScratch<M::F>,
    dz: &mut [M::F],
) -> Result<(), RouteError> {
    let ftz = M::ftz;
    let zero = M::F::zero();
    let one = M::F::one();
    let score = cfg.score();
    let before = score == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
    let VjpScratch { probs, scores, u, gu } = scratch;

    // The full softmax when some term needs it (softmax-before weights, a softmax aux loss, the
    // z-loss); an all-−∞ row is an error in every case, as in the forward.
    let need_softmax = before || (aux_q.is_some() && score == ScoreFunction::Softmax) || z_factor != zero;
    let mut sm = (zero, zero);
    if need_softmax {
        sm = softmax_into::<M>(z, probs, row)?;
    } else if z.iter().all(|&x| x == M::F::neg_infinity()) {
        return Err(RouteError::AllMasked { row });
    }

    // Forward: unnormalised weights u (slot order).
    u.clear();
    match (score, before) {
        (ScoreFunction::Softmax, true) => u.extend(ids.iter().map(|&i| probs[i as usize])),
        (ScoreFunction::Softmax, false) => {
            let m = ids
                .iter()
                .map(|&i| z[i as usize])
                .fold(M::F::neg_infinity(), |a, b| if b > a { b } else { a });
            if m == M::F::neg_infinity() {
                return Err(RouteError::AllMasked { row });
            }
            u.extend(ids.iter().map(|&i| M::exp(z[i as usize] - m)));
            let mut s = zero;
            for &x in u.iter() {
                s = s + x;
            }
            for x in u.iter_mut() {
                *x = M::div(*x, s);
            }
        }
        (ScoreFunction::Sigmoid, _) => u.extend(ids.iter().map(|&i| M::sigmoid(z[i as usize]))),
        (ScoreFunction::SqrtSoftplus, _) => u.extend(ids.iter().map(|&i| M::sqrt_softplus(z[i as usize]))),
    }

    // Scale, then normalisation: gu = (gs − Σ gs∘wn) / S.
    weights_slot_grad::<M>(cfg, u, g, gu);

    // Score function.
    match (score, before) {
        (ScoreFunction::Softmax, true) => {
            let mut t = zero;
            for (&gj, &uj) in gu.iter().zip(u.iter()) {
                t = ftz(t + ftz(gj * uj));
            }
            let nt = zero - t;
            for (d, &p) in dz.iter_mut().zip(probs.iter()) {
                *d = ftz(p * nt);
            }
            for (&i, &gj) in ids.iter().zip(gu.iter()) {
                let p = probs[i as usize];
                dz[i as usize] = ftz(p * ftz(gj - t));
            }
        }
        (ScoreFunction::Softmax, false) => {
            let mut r = zero;
            for (&gj, &uj) in gu.iter().zip(u.iter()) {
                r = ftz(r + ftz(gj * uj));
            }
            dz.fill(zero);
            for ((&i, &gj), &uj) in ids.iter().zip(gu.iter()).zip(u.iter()) {
                dz[i as usize] = ftz(uj * ftz(gj - r));
            }
        }
        (ScoreFunction::Sigmoid, _) => {
            dz.fill(zero);
            for ((&i, &gj), &uj) in ids.iter().zip(gu.iter()).zip(u.iter()) {
                dz[i as usize] = ftz(gj * ftz(uj * ftz(one - uj)));
            }
        }
        (ScoreFunction::SqrtSoftplus, _) => {
            dz.fill(zero);
            for ((&i, &gj), &uj) in ids.iter().zip(gu.iter()).zip(u.iter()) {
                dz[i as usize] = if uj == zero {
                    zero
                } else {
                    ftz(gj * M::div(M::sigmoid(z[i as usize]), uj + uj))
                };
            }
        }
    }

    // Aux term: d/dz of Σ_e q_e p_e with p the aux scores over all E.
    if let Some(q) = aux_q {
        match score {
            ScoreFunction::Softmax => {
                let mut r = zero;
                for (&p, &qe) in probs.iter().zip(q) {
                    r = ftz(r + ftz(p * qe));
                }
                for ((d, &p), &qe) in dz.iter_mut().zip(probs.iter()).zip(q) {
                    *d = ftz(*d + ftz(p * ftz(qe - r)));
                }
            }
            ScoreFunction::Sigmoid | ScoreFunction::SqrtSoftplus => {
                scores.clear();
                if score == ScoreFunction::Sigmoid {
                    scores.extend(z.iter().map(|&x| M::sigmoid(x)));
                } else {
                    scores.extend(z.iter().map(|&x| M::sqrt_softplus(x)));
                }
                let mut s = zero;
                for &x in scores.iter() {
                    s = s + x;
                }
                let d = s + M::from_f64(1e-20);
                let mut r = zero;
                for (&sv, &qe) in scores.iter().zip(q) {
                    r = ftz(r + ftz(M::div(sv, d) * qe));
                }
                for (e, (dd, &sv)) in dz.iter_mut().zip(scores.iter()).enumerate() {
                    let ds = M::div(ftz(q[e] - r), d);
                    let deriv = if score == ScoreFunction::Sigmoid {
                        ftz(sv * ftz(one - sv))
                    } else if sv == zero {
                        zero
                    } else {
                        M::div(M::sigmoid(z[e]), sv + sv)
                    };
                    *dd = ftz(*dd + ftz(ds * deriv));
                }
            }
        }
    }

    // z-loss term: c·coeff·2/T · lse · softmax.
    if z_factor != zero {
        let (m, s) = sm;
        let lse = ftz(m + M::ln(s));
        let kz = ftz(z_factor * lse);
        for (d, &p) in dz.iter_mut().zip(probs.iter()) {
            *d = ftz(*d + ftz(kz * p));
        }
    }

    for (d, &x) in dz.iter_mut().zip(z) {
        if x == M::F::neg_infinity() {
            *d = zero;
        }
    }
    Ok(())
}

/// What every row of one backward call shares: the aux table (when the aux term is present) and
/// the z-loss factor. Built once per call by [`BackwardPlan::new`] (the aux counts need a pass
/// over every row first).
#[derive(Debug, Clone)]
pub struct BackwardPlan {
    /// The aux coefficients, when the aux term is present.
    pub aux: Option<AuxTable>,
    /// `c · coeff · 2 / T` (0: no z-loss term).
    pub z_factor: f64,
}

impl BackwardPlan {
    /// The plan of a backward call on host logits: checks `losses`, counts the aux top-K per
    /// sequence when the aux term is present, and builds the table.
    pub fn new(cfg: &RouterConfig, logits: &LogitsRef<'_>, losses: &LossGrads<'_>) -> Result<Self, RouteError> {
        let (t, e) = logits.dim();
        losses.check(t, e)?;
        let aux = if losses.has_aux(cfg) {
            let counts = aux_counts(logits, cfg.top_k(), losses.seq_lens)?;
            AuxTable::build(cfg, t, losses, &counts)?
        } else {
            None
        };
        Ok(BackwardPlan {
            aux,
            z_factor: losses.z_factor(cfg, t),
        })
    }

    /// The plan from aux counts computed elsewhere (a device backend's counting kernel).
    pub fn from_counts(
        cfg: &RouterConfig,
        rows: usize,
        losses: &LossGrads<'_>,
        counts: &[Vec<u64>],
    ) -> Result<Self, RouteError> {
        losses.check(rows, cfg.num_experts())?;
        Ok(BackwardPlan {
            aux: AuxTable::build(cfg, rows, losses, counts)?,
            z_factor: losses.z_factor(cfg, rows),
        })
    }

    /// The z-loss factor as the f32 every kernel reads (rounded once, flushed by the subnormal
    /// rule).
    pub fn z_factor_f32(&self) -> f32 {
        crate::math::ftz(self.z_factor as f32)
    }
}

/// Rows `start..start + out.nrows()` of the backward on host data, into `out` (`[rows, E]`):
/// widens and checks each row, then [`vjp_row`]. `ids` and `grad` hold the same rows. The
/// reference router runs it over every row; the CPU backend over chunks in parallel.
pub fn vjp_rows<M: Math>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ndarray::ArrayView2<'_, u32>,
    grad: ndarray::ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    mut out: ndarray::ArrayViewMut2<'_, M::F>,
) -> Result<(), RouteError> {
    let rows = out.nrows();
    let mut z = Vec::new();
    let mut g = Vec::new();
    let mut idv = Vec::new();
    let mut dz = vec![M::F::zero(); cfg.num_experts()];
    let mut scratch = VjpScratch::new();
    let zf = M::from_f64(plan.z_factor);
    let aux_rows: Vec<Vec<M::F>> = plan
        .aux
        .as_ref()
        .map(|a| (0..a.sequences).map(|s| a.row_coefficients::<M>(s)).collect())
        .unwrap_or_default();
    for r in 0..rows {
        let t = start + r;
        widen_checked::<M>(logits, t, &mut z)?;
        idv.clear();
        idv.extend(ids.row(r).iter().copied());
        g.clear();
        g.extend(grad.row(r).iter().copied());
        let q = plan.aux.as_ref().map(|a| aux_rows[a.sequence_of(t)].as_slice());
        vjp_row::<M>(cfg, &z, &idv, &g, q, zf, t, &mut scratch, &mut dz)?;
        out.row_mut(r).assign(&ndarray::ArrayView1::from(&dz[..]));
    }
    Ok(())
}
