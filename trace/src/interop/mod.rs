//! Import and export of routing traces in the formats other tools use, all converting to and from
//! the in-memory [`Trace`].
//!
//! | format | module | import | export | ids | missing rows |
//! |---|---|---|---|---|---|
//! | NumPy `.npy` `[T, L, K]` | [`npy`] | any integer dtype | int32 by default (any integer dtype that fits) | as stored | `-1` (signed dtypes) |
//! | safetensors, tensor `routed_experts` `[T, L, K]` | [`safetensors`] | any integer dtype | int32 by default | as stored | `-1` (signed dtypes) |
//! | SGLang: base64 of little-endian int32, flat `[T, L, K]` | [`sglang`] | L and K from the caller | yes | int32 | `-1` |
//! | NeMo Gym `nrlre1:<int8\|int16\|int32>:<T>x<L>x<K>:<base64>` | [`nrlre1`] | yes | narrowest dtype that holds E | as stored | `-1` |
//! | Fireworks R3/v1: base64 of a zstd frame (32-byte header, selector, `[L, K]` per replayed token) | [`r3v1`] | yes (L or K from the caller) | u8 when E ≤ 256, else u16 | as stored | unselected tokens |
//! | prime-rl msgpack `{data, shape: [T, L, K], dtype, start}` | [`prime_rl`] | yes | u8 when E ≤ 256, else u16 | as stored | rows before `start` / after the end |
//!
//! ## The common form
//!
//! Every format holds **one sequence** as a `[T, L, K]` array; importers return a
//! [`DenseRoutes`] and [`DenseRoutes::to_trace`] turns it into a trace with these defaults
//! (all set by [`ImportOptions`]):
//!
//! * the sequence id is `0` ([`ImportOptions::seq`]);
//! * row `t` is position `start + t`, where `start` is the format's own start offset (prime-rl
//!   `start`, R3/v1 suffix start, safetensors metadata `start`) or `0`;
//! * the L layers are model layers `0..L` unless the caller passes layer ids
//!   ([`ImportOptions::layers`]) or the format records them (safetensors metadata `layers`);
//! * E is the caller's ([`ImportOptions::num_experts`]) or the format's (safetensors metadata
//!   `num_experts`); when neither gives it, the smallest E that holds every id (`max id + 1`, at
//!   least K). A caller value that disagrees with the file's is an error, never silently picked.
//!
//! Exporting ([`DenseRoutes::from_trace`]) takes one sequence of a trace (a trace with several
//! sequences must name one: [`ExportOptions::seq`]) over the trace's layer map. Formats without a start offset (npy,
//! safetensors, SGLang, NeMo Gym) are written from position 0, earlier positions as missing rows.
//!
//! ## Validation
//!
//! Every id is checked: negative values other than `-1`, ids `≥ E` (or beyond any possible E),
//! a row naming an expert twice (an all-zero row is the common case: zero padding), and rows that
//! are only partly missing are typed errors ([`InteropError`]) with the element index (flat index
//! into `[T, L, K]`, and token / layer / slot) — never routed to expert 0, never wrapped. A
//! capture without a single recorded row (`T = 0`, a zero-length payload, every row `-1`) is
//! [`InteropError::Empty`]: an engine that captured nothing must not pass as an empty trace.
//! Structural errors carry the byte offset where they were found. Decoders bound their memory by
//! [`ImportOptions::max_elements`] and by the input actually present, never by a length the input
//! claims.

mod dense;
mod dtype;
mod error;
mod format;
mod options;

pub mod npy;
pub mod nrlre1;
pub mod prime_rl;
pub mod r3v1;
pub mod safetensors;
pub mod sglang;

pub use dense::{DenseCheck, DenseRoutes};
pub use dtype::IntDtype;
pub use error::{Element, InteropError};
pub use format::Format;
pub use options::{DEFAULT_MAX_ELEMENTS, ExportOptions, ImportOptions};

pub(crate) use dtype::{decode_ints, encode_ints};
pub(crate) use error::element_at;

use crate::trace::{OpenOptions, Trace, TraceFile};

/// Checked element count of a shape, bounded by `limit`.
pub(crate) fn element_count(format: Format, dims: &[u64], limit: u64, reason: &str) -> Result<usize, InteropError> {
    let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    match n {
        Some(n) if n <= limit && usize::try_from(n).is_ok() => Ok(n as usize),
        n => Err(InteropError::TooLarge {
            format,
            elements: n.unwrap_or(u64::MAX),
            limit,
            reason: reason.to_string(),
        }),
    }
}

/// Refuses an L or K no trace can hold (L ≤ [`crate::trace::MAX_LAYERS`], K ≤
/// [`moe_router_core::MAX_EXPERTS`]), even when T = 0 makes the array empty: later steps allocate per
/// layer and per slot.
pub(crate) fn check_lk(format: Format, l: usize, k: usize) -> Result<(), InteropError> {
    if l > crate::trace::MAX_LAYERS || k > moe_router_core::MAX_EXPERTS {
        return Err(InteropError::Shape {
            format,
            reason: format!(
                "L = {l}, K = {k}: a trace holds at most {} layers and K ≤ {}",
                crate::trace::MAX_LAYERS,
                moe_router_core::MAX_EXPERTS
            ),
        });
    }
    Ok(())
}

/// Trims ASCII whitespace at both ends.
pub(crate) fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// Decodes standard base64 (padding optional; surrounding whitespace ignored), reporting the
/// offset of a bad byte in the text.
pub(crate) fn decode_base64(format: Format, text: &[u8], base_offset: u64) -> Result<Vec<u8>, InteropError> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    ENGINE.decode(text).map_err(|e| {
        let (offset, reason) = match e {
            base64::DecodeError::InvalidByte(o, b) => (o as u64, format!("invalid base64 byte {b:#04x}")),
            base64::DecodeError::InvalidLength(n) => (
                n as u64,
                format!(
                    "invalid base64 length ({n} symbols; a base64 text has 4·n symbols, or 4·n+2 / 4·n+3 unpadded)"
                ),
            ),
            base64::DecodeError::InvalidLastSymbol(o, b) => (o as u64, format!("invalid last base64 symbol {b:#04x}")),
            base64::DecodeError::InvalidPadding => (text.len() as u64, "invalid base64 padding".to_string()),
        };
        InteropError::Malformed {
            format,
            region: "input",
            offset: base_offset + offset,
            reason,
        }
    })
}

/// Standard base64 with padding.
pub(crate) fn encode_base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes `bytes` of a non-`.mrt` format into the common form.
pub fn decode(format: Format, bytes: &[u8], opts: &ImportOptions) -> Result<DenseRoutes, InteropError> {
    match format {
        Format::Mrt => {
            let t = import_mrt(bytes)?;
            DenseRoutes::from_trace(format, &t, None, opts.max_elements)
        }
        Format::Npy => npy::decode(bytes, opts),
        Format::Safetensors => safetensors::decode(bytes, opts),
        Format::Sglang => sglang::decode(bytes, opts),
        Format::Nrlre1 => nrlre1::decode(bytes, opts),
        Format::R3v1 => r3v1::decode(bytes, opts),
        Format::PrimeRl => prime_rl::decode(bytes, opts),
    }
}

fn import_mrt(bytes: &[u8]) -> Result<Trace, InteropError> {
    Ok(TraceFile::from_bytes(bytes.to_vec(), OpenOptions::default())?.to_trace()?)
}

/// Imports `bytes` of any format into a [`Trace`] (an `.mrt` file is read as is; the options
/// apply to the other formats).
pub fn import(format: Format, bytes: &[u8], opts: &ImportOptions) -> Result<Trace, InteropError> {
    match format {
        Format::Mrt => import_mrt(bytes),
        _ => decode(format, bytes, opts)?.to_trace(format, opts),
    }
}

/// Exports one sequence of `trace` (see [`ExportOptions`]) to bytes of a non-`.mrt` format (use
/// [`Trace::write_file`] for `.mrt`). Text formats (SGLang, NeMo Gym, R3/v1) are returned as
/// their ASCII text, without a trailing newline.
pub fn export(format: Format, trace: &Trace, opts: &ExportOptions) -> Result<Vec<u8>, InteropError> {
    let max = opts.max_elements;
    match format {
        Format::Mrt => Err(InteropError::Unrepresentable {
            format,
            reason: "write .mrt files with Trace::write_file".into(),
        }),
        Format::Npy => npy::encode(
            &DenseRoutes::from_trace_from_zero(format, trace, opts.seq, max)?,
            opts.dtype.unwrap_or(IntDtype::I32),
        ),
        Format::Safetensors => safetensors::encode(
            &DenseRoutes::from_trace_from_zero(format, trace, opts.seq, max)?,
            opts.dtype.unwrap_or(IntDtype::I32),
        ),
        Format::Sglang => {
            Ok(sglang::encode(&DenseRoutes::from_trace_from_zero(format, trace, opts.seq, max)?)?.into_bytes())
        }
        Format::Nrlre1 => {
            let d = DenseRoutes::from_trace_from_zero(format, trace, opts.seq, max)?;
            let dt = opts
                .dtype
                .unwrap_or_else(|| IntDtype::narrowest_signed(trace.header().num_experts()));
            Ok(nrlre1::encode(&d, dt)?.into_bytes())
        }
        Format::R3v1 => Ok(r3v1::encode(&DenseRoutes::from_trace(format, trace, opts.seq, max)?)?.into_bytes()),
        Format::PrimeRl => prime_rl::encode(&DenseRoutes::from_trace(format, trace, opts.seq, max)?),
    }
}
