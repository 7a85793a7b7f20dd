//! Recording and replaying policies ([`ReplayPolicy`] implementations) over traces.
//!
//! * [`Record`] — records the selection the router made (before capacity dropping), per layer id
//!   and batch layout, into an in-memory [`Trace`] or streaming into a `.mrt` file. Padding rows
//!   are never recorded. The sink only copies the ids and appends them under a short lock.
//! * [`Replay`] — replays from any [`RouteSource`]: an in-memory [`Trace`], a memory-mapped
//!   [`TraceFile`] ([`ReplayFromFile`]) or per-rank shards ([`ShardedTrace`]).
//!
//! Replay is **keyed, not a queue**: the ids for a call are looked up by (layer id, the
//! (sequence, position) of every row of the batch layout), so asking again for the same key —
//! activation recompute, a repeated micro-batch — returns the same ids, and a trace recorded per
//! sequence replays into any batch shape (packed, padded, micro-batched, context-parallel).
//!
//! Missing routes (a position never recorded, a row stored as missing, the last position under
//! [`crate::trace::RowConvention::TokensMinusOne`]) are a [`ReplayError::MissingRoute`] naming
//! layer, sequence and position in [`MissingRoutes::Strict`] mode (the default), or are routed
//! by the router itself and counted per layer in [`MissingRoutes::Fallback`] mode. Padding rows
//! are always routed by the router and never counted.

use crate::metrics::{LayerPolicyCounts, PolicyCounts};
use crate::trace::{
    AppendStats, MISSING_ID, OpenOptions, RouteSource, ShardedTrace, Trace, TraceFile, TraceHeader, TraceWriter,
    WriterOptions, WriterStats,
};
use moe_router_core::error::ReplayError;
use moe_router_core::layout::{BatchLayout, LayerId, Segment, SeqId};
use moe_router_core::replay::{ForcedIds, Plan, ReplayPolicy, RouteShape};
use moe_router_core::replay_slots::{ReplayThreshold, SlotCounts};
use moe_router_core::router::{CallSite, IdsSink, Pass};
use ndarray::{Array2, ArrayView2, s};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What to do with a token row that has no recorded route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingRoutes {
    /// [`ReplayError::MissingRoute`] naming layer, sequence and position.
    #[default]
    Strict,
    /// The router selects for those rows; the policy counts them per layer.
    Fallback,
}

/// Checks the call against the header: MoE layer, E and K, and a layout.
fn check_site<'a>(
    header: &TraceHeader,
    site: &CallSite<'a>,
    shape: RouteShape,
) -> Result<(usize, &'a BatchLayout), ReplayError> {
    let li = header
        .layer_index(site.layer)
        .ok_or_else(|| header.unknown_layer(site.layer))?;
    if shape.top_k != header.top_k() || shape.num_experts != header.num_experts() {
        return Err(ReplayError::Shape(format!(
            "the router has E = {}, K = {} but the trace has E = {}, K = {}",
            shape.num_experts,
            shape.top_k,
            header.num_experts(),
            header.top_k()
        )));
    }
    let layout = site.layout.ok_or(ReplayError::NoLayout { layer: site.layer.0 })?;
    Ok((li, layout))
}

/// What [`gather`] found besides the ids.
#[derive(Debug, Clone, Copy, Default)]
struct Gathered {
    /// Token rows whose route was missing (fallback mode).
    missing: u64,
    /// Token rows before their sequence's route start ([`BatchLayout::route_start`]).
    uncovered: u64,
}

/// Reads the rows of `layout` at `layer` from `source`. Padding rows, rows before their
/// sequence's route start and (when `strict` is false) missing rows are returned in
/// `router_rows`; the missing and the uncovered ones are counted separately. A row is missing
/// when every slot is [`MISSING_ID`]; a row with the sentinel in some slots only (a trace with
/// slot sentinels) is replayed, its sentinel slots left to the router.
fn gather<S: RouteSource + ?Sized>(
    source: &S,
    layer: LayerId,
    layout: &BatchLayout,
    strict: bool,
) -> Result<(ForcedIds, Gathered), ReplayError> {
    let k = source.header().top_k();
    let mut ids = Array2::<u32>::zeros((layout.rows(), k));
    let mut router_rows = Vec::new();
    let mut g = Gathered::default();
    let mut row = 0usize;
    for seg in layout.segments() {
        match *seg {
            Segment::Padding { len } => {
                router_rows.extend(row..row + len);
                row += len;
            }
            Segment::Tokens { seq, start, len } => {
                // Rows before the route start are the router's, not read.
                let first = layout.route_start(seq);
                let skip = (first.saturating_sub(start)).min(len as u64) as usize;
                if skip > 0 {
                    router_rows.extend(row..row + skip);
                    g.uncovered += skip as u64;
                }
                let (row0, start0, len0) = (row + skip, start + skip as u64, len - skip);
                let mut view = ids.slice_mut(s![row0..row0 + len0, ..]);
                source.read_rows(seq, layer, start0, view.view_mut())?;
                for (i, mut r) in view.outer_iter_mut().enumerate() {
                    if k > 0 && r.iter().all(|&x| x == MISSING_ID) {
                        if strict {
                            return Err(ReplayError::MissingRoute {
                                layer: layer.0,
                                sequence: seq.0,
                                position: start0 + i as u64,
                            });
                        }
                        r.fill(0);
                        router_rows.push(row0 + i);
                        g.missing += 1;
                    }
                }
                row += len;
            }
        }
    }
    router_rows.sort_unstable();
    Ok((ForcedIds { ids, router_rows }, g))
}

fn layout_hash(layout: &BatchLayout) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for s in layout.segments() {
        match *s {
            Segment::Tokens { seq, start, len } => (0u8, seq.0, start, len).hash(&mut h),
            Segment::Padding { len } => (1u8, len).hash(&mut h),
        }
    }
    h.finish()
}

/// Summary returned by [`Replay::finish`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplaySummary {
    /// Distinct (layer, batch layout) keys replayed since the last `finish`/`reset`, counted
    /// under [`Replay::expect_each_key`] (0 without it). Layouts without token rows are not keys.
    pub keys: u64,
    /// Calls answered since then (forward and recompute).
    pub calls: u64,
    /// MoE layers of the trace that no call asked for since then (a model whose MoE layers are
    /// not wired to the policy shows up here).
    pub layers_never_replayed: Vec<u32>,
    /// Fallback and replay counts per layer (cumulative).
    pub counts: PolicyCounts,
}

/// Replays recorded ids from a [`RouteSource`]; see the module docs.
///
/// ```
/// use moe_router_trace::policy::Replay;
/// use moe_router_trace::trace::{Trace, TraceHeader};
/// use moe_router_core::{BatchLayout, CallSite, LayerId, LogitsRef, ReferenceRouter, Replayed, Router, RouterConfig, SeqId};
/// use ndarray::array;
///
/// let cfg = RouterConfig::builder(4, 2).build().unwrap();
/// let mut trace = Trace::new(TraceHeader::for_config(&cfg, &[1, 3]).unwrap());
/// trace.append(SeqId(7), LayerId(3), 0, array![[2u32, 0], [1, 3]].view()).unwrap();
/// let policy = Replay::new(trace, &[1, 3]).unwrap();
/// let router = Replayed::new(ReferenceRouter::new(cfg), policy);
/// let layout = BatchLayout::single(SeqId(7), 2);
/// let logits = array![[0.1f32, 2.0, -1.0, 1.5], [0.3, 0.2, 0.1, 0.0]];
/// let out = router.route(&LogitsRef::F32(logits.view()), &CallSite::layer(3).with_layout(&layout)).unwrap();
/// assert_eq!(out.ids, array![[2u32, 0], [1, 3]]);
/// ```
#[derive(Debug)]
pub struct Replay<S = Trace> {
    source: S,
    missing: MissingRoutes,
    expect: Option<u64>,
    threshold: Option<ReplayThreshold>,
    keys: Mutex<KeyCounts>,
    calls: AtomicU64,
    fallbacks: Vec<AtomicU64>,
    replayed: Vec<AtomicU64>,
    uncovered: Vec<AtomicU64>,
    /// Per layer: replayed slots, replaced slots, sentinel slots.
    slots: Vec<[AtomicU64; 3]>,
}

/// Per (layer, layout hash): the layouts seen and how often.
type KeyCounts = HashMap<(u32, u64), Vec<(BatchLayout, u64)>>;

/// Replay from a memory-mapped `.mrt` file.
pub type ReplayFromFile = Replay<TraceFile>;

impl<S: RouteSource> Replay<S> {
    /// A strict replay policy over `source` for a model whose MoE layer ids are
    /// `model_moe_layers` (in order). Errors with [`ReplayError::LayerMapMismatch`] when they
    /// differ from the trace's layer map, and with [`ReplayError::InvalidRoute`] when the content
    /// is invalid (e.g. a layer whose rows all route to expert 0: a bypassed capture).
    pub fn new(source: S, model_moe_layers: &[u32]) -> Result<Self, ReplayError> {
        source.header().check_layer_map(model_moe_layers)?;
        source.validate()?;
        let n = source.header().layers().len();
        Ok(Replay {
            source,
            missing: MissingRoutes::Strict,
            expect: None,
            threshold: None,
            keys: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
            fallbacks: (0..n).map(|_| AtomicU64::new(0)).collect(),
            replayed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            uncovered: (0..n).map(|_| AtomicU64::new(0)).collect(),
            slots: (0..n).map(|_| Default::default()).collect(),
        })
    }

    /// Threshold replay (prime-rl; [`moe_router_core::replay_slots`]): the decorator keeps a
    /// replayed id only when the trainer's live score of it is at least `threshold.ratio()` ×
    /// the trainer's weakest top-K score, and refills the others from the trainer's top-K. It
    /// needs host logits (`Router::route_host_at`). The replace rate per layer is in
    /// [`Replay::counts`] ([`LayerPolicyCounts::replace_rate`]).
    pub fn with_threshold(mut self, threshold: ReplayThreshold) -> Self {
        self.threshold = Some(threshold);
        self
    }
    /// The threshold, if any.
    pub fn threshold(&self) -> Option<ReplayThreshold> {
        self.threshold
    }

    /// Sets the missing-route mode.
    pub fn with_missing(mut self, m: MissingRoutes) -> Self {
        self.missing = m;
        self
    }
    /// Missing routes are errors (the default).
    pub fn strict(self) -> Self {
        self.with_missing(MissingRoutes::Strict)
    }
    /// Missing routes fall back to the router and are counted.
    pub fn fallback(self) -> Self {
        self.with_missing(MissingRoutes::Fallback)
    }
    /// Strict count check: [`Replay::finish`] errors unless every key that was replayed was
    /// replayed exactly `n` times (e.g. 2 = forward + recompute).
    ///
    /// A key is a (layer, batch layout) whose layout holds at least one token row. A layout
    /// without token rows (padding only, or empty: a context-parallel rank that received no
    /// tokens) carries no route, so calls with it are answered and counted in
    /// [`ReplaySummary::calls`] but are not keys: any number of them passes the check.
    pub fn expect_each_key(mut self, n: u64) -> Self {
        self.expect = Some(n);
        self
    }

    /// The source.
    pub fn source(&self) -> &S {
        &self.source
    }
    /// The missing-route mode.
    pub fn missing_routes(&self) -> MissingRoutes {
        self.missing
    }

    /// Fallback and replay counts per layer (cumulative since construction).
    pub fn counts(&self) -> PolicyCounts {
        let per_layer: Vec<LayerPolicyCounts> = self
            .source
            .header()
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| LayerPolicyCounts {
                layer: l.0,
                fallbacks: self.fallbacks[i].load(Ordering::Relaxed),
                replayed_rows: self.replayed[i].load(Ordering::Relaxed),
                uncovered_rows: self.uncovered[i].load(Ordering::Relaxed),
                replayed_slots: self.slots[i][0].load(Ordering::Relaxed),
                replaced_slots: self.slots[i][1].load(Ordering::Relaxed),
                sentinel_slots: self.slots[i][2].load(Ordering::Relaxed),
            })
            .collect();
        PolicyCounts::from_layers(per_layer)
    }

    /// Fallbacks of one layer (0 for a layer not in the map).
    pub fn fallbacks(&self, layer: LayerId) -> u64 {
        self.source
            .header()
            .layer_index(layer)
            .map_or(0, |i| self.fallbacks[i].load(Ordering::Relaxed))
    }

    /// Ends a step: checks the per-key counts (when [`Replay::expect_each_key`] was set) and
    /// clears them. The error lists the keys replayed more or fewer times than expected.
    pub fn finish(&self) -> Result<ReplaySummary, ReplayError> {
        let keys = std::mem::take(&mut *lock(&self.keys));
        let calls = self.calls.swap(0, Ordering::Relaxed);
        let mut seen_layers: Vec<u32> = keys.keys().map(|k| k.0).collect();
        seen_layers.sort_unstable();
        seen_layers.dedup();
        let summary = ReplaySummary {
            keys: keys.values().map(|v| v.len() as u64).sum(),
            calls,
            layers_never_replayed: self
                .source
                .header()
                .layer_ids()
                .into_iter()
                .filter(|l| seen_layers.binary_search(l).is_err())
                .collect(),
            counts: self.counts(),
        };
        if let Some(n) = self.expect {
            let mut bad: Vec<String> = Vec::new();
            let mut total_bad = 0usize;
            let mut all: Vec<_> = keys
                .into_iter()
                .flat_map(|((l, _), v)| v.into_iter().map(move |x| (l, x)))
                .collect();
            all.sort_by_key(|(l, _)| *l);
            for (layer, (layout, c)) in all {
                if c != n {
                    total_bad += 1;
                    if bad.len() < 8 {
                        let first = layout.segments().first().copied();
                        bad.push(format!(
                            "layer {layer}, batch of {} rows starting {:?}: {} time(s)",
                            layout.rows(),
                            first,
                            c
                        ));
                    }
                }
            }
            if total_bad > 0 {
                return Err(ReplayError::CountMismatch(format!(
                    "{total_bad} key(s) replayed a number of times other than {n}: {}{}",
                    bad.join("; "),
                    if total_bad > bad.len() { "; ..." } else { "" }
                )));
            }
        }
        Ok(summary)
    }

    /// Clears the per-key counts without checking them.
    pub fn reset(&self) {
        lock(&self.keys).clear();
        self.calls.store(0, Ordering::Relaxed);
    }

    fn count_key(&self, layer: LayerId, layout: &BatchLayout) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let has_tokens = layout
            .segments()
            .iter()
            .any(|s| matches!(s, Segment::Tokens { len, .. } if *len > 0));
        if self.expect.is_none() || !has_tokens {
            // The layer was called (for `layers_never_replayed`): an entry with no layouts marks
            // it without making a key. Without the count check keys are not tracked; a layout
            // without token rows is never a key (padding carries no route, and every such
            // layout of a layer would otherwise share one key).
            let mut keys = lock(&self.keys);
            keys.entry((layer.0, 0)).or_default();
            return;
        }
        let h = layout_hash(layout);
        let mut keys = lock(&self.keys);
        let v = keys.entry((layer.0, h)).or_default();
        match v.iter_mut().find(|(l, _)| l == layout) {
            Some((_, c)) => *c += 1,
            None => v.push((layout.clone(), 1)),
        }
    }
}

impl Replay<TraceFile> {
    /// Opens (memory-maps, verifies) a `.mrt` file and builds a strict replay policy for a
    /// model with MoE layers `model_moe_layers`.
    pub fn open(path: impl AsRef<Path>, model_moe_layers: &[u32]) -> Result<Self, ReplayError> {
        Replay::new(TraceFile::open(path)?, model_moe_layers)
    }
}

impl Replay<ShardedTrace> {
    /// Opens the shards listed by a manifest and builds a strict replay policy.
    pub fn open_manifest(path: impl AsRef<Path>, model_moe_layers: &[u32]) -> Result<Self, ReplayError> {
        Replay::new(
            crate::trace::Manifest::open(path, OpenOptions::default())?,
            model_moe_layers,
        )
    }
}

impl<S: RouteSource> ReplayPolicy for Replay<S> {
    fn plan(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Plan, ReplayError> {
        let header = self.source.header();
        let (li, layout) = check_site(header, site, shape)?;
        let strict = self.missing == MissingRoutes::Strict;
        let (forced, g) = gather(&self.source, site.layer, layout, strict)?;
        let router = forced.router_rows.len() as u64;
        self.fallbacks[li].fetch_add(g.missing, Ordering::Relaxed);
        self.uncovered[li].fetch_add(g.uncovered, Ordering::Relaxed);
        self.replayed[li].fetch_add(layout.rows() as u64 - router, Ordering::Relaxed);
        self.count_key(site.layer, layout);
        Ok(Plan::Replay(forced))
    }

    fn threshold(&self, _site: &CallSite<'_>) -> Option<ReplayThreshold> {
        self.threshold
    }

    fn slots_resolved(&self, site: &CallSite<'_>, counts: &SlotCounts) {
        if let Some(li) = self.source.header().layer_index(site.layer) {
            let c = &self.slots[li];
            c[0].fetch_add(counts.replayed_slots, Ordering::Relaxed);
            c[1].fetch_add(counts.replaced_slots, Ordering::Relaxed);
            c[2].fetch_add(counts.sentinel_slots, Ordering::Relaxed);
        }
    }
}

/// Counts kept by a [`Record`] policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordStats {
    /// Routing calls recorded.
    pub calls: u64,
    /// Token rows handed to the trace.
    pub rows: u64,
    /// In-memory target: append outcome counts (conflicts = positions recorded again with
    /// different ids; the first recording was kept).
    pub append: AppendStats,
    /// File target: writer counts (updated on each call and by [`Record::finish`]).
    pub writer: WriterStats,
}

/// What [`Record::finish`] produced.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordOutput {
    /// The recorded in-memory trace.
    Memory(Trace),
    /// The file was finished (index written).
    File(WriterStats),
}

#[derive(Debug)]
enum Target {
    Memory(Mutex<Trace>),
    File(Box<TraceWriter>),
}

#[derive(Debug)]
struct RecordInner {
    header: TraceHeader,
    target: Target,
    error: Mutex<Option<ReplayError>>,
    stats: Mutex<RecordStats>,
}

impl RecordInner {
    fn record(&self, layer: LayerId, layout: &BatchLayout, ids: ArrayView2<'_, u32>) -> Result<(), ReplayError> {
        let mut row = 0usize;
        let mut rows = 0u64;
        let mut app = AppendStats::default();
        let mut wst = None;
        for seg in layout.segments() {
            match *seg {
                Segment::Padding { len } => row += len,
                Segment::Tokens { seq, start, len } => {
                    let v = ids.slice(s![row..row + len, ..]);
                    match &self.target {
                        Target::Memory(t) => app.add(lock(t).append_keep_existing(seq, layer, start, v)?),
                        Target::File(w) => wst = Some(w.append(seq, layer, start, v)?),
                    }
                    rows += len as u64;
                    row += len;
                }
            }
        }
        let mut st = lock(&self.stats);
        st.calls += 1;
        st.rows += rows;
        st.append.add(app);
        if let Some(w) = wst {
            st.writer = w;
        }
        Ok(())
    }
}

/// Records the router's selection per layer id and batch layout; see the module docs.
///
/// Cloning shares the recording (give one clone to each layer's router or thread). On
/// [`Pass::Recompute`] nothing is recorded again: an in-memory recording replays the ids it
/// recorded in the forward pass (so recompute sees the same experts even on near ties), a file
/// recording lets the router select.
///
/// Errors inside the recording sink (which cannot return them) are kept and returned by the next
/// [`ReplayPolicy::plan`] call and by [`Record::finish`].
#[derive(Debug, Clone)]
pub struct Record {
    inner: Arc<RecordInner>,
}

impl Record {
    /// Records into an in-memory trace with this header.
    pub fn in_memory(header: TraceHeader) -> Self {
        Self::with_target(header.clone(), Target::Memory(Mutex::new(Trace::new(header))))
    }

    /// Records into an open writer (streaming to its file).
    pub fn to_writer(writer: TraceWriter) -> Self {
        Self::with_target(writer.header().clone(), Target::File(Box::new(writer)))
    }

    /// Creates `path` and records into it.
    pub fn create_file(path: impl AsRef<Path>, header: TraceHeader, opts: WriterOptions) -> Result<Self, ReplayError> {
        Ok(Self::to_writer(TraceWriter::create(path, header, opts)?))
    }

    fn with_target(header: TraceHeader, target: Target) -> Self {
        Record {
            inner: Arc::new(RecordInner {
                header,
                target,
                error: Mutex::new(None),
                stats: Mutex::new(RecordStats::default()),
            }),
        }
    }

    /// Errors with [`ReplayError::LayerMapMismatch`] unless the model's MoE layer ids equal the
    /// header's layer map.
    pub fn check_model_layers(&self, model_moe_layers: &[u32]) -> Result<(), ReplayError> {
        self.inner.header.check_layer_map(model_moe_layers)
    }

    /// The header being recorded.
    pub fn header(&self) -> &TraceHeader {
        &self.inner.header
    }

    /// Counts so far.
    pub fn stats(&self) -> RecordStats {
        *lock(&self.inner.stats)
    }

    /// A copy of the in-memory trace recorded so far (`None` for a file target).
    pub fn snapshot(&self) -> Option<Trace> {
        match &self.inner.target {
            Target::Memory(t) => Some(lock(t).clone()),
            Target::File(_) => None,
        }
    }

    fn take_error(&self) -> Result<(), ReplayError> {
        match lock(&self.inner.error).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Ends the recording: reports any error kept from a sink, and for a file target writes the
    /// last chunk and the index. Returns the trace (in memory; a copy when other clones are
    /// alive) or the writer's counts.
    pub fn finish(&self) -> Result<RecordOutput, ReplayError> {
        self.take_error()?;
        match &self.inner.target {
            Target::Memory(t) => {
                let mut t = lock(t).clone();
                t.shrink_to_fit();
                Ok(RecordOutput::Memory(t))
            }
            Target::File(w) => {
                let st = w.finish()?;
                lock(&self.inner.stats).writer = st;
                Ok(RecordOutput::File(st))
            }
        }
    }
}

impl ReplayPolicy for Record {
    fn plan(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Plan, ReplayError> {
        self.take_error()?;
        let (_, layout) = check_site(&self.inner.header, site, shape)?;
        match (&self.inner.target, site.pass) {
            (Target::Memory(t), Pass::Recompute) => {
                let t = lock(t);
                let (forced, _) = gather(&*t, site.layer, layout, false)?;
                if forced.router_rows.len() == layout.rows() {
                    Ok(Plan::Route)
                } else {
                    Ok(Plan::Replay(forced))
                }
            }
            _ => Ok(Plan::Route),
        }
    }

    fn recorder(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Option<IdsSink>, ReplayError> {
        if site.pass == Pass::Recompute {
            return Ok(None);
        }
        let (_, layout) = check_site(&self.inner.header, site, shape)?;
        let inner = self.inner.clone();
        let layer = site.layer;
        let layout = layout.clone();
        Ok(Some(Box::new(move |ids: ArrayView2<'_, u32>| {
            if let Err(e) = inner.record(layer, &layout, ids) {
                let mut g = lock(&inner.error);
                if g.is_none() {
                    *g = Some(e);
                }
            }
        })))
    }
}

/// The sequence ids a batch layout touches (helper for callers building per-sequence traces).
pub fn layout_sequences(layout: &BatchLayout) -> Vec<SeqId> {
    let mut v: Vec<SeqId> = layout
        .segments()
        .iter()
        .filter_map(|s| match *s {
            Segment::Tokens { seq, .. } => Some(seq),
            Segment::Padding { .. } => None,
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}
