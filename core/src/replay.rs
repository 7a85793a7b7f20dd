//! The [`ReplayPolicy`] trait and the [`Replayed`] decorator that composes a policy with any
//! [`Router`].

use crate::config::RouterConfig;
use crate::error::{ReplayError, RouteError};
use crate::logits::LogitsRef;
use crate::router::{CallSite, HostWeights, IdsSink, Routed, Router};
use ndarray::{Array2, ArrayView2};

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
#[derive(Debug, Clone)]
pub struct Replayed<R, P> {
    inner: R,
    policy: P,
}

impl<R: Router, P: ReplayPolicy> Replayed<R, P> {
    /// Composes `router` with `policy`.
    pub fn new(router: R, policy: P) -> Self {
        Replayed { inner: router, policy }
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
                self.record(&r.ids, site, shape)?;
                Ok(r)
            }
            Plan::Replay(forced) => {
                // Whole router rows, per-slot sentinels and threshold replay (replay_slots).
                let out = crate::replay_slots::resolve_forced(&self.inner, &self.policy, logits, forced, site, shape)?;
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
