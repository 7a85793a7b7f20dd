//! Helpers of the backend contract that every device backend shares: the element type of
//! device logits, and turning a row a kernel flagged into the exact [`RouteError`] the
//! reference router gives for it.
//!
//! Device kernels do not format errors: they flag the first bad row (non-finite logit,
//! all-masked softmax, invalid replay ids) in a status word. The backend then reads that one
//! row back and calls [`flagged_ids_error`] or [`flagged_logits_error`], so every backend names
//! the same row, slot, expert and value as the reference.

use crate::config::{Numerics, RouterConfig};
use crate::error::RouteError;
use crate::logits::LogitsRef;
use crate::math::{NativeF32, Portable};
use crate::reference::widen_checked;
use crate::router::{ROUTER_SELECTS, validate_ids};
use half::{bf16, f16};
use ndarray::{Array2, ArrayView2};

/// Element type of logits in device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogitsDtype {
    /// IEEE f32.
    F32,
    /// bfloat16 (its 16 bits; widened exactly).
    Bf16,
    /// IEEE half (its 16 bits; widened exactly).
    F16,
}

impl LogitsDtype {
    /// Every dtype.
    pub const ALL: [LogitsDtype; 3] = [LogitsDtype::F32, LogitsDtype::Bf16, LogitsDtype::F16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            LogitsDtype::F32 => 4,
            LogitsDtype::Bf16 | LogitsDtype::F16 => 2,
        }
    }

    /// Name, as in [`LogitsRef::dtype_name`].
    pub fn name(self) -> &'static str {
        match self {
            LogitsDtype::F32 => "f32",
            LogitsDtype::Bf16 => "bf16",
            LogitsDtype::F16 => "f16",
        }
    }

    /// The device dtype of host logits (`None` for f64, which device backends round to f32).
    pub fn of(logits: &LogitsRef<'_>) -> Option<LogitsDtype> {
        match logits {
            LogitsRef::F32(_) => Some(LogitsDtype::F32),
            LogitsRef::Bf16(_) => Some(LogitsDtype::Bf16),
            LogitsRef::F16(_) => Some(LogitsDtype::F16),
            LogitsRef::F64(_) => None,
        }
    }
}

/// Calls `f` with `ids` whose `router_rows` hold [`ROUTER_SELECTS`] in every slot (the marking
/// the fallback-replay kernels read): `ids` itself when they already do (the way
/// [`crate::Replayed`] passes them), else a marked copy. Rows past the end are ignored.
pub fn with_router_rows_marked<T>(
    ids: ArrayView2<'_, u32>,
    router_rows: &[usize],
    f: impl FnOnce(ArrayView2<'_, u32>) -> T,
) -> T {
    let marked = router_rows
        .iter()
        .all(|&r| r >= ids.nrows() || ids.row(r).iter().all(|&i| i == ROUTER_SELECTS));
    if marked {
        return f(ids);
    }
    let mut forced = ids.to_owned();
    for &r in router_rows {
        if r < forced.nrows() {
            forced.row_mut(r).fill(ROUTER_SELECTS);
        }
    }
    f(forced.view())
}

/// The error for replay row `row` whose ids a kernel flagged: the row's ids are checked again on
/// the host and the reference's [`RouteError::IdOutOfRange`] or [`RouteError::DuplicateId`] is
/// returned, naming `row` and the slot. Ids that turn out valid (a kernel bug) give a
/// [`RouteError::Device`] that says so.
pub fn flagged_ids_error(backend: &'static str, ids_row: &[u32], row: usize, num_experts: usize) -> RouteError {
    let k = ids_row.len();
    let Ok(a) = ArrayView2::from_shape((1, k), ids_row) else {
        return RouteError::device(
            backend,
            format!("replay row {row} was flagged but its ids could not be read"),
        );
    };
    match validate_ids(a, 1, num_experts, k, &[]) {
        Err(RouteError::IdOutOfRange {
            slot, id, num_experts, ..
        }) => RouteError::IdOutOfRange {
            row,
            slot,
            id,
            num_experts,
        },
        Err(RouteError::DuplicateId {
            id,
            first_slot,
            second_slot,
            ..
        }) => RouteError::DuplicateId {
            row,
            id,
            first_slot,
            second_slot,
        },
        other => RouteError::device(
            backend,
            format!("the kernel flagged the replay ids of row {row} but the host finds {other:?}"),
        ),
    }
}

/// The reference's error for logits row `row` that a kernel flagged (a NaN or +∞ logit, or a
/// row of −∞ under softmax): `row_logits` is that one row (`[1, E]`). The first non-finite logit
/// wins, as in the reference; a row without one is [`RouteError::AllMasked`].
pub fn flagged_logits_error(cfg: &RouterConfig, row_logits: &LogitsRef<'_>, row: usize) -> RouteError {
    let mut z = Vec::new();
    let r = match cfg.numerics() {
        Numerics::Portable => widen_checked::<Portable>(row_logits, 0, &mut z),
        Numerics::Native => widen_checked::<NativeF32>(row_logits, 0, &mut z),
    };
    match r {
        Err(RouteError::NonFiniteLogit { expert, value, .. }) => RouteError::NonFiniteLogit { row, expert, value },
        _ => RouteError::AllMasked { row },
    }
}

/// [`flagged_logits_error`] for a row read back from device memory: `bytes` hold the row's E
/// elements of `dtype`, little-endian.
pub fn flagged_logits_error_from_bytes(cfg: &RouterConfig, dtype: LogitsDtype, bytes: &[u8], row: usize) -> RouteError {
    let cols = bytes.len() / dtype.size();
    let halves = || bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    let built = match dtype {
        LogitsDtype::F32 => Array2::from_shape_vec(
            (1, cols),
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
        .map(|a| flagged_logits_error(cfg, &LogitsRef::F32(a.view()), row)),
        LogitsDtype::Bf16 => Array2::from_shape_vec((1, cols), halves().map(bf16::from_bits).collect())
            .map(|a| flagged_logits_error(cfg, &LogitsRef::Bf16(a.view()), row)),
        LogitsDtype::F16 => Array2::from_shape_vec((1, cols), halves().map(f16::from_bits).collect())
            .map(|a| flagged_logits_error(cfg, &LogitsRef::F16(a.view()), row)),
    };
    built.unwrap_or_else(|e| RouteError::array_shape(&[1, cols], e))
}
