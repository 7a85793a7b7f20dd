//! Fast f32 kernels for the common rules, portable and native numerics: softmax after top-k
//! (Qwen3, Mixtral, GPT-OSS: selection on the logits themselves), softmax before top-k without
//! bias or groups (Qwen2-MoE, OLMoE), and sigmoid with an optional bias and group limit
//! (DeepSeek-V3, Kimi-K2, GLM-4.5). Every other config takes the generic kernel.
//!
//! Values are processed in lanes of [`W`] (one AVX-512 register, two AVX2 ones), rows padded with
//! −∞, and rows in blocks of [`B`]. Per block:
//!
//! 1. **Per row** — load: widen, flush (portable), check for NaN / +∞ and take the column maxima
//!    in one pass. Keys: the logits themselves (softmax after), `exp(z − max)` (softmax before;
//!    the denominators of four rows are summed side by side, each in expert order), or
//!    `1/(1 + exp(−z)) + b` with a reciprocal within 2⁻²¹ relative error (sigmoid; each
//!    instruction set's own: `vrcp14ps` and one Newton step, `rcpps` and two, or a bit-level
//!    seed and three): native mode's keys (so native selection may differ between instruction
//!    sets on near ties), within `δ` of the exact key in portable mode. Groups (sigmoid): group scores from lane-wise top-2
//!    lists; in portable mode the kept set is accepted only when the g-th and (g+1)-th group
//!    scores are further apart than the scores' error bound. Threshold: view the row as rows of
//!    W; the K-th largest of the W column maxima, τ, is at most the K-th largest key (K distinct
//!    experts reach it). Only keys ≥ τ (less the keys' error bound) can be selected: they are the
//!    row's candidates (typically K to 2K), appended to the block's list.
//! 2. **Block** — exact keys of every candidate of the block in one vectorised pass (portable
//!    sigmoid: `sigmoid(z) + b`; softmax before: the portable division by the row's sum): the
//!    long dependency chains of the portable division run for many candidates at once.
//! 3. **Per row** — rank: a candidate's slot is the number of its row's candidates with a larger
//!    key, plus the number of earlier candidates with the same count (equal keys: ascending id).
//! 4. **Block** — weights of all rows at once, slot-major (lane = row): softmax over the K
//!    selected (softmax after), normalisation and scaling with the reference's operations in its
//!    order (sums in slot order).
//!
//! Replayed rows add their given ids as candidates (in slot order) and skip the rank.
//!
//! Why the result is the reference's (portable mode, bit for bit): every non-candidate has a key
//! below that of K candidates (threshold and error bound), so the reference's top K are
//! candidates; the exact keys of the candidates are the reference's keys; the rank is the
//! reference's sort restricted to the candidates. Rows where an assumption fails (too many
//! candidates, τ = −∞, an undecided group boundary, probabilities too small for the relative
//! error bound) take the generic kernel, which is exact too.

use crate::kernel::{Scratch, route_one};
use crate::simd::{Isa, Lanes};
use moe_router_core::math::{Math, NativeF32, Portable, exp_nonpos, exp_one_scale};
use moe_router_core::{
    GroupScore, LogitsRef, Normalization, ROUTER_SELECTS, RouteError, RouterConfig, ScoreFunction, SoftmaxPosition,
};

/// Lanes per vector step.
pub(crate) const W: usize = 16;
/// Largest candidate list of a row; a row with more candidates takes the generic kernel.
const CAP: usize = 64;
/// Rows per block.
pub(crate) const B: usize = 16;
/// Largest number of groups of the fast sigmoid kernel.
const MAX_GROUPS: usize = 64;

/// The f32 numerics modes of the fast kernels.
pub(crate) trait FastF32: Math<F = f32> {
    /// Portable mode: the softmax denominator is summed in expert order, and the sigmoid keys of
    /// the first pass (hardware division) are only within `δ` of the exact ones. Native mode
    /// sums in lanes and its first-pass keys are its exact keys.
    const PORTABLE: bool;
}

impl FastF32 for Portable {
    const PORTABLE: bool = true;
}

impl FastF32 for NativeF32 {
    const PORTABLE: bool = false;
}

/// The rule shape a fast kernel handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Softmax after top-k: keys are the logits.
    SoftmaxAfter,
    /// Softmax before top-k, no bias, no groups.
    SoftmaxBefore,
    /// Sigmoid, optional bias; `group_n` = 0 without groups, else 1 (max) or 2 (sum of top 2).
    Sigmoid { group_n: usize },
    /// Everything else: the generic kernel.
    Generic,
}

/// What every row of one call shares.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) rule: Rule,
    /// E rounded up to a multiple of [`W`].
    ep: usize,
    /// The bias padded with zeros to `ep` (zeros without a bias).
    bias: Vec<f32>,
    /// Bound on |approximate − exact| sigmoid key (0 in native mode).
    delta: f32,
    /// Group-score margin: the kept groups are certain when the gap exceeds it.
    margin: f32,
}

impl Plan {
    /// The plan of `cfg` for f32 numerics (`portable`: portable mode).
    pub(crate) fn new(cfg: &RouterConfig, portable: bool) -> Plan {
        let e = cfg.num_experts();
        let k = cfg.top_k();
        let ep = e.div_ceil(W) * W;
        let mut bias = vec![0f32; ep];
        if let Some(b) = cfg.expert_bias() {
            // The reference widens the bias with the mode's rule (portable: flushed).
            for (o, &x) in bias.iter_mut().zip(b) {
                *o = if portable { moe_router_core::math::ftz(x) } else { x };
            }
        }
        let rule = if k == 0 || k > W {
            Rule::Generic
        } else {
            match (cfg.score(), cfg.softmax_position()) {
                (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK)
                    if cfg.expert_bias().is_none() && cfg.group_limit().is_none() =>
                {
                    Rule::SoftmaxAfter
                }
                (ScoreFunction::Softmax, SoftmaxPosition::BeforeTopK)
                    if cfg.expert_bias().is_none() && cfg.group_limit().is_none() =>
                {
                    Rule::SoftmaxBefore
                }
                (ScoreFunction::Sigmoid, _) => match cfg.group_limit() {
                    None => Rule::Sigmoid { group_n: 0 },
                    Some(g) if g.num_groups <= MAX_GROUPS => match g.score {
                        GroupScore::Max | GroupScore::SumTopN(1) => Rule::Sigmoid { group_n: 1 },
                        GroupScore::SumTopN(2) => Rule::Sigmoid { group_n: 2 },
                        GroupScore::SumTopN(_) => Rule::Generic,
                    },
                    Some(_) => Rule::Generic,
                },
                _ => Rule::Generic,
            }
        };
        // Portable keys: the exact key is ftz(div(1, 1 + E) + b) and the first-pass key
        // (1 / (1 + E)) + b with the same E = exp(−z) on [−88, 87] (hardware division, ≤ ½ ulp;
        // portable division ≤ 2 ulp; each sum with b rounds once), elsewhere both are within
        // 2⁻¹²⁶ of each other: |difference| ≤ 2⁻²¹·(1.5 + max|b|). δ doubles that.
        let bmax = cfg
            .expert_bias()
            .map_or(0.0f32, |b| b.iter().fold(0.0f32, |a, &x| a.max(x.abs())));
        let delta = if portable {
            ((2.0 + f64::from(bmax)) * 2f64.powi(-20)) as f32
        } else {
            0.0
        };
        // A group score sums n keys (each within δ) and rounds n − 1 times; 4n² + 4 is generous.
        let n = match rule {
            Rule::Sigmoid { group_n } => group_n.max(1) as f32,
            _ => 1.0,
        };
        let margin = delta * (4.0 * n * n + 4.0);
        Plan {
            rule,
            ep,
            bias,
            delta,
            margin,
        }
    }
}

/// Per-thread buffers of the fast kernels.
pub(crate) struct FastScratch {
    /// One widened row (`ep`).
    z: Vec<f32>,
    /// Exponentials of a block's rows (softmax before, `B × ep`).
    ex: Vec<f32>,
    /// First-pass keys of one row (sigmoid, `ep`).
    keys: Vec<f32>,
    /// Keys outside the kept groups set to −∞ (`ep`).
    masked: Vec<f32>,
    /// Widening buffer for non-f32 or strided logits.
    tmp: Vec<f32>,
    /// The block's candidates: each row's list starts at a multiple of [`W`].
    c_id: Vec<u32>,
    c_key: Vec<f32>,
    c_val: Vec<f32>,
    c_aux: Vec<f32>,
}

impl FastScratch {
    /// Buffers for rows of `ep` values (0 when the fast kernels are not used).
    pub(crate) fn new(ep: usize) -> Self {
        let nc = if ep == 0 { 0 } else { B * CAP };
        FastScratch {
            z: vec![0.0; ep],
            ex: if ep == 0 { Vec::new() } else { vec![0.0; B * ep] },
            keys: vec![0.0; ep],
            masked: vec![0.0; ep],
            tmp: Vec::new(),
            c_id: vec![0; nc],
            c_key: vec![0.0; nc],
            c_val: vec![0.0; nc],
            c_aux: vec![0.0; nc],
        }
    }
}

/// What a row of a block needs after the per-row pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Selected by rank among its candidates.
    Select,
    /// Replayed: its candidates are the given ids in slot order.
    Given,
    /// Decided by the generic kernel (ids and weights written), or not in the block.
    Done,
}

/// The block's rows: kind and candidate range.
struct Block {
    kind: [Kind; B],
    start: [usize; B],
    len: [usize; B],
    /// End of the candidate list (a multiple of [`W`]).
    end: usize,
}

impl Block {
    fn new() -> Self {
        Block {
            kind: [Kind::Done; B],
            start: [0; B],
            len: [0; B],
            end: 0,
        }
    }
    /// Opens row `r`'s candidate list.
    #[inline(always)]
    fn open(&mut self, r: usize, kind: Kind) {
        self.kind[r] = kind;
        self.start[r] = self.end;
        self.len[r] = 0;
    }
    /// Closes row `r`'s list of `n` candidates (the next list starts at a multiple of [`W`]).
    #[inline(always)]
    fn close(&mut self, r: usize, n: usize) {
        self.len[r] = n;
        self.end += n.div_ceil(W) * W;
    }
}

#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if b > a { b } else { a }
}

#[inline(always)]
fn min(a: f32, b: f32) -> f32 {
    if b < a { b } else { a }
}

/// Horizontal maximum of a lane vector (tree order; exact for any order).
#[inline(always)]
fn hmax(mut v: [f32; W]) -> f32 {
    let mut h = W / 2;
    while h > 0 {
        for l in 0..h {
            v[l] = max(v[l], v[l + h]);
        }
        h /= 2;
    }
    v[0]
}

/// Row `t` of the logits as f32 values (not yet widened by a mode's rule): the row itself where
/// it is f32 and contiguous, else copied (and converted) into `tmp`.
#[inline(always)]
pub(crate) fn row_f32<'a>(logits: &'a LogitsRef<'_>, t: usize, tmp: &'a mut Vec<f32>) -> &'a [f32] {
    match logits {
        LogitsRef::F32(a) => match a.row(t).to_slice() {
            Some(s) => s,
            None => {
                tmp.clear();
                tmp.extend(a.row(t).iter().copied());
                tmp
            }
        },
        other => {
            other.widen_row(t, tmp, |x| x, |x| x as f32);
            tmp
        }
    }
}

/// Widens row `row` into `z` (`ep` values, padded with −∞) with `M`'s rule for f32 inputs, and
/// returns the lane maxima (the row's column maxima as rows of [`W`]); NaN or +∞ is an error
/// naming the first such expert (as the reference's widening).
#[inline(always)]
fn load_row<M: FastF32, I: Isa>(
    isa: I,
    logits: &LogitsRef<'_>,
    row: usize,
    tmp: &mut Vec<f32>,
    z: &mut [f32],
) -> Result<[f32; W], RouteError> {
    crate::backward::prefetch_row(logits, row);
    let src = row_f32(logits, row, tmp);
    let (chunks, tail) = src.as_chunks::<W>();
    let (zc, _) = z.as_chunks_mut::<W>();
    let (mut mx, mut bad) = isa.load(chunks, zc, M::PORTABLE);
    if !tail.is_empty() {
        let mut c = [f32::NEG_INFINITY; W];
        c[..tail.len()].copy_from_slice(tail);
        let (m, b) = isa.load(&[c], &mut zc[chunks.len()..], M::PORTABLE);
        for l in 0..W {
            mx[l] = max(mx[l], m[l]);
        }
        bad |= b;
    }
    if bad {
        let (expert, x) = src
            .iter()
            .map(|&x| M::from_f32(x))
            .enumerate()
            .find(|&(_, x)| x.is_nan() || x == f32::INFINITY)
            .unwrap_or((0, f32::NAN));
        return Err(RouteError::NonFiniteLogit {
            row,
            expert,
            value: format!("{x:?}"),
        });
    }
    Ok(mx)
}

/// Column maxima of `keys` viewed as rows of [`W`].
#[inline(always)]
fn colmax(keys: &[f32]) -> [f32; W] {
    let mut cm = [f32::NEG_INFINITY; W];
    for c in keys.as_chunks::<W>().0 {
        for l in 0..W {
            cm[l] = max(cm[l], c[l]);
        }
    }
    cm
}

/// A lower bound of the K-th largest key from the column maxima `cm` of the keys (padding must
/// not exceed any real key): the K-th largest column maximum (K distinct experts reach it). −∞
/// when fewer than K columns hold a key above −∞.
#[inline(always)]
fn threshold(cm: &[f32; W], k: usize) -> f32 {
    // cnt[l]: column maxima strictly above cm[l]; the K-th largest is the smallest cm[l] with
    // fewer than K above it.
    let mut cnt = [0u32; W];
    for &ci in cm.iter() {
        for l in 0..W {
            cnt[l] += u32::from(ci > cm[l]);
        }
    }
    let kk = k as u32;
    let mut t = [f32::INFINITY; W];
    for l in 0..W {
        t[l] = if cnt[l] < kk { cm[l] } else { f32::INFINITY };
    }
    let mut h = W / 2;
    while h > 0 {
        for l in 0..h {
            t[l] = min(t[l], t[l + h]);
        }
        h /= 2;
    }
    t[0]
}

/// Appends the experts whose key is ≥ `thr` to the candidate list at `at` (id and key), in
/// ascending id order; returns their number, or `None` when there are more than [`CAP`]. The
/// padding past E must be below `thr` (−∞, or exponentials of 0 under a positive threshold).
#[inline(always)]
fn collect<I: Isa>(isa: I, keys: &[f32], thr: f32, id: &mut [u32], key: &mut [f32]) -> Option<usize> {
    let cap = CAP.min(id.len()).min(key.len());
    isa.collect(keys.as_chunks::<W>().0, thr, &mut id[..cap], &mut key[..cap])
}

/// The K best of `n` candidates by key (descending, ties → lower id = lower index) into `slot`
/// (slot j holds the index of the candidate of rank j). A candidate's rank is the number of
/// candidates with a larger key (one broadcast compare per candidate and vector, for all
/// candidates at once) plus the number of earlier candidates with the same count (equal keys:
/// they are in ascending id order, and a group of t equal keys owns the t ranks from its count
/// on). `key` holds the candidates and −∞ up to the next multiple of [`W`].
#[inline(always)]
fn rank<I: Isa>(isa: I, key: &[f32], n: usize, k: usize, slot: &mut [u8; W]) {
    if let Ok(one) = <&[f32; W]>::try_from(key)
        && isa.rank16(one, slot)
    {
        return;
    }
    let nch = n.div_ceil(W);
    let mut cnt = [[0u32; W]; CAP / W];
    isa.counts_above(&key.as_chunks::<W>().0[..nch], n, &mut cnt[..nch]);
    let mut seen = [0u8; CAP + 1];
    let mut out = [0u8; W + 1];
    for (j, &c) in cnt.as_flattened()[..n].iter().enumerate() {
        let c = c as usize;
        let r = c + usize::from(seen[c]);
        seen[c] += 1;
        // Ranks past K land in the spare last entry (no branch on the data).
        out[if r < k { r } else { W }] = j as u8;
    }
    slot.copy_from_slice(&out[..W]);
}

/// Weights of the block's rows from the slot-major values `v` (`v[j][r]`: slot j of row r):
/// softmax over the K slots first when `softmax` (softmax after top-k), then normalisation and
/// scaling, with the reference's operations in its order; written to the rows not `Done`.
#[inline(always)]
fn weights<M: FastF32>(cfg: &RouterConfig, softmax: bool, v: &mut [[f32; B]; W], blk: &Block, w: &mut [f32]) {
    let k = cfg.top_k();
    let v = &mut v[..k];
    if softmax {
        let mut m = [f32::NEG_INFINITY; B];
        for vj in v.iter() {
            for r in 0..B {
                m[r] = max(m[r], vj[r]);
            }
        }
        let mut s = [0f32; B];
        for vj in v.iter_mut() {
            for r in 0..B {
                vj[r] = exp_nonpos(vj[r] - m[r]);
                s[r] += vj[r];
            }
        }
        for vj in v.iter_mut() {
            for r in 0..B {
                vj[r] = M::div(vj[r], s[r]);
            }
        }
    }
    let d = match cfg.normalization() {
        Normalization::None => None,
        Normalization::Sum { eps } => {
            let mut s = [0f32; B];
            for vj in v.iter() {
                for r in 0..B {
                    s[r] += vj[r];
                }
            }
            let eps = M::from_f32(eps);
            Some(s.map(|x| x + eps))
        }
        Normalization::SumClampMin { min } => {
            let mut s = [0f32; B];
            for vj in v.iter() {
                for r in 0..B {
                    s[r] += vj[r];
                }
            }
            let mn = M::from_f32(min);
            Some(s.map(|x| if x > mn { x } else { mn }))
        }
    };
    let scale = M::from_f32(cfg.scaling_factor());
    for vj in v.iter_mut() {
        if let Some(d) = d {
            for r in 0..B {
                vj[r] = M::div(vj[r], d[r]);
            }
        }
        for v in vj.iter_mut().take(B) {
            *v = M::ftz(*v * scale);
        }
    }
    for (r, wr) in w.chunks_exact_mut(k).enumerate() {
        if blk.kind[r] != Kind::Done {
            for (j, x) in wr.iter_mut().enumerate() {
                *x = v[j][r];
            }
        }
    }
}

/// Routes or weighs the rows of one chunk with the fast kernel of `plan.rule` (not
/// [`Rule::Generic`]); `ids`/`w` are `[rows, K]` row-major, the first row is `base`.
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
pub(crate) fn chunk<M: FastF32>(
    plan: &Plan,
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    base: usize,
    ids: &mut [u32],
    w: &mut [f32],
    fs: &mut FastScratch,
    gs: &mut Scratch<f32>,
    route: bool,
) -> Result<(), RouteError> {
    // The clone's instruction set, decided at compile time per clone.
    const AVX512: bool = multiversion::target::selected_target!().supports_feature_str("avx512f");
    const AVX2: bool = multiversion::target::selected_target!().supports_feature_str("avx2");
    #[cfg(all(target_arch = "x86_64", moe_avx512))]
    if AVX512 {
        if let Some(isa) = crate::simd::Avx512::detect() {
            return blocks::<M, _>(isa, plan, cfg, logits, base, ids, w, fs, gs, route);
        }
        return blocks::<M, _>(Lanes, plan, cfg, logits, base, ids, w, fs, gs, route);
    }
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        if let Some(isa) = crate::simd::Avx2::detect() {
            return blocks::<M, _>(isa, plan, cfg, logits, base, ids, w, fs, gs, route);
        }
        return blocks::<M, _>(Lanes, plan, cfg, logits, base, ids, w, fs, gs, route);
    }
    let _ = (AVX512, AVX2);
    blocks::<M, _>(Lanes, plan, cfg, logits, base, ids, w, fs, gs, route)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn blocks<M: FastF32, I: Isa>(
    isa: I,
    plan: &Plan,
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    base: usize,
    ids: &mut [u32],
    w: &mut [f32],
    fs: &mut FastScratch,
    gs: &mut Scratch<f32>,
    route: bool,
) -> Result<(), RouteError> {
    let k = cfg.top_k();
    let rows = ids.len() / k;
    let mut r0 = 0;
    while r0 < rows {
        let n = B.min(rows - r0);
        let (ids_b, w_b) = (&mut ids[r0 * k..(r0 + n) * k], &mut w[r0 * k..(r0 + n) * k]);
        let mut blk = Block::new();
        let mut v = [[0f32; B]; W];
        match plan.rule {
            Rule::SoftmaxAfter => softmax_after_block::<M, I>(
                isa,
                plan,
                cfg,
                logits,
                base + r0,
                ids_b,
                w_b,
                fs,
                gs,
                route,
                &mut blk,
                &mut v,
            )?,
            Rule::SoftmaxBefore => softmax_before_block::<M, I>(
                isa,
                plan,
                cfg,
                logits,
                base + r0,
                ids_b,
                w_b,
                fs,
                gs,
                route,
                &mut blk,
                &mut v,
            )?,
            Rule::Sigmoid { group_n } => sigmoid_block::<M, I>(
                isa,
                plan,
                cfg,
                logits,
                base + r0,
                ids_b,
                w_b,
                fs,
                gs,
                route,
                group_n,
                &mut blk,
                &mut v,
            )?,
            Rule::Generic => {
                for (r, (ids_r, w_r)) in ids_b.chunks_exact_mut(k).zip(w_b.chunks_exact_mut(k)).enumerate() {
                    let sel = route || ids_r[0] == ROUTER_SELECTS;
                    route_one::<M>(cfg, logits, base + r0 + r, ids_r, w_r, gs, sel, true)?;
                }
            }
        }
        if plan.rule != Rule::Generic {
            weights::<M>(cfg, plan.rule == Rule::SoftmaxAfter, &mut v, &blk, w_b);
        }
        r0 += n;
    }
    Ok(())
}

/// Step 3 for the rows of a block: rank (or take in slot order) each row's candidates, writing
/// ids and the slot-major values `v`: the candidates' `val` entry, or their key without one.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rank_rows<I: Isa>(
    isa: I,
    k: usize,
    blk: &Block,
    key: &mut [f32],
    id: &[u32],
    val: Option<&[f32]>,
    ids: &mut [u32],
    v: &mut [[f32; B]; W],
) {
    for (r, ids_r) in ids.chunks_exact_mut(k).enumerate() {
        let (s, n) = (blk.start[r], blk.len[r]);
        match blk.kind[r] {
            Kind::Done => {}
            Kind::Given => {
                for j in 0..k {
                    v[j][r] = val.map_or(key[s + j], |x| x[s + j]);
                }
            }
            Kind::Select => {
                let np = n.div_ceil(W) * W;
                for x in &mut key[s + n..s + np] {
                    *x = f32::NEG_INFINITY;
                }
                let mut slot = [0u8; W];
                rank(isa, &key[s..s + np], n, k, &mut slot);
                for j in 0..k {
                    let c = s + slot[j] as usize;
                    ids_r[j] = id[c];
                    v[j][r] = val.map_or(key[c], |x| x[c]);
                }
            }
        }
    }
}

/// Softmax after top-k: select on the logits, softmax over the K selected.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn softmax_after_block<M: FastF32, I: Isa>(
    isa: I,
    plan: &Plan,
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    row0: usize,
    ids: &mut [u32],
    w: &mut [f32],
    fs: &mut FastScratch,
    gs: &mut Scratch<f32>,
    route: bool,
    blk: &mut Block,
    v: &mut [[f32; B]; W],
) -> Result<(), RouteError> {
    let k = cfg.top_k();
    for (r, (ids_r, w_r)) in ids.chunks_exact_mut(k).zip(w.chunks_exact_mut(k)).enumerate() {
        let row = row0 + r;
        let z = &mut fs.z[..plan.ep];
        let cm = load_row::<M, I>(isa, logits, row, &mut fs.tmp, z)?;
        if hmax(cm) == f32::NEG_INFINITY {
            return Err(RouteError::AllMasked { row });
        }
        if !(route || ids_r[0] == ROUTER_SELECTS) {
            // The reference's softmax over the given logits refuses an all −∞ selection.
            blk.open(r, Kind::Given);
            let at = blk.start[r];
            let mut all_masked = true;
            for j in 0..k {
                let x = z[ids_r[j] as usize];
                fs.c_key[at + j] = x;
                all_masked &= x == f32::NEG_INFINITY;
            }
            if all_masked {
                return Err(RouteError::AllMasked { row });
            }
            blk.close(r, k);
            continue;
        }
        let tau = threshold(&cm, k);
        blk.open(r, Kind::Select);
        let at = blk.start[r];
        let got = if tau == f32::NEG_INFINITY {
            None
        } else {
            collect(isa, z, tau, &mut fs.c_id[at..at + CAP], &mut fs.c_key[at..at + CAP])
        };
        match got {
            Some(n) => blk.close(r, n),
            None => {
                blk.kind[r] = Kind::Done;
                route_one::<M>(cfg, logits, row, ids_r, w_r, gs, true, true)?;
            }
        }
    }
    rank_rows(isa, k, blk, &mut fs.c_key, &fs.c_id, None, ids, v);
    Ok(())
}

/// Softmax before top-k (no bias, no groups): the exponentials of the block's rows, their
/// denominators summed four rows side by side, candidates by exponential, the probabilities of
/// the candidates only (the portable division, for the whole block in one pass).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn softmax_before_block<M: FastF32, I: Isa>(
    isa: I,
    plan: &Plan,
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    row0: usize,
    ids: &mut [u32],
    w: &mut [f32],
    fs: &mut FastScratch,
    gs: &mut Scratch<f32>,
    route: bool,
    blk: &mut Block,
    v: &mut [[f32; B]; W],
) -> Result<(), RouteError> {
    let k = cfg.top_k();
    let e = cfg.num_experts();
    let ep = plan.ep;
    let nrows = ids.len() / k;
    for r in 0..nrows {
        let z = &mut fs.z[..ep];
        let m = hmax(load_row::<M, I>(isa, logits, row0 + r, &mut fs.tmp, z)?);
        if m == f32::NEG_INFINITY {
            return Err(RouteError::AllMasked { row: row0 + r });
        }
        let ex = &mut fs.ex[r * ep..(r + 1) * ep];
        for (zc, ec) in z.as_chunks::<W>().0.iter().zip(ex.as_chunks_mut::<W>().0.iter_mut()) {
            for l in 0..W {
                ec[l] = exp_nonpos(zc[l] - m);
            }
        }
    }
    let mut sums = [0f32; B];
    if M::PORTABLE {
        // Expert order, as the reference; four independent add chains side by side.
        for g in (0..nrows).step_by(4) {
            let row = |i: usize| {
                let r = (g + i).min(nrows - 1);
                &fs.ex[r * ep..r * ep + e]
            };
            let (e0, e1, e2, e3) = (row(0), row(1), row(2), row(3));
            let (mut s0, mut s1, mut s2, mut s3) = (0f32, 0f32, 0f32, 0f32);
            for i in 0..e {
                s0 += e0[i];
                s1 += e1[i];
                s2 += e2[i];
                s3 += e3[i];
            }
            for (i, s) in [s0, s1, s2, s3].into_iter().enumerate() {
                if g + i < nrows {
                    sums[g + i] = s;
                }
            }
        }
    } else {
        for (r, s) in sums.iter_mut().enumerate().take(nrows) {
            let mut acc = [0f32; W];
            for c in fs.ex[r * ep..(r + 1) * ep].as_chunks::<W>().0 {
                for l in 0..W {
                    acc[l] += c[l];
                }
            }
            *s = acc.iter().sum();
        }
    }
    for (r, (ids_r, w_r)) in ids.chunks_exact_mut(k).zip(w.chunks_exact_mut(k)).enumerate() {
        let ex = &fs.ex[r * ep..(r + 1) * ep];
        if !(route || ids_r[0] == ROUTER_SELECTS) {
            blk.open(r, Kind::Given);
            let at = blk.start[r];
            for j in 0..k {
                fs.c_key[at + j] = ex[ids_r[j] as usize];
                fs.c_val[at + j] = sums[r];
            }
            blk.close(r, k);
            continue;
        }
        // Candidates by exponential: a probability is div(ex, s), within 2 ulp of ex/s, so an
        // exponential below τ(1 − 2⁻¹⁶) has a smaller probability than each of the K
        // exponentials ≥ τ — while those probabilities are normal (τ ≥ 2⁻¹⁰⁰, s ≤ E).
        let tau = threshold(&colmax(ex), k);
        blk.open(r, Kind::Select);
        let at = blk.start[r];
        let got = if tau >= 2f32.powi(-100) {
            collect(
                isa,
                ex,
                tau - tau * 2f32.powi(-16),
                &mut fs.c_id[at..at + CAP],
                &mut fs.c_key[at..at + CAP],
            )
        } else {
            None
        };
        match got {
            Some(n) => {
                fs.c_val[at..at + n].fill(sums[r]);
                blk.close(r, n);
            }
            None => {
                blk.kind[r] = Kind::Done;
                route_one::<M>(cfg, logits, row0 + r, ids_r, w_r, gs, true, true)?;
            }
        }
    }
    let end = blk.end;
    for (kc, vc) in fs.c_key[..end]
        .as_chunks_mut::<W>()
        .0
        .iter_mut()
        .zip(fs.c_val[..end].as_chunks::<W>().0)
    {
        for l in 0..W {
            kc[l] = M::div(kc[l], vc[l]);
        }
    }
    rank_rows(isa, k, blk, &mut fs.c_key, &fs.c_id, None, ids, v);
    Ok(())
}

/// `e^x` on `[−87, 88]` with the portable exp's reduction and polynomial and none of its special
/// cases: equal to [`moe_router_core::math::exp`] there (the result is normal, `|x| < 1.5e-8`
/// gives 1 as there); the input is clamped to that range first.
#[inline(always)]
fn exp_clamped(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let v = exp_one_scale(x);
    if x.abs() < 1.5e-8 { 1.0 } else { v }
}

/// One lane vector into the lane-wise top two `t1 ≥ t2` (a function, as [`load_lanes`]).
#[inline(always)]
fn top2_step(c: &[f32; W], t1: &mut [f32; W], t2: &mut [f32; W]) {
    for l in 0..W {
        let x = c[l];
        t2[l] = max(t2[l], min(t1[l], x));
        t1[l] = max(t1[l], x);
    }
}

/// Lane-wise top two (as a multiset) of `s` viewed as rows of [`W`] (padded with −∞).
#[inline(always)]
fn lane_top2(s: &[f32]) -> ([f32; W], [f32; W]) {
    let mut t1 = [f32::NEG_INFINITY; W];
    let mut t2 = [f32::NEG_INFINITY; W];
    let (ch, tail) = s.as_chunks::<W>();
    for c in ch {
        top2_step(c, &mut t1, &mut t2);
    }
    if !tail.is_empty() {
        let mut c = [f32::NEG_INFINITY; W];
        c[..tail.len()].copy_from_slice(tail);
        top2_step(&c, &mut t1, &mut t2);
    }
    (t1, t2)
}

/// Reciprocal of `d ≥ 1` (clamped to ≤ 2¹⁰⁰) within 2⁻²¹ relative error (checked on every f32
/// of the range by the tests): a bit-level seed and three Newton steps, no division, so it
/// vectorises at full width.
#[inline(always)]
pub(crate) fn recip_approx(d: f32) -> f32 {
    let d = if d < 1.2676506e30 { d } else { 1.2676506e30 };
    let mut r = f32::from_bits(0x7ef3_11c3u32.wrapping_sub(d.to_bits()));
    r = r * (2.0 - d * r);
    r = r * (2.0 - d * r);
    r * (2.0 - d * r)
}

/// Sigmoid (+ bias, + group limit by max or by the sum of the top 2).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn sigmoid_block<M: FastF32, I: Isa>(
    isa: I,
    plan: &Plan,
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    row0: usize,
    ids: &mut [u32],
    w: &mut [f32],
    fs: &mut FastScratch,
    gs: &mut Scratch<f32>,
    route: bool,
    group_n: usize,
    blk: &mut Block,
    v: &mut [[f32; B]; W],
) -> Result<(), RouteError> {
    let k = cfg.top_k();
    let e = cfg.num_experts();
    let ep = plan.ep;
    for (r, (ids_r, w_r)) in ids.chunks_exact_mut(k).zip(w.chunks_exact_mut(k)).enumerate() {
        let row = row0 + r;
        let z = &mut fs.z[..ep];
        let m = hmax(load_row::<M, I>(isa, logits, row, &mut fs.tmp, z)?);
        if m == f32::NEG_INFINITY {
            return Err(RouteError::AllMasked { row });
        }
        let z: &[f32] = z;
        if !(route || ids_r[0] == ROUTER_SELECTS) {
            blk.open(r, Kind::Given);
            let at = blk.start[r];
            for j in 0..k {
                fs.c_val[at + j] = z[ids_r[j] as usize];
            }
            blk.close(r, k);
            continue;
        }
        // First-pass keys.
        let keys = &mut fs.keys[..ep];
        for ((zc, bc), kc) in z
            .as_chunks::<W>()
            .0
            .iter()
            .zip(plan.bias.as_chunks::<W>().0)
            .zip(keys.as_chunks_mut::<W>().0.iter_mut())
        {
            for l in 0..W {
                kc[l] = 1.0 + exp_clamped(-zc[l]);
            }
            isa.recip_add(kc, bc);
        }
        for x in &mut keys[e..] {
            *x = f32::NEG_INFINITY;
        }
        let keys: &[f32] = keys;
        // Group limit.
        let sel_keys: &[f32] = if let (Some(g), true) = (cfg.group_limit(), group_n > 0) {
            let per = e / g.num_groups;
            let mut gsc = [f32::NEG_INFINITY; CAP];
            for g0 in (0..g.num_groups).step_by(8) {
                let mut t1 = [[f32::NEG_INFINITY; W]; 8];
                let mut t2 = [[f32::NEG_INFINITY; W]; 8];
                for (i, gi) in (g0..g.num_groups.min(g0 + 8)).enumerate() {
                    (t1[i], t2[i]) = lane_top2(&keys[gi * per..(gi + 1) * per]);
                }
                let (a, b) = isa.reduce_top2(&t1, &t2);
                for (i, s) in gsc[g0..g.num_groups.min(g0 + 8)].iter_mut().enumerate() {
                    *s = if group_n == 1 { a[i] } else { M::ftz(a[i] + b[i]) };
                }
            }
            let mut kept = [false; CAP];
            if g.groups_selected < g.num_groups {
                // Group rank: larger score, or equal score and lower index.
                let mut slot = [0u8; W];
                let mut keep_all = [0u8; CAP];
                let mut n_kept = 0;
                if g.groups_selected <= W {
                    rank(
                        isa,
                        &gsc[..g.num_groups.div_ceil(W) * W],
                        g.num_groups,
                        g.groups_selected,
                        &mut slot,
                    );
                    for &s in &slot[..g.groups_selected] {
                        kept[s as usize] = true;
                    }
                } else {
                    // More than W kept groups: rank every group.
                    for i in 0..g.num_groups {
                        let mut r = 0;
                        for j in 0..g.num_groups {
                            r += usize::from(gsc[j] > gsc[i] || (gsc[j] == gsc[i] && j < i));
                        }
                        if r < g.groups_selected {
                            keep_all[n_kept] = i as u8;
                            n_kept += 1;
                        }
                    }
                    for &i in &keep_all[..n_kept] {
                        kept[i as usize] = true;
                    }
                }
                if M::PORTABLE {
                    let mut lo = f32::INFINITY;
                    let mut hi = f32::NEG_INFINITY;
                    for (gi, &s) in gsc.iter().enumerate().take(g.num_groups) {
                        if kept[gi] {
                            lo = min(lo, s);
                        } else {
                            hi = max(hi, s);
                        }
                    }
                    if (lo - hi).partial_cmp(&plan.margin) != Some(std::cmp::Ordering::Greater) {
                        blk.kind[r] = Kind::Done;
                        route_one::<M>(cfg, logits, row, ids_r, w_r, gs, true, false)?;
                        continue;
                    }
                }
                let masked = &mut fs.masked[..ep];
                for (gi, (src, dst)) in keys[..g.num_groups * per]
                    .chunks_exact(per)
                    .zip(masked.chunks_exact_mut(per))
                    .enumerate()
                {
                    if kept[gi] {
                        dst.copy_from_slice(src);
                    } else {
                        dst.fill(f32::NEG_INFINITY);
                    }
                }
                for x in &mut masked[g.num_groups * per..] {
                    *x = f32::NEG_INFINITY;
                }
                masked
            } else {
                keys
            }
        } else {
            keys
        };
        // Candidates.
        let tau = threshold(&colmax(sel_keys), k);
        blk.open(r, Kind::Select);
        let at = blk.start[r];
        let got = if tau == f32::NEG_INFINITY {
            None
        } else {
            collect(
                isa,
                sel_keys,
                tau - (plan.delta + plan.delta),
                &mut fs.c_id[at..at + CAP],
                &mut fs.c_key[at..at + CAP],
            )
        };
        match got {
            Some(n) => {
                for i in at..at + n {
                    let id = fs.c_id[i] as usize;
                    fs.c_val[i] = z[id];
                    fs.c_aux[i] = plan.bias[id];
                }
                blk.close(r, n);
            }
            None => {
                blk.kind[r] = Kind::Done;
                route_one::<M>(cfg, logits, row, ids_r, w_r, gs, true, false)?;
            }
        }
    }
    // Exact sigmoids (the weights) of the block's candidates, and their exact keys in portable
    // mode (native first-pass keys are exact).
    let end = blk.end;
    for ((vc, kc), ac) in fs.c_val[..end]
        .as_chunks_mut::<W>()
        .0
        .iter_mut()
        .zip(fs.c_key[..end].as_chunks_mut::<W>().0.iter_mut())
        .zip(fs.c_aux[..end].as_chunks::<W>().0)
    {
        for v in vc.iter_mut() {
            *v = M::sigmoid(*v);
        }
        if M::PORTABLE {
            for l in 0..W {
                kc[l] = M::ftz(vc[l] + ac[l]);
            }
        }
    }
    rank_rows(isa, k, blk, &mut fs.c_key, &fs.c_id, Some(&fs.c_val), ids, v);
    Ok(())
}
