//! Replay with fallback rows, before and after they were routed on the device: for every backend
//! compiled in, times (per call, median of repeats, host wall clock including the backend's own
//! synchronisation)
//!
//! - `replay`: weights of forced ids already on the device, no fallback row (the kernel floor);
//! - `upload+replay`: the same with the ids uploaded from the host first (the floor of a
//!   replay policy, whose ids come from a host trace);
//! - `two-pass`: the old path — route the whole batch, copy its ids to the host, merge the
//!   fallback rows, upload the merged ids, weigh them (what `Router::replay_with_fallback`'s
//!   default still does for a third-party backend);
//! - `fused`: the backend's `replay_with_fallback` (fallback rows selected inside the replay
//!   kernel: one upload, one launch).
//!
//! Usage: `bench-fallback [T] [fallback-percent]` (default 262144 tokens, 5%); the DeepSeek-V3
//! and Qwen3 rules, f32 logits. Build with `--features cuda,wgpu` for the GPU backends.

use moe_router::{CallSite, LogitsRef, ROUTER_SELECTS, RouteError, Router, RouterConfig, preset};
use ndarray::{Array2, ArrayView2};
use std::time::Instant;

fn two_pass<R: Router>(
    r: &R,
    l: &R::Logits<'_>,
    ids: ArrayView2<'_, u32>,
    rows: &[usize],
) -> Result<R::Weights, RouteError> {
    let site = CallSite::default();
    let own = r.route(l, &site)?;
    let own = r.ids_to_host(&own.ids)?;
    let mut merged = ids.to_owned();
    for &i in rows {
        merged.row_mut(i).assign(&own.row(i));
    }
    let dev = r.ids_from_host(merged.view())?;
    r.weights_for(l, &dev, &site)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut() -> Result<(), RouteError>) -> Result<f64, RouteError> {
    f()?;
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

fn bench<R: Router>(name: &str, r: &R, logits: &Array2<f32>, pct: f64) -> Result<(), RouteError> {
    let lr = LogitsRef::F32(logits.view());
    let (t, k) = (logits.nrows(), r.config().top_k());
    let (ids, _) = r.route_host(&lr)?;
    let every = (100.0 / pct).round().max(1.0) as usize;
    let rows: Vec<usize> = (0..t).filter(|i| (i * 7919) % every == 0).collect();
    let mut masked = ids.clone();
    for &i in &rows {
        masked.row_mut(i).fill(ROUTER_SELECTS);
    }
    let reps = if t >= 65536 { 15 } else { 40 };
    r.with_host_logits(&lr, |l| {
        let site = CallSite::default();
        let dev = r.ids_from_host(ids.view())?;
        let replay = time(reps, || r.weights_for(l, &dev, &site).map(drop))?;
        let upload = time(reps, || {
            let d = r.ids_from_host(ids.view())?;
            r.weights_for(l, &d, &site).map(drop)
        })?;
        let two = time(reps, || two_pass(r, l, masked.view(), &rows).map(drop))?;
        let fused = time(reps, || r.replay_with_fallback(l, masked.view(), &rows, &site).map(drop))?;
        println!(
            "{name:<22} T={t:<7} K={k:<2} fallback {:>5.2}%  replay {:>9.1} us  upload+replay {:>9.1} us  two-pass {:>9.1} us  fused {:>9.1} us  two-pass/fused {:>5.2}x  fused/(upload+replay) {:>5.2}x",
            100.0 * rows.len() as f64 / t as f64,
            replay * 1e6,
            upload * 1e6,
            two * 1e6,
            fused * 1e6,
            two / fused,
            fused / upload
        );
        Ok(())
    })
}

fn logits(t: usize, e: usize) -> Array2<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    Array2::from_shape_simple_fn((t, e), || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
    })
}

fn configs() -> Vec<(&'static str, RouterConfig)> {
    let mut out = Vec::new();
    for name in ["deepseek-v3", "qwen3-moe"] {
        let Ok(mut cfg) = preset(name) else { continue };
        if cfg.expects_expert_bias() {
            let e = cfg.num_experts();
            let bias: Vec<f32> = (0..e).map(|i| ((i * 37) % 17) as f32 * 0.01).collect();
            if cfg.set_expert_bias(bias).is_err() {
                continue;
            }
        }
        out.push((name, cfg));
    }
    out
}

fn main() -> Result<(), RouteError> {
    let args: Vec<String> = std::env::args().collect();
    let t: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(262_144);
    let pct: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    for (name, cfg) in configs() {
        let l = logits(t, cfg.num_experts());
        bench(
            &format!("cpu {name}"),
            &moe_router::cpu::CpuRouter::new(cfg.clone()),
            &l,
            pct,
        )?;
        #[cfg(feature = "cuda")]
        match moe_router::cuda::CudaRouter::new(cfg.clone()) {
            Ok(r) => {
                println!("cuda device: {}", r.device_name());
                bench(&format!("cuda {name}"), &r, &l, pct)?
            }
            Err(e) => println!("skipped: cuda: {e}"),
        }
        #[cfg(feature = "wgpu")]
        match moe_router::wgpu::WgpuRouter::new(cfg.clone()) {
            Ok(r) => {
                println!("wgpu adapter: {}", r.adapter_name());
                bench(&format!("wgpu {name}"), &r, &l, pct)?
            }
            Err(e) => println!("skipped: wgpu: {e}"),
        }
    }
    Ok(())
}
