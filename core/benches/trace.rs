//! Trace benchmarks: writing `.mrt` files (ids per second), replay-from-file of a batch against
//! routing it, and the overhead of recording.
//!
//! The router is [`ReferenceRouter`]; to measure against another backend change `make_router`
//! (and `Logits` if its input type differs) — nothing else depends on the router type.
//!
//! Run: `cargo bench -p moe-router-core --bench trace -- --quick`.

#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moe_router_core::policy::{Record, Replay};
use moe_router_core::trace::synthetic::SyntheticRoutes;
use moe_router_core::trace::{Compression, Trace, TraceFile, TraceHeader, TraceWriter, WriterOptions};
use moe_router_core::{
    BatchLayout, CallSite, LayerId, LogitsRef, ReferenceRouter, ReplayPolicy, Replayed, RouteShape, Router,
    RouterConfig, SeqId,
};
use ndarray::{Array2, s};
use std::hint::black_box;

const E: usize = 128;
const K: usize = 8;
const LAYERS: [u32; 4] = [0, 1, 2, 3];

fn config() -> RouterConfig {
    RouterConfig::builder(E, K).build().unwrap()
}

/// The router under test (switch here to a backend such as the CPU router).
fn make_router() -> ReferenceRouter {
    ReferenceRouter::new(config())
}

fn synthetic(seqs: u64, tokens: usize) -> (SyntheticRoutes, Trace) {
    let g = SyntheticRoutes::new(config(), LAYERS.to_vec(), seqs, tokens);
    let t = g.generate().unwrap();
    (g, t)
}

fn bench_write(c: &mut Criterion) {
    let (_, t) = synthetic(4, 4096);
    let dense: Vec<(SeqId, Array2<u32>)> = t
        .sequences()
        .into_iter()
        .map(|s| (s, t.to_dense(s).slice(s![.., 0, ..]).to_owned()))
        .collect();
    // 64 "sequences" × 4 layers × 4096 rows × 8 ids = 8 Mi ids per iteration.
    let reps = 16u64;
    let ids = reps * dense.len() as u64 * LAYERS.len() as u64 * 4096 * K as u64;
    let dir = std::env::temp_dir().join(format!("moe-router-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.mrt");
    let mut g = c.benchmark_group("trace_write");
    g.throughput(Throughput::Bytes(ids));
    g.sample_size(10);
    for (name, comp) in [
        ("raw", Compression::None),
        ("zstd3", Compression::Zstd(3)),
        ("rank_zstd3", Compression::ZstdRanked(3)),
    ] {
        g.bench_function(BenchmarkId::new("append_u32", name), |b| {
            b.iter(|| {
                let w = TraceWriter::create(
                    &path,
                    t.header().clone(),
                    WriterOptions {
                        compression: comp,
                        ..WriterOptions::default()
                    },
                )
                .unwrap();
                for r in 0..reps {
                    for (seq, a) in &dense {
                        for &l in &LAYERS {
                            w.append(SeqId(seq.0 + 100 * r), LayerId(l), 0, a.view()).unwrap();
                        }
                    }
                }
                black_box(w.finish().unwrap())
            })
        });
    }
    // Pre-encoded rows (file copy, interop): the writer's own cost without u32 conversion.
    let stored: Vec<(SeqId, Vec<u8>)> = dense
        .iter()
        .map(|(s, a)| (*s, a.iter().map(|&x| x as u8).collect()))
        .collect();
    g.bench_function(BenchmarkId::new("append_stored", "raw"), |b| {
        b.iter(|| {
            let w = TraceWriter::create(&path, t.header().clone(), WriterOptions::default()).unwrap();
            for r in 0..reps {
                for (seq, a) in &stored {
                    for &l in &LAYERS {
                        w.append_stored(SeqId(seq.0 + 100 * r), LayerId(l), 0, a).unwrap();
                    }
                }
            }
            black_box(w.finish().unwrap())
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_replay_vs_route(c: &mut Criterion) {
    let rows = 4096usize;
    let (generator, t) = synthetic(4, rows / 4);
    let dir = std::env::temp_dir().join(format!("moe-router-bench-r-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("r.mrt");
    t.write_file(&path, WriterOptions::default()).unwrap();
    let zpath = dir.join("rz.mrt");
    t.write_file(&zpath, WriterOptions::zstd(3)).unwrap();
    let lens: Vec<(SeqId, usize)> = (0..4).map(|s| (SeqId(s), rows / 4)).collect();
    let layout = BatchLayout::packed(&lens).unwrap();
    let mut logits = Array2::<f32>::zeros((rows, E));
    for (i, &(s, n)) in lens.iter().enumerate() {
        logits
            .slice_mut(s![i * n..(i + 1) * n, ..])
            .assign(&generator.logits(s.0, 1));
    }
    let lr = LogitsRef::F32(logits.view());
    let site = CallSite::layer(1).with_layout(&layout);
    let shape = RouteShape {
        rows,
        num_experts: E,
        top_k: K,
    };
    let file = Replay::new(TraceFile::open(&path).unwrap(), &LAYERS).unwrap();
    let zfile = Replay::new(TraceFile::open(&zpath).unwrap(), &LAYERS).unwrap();
    let mem = Replay::new(t.clone(), &LAYERS).unwrap();

    let mut g = c.benchmark_group("replay_vs_route_4096x128_top8");
    g.throughput(Throughput::Elements(rows as u64));
    let plain = make_router();
    g.bench_function("route", |b| b.iter(|| black_box(plain.route(&lr, &site).unwrap())));
    g.bench_function("plan_from_file", |b| {
        b.iter(|| black_box(file.plan(&site, shape).unwrap()))
    });
    g.bench_function("plan_from_file_zstd", |b| {
        b.iter(|| black_box(zfile.plan(&site, shape).unwrap()))
    });
    g.bench_function("plan_from_memory", |b| {
        b.iter(|| black_box(mem.plan(&site, shape).unwrap()))
    });
    let replayed = Replayed::new(make_router(), &file);
    g.bench_function("replayed_route_from_file", |b| {
        b.iter(|| black_box(replayed.route(&lr, &site).unwrap()))
    });
    g.bench_function("weights_for_only", |b| {
        let ids = plain.route(&lr, &site).unwrap().ids;
        b.iter(|| black_box(plain.weights_for(&lr, &ids, &site).unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("record_overhead_4096x128_top8");
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function("route", |b| b.iter(|| black_box(plain.route(&lr, &site).unwrap())));
    let header = TraceHeader::for_config(&config(), &LAYERS).unwrap();
    g.bench_function("route_and_record_in_memory", |b| {
        b.iter_batched(
            || Replayed::new(make_router(), Record::in_memory(header.clone())),
            |r| black_box(r.route(&lr, &site).unwrap()),
            criterion::BatchSize::LargeInput,
        )
    });
    let wpath = dir.join("rec.mrt");
    let rec = Record::create_file(&wpath, header.clone(), WriterOptions::default()).unwrap();
    let recorded = Replayed::new(make_router(), rec.clone());
    let mut step = 0u64;
    g.bench_function("route_and_record_to_file", |b| {
        b.iter(|| {
            // A new batch of sequences each iteration (recording the same key twice is dropped).
            step += 1;
            let l: Vec<(SeqId, usize)> = (0..4).map(|s| (SeqId(step * 4 + s), rows / 4)).collect();
            let lay = BatchLayout::packed(&l).unwrap();
            black_box(recorded.route(&lr, &CallSite::layer(1).with_layout(&lay)).unwrap())
        })
    });
    g.finish();
    rec.finish().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_write, bench_replay_vs_route);
criterion_main!(benches);
