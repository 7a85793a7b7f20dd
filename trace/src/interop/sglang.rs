//! SGLang `meta_info.routed_experts`: base64 (standard alphabet; padding optional, surrounding
//! whitespace ignored) of little-endian int32, flat `[T, L, K]` with L and K given by the caller
//! (`num_hidden_layers`, `num_experts_per_tok`). SGLang returns `T = seqlen − 1 − start_len`
//! rows; `-1` is read (and written) as a missing row.
//!
//! **`routed_experts_start_len`.** With that request field SGLang returns only the rows
//! `[start_len, seqlen − 1)`: row 0 is position `start_len`, not 0. The importer applies it:
//! give the JSON object the server returned (`meta_info`, or a response holding `meta_info`,
//! with `routed_experts` and `routed_experts_start_len`), or the base64 text with
//! [`ImportOptions::start`] (CLI `--start`). The rows then land at their true positions, and a
//! trainer replays them with [`moe_router_core::BatchLayout::with_route_start`].

use super::{
    DenseRoutes, Format, ImportOptions, IntDtype, InteropError, decode_base64, decode_ints, element_count,
    encode_base64, encode_ints, trim_ascii,
};

const F: Format = Format::Sglang;

/// Decodes SGLang base64 text (L and K from `opts`).
pub fn decode(text: &[u8], opts: &ImportOptions) -> Result<DenseRoutes, InteropError> {
    let (Some(l), Some(k)) = (opts.num_layers, opts.top_k) else {
        return Err(InteropError::MissingOption {
            format: F,
            what: "the shape [L, K]",
            hint: "pass the number of MoE layers and K (CLI: --num-layers L --top-k K)".into(),
        });
    };
    if l == 0 || k == 0 {
        return Err(InteropError::Shape {
            format: F,
            reason: format!("L = {l} and K = {k} must both be at least 1"),
        });
    }
    let (json_start, owned);
    let text: &[u8] = if text.trim_ascii_start().starts_with(b"{") {
        let (b64, start) = from_json(text)?;
        json_start = start;
        owned = b64.into_bytes();
        &owned
    } else {
        json_start = None;
        text
    };
    let lead = text.len() - text.trim_ascii_start().len();
    let body = trim_ascii(text);
    // Bound the decoded size before decoding: 3 bytes per 4 symbols.
    let max_bytes = (body.len() as u64 / 4 + 1) * 3;
    element_count(F, &[max_bytes / 4], opts.max_elements, "the base64 length")?;
    let bytes = decode_base64(F, body, lead as u64)?;
    if bytes.len() % 4 != 0 {
        return Err(InteropError::Malformed {
            format: F,
            region: "base64 payload",
            offset: (bytes.len() - bytes.len() % 4) as u64,
            reason: format!("{} bytes is not a whole number of int32 values", bytes.len()),
        });
    }
    let n = bytes.len() / 4;
    let per_token = l.saturating_mul(k);
    if n % per_token != 0 {
        return Err(InteropError::Shape {
            format: F,
            reason: format!("{n} ids are not a whole number of tokens of L × K = {l} × {k} ids"),
        });
    }
    let t = n / per_token;
    let ids = decode_ints(F, &bytes, IntDtype::I32, (t, l, k), 0, opts.num_experts)?;
    let start = match (json_start, opts.start) {
        (Some(j), Some(g)) if j != g => {
            return Err(InteropError::Conflict {
                format: F,
                what: "routed_experts_start_len",
                in_file: j.to_string(),
                given: g.to_string(),
            });
        }
        (Some(j), _) => j,
        (None, g) => g.unwrap_or(0),
    };
    Ok(DenseRoutes {
        source_dtype: Some(IntDtype::I32),
        start,
        ..DenseRoutes::new(ids)
    })
}

/// The base64 text and the start of an SGLang JSON object: `routed_experts` and
/// `routed_experts_start_len` at the top level or under `meta_info`.
fn from_json(text: &[u8]) -> Result<(String, Option<u64>), InteropError> {
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| InteropError::Malformed {
        format: F,
        region: "JSON",
        offset: 0,
        reason: format!("line {}, column {}: {e}", e.line(), e.column()),
    })?;
    let obj = match v.get("meta_info") {
        Some(m) if m.is_object() => m,
        _ => &v,
    };
    let b64 = obj
        .get("routed_experts")
        .and_then(|x| x.as_str())
        .ok_or_else(|| InteropError::Malformed {
            format: F,
            region: "JSON",
            offset: 0,
            reason: "no string `routed_experts` (at the top level or under `meta_info`)".into(),
        })?;
    let start = match obj
        .get("routed_experts_start_len")
        .or_else(|| v.get("routed_experts_start_len"))
    {
        None | Some(serde_json::Value::Null) => None,
        Some(x) => Some(x.as_u64().ok_or_else(|| InteropError::Malformed {
            format: F,
            region: "JSON",
            offset: 0,
            reason: format!("routed_experts_start_len must be a non-negative integer, found {x}"),
        })?),
    };
    Ok((b64.to_string(), start))
}

/// Encodes `[T, L, K]` as SGLang base64 text (int32, missing rows as `-1`, rows from position 0).
pub fn encode(d: &DenseRoutes) -> Result<String, InteropError> {
    let d = d.clone().rebased_to_zero(F, super::DEFAULT_MAX_ELEMENTS)?;
    Ok(encode_base64(&encode_ints(F, &d.ids, 0, IntDtype::I32)?))
}
