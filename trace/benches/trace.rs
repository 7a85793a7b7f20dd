//! Trace writing and reading throughput (issue 3, item 9: "writing traces sustains ≥ 1 GB/s of
//! ids"). Record/replay against CPU routing lives in `backend-cpu/benches/replay.rs` (the CPU
//! router depends on this crate).
//!
//! Shapes: Qwen3-30B-A3B-like (E = 128, K = 8) and DeepSeek-V3-like (E = 256, K = 8), both one
//! byte per stored id, and a Kimi-K2-like E = 384, K = 8 (two bytes per id). One iteration
//! writes a batch of 16 sequences × 1024 tokens for each of 48 MoE layers (6.3 Mi ids), ids from
//! the synthetic correlated router ([`SyntheticRoutes`], experts relabelled per layer) so that
//! compression sees realistic data.
//! Throughput is reported in ids (= stored bytes for E ≤ 256) per second, decimal units.
//!
//! * `append_u32/*` — [`TraceWriter::append`] of `u32` ids (the public API for external ids:
//!   every row validated) with each compression;
//! * `append_stored/raw` — [`TraceWriter::append_stored`] of already narrowed rows (validated);
//! * `record_sink/raw` — the [`Record`] policy's sink (what `Replayed<_, Record>` calls with the
//!   router's ids), streaming to a file;
//! * `memory/*` — the same into an in-memory [`Trace`];
//! * `read/*` — opening (eager verification of every chunk) and loading files.
//!
//! Before the timings, the bench prints the **size** of engine-style recordings (bytes per id of
//! the whole file, for each codec): a packed prefill of every sequence, then decode steps of one
//! token per sequence, each step one [`Record`] call per MoE layer — the pattern that interleaves
//! many (sequence, layer) lanes in every chunk. Sizes are deterministic (no time budget).
//!
//! Time is the **process CPU time** (`CLOCK_PROCESS_CPUTIME_ID`: all threads, the writer's
//! background thread included, also after it exits), so results hold on a shared, loaded machine
//! — a rate is then "per core-second". `BENCH_CLOCK=wall` switches to wall time. The writer is
//! created outside the timed region; appends and `finish` (last chunk, index) are timed.
//!
//! Run: `cargo bench -p moe-router-trace --bench trace -- --quick` (`BENCH_SIZES_ONLY=1`: the
//! size table only).

#![allow(missing_docs)]

use criterion::{Criterion, Throughput};
use moe_router_core::{
    BatchLayout, CallSite, LayerId, ReplayPolicy, RouteShape, RouterConfig, RowAddr, Segment, SeqId,
};
use moe_router_trace::policy::Record;
use moe_router_trace::trace::synthetic::SyntheticRoutes;
use moe_router_trace::trace::{Compression, Trace, TraceFile, TraceHeader, TraceWriter, WriterOptions};
use ndarray::{Array2, s};
use std::hint::black_box;
use std::path::Path;

mod clock {
    //! A criterion measurement that reads the process CPU time (or wall time).
    use criterion::Throughput;
    use criterion::measurement::{Measurement, ValueFormatter};
    use std::time::Instant;

    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    #[allow(unsafe_code)]
    mod sys {
        #[repr(C)]
        struct Timespec {
            tv_sec: i64,
            tv_nsec: i64,
        }
        unsafe extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;

        /// CPU time of every thread of the process (live or exited), in nanoseconds.
        pub fn process_cpu_ns() -> Option<u64> {
            let mut ts = Timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `clock_gettime` (libc, linked by std) writes one `timespec` (two `long`s on
            // 64-bit Linux, matching `Timespec`) into the valid, exclusively borrowed `ts`.
            let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
            (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
        }
    }
    #[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
    mod sys {
        pub fn process_cpu_ns() -> Option<u64> {
            None
        }
    }

    /// Process CPU time (default) or wall time (`BENCH_CLOCK=wall`, or no CPU clock).
    #[derive(Debug, Clone, Copy)]
    pub struct Clock {
        cpu: bool,
        t0: Instant,
    }

    impl Clock {
        pub fn from_env() -> Self {
            let wall = std::env::var("BENCH_CLOCK").is_ok_and(|v| v == "wall");
            Clock {
                cpu: !wall && sys::process_cpu_ns().is_some(),
                t0: Instant::now(),
            }
        }
        /// Nanoseconds since an arbitrary origin.
        pub fn now(&self) -> u64 {
            if self.cpu {
                sys::process_cpu_ns().unwrap_or(0)
            } else {
                self.t0.elapsed().as_nanos() as u64
            }
        }
    }

    impl Measurement for Clock {
        type Intermediate = u64;
        type Value = u64;
        fn start(&self) -> u64 {
            self.now()
        }
        fn end(&self, i: u64) -> u64 {
            self.now().saturating_sub(i)
        }
        fn add(&self, a: &u64, b: &u64) -> u64 {
            a + b
        }
        fn zero(&self) -> u64 {
            0
        }
        fn to_f64(&self, v: &u64) -> f64 {
            *v as f64
        }
        fn formatter(&self) -> &dyn ValueFormatter {
            &Ns
        }
    }

    struct Ns;
    impl ValueFormatter for Ns {
        fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
            let (f, u) = match ns {
                x if x < 1e3 => (1.0, "ns"),
                x if x < 1e6 => (1e-3, "µs"),
                x if x < 1e9 => (1e-6, "ms"),
                _ => (1e-9, "s"),
            };
            values.iter_mut().for_each(|v| *v *= f);
            u
        }
        fn scale_throughputs(&self, typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
            let (n, units): (f64, [&'static str; 4]) = match *t {
                Throughput::Bytes(b) | Throughput::BytesDecimal(b) => (b as f64, ["B/s", "KB/s", "MB/s", "GB/s"]),
                Throughput::Elements(e) => (e as f64, ["elem/s", "Kelem/s", "Melem/s", "Gelem/s"]),
                Throughput::Bits(b) => (b as f64, ["b/s", "Kb/s", "Mb/s", "Gb/s"]),
            };
            let per_s = n * 1e9 / typical;
            let i = match per_s {
                x if x < 1e3 => 0,
                x if x < 1e6 => 1,
                x if x < 1e9 => 2,
                _ => 3,
            };
            let d = 1e3f64.powi(i as i32);
            values.iter_mut().for_each(|v| *v = n * 1e9 / *v / d);
            units[i]
        }
        fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
            "ns"
        }
    }
}

use clock::Clock;

const SEQS: u64 = 16;
const SEQ_LEN: usize = 1024;
const LAYERS: u32 = 48;
const K: usize = 8;

/// One write shape: the header and the batch of every layer (`SEQS` sequences of `SEQ_LEN` rows).
struct Shape {
    name: String,
    header: TraceHeader,
    /// Per layer, per sequence: `[SEQ_LEN, K]` ids.
    ids: Vec<Vec<Array2<u32>>>,
    /// The same rows as stored bytes.
    stored: Vec<Vec<Vec<u8>>>,
    /// Per layer, the whole batch `[SEQS·SEQ_LEN, K]` (what a router returns for a packed batch).
    batch: Vec<Array2<u32>>,
}

impl Shape {
    fn new(e: usize) -> Self {
        let cfg = RouterConfig::builder(e, K).build().expect("config");
        // 16 distinct sequences of one layer; the other layers relabel the experts
        // (x → a·x + b mod E, a coprime with E) so that every layer's ids differ while keeping
        // the correlation of consecutive tokens that the codecs exploit.
        let g = SyntheticRoutes::new(cfg.clone(), vec![0], SEQS, SEQ_LEN);
        let t = g.generate().expect("synthetic");
        let header = TraceHeader::for_config(&cfg, &(0..LAYERS).collect::<Vec<_>>()).expect("header");
        let base: Vec<Array2<u32>> = (0..SEQS)
            .map(|s| t.to_dense(SeqId(s)).slice(s![.., 0, ..]).to_owned())
            .collect();
        const MULS: [u32; 8] = [1, 5, 7, 11, 13, 17, 19, 23];
        let ids: Vec<Vec<Array2<u32>>> = (0..LAYERS)
            .map(|l| {
                let (a, b) = (MULS[l as usize % MULS.len()], l * 37);
                base.iter()
                    .map(|x| x.mapv(|id| ((u64::from(id) * u64::from(a) + u64::from(b)) % e as u64) as u32))
                    .collect()
            })
            .collect();
        let wide = e > 256;
        let stored = ids
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|a| {
                        a.iter()
                            .flat_map(|&x| {
                                if wide {
                                    (x as u16).to_le_bytes().to_vec()
                                } else {
                                    vec![x as u8]
                                }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let batch = ids
            .iter()
            .map(|layer| {
                let mut batch = Array2::<u32>::zeros((SEQS as usize * SEQ_LEN, K));
                for (i, a) in layer.iter().enumerate() {
                    batch.slice_mut(s![i * SEQ_LEN..(i + 1) * SEQ_LEN, ..]).assign(a);
                }
                batch
            })
            .collect();
        Shape {
            name: format!("E{e}_K{K}"),
            header,
            ids,
            stored,
            batch,
        }
    }
    fn ids_per_iter(&self) -> u64 {
        SEQS * SEQ_LEN as u64 * K as u64 * u64::from(LAYERS)
    }
    fn layout(&self, pass: u64) -> BatchLayout {
        let lens: Vec<(SeqId, usize)> = (0..SEQS).map(|s| (SeqId(pass * SEQS + s), SEQ_LEN)).collect();
        BatchLayout::packed(&lens).expect("layout")
    }
}

/// Times `iters` runs of `body(writer, pass)` + `finish`, each on a fresh writer (created untimed).
fn time_writes(
    clock: Clock,
    path: &Path,
    shape: &Shape,
    opts: WriterOptions,
    iters: u64,
    body: impl Fn(&TraceWriter, u64),
) -> u64 {
    let mut total = 0;
    for it in 0..iters {
        let w = TraceWriter::create(path, shape.header.clone(), opts).expect("create");
        let t0 = clock.now();
        body(&w, it);
        black_box(w.finish().expect("finish"));
        total += clock.now() - t0;
    }
    total
}

fn bench_write(c: &mut Criterion<Clock>, clock: Clock, shape: &Shape, dir: &Path) {
    let path = dir.join(format!("w-{}.mrt", shape.name));
    let mut g = c.benchmark_group(format!("trace_write/{}", shape.name));
    g.throughput(Throughput::BytesDecimal(shape.ids_per_iter()));
    g.sample_size(10);
    for (name, comp) in [
        ("raw", Compression::None),
        ("zstd1", Compression::Zstd(1)),
        ("zstd3", Compression::Zstd(3)),
        ("rank_zstd3", Compression::ZstdRanked(3)),
    ] {
        let opts = WriterOptions {
            compression: comp,
            ..WriterOptions::default()
        };
        g.bench_function(format!("append_u32/{name}"), |b| {
            b.iter_custom(|iters| {
                time_writes(clock, &path, shape, opts, iters, |w, _| {
                    for (l, layer) in shape.ids.iter().enumerate() {
                        for (s, a) in layer.iter().enumerate() {
                            w.append(SeqId(s as u64), LayerId(l as u32), 0, a.view())
                                .expect("append");
                        }
                    }
                })
            })
        });
    }
    g.bench_function("append_stored/raw", |b| {
        b.iter_custom(|iters| {
            time_writes(clock, &path, shape, WriterOptions::uncompressed(), iters, |w, _| {
                for (l, layer) in shape.stored.iter().enumerate() {
                    for (s, a) in layer.iter().enumerate() {
                        w.append_stored(SeqId(s as u64), LayerId(l as u32), 0, a)
                            .expect("append");
                    }
                }
            })
        })
    });
    let shape_k = RouteShape {
        rows: shape.batch[0].nrows(),
        num_experts: shape.header.num_experts(),
        top_k: K,
    };
    g.bench_function("record_sink/raw", |b| {
        b.iter_custom(|iters| {
            let layout = shape.layout(0);
            let mut total = 0;
            for _ in 0..iters {
                let rec =
                    Record::create_file(&path, shape.header.clone(), WriterOptions::uncompressed()).expect("create");
                for (l, batch) in shape.batch.iter().enumerate() {
                    // The sink reads the ids in place, as `Router::record_ids` hands them.
                    let ids = batch.view();
                    let t0 = clock.now();
                    let site = CallSite::layer(l as u32).with_layout(&layout);
                    let sink = rec.recorder(&site, shape_k).expect("recorder").expect("sink");
                    sink(ids);
                    total += clock.now() - t0;
                }
                let t0 = clock.now();
                black_box(rec.finish().expect("finish"));
                total += clock.now() - t0;
            }
            total
        })
    });
    g.finish();

    let mut g = c.benchmark_group(format!("trace_memory/{}", shape.name));
    g.throughput(Throughput::BytesDecimal(shape.ids_per_iter()));
    g.sample_size(10);
    g.bench_function("append_u32", |b| {
        b.iter_custom(|iters| {
            let mut total = 0;
            for _ in 0..iters {
                let mut t = Trace::new(shape.header.clone());
                let t0 = clock.now();
                for (l, layer) in shape.ids.iter().enumerate() {
                    for (s, a) in layer.iter().enumerate() {
                        t.append(SeqId(s as u64), LayerId(l as u32), 0, a.view())
                            .expect("append");
                    }
                }
                total += clock.now() - t0;
                drop(t);
            }
            total
        })
    });
    g.bench_function("record_sink", |b| {
        b.iter_custom(|iters| {
            let layout = shape.layout(0);
            let mut total = 0;
            for _ in 0..iters {
                let rec = Record::in_memory(shape.header.clone());
                for (l, batch) in shape.batch.iter().enumerate() {
                    let ids = batch.view();
                    let t0 = clock.now();
                    let site = CallSite::layer(l as u32).with_layout(&layout);
                    let sink = rec.recorder(&site, shape_k).expect("recorder").expect("sink");
                    sink(ids);
                    total += clock.now() - t0;
                }
                drop(rec);
            }
            total
        })
    });
    g.finish();
}

fn bench_read(c: &mut Criterion<Clock>, clock: Clock, shape: &Shape, dir: &Path) {
    let mut g = c.benchmark_group(format!("trace_read/{}", shape.name));
    g.throughput(Throughput::BytesDecimal(shape.ids_per_iter()));
    g.sample_size(10);
    for (name, comp) in [("raw", Compression::None), ("rank_zstd3", Compression::ZstdRanked(3))] {
        let path = dir.join(format!("r-{}-{name}.mrt", shape.name));
        let w = TraceWriter::create(
            &path,
            shape.header.clone(),
            WriterOptions {
                compression: comp,
                ..WriterOptions::default()
            },
        )
        .expect("create");
        for (l, layer) in shape.ids.iter().enumerate() {
            for (s, a) in layer.iter().enumerate() {
                w.append(SeqId(s as u64), LayerId(l as u32), 0, a.view())
                    .expect("append");
            }
        }
        w.finish().expect("finish");
        g.bench_function(format!("open_verify/{name}"), |b| {
            b.iter_custom(|iters| {
                let t0 = clock.now();
                for _ in 0..iters {
                    black_box(TraceFile::open(&path).expect("open"));
                }
                clock.now() - t0
            })
        });
    }
    g.finish();
}

/// Records `t` through [`Record`] like an inference engine: a packed prefill of every sequence
/// (prompt lengths `prompt + (37·s mod 64)`), then `decode` steps of one token per sequence, each a
/// call per MoE layer with the batch padded to a multiple of 8 rows. Returns (file bytes, ids).
fn record_engine_style(
    path: &Path,
    t: &Trace,
    opts: WriterOptions,
    seqs: u64,
    prompt: usize,
    decode: usize,
) -> (u64, u64) {
    let header = t.header().clone();
    let k = header.top_k();
    let layers = header.layer_ids();
    let rec = Record::create_file(path, header.clone(), opts).expect("create");
    let call = |layout: &BatchLayout, li: usize| {
        let mut ids = Array2::<u32>::zeros((layout.rows(), k));
        for (r, addr) in layout.iter_rows().enumerate() {
            if let RowAddr::Token(seq, pos) = addr {
                t.read_rows(seq, LayerId(layers[li]), pos, ids.slice_mut(s![r..r + 1, ..]))
                    .expect("rows");
            }
        }
        let site = CallSite::layer(layers[li]).with_layout(layout);
        let shape = RouteShape {
            rows: layout.rows(),
            num_experts: header.num_experts(),
            top_k: k,
        };
        rec.recorder(&site, shape).expect("recorder").expect("sink")(ids.view());
    };
    let lens: Vec<(SeqId, usize)> = (0..seqs).map(|s| (SeqId(s), prompt + (s as usize * 37) % 64)).collect();
    let prefill = BatchLayout::packed(&lens).expect("layout");
    for li in 0..layers.len() {
        call(&prefill, li);
    }
    let mut ids = lens.iter().map(|&(_, l)| l as u64).sum::<u64>() * layers.len() as u64;
    for step in 0..decode {
        let mut segs: Vec<Segment> = lens
            .iter()
            .map(|&(seq, l)| Segment::Tokens {
                seq,
                start: (l + step) as u64,
                len: 1,
            })
            .collect();
        segs.push(Segment::Padding {
            len: (8 - lens.len() % 8) % 8,
        });
        let layout = BatchLayout::new(segs).expect("layout");
        for li in 0..layers.len() {
            call(&layout, li);
        }
        ids += seqs * layers.len() as u64;
    }
    rec.finish().expect("finish");
    (std::fs::metadata(path).expect("size").len(), ids * k as u64)
}

/// Prints bytes per id of engine-style recordings (E = 128, K = 8, 48 MoE layers, synthetic
/// routes with ρ = 0.9) for each codec.
fn print_engine_sizes(dir: &Path) {
    let cfg = RouterConfig::builder(128, 8).build().expect("config");
    println!("engine-style recording, E = 128, K = 8, 48 layers: bytes per id (whole file)");
    println!("| sequences | prompt | decode steps | raw | zstd 3 | rank+zstd 3 |");
    println!("|---|---|---|---|---|---|");
    for (seqs, prompt, decode) in [(16u64, 256usize, 512usize), (64, 128, 256), (256, 64, 64)] {
        let t = SyntheticRoutes::new(cfg.clone(), (0..48).collect(), seqs, prompt + 64 + decode)
            .generate()
            .expect("synthetic");
        let mut line = format!("| {seqs} | {prompt}–{} | {decode} |", prompt + 63);
        for c in [Compression::None, Compression::Zstd(3), Compression::ZstdRanked(3)] {
            let opts = WriterOptions {
                compression: c,
                chunk_max_age: None,
                ..WriterOptions::default()
            };
            let (bytes, ids) = record_engine_style(&dir.join("sizes.mrt"), &t, opts, seqs, prompt, decode);
            line += &format!(" {:.4} |", bytes as f64 / ids as f64);
        }
        println!("{line}");
    }
}

/// Prints bytes per id of whole traces written lane by lane ([`Trace::write_file`]: 8 layers × 4
/// sequences × 1024 tokens, E = 128, K = 8, synthetic routes) for each correlation ρ and codec,
/// with the mean overlap `|ids(t) ∩ ids(t+1)| / K` of consecutive tokens.
fn print_rho_sizes(dir: &Path) {
    let cfg = RouterConfig::builder(128, 8).build().expect("config");
    println!("8 layers × 4 sequences × 1024 tokens, E = 128, K = 8: bytes per id (whole file)");
    println!("| ρ | overlap | raw | zstd 3 | zstd 19 | rank+zstd 3 | rank+zstd 19 |");
    println!("|---|---|---|---|---|---|---|");
    for rho in [0.0, 0.5, 0.8, 0.9, 0.95] {
        let mut g = SyntheticRoutes::new(cfg.clone(), (0..8).collect(), 4, 1024);
        g.rho = rho;
        let t = g.generate().expect("synthetic");
        let (mut shared, mut pairs) = (0usize, 0usize);
        for lane in t.lanes() {
            for r in lane.runs {
                for w in r.bytes.chunks_exact(K).collect::<Vec<_>>().windows(2) {
                    shared += w[1].iter().filter(|x| w[0].contains(x)).count();
                    pairs += 1;
                }
            }
        }
        let ids = t.summary().ids as f64;
        let mut line = format!("| {rho} | {:.2} |", shared as f64 / (pairs * K) as f64);
        for c in [
            Compression::None,
            Compression::Zstd(3),
            Compression::Zstd(19),
            Compression::ZstdRanked(3),
            Compression::ZstdRanked(19),
        ] {
            let p = dir.join("rho.mrt");
            let opts = WriterOptions {
                compression: c,
                chunk_max_age: None,
                ..WriterOptions::default()
            };
            t.write_file(&p, opts).expect("write");
            line += &format!(" {:.3} |", std::fs::metadata(&p).expect("size").len() as f64 / ids);
        }
        println!("{line}");
    }
}

fn main() {
    let clock = Clock::from_env();
    let dir = std::env::temp_dir().join(format!("moe-router-bench-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    print_engine_sizes(&dir);
    print_rho_sizes(&dir);
    if std::env::var("BENCH_SIZES_ONLY").is_ok_and(|v| v == "1") {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let mut c = Criterion::default().with_measurement(clock).configure_from_args();
    for e in [128usize, 256, 384] {
        let shape = Shape::new(e);
        bench_write(&mut c, clock, &shape, &dir);
        bench_read(&mut c, clock, &shape, &dir);
    }
    c.final_summary();
    let _ = std::fs::remove_dir_all(&dir);
}
