//! The backward pass (DESIGN §2b): the reference against PyTorch autograd on Megatron's formulas
//! (golden cases) and against f64 central finite differences (property tests); the CPU backend
//! against the reference; capacity-dropped slots; the statistics the gradient differentiates.

use moe_router::backward::{LossGrads, aux_counts};
use moe_router::conformance::{config_strategy, upstream_grad};
use moe_router::cpu::CpuRouter;
use moe_router::{
    AuxLossKind, CallSite, ComputeDtype, GroupScore, HostMatrix, LogitsRef, Normalization, Numerics, ReferenceRouter,
    Router, RouterConfig, ScoreFunction, SoftmaxPosition, stats,
};
use ndarray::{Array2, ArrayView2};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, FileFailurePersistence};
use serde_json::Value;

fn golden() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/backward/golden.json"))
        .expect("tests/fixtures/backward/golden.json (run derive.py next to it)");
    serde_json::from_str(&text).expect("golden.json is JSON")
}

fn matrix_f64(v: &Value) -> Array2<f64> {
    let rows: Vec<Vec<f64>> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("number"))
                .collect()
        })
        .collect();
    let (t, c) = (rows.len(), rows.first().map_or(0, Vec::len));
    Array2::from_shape_vec((t, c), rows.concat()).expect("rectangular")
}

fn rule_of(v: &Value) -> RouterConfig {
    let e = v["num_experts"].as_u64().expect("E") as usize;
    let k = v["top_k"].as_u64().expect("K") as usize;
    let mut b = RouterConfig::builder(e, k)
        .score(match v["score"].as_str().expect("score") {
            "softmax" => ScoreFunction::Softmax,
            "sigmoid" => ScoreFunction::Sigmoid,
            _ => ScoreFunction::SqrtSoftplus,
        })
        .softmax_position(if v["softmax_before"].as_bool().expect("position") {
            SoftmaxPosition::BeforeTopK
        } else {
            SoftmaxPosition::AfterTopK
        })
        .normalization(if v["normalize"].as_bool().expect("normalize") {
            Normalization::Sum { eps: 1e-20 }
        } else {
            Normalization::None
        })
        .scaling_factor(v["scale"].as_f64().expect("scale") as f32)
        .z_loss_coeff(v["z_loss_coeff"].as_f64().expect("z coeff"));
    if let Some(bias) = v["bias"].as_array() {
        b = b.expert_bias(bias.iter().map(|x| x.as_f64().expect("bias") as f32).collect());
    }
    if v["groups"].is_object() {
        let g = &v["groups"];
        b = b.group_limit(
            g["num_groups"].as_u64().expect("groups") as usize,
            g["selected"].as_u64().expect("selected") as usize,
            GroupScore::SumTopN(g["sum_top_n"].as_u64().expect("n") as usize),
        );
    }
    for a in v["aux"].as_array().expect("aux") {
        let kind = match a[0].as_str().expect("kind") {
            "micro_batch" => AuxLossKind::MicroBatch,
            "per_sequence" => AuxLossKind::PerSequence,
            _ => AuxLossKind::Global,
        };
        b = b.aux_loss(kind, a[1].as_f64().expect("coeff"));
    }
    b.build().expect("golden rules are valid")
}

/// Largest |x| of a row (the scale a relative tolerance is taken against).
fn row_scale(a: ArrayView2<'_, f64>, t: usize) -> f64 {
    a.row(t).iter().fold(1e-300f64, |m, &x| m.max(x.abs()))
}

fn assert_close(got: &Array2<f64>, want: &Array2<f64>, tol: f64, what: &str) {
    assert_eq!(got.dim(), want.dim(), "{what}: shape");
    for t in 0..want.nrows() {
        let s = row_scale(want.view(), t);
        for e in 0..want.ncols() {
            let (g, w) = (got[[t, e]], want[[t, e]]);
            assert!(
                (g - w).abs() <= tol * s,
                "{what}: row {t}, expert {e}: got {g:e}, want {w:e} (tolerance {tol} × {s:e})"
            );
        }
    }
}

#[test]
fn reference_backward_equals_torch_autograd_on_megatron_formulas() {
    let g = golden();
    let cases = g["cases"].as_array().expect("cases");
    assert!(
        cases.len() >= 7,
        "every score function, normalisation, groups, aux and z-loss"
    );
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let rule = rule_of(&c["rule"]);
        let logits = matrix_f64(&c["logits"]).mapv(|x| x as f32);
        let lr = LogitsRef::F32(logits.view());
        let grad = matrix_f64(&c["grad_weights"]);
        let seq: Option<Vec<usize>> = c["seq_lens"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().expect("len") as usize).collect());
        let global: Option<Vec<f64>> = c["global_counts"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_f64().expect("count")).collect());
        let mut losses = LossGrads::default()
            .aux_loss(c["grad_aux_loss"].as_f64().expect("a"))
            .z_loss(c["grad_z_loss"].as_f64().expect("c"));
        if let Some(s) = &seq {
            losses = losses.seq_lens(s);
        }
        if let Some(gc) = &global {
            losses = losses.global_counts(gc);
        }
        let want_ids = matrix_f64(&c["ids"]).mapv(|x| x as u32);
        let want = matrix_f64(&c["grad_logits"]);
        for (compute, tol) in [(ComputeDtype::F64, 1e-9), (ComputeDtype::F32, 2e-5)] {
            let cfg = rule.to_builder().compute_dtype(compute).build().expect("valid");
            let r = ReferenceRouter::new(cfg);
            let (ids, w) = r.route_host(&lr).expect("routes");
            assert_eq!(ids, want_ids, "{name}: ids");
            assert_close(
                &w.to_f64(),
                &matrix_f64(&c["weights"]),
                tol,
                &format!("{name}: weights"),
            );
            let dz = r
                .weights_vjp_host_at(
                    &lr,
                    ids.view(),
                    &HostMatrix::F64(grad.clone()),
                    &losses,
                    &CallSite::default(),
                )
                .expect("backward");
            assert_close(
                &dz.to_f64(),
                &want,
                tol,
                &format!("{name}: gradient ({compute:?} compute)"),
            );
        }
    }
}

/// `Σ g∘w(z)` with the ids fixed, in f64.
fn weighted_sum(r: &ReferenceRouter, z: &Array2<f64>, ids: ArrayView2<'_, u32>, g: &Array2<f64>) -> f64 {
    let w = r
        .weights_host(&LogitsRef::F64(z.view()), ids)
        .expect("weights")
        .to_f64();
    (&w * g).sum()
}

/// Micro-batch aux loss and z-loss restated in f64 without rounding the logits (the statistics
/// round them to f32, which finite differences cannot see through); counts held constant.
fn aux_and_z(cfg: &RouterConfig, z: &Array2<f64>, counts: &[u64], a: f64, c: f64) -> f64 {
    let (t, e) = z.dim();
    let mut colsum = vec![0f64; e];
    let mut zl = 0f64;
    for row in z.outer_iter() {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ex: Vec<f64> = row.iter().map(|&x| (x - m).exp()).collect();
        let s: f64 = ex.iter().sum();
        let lse = m + s.ln();
        zl += lse * lse;
        let p: Vec<f64> = match cfg.score() {
            ScoreFunction::Softmax => ex.iter().map(|x| x / s).collect(),
            score => {
                let v: Vec<f64> = row
                    .iter()
                    .map(|&x| {
                        if score == ScoreFunction::Sigmoid {
                            1.0 / (1.0 + (-x).exp())
                        } else {
                            (x.max(0.0) + (-x.abs()).exp().ln_1p()).sqrt()
                        }
                    })
                    .collect();
                let sum: f64 = v.iter().sum();
                v.iter().map(|x| x / (sum + 1e-20)).collect()
            }
        };
        for (acc, x) in colsum.iter_mut().zip(p) {
            *acc += x;
        }
    }
    let coeff = cfg.aux_losses()[0].coeff;
    let k = cfg.top_k() as f64;
    let aux: f64 =
        colsum.iter().zip(counts).map(|(p, &n)| p * n as f64).sum::<f64>() * (e as f64 * coeff) / (k * (t * t) as f64);
    a * aux + c * cfg.z_loss_coeff() * zl / t as f64
}

#[test]
fn reference_backward_equals_central_finite_differences_in_f64() {
    let mut runner = proptest::test_runner::TestRunner::new(PtConfig {
        cases: 40,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/backward.txt",
        ))),
        ..PtConfig::default()
    });
    let strat = (config_strategy(), 1usize..6, any::<u64>(), any::<bool>());
    runner
        .run(&strat, |(cfg, t, seed, with_losses)| {
            let e = cfg.num_experts();
            let k = cfg.top_k();
            let mut b = cfg.to_builder().compute_dtype(ComputeDtype::F64).no_group_limit();
            if with_losses {
                b = b.aux_loss(AuxLossKind::MicroBatch, 1e-2).z_loss_coeff(1e-3);
            }
            let cfg = b.build().expect("valid");
            // Distinct, well separated logits; ids any K distinct experts (the backward does not
            // depend on how they were chosen), so no selection boundary is near.
            let mut s = seed | 1;
            let mut next = || {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 11) as f64 / (1u64 << 53) as f64
            };
            let z = Array2::from_shape_fn((t, e), |_| next() * 6.0 - 3.0);
            let ids = Array2::from_shape_fn((t, k), |(r, j)| ((r * 7 + j * 3 + seed as usize % 5) % e) as u32);
            let ids = {
                let mut x = ids;
                for mut row in x.rows_mut() {
                    let start = row[0] as usize;
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = ((start + j * (e / k).max(1)) % e) as u32;
                    }
                }
                x
            };
            let g = upstream_grad(t, k, seed).mapv(f64::from);
            let (a, c) = if with_losses { (0.9, -1.7) } else { (0.0, 0.0) };
            let r = ReferenceRouter::new(cfg.clone());
            let lr = LogitsRef::F64(z.view());
            let counts = aux_counts(&lr, k, None).expect("counts").remove(0);
            let dz = r
                .weights_vjp_host_at(
                    &lr,
                    ids.view(),
                    &HostMatrix::F64(g.clone()),
                    &LossGrads::default().aux_loss(a).z_loss(c),
                    &CallSite::default(),
                )
                .expect("backward")
                .to_f64();
            let h = 1e-6;
            let f = |zz: &Array2<f64>| {
                weighted_sum(&r, zz, ids.view(), &g)
                    + if with_losses {
                        aux_and_z(&cfg, zz, &counts, a, c)
                    } else {
                        0.0
                    }
            };
            for ti in 0..t {
                for ei in 0..e {
                    let mut zp = z.clone();
                    zp[[ti, ei]] += h;
                    let mut zm = z.clone();
                    zm[[ti, ei]] -= h;
                    let fd = (f(&zp) - f(&zm)) / (2.0 * h);
                    let scale = row_scale(dz.view(), ti).max(1e-3);
                    prop_assert!(
                        (fd - dz[[ti, ei]]).abs() <= 1e-6 * scale.max(1.0),
                        "row {ti} expert {ei}: finite difference {fd:e}, backward {:e}\nconfig {cfg:?}",
                        dz[[ti, ei]]
                    );
                }
            }
            Ok(())
        })
        .expect("finite differences agree");
}

#[test]
fn cpu_backward_is_bit_identical_to_the_reference_in_portable_mode_and_f64() {
    let cfg = moe_router::preset("deepseek-v3").expect("preset");
    let (t, e) = (700, cfg.num_experts());
    let l = Array2::from_shape_fn((t, e), |(i, j)| {
        (((i * 7919 + j * 104_729) % 2000) as f32 - 1000.0) * 0.004
    });
    let lr = LogitsRef::F32(l.view());
    for compute in [ComputeDtype::F32, ComputeDtype::F64] {
        let bias: Vec<f32> = (0..e).map(|x| ((x * 37 % 11) as f32 - 5.0) * 0.01).collect();
        let cfg = cfg
            .to_builder()
            .expert_bias(bias)
            .compute_dtype(compute)
            .aux_loss(AuxLossKind::PerSequence, 1e-3)
            .z_loss_coeff(1e-3)
            .build()
            .expect("valid");
        let reference = ReferenceRouter::new(cfg.clone());
        let ids = reference.route_host(&lr).expect("routes").0;
        let g = HostMatrix::F32(upstream_grad(t, cfg.top_k(), 3));
        let lens = [300usize, 400];
        let losses = LossGrads::default().aux_loss(1.0).z_loss(2.0).seq_lens(&lens);
        let want = reference
            .weights_vjp_host_at(&lr, ids.view(), &g, &losses, &CallSite::default())
            .expect("reference");
        let got = CpuRouter::new(cfg)
            .weights_vjp_host_at(&lr, ids.view(), &g, &losses, &CallSite::default())
            .expect("cpu");
        assert_eq!(got, want, "{compute:?}");
    }
}

/// The CPU backward's sparse rows (no softmax over all experts, no aux or z-loss term: only the
/// K selected logits are read) and `weights_vjp_into` (a reused, dirty f32 buffer) give the
/// reference's bits for sigmoid, sqrt-softplus and softmax-after rules, in f32/bf16/f16 logits,
/// portable and native, including rows whose selected logits are all −∞ (zero weights while the
/// row has a finite logit; softmax after top-K: the reference's error) and replayed ids that are not the top K; and the
/// reference's errors for NaN, +∞ and all −∞ rows.
#[test]
fn cpu_sparse_backward_and_backward_into_a_buffer_equal_the_reference() {
    let dsv3 = moe_router::preset("deepseek-v3").expect("preset");
    let bias: Vec<f32> = (0..dsv3.num_experts())
        .map(|x| ((x * 37 % 11) as f32 - 5.0) * 0.01)
        .collect();
    let rules = [
        dsv3.to_builder().expert_bias(bias).build().expect("valid"),
        RouterConfig::builder(64, 6)
            .score(ScoreFunction::SqrtSoftplus)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .scaling_factor(1.5)
            .build()
            .expect("valid"),
        RouterConfig::builder(48, 4)
            .softmax_position(SoftmaxPosition::AfterTopK)
            .build()
            .expect("valid"),
        RouterConfig::builder(32, 4)
            .softmax_position(SoftmaxPosition::BeforeTopK)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .build()
            .expect("valid"),
    ];
    for base in rules {
        for numerics in [Numerics::Portable, Numerics::Native] {
            let cfg = base.to_builder().numerics(numerics).build().expect("valid");
            let (t, e, k) = (300usize, cfg.num_experts(), cfg.top_k());
            let mut l = Array2::from_shape_fn((t, e), |(i, j)| {
                (((i * 7919 + j * 104_729) % 2000) as f32 - 1000.0) * 0.004
            });
            // Row 5: every logit −∞ but the last expert's, which the replayed ids leave out.
            l.row_mut(5).fill(f32::NEG_INFINITY);
            l[[5, e - 1]] = 0.5;
            let reference = ReferenceRouter::new(cfg.clone());
            let mut ids = reference.route_host(&LogitsRef::F32(l.view())).expect("routes").0;
            // Replayed ids: row 5 takes the first K experts (all −∞); rows ≥ 200 the K lowest ids.
            for r in std::iter::once(5).chain(200..t) {
                for j in 0..k {
                    ids[[r, j]] = j as u32;
                }
            }
            let g = upstream_grad(t, k, 5);
            let cpu = CpuRouter::new(cfg.clone());
            let lb = l.mapv(half::bf16::from_f32);
            let lh = l.mapv(half::f16::from_f32);
            for lr in [
                LogitsRef::F32(l.view()),
                LogitsRef::Bf16(lb.view()),
                LogitsRef::F16(lh.view()),
            ] {
                let what = format!("{:?} {numerics:?} {}", cfg.score(), lr.dtype_name());
                let want = reference.weights_vjp_host_at(
                    &lr,
                    ids.view(),
                    &HostMatrix::F32(g.clone()),
                    &LossGrads::default(),
                    &CallSite::default(),
                );
                let got = cpu.weights_vjp_host_at(
                    &lr,
                    ids.view(),
                    &HostMatrix::F32(g.clone()),
                    &LossGrads::default(),
                    &CallSite::default(),
                );
                let mut out = Array2::from_elem((t, e), f32::NAN);
                let into = cpu.weights_vjp_into(&lr, ids.view(), g.view(), &LossGrads::default(), out.view_mut());
                match want {
                    Ok(HostMatrix::F32(want)) => {
                        assert_eq!(got.ok(), Some(HostMatrix::F32(want.clone())), "{what}: weights_vjp");
                        into.unwrap_or_else(|err| panic!("{what}: weights_vjp_into failed: {err}"));
                        assert_eq!(
                            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            "{what}: weights_vjp_into"
                        );
                    }
                    // Softmax after top-K with every selected logit −∞ (row 5) is an error.
                    Err(want) => {
                        assert_eq!(got.map_err(|e| e.to_string()).err(), Some(want.to_string()), "{what}");
                        assert_eq!(into.map_err(|e| e.to_string()).err(), Some(want.to_string()), "{what}");
                    }
                    Ok(other) => panic!("{what}: reference gave {other:?}"),
                }
            }
            // Rejected rows: the reference's error, from both entry points.
            for (row, value) in [(17usize, f32::NAN), (42, f32::INFINITY)] {
                let mut bad = l.clone();
                bad[[row, 3]] = value;
                let lr = LogitsRef::F32(bad.view());
                let gm = HostMatrix::F32(g.clone());
                let want = reference
                    .weights_vjp_host_at(&lr, ids.view(), &gm, &LossGrads::default(), &CallSite::default())
                    .expect_err("reference rejects the row");
                let got = cpu
                    .weights_vjp_host_at(&lr, ids.view(), &gm, &LossGrads::default(), &CallSite::default())
                    .expect_err("cpu rejects the row");
                assert_eq!(got.to_string(), want.to_string());
                let mut out = Array2::zeros((t, e));
                let into = cpu
                    .weights_vjp_into(&lr, ids.view(), g.view(), &LossGrads::default(), out.view_mut())
                    .expect_err("cpu rejects the row");
                assert_eq!(into.to_string(), want.to_string());
            }
            let mut masked = l.clone();
            masked.row_mut(9).fill(f32::NEG_INFINITY);
            let lr = LogitsRef::F32(masked.view());
            let gm = HostMatrix::F32(g.clone());
            let want = reference
                .weights_vjp_host_at(&lr, ids.view(), &gm, &LossGrads::default(), &CallSite::default())
                .expect_err("all -inf row");
            let got = cpu
                .weights_vjp_host_at(&lr, ids.view(), &gm, &LossGrads::default(), &CallSite::default())
                .expect_err("all -inf row");
            assert_eq!(got.to_string(), want.to_string());
            // A buffer of the wrong shape: a typed error naming both shapes.
            let mut small = Array2::zeros((t, e - 1));
            let err = cpu
                .weights_vjp_into(
                    &LogitsRef::F32(l.view()),
                    ids.view(),
                    g.view(),
                    &LossGrads::default(),
                    small.view_mut(),
                )
                .expect_err("wrong out shape");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("[{t}, {}]", e - 1)) && msg.contains(&format!("[{t}, {e}]")),
                "{msg}"
            );
        }
    }
}

#[test]
fn capacity_dropped_slots_pass_no_gradient_once_their_upstream_gradient_is_zeroed() {
    let cfg = RouterConfig::builder(8, 2)
        .capacity(moe_router::Capacity {
            factor: 0.5,
            min_capacity: None,
            policy: moe_router::DropPolicy::Probs,
            pad_to_capacity: false,
        })
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((16, 8), |(t, e)| if e == 0 { 5.0 } else { ((t + e) % 5) as f32 * 0.1 });
    let lr = LogitsRef::F32(l.view());
    let r = ReferenceRouter::new(cfg.clone());
    let (ids, w) = r.route_host(&lr).expect("routes");
    let outcome = r.apply_capacity(&ids, &w).expect("capacity").expect("configured");
    assert!(outcome.dropped > 0, "expert 0 is over capacity");
    let mut g = Array2::<f32>::ones((16, 2));
    outcome.zero_dropped(&mut g).expect("same shape");
    for ((t, j), &kept) in outcome.kept.indexed_iter() {
        assert_eq!(g[[t, j]] == 0.0, !kept, "slot ({t}, {j})");
    }
    // A row whose every slot was dropped gets no gradient at all (sigmoid-free softmax after
    // normalisation aside, the weights' term is linear in g).
    let dz = r
        .weights_vjp_host_at(
            &lr,
            ids.view(),
            &HostMatrix::F32(g.clone()),
            &LossGrads::default(),
            &CallSite::default(),
        )
        .expect("backward")
        .to_f64();
    for t in 0..16 {
        if outcome.kept.row(t).iter().all(|&k| !k) {
            assert!(dz.row(t).iter().all(|&x| x == 0.0), "row {t} fully dropped");
        }
    }
    let mut wrong = Array2::<f32>::ones((16, 3));
    assert!(matches!(
        outcome.zero_dropped(&mut wrong),
        Err(moe_router::RouteError::GradShape {
            expected_k: 2,
            cols: 3,
            ..
        })
    ));
}

#[test]
fn the_aux_loss_counts_the_top_k_logits_and_equals_the_f64_restatement() {
    let cfg = RouterConfig::builder(16, 4)
        .score(ScoreFunction::Sigmoid)
        .aux_loss(AuxLossKind::MicroBatch, 1e-2)
        .z_loss_coeff(1e-3)
        .build()
        .expect("valid");
    let l = Array2::from_shape_fn((9, 16), |(t, e)| ((t * 13 + e * 5) % 17) as f32 * 0.25 - 2.0);
    let lr = LogitsRef::F32(l.view());
    let counts = aux_counts(&lr, 4, None).expect("counts").remove(0);
    assert_eq!(counts.iter().sum::<u64>(), 9 * 4);
    let want = aux_and_z(&cfg, &l.mapv(f64::from), &counts, 1.0, 0.0);
    let got = stats::aux_loss_micro_batch(&cfg, &lr, 1e-2).expect("aux");
    assert!((got - want).abs() <= 1e-12 * want.abs(), "aux {got} vs {want}");
    let want_z = aux_and_z(&cfg, &l.mapv(f64::from), &counts, 0.0, 1.0);
    let got_z = stats::z_loss(&lr, 1e-3).expect("z");
    assert!((got_z - want_z).abs() <= 1e-12 * want_z.abs(), "z {got_z} vs {want_z}");
}

#[test]
fn backward_inputs_are_checked_before_any_work() {
    let cfg = RouterConfig::builder(8, 2)
        .aux_loss(AuxLossKind::Global, 1e-2)
        .build()
        .expect("valid");
    let r = CpuRouter::new(cfg);
    let l = Array2::<f32>::zeros((4, 8));
    let lr = LogitsRef::F32(l.view());
    let ids = Array2::from_shape_fn((4, 2), |(_, j)| j as u32);
    let g = HostMatrix::F32(Array2::ones((4, 2)));
    let short = [1.0f64; 7];
    let e = r.weights_vjp_host_at(
        &lr,
        ids.view(),
        &g,
        &LossGrads::default().aux_loss(1.0).global_counts(&short),
        &CallSite::default(),
    );
    assert!(
        matches!(&e, Err(moe_router::RouteError::BackwardInput { what: "global_counts", detail }) if detail.contains("7 entries")),
        "{e:?}"
    );
    let lens = [1usize, 2];
    let e = r.weights_vjp_host_at(
        &lr,
        ids.view(),
        &g,
        &LossGrads::default().seq_lens(&lens),
        &CallSite::default(),
    );
    assert!(
        matches!(
            e,
            Err(moe_router::RouteError::LayoutRows {
                layout_rows: 3,
                batch_rows: 4
            })
        ),
        "{e:?}"
    );
    let e = r.weights_vjp_host_at(
        &lr,
        ids.view(),
        &g,
        &LossGrads::default().z_loss(f64::NAN),
        &CallSite::default(),
    );
    assert!(
        matches!(
            e,
            Err(moe_router::RouteError::BackwardInput {
                what: "grad_z_loss",
                ..
            })
        ),
        "{e:?}"
    );
    let _ = Numerics::Portable;
}

/// The CPU backward's dense rows (softmax before top-K without an aux or z-loss term: the
/// vectorised kernel) give the reference's bits, through `weights_vjp` and `weights_vjp_into`
/// (a dirty contiguous buffer and a strided one), for softmax before top-K without
/// renormalisation and with it (kept literal by a selection bias), f32/bf16/f16 logits, portable
/// and native, E not a multiple of the lane width, T not a multiple of the chunk or the block,
/// rows with −∞ logits (at and off the ids, underflowing exponentials); and the reference's
/// errors for NaN, +∞ and all −∞ rows.
#[test]
fn cpu_dense_softmax_before_backward_equals_the_reference() {
    let rules = |e: usize| {
        let bias: Vec<f32> = (0..e).map(|x| ((x * 37 % 11) as f32 - 5.0) * 0.01).collect();
        [
            RouterConfig::builder(e, 8)
                .softmax_position(SoftmaxPosition::BeforeTopK)
                .build()
                .expect("valid"),
            RouterConfig::builder(e, 6)
                .softmax_position(SoftmaxPosition::BeforeTopK)
                .expert_bias(bias)
                .normalization(Normalization::Sum { eps: 1e-20 })
                .scaling_factor(2.5)
                .build()
                .expect("valid"),
        ]
    };
    for e in [40usize, 256] {
        for base in rules(e) {
            assert_eq!(base.softmax_position(), SoftmaxPosition::BeforeTopK);
            for numerics in [Numerics::Portable, Numerics::Native] {
                let cfg = base.to_builder().numerics(numerics).build().expect("valid");
                let (t, k) = (300usize, cfg.top_k());
                let mut l = Array2::from_shape_fn((t, e), |(i, j)| {
                    (((i * 7919 + j * 104_729) % 2000) as f32 - 1000.0) * 0.004
                });
                // −∞ logits: scattered; row 5 all −∞ but one; row 6 with a spread that
                // underflows most exponentials.
                for i in 0..t {
                    l[[i, (i * 13) % e]] = f32::NEG_INFINITY;
                }
                l.row_mut(5).fill(f32::NEG_INFINITY);
                l[[5, e - 1]] = 0.5;
                for j in 0..e {
                    l[[6, j]] = j as f32 * -3.0;
                }
                let reference = ReferenceRouter::new(cfg.clone());
                let mut ids = reference.route_host(&LogitsRef::F32(l.view())).expect("routes").0;
                // Replayed ids: row 5 the first K experts (all −∞), rows ≥ 250 the K lowest ids.
                for r in std::iter::once(5).chain(250..t) {
                    for j in 0..k {
                        ids[[r, j]] = j as u32;
                    }
                }
                let g = upstream_grad(t, k, 7);
                let cpu = CpuRouter::new(cfg.clone());
                let lb = l.mapv(half::bf16::from_f32);
                let lh = l.mapv(half::f16::from_f32);
                let lossless = LossGrads::default();
                for lr in [
                    LogitsRef::F32(l.view()),
                    LogitsRef::Bf16(lb.view()),
                    LogitsRef::F16(lh.view()),
                ] {
                    let what = format!("E{e} {numerics:?} {} {:?}", lr.dtype_name(), cfg.normalization());
                    let gm = HostMatrix::F32(g.clone());
                    let Ok(HostMatrix::F32(want)) =
                        reference.weights_vjp_host_at(&lr, ids.view(), &gm, &lossless, &CallSite::default())
                    else {
                        panic!("{what}: the reference computes the gradient");
                    };
                    let bits = |a: ArrayView2<'_, f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    let got = cpu
                        .weights_vjp_host_at(&lr, ids.view(), &gm, &lossless, &CallSite::default())
                        .expect("cpu");
                    let HostMatrix::F32(got) = got else {
                        panic!("{what}: f32 gradient expected");
                    };
                    assert_eq!(bits(got.view()), bits(want.view()), "{what}: weights_vjp");
                    let mut out = Array2::from_elem((t, e), f32::NAN);
                    cpu.weights_vjp_into(&lr, ids.view(), g.view(), &lossless, out.view_mut())
                        .expect("into");
                    assert_eq!(bits(out.view()), bits(want.view()), "{what}: weights_vjp_into");
                    // A strided buffer: every other column of a wider array.
                    let mut wide = Array2::from_elem((t, 2 * e), f32::NAN);
                    let strided = wide.slice_mut(ndarray::s![.., ..;2]);
                    cpu.weights_vjp_into(&lr, ids.view(), g.view(), &lossless, strided)
                        .expect("into strided");
                    assert_eq!(
                        bits(wide.slice(ndarray::s![.., ..;2])),
                        bits(want.view()),
                        "{what}: strided"
                    );
                }
                // Rejected rows: the reference's error, from both entry points.
                for (row, value) in [(17usize, f32::NAN), (42, f32::INFINITY), (299, f32::NAN)] {
                    let mut bad = l.clone();
                    bad[[row, 3]] = value;
                    let lr = LogitsRef::F32(bad.view());
                    let gm = HostMatrix::F32(g.clone());
                    let want = reference
                        .weights_vjp_host_at(&lr, ids.view(), &gm, &lossless, &CallSite::default())
                        .expect_err("reference rejects the row");
                    let got = cpu
                        .weights_vjp_host_at(&lr, ids.view(), &gm, &lossless, &CallSite::default())
                        .expect_err("cpu rejects the row");
                    assert_eq!(got.to_string(), want.to_string());
                    let mut out = Array2::zeros((t, e));
                    let into = cpu
                        .weights_vjp_into(&lr, ids.view(), g.view(), &lossless, out.view_mut())
                        .expect_err("cpu rejects the row");
                    assert_eq!(into.to_string(), want.to_string());
                }
                let mut masked = l.clone();
                masked.row_mut(9).fill(f32::NEG_INFINITY);
                let lr = LogitsRef::F32(masked.view());
                let gm = HostMatrix::F32(g.clone());
                let want = reference
                    .weights_vjp_host_at(&lr, ids.view(), &gm, &lossless, &CallSite::default())
                    .expect_err("all -inf row");
                let got = cpu
                    .weights_vjp_host_at(&lr, ids.view(), &gm, &lossless, &CallSite::default())
                    .expect_err("all -inf row");
                assert_eq!(got.to_string(), want.to_string());
                let mut out = Array2::zeros((t, e));
                let into = cpu
                    .weights_vjp_into(&lr, ids.view(), g.view(), &lossless, out.view_mut())
                    .expect_err("all -inf row");
                assert_eq!(into.to_string(), want.to_string());
            }
        }
    }
}
