//! Errors of importing and exporting ([`InteropError`]), and where an element sits in a
//! `[T, L, K]` array ([`Element`]).

use super::Format;
use crate::trace::TraceError;
use std::fmt;
use thiserror::Error;

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
        /// The bound ([`ImportOptions::max_elements`](super::ImportOptions::max_elements)).
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
    /// The capture holds no route at all (T = 0 rows, or every row missing): an engine that
    /// captured nothing (capture disabled, bound too late, an empty response) must not pass as
    /// a valid, empty trace.
    #[error(
        "{format}: the input holds no routes ({rows} row(s), none recorded): the engine captured nothing \
         (is routing capture enabled for this request?)"
    )]
    Empty {
        /// The format.
        format: Format,
        /// Rows in the input (all missing).
        rows: usize,
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
