//! The [`ReplayPolicy`] trait and the [`Replayed`] decorator that composes a policy with any
//! [`Router`].

use crate::backward::LossGrads;
use crate::config::RouterConfig;
use crate::error::{ReplayError, RouteError};
use crate::logits::LogitsRef;
use crate::router::{CallSite, HostGrad, HostMatrix, HostWeights, IdsSink, Pass, Routed, Router};
use ndarray::{Array2, ArrayView2};
use std::collections::VecDeque;
use std::sync::Mutex;

/// The shape of one routing call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteShape {
    /// Rows T.
    pub rows: usize,
    /// Experts E.
    pub num_experts: usize,
    /// K.
    pub top_k: usize,
}

/// Ids a policy forces for one call.
#[derive(Debug, Clone, PartialEq)]
pub struct ForcedIds {
    /// `[T, K]` ids in slot order. Rows listed in `router_rows` are ignored.
    pub ids: Array2<u32>,
    /// Rows (ascending) the router selects itself: padding rows, and missing routes when the
    /// policy falls back.
    pub router_rows: Vec<usize>,
}

/// A policy's decision for one call.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Let the router select.
    Route,
    /// Use these ids; the router only computes weights.
    Replay(ForcedIds),
}

/// Decides, per call site, whether the router selects or the ids are forced, and receives the
/// final ids afterwards. Methods take `&self`: implementations use interior mutability so that
/// several layers (threads) can share one policy.
pub trait ReplayPolicy: Send + Sync {
    /// Called before routing.
    fn plan(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Plan, ReplayError>;

    /// Called after the ids are final (selected or forced); a recording policy returns a sink
    /// that receives a host copy of them. The default records nothing.
    fn recorder(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Option<IdsSink>, ReplayError> {
        let _ = (site, shape);
        Ok(None)
    }

    /// Threshold replay at this call site ([`crate::replay_slots`]): `Some` makes the decorator
    /// keep a forced id only when the live score clears the threshold. The default is `None`.
    fn threshold(&self, site: &CallSite<'_>) -> Option<crate::replay_slots::ReplayThreshold> {
        let _ = site;
        None
    }

    /// Told, after a [`Plan::Replay`], what happened to the slots: replayed, replaced by the
    /// threshold, taken from the router (sentinel slots, router rows). The default ignores it.
    fn slots_resolved(&self, site: &CallSite<'_>, counts: &crate::replay_slots::SlotCounts) {
        let _ = (site, counts);
    }
}

/// The pass-through policy: the router always selects, nothing is recorded.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThrough;

impl ReplayPolicy for PassThrough {
    fn plan(&self, _site: &CallSite<'_>, _shape: RouteShape) -> Result<Plan, ReplayError> {
        Ok(Plan::Route)
    }
}

impl<P: ReplayPolicy + ?Sized> ReplayPolicy for &P {
    fn plan(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Plan, ReplayError> {
        (**self).plan(site, shape)
    }
    fn recorder(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Option<IdsSink>, ReplayError> {
        (**self).recorder(site, shape)
    }
    fn threshold(&self, site: &CallSite<'_>) -> Option<crate::replay_slots::ReplayThreshold> {
        (**self).threshold(site)
    }
    fn slots_resolved(&self, site: &CallSite<'_>, counts: &crate::replay_slots::SlotCounts) {
        (**self).slots_resolved(site, counts)
    }
}

impl<P: ReplayPolicy + ?Sized> ReplayPolicy for std::sync::Arc<P> {
    fn plan(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Plan, ReplayError> {
        (**self).plan(site, shape)
    }
    fn recorder(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Option<IdsSink>, ReplayError> {
        (**self).recorder(site, shape)
    }
    fn threshold(&self, site: &CallSite<'_>) -> Option<crate::replay_slots::ReplayThreshold> {
        (**self).threshold(site)
    }
    fn slots_resolved(&self, site: &CallSite<'_>, counts: &crate::replay_slots::SlotCounts) {
        (**self).slots_resolved(site, counts)
    }
}

/// A router decorated with a replay policy; itself a [`Router`].
///
/// `route` asks the policy for a plan: either the inner router selects, or the forced ids are
/// validated (range, duplicates, shape), moved to the device and weighed by
/// [`Router::weights_for`]. Rows the policy leaves to the router (padding, fallbacks) are
/// selected by the inner router. The final ids are then offered to the policy's recorder.
///
/// **Backward tape.** Every forward keeps a handle to its final ids (per layer and batch
/// layout, the last [`Replayed::DEFAULT_TAPE_DEPTH`] per layer, first in first out), so that
/// [`Router::weights_vjp`] differentiates exactly the ids of its forward: a backward with other
/// ids is [`RouteError::IdsDifferFromForward`], one without a forward
/// [`RouteError::BackwardWithoutForward`]; an activation recompute ([`Pass::Recompute`]) must
/// reproduce the forward's ids too. Each backward consumes its entry. Inference-only users
/// turn the tape off with [`Replayed::with_tape_depth`]`(0)` (the backward then checks nothing).
pub struct Replayed<R: Router, P> {
    inner: R,
    policy: P,
    tape: Mutex<Tape<R::Ids>>,
    tape_depth: usize,
}

/// The backward tape: final ids of forwards, oldest first.
type Tape<I> = VecDeque<(TapeKey, I)>;

/// Where a taped forward ran: layer, a digest of the batch layout, rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TapeKey {
    layer: u32,
    layout: u64,
    rows: usize,
}

impl TapeKey {
    fn of(site: &CallSite<'_>, rows: usize) -> Self {
        use std::hash::{Hash, Hasher};
        let layout = site.layout.map_or(0, |l| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            format!("{:?}", l.segments()).hash(&mut h);
            h.finish() | 1
        });
        TapeKey {
            layer: site.layer.0,
            layout,
            rows,
        }
    }
}

impl<R: Router + std::fmt::Debug, P: std::fmt::Debug> std::fmt::Debug for Replayed<R, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayed")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .field("tape_depth", &self.tape_depth)
            .finish_non_exhaustive()
    }
}

impl<R: Router + Clone, P: Clone> Clone for Replayed<R, P> {
    /// A copy of router and policy with an empty tape.
    fn clone(&self) -> Self {
        Replayed {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            tape: Mutex::new(VecDeque::new()),
            tape_depth: self.tape_depth,
        }
    }
}

impl<R: Router, P: ReplayPolicy> Replayed<R, P> {
    /// Forwards kept per layer for the backward by default: enough for the micro-batches a
    /// pipeline schedule has in flight.
    pub const DEFAULT_TAPE_DEPTH: usize = 8;

    /// Composes `router` with `policy` (backward tape on, [`Replayed::DEFAULT_TAPE_DEPTH`]).
    pub fn new(router: R, policy: P) -> Self {
        Replayed {
            inner: router,
            policy,
            tape: Mutex::new(VecDeque::new()),
            tape_depth: Self::DEFAULT_TAPE_DEPTH,
        }
    }
    /// Sets how many forwards per layer the backward tape keeps (0: no tape, the backward
    /// checks nothing — for inference, where no backward follows).
    pub fn with_tape_depth(mut self, depth: usize) -> Self {
        self.tape_depth = depth;
        self
    }
    /// The inner router.
    pub fn inner(&self) -> &R {
        &self.inner
    }
    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }
    /// Splits into router and policy.
    pub fn into_parts(self) -> (R, P) {
        (self.inner, self.policy)
    }

    fn tape_lock(&self) -> Result<std::sync::MutexGuard<'_, Tape<R::Ids>>, RouteError> {
        self.tape.lock().map_err(|_| RouteError::Recorder {
            reason: "the backward tape's lock is poisoned (a thread panicked while routing)".into(),
        })
    }

    /// Keeps the final ids of a forward; a recompute must match the oldest forward of its key.
    fn tape_forward(&self, ids: &R::Ids, site: &CallSite<'_>, rows: usize) -> Result<(), RouteError> {
        if self.tape_depth == 0 {
            return Ok(());
        }
        let key = TapeKey::of(site, rows);
        let mut tape = self.tape_lock()?;
        if site.pass == Pass::Recompute
            && let Some((_, fwd)) = tape.iter().find(|(k, _)| *k == key)
            && let Some(row) = self.inner.first_differing_row(fwd, ids)?
        {
            return Err(RouteError::IdsDifferFromForward {
                pass: "recompute",
                layer: key.layer,
                row,
            });
        }
        if site.pass == Pass::Recompute && tape.iter().any(|(k, _)| *k == key) {
            return Ok(());
        }
        if tape.iter().filter(|(k, _)| k.layer == key.layer).count() >= self.tape_depth
            && let Some(pos) = tape.iter().position(|(k, _)| k.layer == key.layer)
        {
            tape.remove(pos);
        }
        tape.push_back((key, ids.clone()));
        Ok(())
    }

    fn shape(&self, logits: &R::Logits<'_>, site: &CallSite<'_>) -> Result<RouteShape, RouteError> {
        let rows = self.inner.batch_rows(logits);
        if let Some(l) = site.layout
            && l.rows() != rows
        {
            return Err(RouteError::LayoutRows {
                layout_rows: l.rows(),
                batch_rows: rows,
            });
        }
        let c = self.inner.config();
        Ok(RouteShape {
            rows,
            num_experts: c.num_experts(),
            top_k: c.top_k(),
        })
    }

    fn record(&self, ids: &R::Ids, site: &CallSite<'_>, shape: RouteShape) -> Result<(), RouteError> {
        if let Some(sink) = self.policy.recorder(site, shape)? {
            self.inner.record_ids(ids, sink)?;
        }
        Ok(())
    }
}

impl<R: Router, P: ReplayPolicy> Router for Replayed<R, P> {
    type Logits<'a> = R::Logits<'a>;
    type Ids = R::Ids;
    type Weights = R::Weights;
    type LogitsGrad = R::LogitsGrad;

    fn config(&self) -> &RouterConfig {
        self.inner.config()
    }
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn batch_rows(&self, logits: &Self::Logits<'_>) -> usize {
        self.inner.batch_rows(logits)
    }

    fn route(
        &self,
        logits: &Self::Logits<'_>,
        site: &CallSite<'_>,
    ) -> Result<Routed<Self::Ids, Self::Weights>, RouteError> {
        let shape = self.shape(logits, site)?;
        match self.policy.plan(site, shape)? {
            Plan::Route => {
                let r = self.inner.route(logits, site)?;
                self.tape_forward(&r.ids, site, shape.rows)?;
                self.record(&r.ids, site, shape)?;
                Ok(r)
            }
            Plan::Replay(forced) => {
                // Whole router rows, per-slot sentinels and threshold replay (replay_slots).
                let out = crate::replay_slots::resolve_forced(&self.inner, &self.policy, logits, forced, site, shape)?;
                self.tape_forward(&out.ids, site, shape.rows)?;
                self.record(&out.ids, site, shape)?;
                Ok(out)
            }
        }
    }

    fn weights_for(
        &self,
        logits: &Self::Logits<'_>,
        ids: &Self::Ids,
        site: &CallSite<'_>,
    ) -> Result<Self::Weights, RouteError> {
        self.inner.weights_for(logits, ids, site)
    }
    /// The inner router's backward on the ids of the forward at the same layer and batch
    /// (see the backward tape above): other ids, or no forward, are an error.
    fn weights_vjp(
        &self,
        logits: &Self::Logits<'_>,
        ids: &Self::Ids,
        grad: &Self::Weights,
        losses: &LossGrads<'_>,
        site: &CallSite<'_>,
    ) -> Result<Self::LogitsGrad, RouteError> {
        if self.tape_depth > 0 {
            let key = TapeKey::of(site, self.inner.batch_rows(logits));
            let mut tape = self.tape_lock()?;
            let pos = tape
                .iter()
                .position(|(k, _)| *k == key)
                .ok_or(RouteError::BackwardWithoutForward { layer: key.layer })?;
            if let Some(row) = self.inner.first_differing_row(&tape[pos].1, ids)? {
                return Err(RouteError::IdsDifferFromForward {
                    pass: "backward",
                    layer: key.layer,
                    row,
                });
            }
            tape.remove(pos);
        }
        self.inner.weights_vjp(logits, ids, grad, losses, site)
    }
    fn weights_from_host(&self, weights: &HostMatrix) -> Result<Self::Weights, RouteError> {
        self.inner.weights_from_host(weights)
    }
    fn logits_grad_to_host(&self, grad: &Self::LogitsGrad) -> Result<HostGrad, RouteError> {
        self.inner.logits_grad_to_host(grad)
    }
    fn first_differing_row(&self, a: &Self::Ids, b: &Self::Ids) -> Result<Option<usize>, RouteError> {
        self.inner.first_differing_row(a, b)
    }
    fn ids_from_host(&self, ids: ArrayView2<'_, u32>) -> Result<Self::Ids, RouteError> {
        self.inner.ids_from_host(ids)
    }
    fn ids_to_host(&self, ids: &Self::Ids) -> Result<Array2<u32>, RouteError> {
        self.inner.ids_to_host(ids)
    }
    fn weights_to_host(&self, weights: &Self::Weights) -> Result<HostWeights, RouteError> {
        self.inner.weights_to_host(weights)
    }
    fn record_ids(&self, ids: &Self::Ids, sink: IdsSink) -> Result<(), RouteError> {
        self.inner.record_ids(ids, sink)
    }
    fn flush_records(&self) -> Result<(), RouteError> {
        self.inner.flush_records()
    }
    fn with_host_logits<T, F>(&self, logits: &LogitsRef<'_>, f: F) -> Result<T, RouteError>
    where
        F: for<'l> FnOnce(&Self::Logits<'l>) -> Result<T, RouteError>,
    {
        self.inner.with_host_logits(logits, f)
    }
    /// As the provided method; when the policy asks for threshold replay at `site`, the host
    /// logits are also kept for the threshold's scores ([`crate::replay_slots`]).
    fn route_host_at(
        &self,
        logits: &LogitsRef<'_>,
        site: &CallSite<'_>,
    ) -> Result<(Array2<u32>, HostWeights), RouteError> {
        let threshold = self.policy.threshold(site).is_some();
        crate::replay_slots::with_threshold_logits(threshold, logits, || {
            self.with_host_logits(logits, |l| {
                let r = self.route(l, site)?;
                Ok((self.ids_to_host(&r.ids)?, self.weights_to_host(&r.weights)?))
            })
        })
    }
    fn replay_with_fallback(
        &self,
        logits: &Self::Logits<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
        site: &CallSite<'_>,
    ) -> Result<Routed<Self::Ids, Self::Weights>, RouteError> {
        self.inner.replay_with_fallback(logits, ids, router_rows, site)
    }
    fn tokens_per_expert(&self, ids: &Self::Ids) -> Result<Vec<u64>, RouteError> {
        self.inner.tokens_per_expert(ids)
    }
    fn apply_capacity(
        &self,
        ids: &Self::Ids,
        weights: &Self::Weights,
    ) -> Result<Option<crate::capacity::CapacityOutcome>, RouteError> {
        self.inner.apply_capacity(ids, weights)
    }
}
