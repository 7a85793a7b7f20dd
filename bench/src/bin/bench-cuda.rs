//! Benchmark of the CUDA router on the GPU machine: GB/s and the ratio to a device-to-device copy
//! measured in the same run, for T ∈ {1, 64, 4096, 65536, 262144}, the rules DeepSeek-V3, Qwen3,
//! Kimi-K2, Qwen3-Next and Mixtral, f32 and bf16 logits, portable and native numerics; route,
//! replay and route + record (static record buffer written by the route kernel).
//!
//! Method: CUDA events around back-to-back launches, warm-up first, median of 5 repeats, inputs
//! rotated over a pool larger than L2. Bytes counted: logits read once + ids and weights written
//! (route) or ids read + weights written (replay). Also: µs per call at T ≤ 64 under graph
//! replay, and the host-side cost of asynchronous recording (side stream + pinned memory)
//! through `Router::record_ids`.
//!
//! Backward (`Router::weights_vjp`, launch-only `CudaRouter::enqueue_backward` into
//! preallocated `GradBuffers`): DeepSeek-V3 and Qwen3, f32 and bf16 logits, portable and
//! native, no aux loss and no z-loss (the sparse kernel), plus one line per rule with the
//! z-loss (the dense kernel: softmax over E). Bytes counted: logits read + gradient written
//! (T·E·4) + ids and upstream gradient read (T·K·8).
//!
//! Usage: `bench-cuda [--quick] [--backward]` prints Markdown tables (`--backward`: the
//! backward table only). `BENCH_RULES=DeepSeek-V3,Qwen3` and `BENCH_TS=65536,262144` restrict
//! the rules and batch sizes of the routing table; `BENCH_BACKWARD_TS` the batch sizes of the
//! backward table (default 262144).

#![allow(unsafe_code)]

use moe_router::cuda::cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use moe_router::cuda::cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use moe_router::cuda::kernels::{LogitsDtype, Part, RouterVariant, ScoreKind, TILE_KMAX};
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

fn main() -> Result<(), RouteError> {
    let quick = std::env::args().any(|a| a == "--quick");
    let backward_only = std::env::args().any(|a| a == "--backward");
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
                variants.push(RouterVariant {
                    dtype,
                    portable,
                    score,
                    part: Part::Row,
                });
                for n in TILE_KMAX {
                    variants.push(RouterVariant {
                        dtype,
                        portable,
                        score,
                        part: Part::Tile(n),
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
    println!(
        "| rule | dtype | numerics | T | route µs | route GB/s | % copy | replay µs | replay GB/s | % copy | route+record µs | record overhead |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ts: Vec<usize> = if let Ok(v) = std::env::var("BENCH_TS") {
        v.split(',').filter_map(|x| x.trim().parse().ok()).collect()
    } else if quick {
        vec![64, 65_536]
    } else {
        vec![1, 64, 4096, 65_536, 262_144]
    };
    let only: Option<Vec<String>> = std::env::var("BENCH_RULES")
        .ok()
        .map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
    let mut small = Vec::new();
    for numerics in [Numerics::Portable, Numerics::Native] {
        for rule in rules(numerics) {
            if backward_only || only.as_ref().is_some_and(|o| !o.iter().any(|n| n == rule.name)) {
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
                        .min((120usize << 20).div_ceil(per * dtype.size()).max(2));
                    let view = |i: usize| -> Result<DeviceLogits<'_>, RouteError> {
                        let o = (i % windows) * per;
                        let v = match dtype {
                            LogitsDtype::F32 => LogitsView::F32(pool.f32.slice(o..o + per)),
                            _ => LogitsView::Bf16(pool.bf16.slice(o..o + per)),
                        };
                        DeviceLogits::new(v, t, e)
                    };
                    let iters = (2_000_000 / (per + 20_000)).clamp(5, 200);
                    let mut out = r.alloc_buffers(t, 0)?;
                    let route_us = time_calls(&stream, iters, |i| r.enqueue_route(&view(i)?, 0, &mut out))?;
                    r.take_status(&mut out)?;
                    // The other kernel shape, for the small and middle sizes.
                    if t <= 4096 {
                        r.set_kernel_choice(if t < 2048 {
                            KernelChoice::Tile
                        } else {
                            KernelChoice::Row
                        });
                        let alt = time_calls(&stream, iters, |i| r.enqueue_route(&view(i)?, 0, &mut out))?;
                        r.take_status(&mut out)?;
                        r.set_kernel_choice(KernelChoice::Auto);
                        eprintln!(
                            "alt kernel: {} {} {} T={t}: auto {route_us:.2} µs, {} kernels {alt:.2} µs",
                            rule.name,
                            dtype.name(),
                            if numerics == Numerics::Portable {
                                "portable"
                            } else {
                                "native"
                            },
                            if t < 2048 { "tile" } else { "row" }
                        );
                    }
                    let ids = out.ids().slice(0..t * k);
                    let mut out2 = r.alloc_buffers(t, 0)?;
                    let replay_us = time_calls(&stream, iters, |i| r.enqueue_replay(&view(i)?, &ids, &mut out2))?;
                    r.take_status(&mut out2)?;
                    let mut out3 = r.alloc_buffers(t, 1)?;
                    let rec_us = time_calls(&stream, iters, |i| r.enqueue_route(&view(i)?, 0, &mut out3))?;
                    r.take_status(&mut out3)?;
                    let in_bytes = (per * dtype.size()) as f64;
                    let route_gbs = (in_bytes + (t * k * 8) as f64) / route_us / 1e3;
                    let replay_gbs = (in_bytes + (t * k * 8) as f64) / replay_us / 1e3;
                    println!(
                        "| {} | {} | {} | {} | {:.2} | {:.0} | {:.0}% | {:.2} | {:.0} | {:.0}% | {:.2} | {:+.1}% |",
                        rule.name,
                        dtype.name(),
                        if numerics == Numerics::Portable {
                            "portable"
                        } else {
                            "native"
                        },
                        t,
                        route_us,
                        route_gbs,
                        100.0 * route_gbs / copy_gbs,
                        replay_us,
                        replay_gbs,
                        100.0 * replay_gbs / copy_gbs,
                        rec_us,
                        100.0 * (rec_us / route_us - 1.0)
                    );
                    if t <= 64 && dtype == LogitsDtype::Bf16 {
                        // Graph replay of 20 back-to-back calls.
                        stream
                            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                            .map_err(dev)?;
                        let lv = view(0)?;
                        for _ in 0..20 {
                            r.enqueue_route(&lv, 0, &mut out)?;
                        }
                        let g = stream.end_capture(CUgraphInstantiate_flags(0)).map_err(dev)?;
                        if let Some(g) = g {
                            g.upload().map_err(dev)?;
                            let us = time_calls(&stream, 10, |_| g.launch().map_err(dev))? / 20.0;
                            small.push(format!(
                                "| {} | bf16 | {} | {t} | {us:.2} |",
                                rule.name,
                                if numerics == Numerics::Portable {
                                    "portable"
                                } else {
                                    "native"
                                }
                            ));
                        }
                        r.take_status(&mut out)?;
                    }
                }
            }
            // Asynchronous recording through the Router trait (host wall time, includes the
            // per-call error check that both variants pay).
            if numerics == Numerics::Portable && !quick {
                let t = 65_536usize;
                let lv = DeviceLogits::new(LogitsView::Bf16(pool.bf16.slice(0..t * e)), t, e)?;
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
                let (p, q) = (median(plain), median(rec));
                eprintln!(
                    "async record ({}, bf16, T={t}): route() {p:.1} µs/call, route()+record_ids() {q:.1} µs/call ({:+.1}%)",
                    rule.name,
                    100.0 * (q / p - 1.0)
                );
                small.push(format!(
                    "| {} | bf16 | async record T={t} | {p:.1} → {q:.1} µs ({:+.1}%) |",
                    rule.name,
                    100.0 * (q / p - 1.0)
                ));
            }
        }
    }
    if !backward_only {
        println!("\nGraph replay (20 routes per graph) and asynchronous recording:\n");
        println!("| rule | dtype | numerics / mode | T | µs per call |");
        println!("|---|---|---|---:|---:|");
        for s in small {
            println!("{s}");
        }
    }
    bench_backward(&stream, &pool, copy_us, copy_gbs, quick)?;
    eprintln!("bench finished in {:.1} s", t0.elapsed().as_secs_f64());
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
                        // z-loss); the row is the fastest, its variant named.
                        let variants: &[V] = if !zloss && k <= 8 {
                            &[
                                V::Default,
                                V::NoPrefetch,
                                V::Occupancy4,
                                V::Pieces8,
                                V::Occupancy4Pieces2,
                            ]
                        } else {
                            &[V::Default]
                        };
                        let mut best = (f64::INFINITY, V::Default);
                        let mut all = Vec::new();
                        for &v in variants {
                            moe_router::cuda::set_backward_rows_variant(v);
                            let us = time_calls(stream, iters, |i| {
                                r.enqueue_backward(&view(i)?, &routed.ids, &routed.weights, &losses, &mut out)
                            })?;
                            all.push(format!("{v:?} {us:.1}"));
                            if us < best.0 {
                                best = (us, v);
                            }
                        }
                        moe_router::cuda::set_backward_rows_variant(V::Default);
                        if variants.len() > 1 {
                            eprintln!("rows variants, µs: {}", all.join(", "));
                        }
                        let us = best.0;
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
                                if best.1 == V::Default { "rows" } else { "rows (variant)" }
                            } else {
                                "sparse"
                            },
                            100.0 * gbs / copy_gbs
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
