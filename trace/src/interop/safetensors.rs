//! safetensors: tensor `routed_experts` `[T, L, K]` (any integer dtype on import, `-1` = missing
//! in signed dtypes; int32 by default on export) plus `__metadata__` string entries:
//!
//! | key | value | on import |
//! |---|---|---|
//! | `num_experts` | E, decimal | E (a different `num_experts` from the caller is an error) |
//! | `layers` | the layer map, a JSON list (`[0, 1, 3]`) or comma-separated ids | the layer ids of the L axis |
//! | `top_k` | K, decimal | checked against the tensor's K |
//! | `start` | position of row 0, decimal (written as `0`: exports start at position 0) | start offset |
//! | `format` | `moe-router.routed_experts.v1` | ignored |
//!
//! Every metadata key is optional on import; other tensors and keys are ignored.

use super::{DenseRoutes, Format, ImportOptions, IntDtype, InteropError, decode_ints, element_count, encode_ints};
use ::safetensors::tensor::TensorView;
use ::safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::HashMap;

const F: Format = Format::Safetensors;

/// Name of the tensor holding the ids.
pub const TENSOR_NAME: &str = "routed_experts";
/// Value of the `format` metadata key written on export.
pub const FORMAT_TAG: &str = "moe-router.routed_experts.v1";

fn int_dtype(d: Dtype) -> Option<IntDtype> {
    Some(match d {
        Dtype::I8 => IntDtype::I8,
        Dtype::I16 => IntDtype::I16,
        Dtype::I32 => IntDtype::I32,
        Dtype::I64 => IntDtype::I64,
        Dtype::U8 => IntDtype::U8,
        Dtype::U16 => IntDtype::U16,
        Dtype::U32 => IntDtype::U32,
        Dtype::U64 => IntDtype::U64,
        _ => return None,
    })
}

fn st_dtype(d: IntDtype) -> Dtype {
    match d {
        IntDtype::I8 => Dtype::I8,
        IntDtype::I16 => Dtype::I16,
        IntDtype::I32 => Dtype::I32,
        IntDtype::I64 => Dtype::I64,
        IntDtype::U8 => Dtype::U8,
        IntDtype::U16 => Dtype::U16,
        IntDtype::U32 => Dtype::U32,
        IntDtype::U64 => Dtype::U64,
    }
}

fn st_error(bytes: &[u8], e: SafeTensorError) -> InteropError {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    let offset = match &e {
        SafeTensorError::HeaderTooSmall | SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => 0,
        SafeTensorError::MetadataIncompleteBuffer => 8u64.saturating_add(n),
        _ => 8,
    };
    let region = if offset == 8 { "header JSON" } else { "input" };
    InteropError::Malformed {
        format: F,
        region,
        offset,
        reason: e.to_string(),
    }
}

fn meta_usize(meta: &HashMap<String, String>, key: &str) -> Result<Option<usize>, InteropError> {
    meta.get(key)
        .map(|v| {
            v.trim().parse::<usize>().map_err(|_| InteropError::Malformed {
                format: F,
                region: "header JSON",
                offset: 8,
                reason: format!("__metadata__ {key} = {v:?} is not a non-negative integer"),
            })
        })
        .transpose()
}

/// Parses a layer list: a JSON list of integers or comma-separated integers.
fn parse_layers(v: &str) -> Option<Vec<u32>> {
    let s = v.trim();
    let s = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    if s.trim().is_empty() {
        return Some(Vec::new());
    }
    s.split(',').map(|p| p.trim().parse::<u32>().ok()).collect()
}

/// Decodes safetensors bytes holding a `routed_experts` tensor `[T, L, K]`.
pub fn decode(bytes: &[u8], opts: &ImportOptions) -> Result<DenseRoutes, InteropError> {
    let (n, md) = SafeTensors::read_metadata(bytes).map_err(|e| st_error(bytes, e))?;
    let Some(info) = md.info(TENSOR_NAME) else {
        let mut names: Vec<String> = md.tensors().into_keys().collect();
        names.sort();
        return Err(InteropError::Malformed {
            format: F,
            region: "header JSON",
            offset: 8,
            reason: format!("no tensor named {TENSOR_NAME:?} (tensors: {names:?})"),
        });
    };
    let dtype = int_dtype(info.dtype).ok_or_else(|| InteropError::Dtype {
        format: F,
        found: format!("{:?}", info.dtype),
        expected: "an integer dtype (I8 … I64, U8 … U64)".into(),
    })?;
    let [t, l, k] = info.shape[..] else {
        return Err(InteropError::Shape {
            format: F,
            reason: format!("{TENSOR_NAME} must be [T, L, K], found shape {:?}", info.shape),
        });
    };
    element_count(
        F,
        &[t as u64, l as u64, k as u64],
        opts.max_elements,
        "the tensor shape",
    )?;
    let (b, e) = info.data_offsets;
    let base = 8 + n;
    // read_metadata checked that the offsets lie inside the buffer and match shape × dtype.
    let data = bytes.get(base + b..base + e).ok_or_else(|| InteropError::Truncated {
        format: F,
        region: "input",
        offset: (base + b) as u64,
        needed: (e - b) as u64,
        available: bytes.len().saturating_sub(base + b) as u64,
    })?;
    let meta = md.metadata().clone().unwrap_or_default();
    let num_experts = meta_usize(&meta, "num_experts")?;
    let start = meta_usize(&meta, "start")?.unwrap_or(0) as u64;
    if let Some(mk) = meta_usize(&meta, "top_k")?
        && mk != k
    {
        return Err(InteropError::Shape {
            format: F,
            reason: format!("__metadata__ top_k = {mk} but {TENSOR_NAME} has K = {k}"),
        });
    }
    let layers = match meta.get("layers") {
        None => None,
        Some(v) => Some(parse_layers(v).ok_or_else(|| InteropError::Malformed {
            format: F,
            region: "header JSON",
            offset: 8,
            reason: format!("__metadata__ layers = {v:?} is not a list of layer ids"),
        })?),
    };
    let given_e = opts.num_experts.or(num_experts);
    let ids = decode_ints(F, data, dtype, (t, l, k), start, given_e)?;
    Ok(DenseRoutes {
        ids,
        start,
        num_experts,
        layers,
        source_dtype: Some(dtype),
    })
}

/// One tensor of a safetensors file as an [`NpyArray`](crate::npy::NpyArray) (shape, element type,
/// little-endian bytes), for inputs other than routes (logits): `name`, or the file's only
/// tensor. Element types: F64, F32, F16, BF16 and the integer types; others are
/// [`InteropError::Dtype`]. A missing name, or several tensors and no name, is an error listing
/// the tensors.
pub fn read_tensor(bytes: &[u8], name: Option<&str>) -> Result<crate::npy::NpyArray, InteropError> {
    use crate::npy::NpyDtype;
    let (n, md) = SafeTensors::read_metadata(bytes).map_err(|e| st_error(bytes, e))?;
    let mut names: Vec<String> = md.tensors().into_keys().collect();
    names.sort();
    let name = match (name, names.as_slice()) {
        (Some(w), _) => w.to_string(),
        (None, [only]) => only.clone(),
        (None, _) => {
            return Err(InteropError::Malformed {
                format: F,
                region: "header JSON",
                offset: 8,
                reason: format!("{} tensors ({names:?}): name the one to read", names.len()),
            });
        }
    };
    let info = md.info(&name).ok_or_else(|| InteropError::Malformed {
        format: F,
        region: "header JSON",
        offset: 8,
        reason: format!("no tensor named {name:?} (tensors: {names:?})"),
    })?;
    let dtype = match info.dtype {
        Dtype::F64 => NpyDtype::F64,
        Dtype::F32 => NpyDtype::F32,
        Dtype::F16 => NpyDtype::F16,
        Dtype::BF16 => NpyDtype::Bf16,
        Dtype::I8 => NpyDtype::I8,
        Dtype::I16 => NpyDtype::I16,
        Dtype::I32 => NpyDtype::I32,
        Dtype::I64 => NpyDtype::I64,
        Dtype::U8 | Dtype::BOOL => NpyDtype::U8,
        Dtype::U16 => NpyDtype::U16,
        Dtype::U32 => NpyDtype::U32,
        Dtype::U64 => NpyDtype::U64,
        other => {
            return Err(InteropError::Dtype {
                format: F,
                found: format!("{other:?} (tensor {name:?})"),
                expected: "F64, F32, F16, BF16 or an integer type".into(),
            });
        }
    };
    let (b, e) = info.data_offsets;
    let base = 8 + n;
    let data = bytes.get(base + b..base + e).ok_or_else(|| InteropError::Truncated {
        format: F,
        region: "input",
        offset: (base + b) as u64,
        needed: (e - b) as u64,
        available: bytes.len().saturating_sub(base + b) as u64,
    })?;
    Ok(crate::npy::NpyArray {
        shape: info.shape.clone(),
        dtype,
        data: data.to_vec(),
    })
}

/// Encodes `[T, L, K]` as a safetensors file with tensor `routed_experts` of `dtype` and the
/// metadata above (missing rows as `-1`: needs a signed dtype when rows are missing). Rows are
/// written from position 0.
pub fn encode(d: &DenseRoutes, dtype: IntDtype) -> Result<Vec<u8>, InteropError> {
    let d = d.clone().rebased_to_zero(F, super::DEFAULT_MAX_ELEMENTS)?;
    let data = encode_ints(F, &d.ids, 0, dtype)?;
    let (t, l, k) = d.ids.dim();
    let view = TensorView::new(st_dtype(dtype), vec![t, l, k], &data).map_err(|e| InteropError::Shape {
        format: F,
        reason: e.to_string(),
    })?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT_TAG.to_string());
    meta.insert("top_k".to_string(), k.to_string());
    meta.insert("start".to_string(), "0".to_string());
    let e = d.resolve_num_experts(F, None)?;
    meta.insert("num_experts".to_string(), e.to_string());
    let layers = d.resolve_layers(F, None)?;
    meta.insert(
        "layers".to_string(),
        format!("[{}]", layers.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
    );
    ::safetensors::serialize([(TENSOR_NAME, view)], Some(meta)).map_err(|e| InteropError::Shape {
        format: F,
        reason: e.to_string(),
    })
}
