//! Trace metrics: comparing two routings (R3's "how often do training and inference pick
//! different experts"), load statistics per layer, and policy counts.
//!
//! A *router* is one (token, layer) pair; it **mismatches** when the two id *sets* differ (slot
//! order is ignored). Its **overlap** is `|A ∩ B| / K`. Only routers recorded in both inputs are
//! compared; rows present in only one input are counted separately, and so are layers of one
//! input's layer map that the other does not have ([`Comparison::layers_only_in_a`]): a layer-map
//! mismatch shows instead of silently shrinking the comparison.

use crate::trace::{MISSING_ID, RouteSource, Trace, TraceError};
use moe_router_core::layout::{BatchLayout, LayerId, LayerKind, RowAddr, SeqId};
use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

#[path = "explain.rs"]
pub mod explain;

/// Mismatch figures of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMismatch {
    /// Model layer id.
    pub layer: u32,
    /// Fraction of this layer's compared routers whose id sets differ.
    pub mismatch_fraction: f64,
    /// Mean `|A ∩ B| / K` over this layer's compared routers.
    pub mean_overlap: f64,
}

/// Recorded rows of one layer that the other input does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRows {
    /// Model layer id.
    pub layer: u32,
    /// Recorded (present) rows of this layer, over every sequence.
    pub rows: u64,
}

/// The result of comparing two routings. JSON keys as in the CLI contract (`moe-router diff`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Fraction of compared (token, layer) routers whose id sets differ.
    pub router_mismatch_fraction: f64,
    /// Fraction of compared tokens with at least one differing layer.
    pub token_any_layer_mismatch_fraction: f64,
    /// Mean number of differing layers per compared token.
    pub mean_mismatched_layers_per_token: f64,
    /// Per layer (layers with at least one compared router), ascending.
    pub per_layer: Vec<LayerMismatch>,
    /// Mean `|A ∩ B| / K` over all compared routers.
    pub mean_overlap: f64,
    /// Routers compared.
    pub routers_compared: u64,
    /// Tokens (sequence, position) with at least one compared router.
    pub tokens_compared: u64,
    /// Routers recorded only in the first input.
    pub rows_only_in_a: u64,
    /// Routers recorded only in the second input.
    pub rows_only_in_b: u64,
    /// Layers of the first input's layer map absent from the second's, with their recorded rows
    /// (not compared, not in `rows_only_in_a`). Empty for live comparisons.
    #[serde(default)]
    pub layers_only_in_a: Vec<LayerRows>,
    /// Layers of the second input's layer map absent from the first's, with their recorded rows.
    #[serde(default)]
    pub layers_only_in_b: Vec<LayerRows>,
    /// Layer ids that are an MTP (or hash) layer in one input and another kind in the other:
    /// the MTP rows would land on a decoder layer. Not compared.
    #[serde(default)]
    pub mtp_collisions: Vec<KindConflict>,
}

/// A layer id whose kind differs between two traces ([`Comparison::mtp_collisions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindConflict {
    /// Model layer id.
    pub layer: u32,
    /// Its kind in the first input.
    pub kind_a: LayerKind,
    /// Its kind in the second input.
    pub kind_b: LayerKind,
    /// Recorded rows of the layer in the first input.
    pub rows_a: u64,
    /// Recorded rows of the layer in the second input.
    pub rows_b: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct LayerAcc {
    routers: u64,
    mismatches: u64,
    overlap: f64,
}

/// Accumulates a [`Comparison`] from pairs of rows (two traces, or a trace and live routing
/// batch by batch).
#[derive(Debug, Clone)]
pub struct Comparator {
    k: usize,
    layers: BTreeMap<u32, LayerAcc>,
    tokens: u64,
    tokens_mismatched: u64,
    mismatched_layer_sum: u64,
    only_a: u64,
    only_b: u64,
    /// Live comparisons: per (seq, position) (compared, mismatched) not yet folded.
    pending: HashMap<(u64, u64), (u32, u32)>,
}

/// `|a ∩ b|` of two rows (small K: quadratic; ids are distinct within a row).
fn overlap(a: &[u32], b: &[u32]) -> usize {
    a.iter().filter(|x| b.contains(x)).count()
}

impl Comparator {
    /// A comparator for rows of K ids.
    pub fn new(top_k: usize) -> Self {
        Comparator {
            k: top_k.max(1),
            layers: BTreeMap::new(),
            tokens: 0,
            tokens_mismatched: 0,
            mismatched_layer_sum: 0,
            only_a: 0,
            only_b: 0,
            pending: HashMap::new(),
        }
    }

    /// Compares one router (either side may be a missing row: all [`MISSING_ID`]). Returns
    /// `Some(mismatch)` when both sides are present.
    pub fn add_router(&mut self, layer: u32, a: &[u32], b: &[u32]) -> Option<bool> {
        let am = a.first().is_none_or(|&x| x == MISSING_ID);
        let bm = b.first().is_none_or(|&x| x == MISSING_ID);
        match (am, bm) {
            (true, true) => None,
            (false, true) => {
                self.only_a += 1;
                None
            }
            (true, false) => {
                self.only_b += 1;
                None
            }
            (false, false) => {
                let o = overlap(a, b);
                let mism = o != a.len() || a.len() != b.len();
                let acc = self.layers.entry(layer).or_default();
                acc.routers += 1;
                acc.mismatches += u64::from(mism);
                acc.overlap += o as f64 / self.k as f64;
                Some(mism)
            }
        }
    }

    /// Records one token's totals: layers compared and layers that differed.
    pub fn add_token(&mut self, compared_layers: u32, mismatched_layers: u32) {
        if compared_layers == 0 {
            return;
        }
        self.tokens += 1;
        self.tokens_mismatched += u64::from(mismatched_layers > 0);
        self.mismatched_layer_sum += u64::from(mismatched_layers);
    }

    /// Compares a live batch (`ids` `[T, K]` routed at `layer` for `layout`) against `source`;
    /// token totals are kept until [`Comparator::finish`], so batches of all layers may come in
    /// any order.
    pub fn add_batch<S: RouteSource + ?Sized>(
        &mut self,
        source: &S,
        layer: LayerId,
        layout: &BatchLayout,
        ids: ArrayView2<'_, u32>,
    ) -> Result<(), TraceError> {
        let k = source.header().top_k();
        if ids.ncols() != k || ids.nrows() != layout.rows() {
            return Err(TraceError::Shape {
                top_k: k,
                got: ids.ncols(),
            });
        }
        let mut rec = Array2::from_elem((1, k), MISSING_ID);
        let mut live = vec![0u32; k];
        for (r, addr) in layout.iter_rows().enumerate() {
            let RowAddr::Token(seq, pos) = addr else { continue };
            source.read_rows(seq, layer, pos, rec.view_mut())?;
            live.iter_mut().zip(ids.row(r)).for_each(|(d, &s)| *d = s);
            let recorded: Vec<u32> = rec.row(0).to_vec();
            if let Some(m) = self.add_router(layer.0, &recorded, &live) {
                let e = self.pending.entry((seq.0, pos)).or_default();
                e.0 += 1;
                e.1 += u32::from(m);
            }
        }
        Ok(())
    }

    /// The comparison so far.
    pub fn finish(mut self) -> Comparison {
        for (_, (c, m)) in std::mem::take(&mut self.pending) {
            self.add_token(c, m);
        }
        let mut routers = 0u64;
        let mut mism = 0u64;
        let mut ov = 0.0f64;
        let per_layer = self
            .layers
            .iter()
            .map(|(&layer, a)| {
                routers += a.routers;
                mism += a.mismatches;
                ov += a.overlap;
                LayerMismatch {
                    layer,
                    mismatch_fraction: ratio(a.mismatches as f64, a.routers),
                    mean_overlap: ratio(a.overlap, a.routers),
                }
            })
            .collect();
        Comparison {
            router_mismatch_fraction: ratio(mism as f64, routers),
            token_any_layer_mismatch_fraction: ratio(self.tokens_mismatched as f64, self.tokens),
            mean_mismatched_layers_per_token: ratio(self.mismatched_layer_sum as f64, self.tokens),
            per_layer,
            mean_overlap: ratio(ov, routers),
            routers_compared: routers,
            tokens_compared: self.tokens,
            rows_only_in_a: self.only_a,
            rows_only_in_b: self.only_b,
            layers_only_in_a: Vec::new(),
            layers_only_in_b: Vec::new(),
            mtp_collisions: Vec::new(),
        }
    }
}

fn ratio(a: f64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { a / n as f64 }
}

/// Recorded rows per layer of `t` for the layers of its map that `other` does not have.
fn layers_only_in(t: &Trace, other: &Trace) -> Vec<LayerRows> {
    let rows: BTreeMap<u32, u64> = t.summary().layers.iter().map(|l| (l.layer, l.rows)).collect();
    t.header()
        .layers()
        .iter()
        .filter(|l| other.header().layer_index(**l).is_none())
        .map(|l| LayerRows {
            layer: l.0,
            rows: rows.get(&l.0).copied().unwrap_or(0),
        })
        .collect()
}

/// Compares two traces over the layers they share (by layer id). K must agree. Every sequence
/// of either trace is visited; positions recorded in only one trace count as `rows_only_in_*`,
/// layers of only one layer map as `layers_only_in_*` (with their rows).
pub fn compare(a: &Trace, b: &Trace) -> Result<Comparison, TraceError> {
    let k = a.header().top_k();
    if b.header().top_k() != k {
        return Err(TraceError::HeaderMismatch(format!(
            "cannot compare traces with K = {k} and K = {}",
            b.header().top_k()
        )));
    }
    let conflicts = kind_conflicts(a, b);
    let layers: Vec<LayerId> = a
        .header()
        .layers()
        .iter()
        .copied()
        .filter(|l| b.header().layer_index(*l).is_some() && !conflicts.iter().any(|c| c.layer == l.0))
        .collect();
    if layers.is_empty() && conflicts.is_empty() {
        return Err(TraceError::HeaderMismatch(format!(
            "the traces share no layer ({:?} vs {:?})",
            a.header().layer_ids(),
            b.header().layer_ids()
        )));
    }
    let mut seqs: Vec<SeqId> = a.sequences();
    seqs.extend(b.sequences());
    seqs.sort_unstable();
    seqs.dedup();
    let mut cmp = Comparator::new(k);
    for seq in seqs {
        let t = a.sequence_end(seq).max(b.sequence_end(seq)) as usize;
        let mut per_token: Vec<(u32, u32)> = vec![(0, 0); t];
        let mut ra = Array2::from_elem((t, k), MISSING_ID);
        let mut rb = Array2::from_elem((t, k), MISSING_ID);
        for &layer in &layers {
            a.read_rows(seq, layer, 0, ra.view_mut())?;
            b.read_rows(seq, layer, 0, rb.view_mut())?;
            for (p, (x, y)) in ra.outer_iter().zip(rb.outer_iter()).enumerate() {
                let (xs, ys) = (x.as_slice().unwrap_or(&[]), y.as_slice().unwrap_or(&[]));
                if let Some(m) = cmp.add_router(layer.0, xs, ys) {
                    per_token[p].0 += 1;
                    per_token[p].1 += u32::from(m);
                }
            }
        }
        for (c, m) in per_token {
            cmp.add_token(c, m);
        }
    }
    let mut c = cmp.finish();
    c.layers_only_in_a = layers_only_in(a, b);
    c.layers_only_in_b = layers_only_in(b, a);
    c.mtp_collisions = conflicts;
    Ok(c)
}

/// Layer ids of both traces whose kinds differ (an MTP layer of one is a decoder layer of the
/// other), with their recorded rows.
pub fn kind_conflicts(a: &Trace, b: &Trace) -> Vec<KindConflict> {
    let rows = |t: &Trace| -> BTreeMap<u32, u64> { t.summary().layers.iter().map(|l| (l.layer, l.rows)).collect() };
    let (ra, rb) = (rows(a), rows(b));
    a.header()
        .layers()
        .iter()
        .filter_map(|&l| {
            let ka = a.header().layer_kind(l)?;
            let kb = b.header().layer_kind(l)?;
            (ka != kb).then(|| KindConflict {
                layer: l.0,
                kind_a: ka,
                kind_b: kb,
                rows_a: ra.get(&l.0).copied().unwrap_or(0),
                rows_b: rb.get(&l.0).copied().unwrap_or(0),
            })
        })
        .collect()
}

/// Load of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerLoad {
    /// Model layer id.
    pub layer: u32,
    /// Recorded rows (tokens) in this layer.
    pub tokens: u64,
    /// Tokens routed to each expert (each token counts once per slot).
    pub tokens_per_expert: Vec<u64>,
    /// Largest entry of `tokens_per_expert`.
    pub max: u64,
    /// Mean of `tokens_per_expert`.
    pub mean: f64,
    /// `max / mean` (1 = perfectly balanced; 0 when empty).
    pub max_over_mean: f64,
}

/// Tokens per expert and imbalance for every layer of the layer map.
pub fn load_stats(trace: &Trace) -> Vec<LayerLoad> {
    let h = trace.header();
    let e = h.num_experts();
    let k = h.top_k();
    let mut counts: BTreeMap<LayerId, (u64, Vec<u64>)> = h.layers().iter().map(|&l| (l, (0, vec![0u64; e]))).collect();
    let codec = *trace.codec();
    let mut row = vec![0u32; k];
    for lane in trace.lanes() {
        let Some(c) = counts.get_mut(&lane.layer) else { continue };
        for r in lane.runs {
            for b in r.bytes.chunks_exact(codec.row_bytes()) {
                if codec.is_missing(b) {
                    continue;
                }
                codec.decode_into(b, &mut row);
                c.0 += 1;
                for &id in &row {
                    if let Some(x) = c.1.get_mut(id as usize) {
                        *x += 1;
                    }
                }
            }
        }
    }
    counts
        .into_iter()
        .map(|(l, (tokens, tpe))| {
            let max = tpe.iter().copied().max().unwrap_or(0);
            let mean = if e == 0 {
                0.0
            } else {
                tpe.iter().sum::<u64>() as f64 / e as f64
            };
            LayerLoad {
                layer: l.0,
                tokens,
                tokens_per_expert: tpe,
                max,
                mean,
                max_over_mean: if mean > 0.0 { max as f64 / mean } else { 0.0 },
            }
        })
        .collect()
}

/// Replay counts of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPolicyCounts {
    /// Model layer id.
    pub layer: u32,
    /// Token rows whose route was missing and that the router selected itself.
    pub fallbacks: u64,
    /// Token rows whose recorded ids were replayed.
    pub replayed_rows: u64,
    /// Token rows before their sequence's route start (a cached prefix), left to the router.
    #[serde(default)]
    pub uncovered_rows: u64,
    /// Replayed (non-sentinel) slots the decorator resolved.
    #[serde(default)]
    pub replayed_slots: u64,
    /// Of those, slots a threshold replaced with the trainer's own choice.
    #[serde(default)]
    pub replaced_slots: u64,
    /// Slot sentinels ("take the router's choice") filled by the router.
    #[serde(default)]
    pub sentinel_slots: u64,
}

impl LayerPolicyCounts {
    /// Replaced slots / replayed slots (0 when no slot was replayed).
    pub fn replace_rate(&self) -> f64 {
        ratio(self.replaced_slots as f64, self.replayed_slots)
    }
}

/// Fallback and replay counts of a policy ([`crate::policy::Replay::counts`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCounts {
    /// Per MoE layer.
    pub per_layer: Vec<LayerPolicyCounts>,
    /// Sum of fallbacks.
    pub total_fallbacks: u64,
    /// Sum of replayed rows.
    pub total_replayed_rows: u64,
}

impl PolicyCounts {
    /// Totals from per-layer counts.
    pub fn from_layers(per_layer: Vec<LayerPolicyCounts>) -> Self {
        PolicyCounts {
            total_fallbacks: per_layer.iter().map(|l| l.fallbacks).sum(),
            total_replayed_rows: per_layer.iter().map(|l| l.replayed_rows).sum(),
            per_layer,
        }
    }
    /// Replaced slots / replayed slots over every layer (threshold replay), 0 when none.
    pub fn replace_rate(&self) -> f64 {
        let (rep, all) = self
            .per_layer
            .iter()
            .fold((0u64, 0u64), |(a, b), l| (a + l.replaced_slots, b + l.replayed_slots));
        ratio(rep as f64, all)
    }
    /// Sentinel slots over every layer.
    pub fn sentinel_slots(&self) -> u64 {
        self.per_layer.iter().map(|l| l.sentinel_slots).sum()
    }
    /// Fallbacks / (fallbacks + replayed rows), 0 when nothing was asked.
    pub fn fallback_fraction(&self) -> f64 {
        ratio(
            self.total_fallbacks as f64,
            self.total_fallbacks + self.total_replayed_rows,
        )
    }
}
