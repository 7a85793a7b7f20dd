//! Route one batch on every backend compiled in and check that portable numerics give the same
//! ids and the same weight bits everywhere.
//!
//! ```sh
//! cargo run --release -p moe-router --example route_backends
//! cargo run --release -p moe-router --example route_backends --features cuda,wgpu
//! ```
//!
//! A backend whose feature is on but which has no device here (no GPU, no Vulkan adapter) is
//! skipped with the reason: the constructors return `RouteError::Unavailable`, never panic.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
use moe_router::RouteError;
use moe_router::cpu::CpuRouter;
use moe_router::{CallSite, HostWeights, LogitsRef, Router, preset};
use ndarray::Array2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // DeepSeek-V3's rule: sigmoid scores, a per-layer selection bias from the checkpoint
    // (`e_score_correction_bias`), 8 groups of which 4 are kept, top-8 of 256, scaled by 2.5.
    let mut cfg = preset("deepseek-v3")?;
    let e = cfg.num_experts();
    cfg.set_expert_bias((0..e).map(|i| (i % 7) as f32 * 0.01).collect())?;

    let t = 1024;
    let logits = Array2::from_shape_fn((t, e), |(r, c)| (((r * 131 + c * 71) % 997) as f32 / 997.0 - 0.5) * 6.0);
    let lr = LogitsRef::F32(logits.view());

    let cpu = CpuRouter::new(cfg.clone());
    let reference = cpu.route(&lr, &CallSite::layer(3))?;
    let ref_bits = bits(&reference.weights);
    let checksum = ref_bits.iter().fold(0u32, |h, b| h.rotate_left(5) ^ b);
    println!(
        "cpu : routed {t} tokens, first row -> experts {:?}, weight bits checksum {checksum:08x}",
        reference.ids.row(0).to_vec()
    );

    #[cfg(feature = "cuda")]
    match moe_router::cuda::CudaRouter::new(cfg.clone()) {
        Ok(r) => {
            let (ids, w) = r.route_host(&lr)?;
            println!(
                "cuda: {} -> ids equal: {}, weight bits equal: {}",
                r.device_name(),
                ids == reference.ids,
                bits(&w) == ref_bits
            );
        }
        Err(RouteError::Unavailable { reason, .. }) => println!("cuda: skipped ({reason})"),
        Err(other) => return Err(other.into()),
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not compiled in (run with --features cuda)");

    #[cfg(feature = "wgpu")]
    match moe_router::wgpu::WgpuRouter::new(cfg.clone()) {
        Ok(r) => {
            let (ids, w) = r.route_host(&lr)?;
            println!(
                "wgpu: {} -> ids equal: {}, weight bits equal: {}",
                r.adapter_name(),
                ids == reference.ids,
                bits(&w) == ref_bits
            );
        }
        Err(RouteError::Unavailable { reason, .. }) => println!("wgpu: skipped ({reason})"),
        Err(other) => return Err(other.into()),
    }
    #[cfg(not(feature = "wgpu"))]
    println!("wgpu: not compiled in (run with --features wgpu)");

    Ok(())
}

fn bits(w: &HostWeights) -> Vec<u32> {
    w.to_f32().iter().map(|x| x.to_bits()).collect()
}
