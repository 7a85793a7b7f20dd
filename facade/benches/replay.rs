//! Record and replay against plain CPU routing (issue 3, item 9): `Replayed<CpuRouter, Record>`
//! (in memory and streaming to a `.mrt` file) and `Replayed<CpuRouter, ReplayFromFile>` (ids
//! looked up in a memory-mapped trace, then `weights_for`) versus `CpuRouter::route` on the same
//! batch, portable numerics.
//!
//! Shapes: Qwen3-30B-A3B-like (E = 128, K = 8, softmax before top-K, renormalised, 48 MoE layers)
//! and DeepSeek-V3-like (E = 256, K = 8, sigmoid + bias, 8 groups / top 4, scaling 2.5, MoE layers
//! 3..61), batches of T ∈ {4096, 65536} tokens packed from sequences of 1024 tokens. Recording and
//! replay walk through the model's layers (one layer per call, as a model would); recording uses a
//! new set of sequences for every pass over the layers.
//!
//! Time is the **process CPU time** (`CLOCK_PROCESS_CPUTIME_ID`: every thread — rayon workers,
//! the trace writer's background thread — including threads that have exited), so results hold
//! on a shared, loaded machine. `BENCH_CLOCK=wall` switches to wall time.
//!
//! Run: `cargo bench -p moe-router-cpu --bench replay -- --quick` (filter e.g. `qwen3_E128_T4096`).
//! `PAIRED=1` (optionally `PAIRED_ROUNDS=n`, `PAIRED_ONLY=1`) also prints an interleaved
//! comparison: every round runs each variant once, and the medians and per-round ratios are
//! printed (robust to drift in background load).

#![allow(missing_docs)]

use criterion::{Criterion, Throughput};
use moe_router::cpu::CpuRouter;
use moe_router::policy::{Record, Replay, ReplayFromFile};
use moe_router::trace::{TraceFile, TraceHeader, WriterOptions};
use moe_router::{
    BatchLayout, CallSite, GroupScore, LogitsRef, Normalization, Numerics, Replayed, Router, RouterConfig,
    ScoreFunction, SeqId, SoftmaxPosition,
};
use ndarray::Array2;
use std::hint::black_box;
use std::path::{Path, PathBuf};

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
        pub fn name(&self) -> &'static str {
            if self.cpu { "process CPU time" } else { "wall time" }
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

const SEQ_LEN: usize = 1024;

fn logits(t: usize, e: usize) -> Array2<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    Array2::from_shape_fn((t, e), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
    })
}

fn qwen3() -> RouterConfig {
    RouterConfig::builder(128, 8)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .numerics(Numerics::Portable)
        .build()
        .expect("valid")
}

fn deepseek_v3() -> RouterConfig {
    let e = 256;
    let bias: Vec<f32> = (0..e).map(|i| ((i * 37) % 17) as f32 * 0.01 - 0.08).collect();
    RouterConfig::builder(e, 8)
        .score(ScoreFunction::Sigmoid)
        .expert_bias(bias)
        .group_limit(8, 4, GroupScore::SumTopN(2))
        .normalization(Normalization::Sum { eps: 1e-20 })
        .scaling_factor(2.5)
        .numerics(Numerics::Portable)
        .build()
        .expect("valid")
}

/// One benchmark shape: a routing rule, its MoE layers and a batch.
struct Case {
    name: String,
    cfg: RouterConfig,
    layers: Vec<u32>,
    logits: &'static Array2<f32>,
    dir: PathBuf,
}

impl Case {
    fn new(rule: &str, cfg: RouterConfig, layers: Vec<u32>, t: usize, dir: &Path) -> Self {
        let e = cfg.num_experts();
        Case {
            name: format!("{rule}_E{e}_T{t}"),
            // Leaked once per case so that `LogitsRef<'static>` can be shared by the closures.
            logits: Box::leak(Box::new(logits(t, e))),
            cfg,
            layers,
            dir: dir.to_path_buf(),
        }
    }
    fn rows(&self) -> usize {
        self.logits.nrows()
    }
    fn header(&self) -> TraceHeader {
        TraceHeader::for_config(&self.cfg, &self.layers).expect("header")
    }
    /// The batch of pass `pass`: sequences of [`SEQ_LEN`] tokens, new ids for every pass.
    fn layout(&self, pass: u64) -> BatchLayout {
        let n = self.rows().div_ceil(SEQ_LEN) as u64;
        let lens: Vec<(SeqId, usize)> = (0..n)
            .map(|i| (SeqId(pass * n + i), SEQ_LEN.min(self.rows() - i as usize * SEQ_LEN)))
            .collect();
        BatchLayout::packed(&lens).expect("layout")
    }
    /// Call `i` of a walk through the model: (layer, pass).
    fn step(&self, i: u64) -> (u32, u64) {
        let l = self.layers.len() as u64;
        (self.layers[(i % l) as usize], i / l)
    }
    /// A trace file holding pass 0 of every layer, recorded through the CPU router.
    fn record_file(&self) -> PathBuf {
        let path = self.dir.join(format!("{}.mrt", self.name));
        let rec = Record::create_file(&path, self.header(), WriterOptions::default()).expect("create");
        let r = Replayed::new(CpuRouter::new(self.cfg.clone()), rec.clone());
        let layout = self.layout(0);
        let lr = LogitsRef::F32(self.logits.view());
        for &l in &self.layers {
            r.route(&lr, &CallSite::layer(l).with_layout(&layout)).expect("record");
        }
        rec.finish().expect("finish");
        path
    }
}

/// Runs calls `first..first + n` of a layer walk through `route`; layouts are cached per pass.
fn walk(case: &Case, first: u64, n: u64, pass_of: impl Fn(u64) -> u64, route: impl Fn(&CallSite<'_>)) {
    let mut cached: Option<(u64, BatchLayout)> = None;
    for i in first..first + n {
        let (layer, pass) = case.step(i);
        let pass = pass_of(pass);
        if cached.as_ref().is_none_or(|c| c.0 != pass) {
            cached = Some((pass, case.layout(pass)));
        }
        let layout = cached.as_ref().map(|c| &c.1).expect("set");
        route(&CallSite::layer(layer).with_layout(layout));
    }
}

/// Routes one call through `r` and drops the result.
fn call<R: Router>(r: &R, logits: &R::Logits<'_>, site: &CallSite<'_>) {
    black_box(r.route(logits, site).expect("route"));
}

fn bench_case(c: &mut Criterion<Clock>, case: &Case, clock: Clock) {
    let rows = case.rows();
    let lr = LogitsRef::F32(case.logits.view());
    let plain = CpuRouter::new(case.cfg.clone());
    let file = case.record_file();
    let replay: ReplayFromFile = Replay::new(TraceFile::open(&file).expect("open"), &case.layers).expect("replay");
    let replayed = Replayed::new(CpuRouter::new(case.cfg.clone()), &replay);

    let mut g = c.benchmark_group(format!("record_replay/{}", case.name));
    g.throughput(Throughput::Elements(rows as u64));
    g.sample_size(10);
    g.bench_function("route", |b| {
        b.iter_custom(|iters| {
            let t0 = clock.now();
            walk(case, 0, iters, |_| 0, |s| call(&plain, &lr, s));
            clock.now() - t0
        })
    });
    g.bench_function("record_in_memory", |b| {
        b.iter_custom(|iters| {
            let rec = Record::in_memory(case.header());
            let r = Replayed::new(CpuRouter::new(case.cfg.clone()), rec);
            let t0 = clock.now();
            walk(case, 0, iters, |p| p, |s| call(&r, &lr, s));
            let dt = clock.now() - t0;
            drop(r);
            dt
        })
    });
    let wpath = case.dir.join(format!("{}-rec.mrt", case.name));
    g.bench_function("record_to_file", |b| {
        b.iter_custom(|iters| {
            let rec = Record::create_file(&wpath, case.header(), WriterOptions::default()).expect("create");
            let r = Replayed::new(CpuRouter::new(case.cfg.clone()), rec.clone());
            let t0 = clock.now();
            walk(case, 0, iters, |p| p, |s| call(&r, &lr, s));
            rec.finish().expect("finish");
            let dt = clock.now() - t0;
            drop(r);
            let _ = std::fs::remove_file(&wpath);
            dt
        })
    });
    g.bench_function("replay_from_file", |b| {
        let mut i = 0u64;
        b.iter_custom(|iters| {
            let t0 = clock.now();
            walk(case, i, iters, |_| 0, |s| call(&replayed, &lr, s));
            i += iters;
            clock.now() - t0
        })
    });
    // Diagnostics: the parts of a replay.
    let site_layout = case.layout(0);
    let site = CallSite::layer(case.layers[0]).with_layout(&site_layout);
    let ids = plain.route(&lr, &site).expect("route").ids;
    g.bench_function("part_weights_for", |b| {
        b.iter(|| black_box(plain.weights_for(&lr, &ids, &site).expect("weights")))
    });
    // The recording work alone: the host copy of the ids that `Router::record_ids` makes, and
    // that copy handed to the `Record` sink (in memory / to a file), one layer walk as above.
    let shape = moe_router::RouteShape {
        rows,
        num_experts: case.cfg.num_experts(),
        top_k: case.cfg.top_k(),
    };
    g.bench_function("part_copy_ids", |b| b.iter(|| black_box(ids.clone())));
    let sink_walk = |rec: &Record, iters: u64| {
        walk(
            case,
            0,
            iters,
            |p| p,
            |s| {
                let sink = moe_router::ReplayPolicy::recorder(rec, s, shape)
                    .expect("recorder")
                    .expect("sink");
                sink(ids.view());
            },
        )
    };
    g.bench_function("part_record_sink_memory", |b| {
        b.iter_custom(|iters| {
            let rec = Record::in_memory(case.header());
            let t0 = clock.now();
            sink_walk(&rec, iters);
            let dt = clock.now() - t0;
            drop(rec);
            dt
        })
    });
    g.bench_function("part_record_sink_file", |b| {
        b.iter_custom(|iters| {
            let rec = Record::create_file(&wpath, case.header(), WriterOptions::default()).expect("create");
            let t0 = clock.now();
            sink_walk(&rec, iters);
            rec.finish().expect("finish");
            let dt = clock.now() - t0;
            let _ = std::fs::remove_file(&wpath);
            dt
        })
    });
    g.bench_function("part_plan_from_file", |b| {
        b.iter(|| black_box(moe_router::ReplayPolicy::plan(&replay, &site, shape).expect("plan")))
    });
    g.finish();
}

/// A policy that routes and asks for the ids, then drops them: what `Replayed` and
/// `Router::record_ids` (a host copy of the ids) cost before any recording work — the floor of
/// the record overhead that the trace code cannot remove.
#[derive(Debug, Clone, Copy)]
struct DiscardIds;

impl moe_router::ReplayPolicy for DiscardIds {
    fn plan(
        &self,
        _site: &CallSite<'_>,
        _shape: moe_router::RouteShape,
    ) -> Result<moe_router::Plan, moe_router::ReplayError> {
        Ok(moe_router::Plan::Route)
    }
    fn recorder(
        &self,
        _site: &CallSite<'_>,
        _shape: moe_router::RouteShape,
    ) -> Result<Option<moe_router::IdsSink>, moe_router::ReplayError> {
        Ok(Some(Box::new(|ids| {
            black_box(ids);
        })))
    }
}

/// Interleaved rounds: each variant once per round (rotating order); prints medians and ratios.
fn paired(case: &Case, clock: Clock, rounds: usize) {
    let lr = LogitsRef::F32(case.logits.view());
    let plain = CpuRouter::new(case.cfg.clone());
    let file = case.record_file();
    let replay: ReplayFromFile = Replay::new(TraceFile::open(&file).expect("open"), &case.layers).expect("replay");
    let replayed = Replayed::new(CpuRouter::new(case.cfg.clone()), &replay);
    let mem = Replayed::new(CpuRouter::new(case.cfg.clone()), Record::in_memory(case.header()));
    let wpath = case.dir.join(format!("{}-paired.mrt", case.name));
    let rec = Record::create_file(&wpath, case.header(), WriterOptions::default()).expect("create");
    let to_file = Replayed::new(CpuRouter::new(case.cfg.clone()), rec.clone());
    let discard = Replayed::new(CpuRouter::new(case.cfg.clone()), DiscardIds);
    let names = [
        "route",
        "record_in_memory",
        "record_to_file",
        "replay_from_file",
        "copy_ids_only",
    ];
    let mut t = vec![Vec::with_capacity(rounds); names.len()];
    for (n, round) in (0..rounds + 2).enumerate() {
        let n = n as u64;
        for j in 0..names.len() {
            let v = (round + j) % names.len();
            let t0 = clock.now();
            match v {
                0 => {
                    let (layer, _) = case.step(n);
                    let layout = case.layout(0);
                    black_box(
                        plain
                            .route(&lr, &CallSite::layer(layer).with_layout(&layout))
                            .expect("route"),
                    );
                }
                1 => walk(case, n, 1, |p| p, |s| call(&mem, &lr, s)),
                2 => walk(case, n, 1, |p| p, |s| call(&to_file, &lr, s)),
                3 => walk(case, n, 1, |_| 0, |s| call(&replayed, &lr, s)),
                _ => walk(case, n, 1, |p| p, |s| call(&discard, &lr, s)),
            }
            let dt = clock.now() - t0;
            if round >= 2 {
                t[v].push(dt as f64);
            }
        }
    }
    let t0 = clock.now();
    rec.finish().expect("finish");
    let finish = clock.now() - t0;
    let _ = std::fs::remove_file(&wpath);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("paired {} ({}, {rounds} rounds):", case.name, clock.name());
    for (i, n) in names.iter().enumerate() {
        let ratios: Vec<f64> = t[i].iter().zip(&t[0]).map(|(a, b)| a / b).collect();
        println!(
            "  {n:<18} median {:>10.1} µs  mean {:>10.1} µs  median ratio to route {:.4}  (ratio of means {:.4})",
            median(&t[i]) / 1e3,
            mean(&t[i]) / 1e3,
            median(&ratios),
            mean(&t[i]) / mean(&t[0]),
        );
    }
    println!("  (record_to_file finish: {:.1} µs once)", finish as f64 / 1e3);
}

fn main() {
    let clock = Clock::from_env();
    let dir = std::env::temp_dir().join(format!("moe-router-bench-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let qwen_layers: Vec<u32> = (0..48).collect();
    let dsv3_layers: Vec<u32> = (3..61).collect();
    let mut cases = Vec::new();
    for t in [4096usize, 65536] {
        cases.push(Case::new("qwen3", qwen3(), qwen_layers.clone(), t, &dir));
        cases.push(Case::new("deepseek_v3", deepseek_v3(), dsv3_layers.clone(), t, &dir));
    }
    let paired_only = std::env::var("PAIRED_ONLY").is_ok();
    if !paired_only {
        let mut c = Criterion::default().with_measurement(clock).configure_from_args();
        for case in &cases {
            bench_case(&mut c, case, clock);
        }
        c.final_summary();
    }
    if paired_only || std::env::var("PAIRED").is_ok() {
        let rounds = std::env::var("PAIRED_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200usize);
        let filter = std::env::var("PAIRED_FILTER").unwrap_or_default();
        for case in cases.iter().filter(|c| c.name.contains(&filter)) {
            let r = if case.rows() > 8192 { rounds / 8 } else { rounds }.max(5);
            paired(case, clock, r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
