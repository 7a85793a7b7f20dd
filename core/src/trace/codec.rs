//! Row encoding: `u32` ids ↔ stored bytes of the header's id width, with validation.

use super::{IdWidth, MISSING_ID, TraceError, TraceHeader};
use crate::layout::{LayerId, SeqId};
use ndarray::{ArrayView2, ArrayViewMut1};

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
}

impl RowCodec {
    /// The codec of a header.
    pub fn new(h: &TraceHeader) -> Self {
        RowCodec {
            num_experts: h.num_experts() as u32,
            top_k: h.top_k(),
            width: h.id_width(),
        }
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
        if row.contains(&MISSING_ID) {
            return Err(RowFault::PartialMissing);
        }
        for (j, &id) in row.iter().enumerate() {
            if id >= self.num_experts {
                return Err(RowFault::OutOfRange { slot: j, id });
            }
        }
        match self.width {
            IdWidth::U8 => {
                for (o, &id) in out.iter_mut().zip(row) {
                    *o = id as u8;
                }
            }
            IdWidth::U16 => {
                for (o, &id) in out.chunks_exact_mut(2).zip(row) {
                    o.copy_from_slice(&(id as u16).to_le_bytes());
                }
            }
        }
        // Duplicates: checked on the encoded bytes (same rule as stored rows).
        self.check_stored(out).map(|_| true)
    }

    /// Encodes `[rows, K]` ids into stored bytes (appended to `out`), validating every row.
    /// `locate(row)` gives (seq, layer, position) for error messages.
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
        let mut present = 0usize;
        let mut tmp = Vec::new();
        for (r, row) in ids.outer_iter().enumerate() {
            let slice: &[u32] = match row.as_slice() {
                Some(s) => s,
                None => {
                    tmp.clear();
                    tmp.extend(row.iter().copied());
                    &tmp
                }
            };
            let dst = &mut out[base + r * rb..base + (r + 1) * rb];
            match self.encode_row(slice, dst) {
                Ok(p) => present += usize::from(p),
                Err(f) => {
                    out.truncate(base);
                    return Err(f.locate(seq, layer, start + r as u64, self.num_experts as usize));
                }
            }
        }
        Ok(present)
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
    }

    /// True when every id of a present stored row is 0.
    #[inline]
    pub(crate) fn is_zero_row(&self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| b == 0)
    }
}
