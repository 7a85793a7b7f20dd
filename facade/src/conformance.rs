//! The conformance suite every backend runs (feature `conformance`): one suite, instantiated
//! for a backend by [`run_suite`], that a third-party backend can run too.
//!
//! A backend plugs in by implementing [`Backend`] (a name and a constructor of its
//! [`Router`]); the suite drives it through the [`Router`] trait — host logits uploaded with
//! [`Router::with_host_logits`], routed and replayed on the backend's device, results copied
//! back — and compares every result with the [`ReferenceRouter`]: in portable mode the ids and
//! the weight **bits** must be identical, on random configs and shapes (proptest, failures
//! persisted and replayed first) and on the hard cases (ties, −∞, saturated sigmoid, bf16
//! collisions, every dtype), for routing, replay of given ids in their slot order, replay with
//! fallback rows, record/replay through [`Replayed`], statistics, errors, and the backward
//! pass (gradient bits on random configs with the aux losses and the z-loss, its errors, the
//! backward tape of [`Replayed`]).
//!
//! ```no_run
//! use moe_router::conformance::{Backend, Size, run_suite};
//! use moe_router::{RouteError, RouterConfig, cpu::CpuRouter};
//!
//! struct Cpu;
//! impl Backend for Cpu {
//!     type Router = CpuRouter;
//!     fn name(&self) -> String {
//!         "cpu".into()
//!     }
//!     fn router(&self, cfg: &RouterConfig) -> Result<CpuRouter, RouteError> {
//!         Ok(CpuRouter::new(cfg.clone()))
//!     }
//! }
//! let report = run_suite(&Cpu, Size::CI);
//! assert!(report.skipped.is_none());
//! ```
//!
//! A backend without a device (its constructor returns [`RouteError::Unavailable`]) is not a
//! silent pass: [`run_suite`] prints one `skipped: <backend>: <reason>` line and reports it.

use crate::{
    CallSite, ComputeDtype, ForcedIds, GroupScore, HostMatrix, HostWeights, IdsSink, LogitsRef, LossGrads,
    Normalization, Numerics, PassThrough, Plan, ROUTER_SELECTS, ReferenceRouter, ReplayError, ReplayPolicy, Replayed,
    RouteError, RouteShape, Router, RouterConfig, ScoreFunction, SoftmaxPosition,
};
use half::{bf16, f16};
use ndarray::{Array2, ArrayView2};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, FailurePersistence, FileFailurePersistence, TestRunner};
use std::sync::{Arc, Mutex};

/// A backend under test.
pub trait Backend {
    /// The backend's router.
    type Router: Router;
    /// Name for messages (backend and device).
    fn name(&self) -> String;
    /// Whether the backend runs this config and logits dtype (`"f32"`, `"bf16"`, `"f16"`); by
    /// default every f32-compute config (f64 compute is CPU-only).
    fn supports(&self, cfg: &RouterConfig, dtype: &str) -> bool {
        let _ = dtype;
        cfg.compute_dtype() == ComputeDtype::F32
    }
    /// A router for `cfg`. [`RouteError::Unavailable`] makes [`run_suite`] skip the backend.
    fn router(&self, cfg: &RouterConfig) -> Result<Self::Router, RouteError>;
}

/// How much work a run does.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Proptest cases for random configs.
    pub cases: u32,
    /// Largest T in random shapes.
    pub max_tokens: usize,
    /// Also run [`check_large`] (E up to 512, T up to 10 000: for GPU machines).
    pub large: bool,
}

impl Size {
    /// Small enough for CI on 2 cores (software adapters included).
    pub const CI: Size = Size {
        cases: 48,
        max_tokens: 40,
        large: false,
    };
    /// For GPU machines.
    pub const GPU: Size = Size {
        cases: 200,
        max_tokens: 300,
        large: true,
    };
}

/// What [`run_suite`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// The checks that ran and passed (a failing check panics with its message).
    pub passed: Vec<&'static str>,
    /// Why the backend was skipped, when it was.
    pub skipped: Option<String>,
}

/// Runs every check of the suite on `b` and prints one summary line
/// (`conformance <backend>: N checks passed` or `skipped: <backend>: <reason>`).
pub fn run_suite<B: Backend>(b: &B, size: Size) -> Report {
    let probe = RouterConfig::builder(8, 2).build().expect("valid config");
    if let Err(RouteError::Unavailable { backend, reason }) = b.router(&probe) {
        let why = format!("{backend} unavailable: {reason}");
        println!("skipped: {}: {why}", b.name());
        return Report {
            backend: b.name(),
            passed: Vec::new(),
            skipped: Some(why),
        };
    }
    let mut passed = Vec::new();
    check_random(b, size);
    passed.push("random configs, every dtype, bit-identical");
    check_native(b);
    passed.push("native numerics within tolerance");
    check_errors(b);
    passed.push("errors name row, slot and expert");
    check_masked_groups(b);
    passed.push("slots without a finite key");
    check_replay_fallback(b, size);
    passed.push("replay with fallback rows");
    check_replayed(b);
    passed.push("record and replay through Replayed");
    check_statistics(b);
    passed.push("statistics");
    check_backward_random(b, size);
    passed.push("backward: random configs, every dtype, aux and z-loss, bit-identical");
    check_backward_contract(b);
    passed.push("backward: errors, native, Replayed tape");
    if size.large {
        check_large(b);
        passed.push("large shapes");
    }
    println!(
        "conformance {}: {} checks passed ({})",
        b.name(),
        passed.len(),
        passed.join("; ")
    );
    Report {
        backend: b.name(),
        passed,
        skipped: None,
    }
}

/// Routes host logits on the backend (through its device), host ids and weights back.
pub fn route<B: Backend>(
    b: &B,
    cfg: &RouterConfig,
    logits: LogitsRef<'_>,
) -> Result<(Array2<u32>, HostWeights), RouteError> {
    b.router(cfg)?.route_host(&logits)
}

/// Weights of given host ids (slot order kept) on the backend.
pub fn weights_for<B: Backend>(
    b: &B,
    cfg: &RouterConfig,
    logits: LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
) -> Result<HostWeights, RouteError> {
    b.router(cfg)?.weights_host(&logits, ids)
}

/// [`Router::replay_with_fallback`] on host data: `ids` forced except the rows in
/// `router_rows`, which the router selects itself.
pub fn replay_fallback<R: Router>(
    r: &R,
    logits: LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    router_rows: &[usize],
) -> Result<(Array2<u32>, HostWeights), RouteError> {
    r.with_host_logits(&logits, |l| {
        let out = r.replay_with_fallback(l, ids, router_rows, &CallSite::default())?;
        Ok((r.ids_to_host(&out.ids)?, r.weights_to_host(&out.weights)?))
    })
}

/// Where failing random cases are kept: `proptest-regressions/conformance.txt` under the
/// current directory (the test crate's root under `cargo test`); commit it, it is replayed first.
pub fn persistence() -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::Direct(
        "proptest-regressions/conformance.txt",
    )))
}

fn bits(w: &HostWeights) -> Vec<u64> {
    match w {
        HostWeights::F32(a) => a.iter().map(|x| u64::from(x.to_bits())).collect(),
        HostWeights::F64(a) => a.iter().map(|x| x.to_bits()).collect(),
    }
}

/// Asserts the backend equals the reference on these logits: same error, or same ids and weight
/// bits; then replays the reference ids (reversed slot order) and compares the weights.
pub fn assert_same_as_reference<B: Backend>(b: &B, cfg: &RouterConfig, logits: LogitsRef<'_>, what: &str) {
    if !b.supports(cfg, logits.dtype_name()) {
        return;
    }
    let reference = ReferenceRouter::new(cfg.clone());
    let want = reference.route(&logits, &CallSite::default());
    let got = route(b, cfg, logits);
    match (want, got) {
        (Err(w), Err(g)) => assert_eq!(w, g, "{}: {what}: different errors", b.name()),
        (Ok(w), Ok((gi, gw))) => {
            assert_eq!(w.ids, gi, "{}: {what}: ids differ\nconfig {cfg:?}", b.name());
            let (wb, gb) = (bits(&w.weights), bits(&gw));
            if let Some(i) = (0..wb.len()).find(|&i| wb[i] != gb[i]) {
                let k = cfg.top_k();
                panic!(
                    "{}: {what}: weight bits differ at row {}, slot {}: reference {:?} backend {:?}\nconfig {cfg:?}",
                    b.name(),
                    i / k,
                    i % k,
                    w.weights.to_f64()[[i / k, i % k]],
                    gw.to_f64()[[i / k, i % k]]
                );
            }
            // Replay: reversed slot order must be kept and weighed identically.
            let mut rev = w.ids.clone();
            for mut row in rev.rows_mut() {
                let v: Vec<u32> = row.iter().rev().copied().collect();
                row.assign(&ndarray::ArrayView1::from(&v[..]));
            }
            let ww = reference.weights_host(&logits, rev.view());
            let gw = weights_for(b, cfg, logits, rev.view());
            match (ww, gw) {
                (Err(a), Err(c)) => assert_eq!(a, c, "{}: {what}: replay errors differ", b.name()),
                (Ok(a), Ok(c)) => assert_eq!(
                    bits(&a),
                    bits(&c),
                    "{}: {what}: replay weight bits differ\nconfig {cfg:?}",
                    b.name()
                ),
                (a, c) => panic!("{}: {what}: replay: reference {a:?} backend {c:?}", b.name()),
            }
        }
        (w, g) => panic!("{}: {what}: reference {w:?}, backend {g:?}\nconfig {cfg:?}", b.name()),
    }
}

/// Strategy for valid configs (portable, f32) covering every score function, softmax position,
/// group rule, normalisation, bias (softmax before top-k included) and scaling.
pub fn config_strategy() -> impl Strategy<Value = RouterConfig> {
    let shape = prop_oneof![
        Just((8usize, 2usize, None)),
        Just((16, 4, Some((4usize, 2usize)))),
        Just((32, 8, Some((8, 4)))),
        Just((64, 6, Some((8, 3)))),
        Just((12, 1, None)),
        Just((24, 5, Some((6, 2)))),
        Just((40, 10, None)),
        Just((300, 8, Some((10, 4)))),
    ];
    (
        shape,
        0u8..3,
        any::<bool>(),
        0u8..3,
        any::<bool>(),
        0u8..3,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((e, k, groups), score, before, norm, bias, scale, max_group, seed)| {
            let score = [
                ScoreFunction::Softmax,
                ScoreFunction::Sigmoid,
                ScoreFunction::SqrtSoftplus,
            ][score as usize];
            let mut b = RouterConfig::builder(e, k).score(score).softmax_position(if before {
                SoftmaxPosition::BeforeTopK
            } else {
                SoftmaxPosition::AfterTopK
            });
            b = b.normalization(match norm {
                0 => Normalization::None,
                1 => Normalization::Sum { eps: 1e-20 },
                _ => Normalization::SumClampMin { min: 0.5 },
            });
            b = b.scaling_factor([1.0, 2.5, 0.37][scale as usize]);
            if let Some((g, sel)) = groups {
                let per = e / g;
                let rule = if max_group {
                    GroupScore::Max
                } else {
                    GroupScore::SumTopN((k / sel).clamp(1, per))
                };
                b = b.group_limit(g, sel, rule);
            }
            // A selection bias goes with every score function that selects on scores: sigmoid,
            // sqrt-softplus and softmax before top-k (ERNIE-4.5, LongCat-Flash), whose
            // probabilities get a bias of their own magnitude (about ±1/E) so that it moves some
            // selections without deciding all of them.
            if bias && (score != ScoreFunction::Softmax || before) {
                let span = if score == ScoreFunction::Softmax {
                    4.0 / e as f32
                } else {
                    0.2
                };
                let mut s = seed;
                let v: Vec<f32> = (0..e)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * span
                    })
                    .collect();
                b = b.expert_bias(v);
            }
            b.build().expect("strategy builds valid configs")
        })
}

/// Logits with the hard cases mixed in: exact ties, −∞, huge values (saturated sigmoid),
/// subnormals, values that collide after bf16 rounding.
pub fn logits_strategy(e: usize, max_t: usize) -> impl Strategy<Value = Array2<f32>> {
    let cell = prop_oneof![
        6 => -8.0f32..8.0,
        1 => Just(1.0f32),
        1 => Just(f32::NEG_INFINITY),
        1 => prop_oneof![Just(40.0f32), Just(90.0), Just(-90.0), Just(1e-40), Just(-0.0)],
        1 => (0u16..64).prop_map(|i| 3.0 + f32::from(i) * 1e-3),
    ];
    (1..=max_t)
        .prop_flat_map(move |t| proptest::collection::vec(cell.clone(), t * e).prop_map(move |v| (t, v)))
        .prop_map(move |(t, v)| Array2::from_shape_vec((t, e), v).expect("shape"))
}

/// Random configs and shapes, f32 logits and their bf16/f16 roundings, portable mode.
pub fn check_random<B: Backend>(b: &B, size: Size) {
    let mut runner = TestRunner::new(PtConfig {
        cases: size.cases,
        failure_persistence: persistence(),
        ..PtConfig::default()
    });
    let strat = config_strategy().prop_flat_map(move |cfg| {
        let e = cfg.num_experts();
        (Just(cfg), logits_strategy(e, size.max_tokens))
    });
    runner
        .run(&strat, |(cfg, logits)| {
            assert_same_as_reference(b, &cfg, LogitsRef::F32(logits.view()), "f32 logits");
            let lb = logits.mapv(bf16::from_f32);
            assert_same_as_reference(b, &cfg, LogitsRef::Bf16(lb.view()), "bf16 logits");
            let lh = logits.mapv(f16::from_f32);
            assert_same_as_reference(b, &cfg, LogitsRef::F16(lh.view()), "f16 logits");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{}: {e}", b.name()));
}

/// Native mode: ids equal the reference's native mode except near ties; here (well separated
/// logits) they must be equal and weights within 1e-5 relative.
pub fn check_native<B: Backend>(b: &B) {
    for score in [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::SqrtSoftplus,
    ] {
        let cfg = RouterConfig::builder(64, 8)
            .score(score)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .numerics(Numerics::Native)
            .build()
            .expect("valid");
        let logits = Array2::from_shape_fn((33, 64), |(t, e)| ((t * 131 + e * 71) % 64) as f32 * 0.05 - 1.6);
        let want = ReferenceRouter::new(cfg.clone())
            .route_host(&LogitsRef::F32(logits.view()))
            .expect("routes");
        let (ids, w) = route(b, &cfg, LogitsRef::F32(logits.view())).expect("backend routes");
        assert_eq!(want.0, ids, "{}: native ids", b.name());
        for (a, c) in want.1.to_f64().iter().zip(w.to_f64().iter()) {
            assert!(
                (a - c).abs() <= 1e-5 * a.abs().max(1e-30),
                "{}: native weight {a} vs {c}",
                b.name()
            );
        }
    }
}

/// Errors: NaN and +∞ name the row and expert; a wrong number of experts is a shape error; bad
/// replay ids name the row and slot.
pub fn check_errors<B: Backend>(b: &B) {
    let cfg = RouterConfig::builder(8, 2).build().expect("valid");
    let mut l = Array2::<f32>::zeros((4, 8));
    l[[2, 5]] = f32::NAN;
    let e = route(b, &cfg, LogitsRef::F32(l.view()));
    assert!(
        matches!(e, Err(RouteError::NonFiniteLogit { row: 2, expert: 5, .. })),
        "{}: NaN: {e:?}",
        b.name()
    );
    l[[2, 5]] = f32::INFINITY;
    let e = route(b, &cfg, LogitsRef::F32(l.view()));
    assert!(
        matches!(e, Err(RouteError::NonFiniteLogit { row: 2, expert: 5, .. })),
        "{}: +inf: {e:?}",
        b.name()
    );
    let l = Array2::<f32>::zeros((4, 7));
    let e = route(b, &cfg, LogitsRef::F32(l.view()));
    assert!(
        matches!(e, Err(RouteError::LogitsShape { .. })),
        "{}: shape: {e:?}",
        b.name()
    );
    let l = Array2::<f32>::zeros((4, 8));
    let mut ids = Array2::<u32>::zeros((4, 2));
    ids[[0, 1]] = 1;
    ids[[1, 1]] = 1;
    ids[[2, 1]] = 1;
    ids[[3, 0]] = 9;
    let e = weights_for(b, &cfg, LogitsRef::F32(l.view()), ids.view());
    assert!(
        matches!(
            e,
            Err(RouteError::IdOutOfRange {
                row: 3,
                slot: 0,
                id: 9,
                ..
            })
        ),
        "{}: out-of-range id: {e:?}",
        b.name()
    );
    ids[[3, 0]] = 1;
    ids[[3, 1]] = 1;
    let e = weights_for(b, &cfg, LogitsRef::F32(l.view()), ids.view());
    assert!(
        matches!(e, Err(RouteError::DuplicateId { row: 3, id: 1, .. })),
        "{}: duplicate id: {e:?}",
        b.name()
    );
    // One rule for every score function: a row of −∞ only is AllMasked (routing and replay); a
    // row with one finite logit is not, even when every chosen logit is −∞.
    for score in [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::SqrtSoftplus,
    ] {
        let bias: Vec<f32> = (0..8).map(|i| i as f32 * 0.1).collect();
        let mut builder = RouterConfig::builder(8, 2).score(score);
        if score != ScoreFunction::Softmax {
            builder = builder.expert_bias(bias);
        }
        let cfg = builder.build().expect("valid");
        let mut l = Array2::<f32>::from_elem((5, 8), 0.5);
        l.row_mut(3).fill(f32::NEG_INFINITY);
        l.row_mut(1).fill(f32::NEG_INFINITY);
        l[[1, 0]] = -3.0;
        let e = route(b, &cfg, LogitsRef::F32(l.view()));
        assert!(
            matches!(e, Err(RouteError::AllMasked { row: 3 })),
            "{}: {score:?}: all -inf row: {e:?}",
            b.name()
        );
        let mut ids = Array2::<u32>::zeros((5, 2));
        for mut r in ids.rows_mut() {
            r[0] = 7;
            r[1] = 0;
        }
        let e = weights_for(b, &cfg, LogitsRef::F32(l.view()), ids.view());
        assert!(
            matches!(e, Err(RouteError::AllMasked { row: 3 })),
            "{}: {score:?}: replay of an all -inf row: {e:?}",
            b.name()
        );
        if score != ScoreFunction::Softmax {
            ids.column_mut(1).fill(6);
            let one = l.slice(ndarray::s![0..3, ..]).to_owned();
            let got = weights_for(b, &cfg, LogitsRef::F32(one.view()), ids.slice(ndarray::s![0..3, ..]));
            assert!(
                got.is_ok(),
                "{}: {score:?}: a row with one finite logit: {got:?}",
                b.name()
            );
        }
    }
}

/// Replay with fallback rows (missing routes the router selects itself): every row the backend
/// selects equals the reference's selection, every forced row keeps its ids, and every weight
/// has the reference's bits — on random configs, with about one row in four falling back
/// (first and last rows included), and with no fallback row at all.
pub fn check_replay_fallback<B: Backend>(b: &B, size: Size) {
    let mut runner = TestRunner::new(PtConfig {
        cases: (size.cases / 2).max(1),
        failure_persistence: persistence(),
        ..PtConfig::default()
    });
    let strat = config_strategy().prop_flat_map(move |cfg| {
        let e = cfg.num_experts();
        (Just(cfg), logits_strategy(e, size.max_tokens), any::<u64>())
    });
    runner
        .run(&strat, |(cfg, logits, seed)| {
            if !b.supports(&cfg, "f32") {
                return Ok(());
            }
            let lr = LogitsRef::F32(logits.view());
            let reference = ReferenceRouter::new(cfg.clone());
            let Ok((own, _)) = reference.route_host(&lr) else {
                // Rows the reference refuses: error precedence is check_errors' business.
                return Ok(());
            };
            let t = own.nrows();
            // Forced ids: the reference's own selection rotated by one slot (a valid, different
            // slot order); fallback rows chosen from the seed.
            let mut forced = own.clone();
            for mut row in forced.rows_mut() {
                let v: Vec<u32> = row.iter().copied().cycle().skip(1).take(row.len()).collect();
                row.assign(&ndarray::ArrayView1::from(&v[..]));
            }
            let mut rows: Vec<usize> = (0..t).filter(|r| (seed >> (r % 61)) & 0b11 == 0).collect();
            if t > 1 {
                rows.push(0);
                rows.push(t - 1);
            }
            rows.sort_unstable();
            rows.dedup();
            let router = b.router(&cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for fallback in [rows, Vec::new()] {
                let mut masked = forced.clone();
                for &r in &fallback {
                    masked.row_mut(r).fill(ROUTER_SELECTS);
                }
                let want = replay_fallback(&reference, lr, masked.view(), &fallback);
                let got = replay_fallback(&router, lr, masked.view(), &fallback);
                match (want, got) {
                    (Ok((wi, ww)), Ok((gi, gw))) => {
                        prop_assert_eq!(&wi, &gi, "{}: fallback ids differ, rows {:?}", b.name(), fallback);
                        for r in 0..t {
                            let expect = if fallback.binary_search(&r).is_ok() {
                                own.row(r)
                            } else {
                                forced.row(r)
                            };
                            prop_assert_eq!(gi.row(r), expect, "{}: row {}", b.name(), r);
                        }
                        prop_assert_eq!(bits(&ww), bits(&gw), "{}: fallback weight bits differ", b.name());
                    }
                    (Err(w), Err(g)) => prop_assert_eq!(w, g),
                    (w, g) => prop_assert!(false, "{}: reference {:?}, backend {:?}", b.name(), w, g),
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{}: {e}", b.name()));
}

/// A policy that records every routed batch and replays `replay` when set.
#[derive(Default)]
struct TinyRecorder {
    recorded: Arc<Mutex<Vec<Array2<u32>>>>,
    replay: Mutex<Option<(Array2<u32>, Vec<usize>)>>,
}

impl ReplayPolicy for TinyRecorder {
    fn plan(&self, _site: &CallSite<'_>, _shape: RouteShape) -> Result<Plan, ReplayError> {
        let guard = self
            .replay
            .lock()
            .map_err(|_| ReplayError::CountMismatch("test policy lock poisoned".into()))?;
        Ok(match &*guard {
            Some((ids, rows)) => Plan::Replay(ForcedIds {
                ids: ids.clone(),
                router_rows: rows.clone(),
            }),
            None => Plan::Route,
        })
    }
    fn recorder(&self, _site: &CallSite<'_>, _shape: RouteShape) -> Result<Option<IdsSink>, ReplayError> {
        let rec = self.recorded.clone();
        Ok(Some(Box::new(move |ids| {
            if let Ok(mut v) = rec.lock() {
                v.push(ids.to_owned());
            }
        })))
    }
}

/// Record and replay through [`Replayed`] on the backend: pass-through equals the plain router;
/// a recording policy receives exactly the routed ids; replayed ids are forced (slot order
/// kept), fallback rows are the router's, weights come from the live logits, the replayed ids
/// are recorded; invalid forced ids are a typed error naming row and slot.
pub fn check_replayed<B: Backend>(b: &B) {
    let bias: Vec<f32> = (0..32).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.02).collect();
    let cfg = RouterConfig::builder(32, 4)
        .score(ScoreFunction::Sigmoid)
        .expert_bias(bias)
        .group_limit(8, 4, GroupScore::SumTopN(2))
        .normalization(Normalization::Sum { eps: 1e-20 })
        .scaling_factor(2.5)
        .build()
        .expect("valid");
    let name = b.name();
    let l = Array2::from_shape_fn((50, 32), |(t, e)| ((t * 31 + e * 17) % 53) as f32 * 0.07 - 1.8);
    let logits = LogitsRef::F32(l.view());
    let reference = ReferenceRouter::new(cfg.clone());
    let want = reference.route_host(&logits).expect("reference routes");
    let site = CallSite::layer(3);

    let pt = Replayed::new(b.router(&cfg).expect("router"), PassThrough);
    let got = pt.route_host_at(&logits, &site).expect("routes");
    assert_eq!(got, want, "{name}: pass-through differs from the reference");

    let policy = Arc::new(TinyRecorder::default());
    let r = Replayed::new(b.router(&cfg).expect("router"), policy.clone());
    let got = r.route_host_at(&logits, &site).expect("records");
    r.flush_records().expect("recordings delivered");
    assert_eq!(got.0, want.0, "{name}: recorded routing");
    assert_eq!(
        *policy.recorded.lock().expect("lock"),
        vec![want.0.clone()],
        "{name}: recorder"
    );

    let mut forced = want.0.clone();
    for mut row in forced.rows_mut() {
        let v: Vec<u32> = row.iter().rev().copied().collect();
        row.assign(&ndarray::ArrayView1::from(&v[..]));
    }
    *policy.replay.lock().expect("lock") = Some((forced.clone(), vec![7]));
    let l2 = l.mapv(|x| x * 0.9 + 0.05);
    let logits2 = LogitsRef::F32(l2.view());
    let (ids, w) = r.route_host_at(&logits2, &site).expect("replays");
    r.flush_records().expect("recordings delivered");
    let own = reference.route_host(&logits2).expect("reference").0;
    let mut expect_ids = forced.clone();
    expect_ids.row_mut(7).assign(&own.row(7));
    assert_eq!(ids, expect_ids, "{name}: forced ids kept, row 7 left to the router");
    let want_w = reference
        .weights_host(&logits2, expect_ids.view())
        .expect("reference weights");
    assert_eq!(bits(&w), bits(&want_w), "{name}: replayed weights");
    assert_eq!(
        policy.recorded.lock().expect("lock").last(),
        Some(&expect_ids),
        "{name}: replay recorded"
    );

    let mut bad = forced;
    bad[[4, 2]] = 99;
    *policy.replay.lock().expect("lock") = Some((bad, vec![]));
    let e = r.route_host_at(&logits, &site);
    assert!(
        matches!(
            e,
            Err(RouteError::IdOutOfRange {
                row: 4,
                slot: 2,
                id: 99,
                ..
            })
        ),
        "{name}: invalid forced id: {e:?}"
    );
}

/// Statistics through the [`Router`] trait on the backend's own ids and weights: tokens per
/// expert and capacity dropping equal the host computation.
pub fn check_statistics<B: Backend>(b: &B) {
    let cfg = RouterConfig::builder(48, 6)
        .score(ScoreFunction::Sigmoid)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .capacity(crate::Capacity {
            factor: 0.8,
            min_capacity: None,
            policy: crate::DropPolicy::Probs,
            pad_to_capacity: false,
        })
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((257, 48), |(t, e)| {
        let x = ((t * 2_654_435_761 + e * 40_503) % 10_007) as f32 / 10_007.0;
        (x - 0.5) * 6.0
    });
    let logits = LogitsRef::F32(l.view());
    let r = b.router(&cfg).expect("router");
    let name = b.name();
    r.with_host_logits(&logits, |d| {
        let out = r.route(d, &CallSite::default())?;
        let ids = r.ids_to_host(&out.ids)?;
        let w = r.weights_to_host(&out.weights)?.to_f64();
        assert_eq!(
            r.tokens_per_expert(&out.ids)?,
            crate::stats::tokens_per_expert(ids.view(), 48),
            "{name}: tokens per expert"
        );
        let cap = r.apply_capacity(&out.ids, &out.weights)?;
        let want = crate::capacity::apply_capacity(&cfg.capacity().expect("configured"), ids.view(), w.view(), 48);
        assert_eq!(cap, Some(want), "{name}: capacity");
        Ok(())
    })
    .expect("statistics");
}

/// Rows whose kept groups hold fewer finite keys than K: the slots left over go to the lowest
/// ids among every expert whose key is −∞, the dropped groups' experts included (DESIGN §2
/// steps 3–4). Fixed cases shrunk from a failure of the CUDA tile kernel on an H200.
pub fn check_masked_groups<B: Backend>(b: &B) {
    let ninf = f32::NEG_INFINITY;
    let cfg = RouterConfig::builder(16, 4)
        .softmax_position(SoftmaxPosition::AfterTopK)
        .group_limit(4, 2, GroupScore::Max)
        .build()
        .expect("valid");
    let row = [
        1.0f32, 0.5, 0.25, -1.0, 0.75, 0.1, -0.5, 0.9, ninf, ninf, 3.043, 3.03, ninf, 90.0, ninf, ninf,
    ];
    // 4100 rows: enough for the thread-per-token kernels of a GPU backend.
    let l = Array2::from_shape_fn((4100, 16), |(t, e)| {
        if t % 4 == 1 {
            row[e]
        } else {
            ((t * 7 + e * 3) % 11) as f32 * 0.3
        }
    });
    let want = ReferenceRouter::new(cfg.clone())
        .route_host(&LogitsRef::F32(l.view()))
        .expect("routes");
    assert_eq!(want.0.row(1).to_vec(), vec![13, 10, 11, 0], "the reference's rule");
    assert_same_as_reference(b, &cfg, LogitsRef::F32(l.view()), "E16 K4, one masked slot");
    let cfg = RouterConfig::builder(24, 5)
        .softmax_position(SoftmaxPosition::AfterTopK)
        .group_limit(6, 2, GroupScore::SumTopN(2))
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((4100, 24), |(t, e)| match (t % 3, e) {
        (0, 17) => 50.0,
        (0, 16..=19) | (0, 8..=11) => ninf,
        (1, 2) => 7.0,
        (1, 0..=3) => ninf,
        _ => ((t * 5 + e * 13) % 17) as f32 * -0.4,
    });
    assert_same_as_reference(b, &cfg, LogitsRef::F32(l.view()), "E24 K5, masked slots");
}

/// Larger shapes (tail handling, E up to 512, K up to 16) — for GPU machines.
pub fn check_large<B: Backend>(b: &B) {
    for &(e, k, t) in &[
        (512usize, 16usize, 3000usize),
        (256, 8, 5000),
        (384, 8, 777),
        (128, 8, 4097),
        (8, 2, 10000),
    ] {
        let cfg = RouterConfig::builder(e, k)
            .score(ScoreFunction::Sigmoid)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .scaling_factor(2.5)
            .build()
            .expect("valid");
        let logits = Array2::from_shape_fn((t, e), |(i, j)| {
            (((i * 7919 + j * 104_729) % 2000) as f32 - 1000.0) * 0.004
        });
        assert_same_as_reference(
            b,
            &cfg,
            LogitsRef::F32(logits.view()),
            &format!("large E={e} K={k} T={t}"),
        );
    }
}

/// The backward on the backend against the reference on host data: same error, or the same
/// gradient bits (portable) / within `tol` relative to the row's largest magnitude (native).
pub fn assert_backward_same_as_reference<B: Backend>(
    b: &B,
    cfg: &RouterConfig,
    logits: LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: &Array2<f32>,
    losses: &LossGrads<'_>,
    what: &str,
) {
    if !b.supports(cfg, logits.dtype_name()) {
        return;
    }
    let name = b.name();
    let g = HostMatrix::F32(grad.clone());
    let want = ReferenceRouter::new(cfg.clone()).weights_vjp_host_at(&logits, ids, &g, losses, &CallSite::default());
    let got = b
        .router(cfg)
        .and_then(|r| r.weights_vjp_host_at(&logits, ids, &g, losses, &CallSite::default()));
    match (want, got) {
        (Err(w), Err(g)) => assert_eq!(w, g, "{name}: {what}: backward errors differ"),
        (Ok(w), Ok(g)) => {
            assert_eq!(w.dim(), g.dim(), "{name}: {what}: gradient shape");
            let e = w.dim().1.max(1);
            if cfg.numerics() == Numerics::Portable {
                let (wb, gb) = (bits(&w), bits(&g));
                if let Some(i) = (0..wb.len()).find(|&i| wb[i] != gb[i]) {
                    panic!(
                        "{name}: {what}: gradient bits differ at row {}, expert {}: reference {:?} backend {:?}\nconfig {cfg:?}",
                        i / e,
                        i % e,
                        w.to_f64()[[i / e, i % e]],
                        g.to_f64()[[i / e, i % e]]
                    );
                }
            } else {
                let (w, g) = (w.to_f64(), g.to_f64());
                for (t, (wr, gr)) in w.outer_iter().zip(g.outer_iter()).enumerate() {
                    let scale = wr.iter().fold(1e-30f64, |a, &x| a.max(x.abs()));
                    for (x, (&a, &c)) in wr.iter().zip(gr.iter()).enumerate() {
                        assert!(
                            (a - c).abs() <= 2e-6 * scale,
                            "{name}: {what}: native gradient at row {t}, expert {x}: reference {a} backend {c}"
                        );
                    }
                }
            }
        }
        (w, g) => panic!("{name}: {what}: reference {w:?}, backend {g:?}\nconfig {cfg:?}"),
    }
}

/// A deterministic upstream gradient `[T, K]` in [−1, 1] with some exact zeros.
pub fn upstream_grad(t: usize, k: usize, seed: u64) -> Array2<f32> {
    let mut s = seed | 1;
    Array2::from_shape_fn((t, k), |_| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let x = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        if (s >> 20).is_multiple_of(11) { 0.0 } else { x }
    })
}

/// The backward (DESIGN §2b) on random configs and shapes, f32/bf16/f16 logits, portable: the
/// gradient bits equal the reference's for the routed ids and for replayed ids (reversed slot
/// order), with the aux-loss variants (one sequence, several sequences, given global counts) and
/// the z-loss switched on and off.
pub fn check_backward_random<B: Backend>(b: &B, size: Size) {
    let mut runner = TestRunner::new(PtConfig {
        cases: size.cases,
        failure_persistence: persistence(),
        ..PtConfig::default()
    });
    let strat = (config_strategy(), 0u8..4, 0u8..3, any::<u64>()).prop_flat_map(move |(cfg, aux, zl, seed)| {
        let e = cfg.num_experts();
        (Just((cfg, aux, zl, seed)), logits_strategy(e, size.max_tokens))
    });
    runner
        .run(&strat, |((cfg, aux, zl, seed), logits)| {
            let (t, e) = logits.dim();
            let k = cfg.top_k();
            let mut bld = cfg.to_builder();
            if aux > 0 {
                bld = bld.aux_loss(crate::AuxLossKind::MicroBatch, 1e-2);
            }
            if aux > 1 {
                bld = bld.aux_loss(crate::AuxLossKind::PerSequence, 3e-3);
            }
            if aux > 2 {
                bld = bld.aux_loss(crate::AuxLossKind::Global, 5e-3);
            }
            if zl > 0 {
                bld = bld.z_loss_coeff(1e-3);
            }
            let cfg = bld.build().expect("valid");
            let lens: Vec<usize> = if t > 2 { vec![t / 3, t - t / 3] } else { vec![t] };
            let global: Vec<f64> = (0..e).map(|x| ((x * 7 + seed as usize) % 5) as f64 * 0.5).collect();
            let mut losses = LossGrads::default().aux_loss(if aux > 0 { 0.7 } else { 0.0 });
            if zl > 0 {
                losses = losses.z_loss(if zl == 1 { 1.0 } else { -2.5 });
            }
            if aux > 1 {
                losses = losses.seq_lens(&lens);
            }
            if aux > 2 && seed % 2 == 0 {
                losses = losses.global_counts(&global);
            }
            let reference = ReferenceRouter::new(cfg.clone());
            let grad = upstream_grad(t, k, seed);
            for (lr, dtype) in [
                (LogitsRef::F32(logits.view()), "f32"),
                (LogitsRef::Bf16(logits.mapv(bf16::from_f32).view()), "bf16"),
                (LogitsRef::F16(logits.mapv(f16::from_f32).view()), "f16"),
            ] {
                let Ok(routed) = reference.route_host(&lr) else {
                    // Rows the forward refuses (all −∞) are refused by the backward too: check
                    // that with any valid ids.
                    let ids = Array2::from_shape_fn((t, k), |(_, j)| j as u32);
                    assert_backward_same_as_reference(b, &cfg, lr, ids.view(), &grad, &losses, dtype);
                    continue;
                };
                let ids = routed.0;
                assert_backward_same_as_reference(b, &cfg, lr, ids.view(), &grad, &losses, &format!("{dtype} routed"));
                let mut rev = ids.clone();
                for mut row in rev.rows_mut() {
                    let v: Vec<u32> = row.iter().rev().copied().collect();
                    row.assign(&ndarray::ArrayView1::from(&v[..]));
                }
                assert_backward_same_as_reference(
                    b,
                    &cfg,
                    lr,
                    rev.view(),
                    &grad,
                    &losses,
                    &format!("{dtype} replayed"),
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{}: {e}", b.name()));
}

/// The backward's errors and contracts: a gradient of the wrong shape names both shapes,
/// invalid ids name row and slot, an all-−∞ row is `AllMasked`, NaN names row and expert; native
/// numerics stay within 2e-6 of the row's scale; through [`Replayed`] the backward must use the
/// forward's ids (others, or no forward, are errors; a recompute that reproduces them passes).
pub fn check_backward_contract<B: Backend>(b: &B) {
    let name = b.name();
    let cfg = RouterConfig::builder(32, 4)
        .score(ScoreFunction::Sigmoid)
        .group_limit(8, 4, GroupScore::SumTopN(2))
        .normalization(Normalization::Sum { eps: 1e-20 })
        .scaling_factor(2.5)
        .aux_loss(crate::AuxLossKind::MicroBatch, 1e-2)
        .z_loss_coeff(1e-3)
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((50, 32), |(t, e)| ((t * 31 + e * 17) % 53) as f32 * 0.07 - 1.8);
    let logits = LogitsRef::F32(l.view());
    let r = b.router(&cfg).expect("router");
    let ids = ReferenceRouter::new(cfg.clone()).route_host(&logits).expect("routes").0;
    let losses = LossGrads::default().aux_loss(1.0).z_loss(1.0);
    let site = CallSite::default();

    let bad = HostMatrix::F32(Array2::zeros((50, 3)));
    let e = r.weights_vjp_host_at(&logits, ids.view(), &bad, &losses, &site);
    assert!(
        matches!(
            e,
            Err(RouteError::GradShape {
                expected_rows: 50,
                expected_k: 4,
                rows: 50,
                cols: 3
            })
        ),
        "{name}: gradient shape: {e:?}"
    );
    let g = upstream_grad(50, 4, 9);
    let mut dup = ids.clone();
    dup[[6, 3]] = dup[[6, 0]];
    let e = r.weights_vjp_host_at(&logits, dup.view(), &HostMatrix::F32(g.clone()), &losses, &site);
    assert!(
        matches!(e, Err(RouteError::DuplicateId { row: 6, .. })),
        "{name}: duplicate id: {e:?}"
    );
    for (row, value, want_masked) in [(11usize, f32::NEG_INFINITY, true), (12, f32::NAN, false)] {
        let mut l2 = l.clone();
        l2.row_mut(row).fill(value);
        let e = r.weights_vjp_host_at(
            &LogitsRef::F32(l2.view()),
            ids.view(),
            &HostMatrix::F32(g.clone()),
            &losses,
            &site,
        );
        if want_masked {
            assert!(
                matches!(e, Err(RouteError::AllMasked { row: 11 })),
                "{name}: all −∞: {e:?}"
            );
        } else {
            assert!(
                matches!(e, Err(RouteError::NonFiniteLogit { row: 12, expert: 0, .. })),
                "{name}: NaN: {e:?}"
            );
        }
    }
    // −∞ logits among finite ones get gradient 0.
    let mut l3 = l.clone();
    l3[[2, 5]] = f32::NEG_INFINITY;
    let ids3 = ReferenceRouter::new(cfg.clone())
        .route_host(&LogitsRef::F32(l3.view()))
        .expect("routes")
        .0;
    assert_backward_same_as_reference(b, &cfg, LogitsRef::F32(l3.view()), ids3.view(), &g, &losses, "−∞ logit");

    // Native numerics within tolerance of the reference's native mode.
    for score in [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::SqrtSoftplus,
    ] {
        let native = cfg
            .to_builder()
            .score(score)
            .numerics(Numerics::Native)
            .build()
            .expect("valid");
        let ids = ReferenceRouter::new(native.clone())
            .route_host(&logits)
            .expect("routes")
            .0;
        assert_backward_same_as_reference(b, &native, logits, ids.view(), &g, &losses, "native");
    }

    // Replayed: the backward differentiates the forward's ids, and only those.
    let rp = Replayed::new(b.router(&cfg).expect("router"), PassThrough);
    let site3 = CallSite::layer(3);
    let e = rp.with_host_logits(&logits, |d| {
        let ids_dev = rp.ids_from_host(ids.view())?;
        let gd = rp.weights_from_host(&HostMatrix::F32(g.clone()))?;
        rp.weights_vjp(d, &ids_dev, &gd, &losses, &site3).map(|_| ())
    });
    assert!(
        matches!(e, Err(RouteError::BackwardWithoutForward { layer: 3 })),
        "{name}: backward without forward: {e:?}"
    );
    let want = ReferenceRouter::new(cfg.clone())
        .weights_vjp_host_at(&logits, ids.view(), &HostMatrix::F32(g.clone()), &losses, &site)
        .expect("reference backward");
    rp.with_host_logits(&logits, |d| {
        let fwd = rp.route(d, &site3)?;
        let again = rp.route(d, &site3.with_pass(crate::Pass::Recompute))?;
        let mut other = rp.ids_to_host(&again.ids)?;
        let (a, c) = (other[[20, 0]], other[[20, 1]]);
        other[[20, 0]] = c;
        other[[20, 1]] = a;
        let other = rp.ids_from_host(other.view())?;
        let gd = rp.weights_from_host(&HostMatrix::F32(g.clone()))?;
        let e = rp.weights_vjp(d, &other, &gd, &losses, &site3).map(|_| ());
        assert!(
            matches!(
                e,
                Err(RouteError::IdsDifferFromForward {
                    pass: "backward",
                    layer: 3,
                    row: 20
                })
            ),
            "{name}: backward with other ids: {e:?}"
        );
        let dz = rp.weights_vjp(d, &fwd.ids, &gd, &losses, &site3)?;
        assert_eq!(
            bits(&rp.logits_grad_to_host(&dz)?),
            bits(&want),
            "{name}: backward through Replayed"
        );
        let e = rp.weights_vjp(d, &fwd.ids, &gd, &losses, &site3).map(|_| ());
        assert!(
            matches!(e, Err(RouteError::BackwardWithoutForward { layer: 3 })),
            "{name}: a second backward of one forward: {e:?}"
        );
        Ok(())
    })
    .expect("Replayed backward");
}
