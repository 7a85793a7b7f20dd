//! Fireworks R3/v1 (`eval_protocol` `r3_deserializer`): base64 (standard alphabet) of one zstd
//! frame whose content is
//!
//! ```text
//! offset  size  field (little-endian, struct "<4sBBBBIIIIQ", 32 bytes)
//!      0     4  magic "R3V1"
//!      4     1  version = 1
//!      5     1  selector mode: 0 all tokens, 1 suffix (tokens replay_start.. total), 2 bitmap
//!      6     1  routing dtype: 1 = u8, 2 = u16 (little-endian)
//!      7     1  flags (written 0, ignored on read)
//!      8     4  total token count
//!     12     4  replayed token count
//!     16     4  replay start token (0 for mode 0, the suffix start for mode 1, the first
//!               selected token for mode 2 — ignored on read in mode 2)
//!     20     4  selector byte length (0 for modes 0 and 1; ceil(total / 8) for mode 2)
//!     24     8  matrix byte length (replayed × L × K × dtype size)
//!     32        selector bytes (bitmap: token i is bit i % 8 of byte i / 8, LSB first)
//!               then one [L, K] matrix per replayed token, in token order
//! ```
//!
//! Unselected tokens are missing rows. The matrices do not record L and K separately: the
//! caller gives L or K (or both) and the other follows from the matrix size.

use super::{DenseRoutes, Format, ImportOptions, IntDtype, InteropError, decode_base64, decode_ints, element_count};
use crate::trace::MISSING_ID;
use ndarray::{Array3, s};
use std::io::Read;

const F: Format = Format::R3v1;
const CONTENT: &str = "zstd frame content";

/// The magic at the start of the frame content.
pub const MAGIC: &[u8; 4] = b"R3V1";
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 32;

/// Largest bitmap selector the exporter writes (2²⁶ bytes: 512 M tokens).
const MAX_SELECTOR_BYTES: usize = 1 << 26;

/// Selector modes.
const MODE_ALL: u8 = 0;
const MODE_SUFFIX: u8 = 1;
const MODE_BITMAP: u8 = 2;

fn bad(offset: u64, reason: impl Into<String>) -> InteropError {
    InteropError::Malformed {
        format: F,
        region: CONTENT,
        offset,
        reason: reason.into(),
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// The parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version (1).
    pub version: u8,
    /// Selector mode (0 all, 1 suffix, 2 bitmap).
    pub selector_mode: u8,
    /// Routing dtype code (1 u8, 2 u16).
    pub routing_dtype: u8,
    /// Flags.
    pub flags: u8,
    /// Tokens in the sequence.
    pub total_tokens: u32,
    /// Tokens with a matrix.
    pub replayed_tokens: u32,
    /// First replayed token (suffix mode).
    pub replay_start: u32,
    /// Bytes of the selector.
    pub selector_bytes: u32,
    /// Bytes of the matrices.
    pub matrix_bytes: u64,
}

impl Header {
    fn parse(b: &[u8; HEADER_BYTES]) -> Result<Header, InteropError> {
        if &b[..4] != MAGIC {
            return Err(bad(0, format!("bad magic {:02x?} (expected \"R3V1\")", &b[..4])));
        }
        let h = Header {
            version: b[4],
            selector_mode: b[5],
            routing_dtype: b[6],
            flags: b[7],
            total_tokens: u32_at(b, 8),
            replayed_tokens: u32_at(b, 12),
            replay_start: u32_at(b, 16),
            selector_bytes: u32_at(b, 20),
            matrix_bytes: u64::from_le_bytes(b[24..32].try_into().unwrap_or([0; 8])),
        };
        if h.version != 1 {
            return Err(bad(
                4,
                format!("unsupported version {} (this reader supports 1)", h.version),
            ));
        }
        if h.routing_dtype != 1 && h.routing_dtype != 2 {
            return Err(bad(
                6,
                format!("routing dtype {} (expected 1 = u8 or 2 = u16)", h.routing_dtype),
            ));
        }
        if h.replayed_tokens > h.total_tokens {
            return Err(bad(
                12,
                format!("{} replayed tokens of {} total", h.replayed_tokens, h.total_tokens),
            ));
        }
        match h.selector_mode {
            MODE_ALL => {
                if h.replayed_tokens != h.total_tokens || h.replay_start != 0 || h.selector_bytes != 0 {
                    return Err(bad(
                        8,
                        format!(
                            "selector mode 0 (all) needs replayed = total ({} vs {}), start 0 ({}) and no selector ({} bytes)",
                            h.replayed_tokens, h.total_tokens, h.replay_start, h.selector_bytes
                        ),
                    ));
                }
            }
            MODE_SUFFIX => {
                if u64::from(h.replay_start) + u64::from(h.replayed_tokens) != u64::from(h.total_tokens)
                    || h.selector_bytes != 0
                {
                    return Err(bad(
                        16,
                        format!(
                            "selector mode 1 (suffix) needs start + replayed = total ({} + {} vs {}) and no selector ({} bytes)",
                            h.replay_start, h.replayed_tokens, h.total_tokens, h.selector_bytes
                        ),
                    ));
                }
            }
            MODE_BITMAP => {
                let need = u64::from(h.total_tokens).div_ceil(8);
                if u64::from(h.selector_bytes) != need {
                    return Err(bad(
                        20,
                        format!(
                            "selector mode 2 (bitmap) over {} tokens needs {need} selector bytes, header says {}",
                            h.total_tokens, h.selector_bytes
                        ),
                    ));
                }
            }
            m => {
                return Err(bad(
                    5,
                    format!("selector mode {m} (expected 0 all, 1 suffix or 2 bitmap)"),
                ));
            }
        }
        Ok(h)
    }

    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..4].copy_from_slice(MAGIC);
        b[4] = self.version;
        b[5] = self.selector_mode;
        b[6] = self.routing_dtype;
        b[7] = self.flags;
        b[8..12].copy_from_slice(&self.total_tokens.to_le_bytes());
        b[12..16].copy_from_slice(&self.replayed_tokens.to_le_bytes());
        b[16..20].copy_from_slice(&self.replay_start.to_le_bytes());
        b[20..24].copy_from_slice(&self.selector_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.matrix_bytes.to_le_bytes());
        b
    }
}

/// Reads exactly `n` bytes (growing the buffer only as data arrives), reporting truncation.
fn read_exact_bounded(r: &mut impl Read, n: u64, offset: u64, what: &str) -> Result<Vec<u8>, InteropError> {
    let mut v = Vec::new();
    r.take(n)
        .read_to_end(&mut v)
        .map_err(|e| bad(offset + v.len() as u64, format!("zstd: {e} (reading the {what})")))?;
    if (v.len() as u64) < n {
        return Err(InteropError::Truncated {
            format: F,
            region: CONTENT,
            offset: offset + v.len() as u64,
            needed: n - v.len() as u64,
            available: 0,
        });
    }
    Ok(v)
}

/// Decodes R3/v1 base64 text. L or K comes from `opts` (the other follows from the matrix size);
/// rows of unselected tokens are missing; rows start at the first token of the span the header
/// covers (0, or the suffix start).
pub fn decode(text: &[u8], opts: &ImportOptions) -> Result<DenseRoutes, InteropError> {
    let lead = text.len() - text.trim_ascii_start().len();
    let frame = decode_base64(F, text.trim_ascii(), lead as u64)?;
    let mut dec = zstd::stream::read::Decoder::with_buffer(&frame[..])
        .map_err(|e| bad(0, format!("zstd: {e}")))?
        .single_frame();
    let hb = read_exact_bounded(&mut dec, HEADER_BYTES as u64, 0, "header")?;
    let h = Header::parse(hb.as_slice().try_into().map_err(|_| bad(0, "short header"))?)?;
    let w = usize::from(h.routing_dtype);
    let dtype = if w == 1 { IntDtype::U8 } else { IntDtype::U16 };
    let replayed = u64::from(h.replayed_tokens);
    // Shape of one matrix.
    let per_token_ids = if let Some(per) = h.matrix_bytes.checked_div(replayed) {
        if per * replayed != h.matrix_bytes || per == 0 || per % w as u64 != 0 {
            return Err(bad(
                24,
                format!(
                    "matrix byte length {} is not {replayed} replayed tokens × L × K × {w} bytes",
                    h.matrix_bytes
                ),
            ));
        }
        Some(per / w as u64)
    } else {
        if h.matrix_bytes != 0 {
            return Err(bad(
                24,
                format!("{} matrix bytes for 0 replayed tokens", h.matrix_bytes),
            ));
        }
        None
    };
    let (l, k) = match (opts.num_layers, opts.top_k, per_token_ids) {
        (Some(l), Some(k), Some(n)) if (l as u64).checked_mul(k as u64) != Some(n) => {
            return Err(InteropError::Shape {
                format: F,
                reason: format!("each token holds {n} ids, not L × K = {l} × {k}"),
            });
        }
        (Some(l), Some(k), _) => (l, k),
        (Some(l), None, Some(n)) if l > 0 && n % l as u64 == 0 => (l, (n / l as u64) as usize),
        (None, Some(k), Some(n)) if k > 0 && n % k as u64 == 0 => ((n / k as u64) as usize, k),
        (Some(_), None, Some(n)) | (None, Some(_), Some(n)) => {
            return Err(InteropError::Shape {
                format: F,
                reason: format!("each token holds {n} ids, which the given L or K does not divide"),
            });
        }
        (_, _, n) => {
            return Err(InteropError::MissingOption {
                format: F,
                what: "the split of each token's matrix into [L, K]",
                hint: match n {
                    Some(n) => format!("each token holds {n} ids; pass L or K (CLI: --num-layers L or --top-k K)"),
                    None => "no token is replayed; pass L and K (CLI: --num-layers L --top-k K)".into(),
                },
            });
        }
    };
    if l == 0 || k == 0 {
        return Err(InteropError::Shape {
            format: F,
            reason: format!("L = {l} and K = {k} must both be at least 1"),
        });
    }
    let (first, t) = match h.selector_mode {
        MODE_ALL => (0u64, u64::from(h.total_tokens)),
        MODE_SUFFIX => (u64::from(h.replay_start), replayed),
        _ => (0, u64::from(h.total_tokens)),
    };
    element_count(
        F,
        &[t, l as u64, k as u64],
        opts.max_elements,
        "the header's token count",
    )?;
    element_count(
        F,
        &[h.matrix_bytes / w as u64],
        opts.max_elements,
        "the header's matrix length",
    )?;
    let sel_off = HEADER_BYTES as u64;
    let selector = read_exact_bounded(&mut dec, u64::from(h.selector_bytes), sel_off, "selector")?;
    let mat_off = sel_off + u64::from(h.selector_bytes);
    let matrices = read_exact_bounded(&mut dec, h.matrix_bytes, mat_off, "matrices")?;
    let mut extra = [0u8; 1];
    match dec.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => {
            return Err(bad(
                mat_off + h.matrix_bytes,
                "bytes after the matrices (the header's lengths do not cover the frame)",
            ));
        }
        Err(e) => return Err(bad(mat_off + h.matrix_bytes, format!("zstd: {e}"))),
    }
    let replayed_ids = decode_ints(F, &matrices, dtype, (replayed as usize, l, k), first, opts.num_experts)?;
    let ids = if h.selector_mode == MODE_BITMAP {
        let total = h.total_tokens as usize;
        let selected: Vec<usize> = (0..total).filter(|&i| selector[i / 8] >> (i % 8) & 1 == 1).collect();
        if let Some(i) = (total..selector.len() * 8).find(|&i| selector[i / 8] >> (i % 8) & 1 == 1) {
            return Err(bad(
                sel_off + (i / 8) as u64,
                format!("bitmap selects token {i} ≥ total {total}"),
            ));
        }
        if selected.len() as u64 != replayed {
            return Err(bad(
                sel_off,
                format!(
                    "bitmap selects {} tokens, header says {replayed} replayed",
                    selected.len()
                ),
            ));
        }
        let mut ids = Array3::from_elem((total, l, k), MISSING_ID);
        for (j, &i) in selected.iter().enumerate() {
            ids.slice_mut(s![i, .., ..]).assign(&replayed_ids.slice(s![j, .., ..]));
        }
        ids
    } else {
        replayed_ids
    };
    Ok(DenseRoutes {
        ids,
        start: first,
        num_experts: None,
        layers: None,
        source_dtype: Some(dtype),
    })
}

/// Encodes one sequence as R3/v1 text. Tokens with a row in every layer are replayed, tokens
/// with none are unselected; a token present in some layers only cannot be expressed (error).
/// Selector mode: all when every token is present, suffix when the present tokens are the last
/// ones, else a bitmap. Ids are u8 when E ≤ 256, else u16.
pub fn encode(d: &DenseRoutes) -> Result<String, InteropError> {
    let (t, l, k) = d.ids.dim();
    let e = d.resolve_num_experts(F, None)?;
    let (dtype, code) = if e <= 256 {
        (IntDtype::U8, 1u8)
    } else {
        (IntDtype::U16, 2u8)
    };
    let total = d
        .start
        .checked_add(t as u64)
        .filter(|&n| n <= u64::from(u32::MAX))
        .ok_or_else(|| InteropError::Unrepresentable {
            format: F,
            reason: format!("{} tokens exceed the u32 token count", d.start.saturating_add(t as u64)),
        })? as usize;
    let start = d.start as usize;
    // Which tokens are present (all layers) — a token of partly missing layers is refused.
    // Tokens before `start` are absent.
    let mut replayed: Vec<usize> = Vec::new();
    for ti in 0..t {
        let tok = d.ids.slice(s![ti, .., ..]);
        let rows_missing = tok.outer_iter().filter(|r| r.iter().all(|&x| x == MISSING_ID)).count();
        if rows_missing == 0 {
            replayed.push(start + ti);
        } else if rows_missing < l {
            return Err(InteropError::Unrepresentable {
                format: F,
                reason: format!(
                    "token {} has routes in {} of {l} layers; R3/v1 replays whole tokens only",
                    start + ti,
                    l - rows_missing
                ),
            });
        }
    }
    let first = replayed.first().copied().unwrap_or(total);
    let suffix = replayed.len() == total - first;
    let (mode, replay_start, selector) = if replayed.len() == total {
        (MODE_ALL, 0u32, Vec::new())
    } else if suffix {
        (MODE_SUFFIX, first as u32, Vec::new())
    } else {
        if total.div_ceil(8) > MAX_SELECTOR_BYTES {
            return Err(InteropError::Unrepresentable {
                format: F,
                reason: format!(
                    "a bitmap over {total} tokens exceeds {MAX_SELECTOR_BYTES} selector bytes; export a shorter span"
                ),
            });
        }
        let mut sel = vec![0u8; total.div_ceil(8)];
        for &i in &replayed {
            sel[i / 8] |= 1 << (i % 8);
        }
        (MODE_BITMAP, first as u32, sel)
    };
    let mut matrices = Vec::with_capacity(replayed.len() * l * k * dtype.size());
    for &i in &replayed {
        for &id in d.ids.slice(s![i - start, .., ..]).iter() {
            dtype.write(i128::from(id), &mut matrices);
        }
    }
    if let Some(&bad_id) = d.ids.iter().find(|&&x| x != MISSING_ID && x as usize >= e) {
        return Err(InteropError::Unrepresentable {
            format: F,
            reason: format!("id {bad_id} is not below num_experts = {e}"),
        });
    }
    let h = Header {
        version: 1,
        selector_mode: mode,
        routing_dtype: code,
        flags: 0,
        total_tokens: total as u32,
        replayed_tokens: replayed.len() as u32,
        replay_start,
        selector_bytes: selector.len() as u32,
        matrix_bytes: matrices.len() as u64,
    };
    let mut content = Vec::with_capacity(HEADER_BYTES + selector.len() + matrices.len());
    content.extend_from_slice(&h.encode());
    content.extend_from_slice(&selector);
    content.extend_from_slice(&matrices);
    let frame = zstd::bulk::Compressor::new(3)
        .and_then(|mut c| c.include_checksum(true).and_then(|()| c.compress(&content)))
        .map_err(|e| InteropError::Unrepresentable {
            format: F,
            reason: format!("zstd: {e}"),
        })?;
    Ok(super::encode_base64(&frame))
}
