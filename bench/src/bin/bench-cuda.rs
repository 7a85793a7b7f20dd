//! Benchmark of the CUDA router on the GPU machine: µs per call, GB/s and the ratio to a
//! device-to-device copy measured in the same run.
//!
//! Routing table (issue 14): route and replay for T ∈ {1, 8, 64, 4096, 16384, 65536, 262144},
//! the rules DeepSeek-V3, Qwen3, Kimi-K2 and Qwen3-Next, f32 and bf16 logits, portable and
//! native numerics; the automatic kernel choice against the previous one (row kernels below
//! T = 2048, tile kernels above), the warp kernels without programmatic dependent launch at
//! small T, and SGLang's published H200 numbers where they exist. Method: for T ≤ 4096, µs per
//! call under CUDA-graph replay (20 calls per graph, each on its own input window); above,
//! CUDA events around back-to-back launches of the launch-only API, warm-up first, median of 5
//! repeats, inputs rotated over a pool larger than L2. Bytes counted: logits read once + ids
//! and weights written (route) or ids read + weights written (replay).
//!
//! Recording table: route vs route + static record buffer, and the host-side cost of
//! asynchronous recording (side stream + pinned memory) through `Router::record_ids`.
//!
//! Backward (`Router::weights_vjp`, launch-only `CudaRouter::enqueue_backward` into
//! preallocated `GradBuffers`): DeepSeek-V3 and Qwen3, f32 and bf16 logits, portable and
//! native, no aux loss and no z-loss (the sparse kernel), plus one line per rule with the
//! z-loss (the dense kernel: softmax over E). Bytes counted: logits read + gradient written
//! (T·E·4) + ids and upstream gradient read (T·K·8).
//!
//! Last, a summary table: every measured case that has an issue-14 target (op, rule, dtype,
//! numerics, T, µs, GB/s, % of copy, the target, met or missed).
//!
//! Usage: `bench-cuda [--quick] [--routing] [--record] [--backward] [--profile]` prints Markdown
//! tables (`--routing`: the routing table only; `--record`: the recording table only;
//! `--backward`: the backward table only). `--profile` times nothing: it launches each kernel of
//! the issue-14 targets once between `cuProfilerStart` and `cuProfilerStop` (warm-up outside),
//! numbering the launches, for a hardware-counter profile under Nsight Compute:
//! `ncu --profile-from-start off --section SpeedOfLight ... bench-cuda --profile` (the profiled
//! kernels come in the printed order).
//! `BENCH_RULES=DeepSeek-V3,Qwen3` (default: the four rules above; Mixtral may be added) and
//! `BENCH_TS=65536,262144` restrict the rules and batch sizes of the routing table;
//! `BENCH_BACKWARD_TS` the batch sizes of the backward table (default 262144).

#![allow(unsafe_code)]

use moe_router::cuda::cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use moe_router::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use moe_router::cuda::kernels::{LogitsDtype, Part, RouterVariant, ScoreKind, TILE_KMAX, WARP_NE};
use moe_router::cuda::{CudaRouter, DeviceLogits, KernelChoice, LogitsView, RouteError};
use moe_router::{CallSite, GroupScore, LossGrads, Normalization, Numerics, Router, RouterConfig, ScoreFunction};
use std::sync::Arc;
use std::time::Instant;

const FILL: &str = r#"
extern "C" __global__ void fill(float* f, unsigned short* h, long long n, unsigned seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned x = (unsigned)i * 2654435761u ^ seed;
        x ^= x >> 15; x *= 2246822519u; x ^= x >> 13; x *= 3266489917u; x ^= x >> 16;
        unsigned y = x * 747796405u + 2891336453u; y ^= y >> 17;
        float a = (float)(x & 0xffffff) * (1.0f / 16777216.0f), b = (float)(y & 0xffffff) * (1.0f / 16777216.0f);
        float v = (a + b - 1.0f) * 4.0f;
        f[i] = v;
        h[i] = (unsigned short)(__float_as_uint(v) >> 16);
    }
}
"#;

struct Rule {
    name: &'static str,
    cfg: RouterConfig,
}

fn rules(numerics: Numerics) -> Vec<Rule> {
    let bias = |e: usize| -> Vec<f32> { (0..e).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect() };
    let sm = |e: usize, k: usize| {
        RouterConfig::builder(e, k)
            .score(ScoreFunction::Softmax)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .numerics(numerics)
            .build()
            .expect("valid")
    };
    vec![
        Rule {
            name: "DeepSeek-V3",
            cfg: RouterConfig::builder(256, 8)
                .score(ScoreFunction::Sigmoid)
                .expert_bias(bias(256))
                .group_limit(8, 4, GroupScore::SumTopN(2))
                .normalization(Normalization::Sum { eps: 1e-20 })
                .scaling_factor(2.5)
                .numerics(numerics)
                .build()
                .expect("valid"),
        },
        Rule {
            name: "Qwen3",
            cfg: sm(128, 8),
        },
        Rule {
            name: "Kimi-K2",
            cfg: RouterConfig::builder(384, 8)
                .score(ScoreFunction::Sigmoid)
                .expert_bias(bias(384))
                .group_limit(1, 1, GroupScore::SumTopN(2))
                .normalization(Normalization::Sum { eps: 1e-20 })
                .scaling_factor(2.827)
                .numerics(numerics)
                .build()
                .expect("valid"),
        },
        Rule {
            name: "Qwen3-Next",
            cfg: sm(512, 10),
        },
        Rule {
            name: "Mixtral",
            cfg: sm(8, 2),
        },
    ]
}

/// A pool of random logits on the device (f32 and the bf16 rounding of the same values).
struct Pool {
    f32: CudaSlice<f32>,
    bf16: CudaSlice<u16>,
    n: usize,
}

fn pool(stream: &Arc<CudaStream>, n: usize) -> Result<Pool, RouteError> {
    let dev =
        |e: moe_router::cuda::cudarc::driver::DriverError| RouteError::device_with_source("cuda", format!("{e:?}"), e);
    let ptx =
        moe_router::cuda::cudarc::nvrtc::compile_ptx(FILL).map_err(|e| RouteError::device("cuda", format!("{e:?}")))?;
    let m = stream.context().load_module(ptx).map_err(dev)?;
    let f = m.load_function("fill").map_err(dev)?;
    // SAFETY: written by the fill kernel below before any read.
    let mut a = unsafe { stream.alloc::<f32>(n) }.map_err(dev)?;
    // SAFETY: as above.
    let mut b = unsafe { stream.alloc::<u16>(n) }.map_err(dev)?;
    let nn = n as i64;
    let seed = 0x1234_5678u32;
    let mut l = stream.launch_builder(&f);
    l.arg(&mut a).arg(&mut b).arg(&nn).arg(&seed);
    // SAFETY: fill(float*, unsigned short*, long long, unsigned) writes n elements of each.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (4096, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(dev)?;
    stream.synchronize().map_err(dev)?;
    Ok(Pool { f32: a, bf16: b, n })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median µs per call of `f` (called with the iteration index), timed with CUDA events.
fn time_calls(
    stream: &Arc<CudaStream>,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<(), RouteError>,
) -> Result<f64, RouteError> {
    let dev =
        |e: moe_router::cuda::cudarc::driver::DriverError| RouteError::device_with_source("cuda", format!("{e:?}"), e);
    for i in 0..3 {
        f(i)?;
    }
    let mut samples = Vec::new();
    for rep in 0..5 {
        let a = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(dev)?;
        for i in 0..iters {
            f(rep * iters + i)?;
        }
        let b = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(dev)?;
        let ms = a.elapsed_ms(&b).map_err(dev)?;
        samples.push(f64::from(ms) * 1e3 / iters as f64);
    }
    Ok(median(samples))
}

/// SGLang's Triton router on an H200 (issue 14; µs per call, CUDA graph): (rule, dtype, T, µs).
const SGLANG: [(&str, &str, usize, f64); 24] = [
    ("DeepSeek-V3", "f32", 1, 3.09),
    ("DeepSeek-V3", "f32", 64, 3.20),
    ("DeepSeek-V3", "f32", 4096, 10.3),
    ("DeepSeek-V3", "f32", 16_384, 33.9),
    ("DeepSeek-V3", "f32", 65_536, 126.0),
    ("DeepSeek-V3", "f32", 262_144, 493.0),
    ("DeepSeek-V3", "bf16", 1, 3.35),
    ("DeepSeek-V3", "bf16", 64, 3.47),
    ("DeepSeek-V3", "bf16", 4096, 12.1),
    ("DeepSeek-V3", "bf16", 16_384, 41.3),
    ("DeepSeek-V3", "bf16", 65_536, 155.0),
    ("DeepSeek-V3", "bf16", 262_144, 608.0),
    ("Qwen3", "f32", 1, 2.81),
    ("Qwen3", "f32", 64, 2.97),
    ("Qwen3", "f32", 4096, 5.9),
    ("Qwen3", "f32", 16_384, 16.0),
    ("Qwen3", "f32", 65_536, 54.7),
    ("Qwen3", "f32", 262_144, 207.0),
    ("Qwen3", "bf16", 1, 2.43),
    ("Qwen3", "bf16", 64, 2.52),
    ("Qwen3", "bf16", 4096, 5.4),
    ("Qwen3", "bf16", 16_384, 13.3),
    ("Qwen3", "bf16", 65_536, 45.2),
    ("Qwen3", "bf16", 262_144, 171.0),
];

/// Calls per CUDA graph at small T (each on its own window of the pool).
const GRAPH_CALLS: usize = 20;

/// µs per call of `enqueue(i)`: under CUDA-graph replay ([`GRAPH_CALLS`] calls per graph, on
/// windows `0..GRAPH_CALLS`) when `graph`, else back-to-back launches on rotated windows.
fn time_op(
    stream: &Arc<CudaStream>,
    graph: bool,
    iters: usize,
    mut enqueue: impl FnMut(usize) -> Result<(), RouteError>,
) -> Result<f64, RouteError> {
    let dev =
        |e: moe_router::cuda::cudarc::driver::DriverError| RouteError::device_with_source("cuda", format!("{e:?}"), e);
    if !graph {
        return time_calls(stream, iters, enqueue);
    }
    // Warm (compile, first-launch costs) outside the capture.
    enqueue(0)?;
    stream.synchronize().map_err(dev)?;
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(dev)?;
    let mut res = Ok(());
    for i in 0..GRAPH_CALLS {
        if let Err(e) = enqueue(i) {
            res = Err(e);
            break;
        }
    }
    let g = stream.end_capture(CUgraphInstantiate_flags(0)).map_err(dev)?;
    res?;
    let Some(g) = g else {
        return Err(RouteError::device("cuda", "the capture produced no graph".to_string()));
    };
    g.upload().map_err(dev)?;
    Ok(time_calls(stream, 10, |_| g.launch().map_err(dev))? / GRAPH_CALLS as f64)
}

/// One line of the closing summary: a measured case that has an issue-14 target.
struct Line {
    op: &'static str,
    rule: String,
    dtype: &'static str,
    numerics: &'static str,
    t: usize,
    us: f64,
    /// GB/s and % of the same-run copy (none for the record overhead).
    gbs: Option<(f64, f64)>,
    target: String,
    met: bool,
}

/// The lines of the closing summary, in the order measured.
#[derive(Default)]
struct Summary(Vec<Line>);

impl Summary {
    /// The route/replay targets of a case (size targets and the SGLang comparison), if any.
    #[allow(clippy::too_many_arguments)]
    fn routing(
        &mut self,
        rule: &str,
        dtype: &'static str,
        numerics: Numerics,
        replay: bool,
        t: usize,
        us: f64,
        gbs: f64,
        pct: f64,
        sglang: Option<f64>,
    ) {
        let portable = numerics == Numerics::Portable;
        let main2 = rule == "DeepSeek-V3" || rule == "Qwen3";
        let mut targets: Vec<(String, bool)> = Vec::new();
        if replay {
            if t == 262_144 {
                targets.push(("≥ 70% of copy".into(), pct >= 70.0));
            }
        } else {
            if main2 && dtype == "bf16" && t <= 64 {
                let lim = if portable { 2.5 } else { 2.0 };
                targets.push((format!("≤ {lim} µs"), us <= lim));
            }
            if main2 && t == 16_384 {
                targets.push(("≥ 25% of copy".into(), pct >= 25.0));
            }
            if t >= 65_536 {
                let lim = if portable { 40.0 } else { 50.0 };
                targets.push((format!("≥ {lim:.0}% of copy"), pct >= lim));
            }
            if let Some(sg) = sglang {
                targets.push((format!("faster than SGLang's {sg:.2} µs"), us < sg));
            }
        }
        if targets.is_empty() {
            return;
        }
        self.0.push(Line {
            op: if replay { "replay" } else { "route" },
            rule: rule.to_string(),
            dtype,
            numerics: numerics_name(numerics),
            t,
            us,
            gbs: Some((gbs, pct)),
            target: targets.iter().map(|x| x.0.as_str()).collect::<Vec<_>>().join("; "),
            met: targets.iter().all(|x| x.1),
        });
    }

    /// Prints the summary table.
    fn print(&self, copy_gbs: f64) {
        if self.0.is_empty() {
            return;
        }
        println!(
            "\nSummary: every case of this run with an issue-14 target (same-run copy {copy_gbs:.0} GB/s; record: host wall \
             time per host-synchronous `route()` with asynchronous `record_ids`, against the same loop without):\n"
        );
        println!("| op | rule | dtype | numerics | T | µs | GB/s | % copy | target | status |");
        println!("|---|---|---|---|---:|---:|---:|---:|---|---|");
        for l in &self.0 {
            let (g, p) = match l.gbs {
                Some((g, p)) => (format!("{g:.0}"), format!("{p:.1}%")),
                None => (String::new(), String::new()),
            };
            println!(
                "| {} | {} | {} | {} | {} | {:.2} | {g} | {p} | {} | {} |",
                l.op,
                l.rule,
                l.dtype,
                l.numerics,
                l.t,
                l.us,
                l.target,
                if l.met { "met" } else { "missed" }
            );
        }
        let met = self.0.iter().filter(|l| l.met).count();
        println!("\n{met} of {} cases meet their targets.", self.0.len());
    }
}

fn numerics_name(n: Numerics) -> &'static str {
    if n == Numerics::Portable { "portable" } else { "native" }
}

fn main() -> Result<(), RouteError> {
    let quick = std::env::args().any(|a| a == "--quick");
    let backward_only = std::env::args().any(|a| a == "--backward");
    let routing_only = std::env::args().any(|a| a == "--routing");
    let record_only = std::env::args().any(|a| a == "--record");
    let profile_only = std::env::args().any(|a| a == "--profile");
    moe_router::cuda::probe()?;
    let t0 = Instant::now();
    let probe_router = CudaRouter::new(RouterConfig::builder(8, 2).build().expect("valid"))?;
    let stream = probe_router.stream().clone();
    let dev =
        |e: moe_router::cuda::cudarc::driver::DriverError| RouteError::device_with_source("cuda", format!("{e:?}"), e);
    println!("# CUDA router benchmark on {}", probe_router.device_name());
    // Every kernel variant the rules need, compiled in parallel.
    let mut variants = Vec::new();
    for dtype in [LogitsDtype::F32, LogitsDtype::Bf16] {
        for portable in [true, false] {
            for score in [ScoreKind::Sigmoid, ScoreKind::SoftmaxAfter] {
                let parts = std::iter::once(Part::Row)
                    .chain(TILE_KMAX.iter().map(|&n| Part::Tile(n)))
                    .chain(WARP_NE.iter().map(|&n| Part::Warp(n)));
                for part in parts {
                    variants.push(RouterVariant {
                        dtype,
                        portable,
                        score,
                        part,
                    });
                }
            }
        }
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4);
    moe_router::cuda::precompile(0, &variants, threads)?;
    eprintln!("kernels compiled in {:.1} s", t0.elapsed().as_secs_f64());
    // Pool: the largest input (T = 262144, E = 512) twice, at least 256 MB.
    let tmax = 262_144usize;
    let pool_n = (2 * tmax * 512).max(64 << 20);
    let pool = pool(&stream, pool_n)?;
    // Device-to-device copy of 256 MiB of f32, the bandwidth reference.
    let copy_n = 64 << 20;
    // SAFETY: copy destination, never read.
    let mut dst = unsafe { stream.alloc::<f32>(copy_n) }.map_err(dev)?;
    let copy_us = time_calls(&stream, 10, |_| {
        stream.memcpy_dtod(&pool.f32.slice(0..copy_n), &mut dst).map_err(dev)
    })?;
    let copy_gbs = (2 * copy_n * 4) as f64 / copy_us / 1e3;
    println!("\nDevice-to-device copy of 256 MiB: {copy_us:.1} µs, {copy_gbs:.0} GB/s (read + write)\n");
    if profile_only {
        return profile(&stream, &pool);
    }
    let mut sum = Summary::default();
    if record_only {
        bench_record(&stream, &pool, quick, &mut sum)?;
    } else {
        if !backward_only {
            bench_routing(&stream, &pool, copy_gbs, quick, &mut sum)?;
            if !routing_only {
                bench_record(&stream, &pool, quick, &mut sum)?;
            }
        }
        if !routing_only {
            bench_backward(&stream, &pool, copy_us, copy_gbs, quick, &mut sum)?;
        }
    }
    sum.print(copy_gbs);
    eprintln!("bench finished in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// One launch per kernel of the issue-14 targets between `cuProfilerStart` and `cuProfilerStop`
/// (the rest of the process is outside the profiled range), printed as a numbered list: route
/// at T ∈ {1, 16384, 262144} (four rules, f32 and bf16, portable and native), replay at
/// T = 262144 (bf16, both numerics) and the backward at T = 262144 (DeepSeek-V3 and Qwen3, f32
/// and bf16, both numerics, every rows-kernel variant; then with the z-loss, the dense kernel).
fn profile(stream: &Arc<CudaStream>, pool: &Pool) -> Result<(), RouteError> {
    use moe_router::cuda::cudarc::driver::Profiler;
    let dev =
        |e: moe_router::cuda::cudarc::driver::DriverError| RouteError::device_with_source("cuda", format!("{e:?}"), e);
    let mut n = 0usize;
    // Warm `f` once, then run it once inside the profiled range.
    let mut once = |label: String, f: &mut dyn FnMut() -> Result<(), RouteError>| -> Result<(), RouteError> {
        f()?;
        stream.synchronize().map_err(dev)?;
        {
            let _p = Profiler::new().map_err(dev)?;
            f()?;
            stream.synchronize().map_err(dev)?;
        }
        n += 1;
        println!("profile {n} | {label}");
        Ok(())
    };
    let view = |dtype: LogitsDtype, t: usize, e: usize| -> Result<DeviceLogits<'_>, RouteError> {
        let per = t * e;
        let v = match dtype {
            LogitsDtype::F32 => LogitsView::F32(pool.f32.slice(0..per)),
            _ => LogitsView::Bf16(pool.bf16.slice(0..per)),
        };
        DeviceLogits::new(v, t, e)
    };
    let main = ["DeepSeek-V3", "Qwen3", "Kimi-K2", "Qwen3-Next"];
    for numerics in [Numerics::Portable, Numerics::Native] {
        let nn = numerics_name(numerics);
        for rule in rules(numerics) {
            if !main.contains(&rule.name) {
                continue;
            }
            let r = CudaRouter::new(rule.cfg.clone())?;
            let (e, k) = (rule.cfg.num_experts(), rule.cfg.top_k());
            for dtype in [LogitsDtype::F32, LogitsDtype::Bf16] {
                let dn = dtype.name();
                for t in [1usize, 16_384, 262_144] {
                    let lv = view(dtype, t, e)?;
                    let mut out = r.alloc_buffers(t, 0)?;
                    let plan = r.plan_name(t, dtype, false);
                    once(
                        format!("{} | {dn} | {nn} | route | {t} | {plan}", rule.name),
                        &mut || r.enqueue_route(&lv, 0, &mut out),
                    )?;
                    r.take_status(&mut out)?;
                }
                if dtype == LogitsDtype::Bf16 {
                    let t = 262_144;
                    let lv = view(dtype, t, e)?;
                    let mut ids = r.alloc_buffers(t, 0)?;
                    r.enqueue_route(&lv, 0, &mut ids)?;
                    r.take_status(&mut ids)?;
                    let ids_view = ids.ids().slice(0..t * k);
                    let mut out = r.alloc_buffers(t, 0)?;
                    let plan = r.plan_name(t, dtype, true);
                    once(
                        format!("{} | {dn} | {nn} | replay | {t} | {plan}", rule.name),
                        &mut || r.enqueue_replay(&lv, &ids_view, &mut out),
                    )?;
                    r.take_status(&mut out)?;
                }
            }
        }
    }
    for zloss in [false, true] {
        for numerics in [Numerics::Portable, Numerics::Native] {
            if zloss && numerics == Numerics::Native {
                continue;
            }
            for rule in rules(numerics) {
                if rule.name != "DeepSeek-V3" && rule.name != "Qwen3" {
                    continue;
                }
                let (cfg, losses) = if zloss {
                    let cfg = rule.cfg.to_builder().z_loss_coeff(1e-3).build().expect("valid");
                    (cfg, LossGrads::default().z_loss(1.0))
                } else {
                    (rule.cfg.clone(), LossGrads::default())
                };
                let r = CudaRouter::new(cfg.clone())?;
                let e = cfg.num_experts();
                let t = 262_144;
                for dtype in [LogitsDtype::F32, LogitsDtype::Bf16] {
                    let lv = view(dtype, t, e)?;
                    let routed = r.route(&lv, &CallSite::default())?;
                    let mut out = r.alloc_grad_buffers(t)?;
                    use moe_router::cuda::BackwardRowsVariant as V;
                    let variants: &[V] = if zloss { &[V::Default] } else { &V::ALL };
                    for &v in variants {
                        moe_router::cuda::set_backward_rows_variant(v);
                        once(
                            format!(
                                "{}{} | {} | {} | backward | {t} | {}",
                                rule.name,
                                if zloss { " + z-loss" } else { "" },
                                dtype.name(),
                                numerics_name(numerics),
                                if zloss {
                                    "dense".to_string()
                                } else {
                                    format!("rows {v:?}")
                                }
                            ),
                            &mut || r.enqueue_backward(&lv, &routed.ids, &routed.weights, &losses, &mut out),
                        )?;
                        r.take_backward_status(&mut out, Some(&routed.ids))?;
                    }
                    moe_router::cuda::set_backward_rows_variant(V::Default);
                }
            }
        }
    }
    Ok(())
}

/// The routing table: route and replay per rule, dtype, numerics and T, the automatic kernel
/// choice (the warp kernels where they take the config) against the previous one (row kernels
/// below T = 2048, tile kernels above), CUDA graphs for T ≤ 4096.
fn bench_routing(
    stream: &Arc<CudaStream>,
    pool: &Pool,
    copy_gbs: f64,
    quick: bool,
    sum: &mut Summary,
) -> Result<(), RouteError> {
    let ts: Vec<usize> = if let Ok(v) = std::env::var("BENCH_TS") {
        v.split(',').filter_map(|x| x.trim().parse().ok()).collect()
    } else if quick {
        vec![1, 4096, 262_144]
    } else {
        vec![1, 8, 64, 4096, 16_384, 65_536, 262_144]
    };
    let only: Vec<String> = std::env::var("BENCH_RULES")
        .map(|v| v.split(',').map(|x| x.trim().to_string()).collect())
        .unwrap_or_else(|_| {
            ["DeepSeek-V3", "Qwen3", "Kimi-K2", "Qwen3-Next"]
                .map(String::from)
                .to_vec()
        });
    println!(
        "Routing: µs per call (CUDA graph of {GRAPH_CALLS} calls for T ≤ 4096, back-to-back launches on rotated inputs above), \
         GB/s = (logits + T·K·8 bytes) / time, % of the same-run copy ({copy_gbs:.0} GB/s); `before`: the previous kernel \
         choice (row kernels below T = 2048, tile kernels above); `no PDL`: the warp kernel without programmatic \
         dependent launch; `other lanes`: the warp kernel with another lane count per token; SGLang: its Triton \
         router on an H200 (issue 14).\n"
    );
    println!(
        "| rule | dtype | numerics | op | T | kernel | µs | GB/s | % copy | before µs | speed-up | no PDL µs | other lanes µs | SGLang µs | vs SGLang |"
    );
    println!("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|");
    for numerics in [Numerics::Portable, Numerics::Native] {
        for rule in rules(numerics) {
            if !only.iter().any(|n| n == rule.name) {
                continue;
            }
            let r = CudaRouter::new(rule.cfg.clone())?;
            let (e, k) = (rule.cfg.num_experts(), rule.cfg.top_k());
            for dtype in [LogitsDtype::F32, LogitsDtype::Bf16] {
                for &t in &ts {
                    let per = t * e;
                    // Rotate over windows of the pool: at least 2, and > 120 MB touched in all.
                    let windows = (pool.n / per)
                        .clamp(1, 64)
                        .min((120usize << 20).div_ceil(per * dtype.size()).max(GRAPH_CALLS));
                    let view = |i: usize| -> Result<DeviceLogits<'_>, RouteError> {
                        let o = (i % windows) * per;
                        let v = match dtype {
                            LogitsDtype::F32 => LogitsView::F32(pool.f32.slice(o..o + per)),
                            _ => LogitsView::Bf16(pool.bf16.slice(o..o + per)),
                        };
                        DeviceLogits::new(v, t, e)
                    };
                    let graph = t <= 4096;
                    let iters = (2_000_000 / (per + 20_000)).clamp(5, 200);
                    let mut out = r.alloc_buffers(t, 0)?;
                    // The route's ids (valid, in slot order) are the replay's input.
                    r.enqueue_route(&view(0)?, 0, &mut out)?;
                    r.take_status(&mut out)?;
                    let ids = r.alloc_buffers(t, 0)?;
                    let mut ids = ids;
                    r.enqueue_route(&view(0)?, 0, &mut ids)?;
                    r.take_status(&mut ids)?;
                    let ids_view = ids.ids().slice(0..t * k);
                    let before = if t < 2048 {
                        KernelChoice::Row
                    } else {
                        KernelChoice::Tile
                    };
                    for replay in [false, true] {
                        let mut run = |choice: KernelChoice, pdl: bool| -> Result<f64, RouteError> {
                            r.set_kernel_choice(choice);
                            r.set_programmatic_launch(pdl);
                            let us = time_op(stream, graph, iters, |i| {
                                if replay {
                                    r.enqueue_replay(&view(i)?, &ids_view, &mut out)
                                } else {
                                    r.enqueue_route(&view(i)?, 0, &mut out)
                                }
                            })?;
                            r.take_status(&mut out)?;
                            r.set_kernel_choice(KernelChoice::Auto);
                            r.set_programmatic_launch(true);
                            Ok(us)
                        };
                        let us = run(KernelChoice::Auto, true)?;
                        let old = run(before, true)?;
                        let plan = r.plan_name(t, dtype, replay);
                        let nopdl = if graph && plan.starts_with("warp") {
                            format!("{:.2}", run(KernelChoice::Auto, false)?)
                        } else {
                            "".into()
                        };
                        // The warp kernel with the other lane count (32 ↔ 16, or K → 32).
                        let lanes: Option<usize> = plan
                            .strip_prefix("warp ")
                            .and_then(|x| x.split('×').next())
                            .and_then(|x| x.parse().ok());
                        let alt = match lanes {
                            Some(w) => {
                                let other = if w == 32 { 16 } else { 32 };
                                r.set_warp_lanes(Some(other));
                                let alt_plan = r.plan_name(t, dtype, replay);
                                let res = if alt_plan != plan {
                                    format!("{:.2} ({alt_plan})", run(KernelChoice::Auto, true)?)
                                } else {
                                    String::new()
                                };
                                r.set_warp_lanes(None);
                                res
                            }
                            None => String::new(),
                        };
                        let gbs = ((per * dtype.size()) as f64 + (t * k * 8) as f64) / us / 1e3;
                        let sg = SGLANG
                            .iter()
                            .find(|s| !replay && s.0 == rule.name && s.1 == dtype.name() && s.2 == t)
                            .map(|s| s.3);
                        println!(
                            "| {} | {} | {} | {} | {t} | {plan} | {us:.2} | {gbs:.0} | {:.1}% | {old:.2} | {:.2}× | {nopdl} | {alt} | {} | {} |",
                            rule.name,
                            dtype.name(),
                            numerics_name(numerics),
                            if replay { "replay" } else { "route" },
                            100.0 * gbs / copy_gbs,
                            old / us,
                            sg.map(|v| format!("{v:.2}")).unwrap_or_default(),
                            sg.map(|v| format!("{:.2}×", v / us)).unwrap_or_default(),
                        );
                        sum.routing(
                            rule.name,
                            dtype.name(),
                            numerics,
                            replay,
                            t,
                            us,
                            gbs,
                            100.0 * gbs / copy_gbs,
                            sg,
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Route + record (the static record buffer written by the route kernel) and the host-side cost
/// of asynchronous recording through `Router::record_ids`.
fn bench_record(stream: &Arc<CudaStream>, pool: &Pool, quick: bool, sum: &mut Summary) -> Result<(), RouteError> {
    println!(
        "\nRecording: route vs route + static record buffer (µs, rotated inputs), and asynchronous `record_ids` (host wall time per `route()`):\n"
    );
    println!("| rule | dtype | numerics / mode | T | result |");
    println!("|---|---|---|---:|---|");
    let t = 65_536usize;
    for numerics in [Numerics::Portable, Numerics::Native] {
        for rule in rules(numerics) {
            let r = CudaRouter::new(rule.cfg.clone())?;
            let e = rule.cfg.num_experts();
            let per = t * e;
            let windows = (pool.n / per).clamp(2, 64);
            let view = |i: usize| -> Result<DeviceLogits<'_>, RouteError> {
                let o = (i % windows) * per;
                DeviceLogits::new(LogitsView::Bf16(pool.bf16.slice(o..o + per)), t, e)
            };
            let mut out = r.alloc_buffers(t, 0)?;
            let plain = time_calls(stream, 20, |i| r.enqueue_route(&view(i)?, 0, &mut out))?;
            r.take_status(&mut out)?;
            let mut out = r.alloc_buffers(t, 1)?;
            let rec = time_calls(stream, 20, |i| r.enqueue_route(&view(i)?, 0, &mut out))?;
            r.take_status(&mut out)?;
            println!(
                "| {} | bf16 | {} / static record | {t} | {plain:.2} → {rec:.2} µs ({:+.1}%) |",
                rule.name,
                numerics_name(numerics),
                100.0 * (rec / plain - 1.0)
            );
            if numerics == Numerics::Portable && !quick {
                let lv = view(0)?;
                let n = 30;
                let mut plain = Vec::new();
                let mut rec = Vec::new();
                for _ in 0..3 {
                    let a = Instant::now();
                    for _ in 0..n {
                        r.route(&lv, &CallSite::layer(0))?;
                    }
                    plain.push(a.elapsed().as_secs_f64() * 1e6 / n as f64);
                    let a = Instant::now();
                    for _ in 0..n {
                        let o = r.route(&lv, &CallSite::layer(0))?;
                        r.record_ids(&o.ids, Box::new(|_ids| {}))?;
                    }
                    rec.push(a.elapsed().as_secs_f64() * 1e6 / n as f64);
                    r.flush_records()?;
                }
                // The same loop with a bare device-to-host copy of each call's ids on a side
                // stream (no record threads, never waited for in the loop): what copies in
                // flight alone cost the routing loop.
                let dev = |e: moe_router::cuda::cudarc::driver::DriverError| {
                    RouteError::device_with_source("cuda", format!("{e:?}"), e)
                };
                let side = r.stream().context().new_stream().map_err(dev)?;
                let k = rule.cfg.top_k();
                // SAFETY: a copy destination, never read.
                let mut pinned = unsafe { r.stream().context().alloc_pinned::<u32>(t * k) }.map_err(dev)?;
                let mut bare = Vec::new();
                for _ in 0..3 {
                    let mut keep = std::collections::VecDeque::new();
                    let a = Instant::now();
                    for _ in 0..n {
                        let o = r.route(&lv, &CallSite::layer(0))?;
                        let host = pinned.as_mut_slice().map_err(dev)?;
                        let (src, g) = o.ids.buffer().device_ptr(&side);
                        // SAFETY: `host` holds t * k u32 (the copy's size), pinned and never read;
                        // the source ids stay alive (`keep`) until after the final wait.
                        unsafe {
                            moe_router::cuda::cudarc::driver::result::memcpy_dtoh_async(
                                &mut host[..t * k],
                                src,
                                side.cu_stream(),
                            )
                        }
                        .map_err(dev)?;
                        drop(g);
                        keep.push_back(o);
                        if keep.len() > 4 {
                            keep.pop_front();
                        }
                    }
                    bare.push(a.elapsed().as_secs_f64() * 1e6 / n as f64);
                    side.synchronize().map_err(dev)?;
                }
                println!(
                    "| {} | bf16 | route + bare side-stream copy of the ids | {t} | {:.1} µs |",
                    rule.name,
                    median(bare)
                );
                let (p, q) = (median(plain), median(rec));
                let st = r.record_stats();
                let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / st.delivered.max(1) as f64;
                println!(
                    "| {} | bf16 | async record | {t} | {p:.1} → {q:.1} µs ({:+.1}%); per record: backpressure {:.1}, copy wait {:.1}, sink {:.1} µs |",
                    rule.name,
                    100.0 * (q / p - 1.0),
                    per(st.backpressure),
                    per(st.copy_wait),
                    per(st.sinks),
                );
                sum.0.push(Line {
                    op: "record",
                    rule: rule.name.to_string(),
                    dtype: "bf16",
                    numerics: numerics_name(numerics),
                    t,
                    us: q,
                    gbs: None,
                    target: format!("≤ 2% over {p:.1} µs: {:+.1}%", 100.0 * (q / p - 1.0)),
                    met: q <= 1.02 * p,
                });
            }
        }
    }
    Ok(())
}

/// The backward table: launch-only `enqueue_backward` on rotated logits, the ids and weights of
/// one route as ids and upstream gradient.
fn bench_backward(
    stream: &Arc<CudaStream>,
    pool: &Pool,
    copy_us: f64,
    copy_gbs: f64,
    quick: bool,
    sum: &mut Summary,
) -> Result<(), RouteError> {
    let ts: Vec<usize> = if let Ok(v) = std::env::var("BENCH_BACKWARD_TS") {
        v.split(',').filter_map(|x| x.trim().parse().ok()).collect()
    } else if quick {
        vec![65_536]
    } else {
        vec![262_144]
    };
    println!(
        "\nBackward (weights_vjp, launch-only enqueue_backward), same-run copy {copy_us:.1} µs, {copy_gbs:.0} GB/s:\n"
    );
    println!("| rule | dtype | numerics | T | kernel | backward µs | GB/s | % copy |");
    println!("|---|---|---|---:|---|---:|---:|---:|");
    for numerics in [Numerics::Portable, Numerics::Native] {
        for rule in rules(numerics) {
            if rule.name != "DeepSeek-V3" && rule.name != "Qwen3" {
                continue;
            }
            for zloss in [false, true] {
                let cfg = if zloss {
                    rule.cfg.to_builder().z_loss_coeff(1e-3).build().expect("valid")
                } else {
                    rule.cfg.clone()
                };
                let losses = if zloss {
                    LossGrads::default().z_loss(1.0)
                } else {
                    LossGrads::default()
                };
                let r = CudaRouter::new(cfg.clone())?;
                let (e, k) = (cfg.num_experts(), cfg.top_k());
                for dtype in [LogitsDtype::F32, LogitsDtype::Bf16] {
                    for &t in &ts {
                        let per = t * e;
                        let windows = (pool.n / per)
                            .clamp(1, 64)
                            .min((120usize << 20).div_ceil(per * dtype.size()).max(2));
                        let view = |i: usize| -> Result<DeviceLogits<'_>, RouteError> {
                            let o = (i % windows) * per;
                            let v = match dtype {
                                LogitsDtype::F32 => LogitsView::F32(pool.f32.slice(o..o + per)),
                                _ => LogitsView::Bf16(pool.bf16.slice(o..o + per)),
                            };
                            DeviceLogits::new(v, t, e)
                        };
                        let routed = r.route(&view(0)?, &CallSite::default())?;
                        let mut out = r.alloc_grad_buffers(t)?;
                        let iters = (2_000_000 / (per + 20_000)).clamp(5, 200);
                        use moe_router::cuda::BackwardRowsVariant as V;
                        // The rows kernel's instantiations against each other (K <= 8, no
                        // z-loss), on stderr; the row is the default kernel's.
                        let variants: &[V] = if !zloss && k <= 8 { &V::ALL } else { &[V::Default] };
                        let mut us = f64::NAN;
                        let mut all = Vec::new();
                        for &v in variants {
                            moe_router::cuda::set_backward_rows_variant(v);
                            let t_us = time_calls(stream, iters, |i| {
                                r.enqueue_backward(&view(i)?, &routed.ids, &routed.weights, &losses, &mut out)
                            })?;
                            all.push(format!("{v:?} {t_us:.1}"));
                            if v == V::Default {
                                us = t_us;
                            }
                        }
                        moe_router::cuda::set_backward_rows_variant(V::Default);
                        if variants.len() > 1 {
                            eprintln!("rows variants, µs: {}", all.join(", "));
                        }
                        r.take_backward_status(&mut out, Some(&routed.ids))?;
                        let bytes = (per * dtype.size() + per * 4 + t * k * 8) as f64;
                        let gbs = bytes / us / 1e3;
                        println!(
                            "| {}{} | {} | {} | {t} | {} | {us:.2} | {gbs:.0} | {:.0}% |",
                            rule.name,
                            if zloss { " + z-loss" } else { "" },
                            dtype.name(),
                            if numerics == Numerics::Portable {
                                "portable"
                            } else {
                                "native"
                            },
                            if zloss {
                                "dense"
                            } else if k <= moe_router::cuda::kernels::BWD_ROWS_MAX_K {
                                "rows"
                            } else {
                                "sparse"
                            },
                            100.0 * gbs / copy_gbs
                        );
                        if !zloss {
                            let pct = 100.0 * gbs / copy_gbs;
                            sum.0.push(Line {
                                op: "backward",
                                rule: rule.name.to_string(),
                                dtype: dtype.name(),
                                numerics: numerics_name(numerics),
                                t,
                                us,
                                gbs: Some((gbs, pct)),
                                target: "≥ 60% of copy".into(),
                                met: pct >= 60.0,
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
