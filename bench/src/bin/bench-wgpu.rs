//! Benchmark of the wgpu backend (issues 5 and 14; same shapes and rules as the CUDA benchmark).
//!
//! For T ∈ {1, 8, 64, 4096, 16384, 65536, 262144} and the rules DeepSeek-V3, Qwen3, Kimi-K2,
//! Qwen3-Next and Mixtral (presets), f32 and bf16 logits, portable and native numerics, it times
//! route, replay and route+record (ids copied to a host-mappable buffer), on the kernel paths
//! given by `--kernels` (`auto`, `token`, `subgroup`, `workgroup`; default `auto`; the column
//! `kernel` names the path that ran). Each measurement records
//! N back-to-back routings (inputs rotated through a buffer larger than L2) in one command
//! buffer, submits it and waits; the median over repeats of wall time / N is reported, with
//! GB/s = (logits read + ids and weights written) / time and the ratio to a device-to-device copy
//! measured in the same run. Results go to stdout (table) and, with `--json FILE`, to JSON lines.
//!
//! Usage: `bench-wgpu [--bench] [--quick] [--json FILE] [--rules a,b] [--tokens 1,64] [--dtypes f32,bf16]
//! [--modes portable,native,portable-noprune] [--ops route,replay,record,backward]
//! [--kernels auto,token,subgroup,workgroup]`. At the end it prints the route and replay rows as
//! a Markdown table in the shape of `bench-cuda`'s (µs, GB/s and % of the same run's copy).
//!
//! `backward` times the backward pass (DESIGN §2b, issue 10) of the weights alone
//! (`WgpuRouter::enqueue_backward`: the gradient kernel, one dispatch, on the routed ids and a
//! fixed upstream gradient); its GB/s counts logits read + ids and upstream gradient read + the
//! f32 gradient `[T, E]` written. `backward-aux` times the whole `Router::weights_vjp` call with
//! the micro-batch aux loss and the z-loss (counting pass, read-back of the counts, table upload,
//! gradient pass and the error check: two submissions and two synchronisations per call), with
//! the same byte count. Only the backward: `--ops backward --rules deepseek-v3,qwen3-moe`.
//! (`portable-noprune` = portable numerics without the bound-based skipping of exact keys.)
//! Built with the `cuda` feature, it also times the CUDA backend (`CudaRouter::enqueue_route` /
//! `enqueue_replay`, N launches then one stream synchronisation, the same wall-clock method) on
//! the same logits in the same run, and prints the throughput ratio wgpu / CUDA.

use moe_router::import::presets::preset_expects_expert_bias;
use moe_router::wgpu::wgpu;
use moe_router::wgpu::{AdapterOptions, DeviceLogits, KernelPath, LogitsDtype, WgpuContext, WgpuRouter};
use moe_router::{AuxLossKind, CallSite, HostMatrix, LossGrads, Numerics, Router, RouterConfig, preset};
use std::io::Write;
use std::time::Instant;

struct Args {
    quick: bool,
    json: Option<String>,
    rules: Vec<String>,
    tokens: Vec<usize>,
    dtypes: Vec<String>,
    modes: Vec<String>,
    ops: Vec<String>,
    kernels: Vec<String>,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

fn parse_args() -> Args {
    let mut a = Args {
        quick: false,
        json: None,
        rules: list("deepseek-v3,qwen3-moe,kimi-k2,qwen3-next,mixtral"),
        tokens: vec![1, 8, 64, 4096, 16384, 65536, 262_144],
        dtypes: list("f32,bf16"),
        modes: list("portable,native"),
        ops: list("route,replay,record,backward"),
        kernels: list("auto"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || it.next().unwrap_or_default();
        match x.as_str() {
            "--bench" => {}
            "--quick" => a.quick = true,
            "--json" => a.json = Some(val()),
            "--rules" => a.rules = list(&val()),
            "--tokens" => a.tokens = list(&val()).iter().filter_map(|s| s.parse().ok()).collect(),
            "--dtypes" => a.dtypes = list(&val()),
            "--modes" => a.modes = list(&val()),
            "--ops" => a.ops = list(&val()),
            "--kernels" => a.kernels = list(&val()),
            other => eprintln!("bench-wgpu: ignoring unknown argument {other:?}"),
        }
    }
    a
}

fn config(rule: &str, native: bool) -> Result<RouterConfig, String> {
    let mut cfg = preset(rule).map_err(|e| e.to_string())?;
    if preset_expects_expert_bias(rule).unwrap_or(false) || cfg.has_bias() {
        let e = cfg.num_experts();
        let bias: Vec<f32> = (0..e).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 1e-3).collect();
        cfg.set_expert_bias(bias).map_err(|e| e.to_string())?;
    }
    if native {
        cfg = cfg
            .to_builder()
            .numerics(Numerics::Native)
            .build()
            .map_err(|e| e.to_string())?;
    }
    // The terms `backward-aux` differentiates (the routing does not depend on them).
    let mut b = cfg.to_builder();
    if cfg.aux_losses().is_empty() {
        b = b.aux_loss(AuxLossKind::MicroBatch, 1e-3);
    }
    if cfg.z_loss_coeff() <= 0.0 {
        b = b.z_loss_coeff(1e-3);
    }
    cfg = b.build().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Deterministic pseudo-random logits (roughly N(0, 1)) as bytes of `dtype`.
fn logits_bytes(rows: usize, e: usize, dtype: LogitsDtype, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let n = rows * e;
    let mut out = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        // Sum of 4 uniforms, centred: close enough to a normal for routing.
        let u = (0..4).map(|k| ((s >> (k * 16)) & 0xffff) as f32 / 65536.0).sum::<f32>() - 2.0;
        let x = u * 1.7;
        match dtype {
            LogitsDtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
            LogitsDtype::Bf16 => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
            LogitsDtype::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
        }
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `n` repetitions of `record(enc, i)` per submission; returns the median seconds per rep.
fn time_reps(
    ctx: &WgpuContext,
    quick: bool,
    mut record: impl FnMut(&mut wgpu::CommandEncoder, usize),
) -> Result<f64, String> {
    let run = |n: usize, record: &mut dyn FnMut(&mut wgpu::CommandEncoder, usize)| -> Result<f64, String> {
        let mut enc = ctx
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        for i in 0..n {
            record(&mut enc, i);
        }
        let cb = enc.finish();
        let t0 = Instant::now();
        ctx.queue().submit([cb]);
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| e.to_string())?;
        Ok(t0.elapsed().as_secs_f64())
    };
    // Warm-up and calibration: aim for ~25 ms per submission (at least 3 reps).
    run(2, &mut record)?;
    let one = run(4, &mut record)? / 4.0;
    let target = if quick { 0.008 } else { 0.025 };
    let n = ((target / one.max(1e-7)) as usize).clamp(3, 20_000);
    let reps = if quick { 3 } else { 7 };
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        v.push(run(n, &mut record)? / n as f64);
    }
    Ok(median(&mut v))
}

/// Median seconds per call of `call` (each call synchronises on its own): wall time of `n` calls.
fn time_calls(quick: bool, mut call: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    let mut run = |n: usize| -> Result<f64, String> {
        let t0 = Instant::now();
        for _ in 0..n {
            call()?;
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    run(1)?;
    let one = run(2)? / 2.0;
    let target = if quick { 0.008 } else { 0.025 };
    let n = ((target / one.max(1e-7)) as usize).clamp(1, 2_000);
    let reps = if quick { 3 } else { 5 };
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        v.push(run(n)? / n as f64);
    }
    Ok(median(&mut v))
}

/// A deterministic upstream gradient `[t, k]` in [-1, 1].
fn upstream(t: usize, k: usize) -> ndarray::Array2<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    ndarray::Array2::from_shape_fn((t, k), |_| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    })
}

const COPY_WGSL: &str = "
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    let stride = n.x * 256u;
    let len = arrayLength(&src);
    var i = g.x;
    loop {
        if (i >= len) {
            break;
        }
        dst[i] = src[i];
        i += stride;
    }
}
";

/// Device-to-device copy bandwidth (bytes read + written per second): the copy command
/// (`copy_buffer_to_buffer`) and a compute-shader copy; returns (command, shader) in GB/s.
fn copy_bandwidth(ctx: &WgpuContext, quick: bool) -> Result<(f64, f64), String> {
    let bytes: u64 = (256u64 << 20).min(ctx.limits().max_storage_buffer_binding_size / 16 * 16);
    let mk = || {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench copy"),
            size: bytes,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let (a, b) = (mk(), mk());
    let t = time_reps(ctx, quick, |enc, i| {
        if i % 2 == 0 {
            enc.copy_buffer_to_buffer(&a, 0, &b, 0, bytes);
        } else {
            enc.copy_buffer_to_buffer(&b, 0, &a, 0, bytes);
        }
    })?;
    let cmd = 2.0 * bytes as f64 / t / 1e9;
    let dev = ctx.device();
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("bench copy"),
        source: wgpu::ShaderSource::Wgsl(COPY_WGSL.into()),
    });
    let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("bench copy"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bg = |s: &wgpu::Buffer, d: &wgpu::Buffer| {
        dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: s.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: d.as_entire_binding(),
                },
            ],
        })
    };
    let (ab, ba) = (bg(&a, &b), bg(&b, &a));
    let groups = ((bytes / 16) as u32).div_ceil(256).min(8192);
    let t = time_reps(ctx, quick, |enc, i| {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipe);
        pass.set_bind_group(0, if i % 2 == 0 { &ab } else { &ba }, &[]);
        pass.dispatch_workgroups(groups, 1, 1);
    })?;
    Ok((cmd, 2.0 * bytes as f64 / t / 1e9))
}

fn kernel_path(name: &str) -> Option<KernelPath> {
    match name {
        "auto" => Some(KernelPath::Auto),
        "token" => Some(KernelPath::PerToken),
        "subgroup" => Some(KernelPath::SubgroupRows),
        "workgroup" => Some(KernelPath::WorkgroupRows),
        _ => None,
    }
}

fn path_name(p: KernelPath) -> &'static str {
    match p {
        KernelPath::Auto => "auto",
        KernelPath::PerToken => "token",
        KernelPath::SubgroupRows => "subgroup",
        KernelPath::WorkgroupRows => "workgroup",
    }
}

struct Row {
    rule: String,
    dtype: &'static str,
    mode: String,
    kernel: &'static str,
    op: String,
    tokens: usize,
    us: f64,
    gbs: f64,
}

fn main() {
    let args = parse_args();
    let ctx = match WgpuContext::shared(&AdapterOptions::from_env()) {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let a = ctx.adapter();
    println!(
        "bench-wgpu: adapter {:?} ({} {}, driver {})",
        a.name, a.backend, a.device_type, a.driver
    );
    if cfg!(feature = "cuda") {
        println!("bench-wgpu: timing the CUDA backend too (same logits, same run)");
    } else {
        println!("bench-wgpu: CUDA backend not timed by this build (build with --features cuda)");
    }
    let (copy_cmd, copy_shader) = match copy_bandwidth(&ctx, args.quick) {
        Ok(c) => c,
        Err(e) => {
            println!("bench-wgpu: copy failed: {e}");
            return;
        }
    };
    let copy = copy_cmd.max(copy_shader);
    println!(
        "device-to-device copy (read + write): {copy_cmd:.1} GB/s copy command, {copy_shader:.1} GB/s shader copy; \
         % copy below is against {copy:.1} GB/s"
    );
    let mut json = args.json.as_ref().and_then(|p| std::fs::File::create(p).ok());
    if let Some(f) = json.as_mut() {
        let _ = writeln!(
            f,
            "{{\"adapter\":{:?},\"backend\":{:?},\"driver\":{:?},\"copy_gbs\":{copy:.2}}}",
            a.name, a.backend, a.driver
        );
    }
    if let Some(l) = ctx.subgroup_lanes() {
        println!("bench-wgpu: subgroup row kernels available ({l} lanes per row)");
    } else {
        println!("bench-wgpu: no usable subgroups (row kernels through workgroup memory only)");
    }
    println!(
        "{:<12} {:<5} {:<9} {:<9} {:<12} {:>7} {:>11} {:>9} {:>7} {:>11} {:>10}",
        "rule", "dtype", "numerics", "kernel", "op", "T", "us/call", "GB/s", "% copy", "cuda us", "wgpu/cuda"
    );
    let mut rows: Vec<Row> = Vec::new();
    let l2_bytes = 128usize << 20;
    for rule in &args.rules {
        for dt in &args.dtypes {
            let dtype = match dt.as_str() {
                "f32" => LogitsDtype::F32,
                "bf16" => LogitsDtype::Bf16,
                "f16" => LogitsDtype::F16,
                _ => continue,
            };
            let tmax = args.tokens.iter().copied().max().unwrap_or(1);
            let Ok(cfg0) = config(rule, false) else {
                println!("bench-wgpu: unknown rule {rule}");
                continue;
            };
            let e = cfg0.num_experts();
            let k = cfg0.top_k();
            let row_bytes = e * dtype.size();
            // One input buffer: at least two of the largest batches and at least 2 × L2.
            let total_rows = (2 * tmax).max(l2_bytes.div_ceil(row_bytes));
            let bytes = logits_bytes(total_rows, e, dtype, 0x5eed ^ e as u64);
            let buf = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench logits"),
                size: (bytes.len() as u64).div_ceil(256) * 256,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            ctx.queue().write_buffer(&buf, 0, &bytes);
            #[cfg(feature = "cuda")]
            let cuda_host = cuda::HostLogits::new(&bytes, total_rows, e, dtype);
            drop(bytes);
            for (mode, kname) in args.modes.iter().flat_map(|m| args.kernels.iter().map(move |k| (m, k))) {
                let Ok(cfg) = config(rule, mode == "native") else {
                    continue;
                };
                let Some(path) = kernel_path(kname) else {
                    println!("bench-wgpu: unknown kernel path {kname} (auto, token, subgroup, workgroup)");
                    continue;
                };
                let router = match WgpuRouter::with_context(cfg, ctx.clone()) {
                    Ok(r) => r.with_pruning(mode != "portable-noprune").with_kernel_path(path),
                    Err(err) => {
                        println!("bench-wgpu: {rule}: {err}");
                        continue;
                    }
                };
                if let Err(err) = router.prepare(dtype) {
                    println!("bench-wgpu: {rule}: {err}");
                    continue;
                }
                #[cfg(feature = "cuda")]
                let cuda_bench = config(rule, mode == "native")
                    .ok()
                    .and_then(|c| cuda::Bench::new(c, &cuda_host, args.quick));
                for &t in &args.tokens {
                    // Rotate through input slots (256-byte aligned) spanning > L2.
                    let slot_bytes = ((t * row_bytes) as u64).div_ceil(256) * 256;
                    let nslots = ((total_rows * row_bytes) as u64 / slot_bytes).clamp(1, 64) as usize;
                    let inputs: Vec<DeviceLogits<'_>> = (0..nslots)
                        .filter_map(|i| DeviceLogits::from_buffer(&buf, i as u64 * slot_bytes, t, e, dtype).ok())
                        .collect();
                    let targets = router.alloc_buffers(t, dtype);
                    let record_buf = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                        label: Some("bench record"),
                        size: ((t * k * 4) as u64).div_ceil(16).max(1) * 16,
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    });
                    // Valid ids for replay: one routing first; check it raised no error.
                    let mut enc = ctx
                        .device()
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
                    targets.clear_errors(&mut enc);
                    if let Err(err) = router.enqueue_route(&mut enc, &inputs[0], &targets) {
                        println!("bench-wgpu: {rule}: {err}");
                        continue;
                    }
                    ctx.queue().submit([enc.finish()]);
                    if let Err(err) = router.take_status(&targets, &inputs[0]) {
                        println!("bench-wgpu: {rule} T={t}: unexpected error: {err}");
                    }
                    let backward = args.ops.iter().any(|o| o.starts_with("backward"));
                    let grad = if backward {
                        match router.weights_from_host(&HostMatrix::F32(upstream(t, k))) {
                            Ok(g) => Some(g),
                            Err(err) => {
                                println!("bench-wgpu: {rule} T={t}: {err}");
                                None
                            }
                        }
                    } else {
                        None
                    };
                    let bwd = match (&grad, args.ops.iter().any(|o| o == "backward")) {
                        (Some(_), true) => match router.alloc_backward_buffers(t, dtype) {
                            Ok(b) => Some(b),
                            Err(err) => {
                                println!("bench-wgpu: {rule} T={t} backward: {err}");
                                None
                            }
                        },
                        _ => None,
                    };
                    for op in &args.ops {
                        let res = match (op.as_str(), &grad, &bwd) {
                            ("backward", Some(g), Some(b)) => time_reps(&ctx, args.quick, |enc, i| {
                                let input = &inputs[i % inputs.len()];
                                let _ = router.enqueue_backward(enc, input, targets.ids(), g, b);
                            })
                            .and_then(|s| {
                                router
                                    .take_backward_status(b, &inputs[0], targets.ids())
                                    .map(|_| s)
                                    .map_err(|e| format!("unexpected error: {e}"))
                            }),
                            ("backward-aux", Some(g), _) => {
                                let losses = LossGrads::default().aux_loss(1.0).z_loss(1.0);
                                let mut i = 0usize;
                                time_calls(args.quick, || {
                                    let input = &inputs[i % inputs.len()];
                                    i += 1;
                                    router
                                        .weights_vjp(input, targets.ids(), g, &losses, &CallSite::default())
                                        .map(|_| ())
                                        .map_err(|e| e.to_string())
                                })
                            }
                            ("backward" | "backward-aux", _, _) => continue,
                            _ => time_reps(&ctx, args.quick, |enc, i| {
                                let input = &inputs[i % inputs.len()];
                                let r = match op.as_str() {
                                    "replay" => router.enqueue_replay(enc, input, &targets),
                                    _ => router.enqueue_route(enc, input, &targets),
                                };
                                if r.is_ok() && op == "record" && t > 0 {
                                    enc.copy_buffer_to_buffer(
                                        targets.ids().buffer(),
                                        0,
                                        &record_buf,
                                        0,
                                        ((t * k * 4) as u64).div_ceil(4) * 4,
                                    );
                                }
                            }),
                        };
                        let secs = match res {
                            Ok(s) => s,
                            Err(err) => {
                                println!("bench-wgpu: {rule} {op}: {err}");
                                continue;
                            }
                        };
                        let moved = if op.starts_with("backward") {
                            (t * row_bytes + t * k * 8 + t * e * 4) as f64
                        } else {
                            (t * row_bytes + t * k * 8) as f64
                        };
                        let gbs = moved / secs / 1e9;
                        #[cfg(feature = "cuda")]
                        let cuda_us = cuda_bench
                            .as_ref()
                            .filter(|_| !op.starts_with("backward"))
                            .and_then(|b| b.time(t, op))
                            .map(|s| s * 1e6);
                        #[cfg(not(feature = "cuda"))]
                        let cuda_us: Option<f64> = None;
                        let kernel = if op.starts_with("backward") {
                            "-"
                        } else {
                            router.kernels_for_batch(t, dtype).map_or("?", path_name)
                        };
                        let r = Row {
                            rule: rule.clone(),
                            dtype: dtype.name(),
                            mode: mode.clone(),
                            kernel,
                            op: op.clone(),
                            tokens: t,
                            us: secs * 1e6,
                            gbs,
                        };
                        let (cu, ratio) = match cuda_us {
                            Some(c) => (format!("{c:.2}"), format!("{:.2}", c / r.us)),
                            None => ("-".to_string(), "-".to_string()),
                        };
                        println!(
                            "{:<12} {:<5} {:<9} {:<9} {:<12} {:>7} {:>11.2} {:>9.1} {:>6.1}% {:>11} {:>10}",
                            r.rule,
                            r.dtype,
                            r.mode,
                            r.kernel,
                            r.op,
                            r.tokens,
                            r.us,
                            r.gbs,
                            100.0 * r.gbs / copy,
                            cu,
                            ratio
                        );
                        if let Some(f) = json.as_mut() {
                            let _ = writeln!(
                                f,
                                "{{\"rule\":{:?},\"dtype\":{:?},\"numerics\":{:?},\"kernel\":{:?},\"op\":{:?},\"tokens\":{},\"us\":{:.3},\"gbs\":{:.2},\"cuda_us\":{}}}",
                                r.rule,
                                r.dtype,
                                r.mode,
                                r.kernel,
                                r.op,
                                r.tokens,
                                r.us,
                                r.gbs,
                                cuda_us.map_or("null".to_string(), |c| format!("{c:.3}"))
                            );
                        }
                        rows.push(r);
                        std::io::stdout().flush().ok();
                    }
                }
            }
            ctx.device().poll(wgpu::PollType::wait_indefinitely()).ok();
        }
    }
    markdown(&rows, copy);
    // Portable vs native at the largest T.
    for r in rows.iter().filter(|r| r.mode == "portable" && r.op == "route") {
        if let Some(n) = rows.iter().find(|x| {
            x.mode == "native" && x.op == "route" && x.rule == r.rule && x.dtype == r.dtype && x.tokens == r.tokens
        }) && r.tokens == args.tokens.iter().copied().max().unwrap_or(0)
        {
            println!(
                "portable/native time {} {} T={}: {:.2}",
                r.rule,
                r.dtype,
                r.tokens,
                r.us / n.us
            );
        }
    }
}

/// The route and replay rows in the shape of `bench-cuda`'s table (one line per rule, dtype,
/// numerics, kernel path and T).
fn markdown(rows: &[Row], copy: f64) {
    let find = |r: &Row, op: &str| {
        rows.iter().find(|x| {
            x.op == op
                && x.rule == r.rule
                && x.dtype == r.dtype
                && x.mode == r.mode
                && x.tokens == r.tokens
                && x.kernel == r.kernel
        })
    };
    let cell = |x: Option<&Row>| match x {
        Some(x) => format!("{:.2} | {:.0} | {:.0}%", x.us, x.gbs, 100.0 * x.gbs / copy),
        None => "- | - | -".to_string(),
    };
    println!();
    println!("copy (same run): {copy:.0} GB/s");
    println!(
        "| rule | dtype | numerics | kernel | T | route µs | route GB/s | % copy | replay µs | replay GB/s | % copy |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows
        .iter()
        .filter(|r| r.op == "route" || (r.op == "replay" && find(r, "route").is_none()))
    {
        let route = if r.op == "route" { Some(r) } else { None };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.rule,
            r.dtype,
            r.mode,
            r.kernel,
            r.tokens,
            cell(route),
            cell(find(r, "replay"))
        );
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The CUDA backend timed the same way (launches, then one synchronisation, wall clock).
    use moe_router::cuda::{CudaRouter, LogitsBuffer, RouteBuffers};
    use moe_router::wgpu::LogitsDtype;
    use moe_router::{LogitsRef, RouterConfig};
    use ndarray::Array2;
    use std::time::Instant;

    pub enum HostLogits {
        F32(Array2<f32>),
        Bf16(Array2<half::bf16>),
    }

    impl HostLogits {
        pub fn new(bytes: &[u8], rows: usize, e: usize, dtype: LogitsDtype) -> Option<HostLogits> {
            match dtype {
                LogitsDtype::F32 => Array2::from_shape_vec((rows, e), bytemuck::pod_collect_to_vec(bytes))
                    .ok()
                    .map(HostLogits::F32),
                LogitsDtype::Bf16 => Array2::from_shape_vec((rows, e), bytemuck::pod_collect_to_vec(bytes))
                    .ok()
                    .map(HostLogits::Bf16),
                LogitsDtype::F16 => None,
            }
        }
        fn as_ref(&self) -> LogitsRef<'_> {
            match self {
                HostLogits::F32(a) => LogitsRef::F32(a.view()),
                HostLogits::Bf16(a) => LogitsRef::Bf16(a.view()),
            }
        }
    }

    pub struct Bench {
        router: CudaRouter,
        logits: LogitsBuffer,
        rows: usize,
        quick: bool,
    }

    impl Bench {
        pub fn new(cfg: RouterConfig, host: &Option<HostLogits>, quick: bool) -> Option<Bench> {
            let host = host.as_ref()?;
            let router = match CudaRouter::new(cfg) {
                Ok(r) => r,
                Err(e) => {
                    println!("bench-wgpu: CUDA backend unavailable: {e}");
                    return None;
                }
            };
            if let Err(e) = router.warm_up() {
                println!("bench-wgpu: CUDA warm-up failed: {e}");
                return None;
            }
            let l = host.as_ref();
            let rows = l.dim().0;
            let logits = match router.upload_logits(&l) {
                Ok(b) => b,
                Err(e) => {
                    println!("bench-wgpu: CUDA upload failed: {e}");
                    return None;
                }
            };
            Some(Bench {
                router,
                logits,
                rows,
                quick,
            })
        }

        fn run(&self, n: usize, t: usize, op: &str, out: &mut RouteBuffers, src: &RouteBuffers) -> Option<f64> {
            let slots = (self.rows / t.max(1)).clamp(1, 64);
            let view = self.logits.view();
            let k = moe_router::Router::config(&self.router).top_k();
            let t0 = Instant::now();
            for i in 0..n {
                let s = (i % slots) * t;
                let l = view.slice_rows(s, s + t).ok()?;
                match op {
                    "replay" => self.router.enqueue_replay(&l, &src.ids().slice(..t * k), out).ok()?,
                    _ => self.router.enqueue_route(&l, 0, out).ok()?,
                }
            }
            self.router.stream().synchronize().ok()?;
            Some(t0.elapsed().as_secs_f64())
        }

        /// Median seconds per call of `op` ("route", "replay"; "record" = route into a buffer
        /// with a record layer).
        pub fn time(&self, t: usize, op: &str) -> Option<f64> {
            let r = self.time_inner(t, op);
            if r.is_none() {
                println!("bench-wgpu: CUDA timing of {op} at T={t} failed");
            }
            r
        }

        fn time_inner(&self, t: usize, op: &str) -> Option<f64> {
            let layers = usize::from(op == "record");
            let mut out = self.router.alloc_buffers(t, layers).ok()?;
            let mut src = self.router.alloc_buffers(t, 0).ok()?;
            let view = self.logits.view();
            self.router
                .enqueue_route(&view.slice_rows(0, t).ok()?, 0, &mut src)
                .ok()?;
            self.router.take_status(&mut src).ok()?;
            self.run(2, t, op, &mut out, &src)?;
            let one = self.run(4, t, op, &mut out, &src)? / 4.0;
            let target = if self.quick { 0.008 } else { 0.025 };
            let n = ((target / one.max(1e-7)) as usize).clamp(3, 20_000);
            let reps = if self.quick { 3 } else { 7 };
            let mut v: Vec<f64> = (0..reps)
                .filter_map(|_| self.run(n, t, op, &mut out, &src).map(|s| s / n as f64))
                .collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied()
        }
    }
}
