//! The fast kernels against the reference router at the shapes of the published rules (E up to
//! 384, groups of 32, K = 8), which the workspace's conformance suite (small E) does not reach:
//! ids and weight bits in portable mode, for routing, replay and replay with fallback rows; the
//! backward's kernels (sparse, dense and full rows) bit for bit in both modes, and its errors
//! for bad ids in the reference's order.

use crate::CpuRouter;
use half::bf16;
use moe_router_core::{
    AuxLossKind, CallSite, GroupScore, HostMatrix, HostWeights, LogitsRef, LossGrads, Normalization, Numerics,
    ROUTER_SELECTS, ReferenceRouter, RouteError, Router, RouterConfig, ScoreFunction, SoftmaxPosition,
};
use ndarray::Array2;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
}

/// Rows of different kinds: wide uniform, narrow (near ties everywhere), and the hard cases
/// mixed in (exact ties, −∞, saturating values, subnormals, values a few ulp apart).
fn logits(t: usize, e: usize, seed: u64) -> Array2<f32> {
    let mut r = Rng(seed);
    let mut out = Array2::<f32>::zeros((t, e));
    for (i, mut row) in out.outer_iter_mut().enumerate() {
        let kind = i % 5;
        for x in row.iter_mut() {
            *x = match kind {
                0 => (r.unit() - 0.5) * 16.0,
                1 => (r.unit() - 0.5) * 0.02,
                2 => 1.0 + (r.next() % 8) as f32 * f32::EPSILON,
                _ => match r.next() % 12 {
                    0 => 1.0,
                    1 => f32::NEG_INFINITY,
                    2 => [40.0, 90.0, -90.0, 1e-40, -0.0][(r.next() % 5) as usize],
                    3 => 3.0 + (r.next() % 64) as f32 * 1e-3,
                    _ => (r.unit() - 0.5) * 16.0,
                },
            };
        }
    }
    out
}

fn bits(w: &HostWeights) -> Vec<u64> {
    match w {
        HostWeights::F32(a) => a.iter().map(|x| u64::from(x.to_bits())).collect(),
        HostWeights::F64(a) => a.iter().map(|x| x.to_bits()).collect(),
    }
}

/// The weight bits are equal; otherwise the message names the first differing row and slot.
fn assert_same_bits(a: &HostWeights, b: &HostWeights, what: &str) {
    let (x, y) = (bits(a), bits(b));
    assert_eq!(x.len(), y.len(), "{what}: weight count");
    let k = a.dim().1.max(1);
    if let Some(i) = (0..x.len()).find(|&i| x[i] != y[i]) {
        let (fa, fb) = (a.to_f64(), b.to_f64());
        panic!(
            "{what}: row {} slot {}: reference {:e} cpu {:e}",
            i / k,
            i % k,
            fa[[i / k, i % k]],
            fb[[i / k, i % k]]
        );
    }
}

/// Route, replay (reversed slot order) and replay with every third row falling back: ids and
/// weight bits equal the reference's, or both fail with the same error.
fn same_as_reference(cfg: &RouterConfig, l: LogitsRef<'_>, what: &str) {
    let cpu = CpuRouter::new(cfg.clone());
    let rf = ReferenceRouter::new(cfg.clone());
    let want = rf.route_host(&l);
    let got = cpu.route_host(&l);
    let (ids, w) = match (want, got) {
        (Ok(a), Ok(b)) => {
            if let Some(r) = (0..a.0.nrows()).find(|&r| a.0.row(r) != b.0.row(r)) {
                panic!(
                    "{what}: ids of row {r}: reference {} cpu {}\n{cfg:?}",
                    a.0.row(r),
                    b.0.row(r)
                );
            }
            assert_same_bits(&a.1, &b.1, &format!("{what}: weights\n{cfg:?}"));
            a
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "{what}: errors");
            return;
        }
        (a, b) => panic!("{what}: reference {a:?} cpu {b:?}"),
    };
    let mut rev = ids.clone();
    for mut r in rev.outer_iter_mut() {
        let v: Vec<u32> = r.iter().rev().copied().collect();
        r.assign(&ndarray::Array1::from(v));
    }
    let a = rf.weights_host(&l, rev.view()).expect("reference weighs");
    let b = cpu.weights_host(&l, rev.view()).expect("cpu weighs");
    assert_same_bits(&a, &b, &format!("{what}: replay weights\n{cfg:?}"));
    let rows: Vec<usize> = (0..ids.nrows()).step_by(3).collect();
    let mut marked = rev.clone();
    for &r in &rows {
        marked.row_mut(r).fill(ROUTER_SELECTS);
    }
    let f = cpu
        .replay_with_fallback(&l, marked.view(), &rows, &CallSite::default())
        .expect("fallback replay");
    let mut want_ids = rev.clone();
    for &r in &rows {
        want_ids.row_mut(r).assign(&ids.row(r));
    }
    assert_eq!(f.ids, want_ids, "{what}: fallback ids");
    let want_w = rf.weights_host(&l, want_ids.view()).expect("reference weighs");
    assert_same_bits(&want_w, &f.weights, &format!("{what}: fallback weights"));
    assert_same_bits(
        &w,
        &cpu.route_host(&l).expect("routes").1,
        &format!("{what}: route again"),
    );
}

fn bias(e: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..e).map(|_| (r.unit() - 0.5) * scale).collect()
}

fn configs() -> Vec<(String, RouterConfig)> {
    let mut v = Vec::new();
    for (e, k, g, sel) in [
        (256usize, 8usize, 8usize, 4usize),
        (128, 8, 8, 4),
        (96, 6, 4, 2),
        (160, 8, 5, 2),
    ] {
        for score in [GroupScore::SumTopN(2), GroupScore::Max, GroupScore::SumTopN(1)] {
            for b in [true, false] {
                let mut c = RouterConfig::builder(e, k)
                    .score(ScoreFunction::Sigmoid)
                    .group_limit(g, sel, score)
                    .normalization(Normalization::Sum { eps: 1e-20 })
                    .scaling_factor(2.5);
                if b {
                    c = c.expert_bias(bias(e, e as u64, 0.2));
                }
                v.push((
                    format!("sigmoid E{e} K{k} G{g}/{sel} {score:?} bias {b}"),
                    c.build().expect("valid"),
                ));
            }
        }
    }
    for (e, k) in [(384usize, 8usize), (256, 8), (72, 16), (40, 5)] {
        let c = RouterConfig::builder(e, k)
            .score(ScoreFunction::Sigmoid)
            .expert_bias(bias(e, 7, 0.1))
            .normalization(Normalization::SumClampMin { min: 0.5 })
            .scaling_factor(2.827);
        v.push((format!("sigmoid E{e} K{k}"), c.build().expect("valid")));
    }
    for (e, k) in [
        (256usize, 8usize),
        (128, 8),
        (512, 10),
        (8, 2),
        (33, 4),
        (64, 16),
        (128, 1),
    ] {
        let c = RouterConfig::builder(e, k)
            .softmax_position(SoftmaxPosition::BeforeTopK)
            .normalization(Normalization::Sum { eps: 1e-20 });
        v.push((format!("softmax renorm E{e} K{k}"), c.build().expect("valid")));
        let c = RouterConfig::builder(e, k).softmax_position(SoftmaxPosition::BeforeTopK);
        v.push((format!("softmax before E{e} K{k}"), c.build().expect("valid")));
        let c = RouterConfig::builder(e, k)
            .softmax_position(SoftmaxPosition::AfterTopK)
            .scaling_factor(0.37);
        v.push((format!("softmax after E{e} K{k}"), c.build().expect("valid")));
    }
    v
}

#[test]
fn fast_kernels_equal_the_reference_bit_for_bit() {
    for (i, (what, cfg)) in configs().into_iter().enumerate() {
        let e = cfg.num_experts();
        let l = logits(301, e, 1000 + i as u64);
        same_as_reference(&cfg, LogitsRef::F32(l.view()), &format!("{what}, f32"));
        let lb = l.mapv(bf16::from_f32);
        same_as_reference(&cfg, LogitsRef::Bf16(lb.view()), &format!("{what}, bf16"));
        let t = l.t().to_owned();
        same_as_reference(&cfg, LogitsRef::F32(t.t()), &format!("{what}, strided f32"));
    }
}

#[test]
fn fast_kernels_report_the_reference_errors() {
    for (what, cfg) in configs() {
        let e = cfg.num_experts();
        let mut l = logits(20, e, 5);
        l[[7, e - 1]] = f32::NAN;
        l[[9, 0]] = f32::INFINITY;
        same_as_reference(&cfg, LogitsRef::F32(l.view()), &format!("{what}, NaN"));
        let mut l = logits(20, e, 6);
        l.row_mut(4).fill(f32::NEG_INFINITY);
        same_as_reference(&cfg, LogitsRef::F32(l.view()), &format!("{what}, all −∞"));
    }
}

/// Native mode: the same ids as the reference's native mode on separated logits, weights within
/// 1e-6 relative.
#[test]
fn fast_kernels_native_mode_agree_with_the_reference_native_mode() {
    for (what, cfg) in configs() {
        let e = cfg.num_experts();
        let k = cfg.top_k();
        let mut b = RouterConfig::builder(e, k)
            .score(cfg.score())
            .softmax_position(cfg.softmax_position())
            .normalization(cfg.normalization())
            .scaling_factor(cfg.scaling_factor())
            .numerics(Numerics::Native);
        if let Some(g) = cfg.group_limit() {
            b = b.group_limit(g.num_groups, g.groups_selected, g.score);
        }
        if let Some(bb) = cfg.expert_bias() {
            b = b.expert_bias(bb.to_vec());
        }
        let cfg = b.build().expect("valid");
        // Distinct logits on a grid: no near ties.
        let l = Array2::from_shape_fn((97, e), |(t, x)| {
            ((t * 131 + x * 71) % e) as f32 * (6.0 / e as f32) - 3.0
        });
        let want = ReferenceRouter::new(cfg.clone())
            .route_host(&LogitsRef::F32(l.view()))
            .expect("routes");
        let got = CpuRouter::new(cfg.clone())
            .route_host(&LogitsRef::F32(l.view()))
            .expect("routes");
        assert_eq!(want.0, got.0, "{what}: native ids");
        for (a, c) in want.1.to_f64().iter().zip(got.1.to_f64().iter()) {
            assert!(
                (a - c).abs() <= 1e-6 * a.abs().max(1e-30),
                "{what}: native weight {a} vs {c}"
            );
        }
    }
}

/// `recip_approx` on the f32 values of `[1, 2¹⁰⁰]` with bit patterns `start, start + step, …`:
/// the largest relative error.
fn recip_error(step: usize) -> f64 {
    let mut worst = 0f64;
    for b in (0x3f80_0000u32..=0x7180_0000).step_by(step) {
        let d = f32::from_bits(b);
        let r = crate::fast::recip_approx(d);
        worst = worst.max((f64::from(r) * f64::from(d) - 1.0).abs());
    }
    worst
}

#[test]
fn the_reciprocal_of_the_first_pass_keys_is_within_its_bound() {
    let e = recip_error(1009);
    assert!(e < 2f64.powi(-21), "relative error {e:e}");
    // Past 2¹⁰⁰ the divisor is clamped: the reciprocal stays positive and at most 2⁻¹⁰⁰.
    for d in [1.5e30f32, 1e38, f32::MAX] {
        let r = crate::fast::recip_approx(d);
        assert!(r > 0.0 && r <= 2f32.powi(-100) * (1.0 + 2f32.powi(-20)), "{d:e}: {r:e}");
    }
}

/// Every f32 of `[1, 2¹⁰⁰]`: `cargo test --release -p moe-router-cpu -- --ignored`.
#[test]
#[ignore = "exhaustive, a few seconds in release"]
fn the_reciprocal_of_the_first_pass_keys_is_within_its_bound_everywhere() {
    let e = recip_error(1);
    assert!(e < 2f64.powi(-21), "relative error {e:e}");
}

/// The configs of [`configs`] plus the sparse rules they leave out (sqrt-softplus; a sigmoid
/// whose clamped normalisation binds on some rows and not on others), in both modes.
fn backward_configs() -> Vec<(String, RouterConfig)> {
    let mut v = configs();
    v.push((
        "sqrt-softplus E64 K6".into(),
        RouterConfig::builder(64, 6)
            .score(ScoreFunction::SqrtSoftplus)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .scaling_factor(1.5)
            .build()
            .expect("valid"),
    ));
    v.push((
        "sigmoid clamp binding E256 K8".into(),
        RouterConfig::builder(256, 8)
            .score(ScoreFunction::Sigmoid)
            .normalization(Normalization::SumClampMin { min: 3.9 })
            .build()
            .expect("valid"),
    ));
    let mut both = Vec::new();
    for (what, cfg) in v {
        for n in [Numerics::Portable, Numerics::Native] {
            both.push((
                format!("{what} {n:?}"),
                cfg.to_builder().numerics(n).build().expect("valid"),
            ));
        }
    }
    both
}

/// An upstream gradient with zeros, subnormals and both signs.
fn upstream(t: usize, k: usize) -> Array2<f32> {
    Array2::from_shape_fn((t, k), |(i, j)| match (i * 7 + j * 3) % 13 {
        0 => 0.0,
        1 => 1e-40,
        2 => -3.5e-39,
        x => (x as f32 - 6.5) * 0.3,
    })
}

/// The backward through `weights_vjp_host_at` and `weights_vjp_into` (a dirty contiguous buffer
/// and a strided one) gives the reference's bits, or the reference's error.
fn backward_same_as_reference(cfg: &RouterConfig, l: LogitsRef<'_>, ids: &Array2<u32>, g: &Array2<f32>, what: &str) {
    let cpu = CpuRouter::new(cfg.clone());
    let rf = ReferenceRouter::new(cfg.clone());
    let gm = HostMatrix::F32(g.clone());
    let none = LossGrads::default();
    let site = CallSite::default();
    let want = rf.weights_vjp_host_at(&l, ids.view(), &gm, &none, &site);
    let got = cpu.weights_vjp_host_at(&l, ids.view(), &gm, &none, &site);
    let (t, e) = l.dim();
    let mut out = Array2::from_elem((t, e), f32::NAN);
    let into = cpu.weights_vjp_into(&l, ids.view(), g.view(), &none, out.view_mut());
    let mut wide = Array2::from_elem((t, 2 * e), f32::NAN);
    let strided = cpu.weights_vjp_into(&l, ids.view(), g.view(), &none, wide.slice_mut(ndarray::s![.., ..;2]));
    let want = match want {
        Ok(HostMatrix::F32(w)) => w,
        Ok(other) => panic!("{what}: an f32 gradient expected, got {other:?}"),
        Err(err) => {
            assert_eq!(got.err(), Some(err.clone()), "{what}: weights_vjp_host_at error");
            assert_eq!(into.err(), Some(err.clone()), "{what}: weights_vjp_into error");
            assert_eq!(strided.err(), Some(err), "{what}: strided error");
            return;
        }
    };
    let bits = |a: ndarray::ArrayView2<'_, f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let first_diff = |a: ndarray::ArrayView2<'_, f32>| {
        let (x, y) = (bits(a), bits(want.view()));
        (0..x.len()).find(|&i| x[i] != y[i]).map(|i| (i / e, i % e))
    };
    match got {
        Ok(HostMatrix::F32(got)) => assert_eq!(first_diff(got.view()), None, "{what}: weights_vjp_host_at"),
        other => panic!("{what}: weights_vjp_host_at gave {other:?}"),
    }
    into.unwrap_or_else(|err| panic!("{what}: weights_vjp_into: {err}"));
    assert_eq!(first_diff(out.view()), None, "{what}: weights_vjp_into");
    strided.unwrap_or_else(|err| panic!("{what}: strided: {err}"));
    assert_eq!(first_diff(wide.slice(ndarray::s![.., ..;2])), None, "{what}: strided");
}

/// Every backward kernel gives the reference's bits in both modes: routed ids, and replayed
/// ids that are not the top K (the K lowest ids on every seventh row, reaching −∞, saturated
/// and subnormal logits), f32 and bf16 logits, T not a multiple of the kernels' blocks.
#[test]
fn backward_kernels_equal_the_reference_bit_for_bit() {
    for (i, (what, cfg)) in backward_configs().into_iter().enumerate() {
        let (e, k) = (cfg.num_experts(), cfg.top_k());
        let l = logits(301, e, 2000 + i as u64);
        let mut ids = ReferenceRouter::new(cfg.clone())
            .route_host(&LogitsRef::F32(l.view()))
            .expect("routes")
            .0;
        for r in (3..ids.nrows()).step_by(7) {
            for j in 0..k {
                ids[[r, j]] = (k - 1 - j) as u32;
            }
        }
        let g = upstream(301, k);
        backward_same_as_reference(&cfg, LogitsRef::F32(l.view()), &ids, &g, &format!("{what}, f32"));
        let lb = l.mapv(bf16::from_f32);
        backward_same_as_reference(&cfg, LogitsRef::Bf16(lb.view()), &ids, &g, &format!("{what}, bf16"));
    }
}

/// Bad ids give the reference's error — the first bad row's, before a NaN logit, a wrong
/// gradient shape or a wrong buffer shape — from the sparse, dense and full-row kernels.
#[test]
fn backward_reports_bad_ids_as_the_reference_does() {
    let (t, e, k) = (301usize, 64usize, 4usize);
    let sparse = RouterConfig::builder(e, k)
        .softmax_position(SoftmaxPosition::AfterTopK)
        .build()
        .expect("valid");
    let dense = RouterConfig::builder(e, k)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .build()
        .expect("valid");
    let rows = dense
        .to_builder()
        .aux_loss(AuxLossKind::MicroBatch, 1e-2)
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((t, e), |(i, j)| ((i * 31 + j * 17) % 97) as f32 * 0.05 - 2.0);
    let mut nan = l.clone();
    nan[[3, 5]] = f32::NAN;
    let g = upstream(t, k);
    let ok_ids = Array2::from_shape_fn((t, k), |(i, j)| ((i + j * 5) % e) as u32);
    let out_of_range = |ids: &mut Array2<u32>, r: usize| ids[[r, 2]] = e as u32 + 3;
    let duplicate = |ids: &mut Array2<u32>, r: usize| ids[[r, 3]] = ids[[r, 1]];
    let mut cases: Vec<(&str, Array2<u32>)> = Vec::new();
    let mut a = ok_ids.clone();
    out_of_range(&mut a, 290);
    cases.push(("out of range", a));
    let mut a = ok_ids.clone();
    duplicate(&mut a, 33);
    cases.push(("duplicate", a));
    let mut a = ok_ids.clone();
    duplicate(&mut a, 280);
    out_of_range(&mut a, 270);
    out_of_range(&mut a, 20);
    duplicate(&mut a, 20);
    cases.push(("several", a));
    for cfg in [sparse, dense, rows] {
        let cpu = CpuRouter::new(cfg.clone());
        let rf = ReferenceRouter::new(cfg.clone());
        let losses = LossGrads::default().aux_loss(1.0);
        let site = CallSite::default();
        for (what, ids) in &cases {
            for (lname, lv) in [("finite", &l), ("NaN row", &nan)] {
                let lr = LogitsRef::F32(lv.view());
                let what = format!("{what}, {lname}, {:?}", cfg.softmax_position());
                for grad in [g.clone(), Array2::zeros((t, k + 1))] {
                    let gm = HostMatrix::F32(grad.clone());
                    let want = rf
                        .weights_vjp_host_at(&lr, ids.view(), &gm, &losses, &site)
                        .expect_err("reference rejects the ids");
                    assert!(
                        matches!(want, RouteError::IdOutOfRange { .. } | RouteError::DuplicateId { .. }),
                        "{what}: {want}"
                    );
                    let got = cpu.weights_vjp_host_at(&lr, ids.view(), &gm, &losses, &site);
                    assert_eq!(got.err(), Some(want.clone()), "{what}: weights_vjp_host_at");
                    for out_e in [e, e + 1] {
                        let mut out = Array2::zeros((t, out_e));
                        let got = cpu.weights_vjp_into(&lr, ids.view(), grad.view(), &losses, out.view_mut());
                        assert_eq!(got.err(), Some(want.clone()), "{what}: weights_vjp_into, E {out_e}");
                    }
                }
            }
        }
    }
}
