//! Per-slot replay: the "take the router's choice" slot sentinel and threshold replay.
//!
//! # The slot sentinel
//!
//! A replay row may hold [`ROUTER_SLOT`] (`u32::MAX`, the same value as
//! [`ROUTER_SELECTS`]) in some of its K slots: "don't replay this slot,
//! take the router's choice". The forced ids of the row stay where they are; the sentinel slots
//! are filled, **left to right**, with the router's own top-K ids **in the router's slot order**
//! (key descending, ties to the lower expert id), skipping ids the row already holds. A row that
//! is the sentinel in every slot is therefore exactly the router's own selection (a whole-row
//! fallback). The fill always succeeds: a row with `m` forced ids needs `K − m` ids, and at most
//! `m` of the router's K ids are already in the row. Weights are then computed for the final ids
//! from the live logits, as for any replay. On the command line and in `.npy` / engine files the
//! sentinel is `-1` ([`slot_ids_from_i64`]).
//!
//! # Threshold replay (prime-rl)
//!
//! With a [`ReplayThreshold`] of ratio `r`, a replayed (forced, non-sentinel) id `e` of row `t`
//! is **kept** only when the trainer's live score of it is at least `r` times the trainer's own
//! weakest top-K score:
//!
//! ```text
//! keep e  ⇔  s_t[e] ≥ r · min_{j < K} s_t[own_t[j]]
//! ```
//!
//! where `own_t` is the router's own top-K of row t (its selection rule: scores, bias, group
//! limit, top-K with ties to the lower id) and `s_t` the **unbiased** score of DESIGN §2 step 1 in
//! the config's math: softmax over all E (also when the rule applies the softmax after the
//! top-K), sigmoid, or sqrt-softplus. The comparison is made in f64 on those values, so it is
//! deterministic; an equal score is kept. A dropped id becomes a sentinel slot and is refilled by
//! the rule above (the trainer's top-K in order, skipping ids already in the row). Consequences:
//! with `r ≤ 1` an id of the trainer's own top-K is always kept; with `r = 0` every id is kept.
//! The **replace rate** is replaced slots / replayed slots ([`SlotCounts::replace_rate`]).
//!
//! Threshold replay needs the scores, so it runs on host logits ([`replay_slots_host`]; through a
//! [`crate::Replayed`] router, [`Router::route_host_at`]). Plain slot sentinels work on any
//! backend's device logits.

use crate::config::{ComputeDtype, Numerics, RouterConfig, ScoreFunction, SoftmaxPosition};
use crate::error::RouteError;
use crate::logits::LogitsRef;
use crate::math::{Math, NativeF32, NativeF64, Portable};
use crate::reference::{keys_row, softmax_row, widen_checked};
use crate::replay::{ForcedIds, ReplayPolicy, RouteShape};
use crate::router::{CallSite, HostWeights, ROUTER_SELECTS, Routed, Router, validate_ids};
use crate::stats::RoutingStats;
use half::{bf16, f16};
use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// The slot value meaning "take the router's choice for this slot" (`u32::MAX`; `-1` in signed
/// id files). A row that holds it in every slot is a whole-row router selection.
pub const ROUTER_SLOT: u32 = u32::MAX;

/// An invalid threshold ratio.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThresholdError {
    /// The ratio is NaN, infinite or negative.
    #[error("replay threshold ratio {ratio} must be a finite number >= 0 (e.g. 0.5)")]
    BadRatio {
        /// The ratio given.
        ratio: f64,
    },
}

/// The threshold of threshold replay (see the module docs): keep a replayed id only when its live
/// score is at least `ratio` × the trainer's weakest top-K score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplayThreshold {
    ratio: f64,
}

impl ReplayThreshold {
    /// A threshold of `ratio` (finite, ≥ 0).
    pub fn new(ratio: f64) -> Result<Self, ThresholdError> {
        if !ratio.is_finite() || ratio < 0.0 {
            return Err(ThresholdError::BadRatio { ratio });
        }
        Ok(ReplayThreshold { ratio })
    }
    /// The ratio.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }
}

/// Slot counts of one or more replay calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotCounts {
    /// Forced (non-sentinel) slots of replayed rows: the slots a threshold judges.
    pub replayed_slots: u64,
    /// Of those, the slots a threshold dropped and refilled from the router's top-K.
    pub replaced_slots: u64,
    /// Sentinel slots of replayed rows ("take the router's choice"), filled from the router.
    pub sentinel_slots: u64,
    /// Rows selected entirely by the router (padding, fallbacks, uncovered and all-sentinel rows).
    pub router_rows: u64,
}

impl SlotCounts {
    /// Adds `o`.
    pub fn add(&mut self, o: SlotCounts) {
        self.replayed_slots += o.replayed_slots;
        self.replaced_slots += o.replaced_slots;
        self.sentinel_slots += o.sentinel_slots;
        self.router_rows += o.router_rows;
    }
    /// Replaced slots / replayed slots (0 when no slot was replayed).
    pub fn replace_rate(&self) -> f64 {
        if self.replayed_slots == 0 {
            0.0
        } else {
            self.replaced_slots as f64 / self.replayed_slots as f64
        }
    }
    /// Writes the counts into the optional replay fields of `stats.json`: `replayed_slots`,
    /// `sentinel_slots`, `router_rows` and, when a threshold was applied, `replaced_slots` and
    /// `replace_rate`.
    pub fn fill_stats(&self, stats: &mut RoutingStats, threshold: bool) {
        stats.replayed_slots = Some(self.replayed_slots);
        stats.sentinel_slots = Some(self.sentinel_slots);
        stats.router_rows = Some(self.router_rows);
        if threshold {
            stats.replaced_slots = Some(self.replaced_slots);
            stats.replace_rate = Some(self.replace_rate());
        }
    }
}

/// Ids, weights and counts of a per-slot replay on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotReplay {
    /// Final ids `[T, K]` (forced ids kept in their slots, the others filled).
    pub ids: Array2<u32>,
    /// Weights of the final ids from the live logits.
    pub weights: HostWeights,
    /// What happened to the slots.
    pub counts: SlotCounts,
}

/// True when `row` holds [`ROUTER_SLOT`] in at least one slot.
pub fn has_router_slot(row: &[u32]) -> bool {
    row.contains(&ROUTER_SLOT)
}

/// The rows of `ids` that the router selects entirely: `router_rows` (ascending) merged with the
/// rows that are [`ROUTER_SLOT`] in every slot, ascending; and the other rows that hold the
/// sentinel in some slots (partial rows), ascending.
pub fn classify_rows(ids: ArrayView2<'_, u32>, router_rows: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut whole = Vec::new();
    let mut partial = Vec::new();
    let mut it = router_rows.iter().copied().peekable();
    for (t, row) in ids.outer_iter().enumerate() {
        while it.peek().is_some_and(|&r| r < t) {
            it.next();
        }
        if it.peek() == Some(&t) {
            whole.push(t);
            continue;
        }
        let n = row.iter().filter(|&&x| x == ROUTER_SLOT).count();
        if n == row.len() && n > 0 {
            whole.push(t);
        } else if n > 0 {
            partial.push(t);
        }
    }
    (whole, partial)
}

/// Checks replay ids that may hold [`ROUTER_SLOT`]: shape `[rows, K]`, every other id `< E`, no
/// id twice in a row (sentinel slots may repeat). Rows in `skip` (ascending) are not checked.
/// The error names row and slot.
pub fn validate_slot_ids(
    ids: ArrayView2<'_, u32>,
    rows: usize,
    num_experts: usize,
    top_k: usize,
    skip: &[usize],
) -> Result<(), RouteError> {
    let (r, c) = ids.dim();
    if r != rows || c != top_k {
        return Err(RouteError::IdsShape {
            expected_rows: rows,
            expected_k: top_k,
            rows: r,
            cols: c,
        });
    }
    let mut skip_it = skip.iter().copied().peekable();
    for (t, row) in ids.outer_iter().enumerate() {
        while skip_it.peek().is_some_and(|&s| s < t) {
            skip_it.next();
        }
        if skip_it.peek() == Some(&t) {
            continue;
        }
        for (j, &id) in row.iter().enumerate() {
            if id == ROUTER_SLOT {
                continue;
            }
            if id as usize >= num_experts {
                return Err(RouteError::IdOutOfRange {
                    row: t,
                    slot: j,
                    id: i64::from(id),
                    num_experts,
                });
            }
            if let Some(jj) = row.iter().take(j).position(|&p| p == id) {
                return Err(RouteError::DuplicateId {
                    row: t,
                    id,
                    first_slot: jj,
                    second_slot: j,
                });
            }
        }
    }
    Ok(())
}

/// Fills the [`ROUTER_SLOT`] slots of `row`, left to right, with the ids of `own` (the router's
/// top-K in slot order) that the row does not hold yet. Returns the number of slots filled.
pub fn fill_router_slots(row: &mut [u32], own: &[u32]) -> usize {
    let mut filled = 0;
    let mut next = own.iter().copied();
    for j in 0..row.len() {
        if row[j] != ROUTER_SLOT {
            continue;
        }
        for cand in next.by_ref() {
            if !row.contains(&cand) {
                row[j] = cand;
                filled += 1;
                break;
            }
        }
    }
    filled
}

/// Applies a threshold to one row: every forced slot whose score is below `ratio` × the weakest
/// score of `own` becomes [`ROUTER_SLOT`]. `scores` are the row's unbiased scores (length E).
/// Returns (forced slots judged, slots dropped). Fill the dropped slots with
/// [`fill_router_slots`] afterwards.
pub fn threshold_row(row: &mut [u32], scores: &[f64], own: &[u32], ratio: f64) -> (u64, u64) {
    let weakest = own.iter().map(|&i| scores[i as usize]).fold(f64::INFINITY, f64::min);
    let bar = ratio * weakest;
    let (mut judged, mut dropped) = (0, 0);
    for x in row.iter_mut() {
        if *x == ROUTER_SLOT {
            continue;
        }
        judged += 1;
        // Scores are finite (the logits were checked); an equal score is kept.
        if scores[*x as usize] < bar {
            *x = ROUTER_SLOT;
            dropped += 1;
        }
    }
    (judged, dropped)
}

fn scores_in<M: Math>(cfg: &RouterConfig, logits: &LogitsRef<'_>, row: usize) -> Result<Vec<f64>, RouteError> {
    let mut z = Vec::new();
    widen_checked::<M>(logits, row, &mut z)?;
    let s = match (cfg.score(), cfg.softmax_position()) {
        (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK) => softmax_row::<M>(&z, row)?,
        _ => keys_row::<M>(cfg, &z, None, row)?,
    };
    Ok(s.into_iter().map(M::to_f64).collect())
}

/// The unbiased live scores of row `row` of host `logits` (DESIGN §2 step 1 in the config's
/// math; a full softmax also when the rule applies it after the top-K), widened to f64. NaN and
/// +∞ logits are errors naming the row.
pub fn live_scores(cfg: &RouterConfig, logits: &LogitsRef<'_>, row: usize) -> Result<Vec<f64>, RouteError> {
    match (cfg.compute_dtype(), cfg.numerics()) {
        (ComputeDtype::F64, _) => scores_in::<NativeF64>(cfg, logits, row),
        (ComputeDtype::F32, Numerics::Portable) => scores_in::<Portable>(cfg, logits, row),
        (ComputeDtype::F32, Numerics::Native) => scores_in::<NativeF32>(cfg, logits, row),
    }
}

/// The final ids of a per-slot replay on host `logits` (see [`replay_slots_host`]), without the
/// weights.
pub fn resolve_slot_ids_host<R: Router + ?Sized>(
    router: &R,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    router_rows: &[usize],
    threshold: Option<ReplayThreshold>,
    site: &CallSite<'_>,
) -> Result<(Array2<u32>, SlotCounts), RouteError> {
    let cfg = router.config();
    let (t, e) = logits.dim();
    if e != cfg.num_experts() {
        return Err(RouteError::LogitsShape {
            expected_experts: cfg.num_experts(),
            rows: t,
            cols: e,
        });
    }
    let k = cfg.top_k();
    validate_slot_ids(ids, t, e, k, router_rows)?;
    let (whole, partial) = classify_rows(ids, router_rows);
    let mut out = ids.to_owned();
    let mut counts = SlotCounts {
        router_rows: whole.len() as u64,
        ..SlotCounts::default()
    };
    if threshold.is_none() && whole.is_empty() && partial.is_empty() {
        counts.replayed_slots = (t * k) as u64;
        return Ok((out, counts));
    }
    let (own, _) = router.route_host_at(logits, site)?;
    let mut wi = whole.iter().copied().peekable();
    for r in 0..t {
        if wi.peek() == Some(&r) {
            wi.next();
            out.row_mut(r).assign(&own.row(r));
            continue;
        }
        let own_row: Vec<u32> = own.row(r).to_vec();
        let mut row: Vec<u32> = out.row(r).to_vec();
        let sentinels = row.iter().filter(|&&x| x == ROUTER_SLOT).count() as u64;
        counts.sentinel_slots += sentinels;
        counts.replayed_slots += k as u64 - sentinels;
        if let Some(th) = threshold {
            let scores = live_scores(cfg, logits, r)?;
            let (_, dropped) = threshold_row(&mut row, &scores, &own_row, th.ratio());
            counts.replaced_slots += dropped;
        }
        if has_router_slot(&row) {
            fill_router_slots(&mut row, &own_row);
            out.row_mut(r).assign(&ndarray::ArrayView1::from(&row[..]));
        }
    }
    Ok((out, counts))
}

/// Replays host `ids` (`[T, K]`, [`ROUTER_SLOT`] allowed in any slot) on host `logits` with
/// `router`: the rows in `router_rows` (ascending) and the all-sentinel rows are the router's own
/// selection, sentinel slots are filled from the router's top-K (see the module docs), and with
/// a `threshold` the forced ids are judged first. Returns the final ids, their weights from the
/// live logits ([`Router::weights_host_at`]) and the slot counts.
///
/// `router` should be the plain (inner) router: through a [`crate::Replayed`] router its own
/// routing call would consult the policy again.
pub fn replay_slots_host<R: Router + ?Sized>(
    router: &R,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    router_rows: &[usize],
    threshold: Option<ReplayThreshold>,
    site: &CallSite<'_>,
) -> Result<SlotReplay, RouteError> {
    let (ids, counts) = resolve_slot_ids_host(router, logits, ids, router_rows, threshold, site)?;
    let weights = router.weights_host_at(logits, ids.view(), site)?;
    Ok(SlotReplay { ids, weights, counts })
}

/// An owned copy of host logits (kept for threshold replay during a host routing call).
#[derive(Debug, Clone)]
enum OwnedLogits {
    F32(Array2<f32>),
    Bf16(Array2<bf16>),
    F16(Array2<f16>),
    F64(Array2<f64>),
}

impl OwnedLogits {
    fn of(l: &LogitsRef<'_>) -> Self {
        match l {
            LogitsRef::F32(a) => OwnedLogits::F32(a.to_owned()),
            LogitsRef::Bf16(a) => OwnedLogits::Bf16(a.to_owned()),
            LogitsRef::F16(a) => OwnedLogits::F16(a.to_owned()),
            LogitsRef::F64(a) => OwnedLogits::F64(a.to_owned()),
        }
    }
    fn view(&self) -> LogitsRef<'_> {
        match self {
            OwnedLogits::F32(a) => LogitsRef::F32(a.view()),
            OwnedLogits::Bf16(a) => LogitsRef::Bf16(a.view()),
            OwnedLogits::F16(a) => LogitsRef::F16(a.view()),
            OwnedLogits::F64(a) => LogitsRef::F64(a.view()),
        }
    }
}

thread_local! {
    /// Host logits of the host routing calls in progress on this thread that asked for threshold
    /// replay (innermost last).
    static THRESHOLD_LOGITS: RefCell<Vec<OwnedLogits>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a copy of `logits` available to threshold replay on this thread (when `keep`).
pub(crate) fn with_threshold_logits<T>(keep: bool, logits: &LogitsRef<'_>, f: impl FnOnce() -> T) -> T {
    if !keep {
        return f();
    }
    THRESHOLD_LOGITS.with(|c| c.borrow_mut().push(OwnedLogits::of(logits)));
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            THRESHOLD_LOGITS.with(|c| c.borrow_mut().pop());
        }
    }
    let _pop = Pop;
    f()
}

/// The decorator's replay step ([`crate::Replayed`]): whole router rows, per-slot sentinels and
/// threshold replay of the policy's forced ids, then the weights from the live logits. The
/// policy is told the slot counts.
pub(crate) fn resolve_forced<R: Router, P: ReplayPolicy>(
    inner: &R,
    policy: &P,
    logits: &R::Logits<'_>,
    forced: ForcedIds,
    site: &CallSite<'_>,
    shape: RouteShape,
) -> Result<Routed<R::Ids, R::Weights>, RouteError> {
    let ForcedIds { mut ids, router_rows } = forced;
    let threshold = policy.threshold(site);
    let (whole, partial) = classify_rows(ids.view(), &router_rows);
    let k = shape.top_k;
    if threshold.is_none() && partial.is_empty() {
        validate_ids(ids.view(), shape.rows, shape.num_experts, k, &whole)?;
        for &r in &whole {
            ids.row_mut(r).fill(ROUTER_SELECTS);
        }
        let out = inner.replay_with_fallback(logits, ids.view(), &whole, site)?;
        policy.slots_resolved(
            site,
            &SlotCounts {
                replayed_slots: ((shape.rows - whole.len()) * k) as u64,
                router_rows: whole.len() as u64,
                ..SlotCounts::default()
            },
        );
        return Ok(out);
    }
    let (final_ids, counts) = if let Some(th) = threshold {
        let host = THRESHOLD_LOGITS.with(|c| c.borrow().last().cloned());
        let Some(host) = host else {
            return Err(RouteError::Unsupported {
                backend: inner.backend_name(),
                reason: "threshold replay needs the live scores on the host: route host logits through \
                         Router::route_host_at (the decorator keeps them for the threshold)"
                    .into(),
            });
        };
        let hv = host.view();
        if hv.dim().0 != shape.rows {
            return Err(RouteError::LayoutRows {
                layout_rows: shape.rows,
                batch_rows: hv.dim().0,
            });
        }
        resolve_slot_ids_host(inner, &hv, ids.view(), &router_rows, Some(th), site)?
    } else {
        validate_slot_ids(ids.view(), shape.rows, shape.num_experts, k, &whole)?;
        let own = inner.route(logits, site)?;
        let own = inner.ids_to_host(&own.ids)?;
        let mut counts = SlotCounts {
            router_rows: whole.len() as u64,
            ..SlotCounts::default()
        };
        let mut wi = whole.iter().copied().peekable();
        for r in 0..shape.rows {
            if wi.peek() == Some(&r) {
                wi.next();
                ids.row_mut(r).assign(&own.row(r));
                continue;
            }
            let mut row: Vec<u32> = ids.row(r).to_vec();
            let sentinels = row.iter().filter(|&&x| x == ROUTER_SLOT).count() as u64;
            counts.sentinel_slots += sentinels;
            counts.replayed_slots += k as u64 - sentinels;
            if sentinels > 0 {
                let own_row: Vec<u32> = own.row(r).to_vec();
                fill_router_slots(&mut row, &own_row);
                ids.row_mut(r).assign(&ndarray::ArrayView1::from(&row[..]));
            }
        }
        (ids, counts)
    };
    let dev = inner.ids_from_host(final_ids.view())?;
    let weights = inner.weights_for(logits, &dev, site)?;
    policy.slots_resolved(site, &counts);
    Ok(Routed { ids: dev, weights })
}

/// Converts signed replay ids (`[T, K]`, as `--replay-ids` and the engines' files hold them) to
/// `u32` ids: `-1` is [`ROUTER_SLOT`] ("take the router's choice"), other negative values and
/// ids `≥ E` are [`RouteError::IdOutOfRange`] naming row, slot and value.
pub fn slot_ids_from_i64(ids: ArrayView2<'_, i64>, num_experts: usize) -> Result<Array2<u32>, RouteError> {
    let (t, k) = ids.dim();
    let mut out = Array2::<u32>::zeros((t, k));
    for ((r, j), &v) in ids.indexed_iter() {
        out[[r, j]] = match v {
            -1 => ROUTER_SLOT,
            v if v >= 0 && (v as u64) < num_experts as u64 => v as u32,
            v => {
                return Err(RouteError::IdOutOfRange {
                    row: r,
                    slot: j,
                    id: v,
                    num_experts,
                });
            }
        };
    }
    Ok(out)
}

/// [`slot_ids_from_i64`] for a flat row-major list of `rows × k` values (as `npy`'s `to_ints`
/// returns them); values outside i64 are out of range.
pub fn slot_ids_from_ints(
    values: &[i128],
    rows: usize,
    k: usize,
    num_experts: usize,
) -> Result<Array2<u32>, RouteError> {
    if values.len() != rows * k {
        return Err(RouteError::IdsShape {
            expected_rows: rows,
            expected_k: k,
            rows: values.len() / k.max(1),
            cols: k,
        });
    }
    let mut v = Vec::with_capacity(values.len());
    for (i, &x) in values.iter().enumerate() {
        v.push(i64::try_from(x).map_err(|_| RouteError::IdOutOfRange {
            row: i / k.max(1),
            slot: i % k.max(1),
            id: if x < 0 { i64::MIN } else { i64::MAX },
            num_experts,
        })?);
    }
    let a = Array2::from_shape_vec((rows, k), v).map_err(|e| RouteError::array_shape(&[rows, k], e))?;
    slot_ids_from_i64(a.view(), num_experts)
}

/// `route --replay-ids` with signed ids: `-1` slots take the router's choice, an optional
/// threshold judges the other slots (see the module docs). The call site is the default one
/// (layer 0, no layout, forward). Returns ids, weights and the counts for `stats.json`
/// ([`SlotCounts::fill_stats`]).
pub fn replay_i64_host<R: Router + ?Sized>(
    router: &R,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, i64>,
    threshold: Option<ReplayThreshold>,
) -> Result<SlotReplay, RouteError> {
    let cfg = router.config();
    let (t, e) = logits.dim();
    if e != cfg.num_experts() {
        return Err(RouteError::LogitsShape {
            expected_experts: cfg.num_experts(),
            rows: t,
            cols: e,
        });
    }
    let (r, c) = ids.dim();
    if r != t || c != cfg.top_k() {
        return Err(RouteError::IdsShape {
            expected_rows: t,
            expected_k: cfg.top_k(),
            rows: r,
            cols: c,
        });
    }
    let u = slot_ids_from_i64(ids, cfg.num_experts())?;
    replay_slots_host(router, logits, u.view(), &[], threshold, &CallSite::default())
}
