//! NeMo Gym route envelope: `nrlre1:<int8|int16|int32>:<T>x<L>x<K>:<base64 little-endian>`,
//! `-1` = missing (`MISSING_ROUTE_SENTINEL`). Surrounding whitespace is ignored; the base64 may
//! omit its padding.

use super::{
    DenseRoutes, Format, ImportOptions, IntDtype, InteropError, decode_base64, decode_ints, element_count,
    encode_base64, encode_ints,
};

const F: Format = Format::Nrlre1;

/// The envelope prefix.
pub const PREFIX: &str = "nrlre1";

fn bad(offset: usize, reason: impl Into<String>) -> InteropError {
    InteropError::Malformed {
        format: F,
        region: "input",
        offset: offset as u64,
        reason: reason.into(),
    }
}

/// Decodes a NeMo Gym envelope.
pub fn decode(text: &[u8], opts: &ImportOptions) -> Result<DenseRoutes, InteropError> {
    let lead = text.len() - text.trim_ascii_start().len();
    let body = text.trim_ascii();
    // Split into the four fields, keeping each field's offset.
    let mut fields: Vec<(usize, &[u8])> = Vec::with_capacity(4);
    let mut at = 0usize;
    for _ in 0..3 {
        let Some(i) = body[at..].iter().position(|&c| c == b':') else {
            return Err(bad(
                lead + body.len(),
                format!(
                    "expected {PREFIX}:<int8|int16|int32>:<T>x<L>x<K>:<base64>, found {} field(s)",
                    fields.len() + 1
                ),
            ));
        };
        fields.push((lead + at, &body[at..at + i]));
        at += i + 1;
    }
    fields.push((lead + at, &body[at..]));
    let (o0, tag) = fields[0];
    if tag != PREFIX.as_bytes() {
        return Err(bad(o0, format!("envelope must start with {PREFIX:?}")));
    }
    let (o1, dt) = fields[1];
    let dtype = match dt {
        b"int8" => IntDtype::I8,
        b"int16" => IntDtype::I16,
        b"int32" => IntDtype::I32,
        other => {
            return Err(InteropError::Dtype {
                format: F,
                found: format!("{:?} (at byte offset {o1})", String::from_utf8_lossy(other)),
                expected: "int8, int16 or int32".into(),
            });
        }
    };
    let (o2, shape) = fields[2];
    let mut dims = [0u64; 3];
    let mut parts = shape.split(|&c| c == b'x');
    let mut off = o2;
    for (i, d) in dims.iter_mut().enumerate() {
        let p = parts.next().unwrap_or_default();
        let s = std::str::from_utf8(p)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()));
        *d = s.and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
            bad(
                off,
                format!(
                    "shape field {} ({:?}) is not a number",
                    ["T", "L", "K"][i],
                    String::from_utf8_lossy(p)
                ),
            )
        })?;
        off += p.len() + 1;
    }
    if parts.next().is_some() {
        return Err(bad(o2, "shape must be <T>x<L>x<K>"));
    }
    let [t, l, k] = dims;
    let n = element_count(F, &dims, opts.max_elements, "the envelope shape")?;
    let (o3, payload) = fields[3];
    let expected_bytes = n * dtype.size();
    // Bound the decoded size before decoding.
    if (payload.len() as u64 / 4) * 3 > expected_bytes as u64 + 3 {
        return Err(InteropError::Shape {
            format: F,
            reason: format!(
                "shape {t}x{l}x{k} of {dtype} needs {expected_bytes} bytes, the base64 payload holds more ({} symbols)",
                payload.len()
            ),
        });
    }
    let bytes = decode_base64(F, payload, o3 as u64)?;
    let ids = decode_ints(
        F,
        &bytes,
        dtype,
        (t as usize, l as usize, k as usize),
        0,
        opts.num_experts,
    )?;
    Ok(DenseRoutes {
        source_dtype: Some(dtype),
        ..DenseRoutes::new(ids)
    })
}

/// Encodes `[T, L, K]` as an envelope of `dtype` (int8, int16 or int32; missing rows as `-1`,
/// rows from position 0). Ids that do not fit `dtype` are refused.
pub fn encode(d: &DenseRoutes, dtype: IntDtype) -> Result<String, InteropError> {
    if !matches!(dtype, IntDtype::I8 | IntDtype::I16 | IntDtype::I32) {
        return Err(InteropError::Dtype {
            format: F,
            found: dtype.name().into(),
            expected: "int8, int16 or int32".into(),
        });
    }
    let d = d.clone().rebased_to_zero(F, super::DEFAULT_MAX_ELEMENTS)?;
    let (t, l, k) = d.ids.dim();
    let data = encode_ints(F, &d.ids, 0, dtype)?;
    Ok(format!("{PREFIX}:{dtype}:{t}x{l}x{k}:{}", encode_base64(&data)))
}
