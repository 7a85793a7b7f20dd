//! prime-rl / verifiers `RoutedExperts` over msgpack: a map
//! `{data: bytes, shape: [T, L, K], dtype: "uint8" | "uint16", start: int}` (raw little-endian
//! bytes, no base64). Row `t` is token `start + t`; tokens before `start` and after the last row
//! are missing (the format has no in-band missing marker). Other keys are ignored; `start` may be
//! absent (0).

use super::{DenseRoutes, Format, ImportOptions, IntDtype, InteropError, decode_ints, element_count};
use crate::trace::MISSING_ID;
use ndarray::s;
use serde::{Deserialize, Serialize};

const F: Format = Format::PrimeRl;

#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    data: serde_bytes::ByteBuf,
    shape: Vec<u64>,
    dtype: String,
    #[serde(default)]
    start: u64,
}

/// Decodes a prime-rl msgpack map.
pub fn decode(bytes: &[u8], opts: &ImportOptions) -> Result<DenseRoutes, InteropError> {
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
    let w = Wire::deserialize(&mut de).map_err(|e| InteropError::Malformed {
        format: F,
        region: "input",
        offset: de.position(),
        reason: format!("msgpack: {e}"),
    })?;
    if de.position() != bytes.len() as u64 {
        return Err(InteropError::Malformed {
            format: F,
            region: "input",
            offset: de.position(),
            reason: format!("{} bytes after the msgpack map", bytes.len() as u64 - de.position()),
        });
    }
    let dtype = match w.dtype.as_str() {
        "uint8" => IntDtype::U8,
        "uint16" => IntDtype::U16,
        other => {
            return Err(InteropError::Dtype {
                format: F,
                found: format!("{other:?}"),
                expected: "\"uint8\" or \"uint16\"".into(),
            });
        }
    };
    let [t, l, k] = w.shape[..] else {
        return Err(InteropError::Shape {
            format: F,
            reason: format!("shape must be [T, L, K], found {:?}", w.shape),
        });
    };
    element_count(F, &[t, l, k], opts.max_elements, "the shape")?;
    if w.start.checked_add(t).is_none() {
        return Err(InteropError::Shape {
            format: F,
            reason: format!("start {} + T {t} overflows", w.start),
        });
    }
    let ids = decode_ints(
        F,
        &w.data,
        dtype,
        (t as usize, l as usize, k as usize),
        w.start,
        opts.num_experts,
    )?;
    Ok(DenseRoutes {
        ids,
        start: w.start,
        num_experts: None,
        layers: None,
        source_dtype: Some(dtype),
    })
}

/// Encodes one sequence as a prime-rl msgpack map (u8 ids when E ≤ 256, else u16). Leading and
/// trailing missing rows are dropped (`start` marks the first row); a missing row between present
/// ones cannot be expressed (error).
pub fn encode(d: &DenseRoutes) -> Result<Vec<u8>, InteropError> {
    let (t, l, k) = d.ids.dim();
    let e = d.resolve_num_experts(F, None)?;
    let (dtype, name) = if e <= 256 {
        (IntDtype::U8, "uint8")
    } else {
        (IntDtype::U16, "uint16")
    };
    let row_missing = |ti: usize, li: usize| d.ids.slice(s![ti, li, ..]).iter().all(|&x| x == MISSING_ID);
    let token_missing = |ti: usize| (0..l).all(|li| row_missing(ti, li));
    let first = (0..t).find(|&ti| !token_missing(ti)).unwrap_or(t);
    let end = (first..t).rev().find(|&ti| !token_missing(ti)).map_or(first, |x| x + 1);
    let mut data = Vec::with_capacity((end - first) * l * k * dtype.size());
    for ti in first..end {
        for li in 0..l {
            if row_missing(ti, li) {
                return Err(InteropError::Unrepresentable {
                    format: F,
                    reason: format!(
                        "token {}, layer index {li} is missing between recorded rows; prime-rl has no missing marker \
                         (export the span before or after it, or keep .mrt)",
                        d.start + ti as u64
                    ),
                });
            }
            for &id in d.ids.slice(s![ti, li, ..]).iter() {
                if id as usize >= e {
                    return Err(InteropError::Unrepresentable {
                        format: F,
                        reason: format!("id {id} is not below num_experts = {e}"),
                    });
                }
                dtype.write(i128::from(id), &mut data);
            }
        }
    }
    let w = Wire {
        data: serde_bytes::ByteBuf::from(data),
        shape: vec![(end - first) as u64, l as u64, k as u64],
        dtype: name.to_string(),
        start: d.start + first as u64,
    };
    rmp_serde::to_vec_named(&w).map_err(|e| InteropError::Unrepresentable {
        format: F,
        reason: format!("msgpack: {e}"),
    })
}
