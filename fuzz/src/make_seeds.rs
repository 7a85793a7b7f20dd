//! Writes seed corpora for every target into `corpus/<target>/` (run from `fuzz/`): small traces
//! and exports in every format, including multi-chunk, zstd and row-rank `.mrt` files and
//! truncated copies.

use moe_router_core::SeqId;
use moe_router_trace::interop::{self, ExportOptions, Format};
use moe_router_trace::trace::{Compression, Trace, TraceHeader, WriterOptions};
use ndarray::Array3;
use std::path::Path;

fn block(t: usize, l: usize, k: usize, e: usize, seed: usize) -> Array3<u32> {
    let step = (e / k).max(1);
    Array3::from_shape_fn((t, l, k), |(ti, li, j)| {
        ((ti * 7 + li * 3 + seed + j * step) % e) as u32
    })
}

fn put(dir: &str, name: &str, bytes: &[u8]) {
    let d = Path::new("corpus").join(dir);
    std::fs::create_dir_all(&d).expect("corpus dir");
    std::fs::write(d.join(name), bytes).expect("seed");
}

fn main() {
    let shapes = [
        (4usize, 2usize, 2usize, 8usize),
        (3, 3, 4, 300),
        (6, 1, 1, 16),
        (5, 2, 8, 64),
    ];
    let tmp = std::env::temp_dir().join(format!("moe-router-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    for (i, &(t, l, k, e)) in shapes.iter().enumerate() {
        let layers: Vec<u32> = (0..l as u32).map(|x| x * 2 + 1).collect();
        let mut ids = block(t, l, k, e, i);
        if t > 2 {
            ids.slice_mut(ndarray::s![t - 1, .., ..]).fill(u32::MAX);
        }
        let mut tr = Trace::new(TraceHeader::new(e, k, &layers).expect("header"));
        tr.append_dense(SeqId(0), 0, ids.view()).expect("append");
        for f in [Format::Npy, Format::Safetensors, Format::Nrlre1, Format::PrimeRl] {
            if let Ok(b) = interop::export(f, &tr, &ExportOptions::default()) {
                put(&f.name().replace('-', "_"), &format!("s{i}"), &b);
            }
        }
        let shape = [l as u8, k as u8];
        if let Ok(b) = interop::export(Format::Sglang, &tr, &ExportOptions::default()) {
            put("sglang", &format!("s{i}"), &[&shape[..], &b].concat());
        }
        // r3v1: the target takes [L, K] then either text or raw frame content.
        if let Ok(b) = interop::export(Format::R3v1, &tr, &ExportOptions::default()) {
            put("r3v1", &format!("s{i}"), &[&shape[..], &b].concat());
        }
        // .mrt: plain, zstd and row-rank, small chunks, a second sequence, truncated copies.
        tr.append_dense(SeqId(9), 3, block(t, l, k, e, i + 1).view())
            .expect("append");
        for (j, comp) in [Compression::None, Compression::Zstd(3), Compression::ZstdRanked(3)]
            .into_iter()
            .enumerate()
        {
            let p = tmp.join(format!("t{i}_{j}.mrt"));
            let opts = WriterOptions {
                compression: comp,
                ..WriterOptions::default().with_chunk_id_bytes(16)
            };
            if tr.write_file(&p, opts).is_ok() {
                let b = std::fs::read(&p).expect("read");
                put("trace_reader", &format!("t{i}_{j}"), &b);
                put("trace_reader", &format!("t{i}_{j}_cut"), &b[..b.len() * 2 / 3]);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("seeds written under corpus/");
}
