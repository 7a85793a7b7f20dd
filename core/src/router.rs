//! The [`Router`] trait: logits on a backend's device in, K ids and K weights per token out.

use crate::backward::LossGrads;
use crate::capacity::{CapacityOutcome, apply_capacity};
use crate::config::RouterConfig;
use crate::error::RouteError;
use crate::layout::{BatchLayout, LayerId};
use crate::logits::LogitsRef;
use ndarray::{Array2, ArrayView2};

/// Which pass of training a routing call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pass {
    /// The forward pass (inference, old-policy log-probs, the training forward).
    #[default]
    Forward,
    /// Activation recompute during backward: replay must give the same ids again.
    Recompute,
}

/// Where a routing call comes from: the model layer, the batch layout and the pass. Plain
/// routers ignore it; replay policies key on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallSite<'a> {
    /// Model layer id of the MoE layer being routed.
    pub layer: LayerId,
    /// Which (sequence, position) every batch row holds, if known.
    pub layout: Option<&'a BatchLayout>,
    /// Forward or recompute.
    pub pass: Pass,
}

impl<'a> CallSite<'a> {
    /// A call at `layer` without a layout (enough for plain routing and recording of whole,
    /// unaddressed batches).
    pub fn layer(layer: u32) -> Self {
        CallSite {
            layer: LayerId(layer),
            layout: None,
            pass: Pass::Forward,
        }
    }
    /// Sets the batch layout.
    pub fn with_layout(mut self, layout: &'a BatchLayout) -> Self {
        self.layout = Some(layout);
        self
    }
    /// Sets the pass.
    pub fn with_pass(mut self, pass: Pass) -> Self {
        self.pass = pass;
        self
    }
}

/// Ids and weights `[T, K]`, in whatever memory the backend keeps them.
#[derive(Debug, Clone)]
pub struct Routed<I, W> {
    /// Expert ids, slot order: key descending, ties by lower id (or the replayed order).
    pub ids: I,
    /// Weights for those ids, same slot order.
    pub weights: W,
}

/// A host matrix in the compute precision: weights `[T, K]` ([`HostWeights`]) or a gradient on
/// the logits `[T, E]` ([`HostGrad`]).
#[derive(Debug, Clone, PartialEq)]
pub enum HostMatrix {
    /// f32 values.
    F32(Array2<f32>),
    /// f64 values (CPU, f64 compute).
    F64(Array2<f64>),
}

/// Host weights `[T, K]` in the compute precision.
pub type HostWeights = HostMatrix;

/// A host gradient on the logits `[T, E]` in the compute precision.
pub type HostGrad = HostMatrix;

impl HostMatrix {
    /// The values as f32 (f64 values are rounded).
    pub fn to_f32(&self) -> Array2<f32> {
        match self {
            HostMatrix::F32(a) => a.clone(),
            HostMatrix::F64(a) => a.mapv(|x| x as f32),
        }
    }
    /// The values as f64 (exact).
    pub fn to_f64(&self) -> Array2<f64> {
        match self {
            HostMatrix::F32(a) => a.mapv(f64::from),
            HostMatrix::F64(a) => a.clone(),
        }
    }
    /// `(rows, cols)`.
    pub fn dim(&self) -> (usize, usize) {
        match self {
            HostMatrix::F32(a) => a.dim(),
            HostMatrix::F64(a) => a.dim(),
        }
    }
}

/// The id that marks a row of replay ids as "the router selects this row"
/// ([`Router::replay_with_fallback`]); never a valid expert id (E ≤ [`crate::MAX_EXPERTS`]).
pub const ROUTER_SELECTS: u32 = u32::MAX;

/// A callback that receives the ids a router produced, `[T, K]` on the host (used by recording
/// policies). The view borrows the backend's delivery buffer for the duration of the call (on
/// CUDA: the pinned buffer the ids were copied into, returned to its pool when the sink
/// returns), so recording copies nothing the sink does not copy itself; a sink that keeps the
/// ids beyond the call takes `ids.to_owned()`.
pub type IdsSink = Box<dyn for<'a> FnOnce(ArrayView2<'a, u32>) + Send>;

/// A top-k router on one backend.
///
/// `route` selects K experts per row and weighs them; `weights_for` is the replay entry point: it
/// takes given ids (kept in their slot order) and computes their weights from the live logits
/// (DESIGN §2 "Replay"). Both take the [`CallSite`] so that a decorator
/// ([`crate::Replayed`]) can record or replay per layer and batch.
pub trait Router {
    /// The backend's logits `[T, E]` (a host view, a device buffer, ...).
    type Logits<'a>;
    /// The backend's ids `[T, K]` (cloning is cheap on device backends: a shared buffer).
    type Ids: Clone;
    /// The backend's weights `[T, K]` (also the upstream gradient of [`Router::weights_vjp`]).
    type Weights;
    /// The backend's gradient on the logits `[T, E]` ([`Router::weights_vjp`]).
    type LogitsGrad;

    /// The routing rule.
    fn config(&self) -> &RouterConfig;

    /// A short backend name ("cpu", "cuda", "wgpu", "reference").
    fn backend_name(&self) -> &'static str;

    /// Rows T of a logits tensor.
    fn batch_rows(&self, logits: &Self::Logits<'_>) -> usize;

    /// Selects and weighs K experts for every row.
    fn route(
        &self,
        logits: &Self::Logits<'_>,
        site: &CallSite<'_>,
    ) -> Result<Routed<Self::Ids, Self::Weights>, RouteError>;

    /// Computes the weights of the given ids (slot order kept) from the live logits.
    fn weights_for(
        &self,
        logits: &Self::Logits<'_>,
        ids: &Self::Ids,
        site: &CallSite<'_>,
    ) -> Result<Self::Weights, RouteError>;

    /// The backward pass (DESIGN §2b): the gradient on the logits `[T, E]` of
    /// `Σ grad∘w + a·aux_loss + c·z_loss`, where `w` are the weights of `ids` on `logits` (what
    /// [`Router::weights_for`] returns, and what [`Router::route`] returned with these ids), and
    /// `a`, `c` and the aux-loss inputs come from `losses`. `grad` is the upstream gradient
    /// `[T, K]` in slot order ([`Router::weights_from_host`] moves a host one to the backend).
    ///
    /// Selection passes no gradient; the result stays on the backend's device. Capacity
    /// dropping is not part of the weights: a dropped slot passes no gradient when its upstream
    /// gradient is zero ([`crate::capacity::CapacityOutcome::zero_dropped`]). Ids must be
    /// valid (as for `weights_for`); a row of `−∞` logits only is
    /// [`RouteError::AllMasked`], NaN or `+∞` is [`RouteError::NonFiniteLogit`].
    fn weights_vjp(
        &self,
        logits: &Self::Logits<'_>,
        ids: &Self::Ids,
        grad: &Self::Weights,
        losses: &LossGrads<'_>,
        site: &CallSite<'_>,
    ) -> Result<Self::LogitsGrad, RouteError>;

    /// Moves a host matrix `[T, K]` (weights, or the upstream gradient of
    /// [`Router::weights_vjp`]) to the backend, converting to the compute precision.
    fn weights_from_host(&self, weights: &HostMatrix) -> Result<Self::Weights, RouteError>;

    /// Copies a gradient on the logits to the host.
    fn logits_grad_to_host(&self, grad: &Self::LogitsGrad) -> Result<HostGrad, RouteError>;

    /// The first row in which two id tensors differ (`None`: equal). Used by
    /// [`crate::Replayed`] to hold the backward to the forward's ids. The default compares host
    /// copies; device backends answer at once for two handles of the same buffer.
    fn first_differing_row(&self, a: &Self::Ids, b: &Self::Ids) -> Result<Option<usize>, RouteError> {
        let a = self.ids_to_host(a)?;
        let b = self.ids_to_host(b)?;
        if a.dim() != b.dim() {
            return Ok(Some(0));
        }
        Ok(a.outer_iter().zip(b.outer_iter()).position(|(x, y)| x != y))
    }

    /// Moves host ids `[T, K]` to the backend (no validation beyond shape).
    fn ids_from_host(&self, ids: ArrayView2<'_, u32>) -> Result<Self::Ids, RouteError>;

    /// Copies ids to the host.
    fn ids_to_host(&self, ids: &Self::Ids) -> Result<Array2<u32>, RouteError>;

    /// Copies weights to the host.
    fn weights_to_host(&self, weights: &Self::Weights) -> Result<HostWeights, RouteError>;

    /// Hands a host copy of `ids` to `sink`. The default copies synchronously; device backends
    /// override it to copy on a side stream without stalling routing.
    fn record_ids(&self, ids: &Self::Ids, sink: IdsSink) -> Result<(), RouteError> {
        let host = self.ids_to_host(ids)?;
        sink(host.view());
        Ok(())
    }

    /// Replay with fallback rows in one call. `ids` are the forced host ids `[T, K]` in slot
    /// order; the rows listed in `router_rows` (ascending) are selected by the router itself and
    /// their content in `ids` is ignored (by convention [`ROUTER_SELECTS`] in every slot). The
    /// forced rows must already be valid ([`validate_ids`] with `router_rows` skipped). Returns
    /// the final ids (forced rows as given, the others as selected) and the weights of every row
    /// from the live logits.
    ///
    /// The default routes the whole batch when `router_rows` is not empty and merges the two on
    /// the host; every backend of this workspace overrides it to select the fallback rows inside
    /// the replay kernel (one upload of the ids, one launch, no second full route).
    fn replay_with_fallback(
        &self,
        logits: &Self::Logits<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
        site: &CallSite<'_>,
    ) -> Result<Routed<Self::Ids, Self::Weights>, RouteError> {
        let dev = if router_rows.is_empty() {
            self.ids_from_host(ids)?
        } else {
            let own = self.route(logits, site)?;
            let own = self.ids_to_host(&own.ids)?;
            let mut merged = ids.to_owned();
            for &r in router_rows {
                merged.row_mut(r).assign(&own.row(r));
            }
            self.ids_from_host(merged.view())?
        };
        let weights = self.weights_for(logits, &dev, site)?;
        Ok(Routed { ids: dev, weights })
    }

    /// Blocks until every copy handed to a sink by [`Router::record_ids`] so far has been
    /// delivered. Backends that record asynchronously (CUDA copies on a side stream) override
    /// it; the default has nothing to wait for.
    fn flush_records(&self) -> Result<(), RouteError> {
        Ok(())
    }

    /// Calls `f` with this backend's logits for the host `logits`: the view itself on host
    /// backends, an upload on device backends. This is the one place a backend says how host
    /// data reaches it; [`Router::route_host`] and [`Router::weights_host`] build on it.
    fn with_host_logits<T, F>(&self, logits: &LogitsRef<'_>, f: F) -> Result<T, RouteError>
    where
        F: for<'l> FnOnce(&Self::Logits<'l>) -> Result<T, RouteError>;

    /// The backward on host data ([`Router::weights_vjp`]): logits `[T, E]`, the forward's ids
    /// `[T, K]` (validated: range, duplicates) and the upstream gradient `[T, K]`, at `site`.
    /// Shapes are checked first; the error names both shapes.
    fn weights_vjp_host_at(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        grad: &HostMatrix,
        losses: &LossGrads<'_>,
        site: &CallSite<'_>,
    ) -> Result<HostGrad, RouteError> {
        let cfg = self.config();
        let (t, e) = logits.dim();
        if e != cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: cfg.num_experts(),
                rows: t,
                cols: e,
            });
        }
        validate_ids(ids, t, e, cfg.top_k(), &[])?;
        let (gr, gc) = grad.dim();
        if (gr, gc) != (t, cfg.top_k()) {
            return Err(RouteError::GradShape {
                expected_rows: t,
                expected_k: cfg.top_k(),
                rows: gr,
                cols: gc,
            });
        }
        losses.check(t, e)?;
        self.with_host_logits(logits, |l| {
            let d = self.ids_from_host(ids)?;
            let g = self.weights_from_host(grad)?;
            let dz = self.weights_vjp(l, &d, &g, losses, site)?;
            self.logits_grad_to_host(&dz)
        })
    }

    /// Routes host logits at `site` and copies ids and weights back to the host. Through a
    /// [`crate::Replayed`] router the policy plans, records and replays as for device data.
    fn route_host_at(
        &self,
        logits: &LogitsRef<'_>,
        site: &CallSite<'_>,
    ) -> Result<(Array2<u32>, HostWeights), RouteError> {
        self.with_host_logits(logits, |l| {
            let r = self.route(l, site)?;
            Ok((self.ids_to_host(&r.ids)?, self.weights_to_host(&r.weights)?))
        })
    }

    /// [`Router::route_host_at`] at the default call site (layer 0, no layout, forward).
    fn route_host(&self, logits: &LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError> {
        self.route_host_at(logits, &CallSite::default())
    }

    /// The weights of host `ids` (slot order kept) on host logits at `site`: the replay entry
    /// point on host data. The logits must have E columns and the ids shape `[T, K]`, every id
    /// `< E` and no duplicate in a row; otherwise the error names the row and slot.
    fn weights_host_at(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        site: &CallSite<'_>,
    ) -> Result<HostWeights, RouteError> {
        let cfg = self.config();
        let (t, e) = logits.dim();
        if e != cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: cfg.num_experts(),
                rows: t,
                cols: e,
            });
        }
        validate_ids(ids, t, e, cfg.top_k(), &[])?;
        self.with_host_logits(logits, |l| {
            let d = self.ids_from_host(ids)?;
            let w = self.weights_for(l, &d, site)?;
            self.weights_to_host(&w)
        })
    }

    /// [`Router::weights_host_at`] at the default call site.
    fn weights_host(&self, logits: &LogitsRef<'_>, ids: ArrayView2<'_, u32>) -> Result<HostWeights, RouteError> {
        self.weights_host_at(logits, ids, &CallSite::default())
    }

    /// Tokens routed to each expert (length E). The default copies the ids to the host and
    /// counts there ([`crate::stats::tokens_per_expert`]); device backends count on the device.
    fn tokens_per_expert(&self, ids: &Self::Ids) -> Result<Vec<u64>, RouteError> {
        let host = self.ids_to_host(ids)?;
        Ok(crate::stats::tokens_per_expert(
            host.view(),
            self.config().num_experts(),
        ))
    }

    /// Capacity dropping (DESIGN §2 step 8) of a selection and its weights; `None` when the
    /// config has no capacity. The default is the host computation
    /// ([`crate::capacity::apply_capacity`]) on copies of ids and weights, so every backend
    /// drops exactly the same slots.
    fn apply_capacity(&self, ids: &Self::Ids, weights: &Self::Weights) -> Result<Option<CapacityOutcome>, RouteError> {
        let cfg = self.config();
        let Some(cap) = cfg.capacity() else {
            return Ok(None);
        };
        let i = self.ids_to_host(ids)?;
        let w = self.weights_to_host(weights)?.to_f64();
        Ok(Some(apply_capacity(&cap, i.view(), w.view(), cfg.num_experts())))
    }
}

/// Checks host replay ids: shape `[rows, K]`, every id `< E`, no duplicate in a row. Rows listed
/// in `skip` (sorted ascending) are not checked. The error names the row and slot.
pub fn validate_ids(
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
        if skip_it.peek() == Some(&t) {
            skip_it.next();
            continue;
        }
        for (j, &id) in row.iter().enumerate() {
            if id as usize >= num_experts {
                return Err(RouteError::IdOutOfRange {
                    row: t,
                    slot: j,
                    id: i64::from(id),
                    num_experts,
                });
            }
            for (jj, &prev) in row.iter().take(j).enumerate() {
                if prev == id {
                    return Err(RouteError::DuplicateId {
                        row: t,
                        id,
                        first_slot: jj,
                        second_slot: j,
                    });
                }
            }
        }
    }
    Ok(())
}
