//! Backend-level tests on whatever adapter is present (software adapters in CI). Each test
//! prints `skipped: <reason>` and returns when no adapter exists.

use moe_router_core::{GroupScore, LogitsRef, Normalization, ReferenceRouter, Router, RouterConfig, ScoreFunction};
use moe_router_wgpu::selftest::{self, MathFn};
use moe_router_wgpu::{AdapterOptions, WgpuContext, WgpuRouter};
use ndarray::Array2;

fn ctx() -> Option<std::sync::Arc<WgpuContext>> {
    match WgpuContext::shared(&AdapterOptions::from_env()) {
        Ok(c) => {
            eprintln!("adapter: {:?}", c.adapter());
            Some(c)
        }
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

#[test]
fn portable_math_is_bit_identical_to_core_math() {
    let Some(ctx) = ctx() else { return };
    let n: usize = std::env::var("MOE_ROUTER_WGPU_MATH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let reports = selftest::check(&ctx, n).expect("selftest runs");
    let mut bad = Vec::new();
    for r in &reports {
        eprintln!(
            "{:?}: {} / {} mismatches, first {:?}",
            r.func, r.mismatches, r.n, r.first
        );
        if r.func != MathFn::PlainMulAdd && r.mismatches > 0 {
            bad.push(r.clone());
        }
    }
    assert!(
        bad.is_empty(),
        "portable math differs from core::math on {}: {bad:?}",
        ctx.adapter().name
    );
}

#[test]
fn routes_a_deepseek_like_batch_like_the_reference() {
    let Some(ctx) = ctx() else { return };
    let bias: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.01).collect();
    let cfg = RouterConfig::builder(64, 6)
        .score(ScoreFunction::Sigmoid)
        .expert_bias(bias)
        .group_limit(8, 3, GroupScore::SumTopN(2))
        .normalization(Normalization::Sum { eps: 1e-20 })
        .scaling_factor(2.5)
        .build()
        .unwrap();
    let l = Array2::from_shape_fn((300, 64), |(t, e)| ((t * 37 + e * 11) % 97) as f32 * 0.03 - 1.4);
    let want = ReferenceRouter::new(cfg.clone())
        .route_host(&LogitsRef::F32(l.view()))
        .unwrap();
    let r = WgpuRouter::with_context(cfg, ctx).unwrap();
    let got = r.route_host(&LogitsRef::F32(l.view())).unwrap();
    assert_eq!(want.0, got.0);
    assert_eq!(want.1, got.1);
}
