//! The shared conformance suite: every backend, driven through host data, must reproduce the
//! reference router bit for bit in portable mode (ids and weight bits), on random configs and
//! shapes and on the hard cases: ties, −∞, saturated sigmoid, bf16 collisions, every dtype,
//! replay of given ids in their slot order.
//!
//! A backend plugs in by implementing [`Backend`]; its test file calls the `check_*` functions.

use half::{bf16, f16};
use moe_router::{
    CallSite, ComputeDtype, GroupScore, HostWeights, LogitsRef, Normalization, Numerics, ReferenceRouter, RouteError,
    Router, RouterConfig, ScoreFunction, SoftmaxPosition,
};
use ndarray::{Array2, ArrayView2};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};

/// A backend under test, driven through host data.
pub trait Backend {
    /// Name for messages.
    fn name(&self) -> String;
    /// Whether the backend runs this config and logits dtype (e.g. f64 compute is CPU-only).
    fn supports(&self, cfg: &RouterConfig, dtype: &str) -> bool {
        let _ = dtype;
        cfg.compute_dtype() == ComputeDtype::F32
    }
    /// Routes host logits with `cfg`, returning host ids and weights.
    fn route(&self, cfg: &RouterConfig, logits: LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError>;
    /// Weights of the given ids (slot order kept).
    fn weights_for(
        &self,
        cfg: &RouterConfig,
        logits: LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
    ) -> Result<HostWeights, RouteError>;
    /// Replay with fallback rows ([`Router::replay_with_fallback`]): `ids` forced except the
    /// rows in `router_rows`, which the backend selects itself; host ids and weights back.
    fn replay_fallback(
        &self,
        cfg: &RouterConfig,
        logits: LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
    ) -> Result<(Array2<u32>, HostWeights), RouteError>;
}

/// [`Backend::replay_fallback`] for any router driven with host logits.
pub fn host_replay_fallback<R: Router>(
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

/// Where failing random cases are kept (committed, replayed first on every run).
pub fn persistence() -> Option<Box<dyn proptest::test_runner::FailurePersistence>> {
    Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
        concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/conformance.txt"),
    )))
}

/// Replay with fallback rows (missing routes the router selects itself): every row the backend
/// selects equals the reference's selection, every forced row keeps its ids, and every weight
/// has the reference's bits — on random configs, with about one row in five falling back
/// (first and last rows included), and with no fallback row at all.
pub fn check_replay_fallback(b: &dyn Backend, size: Size) {
    let mut runner = TestRunner::new(PtConfig {
        cases: size.cases / 2,
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
                // Error precedence with fallback rows is covered by check_errors.
                return Ok(());
            };
            let t = own.nrows();
            // Forced ids: the reference's own selection rotated by one slot (a valid, different
            // slot order), fallback rows chosen from the seed.
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
            for fallback in [rows, Vec::new()] {
                let mut masked = forced.clone();
                for &r in &fallback {
                    masked.row_mut(r).fill(moe_router::ROUTER_SELECTS);
                }
                let want = host_replay_fallback(&reference, lr, masked.view(), &fallback);
                let got = b.replay_fallback(&cfg, lr, masked.view(), &fallback);
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

/// How much work a conformance run does.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Proptest cases for random configs.
    pub cases: u32,
    /// Largest T in random shapes.
    pub max_tokens: usize,
}

impl Size {
    /// Small enough for CI on 2 cores (software adapters included).
    pub const CI: Size = Size {
        cases: 48,
        max_tokens: 40,
    };
}

fn bits(w: &HostWeights) -> Vec<u64> {
    match w {
        HostWeights::F32(a) => a.iter().map(|x| u64::from(x.to_bits())).collect(),
        HostWeights::F64(a) => a.iter().map(|x| x.to_bits()).collect(),
    }
}

/// Asserts the backend equals the reference on these logits: same error, or same ids and weight
/// bits; then replays the reference ids (reversed slot order) and compares the weights.
pub fn assert_same_as_reference(b: &dyn Backend, cfg: &RouterConfig, logits: LogitsRef<'_>, what: &str) {
    if !b.supports(cfg, logits.dtype_name()) {
        return;
    }
    let reference = ReferenceRouter::new(cfg.clone());
    let want = reference.route(&logits, &CallSite::default());
    let got = b.route(cfg, logits);
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
            let gw = b.weights_for(cfg, logits, rev.view());
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
/// group rule, normalisation, bias and scaling.
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
            if bias && score != ScoreFunction::Softmax {
                let mut s = seed;
                let v: Vec<f32> = (0..e)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
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
pub fn check_random(b: &dyn Backend, size: Size) {
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
pub fn check_native(b: &dyn Backend) {
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
        let (ids, w) = b.route(&cfg, LogitsRef::F32(logits.view())).expect("backend routes");
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
/// replay ids name the row.
pub fn check_errors(b: &dyn Backend) {
    let cfg = RouterConfig::builder(8, 2).build().expect("valid");
    let mut l = Array2::<f32>::zeros((4, 8));
    l[[2, 5]] = f32::NAN;
    assert!(matches!(
        b.route(&cfg, LogitsRef::F32(l.view())),
        Err(RouteError::NonFiniteLogit { row: 2, expert: 5, .. })
    ));
    l[[2, 5]] = f32::INFINITY;
    assert!(matches!(
        b.route(&cfg, LogitsRef::F32(l.view())),
        Err(RouteError::NonFiniteLogit { row: 2, expert: 5, .. })
    ));
    let l = Array2::<f32>::zeros((4, 7));
    assert!(matches!(
        b.route(&cfg, LogitsRef::F32(l.view())),
        Err(RouteError::LogitsShape { .. })
    ));
    let l = Array2::<f32>::zeros((4, 8));
    let mut ids = Array2::<u32>::zeros((4, 2));
    ids[[0, 1]] = 1;
    ids[[1, 1]] = 1;
    ids[[2, 1]] = 1;
    ids[[3, 0]] = 9;
    assert!(matches!(
        b.weights_for(&cfg, LogitsRef::F32(l.view()), ids.view()),
        Err(RouteError::IdOutOfRange {
            row: 3,
            slot: 0,
            id: 9,
            ..
        })
    ));
    ids[[3, 0]] = 1;
    ids[[3, 1]] = 1;
    assert!(matches!(
        b.weights_for(&cfg, LogitsRef::F32(l.view()), ids.view()),
        Err(RouteError::DuplicateId { row: 3, id: 1, .. })
    ));
}

/// Larger shapes (tail handling, E up to 512, K up to 16) — for GPU machines.
pub fn check_large(b: &dyn Backend) {
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
