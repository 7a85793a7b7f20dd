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
//! sequences must name one) over the trace's layer map. Formats without a start offset (npy,
//! safetensors, SGLang, NeMo Gym) are written from position 0, earlier positions as missing rows.
//!
//! ## Validation
//!
//! Every id is checked: negative values other than `-1`, ids `≥ E` (or beyond any possible E),
//! a row naming an expert twice (an all-zero row is the common case: zero padding), and rows that
//! are only partly missing are typed errors ([`InteropError`]) with the element index (flat index
//! into `[T, L, K]`, and token / layer / slot) — never routed to expert 0, never wrapped.
//! Structural errors carry the byte offset where they were found. Decoders bound their memory by
//! [`ImportOptions::max_elements`] and by the input actually present, never by a length the input
//! claims.

pub mod npy;
pub mod nrlre1;
pub mod prime_rl;
pub mod r3v1;
pub mod safetensors;
pub mod sglang;

use crate::layout::{LayerId, SeqId};
use crate::trace::{MISSING_ID, OpenOptions, Trace, TraceError, TraceFile, TraceHeader};
use ndarray::{Array3, s};
use std::fmt;
use thiserror::Error;

/// Default bound on the elements (`T × L × K`) one import or export may hold in memory (2³⁰:
/// 4 GiB of `u32` ids).
pub const DEFAULT_MAX_ELEMENTS: u64 = 1 << 30;

/// The largest id any trace can hold (E ≤ [`crate::MAX_EXPERTS`]).
const MAX_ID: i128 = crate::MAX_EXPERTS as i128 - 1;

/// The interchange formats (and the project's own `.mrt` file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The project's trace file (`.mrt`, see `docs/trace-format.md`).
    Mrt,
    /// NumPy `.npy` `[T, L, K]`.
    Npy,
    /// safetensors with tensor `routed_experts` `[T, L, K]`.
    Safetensors,
    /// SGLang `routed_experts`: base64 of little-endian int32, flat `[T, L, K]`.
    Sglang,
    /// NeMo Gym envelope `nrlre1:<dtype>:<T>x<L>x<K>:<base64>`.
    Nrlre1,
    /// Fireworks R3/v1: base64 of a zstd frame.
    R3v1,
    /// prime-rl msgpack `{data, shape, dtype, start}`.
    PrimeRl,
}

impl Format {
    /// Every format, in CLI order.
    pub const ALL: [Format; 7] = [
        Format::Mrt,
        Format::Npy,
        Format::Safetensors,
        Format::Sglang,
        Format::Nrlre1,
        Format::R3v1,
        Format::PrimeRl,
    ];

    /// The name used on the command line (`mrt`, `npy`, `safetensors`, `sglang`, `nrlre1`,
    /// `r3v1`, `prime-rl`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Mrt => "mrt",
            Format::Npy => "npy",
            Format::Safetensors => "safetensors",
            Format::Sglang => "sglang",
            Format::Nrlre1 => "nrlre1",
            Format::R3v1 => "r3v1",
            Format::PrimeRl => "prime-rl",
        }
    }

    /// Parses [`Format::name`] (case-insensitive; `prime_rl` and `primerl` are accepted too).
    pub fn from_name(s: &str) -> Option<Format> {
        let s = s.to_ascii_lowercase().replace('_', "-");
        match s.as_str() {
            "primerl" => Some(Format::PrimeRl),
            _ => Format::ALL.into_iter().find(|f| f.name() == s),
        }
    }

    /// The format a file extension names unambiguously: `.mrt`, `.npy`, `.safetensors`,
    /// `.msgpack` (prime-rl). Other extensions (the text formats have none of their own) give
    /// `None`.
    pub fn from_extension(ext: &str) -> Option<Format> {
        match ext.to_ascii_lowercase().as_str() {
            "mrt" => Some(Format::Mrt),
            "npy" => Some(Format::Npy),
            "safetensors" => Some(Format::Safetensors),
            "msgpack" => Some(Format::PrimeRl),
            _ => None,
        }
    }

    /// The format of a path by its extension (see [`Format::from_extension`]).
    pub fn from_path(path: &std::path::Path) -> Option<Format> {
        path.extension()
            .and_then(|e| e.to_str())
            .and_then(Format::from_extension)
    }

    /// Guesses the format from the content: the `.mrt`, `.npy` and safetensors headers, the
    /// `nrlre1:` prefix, base64 of a zstd frame (R3/v1), base64 otherwise (SGLang), and a
    /// msgpack map (prime-rl). `None` when nothing fits.
    pub fn sniff(bytes: &[u8]) -> Option<Format> {
        if bytes.starts_with(&[0x89, b'M', b'R', b'T']) {
            return Some(Format::Mrt);
        }
        if bytes.starts_with(b"\x93NUMPY") {
            return Some(Format::Npy);
        }
        let text = trim_ascii(bytes);
        if text.starts_with(b"nrlre1:") {
            return Some(Format::Nrlre1);
        }
        // A msgpack fixmap / map16 / map32 holding a "data" key.
        if matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) && bytes.windows(5).any(|w| w == b"\xa4data") {
            return Some(Format::PrimeRl);
        }
        if bytes.len() >= 9 {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
            if bytes[8] == b'{' && n >= 2 && n < bytes.len() as u64 {
                return Some(Format::Safetensors);
            }
        }
        if !text.is_empty()
            && text
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'-' | b'_'))
        {
            // base64 of the zstd magic 28 b5 2f fd starts with "KLUv".
            return Some(if text.starts_with(b"KLUv") {
                Format::R3v1
            } else {
                Format::Sglang
            });
        }
        None
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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
    fn write(self, v: i128, out: &mut Vec<u8>) {
        let b = (v as i64).to_le_bytes();
        out.extend_from_slice(&b[..self.size()]);
    }
}

impl fmt::Display for IntDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an element sits in a `[T, L, K]` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Element {
    /// Flat index into the `[T, L, K]` array (C order).
    pub index: u64,
    /// Token position (the array's start offset plus the row).
    pub token: u64,
    /// Index along the L axis.
    pub layer_index: usize,
    /// Slot within the row (0..K).
    pub slot: usize,
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "element {} (token {}, layer index {}, slot {})",
            self.index, self.token, self.layer_index, self.slot
        )
    }
}

/// An import or export error. Structural problems carry the byte offset where they were found;
/// id problems carry the [`Element`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InteropError {
    /// The input is structurally wrong at a byte offset.
    #[error("{format}: malformed {region} at byte offset {offset}: {reason}")]
    Malformed {
        /// The format being read.
        format: Format,
        /// Which bytes the offset counts in ("input", "base64 payload", "zstd frame content").
        region: &'static str,
        /// Byte offset within the region.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The input ends early.
    #[error("{format}: truncated {region}: needed {needed} bytes at byte offset {offset}, only {available} available")]
    Truncated {
        /// The format being read.
        format: Format,
        /// Which bytes the offset counts in.
        region: &'static str,
        /// Where the missing bytes start.
        offset: u64,
        /// Bytes needed from there.
        needed: u64,
        /// Bytes there are.
        available: u64,
    },
    /// The array's shape is unusable or disagrees with its data.
    #[error("{format}: bad shape: {reason}")]
    Shape {
        /// The format.
        format: Format,
        /// What is wrong.
        reason: String,
    },
    /// The element type is not an integer type the format allows.
    #[error("{format}: unsupported dtype {found} (expected {expected})")]
    Dtype {
        /// The format.
        format: Format,
        /// What was found.
        found: String,
        /// What is allowed.
        expected: String,
    },
    /// The format does not record something the conversion needs: the caller must give it.
    #[error("{format}: {what} is not recorded in this format: {hint}")]
    MissingOption {
        /// The format.
        format: Format,
        /// What is needed.
        what: &'static str,
        /// How to give it.
        hint: String,
    },
    /// A value given by the caller disagrees with the one in the file.
    #[error("{format}: {what} is {in_file} in the file but {given} was given")]
    Conflict {
        /// The format.
        format: Format,
        /// The setting.
        what: &'static str,
        /// Value in the file.
        in_file: String,
        /// Value given by the caller.
        given: String,
    },
    /// The array would exceed the memory bound.
    #[error("{format}: {elements} elements exceed the limit of {limit} ({reason})")]
    TooLarge {
        /// The format.
        format: Format,
        /// Elements needed (saturated).
        elements: u64,
        /// The bound ([`ImportOptions::max_elements`]).
        limit: u64,
        /// Where the size comes from.
        reason: String,
    },
    /// A negative value other than the missing marker `-1`.
    #[error("{format}: {at}: negative value {value} (only -1, meaning missing, is allowed)")]
    Negative {
        /// The format.
        format: Format,
        /// Where.
        at: Element,
        /// The value.
        value: i128,
    },
    /// An id `≥ E`.
    #[error("{format}: {at}: id {value} is out of range (num_experts = {num_experts})")]
    IdOutOfRange {
        /// The format.
        format: Format,
        /// Where.
        at: Element,
        /// The id.
        value: i128,
        /// E (or the largest E a trace supports when E is not known).
        num_experts: usize,
    },
    /// A row names an expert twice.
    #[error("{format}: {at}: expert {id} appears twice in the row{hint}")]
    DuplicateId {
        /// The format.
        format: Format,
        /// The second occurrence.
        at: Element,
        /// The repeated id.
        id: u32,
        /// "" or a hint about all-zero rows.
        hint: String,
    },
    /// Some but not all slots of a row are `-1`.
    #[error("{format}: {at}: row is partly missing (-1 in some slots only; a missing row is -1 in every slot)")]
    PartialMissing {
        /// The format.
        format: Format,
        /// The first missing slot of the row.
        at: Element,
    },
    /// A value does not fit the output type.
    #[error("{format}: {at}: value {value} does not fit {target} (refused, never wrapped)")]
    DoesNotFit {
        /// The format.
        format: Format,
        /// Where.
        at: Element,
        /// The value (`-1` for a missing row).
        value: i128,
        /// The output type.
        target: String,
    },
    /// The trace holds something the output format cannot express.
    #[error("{format}: cannot represent this trace: {reason}")]
    Unrepresentable {
        /// The format.
        format: Format,
        /// What cannot be expressed, and what to do.
        reason: String,
    },
    /// E, K or the layer map are unusable.
    #[error("{format}: {reason}")]
    Header {
        /// The format.
        format: Format,
        /// What is wrong.
        reason: String,
    },
    /// A `.npy` error.
    #[error("npy: {0}")]
    Npy(#[from] crate::npy::NpyError),
    /// A trace-model or `.mrt` error.
    #[error("{0}")]
    Trace(#[from] TraceError),
}

/// Caller-supplied facts for importing (see the module docs for the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// E. Needed for range checks when the format does not record it.
    pub num_experts: Option<usize>,
    /// L, for formats that do not record the shape (SGLang; R3/v1 needs L or K).
    pub num_layers: Option<usize>,
    /// K, for formats that do not record the shape (SGLang; R3/v1 needs L or K).
    pub top_k: Option<usize>,
    /// The model layer ids of the L axis (strictly ascending). Default: the format's, else `0..L`.
    pub layers: Option<Vec<u32>>,
    /// The sequence id of the imported rows (default 0).
    pub seq: SeqId,
    /// Bound on `T × L × K` held in memory (default [`DEFAULT_MAX_ELEMENTS`]).
    pub max_elements: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            num_experts: None,
            num_layers: None,
            top_k: None,
            layers: None,
            seq: SeqId(0),
            max_elements: DEFAULT_MAX_ELEMENTS,
        }
    }
}

impl ImportOptions {
    /// Sets E.
    pub fn with_num_experts(mut self, e: usize) -> Self {
        self.num_experts = Some(e);
        self
    }
    /// Sets L and K (SGLang, R3/v1).
    pub fn with_shape(mut self, num_layers: usize, top_k: usize) -> Self {
        self.num_layers = Some(num_layers);
        self.top_k = Some(top_k);
        self
    }
    /// Sets the layer ids of the L axis.
    pub fn with_layers(mut self, layers: Vec<u32>) -> Self {
        self.layers = Some(layers);
        self
    }
    /// Sets the memory bound.
    pub fn with_max_elements(mut self, n: u64) -> Self {
        self.max_elements = n;
        self
    }
}

/// Choices for exporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Which sequence to export (required when the trace has several).
    pub seq: Option<SeqId>,
    /// Element type for npy / safetensors / NeMo Gym (default: int32 for npy and safetensors,
    /// the narrowest that holds E for NeMo Gym). Values that do not fit are refused.
    pub dtype: Option<IntDtype>,
    /// Bound on `T × L × K` held in memory (default [`DEFAULT_MAX_ELEMENTS`]).
    pub max_elements: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            seq: None,
            dtype: None,
            max_elements: DEFAULT_MAX_ELEMENTS,
        }
    }
}

/// One sequence of routes as a `[T, L, K]` array: the common form of every interchange format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseRoutes {
    /// `[T, L, K]` ids; a row of [`MISSING_ID`] in every slot is missing.
    pub ids: Array3<u32>,
    /// Token position of row 0.
    pub start: u64,
    /// E, when the format records it.
    pub num_experts: Option<usize>,
    /// Model layer ids of the L axis, when the format records them.
    pub layers: Option<Vec<u32>>,
    /// The element type the input stored the ids in, when decoded from a format.
    pub source_dtype: Option<IntDtype>,
}

/// What [`DenseRoutes::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenseCheck {
    /// Rows with K valid ids.
    pub present_rows: u64,
    /// Rows missing in every slot.
    pub missing_rows: u64,
    /// Rows with an id `≥ E`.
    pub out_of_range_rows: u64,
    /// Rows naming an expert twice.
    pub duplicate_rows: u64,
    /// Rows missing in some slots only.
    pub partial_missing_rows: u64,
    /// The E used for range checks.
    pub num_experts: usize,
    /// The first problems found (at most the number asked for).
    pub examples: Vec<InteropError>,
}

impl DenseCheck {
    /// True when no row is invalid.
    pub fn is_valid(&self) -> bool {
        self.out_of_range_rows == 0 && self.duplicate_rows == 0 && self.partial_missing_rows == 0
    }
}

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
/// [`crate::MAX_EXPERTS`]), even when T = 0 makes the array empty: later steps allocate per
/// layer and per slot.
pub(crate) fn check_lk(format: Format, l: usize, k: usize) -> Result<(), InteropError> {
    if l > crate::trace::MAX_LAYERS || k > crate::MAX_EXPERTS {
        return Err(InteropError::Shape {
            format,
            reason: format!(
                "L = {l}, K = {k}: a trace holds at most {} layers and K ≤ {}",
                crate::trace::MAX_LAYERS,
                crate::MAX_EXPERTS
            ),
        });
    }
    Ok(())
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
                    num_experts: num_experts.unwrap_or(crate::MAX_EXPERTS),
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

/// The [`Element`] of flat index `i` in a `[_, l, k]` array starting at token `start`.
pub(crate) fn element_at(i: u64, start: u64, l: usize, k: usize) -> Element {
    let (l, k) = (l.max(1) as u64, k.max(1) as u64);
    Element {
        index: i,
        token: start.saturating_add(i / (l * k)),
        layer_index: ((i / k) % l) as usize,
        slot: (i % k) as usize,
    }
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

impl DenseRoutes {
    /// A `[T, L, K]` block starting at position 0, with nothing known about E or the layers.
    pub fn new(ids: Array3<u32>) -> Self {
        DenseRoutes {
            ids,
            start: 0,
            num_experts: None,
            layers: None,
            source_dtype: None,
        }
    }

    /// `(T, L, K)`.
    pub fn dim(&self) -> (usize, usize, usize) {
        self.ids.dim()
    }

    /// The largest id present (`None` when every row is missing).
    pub fn max_id(&self) -> Option<u32> {
        self.ids.iter().copied().filter(|&x| x != MISSING_ID).max()
    }

    /// E for checks: the caller's, else the format's (they must agree), else `max id + 1` (at
    /// least K, at least 1).
    pub fn resolve_num_experts(&self, format: Format, given: Option<usize>) -> Result<usize, InteropError> {
        match (given, self.num_experts) {
            (Some(g), Some(f)) if g != f => Err(InteropError::Conflict {
                format,
                what: "num_experts",
                in_file: f.to_string(),
                given: g.to_string(),
            }),
            (Some(e), _) | (None, Some(e)) => Ok(e),
            (None, None) => {
                let k = self.ids.dim().2;
                Ok((self.max_id().map_or(0, |m| m as usize + 1)).max(k).max(1))
            }
        }
    }

    /// The layer ids of the L axis: the caller's, else the format's (they must agree), else
    /// `0..L`.
    pub fn resolve_layers(&self, format: Format, given: Option<&[u32]>) -> Result<Vec<u32>, InteropError> {
        let l = self.ids.dim().1;
        let v = match (given, &self.layers) {
            (Some(g), Some(f)) if g != f.as_slice() => {
                return Err(InteropError::Conflict {
                    format,
                    what: "layer ids",
                    in_file: format!("{f:?}"),
                    given: format!("{g:?}"),
                });
            }
            (Some(g), _) => g.to_vec(),
            (None, Some(f)) => f.clone(),
            (None, None) => (0..l as u32).collect(),
        };
        if v.len() != l {
            return Err(InteropError::Header {
                format,
                reason: format!(
                    "{} layer ids given ({v:?}) but the array has L = {l} layers; pass one id per layer",
                    v.len()
                ),
            });
        }
        Ok(v)
    }

    /// Checks every row against E (ids `< E`, distinct, missing in all slots or none), counting
    /// problems and keeping the first `max_examples` as errors.
    pub fn check(&self, format: Format, num_experts: usize, max_examples: usize) -> DenseCheck {
        let mut c = DenseCheck {
            num_experts,
            ..DenseCheck::default()
        };
        self.scan(
            format,
            num_experts,
            |e| {
                if let Some(e) = e {
                    match e {
                        InteropError::IdOutOfRange { .. } => c.out_of_range_rows += 1,
                        InteropError::DuplicateId { .. } => c.duplicate_rows += 1,
                        _ => c.partial_missing_rows += 1,
                    }
                    if c.examples.len() < max_examples {
                        c.examples.push(e);
                    }
                }
            },
            |present| {
                if present {
                    c.present_rows += 1;
                } else {
                    c.missing_rows += 1;
                }
            },
        );
        c
    }

    /// Visits every row: `bad(Some(err))` for an invalid row, `ok(present)` for a valid one.
    fn scan(
        &self,
        format: Format,
        num_experts: usize,
        mut bad: impl FnMut(Option<InteropError>),
        mut ok: impl FnMut(bool),
    ) {
        let (_, l, k) = self.ids.dim();
        let Some(flat) = self.ids.as_slice() else {
            let owned = self.ids.as_standard_layout().into_owned();
            let d = DenseRoutes {
                ids: owned,
                start: self.start,
                num_experts: self.num_experts,
                layers: self.layers.clone(),
                source_dtype: self.source_dtype,
            };
            return d.scan(format, num_experts, bad, ok);
        };
        if k == 0 {
            return;
        }
        let mut sorted: Vec<u32> = Vec::new();
        for (r, row) in flat.chunks_exact(k).enumerate() {
            let base = (r * k) as u64;
            let at = |slot: usize| element_at(base + slot as u64, self.start, l, k);
            let nmiss = row.iter().filter(|&&x| x == MISSING_ID).count();
            if nmiss == k {
                ok(false);
                continue;
            }
            if nmiss > 0 {
                let slot = row.iter().position(|&x| x == MISSING_ID).unwrap_or(0);
                bad(Some(InteropError::PartialMissing { format, at: at(slot) }));
                continue;
            }
            if let Some(slot) = row.iter().position(|&x| x as usize >= num_experts) {
                bad(Some(InteropError::IdOutOfRange {
                    format,
                    at: at(slot),
                    value: i128::from(row[slot]),
                    num_experts,
                }));
                continue;
            }
            let dup = if k <= 16 {
                (1..k).find(|&j| row[..j].contains(&row[j]))
            } else {
                sorted.clear();
                sorted.extend_from_slice(row);
                sorted.sort_unstable();
                sorted
                    .windows(2)
                    .find(|w| w[0] == w[1])
                    .and_then(|w| (1..k).find(|&j| row[j] == w[0] && row[..j].contains(&w[0])))
            };
            if let Some(j) = dup {
                let id = row[j];
                bad(Some(InteropError::DuplicateId {
                    format,
                    at: at(j),
                    id,
                    hint: if id == 0 {
                        " (a row of zeros usually means zero padding or a bypassed capture, not a route)".into()
                    } else {
                        String::new()
                    },
                }));
                continue;
            }
            ok(true);
        }
    }

    /// Builds a one-sequence [`Trace`] (strict: the first invalid row is an error). See the
    /// module docs for the sequence, position, layer and E defaults.
    pub fn to_trace(&self, format: Format, opts: &ImportOptions) -> Result<Trace, InteropError> {
        self.to_trace_with_progress(format, opts, |_, _| {})
    }

    /// [`DenseRoutes::to_trace`] calling `progress(layers_done, layers_total)` as it goes.
    pub fn to_trace_with_progress(
        &self,
        format: Format,
        opts: &ImportOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Trace, InteropError> {
        let e = self.resolve_num_experts(format, opts.num_experts)?;
        let mut first: Option<InteropError> = None;
        self.scan(
            format,
            e,
            |err| {
                if first.is_none() {
                    first = err;
                }
            },
            |_| {},
        );
        if let Some(err) = first {
            return Err(err);
        }
        self.build(format, opts, e, &mut progress)
    }

    /// Builds a trace keeping the valid rows and storing invalid ones as missing (for
    /// validation reports), with the [`DenseCheck`] of what was replaced.
    pub fn to_trace_lossy(
        &self,
        format: Format,
        opts: &ImportOptions,
        max_examples: usize,
    ) -> Result<(Trace, DenseCheck), InteropError> {
        let e = self.resolve_num_experts(format, opts.num_experts)?;
        let check = self.check(format, e, max_examples);
        if check.is_valid() {
            return Ok((self.build(format, opts, e, &mut |_, _| {})?, check));
        }
        let mut fixed = self.ids.as_standard_layout().into_owned();
        let k = fixed.dim().2;
        if let Some(flat) = fixed.as_slice_mut() {
            for row in flat.chunks_exact_mut(k.max(1)) {
                let nmiss = row.iter().filter(|&&x| x == MISSING_ID).count();
                let bad_range = row.iter().any(|&x| x != MISSING_ID && x as usize >= e);
                let mut dup = false;
                for j in 1..row.len() {
                    if row[..j].contains(&row[j]) {
                        dup = true;
                        break;
                    }
                }
                if (nmiss > 0 && nmiss < row.len()) || bad_range || (nmiss == 0 && dup) {
                    row.fill(MISSING_ID);
                }
            }
        }
        let d = DenseRoutes {
            ids: fixed,
            start: self.start,
            num_experts: self.num_experts,
            layers: self.layers.clone(),
            source_dtype: self.source_dtype,
        };
        Ok((d.build(format, opts, e, &mut |_, _| {})?, check))
    }

    fn build(
        &self,
        format: Format,
        opts: &ImportOptions,
        e: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Trace, InteropError> {
        let (t, l, k) = self.ids.dim();
        check_lk(format, l, k)?;
        let layers = self.resolve_layers(format, opts.layers.as_deref())?;
        let header = TraceHeader::new(e, k, &layers)
            .map_err(|err| InteropError::Header {
                format,
                reason: format!("[T, L, K] = [{t}, {l}, {k}] with num_experts = {e}: {err}"),
            })?
            .with_producer(format!("moe-router interop: imported from {format}"));
        let mut trace = Trace::new(header);
        if self.start.checked_add(t as u64).is_none() {
            return Err(InteropError::Shape {
                format,
                reason: format!("start {} + {t} rows overflows the position range", self.start),
            });
        }
        for (li, &layer) in layers.iter().enumerate() {
            progress(li, l);
            if t > 0 {
                trace.append(opts.seq, LayerId(layer), self.start, self.ids.slice(s![.., li, ..]))?;
            }
        }
        progress(l, l);
        Ok(trace)
    }

    /// One sequence of `trace` (`seq`, or the only one) over the trace's layer map, from its
    /// first stored position to its end (see [`DenseRoutes::from_trace_from_zero`]).
    pub fn from_trace(
        format: Format,
        trace: &Trace,
        seq: Option<SeqId>,
        max_elements: u64,
    ) -> Result<DenseRoutes, InteropError> {
        let seqs = trace.sequences();
        let seq = match seq {
            Some(s) => s,
            None => match seqs.as_slice() {
                [] => SeqId(0),
                [only] => *only,
                many => {
                    return Err(InteropError::Unrepresentable {
                        format,
                        reason: format!(
                            "the trace holds {} sequences ({}); {format} holds one: pick one, or keep the .mrt format",
                            many.len(),
                            many.iter()
                                .take(8)
                                .map(|s| s.0.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                                + if many.len() > 8 { ", …" } else { "" }
                        ),
                    });
                }
            },
        };
        let h = trace.header();
        let l = h.layers().len();
        let k = h.top_k();
        let start = trace
            .lanes()
            .filter(|lane| lane.seq == seq)
            .filter_map(|lane| lane.runs.first().map(|r| r.start))
            .min()
            .unwrap_or(0);
        let end = trace.sequence_end(seq);
        let t = end - start;
        element_count(format, &[t, l as u64, k as u64], max_elements, "exporting the trace")?;
        let t = t as usize;
        let mut ids = Array3::from_elem((t, l, k), MISSING_ID);
        let mut tmp = ndarray::Array2::from_elem((t, k), MISSING_ID);
        for (li, &layer) in h.layers().iter().enumerate() {
            trace.read_rows(seq, layer, start, tmp.view_mut())?;
            ids.slice_mut(s![.., li, ..]).assign(&tmp);
        }
        Ok(DenseRoutes {
            ids,
            start,
            num_experts: Some(h.num_experts()),
            layers: Some(h.layer_ids()),
            source_dtype: None,
        })
    }

    /// Like [`DenseRoutes::from_trace`], but row 0 is position 0 (earlier positions become
    /// missing rows): for formats without a start offset.
    pub fn from_trace_from_zero(
        format: Format,
        trace: &Trace,
        seq: Option<SeqId>,
        max_elements: u64,
    ) -> Result<DenseRoutes, InteropError> {
        DenseRoutes::from_trace(format, trace, seq, max_elements)?.rebased_to_zero(format, max_elements)
    }

    /// The same routes with row 0 at position 0 (rows before `start` become missing).
    pub fn rebased_to_zero(self, format: Format, max_elements: u64) -> Result<DenseRoutes, InteropError> {
        if self.start == 0 {
            return Ok(self);
        }
        let (t, l, k) = self.ids.dim();
        let total = self.start.saturating_add(t as u64);
        element_count(
            format,
            &[total, l as u64, k as u64],
            max_elements,
            "rows before the start offset",
        )?;
        let mut ids = Array3::from_elem((total as usize, l, k), MISSING_ID);
        ids.slice_mut(s![self.start as usize.., .., ..]).assign(&self.ids);
        Ok(DenseRoutes { ids, start: 0, ..self })
    }
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
