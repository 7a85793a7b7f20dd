//! Shared checks of the importer targets: decoding never panics; a decoded input that builds a
//! trace exports back to the same format and re-imports to the same routes.

#![allow(dead_code)]

use moe_router_trace::interop::{self, DenseRoutes, ExportOptions, Format, ImportOptions, InteropError};
use moe_router_trace::trace::{MISSING_ID, Trace};

/// Memory bound used by the targets (elements of `[T, L, K]`).
pub const MAX_ELEMENTS: u64 = 1 << 20;

/// Import options with the fuzzing memory bound.
pub fn opts() -> ImportOptions {
    ImportOptions::default().with_max_elements(MAX_ELEMENTS)
}

/// E, K, the layer map and the present rows as (position, layer id, ids).
type Rows = (usize, usize, Vec<u32>, Vec<(u64, u32, Vec<u32>)>);

/// The [`Rows`] of sequence 0.
fn rows(t: &Trace) -> Rows {
    let h = t.header();
    let d = DenseRoutes::from_trace(Format::Mrt, t, None, MAX_ELEMENTS * 4).expect("a decoded trace re-exports");
    let (_, l, _) = d.ids.dim();
    let mut v = Vec::new();
    for (ti, tok) in d.ids.outer_iter().enumerate() {
        for li in 0..l {
            let row: Vec<u32> = tok.row(li).to_vec();
            if row.iter().all(|&x| x == MISSING_ID) {
                continue;
            }
            v.push((d.start + ti as u64, h.layer_ids()[li], row));
        }
    }
    (h.num_experts(), h.top_k(), h.layer_ids(), v)
}

/// Decodes `data` as `format`; when it yields a trace, exports it back and checks the round trip.
pub fn check(format: Format, data: &[u8], o: &ImportOptions) {
    let Ok(dense) = interop::decode(format, data, o) else {
        return;
    };
    // Validation with collected findings must not panic either.
    let e = dense.resolve_num_experts(format, o.num_experts).unwrap_or(1);
    let _ = dense.check(format, e, 4);
    let _ = dense.to_trace_lossy(format, o, 4);
    let Ok(t1) = dense.to_trace(format, o) else { return };
    let eo = ExportOptions {
        max_elements: MAX_ELEMENTS * 4,
        ..ExportOptions::default()
    };
    let out = match interop::export(format, &t1, &eo) {
        Ok(b) => b,
        Err(InteropError::TooLarge { .. }) => return,
        Err(err) => panic!("{format}: a trace imported from {format} does not export back: {err}"),
    };
    let t2 =
        interop::import(format, &out, o).unwrap_or_else(|err| panic!("{format}: own export does not re-import: {err}"));
    assert_eq!(rows(&t1), rows(&t2), "{format}: round trip changed the routes");
}
