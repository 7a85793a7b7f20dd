//! Integer element types of the interchange formats ([`IntDtype`]), and `[T, L, K]` id arrays
//! decoded from and encoded to little-endian integers of one of them.

use super::{Format, InteropError, check_lk, element_at};
use crate::trace::MISSING_ID;
use ndarray::Array3;
use std::fmt;

/// The largest id any trace can hold (E ≤ [`moe_router_core::MAX_EXPERTS`]).
const MAX_ID: i128 = moe_router_core::MAX_EXPERTS as i128 - 1;

/// Integer element types of the interchange formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntDtype {
    /// `int8`
    I8,
    /// `int16`
    I16,
    /// `int32`
    I32,
    /// `int64`
    I64,
    /// `uint8`
    U8,
    /// `uint16`
    U16,
    /// `uint32`
    U32,
    /// `uint64`
    U64,
}

impl IntDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            IntDtype::I8 | IntDtype::U8 => 1,
            IntDtype::I16 | IntDtype::U16 => 2,
            IntDtype::I32 | IntDtype::U32 => 4,
            IntDtype::I64 | IntDtype::U64 => 8,
        }
    }
    /// Whether the type is signed (and so can hold the missing marker `-1`).
    pub fn is_signed(self) -> bool {
        matches!(self, IntDtype::I8 | IntDtype::I16 | IntDtype::I32 | IntDtype::I64)
    }
    /// NumPy-style name (`int8` … `uint64`).
    pub fn name(self) -> &'static str {
        match self {
            IntDtype::I8 => "int8",
            IntDtype::I16 => "int16",
            IntDtype::I32 => "int32",
            IntDtype::I64 => "int64",
            IntDtype::U8 => "uint8",
            IntDtype::U16 => "uint16",
            IntDtype::U32 => "uint32",
            IntDtype::U64 => "uint64",
        }
    }
    /// Parses [`IntDtype::name`].
    pub fn from_name(s: &str) -> Option<IntDtype> {
        [
            IntDtype::I8,
            IntDtype::I16,
            IntDtype::I32,
            IntDtype::I64,
            IntDtype::U8,
            IntDtype::U16,
            IntDtype::U32,
            IntDtype::U64,
        ]
        .into_iter()
        .find(|d| d.name() == s)
    }
    /// Inclusive value range.
    pub fn range(self) -> (i128, i128) {
        match self {
            IntDtype::I8 => (i8::MIN.into(), i8::MAX.into()),
            IntDtype::I16 => (i16::MIN.into(), i16::MAX.into()),
            IntDtype::I32 => (i32::MIN.into(), i32::MAX.into()),
            IntDtype::I64 => (i64::MIN.into(), i64::MAX.into()),
            IntDtype::U8 => (0, u8::MAX.into()),
            IntDtype::U16 => (0, u16::MAX.into()),
            IntDtype::U32 => (0, u32::MAX.into()),
            IntDtype::U64 => (0, u64::MAX.into()),
        }
    }
    /// The narrowest signed type holding ids `< num_experts` and `-1` (int8, int16 or int32).
    pub fn narrowest_signed(num_experts: usize) -> IntDtype {
        if num_experts <= 128 {
            IntDtype::I8
        } else if num_experts <= 32_768 {
            IntDtype::I16
        } else {
            IntDtype::I32
        }
    }

    /// Reads the little-endian element at the start of `b` (at least [`IntDtype::size`] bytes).
    #[inline]
    fn read(self, b: &[u8]) -> i128 {
        let mut a = [0u8; 8];
        a[..self.size()].copy_from_slice(&b[..self.size()]);
        match self {
            IntDtype::I8 => i128::from(a[0] as i8),
            IntDtype::U8 => i128::from(a[0]),
            IntDtype::I16 => i128::from(i16::from_le_bytes([a[0], a[1]])),
            IntDtype::U16 => i128::from(u16::from_le_bytes([a[0], a[1]])),
            IntDtype::I32 => i128::from(i32::from_le_bytes([a[0], a[1], a[2], a[3]])),
            IntDtype::U32 => i128::from(u32::from_le_bytes([a[0], a[1], a[2], a[3]])),
            IntDtype::I64 => i128::from(i64::from_le_bytes(a)),
            IntDtype::U64 => i128::from(u64::from_le_bytes(a)),
        }
    }

    /// Appends `v` (which must be in [`IntDtype::range`]) little-endian.
    #[inline]
    pub(super) fn write(self, v: i128, out: &mut Vec<u8>) {
        let b = (v as i64).to_le_bytes();
        out.extend_from_slice(&b[..self.size()]);
    }
}

impl fmt::Display for IntDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes little-endian integers `[T, L, K]` into ids: `-1` (signed types) becomes
/// [`MISSING_ID`]; other negative values and values beyond any possible id are errors.
/// `data` must hold exactly `T × L × K` elements.
pub(crate) fn decode_ints(
    format: Format,
    data: &[u8],
    dtype: IntDtype,
    shape: (usize, usize, usize),
    start: u64,
    num_experts: Option<usize>,
) -> Result<Array3<u32>, InteropError> {
    let (t, l, k) = shape;
    check_lk(format, l, k)?;
    let n = t * l * k;
    let es = dtype.size();
    if data.len() != n * es {
        return Err(InteropError::Shape {
            format,
            reason: format!(
                "shape [{t}, {l}, {k}] of {dtype} needs {} bytes, the data has {}",
                n * es,
                data.len()
            ),
        });
    }
    let mut out = Vec::with_capacity(n);
    for (i, c) in data.chunks_exact(es).enumerate() {
        let v = dtype.read(c);
        if (0..=MAX_ID).contains(&v) {
            out.push(v as u32);
        } else if v == -1 {
            out.push(MISSING_ID);
        } else {
            let at = element_at(i as u64, start, l, k);
            return Err(if v < 0 {
                InteropError::Negative { format, at, value: v }
            } else {
                InteropError::IdOutOfRange {
                    format,
                    at,
                    value: v,
                    num_experts: num_experts.unwrap_or(moe_router_core::MAX_EXPERTS),
                }
            });
        }
    }
    Array3::from_shape_vec((t, l, k), out).map_err(|e| InteropError::Shape {
        format,
        reason: e.to_string(),
    })
}

/// Encodes ids as little-endian `dtype` (missing → `-1`), refusing values that do not fit.
pub(crate) fn encode_ints(
    format: Format,
    ids: &Array3<u32>,
    start: u64,
    dtype: IntDtype,
) -> Result<Vec<u8>, InteropError> {
    let (_, l, k) = ids.dim();
    let (lo, hi) = dtype.range();
    let mut out = Vec::with_capacity(ids.len() * dtype.size());
    for (i, &id) in ids.iter().enumerate() {
        let v = if id == MISSING_ID { -1 } else { i128::from(id) };
        if v < lo || v > hi {
            return Err(InteropError::DoesNotFit {
                format,
                at: element_at(i as u64, start, l, k),
                value: v,
                target: if v == -1 {
                    format!("{dtype} (a missing row is written as -1, which needs a signed dtype)")
                } else {
                    dtype.name().to_string()
                },
            });
        }
        dtype.write(v, &mut out);
    }
    Ok(out)
}
