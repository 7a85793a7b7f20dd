//! `moe-router bench`: a quick routing-throughput table for every backend compiled in and
//! available here. Criterion benches (`cargo bench`) and the per-backend bench binaries stay the
//! precise tools; this is the one-command answer to "how fast is it on this machine".
//!
//! For each backend the same batch (T tokens × E experts of the rule) is routed repeatedly with
//! the logits already in the backend's memory (host memory for the CPU, device memory for CUDA
//! and wgpu), and a plain memory copy of the logits is timed in the same run on the same memory:
//! routing reads the logits once and writes K ids and K weights per token, so the copy's
//! bandwidth is the roofline, and "% of copy" says how close routing gets to it.

use crate::CliError;
use crate::backend::{AnyRouter, BackendKind};
use crate::route::NumericsArg;
use half::bf16;
use moe_router::{LogitsRef, Numerics, Router, RouterConfig};
use ndarray::Array2;
use serde::Serialize;
use std::time::Instant;

/// Logits element type of the benchmark batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchDtype {
    /// 4-byte logits.
    F32,
    /// 2-byte bfloat16 logits.
    Bf16,
}

/// Arguments of `bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  moe-router bench
  moe-router bench --tokens 262144 --seconds 2 --preset qwen3-moe --dtype bf16
  moe-router bench --backend cpu --json

For every backend compiled into this build (cpu always; cuda and wgpu with the cargo features of
the same names) and available here, routes one batch repeatedly with the logits already in the
backend's memory and prints tokens/s, GB/s (logits read + ids and weights written) and the
ratio to a plain copy of the logits timed in the same run on the same memory. A backend that is
not compiled in or has no device is listed with the reason. Precise numbers: `cargo bench` and
docs/benchmarks.md.")]
pub struct BenchArgs {
    /// Routing rule (preset name).
    #[arg(long, default_value = "deepseek-v3", value_name = "NAME")]
    pub preset: String,
    /// Tokens per routing call (at least 1).
    #[arg(long, default_value_t = 16_384, value_name = "T",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub tokens: usize,
    /// Logits dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: BenchDtype,
    /// Router numerics.
    #[arg(long, value_enum, default_value = "portable")]
    pub numerics: NumericsArg,
    /// Measuring time per backend, in seconds.
    #[arg(long, default_value_t = 0.5, value_name = "S")]
    pub seconds: f64,
    /// Only these backends (repeatable; default: every backend compiled in). A backend named
    /// here that cannot be measured (not compiled in, no device) makes the command fail (exit 1)
    /// after the table.
    #[arg(long, value_parser = crate::backend::backend_parser(), value_name = "NAME")]
    pub backend: Vec<BackendKind>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One backend's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// Backend name.
    pub backend: BackendKind,
    /// Device (CPU model, GPU or adapter name); empty when skipped.
    pub device: String,
    /// Why the backend was not measured (not compiled in, no device, unsupported rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Median seconds per routing call.
    pub seconds_per_call: f64,
    /// Tokens routed per second.
    pub tokens_per_s: f64,
    /// (logits read + ids and weights written) per second, in GB/s.
    pub gb_per_s: f64,
    /// Copy bandwidth of the same memory (bytes read + written per second), in GB/s.
    pub copy_gb_per_s: f64,
    /// `gb_per_s / copy_gb_per_s`.
    pub ratio_to_copy: f64,
}

/// The JSON output of `bench --json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Rule.
    pub preset: String,
    /// E.
    pub num_experts: usize,
    /// K.
    pub top_k: usize,
    /// T.
    pub tokens: usize,
    /// Logits dtype.
    pub dtype: BenchDtype,
    /// Router numerics.
    pub numerics: Numerics,
    /// One row per backend.
    pub backends: Vec<BenchRow>,
}

fn skipped(kind: BackendKind, device: String, why: String) -> BenchRow {
    BenchRow {
        backend: kind,
        device,
        skipped: Some(why),
        seconds_per_call: 0.0,
        tokens_per_s: 0.0,
        gb_per_s: 0.0,
        copy_gb_per_s: 0.0,
        ratio_to_copy: 0.0,
    }
}

/// Calls `f` (one timed unit of `reps` repetitions, returning seconds) until `budget` seconds
/// have passed; returns the median seconds per repetition.
fn measure(budget: f64, mut f: impl FnMut(usize) -> Result<f64, String>) -> Result<f64, String> {
    f(1)?; // warm-up (kernel compilation, caches)
    let one = f(1)?.max(1e-7);
    let reps = ((budget / 8.0 / one) as usize).clamp(1, 10_000);
    let start = Instant::now();
    let mut v = Vec::new();
    while v.len() < 3 || (start.elapsed().as_secs_f64() < budget && v.len() < 200) {
        v.push(f(reps)? / reps as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Deterministic logits with a realistic spread (N(0,1)-like, per-expert offsets).
fn logits(t: usize, e: usize) -> Array2<f32> {
    let mut s = 0x1234_5678_9abc_def0u64;
    Array2::from_shape_fn((t, e), |(_, j)| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let u = (s >> 40) as f32 / (1u64 << 24) as f32;
        (u - 0.5) * 3.0 + ((j * 37) % 11) as f32 * 0.05
    })
}

fn rule(a: &BenchArgs) -> Result<RouterConfig, CliError> {
    let ctx = |c: &str| {
        let c = c.to_string();
        move |e| CliError::Config { context: c, source: e }
    };
    let mut cfg = moe_router::preset(&a.preset).map_err(ctx("--preset"))?;
    if cfg.expects_expert_bias() {
        let e = cfg.num_experts();
        cfg.set_expert_bias((0..e).map(|i| ((i * 7) % 13) as f32 * 1e-3).collect())
            .map_err(ctx("bias"))?;
    }
    let n = match a.numerics {
        NumericsArg::Portable => Numerics::Portable,
        NumericsArg::Native => Numerics::Native,
    };
    cfg.to_builder().numerics(n).build().map_err(ctx("--numerics"))
}

/// Runs `bench`.
pub fn run(a: &BenchArgs) -> Result<u8, CliError> {
    let report = run_bench(a)?;
    if a.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| CliError::Input(e.to_string()))?;
        println!("{json}");
    } else {
        print!("{}", table(&report));
    }
    // A backend asked for by name that was not measured is a failure, not a footnote.
    let missing: Vec<String> = report
        .backends
        .iter()
        .filter(|b| a.backend.contains(&b.backend))
        .filter_map(|b| b.skipped.as_ref().map(|why| format!("{}: {why}", b.backend.name())))
        .collect();
    if !missing.is_empty() {
        crate::trace_cmds::emit(
            format!(
                "error: --backend asked for a backend that was not measured ({})",
                missing.join("; ")
            ),
            true,
        );
        return Ok(crate::EXIT_FAILED);
    }
    Ok(crate::EXIT_OK)
}

/// Measures every requested backend; returns the report.
pub fn run_bench(a: &BenchArgs) -> Result<BenchReport, CliError> {
    if a.tokens == 0 || !(a.seconds.is_finite() && a.seconds > 0.0) {
        return Err(CliError::Usage(
            "--tokens must be at least 1 and --seconds positive".into(),
        ));
    }
    let cfg = rule(a)?;
    let (t, e, k) = (a.tokens, cfg.num_experts(), cfg.top_k());
    if (t as u128) * (e as u128) > 1 << 31 {
        return Err(CliError::Input(format!(
            "--tokens {t} × E = {e} logits is too large; use at most {} tokens",
            (1usize << 31) / e
        )));
    }
    let l32 = logits(t, e);
    let l16 = l32.mapv(bf16::from_f32);
    let lr = match a.dtype {
        BenchDtype::F32 => LogitsRef::F32(l32.view()),
        BenchDtype::Bf16 => LogitsRef::Bf16(l16.view()),
    };
    let moved = (t * e * lr.elem_bytes() + t * k * 8) as f64;
    let kinds: Vec<BackendKind> = if a.backend.is_empty() {
        BackendKind::ALL.to_vec()
    } else {
        a.backend.clone()
    };
    let mut rows = Vec::new();
    for kind in kinds {
        if !kind.compiled_in() {
            rows.push(skipped(
                kind,
                String::new(),
                format!("not compiled in (build with --features {})", kind.name()),
            ));
            continue;
        }
        let router = match AnyRouter::new(kind, cfg.clone()) {
            Ok(r) => r,
            Err(err) => {
                rows.push(skipped(kind, String::new(), err.to_string()));
                continue;
            }
        };
        let device = router.device_name();
        let measured = time_backend(&router, &lr, a.seconds);
        rows.push(match measured {
            Ok((route_s, copy_gbs)) => {
                let gbs = moved / route_s / 1e9;
                BenchRow {
                    backend: kind,
                    device,
                    skipped: None,
                    seconds_per_call: route_s,
                    tokens_per_s: t as f64 / route_s,
                    gb_per_s: gbs,
                    copy_gb_per_s: copy_gbs,
                    ratio_to_copy: if copy_gbs > 0.0 { gbs / copy_gbs } else { 0.0 },
                }
            }
            Err(why) => skipped(kind, device, why),
        });
    }
    Ok(BenchReport {
        preset: a.preset.clone(),
        num_experts: e,
        top_k: k,
        tokens: t,
        dtype: a.dtype,
        numerics: cfg.numerics(),
        backends: rows,
    })
}

/// Times routing and a copy of the logits' bytes on `router`'s memory: (seconds per route call,
/// copy GB/s counting bytes read + written).
fn time_backend(router: &AnyRouter, lr: &LogitsRef<'_>, budget: f64) -> Result<(f64, f64), String> {
    let bytes = lr.rows() * lr.dim().1 * lr.elem_bytes();
    match router {
        AnyRouter::Cpu(r) => {
            let route = measure(budget, |n| {
                let t0 = Instant::now();
                for _ in 0..n {
                    let out = r.route_host(lr).map_err(|e| e.to_string())?;
                    std::hint::black_box(out);
                }
                Ok(t0.elapsed().as_secs_f64())
            })?;
            let src = vec![1u8; bytes.max(1)];
            let mut dst = vec![0u8; bytes.max(1)];
            let copy = measure(budget / 4.0, |n| {
                let t0 = Instant::now();
                for _ in 0..n {
                    dst.copy_from_slice(std::hint::black_box(&src));
                    std::hint::black_box(&mut dst);
                }
                Ok(t0.elapsed().as_secs_f64())
            })?;
            Ok((route, 2.0 * bytes as f64 / copy / 1e9))
        }
        #[cfg(feature = "cuda")]
        AnyRouter::Cuda(r) => time_cuda(r, lr, bytes, budget),
        #[cfg(feature = "wgpu")]
        AnyRouter::Wgpu(r) => time_wgpu(r, lr, bytes, budget),
        // A backend the facade was built with (through another crate's features) but this CLI
        // was not: it cannot be chosen here, since `--backend` is checked against this build.
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "this moe-router CLI was built without the `{}` feature",
            other.kind().name()
        )),
    }
}

#[cfg(feature = "cuda")]
fn time_cuda(
    r: &moe_router::cuda::CudaRouter,
    lr: &LogitsRef<'_>,
    bytes: usize,
    budget: f64,
) -> Result<(f64, f64), String> {
    use moe_router::{CallSite, Router};
    let es = |e: moe_router::RouteError| e.to_string();
    let buf = r.upload_logits(lr).map_err(es)?;
    let view = buf.view();
    let stream = r.stream().clone();
    let route = measure(budget, |n| {
        stream.synchronize().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        for _ in 0..n {
            let out = r.route(&view, &CallSite::default()).map_err(es)?;
            std::hint::black_box(out);
        }
        stream.synchronize().map_err(|e| e.to_string())?;
        Ok(t0.elapsed().as_secs_f64())
    })?;
    let src = stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| e.to_string())?;
    let mut dst = stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| e.to_string())?;
    let copy = measure(budget / 4.0, |n| {
        stream.synchronize().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        for _ in 0..n {
            stream.memcpy_dtod(&src, &mut dst).map_err(|e| e.to_string())?;
        }
        stream.synchronize().map_err(|e| e.to_string())?;
        Ok(t0.elapsed().as_secs_f64())
    })?;
    Ok((route, 2.0 * bytes as f64 / copy / 1e9))
}

#[cfg(feature = "wgpu")]
fn time_wgpu(
    r: &moe_router::wgpu::WgpuRouter,
    lr: &LogitsRef<'_>,
    bytes: usize,
    budget: f64,
) -> Result<(f64, f64), String> {
    let es = |e: moe_router::RouteError| e.to_string();
    let ctx = r.context().clone();
    let upload = r.upload_logits(lr).map_err(es)?;
    let input = upload.view();
    let targets = r.alloc_buffers(lr.rows(), input.dtype());
    let submit =
        |n: usize, record: &mut dyn FnMut(&mut moe_router::wgpu::wgpu::CommandEncoder) -> Result<(), String>| {
            let mut enc = ctx
                .device()
                .create_command_encoder(&moe_router::wgpu::wgpu::CommandEncoderDescriptor { label: None });
            for _ in 0..n {
                record(&mut enc)?;
            }
            let cb = enc.finish();
            let t0 = Instant::now();
            ctx.queue().submit([cb]);
            ctx.device()
                .poll(moe_router::wgpu::wgpu::PollType::wait_indefinitely())
                .map_err(|e| e.to_string())?;
            Ok::<f64, String>(t0.elapsed().as_secs_f64())
        };
    let route = measure(budget, |n| {
        submit(n, &mut |enc| r.enqueue_route(enc, &input, &targets).map_err(es))
    })?;
    r.take_status(&targets, &input).map_err(es)?;
    let size = (bytes.max(4) as u64).div_ceil(4) * 4;
    let mk = || {
        ctx.device().create_buffer(&moe_router::wgpu::wgpu::BufferDescriptor {
            label: Some("moe-router bench copy"),
            size,
            usage: moe_router::wgpu::wgpu::BufferUsages::COPY_SRC | moe_router::wgpu::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (src, dst) = (mk(), mk());
    let copy = measure(budget / 4.0, |n| {
        submit(n, &mut |enc| {
            enc.copy_buffer_to_buffer(&src, 0, &dst, 0, size);
            Ok(())
        })
    })?;
    Ok((route, 2.0 * size as f64 / copy / 1e9))
}

fn si(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// The human-readable table.
pub fn table(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "moe-router bench: {} (E={}, K={}), {} tokens of {} logits per call, {:?} numerics",
        r.preset,
        r.num_experts,
        r.top_k,
        r.tokens,
        match r.dtype {
            BenchDtype::F32 => "f32",
            BenchDtype::Bf16 => "bf16",
        },
        r.numerics
    );
    let _ = writeln!(
        o,
        "{:<8} {:>12} {:>10} {:>10} {:>10} {:>9}  device",
        "backend", "tokens/s", "us/call", "GB/s", "copy GB/s", "% copy"
    );
    for b in &r.backends {
        match &b.skipped {
            Some(why) => {
                let _ = writeln!(o, "{:<8} skipped: {why}", b.backend.name());
            }
            None => {
                let _ = writeln!(
                    o,
                    "{:<8} {:>12} {:>10.1} {:>10.2} {:>10.2} {:>8.0}%  {}",
                    b.backend.name(),
                    si(b.tokens_per_s),
                    b.seconds_per_call * 1e6,
                    b.gb_per_s,
                    b.copy_gb_per_s,
                    b.ratio_to_copy * 100.0,
                    b.device
                );
            }
        }
    }
    o
}
