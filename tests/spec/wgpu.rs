//! The wgpu backend passes the shared conformance suite bit-identically (portable mode) on the
//! adapter at hand: Mesa llvmpipe (GL) or lavapipe (Vulkan) in CI, the NVIDIA driver (Vulkan) on
//! the GPU machine. Without any adapter every test prints `skipped: <reason>` and returns.
//!
//! Environment: `MOE_ROUTER_WGPU_BACKEND` / `MOE_ROUTER_WGPU_ADAPTER` pick the adapter;
//! `MOE_ROUTER_WGPU_LARGE=1` adds the large shapes (GPU machine); `MOE_ROUTER_WGPU_CASES=N` sets
//! the number of random configs; `MOE_ROUTER_WGPU_MATH_N=N` the math self-test size.

use crate::conformance::{self, Backend, Size};
use moe_router::wgpu::selftest::{self, MathFn};
use moe_router::wgpu::{AdapterOptions, WgpuContext, WgpuLogits, WgpuRouter};
use moe_router::{
    AuxLossKind, CallSite, Capacity, DropPolicy, ForcedIds, GroupScore, HostWeights, IdsSink, LogitsRef, Normalization,
    PassThrough, Plan, ReferenceRouter, ReplayError, ReplayPolicy, Replayed, RouteError, RouteShape, Router,
    RouterConfig, ScoreFunction,
};
use ndarray::{Array2, ArrayView2};
use std::sync::{Arc, Mutex};

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

impl Wgpu {
    fn router(&self, cfg: &RouterConfig) -> Result<WgpuRouter, RouteError> {
        let r = WgpuRouter::with_context(cfg.clone(), self.ctx.clone())?;
        Ok(match self.max_rows {
            Some(n) => r.with_max_rows_per_dispatch(n),
            None => r,
        })
    }
}

impl Backend for Wgpu {
    fn name(&self) -> String {
        format!("wgpu ({})", self.ctx.adapter().name)
    }
    fn route(&self, cfg: &RouterConfig, logits: LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError> {
        self.router(cfg)?.route_host(&logits)
    }
    fn weights_for(
        &self,
        cfg: &RouterConfig,
        logits: LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
    ) -> Result<HostWeights, RouteError> {
        self.router(cfg)?.weights_host(&logits, ids)
    }
    fn replay_fallback(
        &self,
        cfg: &RouterConfig,
        logits: LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
    ) -> Result<(Array2<u32>, HostWeights), RouteError> {
        conformance::host_replay_fallback(&self.router(cfg)?, logits, ids, router_rows)
    }
}

/// The same backend driven through the `Router` trait with device buffers (upload, route,
/// weights_for on device ids, copy back).
pub struct WgpuDevicePath(Wgpu);

impl Backend for WgpuDevicePath {
    fn name(&self) -> String {
        format!("wgpu device path ({})", self.0.ctx.adapter().name)
    }
    fn route(&self, cfg: &RouterConfig, logits: LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError> {
        let r = self.0.router(cfg)?;
        if logits.dim().1 != cfg.num_experts() {
            return r.route_host(&logits);
        }
        let d = r.upload(&logits)?;
        let out = r.route(&WgpuLogits::Device(&d), &CallSite::default())?;
        Ok((r.ids_to_host(&out.ids)?, r.weights_to_host(&out.weights)?))
    }
    fn weights_for(
        &self,
        cfg: &RouterConfig,
        logits: LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
    ) -> Result<HostWeights, RouteError> {
        let r = self.0.router(cfg)?;
        let d = r.upload(&logits)?;
        let dev_ids = r.ids_from_host(ids)?;
        let w = r.weights_for(&WgpuLogits::Device(&d), &dev_ids, &CallSite::default())?;
        r.weights_to_host(&w)
    }
    fn replay_fallback(
        &self,
        cfg: &RouterConfig,
        logits: LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
    ) -> Result<(Array2<u32>, HostWeights), RouteError> {
        let r = self.0.router(cfg)?;
        let d = r.upload(&logits)?;
        let out = r.replay_with_fallback(&WgpuLogits::Device(&d), ids, router_rows, &CallSite::default())?;
        Ok((r.ids_to_host(&out.ids)?, r.weights_to_host(&out.weights)?))
    }
}

fn backend() -> Option<Wgpu> {
    context().map(|ctx| Wgpu { ctx, max_rows: None })
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
fn wgpu_is_bit_identical_to_reference_on_random_configs_and_dtypes() {
    let Some(b) = backend() else { return };
    let cases = env_usize("MOE_ROUTER_WGPU_CASES").unwrap_or(Size::CI.cases as usize) as u32;
    conformance::check_random(&b, Size { cases, ..Size::CI });
}

#[test]
fn wgpu_device_path_is_bit_identical_to_reference() {
    let Some(b) = backend() else { return };
    conformance::check_random(
        &WgpuDevicePath(b),
        Size {
            cases: 12,
            max_tokens: 40,
        },
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
    conformance::assert_same_as_reference(
        &WgpuDevicePath(Wgpu {
            ctx: b.ctx.clone(),
            max_rows: Some(256),
        }),
        &cfg,
        LogitsRef::F32(bad.view()),
        "split device path, NaN in the third chunk",
    );
}

#[test]
fn wgpu_replay_selects_fallback_rows_in_the_replay_kernel_bit_identical_to_reference() {
    let Some(b) = backend() else { return };
    conformance::check_replay_fallback(&b, Size::CI);
    let ctx = b.ctx.clone();
    conformance::check_replay_fallback(&WgpuDevicePath(Wgpu { ctx, max_rows: None }), Size::CI);
}

#[test]
fn wgpu_native_mode_matches_reference_within_tolerance() {
    let Some(b) = backend() else { return };
    conformance::check_native(&b);
}

#[test]
fn wgpu_reports_bad_logits_and_bad_replay_ids_with_row() {
    let Some(b) = backend() else { return };
    conformance::check_errors(&b);
    conformance::check_errors(&WgpuDevicePath(Wgpu {
        ctx: b.ctx.clone(),
        max_rows: None,
    }));
}

#[test]
fn wgpu_large_shapes_on_the_gpu_machine() {
    let Some(b) = backend() else { return };
    if std::env::var("MOE_ROUTER_WGPU_LARGE").is_err() {
        println!("skipped: large shapes run with MOE_ROUTER_WGPU_LARGE=1 (GPU machine)");
        return;
    }
    conformance::check_large(&b);
}

/// Records every routed batch; replays `replay` when set (with `router_rows` left to the router).
#[derive(Default)]
struct TinyRecorder {
    recorded: Arc<Mutex<Vec<Array2<u32>>>>,
    replay: Mutex<Option<(Array2<u32>, Vec<usize>)>>,
}

impl ReplayPolicy for TinyRecorder {
    fn plan(&self, _site: &CallSite<'_>, _shape: RouteShape) -> Result<Plan, ReplayError> {
        Ok(match &*self.replay.lock().expect("lock") {
            Some((ids, rows)) => Plan::Replay(ForcedIds {
                ids: ids.clone(),
                router_rows: rows.clone(),
            }),
            None => Plan::Route,
        })
    }
    fn recorder(&self, _site: &CallSite<'_>, _shape: RouteShape) -> Result<Option<IdsSink>, ReplayError> {
        let rec = self.recorded.clone();
        Ok(Some(Box::new(move |ids| rec.lock().expect("lock").push(ids))))
    }
}

#[test]
fn wgpu_record_and_replay_through_the_decorator() {
    let Some(b) = backend() else { return };
    let bias: Vec<f32> = (0..32).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.02).collect();
    let cfg = RouterConfig::builder(32, 4)
        .score(ScoreFunction::Sigmoid)
        .expert_bias(bias)
        .group_limit(8, 4, GroupScore::SumTopN(2))
        .normalization(Normalization::Sum { eps: 1e-20 })
        .scaling_factor(2.5)
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((50, 32), |(t, e)| ((t * 31 + e * 17) % 53) as f32 * 0.07 - 1.8);
    let logits = LogitsRef::F32(l.view());
    let reference = ReferenceRouter::new(cfg.clone());
    let want = reference.route_host(&logits).expect("reference routes");

    // Pass-through: identical to the plain router.
    let pt = Replayed::new(b.router(&cfg).expect("router"), PassThrough);
    let out = pt
        .route(&WgpuLogits::Host(logits), &CallSite::layer(3))
        .expect("routes");
    assert_eq!(pt.ids_to_host(&out.ids).expect("ids"), want.0);
    assert_eq!(pt.weights_to_host(&out.weights).expect("weights"), want.1);

    // Record, then replay the recorded ids reversed on perturbed logits: the weights are the
    // reference's weights of those ids on the new logits, the ids are the forced ones.
    let policy = Arc::new(TinyRecorder::default());
    let r = Replayed::new(b.router(&cfg).expect("router"), policy.clone());
    let out = r
        .route(&WgpuLogits::Host(logits), &CallSite::layer(3))
        .expect("records");
    assert_eq!(r.ids_to_host(&out.ids).expect("ids"), want.0);
    let recorded = policy.recorded.lock().expect("lock").clone();
    assert_eq!(recorded, vec![want.0.clone()]);
    let mut forced = want.0.clone();
    for mut row in forced.rows_mut() {
        let v: Vec<u32> = row.iter().rev().copied().collect();
        row.assign(&ndarray::ArrayView1::from(&v[..]));
    }
    *policy.replay.lock().expect("lock") = Some((forced.clone(), vec![7]));
    let l2 = l.mapv(|x| x * 0.9 + 0.05);
    let logits2 = LogitsRef::F32(l2.view());
    let out = r
        .route(&WgpuLogits::Host(logits2), &CallSite::layer(3))
        .expect("replays");
    let got_ids = r.ids_to_host(&out.ids).expect("ids");
    let own = reference.route_host(&logits2).expect("reference").0;
    let mut expect_ids = forced.clone();
    expect_ids.row_mut(7).assign(&own.row(7));
    assert_eq!(got_ids, expect_ids, "forced ids kept, row 7 left to the router");
    let want_w = reference
        .weights_host(&logits2, expect_ids.view())
        .expect("reference weights");
    assert_eq!(r.weights_to_host(&out.weights).expect("weights"), want_w);
    assert_eq!(policy.recorded.lock().expect("lock").last(), Some(&expect_ids));

    // Invalid forced ids are a typed error naming the row.
    let mut badids = forced.clone();
    badids[[4, 2]] = 99;
    *policy.replay.lock().expect("lock") = Some((badids, vec![]));
    let e = r
        .route(&WgpuLogits::Host(logits), &CallSite::layer(3))
        .expect_err("bad ids");
    assert!(
        matches!(
            e,
            RouteError::IdOutOfRange {
                row: 4,
                slot: 2,
                id: 99,
                ..
            }
        ),
        "{e:?}"
    );
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
            .route(&WgpuLogits::Host(logits), &CallSite::default())
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
        let aux = r.aux_loss_micro_batch(&WgpuLogits::Host(logits), 1e-2).expect("aux");
        let want_aux = moe_router::stats::aux_loss_micro_batch(&cfg, &logits, 1e-2).expect("host aux");
        assert!(
            ((aux - want_aux) / want_aux).abs() <= 1e-6,
            "{score:?}: aux {aux} vs host {want_aux}"
        );
        let z = r.z_loss(&WgpuLogits::Host(logits), 1e-3).expect("z");
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
