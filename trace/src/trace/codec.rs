//! Row encoding: `u32` ids ↔ stored bytes of the header's id width, with validation.

use super::kernels;
use super::{IdWidth, MISSING_ID, TraceError, TraceHeader};
use moe_router_core::layout::{LayerId, SeqId};
use ndarray::{ArrayView2, ArrayViewMut1};

/// Rows checked together by the whole-group kernels (a group with a missing or bad row is
/// re-checked row by row).
const GROUP_ROWS: usize = 64;

/// What is wrong with one row (located by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowFault {
    OutOfRange { slot: usize, id: u32 },
    Duplicate { id: u32 },
    PartialMissing,
}

impl RowFault {
    pub(crate) fn locate(self, seq: SeqId, layer: LayerId, position: u64, num_experts: usize) -> TraceError {
        match self {
            RowFault::OutOfRange { slot, id } => TraceError::IdOutOfRange {
                seq: seq.0,
                layer: layer.0,
                position,
                slot,
                id,
                num_experts,
            },
            RowFault::Duplicate { id } => TraceError::DuplicateId {
                seq: seq.0,
                layer: layer.0,
                position,
                id,
                hint: if id == 0 {
                    " (a row of zeros usually means zero padding or a bypassed capture, not a route)".into()
                } else {
                    String::new()
                },
            },
            RowFault::PartialMissing => TraceError::PartialMissing {
                seq: seq.0,
                layer: layer.0,
                position,
            },
        }
    }
}

/// Encodes and decodes rows of one trace shape (E, K, id width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCodec {
    num_experts: u32,
    top_k: usize,
    width: IdWidth,
    /// Present rows may hold the width's maximum in some slots (slot sentinels).
    slots: bool,
}

impl RowCodec {
    /// The codec of a header.
    pub fn new(h: &TraceHeader) -> Self {
        RowCodec {
            num_experts: h.num_experts() as u32,
            top_k: h.top_k(),
            width: h.id_width(),
            slots: h.slot_sentinels(),
        }
    }
    /// Whether present rows may hold slot sentinels ([`TraceHeader::slot_sentinels`]).
    pub fn slot_sentinels(&self) -> bool {
        self.slots
    }
    /// K.
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// Id width.
    pub fn width(&self) -> IdWidth {
        self.width
    }
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.top_k * self.width.bytes()
    }

    #[inline]
    fn get(&self, bytes: &[u8], j: usize) -> u32 {
        match self.width {
            IdWidth::U8 => u32::from(bytes[j]),
            IdWidth::U16 => u32::from(u16::from_le_bytes([bytes[2 * j], bytes[2 * j + 1]])),
        }
    }

    /// True when the stored row is the missing marker.
    #[inline]
    pub fn is_missing(&self, bytes: &[u8]) -> bool {
        match self.width {
            IdWidth::U8 => bytes.iter().all(|&b| b == 0xFF),
            IdWidth::U16 => bytes.iter().all(|&b| b == 0xFF),
        }
    }

    /// Checks one stored row: missing (all sentinel) → `Ok(false)`; valid → `Ok(true)`.
    #[inline]
    pub(crate) fn check_stored(&self, bytes: &[u8]) -> Result<bool, RowFault> {
        if self.is_missing(bytes) {
            return Ok(false);
        }
        if self.slots {
            // Slot sentinels: the width's maximum (never a valid id here) in some slots.
            let sent = self.width.sentinel();
            for j in 0..self.top_k {
                let id = self.get(bytes, j);
                if id == sent {
                    continue;
                }
                if id >= self.num_experts {
                    return Err(RowFault::OutOfRange { slot: j, id });
                }
                if (0..j).any(|jj| self.get(bytes, jj) == id) {
                    return Err(RowFault::Duplicate { id });
                }
            }
            return Ok(true);
        }
        if self.width == IdWidth::U8 {
            // One-byte ids: range check and a 256-bit seen-set.
            let mut seen = [0u64; 4];
            for (j, &b) in bytes.iter().enumerate() {
                let id = u32::from(b);
                if id >= self.num_experts {
                    return Err(RowFault::OutOfRange { slot: j, id });
                }
                let (w, bit) = (usize::from(b >> 6), b & 63);
                if (seen[w] >> bit) & 1 != 0 {
                    return Err(RowFault::Duplicate { id });
                }
                seen[w] |= 1 << bit;
            }
            return Ok(true);
        }
        let k = self.top_k;
        let mut small = [0u32; 16];
        for j in 0..k {
            let id = self.get(bytes, j);
            if id >= self.num_experts {
                return Err(RowFault::OutOfRange { slot: j, id });
            }
            if k <= 16 {
                if small[..j].contains(&id) {
                    return Err(RowFault::Duplicate { id });
                }
                small[j] = id;
            }
        }
        if k > 16 {
            let mut v: Vec<u32> = (0..k).map(|j| self.get(bytes, j)).collect();
            v.sort_unstable();
            if let Some(w) = v.windows(2).find(|w| w[0] == w[1]) {
                return Err(RowFault::Duplicate { id: w[0] });
            }
        }
        Ok(true)
    }

    /// Encodes one `u32` row (K slots) into `out` (row bytes). A row of [`MISSING_ID`] in every
    /// slot becomes the missing marker; returns whether the row is present.
    #[inline]
    pub(crate) fn encode_row(&self, row: &[u32], out: &mut [u8]) -> Result<bool, RowFault> {
        if row.iter().all(|&x| x == MISSING_ID) {
            out.fill(0xFF);
            return Ok(false);
        }
        if row.contains(&MISSING_ID) && !self.slots {
            return Err(RowFault::PartialMissing);
        }
        for (j, &id) in row.iter().enumerate() {
            if id >= self.num_experts && !(self.slots && id == MISSING_ID) {
                return Err(RowFault::OutOfRange { slot: j, id });
            }
        }
        match self.width {
            IdWidth::U8 => {
                for (o, &id) in out.iter_mut().zip(row) {
                    *o = if id == MISSING_ID { 0xFF } else { id as u8 };
                }
            }
            IdWidth::U16 => {
                for (o, &id) in out.chunks_exact_mut(2).zip(row) {
                    let v = if id == MISSING_ID { 0xFFFF } else { id as u16 };
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        // Duplicates: checked on the encoded bytes (same rule as stored rows).
        self.check_stored(out).map(|_| true)
    }

    /// Fast check of a group of rows already encoded in `bytes` whose ids are known to be `< E`
    /// (so none is the sentinel of a missing row when K = 1): true when no row repeats an id.
    /// `None` when no whole-group kernel exists for this shape.
    #[inline]
    fn group_distinct(&self, bytes: &[u8]) -> Option<bool> {
        kernels::rows_have_duplicate(bytes, self.top_k, self.width.bytes()).map(|d| !d)
    }

    /// Encodes `[rows, K]` ids into stored bytes (appended to `out`), validating every row.
    /// `locate(row)` gives (seq, layer, position) for error messages.
    ///
    /// Rows are narrowed and checked [`GROUP_ROWS`] at a time by whole-group kernels (range by
    /// the group's largest id, duplicates by one word-sized test per row); only a group that
    /// fails (a missing row, or an error to locate) is re-encoded row by row.
    pub(crate) fn encode_rows(
        &self,
        ids: ArrayView2<'_, u32>,
        out: &mut Vec<u8>,
        seq: SeqId,
        layer: LayerId,
        start: u64,
    ) -> Result<usize, TraceError> {
        let (rows, k) = ids.dim();
        if k != self.top_k {
            return Err(TraceError::Shape {
                top_k: self.top_k,
                got: k,
            });
        }
        let rb = self.row_bytes();
        let base = out.len();
        out.resize(base + rows * rb, 0);
        let fail = |out: &mut Vec<u8>, r: usize, f: RowFault| {
            out.truncate(base);
            f.locate(seq, layer, start + r as u64, self.num_experts as usize)
        };
        let mut present = 0usize;
        if let Some(src) = ids.as_slice() {
            let mut g0 = 0;
            while g0 < rows {
                let g1 = (g0 + GROUP_ROWS).min(rows);
                let s = &src[g0 * k..g1 * k];
                let d = &mut out[base + g0 * rb..base + g1 * rb];
                let max = match self.width {
                    IdWidth::U8 => kernels::narrow_u8(s, d),
                    IdWidth::U16 => kernels::narrow_u16(s, d),
                };
                if max < self.num_experts && self.group_distinct(d) == Some(true) {
                    present += g1 - g0;
                } else {
                    for r in g0..g1 {
                        let dst = &mut out[base + r * rb..base + (r + 1) * rb];
                        match self.encode_row(&src[r * k..(r + 1) * k], dst) {
                            Ok(p) => present += usize::from(p),
                            Err(f) => return Err(fail(out, r, f)),
                        }
                    }
                }
                g0 = g1;
            }
            return Ok(present);
        }
        let mut tmp = Vec::with_capacity(k);
        for (r, row) in ids.outer_iter().enumerate() {
            tmp.clear();
            tmp.extend(row.iter().copied());
            let dst = &mut out[base + r * rb..base + (r + 1) * rb];
            match self.encode_row(&tmp, dst) {
                Ok(p) => present += usize::from(p),
                Err(f) => return Err(fail(out, r, f)),
            }
        }
        Ok(present)
    }

    /// Checks stored rows (`bytes.len()` a multiple of the row size), [`GROUP_ROWS`] at a time
    /// with whole-group kernels and row by row only in a group that fails. Returns the number of
    /// present rows and whether any present row holds a nonzero id, or the first bad row and
    /// its fault.
    pub(crate) fn check_stored_rows(&self, bytes: &[u8]) -> Result<(u64, bool), (usize, RowFault)> {
        let rb = self.row_bytes();
        let rows = bytes.len() / rb;
        let mut present = 0u64;
        let mut nonzero = false;
        let mut g0 = 0;
        while g0 < rows {
            let g1 = (g0 + GROUP_ROWS).min(rows);
            let g = &bytes[g0 * rb..g1 * rb];
            // One-byte ids with E = 256 are always in range (a missing row is then caught as a
            // duplicate, K ≥ 2).
            let in_range = match self.width {
                IdWidth::U8 if self.num_experts >= 256 => true,
                w => kernels::max_id(g, w.bytes()) < self.num_experts,
            };
            if in_range && self.group_distinct(g) == Some(true) {
                present += (g1 - g0) as u64;
                nonzero = nonzero || kernels::any_nonzero(g);
            } else {
                for (r, row) in g.chunks_exact(rb).enumerate() {
                    match self.check_stored(row) {
                        Ok(true) => {
                            present += 1;
                            nonzero = nonzero || !self.is_zero_row(row);
                        }
                        Ok(false) => {}
                        Err(f) => return Err((g0 + r, f)),
                    }
                }
            }
            g0 = g1;
        }
        Ok((present, nonzero))
    }

    /// Decodes a stored row into `out` (K slots); a missing row becomes [`MISSING_ID`]s.
    #[inline]
    pub fn decode_row(&self, bytes: &[u8], mut out: ArrayViewMut1<'_, u32>) {
        if self.is_missing(bytes) {
            out.fill(MISSING_ID);
            return;
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.get(bytes, j);
            if self.slots && *o == self.width.sentinel() {
                *o = MISSING_ID;
            }
        }
    }

    /// Decodes a stored row into a slice (K slots).
    #[inline]
    pub fn decode_into(&self, bytes: &[u8], out: &mut [u32]) {
        if self.is_missing(bytes) {
            out.fill(MISSING_ID);
            return;
        }
        match self.width {
            IdWidth::U8 => {
                for (o, &b) in out.iter_mut().zip(bytes) {
                    *o = u32::from(b);
                }
            }
            IdWidth::U16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u32::from(u16::from_le_bytes([b[0], b[1]]));
                }
            }
        }
        if self.slots {
            let sent = self.width.sentinel();
            for o in out.iter_mut().filter(|o| **o == sent) {
                *o = MISSING_ID;
            }
        }
    }

    /// Decodes whole stored rows into `out` (`rows × K`, row-major): one widening pass, then
    /// missing rows (only possible when the largest stored value is the sentinel) become
    /// [`MISSING_ID`]s.
    pub(crate) fn decode_rows_into(&self, bytes: &[u8], out: &mut [u32]) {
        let max = match self.width {
            IdWidth::U8 => kernels::widen_u8(bytes, out),
            IdWidth::U16 => kernels::widen_u16(bytes, out),
        };
        if max == self.width.sentinel() && self.slots {
            let sent = self.width.sentinel();
            for o in out.iter_mut().filter(|o| **o == sent) {
                *o = MISSING_ID;
            }
        } else if max == self.width.sentinel() {
            let k = self.top_k;
            for (row, o) in bytes.chunks_exact(self.row_bytes()).zip(out.chunks_exact_mut(k)) {
                if self.is_missing(row) {
                    o.fill(MISSING_ID);
                }
            }
        }
    }

    /// True when every id of a present stored row is 0.
    #[inline]
    pub(crate) fn is_zero_row(&self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| b == 0)
    }
}
