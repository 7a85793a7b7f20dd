//! The `.mrt` reader: opening arbitrary bytes (strict, lazy and salvage), loading, reading rows
//! and validating never panics, hangs or allocates by a claimed length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_router_trace::trace::{OpenOptions, RouteSource, TraceFile, Verify};
use ndarray::Array2;

fuzz_target!(|data: &[u8]| {
    for opts in [
        OpenOptions::default(),
        OpenOptions {
            verify: Verify::Lazy,
            salvage: false,
        },
        OpenOptions {
            verify: Verify::Eager,
            salvage: true,
        },
    ] {
        let Ok(tf) = TraceFile::from_bytes(data.to_vec(), opts) else {
            continue;
        };
        let _ = tf.report();
        let _ = tf.chunk_infos();
        let _ = tf.verify_all();
        let _ = RouteSource::validate(&tf);
        let k = tf.header().top_k();
        let mut out = Array2::zeros((4, k));
        for seq in tf.sequences().into_iter().take(4) {
            for &layer in tf.header().layers().iter().take(4) {
                let _ = tf.read_rows(seq, layer, 0, out.view_mut());
            }
        }
        if let Ok(t) = tf.to_trace() {
            let _ = t.summary();
            let _ = t.validation_issues();
        }
    }
});
