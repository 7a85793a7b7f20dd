//! The common form of every interchange format: one sequence of routes as a `[T, L, K]` array
//! ([`DenseRoutes`]), its checks, and its conversions to and from a [`Trace`].

use super::{Format, ImportOptions, IntDtype, InteropError, check_lk, element_at, element_count};
use crate::trace::{MISSING_ID, Trace, TraceHeader};
use moe_router_core::layout::{LayerId, SeqId};
use ndarray::{Array3, s};

/// One sequence of routes as a `[T, L, K]` array: the common form of every interchange format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseRoutes {
    /// `[T, L, K]` ids; a row of [`MISSING_ID`] in every slot is missing.
    pub ids: Array3<u32>,
    /// Token position of row 0.
    pub start: u64,
    /// E, when the format records it.
    pub num_experts: Option<usize>,
    /// Model layer ids of the L axis, when the format records them.
    pub layers: Option<Vec<u32>>,
    /// The element type the input stored the ids in, when decoded from a format.
    pub source_dtype: Option<IntDtype>,
}

/// What [`DenseRoutes::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenseCheck {
    /// Rows with K valid ids.
    pub present_rows: u64,
    /// Rows missing in every slot.
    pub missing_rows: u64,
    /// Rows with an id `≥ E`.
    pub out_of_range_rows: u64,
    /// Rows naming an expert twice.
    pub duplicate_rows: u64,
    /// Rows missing in some slots only.
    pub partial_missing_rows: u64,
    /// The E used for range checks.
    pub num_experts: usize,
    /// The first problems found (at most the number asked for).
    pub examples: Vec<InteropError>,
}

impl DenseCheck {
    /// True when no row is invalid.
    pub fn is_valid(&self) -> bool {
        self.out_of_range_rows == 0 && self.duplicate_rows == 0 && self.partial_missing_rows == 0
    }
}

impl DenseRoutes {
    /// A `[T, L, K]` block starting at position 0, with nothing known about E or the layers.
    pub fn new(ids: Array3<u32>) -> Self {
        DenseRoutes {
            ids,
            start: 0,
            num_experts: None,
            layers: None,
            source_dtype: None,
        }
    }

    /// `(T, L, K)`.
    pub fn dim(&self) -> (usize, usize, usize) {
        self.ids.dim()
    }

    /// The largest id present (`None` when every row is missing).
    pub fn max_id(&self) -> Option<u32> {
        self.ids.iter().copied().filter(|&x| x != MISSING_ID).max()
    }

    /// E for checks: the caller's, else the format's (they must agree), else `max id + 1` (at
    /// least K, at least 1).
    pub fn resolve_num_experts(&self, format: Format, given: Option<usize>) -> Result<usize, InteropError> {
        match (given, self.num_experts) {
            (Some(g), Some(f)) if g != f => Err(InteropError::Conflict {
                format,
                what: "num_experts",
                in_file: f.to_string(),
                given: g.to_string(),
            }),
            (Some(e), _) | (None, Some(e)) => Ok(e),
            (None, None) => {
                let k = self.ids.dim().2;
                Ok((self.max_id().map_or(0, |m| m as usize + 1)).max(k).max(1))
            }
        }
    }

    /// The layer ids of the L axis: the caller's, else the format's (they must agree), else
    /// `0..L`.
    pub fn resolve_layers(&self, format: Format, given: Option<&[u32]>) -> Result<Vec<u32>, InteropError> {
        let l = self.ids.dim().1;
        let v = match (given, &self.layers) {
            (Some(g), Some(f)) if g != f.as_slice() => {
                return Err(InteropError::Conflict {
                    format,
                    what: "layer ids",
                    in_file: format!("{f:?}"),
                    given: format!("{g:?}"),
                });
            }
            (Some(g), _) => g.to_vec(),
            (None, Some(f)) => f.clone(),
            (None, None) => (0..l as u32).collect(),
        };
        if v.len() != l {
            return Err(InteropError::Header {
                format,
                reason: format!(
                    "{} layer ids given ({v:?}) but the array has L = {l} layers; pass one id per layer",
                    v.len()
                ),
            });
        }
        Ok(v)
    }

    /// Checks every row against E (ids `< E`, distinct, missing in all slots or none), counting
    /// problems and keeping the first `max_examples` as errors.
    pub fn check(&self, format: Format, num_experts: usize, max_examples: usize) -> DenseCheck {
        let mut c = DenseCheck {
            num_experts,
            ..DenseCheck::default()
        };
        self.scan(
            format,
            num_experts,
            |e| {
                if let Some(e) = e {
                    match e {
                        InteropError::IdOutOfRange { .. } => c.out_of_range_rows += 1,
                        InteropError::DuplicateId { .. } => c.duplicate_rows += 1,
                        _ => c.partial_missing_rows += 1,
                    }
                    if c.examples.len() < max_examples {
                        c.examples.push(e);
                    }
                }
            },
            |present| {
                if present {
                    c.present_rows += 1;
                } else {
                    c.missing_rows += 1;
                }
            },
        );
        c
    }

    /// Visits every row: `bad(Some(err))` for an invalid row, `ok(present)` for a valid one.
    fn scan(
        &self,
        format: Format,
        num_experts: usize,
        mut bad: impl FnMut(Option<InteropError>),
        mut ok: impl FnMut(bool),
    ) {
        let (_, l, k) = self.ids.dim();
        let Some(flat) = self.ids.as_slice() else {
            let owned = self.ids.as_standard_layout().into_owned();
            let d = DenseRoutes {
                ids: owned,
                start: self.start,
                num_experts: self.num_experts,
                layers: self.layers.clone(),
                source_dtype: self.source_dtype,
            };
            return d.scan(format, num_experts, bad, ok);
        };
        if k == 0 {
            return;
        }
        let mut sorted: Vec<u32> = Vec::new();
        for (r, row) in flat.chunks_exact(k).enumerate() {
            let base = (r * k) as u64;
            let at = |slot: usize| element_at(base + slot as u64, self.start, l, k);
            let nmiss = row.iter().filter(|&&x| x == MISSING_ID).count();
            if nmiss == k {
                ok(false);
                continue;
            }
            if nmiss > 0 {
                let slot = row.iter().position(|&x| x == MISSING_ID).unwrap_or(0);
                bad(Some(InteropError::PartialMissing { format, at: at(slot) }));
                continue;
            }
            if let Some(slot) = row.iter().position(|&x| x as usize >= num_experts) {
                bad(Some(InteropError::IdOutOfRange {
                    format,
                    at: at(slot),
                    value: i128::from(row[slot]),
                    num_experts,
                }));
                continue;
            }
            let dup = if k <= 16 {
                (1..k).find(|&j| row[..j].contains(&row[j]))
            } else {
                sorted.clear();
                sorted.extend_from_slice(row);
                sorted.sort_unstable();
                sorted
                    .windows(2)
                    .find(|w| w[0] == w[1])
                    .and_then(|w| (1..k).find(|&j| row[j] == w[0] && row[..j].contains(&w[0])))
            };
            if let Some(j) = dup {
                let id = row[j];
                bad(Some(InteropError::DuplicateId {
                    format,
                    at: at(j),
                    id,
                    hint: if id == 0 {
                        " (a row of zeros usually means zero padding or a bypassed capture, not a route)".into()
                    } else {
                        String::new()
                    },
                }));
                continue;
            }
            ok(true);
        }
    }

    /// Builds a one-sequence [`Trace`] (strict: the first invalid row is an error, and a capture
    /// without any recorded row is [`InteropError::Empty`]). See the module docs for the sequence,
    /// position, layer and E defaults.
    pub fn to_trace(&self, format: Format, opts: &ImportOptions) -> Result<Trace, InteropError> {
        self.to_trace_with_progress(format, opts, |_, _| {})
    }

    /// [`DenseRoutes::to_trace`] calling `progress(layers_done, layers_total)` as it goes.
    pub fn to_trace_with_progress(
        &self,
        format: Format,
        opts: &ImportOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Trace, InteropError> {
        let e = self.resolve_num_experts(format, opts.num_experts)?;
        let mut first: Option<InteropError> = None;
        let mut present = 0usize;
        self.scan(
            format,
            e,
            |err| {
                if first.is_none() {
                    first = err;
                }
            },
            |p| present += usize::from(p),
        );
        if let Some(err) = first {
            return Err(err);
        }
        if present == 0 {
            return Err(InteropError::Empty {
                format,
                rows: self.ids.dim().0 * self.ids.dim().1,
            });
        }
        self.build(format, opts, e, &mut progress)
    }

    /// Builds a trace keeping the valid rows and storing invalid ones as missing (for
    /// validation reports), with the [`DenseCheck`] of what was replaced. An input without any
    /// recorded row gives an empty trace here (`DenseCheck::present_rows == 0`): the caller
    /// reports it.
    pub fn to_trace_lossy(
        &self,
        format: Format,
        opts: &ImportOptions,
        max_examples: usize,
    ) -> Result<(Trace, DenseCheck), InteropError> {
        let e = self.resolve_num_experts(format, opts.num_experts)?;
        let check = self.check(format, e, max_examples);
        if check.is_valid() {
            return Ok((self.build(format, opts, e, &mut |_, _| {})?, check));
        }
        let mut fixed = self.ids.as_standard_layout().into_owned();
        let k = fixed.dim().2;
        if let Some(flat) = fixed.as_slice_mut() {
            for row in flat.chunks_exact_mut(k.max(1)) {
                let nmiss = row.iter().filter(|&&x| x == MISSING_ID).count();
                let bad_range = row.iter().any(|&x| x != MISSING_ID && x as usize >= e);
                let mut dup = false;
                for j in 1..row.len() {
                    if row[..j].contains(&row[j]) {
                        dup = true;
                        break;
                    }
                }
                if (nmiss > 0 && nmiss < row.len()) || bad_range || (nmiss == 0 && dup) {
                    row.fill(MISSING_ID);
                }
            }
        }
        let d = DenseRoutes {
            ids: fixed,
            start: self.start,
            num_experts: self.num_experts,
            layers: self.layers.clone(),
            source_dtype: self.source_dtype,
        };
        Ok((d.build(format, opts, e, &mut |_, _| {})?, check))
    }

    /// The position of row 0: `given` ([`ImportOptions::start`]) or the format's own start; a
    /// nonzero start of the format that differs from `given` is [`InteropError::Conflict`].
    pub fn resolve_start(&self, format: Format, given: Option<u64>) -> Result<u64, InteropError> {
        match given {
            None => Ok(self.start),
            Some(g) if self.start == 0 || self.start == g => Ok(g),
            Some(g) => Err(InteropError::Conflict {
                format,
                what: "the start position of the first row",
                in_file: self.start.to_string(),
                given: g.to_string(),
            }),
        }
    }

    fn build(
        &self,
        format: Format,
        opts: &ImportOptions,
        e: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Trace, InteropError> {
        let (t, l, k) = self.ids.dim();
        check_lk(format, l, k)?;
        let layers = self.resolve_layers(format, opts.layers.as_deref())?;
        let header = TraceHeader::new(e, k, &layers)
            .map_err(|err| InteropError::Header {
                format,
                reason: format!("[T, L, K] = [{t}, {l}, {k}] with num_experts = {e}: {err}"),
            })?
            .with_producer(format!("moe-router interop: imported from {format}"));
        let header = opts.layer_kinds.iter().try_fold(header, |h, &(layer, kind)| {
            h.with_layer_kind(layer, kind).map_err(|err| InteropError::Header {
                format,
                reason: format!("layer {layer} as {kind}: {err}"),
            })
        })?;
        let start = self.resolve_start(format, opts.start)?;
        let mut trace = Trace::new(header);
        if start.checked_add(t as u64).is_none() {
            return Err(InteropError::Shape {
                format,
                reason: format!("start {start} + {t} rows overflows the position range"),
            });
        }
        for (li, &layer) in layers.iter().enumerate() {
            progress(li, l);
            if t > 0 {
                trace.append(opts.seq, LayerId(layer), start, self.ids.slice(s![.., li, ..]))?;
            }
        }
        progress(l, l);
        Ok(trace)
    }

    /// One sequence of `trace` (`seq`, or the only one) over the trace's layer map, from its
    /// first stored position to its end (see [`DenseRoutes::from_trace_from_zero`]).
    pub fn from_trace(
        format: Format,
        trace: &Trace,
        seq: Option<SeqId>,
        max_elements: u64,
    ) -> Result<DenseRoutes, InteropError> {
        let seqs = trace.sequences();
        let seq = match seq {
            Some(s) => s,
            None => match seqs.as_slice() {
                [] => SeqId(0),
                [only] => *only,
                many => {
                    return Err(InteropError::Unrepresentable {
                        format,
                        reason: format!(
                            "the trace holds {} sequences ({}); {format} holds one: pick one \
                             (ExportOptions::seq; CLI: --seq ID), or keep the .mrt format",
                            many.len(),
                            many.iter()
                                .take(8)
                                .map(|s| s.0.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                                + if many.len() > 8 { ", …" } else { "" }
                        ),
                    });
                }
            },
        };
        let h = trace.header();
        let l = h.layers().len();
        let k = h.top_k();
        let start = trace
            .lanes()
            .filter(|lane| lane.seq == seq)
            .filter_map(|lane| lane.runs.first().map(|r| r.start))
            .min()
            .unwrap_or(0);
        let end = trace.sequence_end(seq);
        let t = end - start;
        element_count(format, &[t, l as u64, k as u64], max_elements, "exporting the trace")?;
        let t = t as usize;
        let mut ids = Array3::from_elem((t, l, k), MISSING_ID);
        let mut tmp = ndarray::Array2::from_elem((t, k), MISSING_ID);
        for (li, &layer) in h.layers().iter().enumerate() {
            trace.read_rows(seq, layer, start, tmp.view_mut())?;
            ids.slice_mut(s![.., li, ..]).assign(&tmp);
        }
        Ok(DenseRoutes {
            ids,
            start,
            num_experts: Some(h.num_experts()),
            layers: Some(h.layer_ids()),
            source_dtype: None,
        })
    }

    /// Like [`DenseRoutes::from_trace`], but row 0 is position 0 (earlier positions become
    /// missing rows): for formats without a start offset.
    pub fn from_trace_from_zero(
        format: Format,
        trace: &Trace,
        seq: Option<SeqId>,
        max_elements: u64,
    ) -> Result<DenseRoutes, InteropError> {
        DenseRoutes::from_trace(format, trace, seq, max_elements)?.rebased_to_zero(format, max_elements)
    }

    /// The same routes with row 0 at position 0 (rows before `start` become missing).
    pub fn rebased_to_zero(self, format: Format, max_elements: u64) -> Result<DenseRoutes, InteropError> {
        if self.start == 0 {
            return Ok(self);
        }
        let (t, l, k) = self.ids.dim();
        let total = self.start.saturating_add(t as u64);
        element_count(
            format,
            &[total, l as u64, k as u64],
            max_elements,
            "rows before the start offset",
        )?;
        let mut ids = Array3::from_elem((total as usize, l, k), MISSING_ID);
        ids.slice_mut(s![self.start as usize.., .., ..]).assign(&self.ids);
        Ok(DenseRoutes { ids, start: 0, ..self })
    }
}
