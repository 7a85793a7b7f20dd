//! The wgpu backend passes the shared conformance suite bit-identically (portable mode) on the
//! adapter at hand: Mesa llvmpipe (GL) or lavapipe (Vulkan) in CI, the NVIDIA driver (Vulkan) on
//! the GPU machine. Without any adapter every test prints `skipped: <reason>` and returns.
//!
//! Environment: `MOE_ROUTER_WGPU_BACKEND` / `MOE_ROUTER_WGPU_ADAPTER` pick the adapter;
//! `MOE_ROUTER_WGPU_LARGE=1` adds the large shapes (GPU machine); `MOE_ROUTER_WGPU_CASES=N` sets
//! the number of random configs; `MOE_ROUTER_WGPU_MATH_N=N` the math self-test size.

use crate::conformance::{self, Backend, Size};
use moe_router::wgpu::selftest::{self, MathFn};
use moe_router::wgpu::{AdapterOptions, KernelPath, LogitsDtype, WgpuContext, WgpuRouter};
use moe_router::{
    AuxLossKind, CallSite, Capacity, DropPolicy, GroupScore, LogitsRef, Normalization, RouteError, Router,
    RouterConfig, ScoreFunction,
};
use ndarray::Array2;
use std::sync::Arc;

fn context() -> Option<Arc<WgpuContext>> {
    match WgpuContext::shared(&AdapterOptions::from_env()) {
        Ok(c) => {
            eprintln!("wgpu adapter: {:?}", c.adapter());
            Some(c)
        }
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

fn env_usize(k: &str) -> Option<usize> {
    std::env::var(k).ok().and_then(|s| s.parse().ok())
}

pub struct Wgpu {
    ctx: Arc<WgpuContext>,
    max_rows: Option<usize>,
}

impl Backend for Wgpu {
    type Router = WgpuRouter;
    fn name(&self) -> String {
        format!("wgpu ({})", self.ctx.adapter().name)
    }
    fn router(&self, cfg: &RouterConfig) -> Result<WgpuRouter, RouteError> {
        let r = WgpuRouter::with_context(cfg.clone(), self.ctx.clone())?;
        Ok(match self.max_rows {
            Some(n) => r.with_max_rows_per_dispatch(n),
            None => r,
        })
    }
}

/// The wgpu backend on the adapter the environment picks, or the reason there is none.
struct WgpuFromEnv;

impl Backend for WgpuFromEnv {
    type Router = WgpuRouter;
    fn name(&self) -> String {
        match WgpuContext::shared(&AdapterOptions::from_env()) {
            Ok(c) => format!("wgpu ({})", c.adapter().name),
            Err(_) => "wgpu".into(),
        }
    }
    fn router(&self, cfg: &RouterConfig) -> Result<WgpuRouter, RouteError> {
        WgpuRouter::with_options(cfg.clone(), &AdapterOptions::from_env())
    }
}

fn backend() -> Option<Wgpu> {
    context().map(|ctx| Wgpu { ctx, max_rows: None })
}

#[test]
fn wgpu_passes_the_conformance_suite() {
    let cases = env_usize("MOE_ROUTER_WGPU_CASES").unwrap_or(Size::CI.cases as usize) as u32;
    let large = std::env::var("MOE_ROUTER_WGPU_LARGE").is_ok();
    let report = conformance::run_suite(
        &WgpuFromEnv,
        Size {
            cases,
            large,
            ..Size::CI
        },
    );
    if let Some(why) = &report.skipped {
        println!("skipped: wgpu conformance: {why}");
    }
}

#[test]
fn wgpu_portable_math_is_bit_identical_to_core_math() {
    let Some(b) = backend() else { return };
    let n = env_usize("MOE_ROUTER_WGPU_MATH_N").unwrap_or(20_000);
    let reports = selftest::check(&b.ctx, n).expect("math self-test runs");
    for r in &reports {
        eprintln!("{:?}: {} of {} differ; first {:?}", r.func, r.mismatches, r.n, r.first);
    }
    let fused = reports
        .iter()
        .find(|r| r.func == MathFn::PlainMulAdd)
        .map_or(0, |r| r.mismatches);
    eprintln!("contraction probe: plain a*b+c differs from separate rounding in {fused} of {n} cases");
    let bad: Vec<_> = reports
        .iter()
        .filter(|r| r.func != MathFn::PlainMulAdd && r.mismatches > 0)
        .collect();
    assert!(
        bad.is_empty(),
        "{}: portable math differs from core::math: {bad:?}",
        b.name()
    );
}

#[test]
fn wgpu_split_batches_are_bit_identical_to_reference() {
    // Force several dispatches per batch (as the storage-binding limit does for large batches).
    let Some(b) = backend() else { return };
    let b = Wgpu {
        ctx: b.ctx,
        max_rows: Some(256),
    };
    let cfg = RouterConfig::builder(24, 5)
        .score(ScoreFunction::SqrtSoftplus)
        .group_limit(6, 2, GroupScore::SumTopN(2))
        .normalization(Normalization::Sum { eps: 1e-20 })
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((1000, 24), |(t, e)| {
        (((t * 7919 + e * 104_729) % 2000) as f32 - 1000.0) * 0.004
    });
    conformance::assert_same_as_reference(&b, &cfg, LogitsRef::F32(l.view()), "split f32");
    let lb = l.mapv(half::bf16::from_f32);
    conformance::assert_same_as_reference(&b, &cfg, LogitsRef::Bf16(lb.view()), "split bf16");
    let mut bad = l.clone();
    bad[[700, 3]] = f32::NAN;
    bad[[900, 1]] = f32::INFINITY;
    conformance::assert_same_as_reference(&b, &cfg, LogitsRef::F32(bad.view()), "split, NaN in the third chunk");
}

#[test]
fn wgpu_statistics_match_the_host() {
    let Some(b) = backend() else { return };
    for score in [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::SqrtSoftplus,
    ] {
        let cfg = RouterConfig::builder(48, 6)
            .score(score)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .capacity(Capacity {
                factor: 1.0,
                min_capacity: None,
                policy: DropPolicy::Probs,
                pad_to_capacity: false,
            })
            .aux_loss(AuxLossKind::MicroBatch, 1e-2)
            .z_loss_coeff(1e-3)
            .build()
            .expect("valid");
        let l = Array2::from_shape_fn((700, 48), |(t, e)| {
            let x = ((t * 2_654_435_761 + e * 40_503) % 10_007) as f32 / 10_007.0;
            (x - 0.5) * 6.0
        });
        let logits = LogitsRef::F32(l.view());
        let r = b.router(&cfg).expect("router");
        let out = r
            .with_host_logits(&logits, |l| r.route(l, &CallSite::default()))
            .expect("routes");
        let ids = r.ids_to_host(&out.ids).expect("ids");
        assert_eq!(
            r.tokens_per_expert(&out.ids).expect("counts"),
            moe_router::stats::tokens_per_expert(ids.view(), 48)
        );
        let cap = r
            .apply_capacity(&out.ids, &out.weights)
            .expect("capacity")
            .expect("configured");
        let w = r.weights_to_host(&out.weights).expect("weights").to_f64();
        let want_cap =
            moe_router::capacity::apply_capacity(&cfg.capacity().expect("configured"), ids.view(), w.view(), 48);
        assert_eq!(cap, want_cap);
        let aux = r
            .with_host_logits(&logits, |l| r.aux_loss_micro_batch(l, 1e-2))
            .expect("aux");
        let want_aux = moe_router::stats::aux_loss_micro_batch(&cfg, &logits, 1e-2).expect("host aux");
        assert!(
            ((aux - want_aux) / want_aux).abs() <= 1e-6,
            "{score:?}: aux {aux} vs host {want_aux}"
        );
        let z = r.with_host_logits(&logits, |l| r.z_loss(l, 1e-3)).expect("z");
        let want_z = moe_router::stats::z_loss(&logits, 1e-3).expect("host z");
        assert!(
            ((z - want_z) / want_z).abs() <= 1e-6,
            "{score:?}: z-loss {z} vs host {want_z}"
        );
    }
}

#[test]
fn wgpu_unavailable_adapter_is_a_typed_error() {
    let e = WgpuContext::new(&AdapterOptions::default().adapter_name("no-such-adapter-anywhere")).expect_err("none");
    assert!(matches!(e, RouteError::Unavailable { .. }), "{e:?}");
    let e = WgpuContext::new(&AdapterOptions::default().backends("nonsense")).expect_err("none");
    assert!(matches!(e, RouteError::Unavailable { .. }), "{e:?}");
}

/// A row on which the NVIDIA Vulkan driver once produced a weight 1 ulp off (it rewrote
/// `ma - ((q0 * mb) + z)` inside the software division into `fma(-q0, mb, ma) - z`): kept as a
/// regression test of the no-contraction guard.
#[rustfmt::skip]
const NVIDIA_FMA_ROW: [f32; 300] = [
    -7.9479284, f32::NEG_INFINITY, -6.672891, 5.673961, 3.044, 7.247588, 3.017, 3.04, 2.4615836, -0.0, -1.049572,
    1.0, 1e-40, -4.761002, 1.291868, f32::NEG_INFINITY, -5.3005905, 1.0, 1.0, 40.0, 3.5177124, 7.9388833, -5.7602186,
    6.5674396, 1.0, -90.0, 1.0, f32::NEG_INFINITY, 1.0, 1.0, -1.1053479, 6.114138, 1.0, -0.53360695, 4.7511816,
    f32::NEG_INFINITY, 90.0, 5.825485, 1.0, 1.0, 1.3238633, -1.6389803, -0.5838559, 1.0, -5.6839747, -2.7489033,
    0.07650758, -6.2312813, 3.5884943, 5.4172535, 7.001207, -0.0, -2.4224012, -4.5749807, -4.1497073, 1.0,
    f32::NEG_INFINITY, -3.6045768, f32::NEG_INFINITY, -1.2343844, 7.7864294, 6.5921884, -1.3571612, -6.64108,
    4.4849067, -5.6702433, 1.0, 3.3352945, 6.4184217, 3.056, 40.0, 4.8831477, 7.833776, -1.422319, 3.978224,
    6.5066853, -0.0, -90.0, 5.105833, 6.8518076, -4.486978, 2.947993, -6.0221057, f32::NEG_INFINITY, -3.7279873,
    1.1788052, -5.5409307, 6.597788, f32::NEG_INFINITY, -0.4643597, 3.06, 5.5227466, -0.0, 3.8173873, 1.0, 7.396576,
    4.490046, 3.05, -7.934798, -2.493007, 1.0, -0.8911727, -0.623157, 3.033, -3.9766173, 3.051, f32::NEG_INFINITY,
    1.0412337, -1.396251, 90.0, 3.009, 3.2409403, -7.7733054, 6.4647555, -4.2449317, f32::NEG_INFINITY, -6.7989507,
    6.3511624, 3.014, 3.2499833, f32::NEG_INFINITY, 3.058, -90.0, -0.81762695, -3.0376322, 5.481649,
    f32::NEG_INFINITY, 0.29782292, 6.4799676, f32::NEG_INFINITY, 40.0, 90.0, f32::NEG_INFINITY, -1.5976788, 1e-40,
    3.957089, 3.042, 5.9540496, f32::NEG_INFINITY, -6.4367156, 40.0, f32::NEG_INFINITY, 5.269448, -0.58779186, 3.051,
    -3.7354696, 0.5466032, 3.045, 4.7857747, f32::NEG_INFINITY, f32::NEG_INFINITY, -6.9678607, 1.9329597, 3.043,
    3.8920882, 4.6747026, 2.1160913, 5.5061593, -90.0, -0.06848495, 6.2102566, 3.038, 40.0, -7.304196, 40.0,
    2.0714474, 1.0, f32::NEG_INFINITY, 3.04, 90.0, 5.1105123, 3.037, f32::NEG_INFINITY, 3.005, 7.026201, 1.0,
    0.8503438, 1.0, f32::NEG_INFINITY, 3.01, -1.189076, 6.5848317, 1.692576, f32::NEG_INFINITY, -2.402402, 6.511891,
    -7.722207, 1.3821999, 4.734429, 6.9490714, 4.245651, -1.4697531, f32::NEG_INFINITY, 40.0, -3.7519543,
    f32::NEG_INFINITY, -0.9340462, 3.7053227, 2.7341135, -5.5447674, -2.6357899, 5.3988495, 5.177731, -1.3777353,
    -90.0, 6.4729266, -7.175388, 1.0, 1.0, 3.985622, 0.59901124, -7.10786, 4.7398534, -4.6821837, 1.0, 1e-40,
    3.2047048, -1.9161266, -6.2200933, -7.749553, -90.0, 1.476684, f32::NEG_INFINITY, -90.0, 1.2205709,
    f32::NEG_INFINITY, -2.4731114, 5.1780987, -90.0, 3.0985548, -4.0652804, -4.804289, f32::NEG_INFINITY,
    f32::NEG_INFINITY, f32::NEG_INFINITY, 1e-40, -0.7916834, 90.0, 3.6457486, -2.1068027, -7.9271812, 40.0, 4.704375,
    1.0, 3.063, 1.0, 5.5171437, -4.707461, -5.014175, 3.009, -6.9020853, 6.671026, -1.7159867, 3.062, 1.0, 40.0,
    3.013, -0.7718475, 1.0, f32::NEG_INFINITY, f32::NEG_INFINITY, -2.6895432, 6.956524, -90.0, -4.5872555, 40.0,
    5.7088976, 40.0, 0.4984424, 1.0, 1.0, 7.1215177, -3.1635609, -0.60197663, 90.0, 7.05646, 3.028, 1.0, 7.849765,
    3.6053395, -3.5597768, 1e-40, 5.671689, -1.5677291, -1.5305079, 1.0, f32::NEG_INFINITY, f32::NEG_INFINITY,
    1.4700443, -2.5133007, -7.074157, 1.0, -0.0, 3.4296782, 3.031, f32::NEG_INFINITY, -6.6743016, 1.0, 5.318626,
    -0.8578724,
];

#[test]
fn wgpu_regression_row_where_a_driver_regrouped_the_division() {
    let Some(b) = backend() else { return };
    let cfg = RouterConfig::builder(300, 8)
        .score(ScoreFunction::Sigmoid)
        .group_limit(10, 4, GroupScore::Max)
        .normalization(Normalization::SumClampMin { min: 0.5 })
        .scaling_factor(0.37)
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((64, 300), |(t, e)| {
        if t % 2 == 0 {
            NVIDIA_FMA_ROW[e]
        } else {
            NVIDIA_FMA_ROW[(e + t) % 300]
        }
    });
    conformance::assert_same_as_reference(&b, &cfg, LogitsRef::F32(l.view()), "regression row");
}

/// The wgpu backend with its routing kernels forced onto one path (and optionally a small cap on
/// workgroups per grid dimension, which puts the row kernels on a 2-D grid).
struct WgpuPath {
    ctx: Arc<WgpuContext>,
    path: KernelPath,
    max_grid: Option<u32>,
}

impl Backend for WgpuPath {
    type Router = WgpuRouter;
    fn name(&self) -> String {
        format!("wgpu {:?} ({})", self.path, self.ctx.adapter().name)
    }
    fn router(&self, cfg: &RouterConfig) -> Result<WgpuRouter, RouteError> {
        let r = WgpuRouter::with_context(cfg.clone(), self.ctx.clone())?.with_kernel_path(self.path);
        Ok(match self.max_grid {
            Some(n) => r.with_max_workgroups_per_dimension(n),
            None => r,
        })
    }
}

/// Every routing check of the suite that reaches the routing kernels, on one forced path, plus
/// the regression row, rules shaped like the presets and a 2-D grid; first checks that the path
/// is the one that runs. Software adapters get fewer and shorter batches (they emulate the row
/// kernels' lanes and barriers at a high cost per row).
fn check_path(b: &WgpuPath) {
    let probe = b
        .router(&RouterConfig::builder(64, 4).build().expect("valid"))
        .expect("router");
    assert_eq!(
        probe.kernels_for_batch(100, LogitsDtype::F32).expect("path"),
        b.path,
        "{}: the forced path runs",
        b.name()
    );
    let software = b.ctx.is_software();
    // Fewer random cases than the suite's default: each config compiles its own kernels, and
    // software adapters take seconds per pipeline.
    let cases = env_usize("MOE_ROUTER_WGPU_CASES").unwrap_or(if software { 8 } else { 48 }) as u32;
    let size = Size { cases, ..Size::CI };
    conformance::check_random(b, size);
    conformance::check_native(b);
    conformance::check_errors(b);
    conformance::check_replay_fallback(b, size);
    conformance::check_replayed(b);
    if software {
        masked_groups_short(b);
    } else {
        conformance::check_masked_groups(b);
    }
    if std::env::var("MOE_ROUTER_WGPU_LARGE").is_ok() {
        conformance::check_large(b);
    }
    let l = Array2::from_shape_fn((64, 300), |(t, e)| {
        if t % 2 == 0 {
            NVIDIA_FMA_ROW[e]
        } else {
            NVIDIA_FMA_ROW[(e + t) % 300]
        }
    });
    let cfg = RouterConfig::builder(300, 8)
        .score(ScoreFunction::Sigmoid)
        .group_limit(10, 4, GroupScore::Max)
        .normalization(Normalization::SumClampMin { min: 0.5 })
        .scaling_factor(0.37)
        .build()
        .expect("valid");
    conformance::assert_same_as_reference(b, &cfg, LogitsRef::F32(l.view()), "regression row");
    // Rules shaped like the presets (groups of 32 with sum-top-2, one group of 384, 512 experts
    // with K = 10), portable and pruned, with exact ties, -inf and saturated logits mixed in.
    let rows = if software { 40 } else { 300 };
    for (e, k, groups, score) in [
        (256usize, 8usize, Some((8usize, 4usize, 2usize)), ScoreFunction::Sigmoid),
        (384, 8, None, ScoreFunction::Sigmoid),
        (512, 10, None, ScoreFunction::Softmax),
        (128, 8, None, ScoreFunction::SqrtSoftplus),
        (160, 6, Some((8, 3, 1)), ScoreFunction::Softmax),
    ] {
        let mut bld = RouterConfig::builder(e, k)
            .score(score)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .scaling_factor(2.5);
        if let Some((g, sel, n)) = groups {
            let rule = if n == 1 {
                GroupScore::Max
            } else {
                GroupScore::SumTopN(n)
            };
            bld = bld.group_limit(g, sel, rule);
        }
        if score != ScoreFunction::Softmax {
            bld = bld.expert_bias((0..e).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 1e-3).collect());
        }
        let cfg = bld.build().expect("valid");
        let l = Array2::from_shape_fn((rows, e), |(t, j)| match (t * 31 + j * 17) % 23 {
            0 => f32::NEG_INFINITY,
            1 => 1.0,
            2 => 40.0,
            _ => (((t * 7919 + j * 104_729) % 2000) as f32 - 1000.0) * 0.004,
        });
        let what = format!("preset-like E={e} K={k}");
        conformance::assert_same_as_reference(b, &cfg, LogitsRef::F32(l.view()), &what);
        let lb = l.mapv(half::bf16::from_f32);
        conformance::assert_same_as_reference(b, &cfg, LogitsRef::Bf16(lb.view()), &what);
        // The same rows on a 2-D grid of row-kernel workgroups (at most 5 per dimension).
        let grid = WgpuPath {
            ctx: b.ctx.clone(),
            path: b.path,
            max_grid: Some(5),
        };
        conformance::assert_same_as_reference(&grid, &cfg, LogitsRef::F32(l.view()), &format!("{what}, 2-D grid"));
    }
}

/// The rows of `conformance::check_masked_groups` (kept groups with fewer finite keys than K: the
/// slots left over go to the lowest ids among every -inf key, dropped groups included) in short
/// batches.
fn masked_groups_short(b: &WgpuPath) {
    let ninf = f32::NEG_INFINITY;
    let cfg = RouterConfig::builder(16, 4)
        .softmax_position(moe_router::SoftmaxPosition::AfterTopK)
        .group_limit(4, 2, GroupScore::Max)
        .build()
        .expect("valid");
    let row = [
        1.0f32, 0.5, 0.25, -1.0, 0.75, 0.1, -0.5, 0.9, ninf, ninf, 3.043, 3.03, ninf, 90.0, ninf, ninf,
    ];
    let l = Array2::from_shape_fn((12, 16), |(t, e)| {
        if t % 4 == 1 {
            row[e]
        } else {
            ((t * 7 + e * 3) % 11) as f32 * 0.3
        }
    });
    conformance::assert_same_as_reference(b, &cfg, LogitsRef::F32(l.view()), "E16 K4, one masked slot");
    let cfg = RouterConfig::builder(24, 5)
        .softmax_position(moe_router::SoftmaxPosition::AfterTopK)
        .group_limit(6, 2, GroupScore::SumTopN(2))
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((12, 24), |(t, e)| match (t % 3, e) {
        (0, 17) => 50.0,
        (0, 16..=19) | (0, 8..=11) => ninf,
        (1, 2) => 7.0,
        (1, 0..=3) => ninf,
        _ => ((t * 5 + e * 13) % 17) as f32 * -0.4,
    });
    conformance::assert_same_as_reference(b, &cfg, LogitsRef::F32(l.view()), "E24 K5, masked slots");
}

#[test]
fn wgpu_subgroup_row_kernels_are_bit_identical_to_reference() {
    let Some(ctx) = context() else { return };
    let Some(lanes) = ctx.subgroup_lanes() else {
        println!(
            "skipped: wgpu subgroup row kernels: adapter {:?} has no usable subgroups",
            ctx.adapter().name
        );
        return;
    };
    eprintln!("subgroup row kernels: {lanes} lanes per row");
    check_path(&WgpuPath {
        ctx,
        path: KernelPath::SubgroupRows,
        max_grid: None,
    });
}

#[test]
fn wgpu_workgroup_row_kernels_are_bit_identical_to_reference() {
    let Some(ctx) = context() else { return };
    check_path(&WgpuPath {
        ctx,
        path: KernelPath::WorkgroupRows,
        max_grid: None,
    });
}

#[test]
fn wgpu_per_token_kernels_are_bit_identical_to_reference() {
    let Some(ctx) = context() else { return };
    if ctx.is_software() {
        // KernelPath::Auto takes the per-token kernels on software adapters, so the suite
        // (wgpu_passes_the_conformance_suite) runs them there already.
        println!("skipped: per-token kernels: covered by the conformance suite on a software adapter");
        return;
    }
    check_path(&WgpuPath {
        ctx,
        path: KernelPath::PerToken,
        max_grid: None,
    });
}

#[test]
fn wgpu_kernel_paths_are_chosen_as_documented() {
    let Some(ctx) = context() else { return };
    let cfg = RouterConfig::builder(256, 8).build().expect("valid");
    let r = WgpuRouter::with_context(cfg, ctx.clone())
        .expect("router")
        .with_kernel_path(KernelPath::Auto);
    let small = r.kernels_for_batch(1, LogitsDtype::F32).expect("path");
    let large = r.kernels_for_batch(1 << 20, LogitsDtype::Bf16).expect("path");
    if ctx.is_software() {
        assert_eq!((small, large), (KernelPath::PerToken, KernelPath::PerToken));
    } else if ctx.subgroup_lanes().is_some() {
        assert_eq!((small, large), (KernelPath::SubgroupRows, KernelPath::SubgroupRows));
    } else {
        assert_eq!((small, large), (KernelPath::WorkgroupRows, KernelPath::PerToken));
    }
    // Rows of more than 64 values per lane stay on the per-token kernels.
    let wide = RouterConfig::builder(8192, 4).build().expect("valid");
    let r = WgpuRouter::with_context(wide, ctx.clone())
        .expect("router")
        .with_kernel_path(KernelPath::WorkgroupRows);
    assert_eq!(
        r.kernels_for_batch(1, LogitsDtype::F32).expect("path"),
        KernelPath::PerToken
    );
    // Forcing subgroups where there are none is a typed error, not a panic.
    if ctx.subgroup_lanes().is_none() {
        let cfg = RouterConfig::builder(64, 4).build().expect("valid");
        let r = WgpuRouter::with_context(cfg, ctx)
            .expect("router")
            .with_kernel_path(KernelPath::SubgroupRows);
        let l = Array2::<f32>::zeros((3, 64));
        let e = r.route_host(&LogitsRef::F32(l.view()));
        assert!(matches!(e, Err(RouteError::Unsupported { .. })), "{e:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The sparse backward kernel (no term needs the softmax over all experts: softmax after top-K,
// sigmoid or sqrt-softplus, without the aux term and the z-loss) against the reference, through
// the public API: preset rules, batches of several tiles with a partial last one, batches large
// enough for the larger tiles, split dispatches, and error rows.
mod sparse_backward {
    use super::{Wgpu, backend};
    use crate::conformance::{self, upstream_grad};
    use moe_router::backward::LossGrads;
    use moe_router::{LogitsRef, ReferenceRouter, Router, RouterConfig, ScoreFunction, SoftmaxPosition, preset};
    use ndarray::Array2;

    /// Deterministic logits in [−8, 8] with one in 29 −∞ (never a whole row).
    fn logits(t: usize, e: usize, seed: usize) -> Array2<f32> {
        Array2::from_shape_fn((t, e), |(r, x)| {
            let h = (r * 7919 + x * 104_729 + seed * 31) % 4001;
            if h % 29 == 3 && x != r % e {
                f32::NEG_INFINITY
            } else {
                (h as f32 - 2000.0) * 0.004
            }
        })
    }

    /// The backward of `cfg` on `l` (every dtype, the routed ids and the reversed slot order)
    /// equals the reference's.
    fn check(b: &Wgpu, cfg: &RouterConfig, l: &Array2<f32>, what: &str) {
        let (t, _) = l.dim();
        let k = cfg.top_k();
        let grad = upstream_grad(t, k, 17);
        let losses = LossGrads::default();
        let lb = l.mapv(half::bf16::from_f32);
        let lh = l.mapv(half::f16::from_f32);
        for (lr, dtype) in [
            (LogitsRef::F32(l.view()), "f32"),
            (LogitsRef::Bf16(lb.view()), "bf16"),
            (LogitsRef::F16(lh.view()), "f16"),
        ] {
            let ids = match ReferenceRouter::new(cfg.clone()).route_host(&lr) {
                Ok(r) => r.0,
                Err(_) => Array2::from_shape_fn((t, k), |(_, j)| j as u32),
            };
            conformance::assert_backward_same_as_reference(
                b,
                cfg,
                lr,
                ids.view(),
                &grad,
                &losses,
                &format!("{what} {dtype}"),
            );
            let mut rev = ids.clone();
            for mut row in rev.rows_mut() {
                let v: Vec<u32> = row.iter().rev().copied().collect();
                row.assign(&ndarray::ArrayView1::from(&v[..]));
            }
            conformance::assert_backward_same_as_reference(
                b,
                cfg,
                lr,
                rev.view(),
                &grad,
                &losses,
                &format!("{what} {dtype} replayed"),
            );
        }
    }

    #[test]
    fn wgpu_sparse_backward_of_presets_equals_reference() {
        let Some(b) = backend() else { return };
        for name in ["deepseek-v3", "qwen3-moe", "kimi-k2", "glm-4.5"] {
            let cfg = preset(name).expect("preset");
            let e = cfg.num_experts();
            // 1000 rows: tiles of 16, the last one partial.
            check(&b, &cfg, &logits(1000, e, 1), name);
            // Softmax after top-K (a rule with a selection bias cannot have it) and sqrt-softplus.
            let after = cfg
                .to_builder()
                .score(ScoreFunction::Softmax)
                .softmax_position(SoftmaxPosition::AfterTopK)
                .build();
            if let Ok(after) = after {
                check(&b, &after, &logits(301, e, 2), &format!("{name}, softmax after top-K"));
            }
            let ssp = cfg
                .to_builder()
                .score(ScoreFunction::SqrtSoftplus)
                .build()
                .expect("valid");
            check(&b, &ssp, &logits(301, e, 3), &format!("{name}, sqrt-softplus"));
        }
    }

    #[test]
    fn wgpu_sparse_backward_of_large_and_split_batches_equals_reference() {
        let Some(b) = backend() else { return };
        let cfg = RouterConfig::builder(16, 4)
            .score(ScoreFunction::Sigmoid)
            .normalization(moe_router::Normalization::Sum { eps: 1e-20 })
            .scaling_factor(2.5)
            .build()
            .expect("valid");
        // Tiles of 64 rows (and of 32), the last one partial; then split into dispatches.
        for t in [131_072 + 45, 65_536 + 7] {
            let mut l = logits(t, 16, 4);
            check(&b, &cfg, &l, &format!("T = {t}"));
            // Error rows late in the batch: an all −∞ row before a NaN row.
            l.row_mut(t - 40).fill(f32::NEG_INFINITY);
            l[[t - 3, 2]] = f32::NAN;
            check(&b, &cfg, &l, &format!("T = {t}, errors"));
        }
        let split = Wgpu {
            ctx: b.ctx.clone(),
            max_rows: Some(256),
        };
        let after = cfg
            .to_builder()
            .score(ScoreFunction::Softmax)
            .softmax_position(SoftmaxPosition::AfterTopK)
            .build()
            .expect("valid");
        let mut l = logits(1000, 16, 5);
        check(&split, &after, &l, "split");
        l[[700, 3]] = f32::INFINITY;
        l.row_mut(900).fill(f32::NEG_INFINITY);
        check(&split, &after, &l, "split, +inf in the third dispatch");
        // The dense kernel still serves the calls the sparse one cannot (same rule, z-loss on).
        let z = after.to_builder().z_loss_coeff(1e-3).build().expect("valid");
        let l = logits(300, 16, 6);
        let ids = ReferenceRouter::new(z.clone())
            .route_host(&LogitsRef::F32(l.view()))
            .expect("routes")
            .0;
        let grad = upstream_grad(300, 4, 3);
        conformance::assert_backward_same_as_reference(
            &split,
            &z,
            LogitsRef::F32(l.view()),
            ids.view(),
            &grad,
            &LossGrads::default().z_loss(1.0),
            "z-loss (dense kernel)",
        );
    }
}
