//! Silent-failure diagnosis (`moe-router validate --explain`): finds, in a trace checked against
//! the model's layers and/or a second trace, the failure classes that pass every row check and
//! still corrupt replay, and names each with its evidence.
//!
//! | class | what it means | evidence |
//! |---|---|---|
//! | [`FindingClass::OrphanedLayer`] | a layer that would never be replayed: a layer of the trace the model does not route (its rows are never asked for), a MoE layer of the model (or of the second trace) without routes in the trace, a layer of the map without a recorded row | layer, kind, rows |
//! | [`FindingClass::MtpCollision`] | MTP rows that would land on a decoder layer: an MTP layer whose id is a decoder layer of the model (`< num_hidden_layers`), or a layer id that is MTP in one trace and a decoder layer in the other | layer, kinds, rows |
//! | [`FindingClass::RowShift`] | a constant row shift between the two traces (left padding, a THD/packing misalignment, an off-by-one from `tokens − 1`): the shift `d` that best aligns them (rows of the second trace at `p + d` equal those of this trace at `p`) agrees far better than `d = 0` | shift, agreement at the shift and at 0, routers compared |
//! | [`FindingClass::GarbageRows`] | runs of one constant row over many consecutive positions (all-zero or placeholder rows from prefill/decode disaggregation or padding, not routing) | sequence, positions, layers, the row |
//! | [`FindingClass::WeightVersion`] | the trace's weight version differs from the expected one or from the second trace's | both versions |
//!
//! Thresholds: a row shift is reported when the best shift (|d| ≤ [`Against::max_shift`]) agrees
//! on at least half the routers and on at least 0.25 more than `d = 0`; constant rows when a run
//! reaches [`GARBAGE_MIN_RUN`] positions (independent tokens repeat the same K-set that long
//! with negligible probability).

use crate::metrics::kind_conflicts;
use crate::trace::{MISSING_ID, Trace};
use moe_router_core::layout::{LayerId, LayerKind, SeqId};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// A run of this many consecutive positions holding one identical row is reported as garbage.
pub const GARBAGE_MIN_RUN: usize = 16;

/// The failure classes of [`explain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingClass {
    /// A layer that would never be replayed.
    OrphanedLayer,
    /// MTP rows that would land on a decoder layer.
    MtpCollision,
    /// A constant row shift against the second trace.
    RowShift,
    /// Constant (placeholder) rows over many positions.
    GarbageRows,
    /// A weight version that does not match.
    WeightVersion,
}

impl FindingClass {
    /// The snake_case name (the JSON `class`).
    pub fn name(self) -> &'static str {
        match self {
            FindingClass::OrphanedLayer => "orphaned_layer",
            FindingClass::MtpCollision => "mtp_collision",
            FindingClass::RowShift => "row_shift",
            FindingClass::GarbageRows => "garbage_rows",
            FindingClass::WeightVersion => "weight_version",
        }
    }
}

/// One finding: its class, a sentence, and the evidence as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The failure class.
    pub class: FindingClass,
    /// What was found, in words.
    pub message: String,
    /// The numbers behind it.
    pub evidence: Value,
}

/// The model's routed layers (from its `config.json`: `moe_router::import::hf::hf_moe_layers`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelLayers {
    /// `num_hidden_layers`: decoder layers are `0..num_hidden_layers` (when known).
    pub num_hidden_layers: Option<usize>,
    /// The decoder layers with a routed MLP.
    pub moe_layers: Vec<u32>,
    /// The MTP blocks with a routed MLP.
    pub mtp_layers: Vec<u32>,
}

/// What to check a trace against.
#[derive(Debug, Clone, Default)]
pub struct Against<'a> {
    /// The model's layers.
    pub model: Option<ModelLayers>,
    /// A second trace (the trainer's own routes, another capture of the same rollout).
    pub other: Option<&'a Trace>,
    /// The expected weight version.
    pub weight_version: Option<u64>,
    /// Largest |shift| tried by the row-shift search (default 8 when 0).
    pub max_shift: usize,
}

fn rows_by_layer(t: &Trace) -> BTreeMap<u32, u64> {
    t.summary().layers.iter().map(|l| (l.layer, l.rows)).collect()
}

/// Runs every check that `against` allows (see the module docs); findings in class order.
pub fn explain(trace: &Trace, against: &Against<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let h = trace.header();
    let rows = rows_by_layer(trace);
    let kind = |l: u32| h.layer_kind(LayerId(l)).unwrap_or_default();
    // Orphaned layers.
    for &l in h.layers() {
        if rows.get(&l.0).copied().unwrap_or(0) == 0 {
            out.push(Finding {
                class: FindingClass::OrphanedLayer,
                message: format!(
                    "layer {l} ({}) is in the layer map but has no recorded row: replay never has ids for it",
                    kind(l.0)
                ),
                evidence: json!({"layer": l.0, "kind": kind(l.0), "rows": 0, "side": "trace"}),
            });
        }
    }
    if let Some(m) = &against.model {
        for &l in h.layers() {
            let in_model = m.moe_layers.contains(&l.0) || m.mtp_layers.contains(&l.0);
            let decoder_id = m.num_hidden_layers.is_some_and(|n| (l.0 as usize) < n);
            if !(in_model || (kind(l.0) == LayerKind::Mtp && decoder_id)) {
                out.push(Finding {
                    class: FindingClass::OrphanedLayer,
                    message: format!(
                        "layer {l} of the trace ({}, {} rows) is not a routed layer of the model: no router asks for it, \
                         its routes are never replayed (a layer map shifted by the dense or hash layers?)",
                        kind(l.0),
                        rows.get(&l.0).copied().unwrap_or(0)
                    ),
                    evidence: json!({"layer": l.0, "kind": kind(l.0), "rows": rows.get(&l.0).copied().unwrap_or(0), "side": "trace"}),
                });
            }
        }
        for &l in &m.moe_layers {
            if h.layer_index(LayerId(l)).is_none() {
                out.push(Finding {
                    class: FindingClass::OrphanedLayer,
                    message: format!(
                        "MoE layer {l} of the model has no routes in the trace: it is never replayed (strict replay fails, \
                         fallback routes it live)"
                    ),
                    evidence: json!({"layer": l, "kind": "decoder", "rows": 0, "side": "model"}),
                });
            }
        }
    }
    if let Some(o) = against.other {
        let orows = rows_by_layer(o);
        for &l in o.header().layers() {
            let r = orows.get(&l.0).copied().unwrap_or(0);
            if r > 0 && h.layer_index(l).is_none() {
                out.push(Finding {
                    class: FindingClass::OrphanedLayer,
                    message: format!("layer {l} has {r} rows in the second trace and none in this one: never replayed"),
                    evidence: json!({"layer": l.0, "rows": r, "side": "other"}),
                });
            }
        }
    }
    // MTP / decoder collisions.
    if let Some(m) = &against.model {
        for l in h.layers_of_kind(LayerKind::Mtp) {
            let decoder = m.num_hidden_layers.is_some_and(|n| (l as usize) < n) || m.moe_layers.contains(&l);
            if decoder {
                out.push(Finding {
                    class: FindingClass::MtpCollision,
                    message: format!(
                        "MTP layer {l} of the trace ({} rows) has the id of decoder layer {l} of the model \
                         (num_hidden_layers = {}): its rows would be replayed into the decoder layer (MTP numbered from \
                         the decoder's ids, as Megatron numbers it from 1)",
                        rows.get(&l).copied().unwrap_or(0),
                        m.num_hidden_layers.map_or("unknown".into(), |n| n.to_string())
                    ),
                    evidence: json!({"layer": l, "kind_trace": "mtp", "kind_model": "decoder",
                        "rows": rows.get(&l).copied().unwrap_or(0), "num_hidden_layers": m.num_hidden_layers,
                        "model_mtp_layers": m.mtp_layers}),
                });
            }
        }
    }
    if let Some(o) = against.other {
        for c in kind_conflicts(trace, o) {
            out.push(Finding {
                class: FindingClass::MtpCollision,
                message: format!(
                    "layer {} is a {} layer here ({} rows) and a {} layer in the second trace ({} rows): the MTP rows \
                     would land on a decoder layer",
                    c.layer, c.kind_a, c.rows_a, c.kind_b, c.rows_b
                ),
                evidence: serde_json::to_value(c).unwrap_or(Value::Null),
            });
        }
    }
    // Row shift.
    if let Some(o) = against.other
        && let Some(f) = row_shift(trace, o, if against.max_shift == 0 { 8 } else { against.max_shift })
    {
        out.push(f);
    }
    // Garbage rows.
    out.extend(garbage_rows(trace));
    // Weight version.
    if let Some(w) = against.weight_version
        && h.weight_version() != Some(w)
    {
        out.push(Finding {
            class: FindingClass::WeightVersion,
            message: match h.weight_version() {
                Some(v) => {
                    format!("the trace was recorded with weight version {v}, the trainer expects {w}: stale routes")
                }
                None => format!("the trace records no weight version, the trainer expects {w}"),
            },
            evidence: json!({"trace": h.weight_version(), "expected": w}),
        });
    }
    if let Some(o) = against.other
        && let (Some(a), Some(b)) = (h.weight_version(), o.header().weight_version())
        && a != b
    {
        out.push(Finding {
            class: FindingClass::WeightVersion,
            message: format!("weight version {a} here, {b} in the second trace: routes of different policies"),
            evidence: json!({"trace": a, "other": b}),
        });
    }
    out.sort_by_key(|f| f.class);
    out
}

/// Dense rows of `seq` at `layer`, positions `0..len`.
fn dense(t: &Trace, seq: SeqId, layer: LayerId, len: usize) -> Option<Array2<u32>> {
    let mut a = Array2::from_elem((len, t.header().top_k()), MISSING_ID);
    t.read_rows(seq, layer, 0, a.view_mut()).ok()?;
    Some(a)
}

fn same_set(a: &[u32], b: &[u32]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

/// The shift that best aligns `b` with `a` (see the module docs), when it is clearly better than 0.
pub fn row_shift(a: &Trace, b: &Trace, max_shift: usize) -> Option<Finding> {
    if a.header().top_k() != b.header().top_k() {
        return None;
    }
    let conflicts = kind_conflicts(a, b);
    let layers: Vec<LayerId> = a
        .header()
        .layers()
        .iter()
        .copied()
        .filter(|l| b.header().layer_index(*l).is_some() && !conflicts.iter().any(|c| c.layer == l.0))
        .collect();
    let m = max_shift as i64;
    let mut agree = vec![0u64; (2 * m + 1) as usize];
    let mut total = vec![0u64; (2 * m + 1) as usize];
    for seq in a.sequences() {
        let len = a.sequence_end(seq).max(b.sequence_end(seq)) as usize;
        if len == 0 {
            continue;
        }
        for &l in &layers {
            let (Some(ra), Some(rb)) = (dense(a, seq, l, len), dense(b, seq, l, len)) else {
                continue;
            };
            for d in -m..=m {
                let di = (d + m) as usize;
                for p in 0..len as i64 {
                    let q = p + d;
                    if q < 0 || q >= len as i64 {
                        continue;
                    }
                    let x = ra.row(p as usize);
                    let y = rb.row(q as usize);
                    if x.iter().all(|&v| v == MISSING_ID) || y.iter().all(|&v| v == MISSING_ID) {
                        continue;
                    }
                    total[di] += 1;
                    if same_set(x.as_slice().unwrap_or(&[]), y.as_slice().unwrap_or(&[])) {
                        agree[di] += 1;
                    }
                }
            }
        }
    }
    let frac = |i: usize| {
        if total[i] == 0 {
            0.0
        } else {
            agree[i] as f64 / total[i] as f64
        }
    };
    // Best shift: highest agreement, ties to the smaller |d| (then the negative one).
    let mut best = m as usize;
    for i in 0..agree.len() {
        let (d, bd) = (i as i64 - m, best as i64 - m);
        if frac(i) > frac(best) || (frac(i) == frac(best) && d.abs() < bd.abs()) {
            best = i;
        }
    }
    let d = best as i64 - m;
    let (at, at0) = (frac(best), frac(m as usize));
    if d == 0 || at < 0.5 || at < at0 + 0.25 {
        return None;
    }
    Some(Finding {
        class: FindingClass::RowShift,
        message: format!(
            "the rows are shifted by {d}: row p here equals row p{d:+} of the second trace on {:.1}% of {} routers, \
             against {:.1}% unshifted (left padding, a THD/packing offset or an off-by-one of the tokens − 1 rows)",
            100.0 * at,
            total[best],
            100.0 * at0
        ),
        evidence: json!({"shift": d, "agreement_at_shift": at, "agreement_at_zero": at0,
            "routers_at_shift": total[best], "routers_at_zero": total[m as usize]}),
    })
}

/// One sequence's constant-row runs: positions `start..end`, the layers, the first run's row and
/// the longest run.
struct GarbageSpan {
    start: u64,
    end: u64,
    layers: Vec<u32>,
    row: Vec<u32>,
    longest: usize,
}

/// Runs of one constant present row over at least [`GARBAGE_MIN_RUN`] positions, one finding
/// per sequence (the union of the runs' positions, the layers they occur in, the first run's row).
pub fn garbage_rows(t: &Trace) -> Vec<Finding> {
    let k = t.header().top_k();
    let nlayers = t.header().layers().len();
    let codec = *t.codec();
    let mut per_seq: BTreeMap<u64, GarbageSpan> = BTreeMap::new();
    let mut prev = vec![0u32; k];
    let mut cur = vec![0u32; k];
    for lane in t.lanes() {
        let mut run_start = 0u64;
        let mut run_len = 0usize;
        let mut next_pos = u64::MAX;
        let mut flush = |start: u64, len: usize, row: &[u32]| {
            if len >= GARBAGE_MIN_RUN {
                let e = per_seq.entry(lane.seq.0).or_insert_with(|| GarbageSpan {
                    start: u64::MAX,
                    end: 0,
                    layers: Vec::new(),
                    row: row.to_vec(),
                    longest: 0,
                });
                e.start = e.start.min(start);
                e.end = e.end.max(start + len as u64);
                if !e.layers.contains(&lane.layer.0) {
                    e.layers.push(lane.layer.0);
                }
                e.longest = e.longest.max(len);
            }
        };
        for r in &lane.runs {
            for (i, b) in r.bytes.chunks_exact(codec.row_bytes()).enumerate() {
                let pos = r.start + i as u64;
                if codec.is_missing(b) {
                    flush(run_start, run_len, &prev);
                    run_len = 0;
                    next_pos = u64::MAX;
                    continue;
                }
                codec.decode_into(b, &mut cur);
                if run_len > 0 && pos == next_pos && cur == prev {
                    run_len += 1;
                } else {
                    flush(run_start, run_len, &prev);
                    run_start = pos;
                    run_len = 1;
                    prev.copy_from_slice(&cur);
                }
                next_pos = pos + 1;
            }
        }
        flush(run_start, run_len, &prev);
    }
    per_seq
        .into_iter()
        .map(|(seq, span)| {
            let GarbageSpan {
                start: a,
                end: b,
                mut layers,
                row,
                longest,
            } = span;
            layers.sort_unstable();
            Finding {
                class: FindingClass::GarbageRows,
                message: format!(
                    "sequence {seq}, positions {a}..{b}: the same row {row:?} repeats over up to {longest} consecutive \
                     positions in {} of {nlayers} layer(s) — placeholder rows (all-zero or constant prompt rows from \
                     prefill/decode disaggregation, padding), not routes",
                    layers.len()
                ),
                evidence: json!({"seq": seq, "start": a, "end": b, "layers": layers, "row": row, "longest_run": longest}),
            }
        })
        .collect()
}
