//! NumPy `.npy` `[T, L, K]`: any integer dtype on import (`-1` = missing in signed dtypes);
//! int32 by default on export, missing rows as `-1`. Values that do not fit the output dtype are
//! refused, never wrapped. Format versions 1.0–3.0 (via [`crate::npy`]).

use super::{DenseRoutes, Format, ImportOptions, IntDtype, InteropError, decode_ints, element_count, encode_ints};
use crate::npy::{self as np, NpyDtype};

const F: Format = Format::Npy;

/// The [`IntDtype`] of an `.npy` dtype (`None` for floats).
pub fn int_dtype(d: NpyDtype) -> Option<IntDtype> {
    Some(match d {
        NpyDtype::I8 => IntDtype::I8,
        NpyDtype::I16 => IntDtype::I16,
        NpyDtype::I32 => IntDtype::I32,
        NpyDtype::I64 => IntDtype::I64,
        NpyDtype::U8 => IntDtype::U8,
        NpyDtype::U16 => IntDtype::U16,
        NpyDtype::U32 => IntDtype::U32,
        NpyDtype::U64 => IntDtype::U64,
        NpyDtype::F16 | NpyDtype::F32 | NpyDtype::F64 | NpyDtype::Bf16 => return None,
    })
}

/// The `.npy` dtype of an [`IntDtype`].
pub fn npy_dtype(d: IntDtype) -> NpyDtype {
    match d {
        IntDtype::I8 => NpyDtype::I8,
        IntDtype::I16 => NpyDtype::I16,
        IntDtype::I32 => NpyDtype::I32,
        IntDtype::I64 => NpyDtype::I64,
        IntDtype::U8 => NpyDtype::U8,
        IntDtype::U16 => NpyDtype::U16,
        IntDtype::U32 => NpyDtype::U32,
        IntDtype::U64 => NpyDtype::U64,
    }
}

/// Refuses a header with non-ASCII bytes before [`np::parse`] sees it (its dtype parser assumes
/// ASCII; the keys, dtype and shape of a valid header are ASCII in every format version).
fn check_ascii_header(bytes: &[u8]) -> Result<(), InteropError> {
    if bytes.len() < 10 || !bytes.starts_with(b"\x93NUMPY") {
        return Ok(());
    }
    let (hlen, hstart): (usize, usize) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Ok(()),
    };
    let end = hstart.saturating_add(hlen).min(bytes.len());
    if let Some(i) = bytes[hstart..end].iter().position(|b| !b.is_ascii()) {
        return Err(InteropError::Npy(np::NpyError::Header {
            offset: hstart + i,
            reason: format!(
                "non-ASCII byte {:#04x} in the header (its keys, dtype and shape are ASCII)",
                bytes[hstart + i]
            ),
        }));
    }
    Ok(())
}

/// The element type of `.npy` bytes without decoding the data (for keeping a dtype on
/// conversion).
pub fn peek_dtype(bytes: &[u8]) -> Result<IntDtype, InteropError> {
    check_ascii_header(bytes)?;
    let arr = np::parse(bytes)?;
    int_dtype(arr.dtype).ok_or_else(|| InteropError::Dtype {
        format: F,
        found: arr.dtype.descr().into(),
        expected: "an integer dtype".into(),
    })
}

/// Decodes `.npy` bytes holding `[T, L, K]` integers.
pub fn decode(bytes: &[u8], opts: &ImportOptions) -> Result<DenseRoutes, InteropError> {
    check_ascii_header(bytes)?;
    let arr = np::parse(bytes)?;
    let dtype = int_dtype(arr.dtype).ok_or_else(|| InteropError::Dtype {
        format: F,
        found: arr.dtype.descr().into(),
        expected: "an integer dtype (int8 … int64, uint8 … uint64)".into(),
    })?;
    let [t, l, k] = arr.shape[..] else {
        return Err(InteropError::Shape {
            format: F,
            reason: format!("expected a [T, L, K] array, found shape {:?}", arr.shape),
        });
    };
    element_count(F, &[t as u64, l as u64, k as u64], opts.max_elements, "the .npy shape")?;
    let ids = decode_ints(F, &arr.data, dtype, (t, l, k), 0, opts.num_experts)?;
    Ok(DenseRoutes {
        source_dtype: Some(dtype),
        ..DenseRoutes::new(ids)
    })
}

/// Encodes `[T, L, K]` as `.npy` bytes of `dtype` (missing rows as `-1`, so a signed dtype is
/// needed when rows are missing). Rows start at position 0: call
/// [`DenseRoutes::rebased_to_zero`] first when `start > 0` (the `.npy` array has no offset).
pub fn encode(d: &DenseRoutes, dtype: IntDtype) -> Result<Vec<u8>, InteropError> {
    let d = d.clone().rebased_to_zero(F, super::DEFAULT_MAX_ELEMENTS)?;
    let data = encode_ints(F, &d.ids, 0, dtype)?;
    let (t, l, k) = d.ids.dim();
    Ok(np::to_bytes(&[t, l, k], npy_dtype(dtype), &data))
}
