//! The in-memory trace: per (sequence, layer) a sorted list of runs, each a start position and
//! contiguous stored rows (≈ 1 byte per id for E ≤ 256).

use super::codec::RowCodec;
use super::{ALL_ZERO_MIN_ROWS, MISSING_ID, RouteSource, TraceError, TraceHeader};
use moe_router_core::layout::{LayerId, SeqId};
use ndarray::{Array2, Array3, ArrayView2, ArrayViewMut2, s};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A run of consecutive positions with stored rows (missing rows are stored as the sentinel).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    start: u64,
    data: Vec<u8>,
}

/// Outcome counts of an append.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendStats {
    /// Rows at positions that held nothing before (present or missing rows).
    pub appended: u64,
    /// Rows whose position already held the same ids (or a missing row over a recorded one):
    /// no-ops.
    pub identical: u64,
    /// Recorded rows that filled a position previously stored as missing.
    pub filled: u64,
    /// Rows that differed from an already recorded row and were dropped (only with
    /// [`Trace::append_keep_existing`]; [`Trace::append`] errors instead).
    pub conflicts: u64,
}

impl AppendStats {
    /// Adds another append's counts.
    pub fn add(&mut self, o: AppendStats) {
        self.appended += o.appended;
        self.identical += o.identical;
        self.filled += o.filled;
        self.conflicts += o.conflicts;
    }
}

/// A borrowed run of stored rows of one (sequence, layer).
#[derive(Debug, Clone, Copy)]
pub struct RunRef<'a> {
    /// First position.
    pub start: u64,
    /// Stored rows, `rows × K × width` bytes (see [`RowCodec`]).
    pub bytes: &'a [u8],
    /// Number of rows.
    pub rows: usize,
}

/// The runs of one (sequence, layer), in position order.
#[derive(Debug, Clone)]
pub struct LaneRef<'a> {
    /// Sequence id.
    pub seq: SeqId,
    /// Model layer id.
    pub layer: LayerId,
    /// Runs, ascending and non-adjacent.
    pub runs: Vec<RunRef<'a>>,
}

/// Per-layer figures of a [`TraceSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSummary {
    /// Model layer id.
    pub layer: u32,
    /// Recorded (present) rows.
    pub rows: u64,
    /// Stored rows marked missing.
    pub missing_rows: u64,
}

/// Counts describing a trace (for `inspect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    /// Distinct sequences.
    pub sequences: u64,
    /// Distinct (sequence, position) with a recorded row in at least one layer.
    pub tokens: u64,
    /// Recorded (present) rows over all layers.
    pub rows: u64,
    /// Stored missing rows over all layers.
    pub missing_rows: u64,
    /// Recorded ids (rows × K).
    pub ids: u64,
    /// Per MoE layer of the layer map.
    pub layers: Vec<LayerSummary>,
}

/// A problem found by [`Trace::validation_issues`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ValidationIssue {
    /// Every recorded row of the layer routes to expert 0.
    AllZeroLayer {
        /// Layer id.
        layer: u32,
        /// Rows in the layer.
        rows: u64,
    },
    /// A MoE layer of the layer map has no recorded row at all.
    EmptyLayer {
        /// Layer id.
        layer: u32,
    },
    /// A sequence has recorded rows in some layers but not others at a position.
    UnevenCoverage {
        /// Sequence id.
        seq: u64,
        /// Layers with fewest recorded rows for this sequence.
        layer: u32,
        /// Its recorded rows.
        rows: u64,
        /// The most recorded rows of any layer for this sequence.
        max_rows: u64,
    },
}

/// Routes of many sequences and layers in memory, keyed by (sequence id, layer id, position).
///
/// Build with [`Trace::new`] and [`Trace::append`]; read with [`Trace::read_rows`],
/// [`Trace::lanes`], [`Trace::to_dense`]; write a file with [`Trace::write_file`]. The layout
/// keeps ≈ 1 byte per id for E ≤ 256 (call [`Trace::shrink_to_fit`] after building to drop
/// vector slack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    header: TraceHeader,
    codec: RowCodec,
    lanes: BTreeMap<(SeqId, LayerId), Vec<Run>>,
}

impl Trace {
    /// An empty trace.
    pub fn new(header: TraceHeader) -> Self {
        Trace {
            codec: RowCodec::new(&header),
            header,
            lanes: BTreeMap::new(),
        }
    }

    /// The header.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Replaces the producer, weight version, row convention or layer kinds (E, K, width, layers
    /// and the slot-sentinel flag must not change).
    pub fn set_header(&mut self, header: TraceHeader) -> Result<(), TraceError> {
        let mut a = header.clone();
        a = a
            .with_row_convention(self.header.row_convention())
            .with_weight_version(self.header.weight_version())
            .with_fingerprint(self.header.fingerprint())
            .with_producer(self.header.producer());
        a.layer_kinds = self.header.layer_kinds.clone();
        if a != self.header {
            return Err(TraceError::HeaderMismatch(
                "set_header may change only producer, weight version, fingerprint, row convention and layer kinds"
                    .into(),
            ));
        }
        self.header = header;
        Ok(())
    }

    /// The row codec (id width, K).
    pub fn codec(&self) -> &RowCodec {
        &self.codec
    }

    fn check_layer(&self, layer: LayerId) -> Result<(), TraceError> {
        if self.header.layer_index(layer).is_none() {
            return Err(TraceError::UnknownLayer {
                layer: layer.0,
                known: self.header.layer_ids(),
            });
        }
        Ok(())
    }

    /// Appends `[rows, K]` ids for positions `start..` of `seq` at `layer`. Rows of
    /// [`MISSING_ID`] are missing. Every row is validated (ids `< E`, distinct). A position that
    /// is already recorded must get the same ids again (a no-op); different ids are
    /// [`TraceError::Conflict`] and nothing is changed. See the module docs for the full rule.
    pub fn append(
        &mut self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        ids: ArrayView2<'_, u32>,
    ) -> Result<AppendStats, TraceError> {
        self.append_ids(seq, layer, start, ids, true)
    }

    /// Like [`Trace::append`], but a recorded position appended with different ids keeps the
    /// old row and counts a conflict instead of failing (recording policies use this: the first
    /// recorded route wins).
    pub fn append_keep_existing(
        &mut self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        ids: ArrayView2<'_, u32>,
    ) -> Result<AppendStats, TraceError> {
        self.append_ids(seq, layer, start, ids, false)
    }

    /// [`Trace::append`] / [`Trace::append_keep_existing`]. Rows that start a lane or go right
    /// after its last run (the recording case) are encoded straight into their final storage;
    /// others are encoded into a buffer and merged by [`Trace::insert`]. Errors leave the trace
    /// unchanged.
    fn append_ids(
        &mut self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        ids: ArrayView2<'_, u32>,
        strict: bool,
    ) -> Result<AppendStats, TraceError> {
        self.check_layer(layer)?;
        let rows = ids.nrows() as u64;
        let rb = self.codec.row_bytes();
        if rows > 0 && start.checked_add(rows).is_some() {
            let codec = self.codec;
            let appended = AppendStats {
                appended: rows,
                ..AppendStats::default()
            };
            match self.lanes.get_mut(&(seq, layer)) {
                None => {
                    let mut data = Vec::with_capacity(ids.nrows() * rb);
                    codec.encode_rows(ids, &mut data, seq, layer, start)?;
                    self.lanes.insert((seq, layer), vec![Run { start, data }]);
                    return Ok(appended);
                }
                Some(runs) => match runs.last_mut() {
                    Some(last) if last.start + (last.data.len() / rb) as u64 == start => {
                        codec.encode_rows(ids, &mut last.data, seq, layer, start)?;
                        return Ok(appended);
                    }
                    Some(last) if start > last.start + (last.data.len() / rb) as u64 => {
                        let mut data = Vec::with_capacity(ids.nrows() * rb);
                        codec.encode_rows(ids, &mut data, seq, layer, start)?;
                        runs.push(Run { start, data });
                        return Ok(appended);
                    }
                    _ => {}
                },
            }
        }
        let mut buf = Vec::new();
        self.codec.encode_rows(ids, &mut buf, seq, layer, start)?;
        self.insert(seq, layer, start, &buf, strict)
    }

    /// Appends already-stored rows (`rows × K × width` bytes, as in the file), validating each.
    /// Same overlap rule as [`Trace::append`] (`strict`) or [`Trace::append_keep_existing`].
    pub fn append_stored(
        &mut self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        bytes: &[u8],
        strict: bool,
    ) -> Result<AppendStats, TraceError> {
        self.check_layer(layer)?;
        let rb = self.codec.row_bytes();
        if !bytes.len().is_multiple_of(rb) {
            return Err(TraceError::StoredLength {
                bytes: bytes.len(),
                row_bytes: rb,
            });
        }
        self.codec
            .check_stored_rows(bytes)
            .map_err(|(r, f)| f.locate(seq, layer, start + r as u64, self.header.num_experts()))?;
        self.insert(seq, layer, start, bytes, strict)
    }

    /// Inserts validated stored rows.
    pub(crate) fn insert(
        &mut self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        data: &[u8],
        strict: bool,
    ) -> Result<AppendStats, TraceError> {
        let rb = self.codec.row_bytes();
        let rows = (data.len() / rb) as u64;
        let mut st = AppendStats::default();
        if rows == 0 {
            return Ok(st);
        }
        let end = start.checked_add(rows).ok_or(TraceError::PositionOverflow {
            seq: seq.0,
            layer: layer.0,
            start,
        })?;
        let codec = self.codec;
        let runs = self.lanes.entry((seq, layer)).or_default();
        let run_end = |r: &Run| r.start + (r.data.len() / rb) as u64;
        // Fast paths: new lane, or strictly after the last run (extend when adjacent).
        match runs.last_mut() {
            None => {
                runs.push(Run {
                    start,
                    data: data.to_vec(),
                });
                st.appended = rows;
                return Ok(st);
            }
            Some(last) if run_end(last) <= start => {
                if run_end(last) == start {
                    last.data.extend_from_slice(data);
                } else {
                    runs.push(Run {
                        start,
                        data: data.to_vec(),
                    });
                }
                st.appended = rows;
                return Ok(st);
            }
            _ => {}
        }
        // General case: runs touching [start, end] are merged with the new rows.
        let i0 = runs.partition_point(|r| run_end(r) < start);
        let i1 = runs.partition_point(|r| r.start <= end); // exclusive
        // Check pass (no mutation): classify overlapping rows.
        let mut overlapped = 0u64;
        for r in &runs[i0..i1] {
            let lo = start.max(r.start);
            let hi = end.min(run_end(r));
            for p in lo..hi {
                overlapped += 1;
                let old = &r.data[((p - r.start) as usize) * rb..][..rb];
                let new = &data[((p - start) as usize) * rb..][..rb];
                let old_missing = codec.is_missing(old);
                let new_missing = codec.is_missing(new);
                if old == new || new_missing {
                    st.identical += 1;
                } else if old_missing {
                    st.filled += 1;
                } else if strict {
                    return Err(TraceError::Conflict {
                        seq: seq.0,
                        layer: layer.0,
                        position: p,
                    });
                } else {
                    st.conflicts += 1;
                }
            }
        }
        st.appended = rows - overlapped;
        if i0 == i1 {
            runs.insert(
                i0,
                Run {
                    start,
                    data: data.to_vec(),
                },
            );
            return Ok(st);
        }
        let m_start = start.min(runs[i0].start);
        let m_end = end.max(run_end(&runs[i1 - 1]));
        let mut merged = vec![0u8; ((m_end - m_start) as usize) * rb];
        let off = |p: u64| ((p - m_start) as usize) * rb;
        merged[off(start)..off(end)].copy_from_slice(data);
        for r in &runs[i0..i1] {
            let re = run_end(r);
            for p in r.start..re {
                let old = &r.data[((p - r.start) as usize) * rb..][..rb];
                let inside = p >= start && p < end;
                if !inside || !codec.is_missing(old) {
                    merged[off(p)..off(p) + rb].copy_from_slice(old);
                }
            }
        }
        runs.splice(
            i0..i1,
            [Run {
                start: m_start,
                data: merged,
            }],
        );
        Ok(st)
    }

    /// Releases unused capacity of every run.
    pub fn shrink_to_fit(&mut self) {
        for runs in self.lanes.values_mut() {
            runs.shrink_to_fit();
            for r in runs {
                r.data.shrink_to_fit();
            }
        }
    }

    /// The stored bytes of the row at (seq, layer, position), if stored (present or missing).
    pub fn stored_row(&self, seq: SeqId, layer: LayerId, position: u64) -> Option<&[u8]> {
        let runs = self.lanes.get(&(seq, layer))?;
        let rb = self.codec.row_bytes();
        let i = runs.partition_point(|r| r.start <= position).checked_sub(1)?;
        let r = &runs[i];
        let off = usize::try_from(position - r.start).ok()?.checked_mul(rb)?;
        r.data.get(off..off + rb)
    }

    /// The ids recorded at (seq, layer, position); `None` when the row is missing or absent.
    pub fn row(&self, seq: SeqId, layer: LayerId, position: u64) -> Option<Vec<u32>> {
        let b = self.stored_row(seq, layer, position)?;
        if self.codec.is_missing(b) {
            return None;
        }
        let mut v = vec![0u32; self.codec.top_k()];
        self.codec.decode_into(b, &mut v);
        Some(v)
    }

    /// Fills `out` (`[len, K]`) with positions `start..start+len` of `seq` at `layer`; rows not
    /// recorded become [`MISSING_ID`].
    pub fn read_rows(
        &self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        mut out: ArrayViewMut2<'_, u32>,
    ) -> Result<(), TraceError> {
        self.check_layer(layer)?;
        let (len, k) = out.dim();
        if k != self.codec.top_k() {
            return Err(TraceError::Shape {
                top_k: self.codec.top_k(),
                got: k,
            });
        }
        let Some(runs) = self.lanes.get(&(seq, layer)) else {
            out.fill(MISSING_ID);
            return Ok(());
        };
        let rb = self.codec.row_bytes();
        let end = start.saturating_add(len as u64);
        let i0 = runs.partition_point(|r| r.start + (r.data.len() / rb) as u64 <= start);
        if let Some(o) = out.as_slice_mut() {
            // Contiguous output: whole run ranges are widened at once; only the gaps between
            // runs are filled with the missing marker.
            let mut cursor = start;
            for r in &runs[i0..] {
                if r.start >= end {
                    break;
                }
                let lo = start.max(r.start);
                let hi = end.min(r.start + (r.data.len() / rb) as u64);
                let a = (lo - r.start) as usize * rb;
                o[(cursor - start) as usize * k..(lo - start) as usize * k].fill(MISSING_ID);
                self.codec.decode_rows_into(
                    &r.data[a..a + (hi - lo) as usize * rb],
                    &mut o[(lo - start) as usize * k..(hi - start) as usize * k],
                );
                cursor = hi;
            }
            o[(cursor - start) as usize * k..].fill(MISSING_ID);
            return Ok(());
        }
        out.fill(MISSING_ID);
        for r in &runs[i0..] {
            if r.start >= end {
                break;
            }
            let re = r.start + (r.data.len() / rb) as u64;
            let lo = start.max(r.start);
            let hi = end.min(re);
            for p in lo..hi {
                let b = &r.data[((p - r.start) as usize) * rb..][..rb];
                let mut row = out.row_mut((p - start) as usize);
                if let Some(s) = row.as_slice_mut() {
                    self.codec.decode_into(b, s);
                } else {
                    self.codec.decode_row(b, row);
                }
            }
        }
        Ok(())
    }

    /// Every (sequence, layer) with stored rows, in (sequence, layer) order.
    pub fn lanes(&self) -> impl Iterator<Item = LaneRef<'_>> + '_ {
        let rb = self.codec.row_bytes();
        self.lanes.iter().map(move |(&(seq, layer), runs)| LaneRef {
            seq,
            layer,
            runs: runs
                .iter()
                .map(|r| RunRef {
                    start: r.start,
                    bytes: &r.data,
                    rows: r.data.len() / rb,
                })
                .collect(),
        })
    }

    /// Distinct sequence ids, ascending.
    pub fn sequences(&self) -> Vec<SeqId> {
        let mut v: Vec<SeqId> = self.lanes.keys().map(|k| k.0).collect();
        v.dedup();
        v
    }

    /// One past the last stored position of `seq` over all layers (0 when absent).
    pub fn sequence_end(&self, seq: SeqId) -> u64 {
        let rb = self.codec.row_bytes();
        self.lanes
            .range((seq, LayerId(0))..=(seq, LayerId(u32::MAX)))
            .filter_map(|(_, runs)| runs.last().map(|r| r.start + (r.data.len() / rb) as u64))
            .max()
            .unwrap_or(0)
    }

    /// True when no row is stored.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// `[T, L, K]` ids of one sequence for positions `0..T` (T = [`Trace::sequence_end`]) over
    /// the layer map; unrecorded rows are [`MISSING_ID`]. The shape vLLM, safetensors and NumPy
    /// exports use.
    pub fn to_dense(&self, seq: SeqId) -> Array3<u32> {
        let t = self.sequence_end(seq) as usize;
        let l = self.header.layers().len();
        let k = self.codec.top_k();
        let mut out = Array3::from_elem((t, l, k), MISSING_ID);
        let mut tmp = Array2::from_elem((t, k), MISSING_ID);
        for (li, &layer) in self.header.layers().iter().enumerate() {
            // Cannot fail: layer comes from the map, shape is [t, K].
            if self.read_rows(seq, layer, 0, tmp.view_mut()).is_ok() {
                out.slice_mut(s![.., li, ..]).assign(&tmp);
            }
        }
        out
    }

    /// Appends a `[T, L, K]` array of one sequence (positions `start..start+T`, layers in the
    /// order of the layer map; rows of [`MISSING_ID`] are missing). Strict overlap rule.
    pub fn append_dense(
        &mut self,
        seq: SeqId,
        start: u64,
        ids: ndarray::ArrayView3<'_, u32>,
    ) -> Result<AppendStats, TraceError> {
        let (_, l, _) = ids.dim();
        if l != self.header.layers().len() {
            return Err(TraceError::HeaderMismatch(format!(
                "dense array has {l} layers, the layer map has {}",
                self.header.layers().len()
            )));
        }
        let mut st = AppendStats::default();
        let layers = self.header.layers().to_vec();
        for (li, layer) in layers.into_iter().enumerate() {
            st.add(self.append(seq, layer, start, ids.slice(s![.., li, ..]))?);
        }
        Ok(st)
    }

    /// Counts: sequences, tokens, rows, ids, per layer.
    pub fn summary(&self) -> TraceSummary {
        let rb = self.codec.row_bytes();
        let mut per_layer: BTreeMap<LayerId, (u64, u64)> = self.header.layers().iter().map(|&l| (l, (0, 0))).collect();
        let mut tokens = 0u64;
        let mut seqs = 0u64;
        let mut cur: Option<SeqId> = None;
        let mut intervals: Vec<(u64, u64)> = Vec::new();
        let flush = |intervals: &mut Vec<(u64, u64)>| -> u64 {
            // Union of present positions of one sequence over layers.
            intervals.sort_unstable();
            let mut n = 0u64;
            let mut cur_end = 0u64;
            let mut cur_start = None::<u64>;
            for &(a, b) in intervals.iter() {
                match cur_start {
                    Some(_) if a <= cur_end => cur_end = cur_end.max(b),
                    _ => {
                        if let Some(s0) = cur_start {
                            n += cur_end - s0;
                        }
                        cur_start = Some(a);
                        cur_end = b;
                    }
                }
            }
            if let Some(s0) = cur_start {
                n += cur_end - s0;
            }
            intervals.clear();
            n
        };
        for (&(seq, layer), runs) in &self.lanes {
            if cur != Some(seq) {
                tokens += flush(&mut intervals);
                cur = Some(seq);
                seqs += 1;
            }
            let e = per_layer.entry(layer).or_default();
            for r in runs {
                let mut run_start: Option<u64> = None;
                for (i, row) in r.data.chunks_exact(rb).enumerate() {
                    let p = r.start + i as u64;
                    if self.codec.is_missing(row) {
                        e.1 += 1;
                        if let Some(a) = run_start.take() {
                            intervals.push((a, p));
                        }
                    } else {
                        e.0 += 1;
                        run_start.get_or_insert(p);
                    }
                }
                if let Some(a) = run_start {
                    intervals.push((a, r.start + (r.data.len() / rb) as u64));
                }
            }
        }
        tokens += flush(&mut intervals);
        let layers: Vec<LayerSummary> = per_layer
            .into_iter()
            .map(|(l, (rows, missing))| LayerSummary {
                layer: l.0,
                rows,
                missing_rows: missing,
            })
            .collect();
        let rows: u64 = layers.iter().map(|l| l.rows).sum();
        TraceSummary {
            sequences: seqs,
            tokens,
            rows,
            missing_rows: layers.iter().map(|l| l.missing_rows).sum(),
            ids: rows * self.codec.top_k() as u64,
            layers,
        }
    }

    /// Whole-trace checks beyond per-row validation (which [`Trace::append`] already enforces):
    /// all-zero layers (capture bug), MoE layers without any recorded row, and sequences whose
    /// layers cover different numbers of rows. Empty list = nothing found.
    pub fn validation_issues(&self) -> Vec<ValidationIssue> {
        let rb = self.codec.row_bytes();
        let mut out = Vec::new();
        let mut per_layer: BTreeMap<LayerId, (u64, bool)> = BTreeMap::new();
        let mut per_seq: BTreeMap<SeqId, BTreeMap<LayerId, u64>> = BTreeMap::new();
        for (&(seq, layer), runs) in &self.lanes {
            let e = per_layer.entry(layer).or_insert((0, false));
            let sc = per_seq.entry(seq).or_default().entry(layer).or_insert(0);
            for r in runs {
                for row in r.data.chunks_exact(rb) {
                    if !self.codec.is_missing(row) {
                        e.0 += 1;
                        *sc += 1;
                        if !e.1 && !self.codec.is_zero_row(row) {
                            e.1 = true;
                        }
                    }
                }
            }
        }
        for &l in self.header.layers() {
            match per_layer.get(&l) {
                None | Some((0, _)) => out.push(ValidationIssue::EmptyLayer { layer: l.0 }),
                Some(&(rows, false)) if rows >= ALL_ZERO_MIN_ROWS => {
                    out.push(ValidationIssue::AllZeroLayer { layer: l.0, rows })
                }
                _ => {}
            }
        }
        for (seq, layers) in per_seq {
            let max = layers.values().copied().max().unwrap_or(0);
            let (min_l, min) = self
                .header
                .layers()
                .iter()
                .map(|l| (*l, layers.get(l).copied().unwrap_or(0)))
                .min_by_key(|x| x.1)
                .unwrap_or((LayerId(0), 0));
            if min != max {
                out.push(ValidationIssue::UnevenCoverage {
                    seq: seq.0,
                    layer: min_l.0,
                    rows: min,
                    max_rows: max,
                });
            }
        }
        out
    }

    /// Errors with [`TraceError::AllZeroLayer`] when a layer with at least
    /// [`ALL_ZERO_MIN_ROWS`] recorded rows routes only to expert 0.
    pub fn check_all_zero_layers(&self) -> Result<(), TraceError> {
        for issue in self.validation_issues() {
            if let ValidationIssue::AllZeroLayer { layer, rows } = issue {
                return Err(TraceError::AllZeroLayer { layer, rows });
            }
        }
        Ok(())
    }

    /// Merges `other` (same header up to the producer) into this trace with the strict append
    /// rule (used to merge shards).
    pub fn merge(&mut self, other: &Trace) -> Result<AppendStats, TraceError> {
        self.header.check_compatible(other.header())?;
        let mut st = AppendStats::default();
        for lane in other.lanes() {
            for r in lane.runs {
                st.add(self.insert(lane.seq, lane.layer, r.start, r.bytes, true)?);
            }
        }
        Ok(st)
    }

    /// Writes the trace to a `.mrt` file (runs in (sequence, layer, position) order).
    pub fn write_file(
        &self,
        path: impl AsRef<std::path::Path>,
        opts: super::WriterOptions,
    ) -> Result<super::WriterStats, TraceError> {
        let w = super::TraceWriter::create(path, self.header.clone(), opts)?;
        for lane in self.lanes() {
            for r in lane.runs {
                w.append_stored(lane.seq, lane.layer, r.start, r.bytes)?;
            }
        }
        w.finish()
    }
}

impl RouteSource for Trace {
    fn header(&self) -> &TraceHeader {
        &self.header
    }
    fn read_rows(&self, seq: SeqId, layer: LayerId, start: u64, out: ArrayViewMut2<'_, u32>) -> Result<(), TraceError> {
        Trace::read_rows(self, seq, layer, start, out)
    }
    fn validate(&self) -> Result<(), TraceError> {
        self.check_all_zero_layers()
    }
}
