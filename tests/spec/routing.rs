//! Routing semantics (DESIGN §2) as invariants of the reference router, checked with proptest
//! over random configs and shapes.

use crate::conformance::{config_strategy, logits_strategy};
use moe_router::{
    CallSite, GroupScore, HostWeights, LogitsRef, Normalization, ReferenceRouter, Router, RouterConfig, ScoreFunction,
};
use ndarray::{Array2, array};
use proptest::prelude::*;

fn route(cfg: &RouterConfig, l: &Array2<f32>) -> (Array2<u32>, Array2<f32>) {
    let r = ReferenceRouter::new(cfg.clone())
        .route(&LogitsRef::F32(l.view()), &CallSite::default())
        .unwrap();
    (r.ids, r.weights.to_f32())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_row_gets_k_distinct_ids_in_range(
        (cfg, l) in config_strategy().prop_flat_map(|c| { let e = c.num_experts(); (Just(c), logits_strategy(e, 12)) })
    ) {
        let Ok(r) = ReferenceRouter::new(cfg.clone()).route(&LogitsRef::F32(l.view()), &CallSite::default()) else {
            return Ok(()); // all-masked rows are a typed error, tested elsewhere
        };
        for row in r.ids.outer_iter() {
            let mut v = row.to_vec();
            prop_assert!(v.iter().all(|&i| (i as usize) < cfg.num_experts()));
            v.sort_unstable();
            v.dedup();
            prop_assert_eq!(v.len(), cfg.top_k());
        }
    }

    #[test]
    fn replaying_the_selection_reproduces_the_weights_exactly(
        (cfg, l) in config_strategy().prop_flat_map(|c| { let e = c.num_experts(); (Just(c), logits_strategy(e, 12)) })
    ) {
        let r = ReferenceRouter::new(cfg.clone());
        let Ok(out) = r.route(&LogitsRef::F32(l.view()), &CallSite::default()) else { return Ok(()) };
        let w = r.weights_for(&LogitsRef::F32(l.view()), &out.ids, &CallSite::default()).unwrap();
        prop_assert_eq!(out.weights, w);
    }

    #[test]
    fn normalised_weights_sum_to_scaling_factor(
        (cfg, l) in config_strategy().prop_flat_map(|c| { let e = c.num_experts(); (Just(c), logits_strategy(e, 12)) })
    ) {
        let renorm = matches!(cfg.normalization(), Normalization::Sum { .. })
            || (cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == moe_router::SoftmaxPosition::AfterTopK);
        let Ok(out) = ReferenceRouter::new(cfg.clone()).route(&LogitsRef::F32(l.view()), &CallSite::default()) else { return Ok(()) };
        if renorm {
            for row in out.weights.to_f64().outer_iter() {
                let s: f64 = row.sum();
                if s > 0.0 {
                    prop_assert!((s - f64::from(cfg.scaling_factor())).abs() < 1e-5 * f64::from(cfg.scaling_factor()), "sum {}", s);
                }
            }
        }
    }

    #[test]
    fn selected_slots_are_ordered_by_key_then_lower_id(l in logits_strategy(16, 8)) {
        let cfg = RouterConfig::builder(16, 5).build().unwrap();
        let (ids, _) = route(&cfg, &l);
        for (t, row) in ids.outer_iter().enumerate() {
            for j in 1..row.len() {
                let (a, b) = (row[j - 1] as usize, row[j] as usize);
                let (ka, kb) = (moe_router::math::ftz(l[[t, a]]), moe_router::math::ftz(l[[t, b]]));
                prop_assert!(ka > kb || (ka == kb && a < b), "slot order at row {t}");
            }
        }
    }

    #[test]
    fn group_limit_keeps_selection_inside_the_kept_groups(l in logits_strategy(32, 8)) {
        let cfg = RouterConfig::builder(32, 4).score(ScoreFunction::Sigmoid).group_limit(8, 2, GroupScore::SumTopN(2)).build().unwrap();
        let (ids, _) = route(&cfg, &l);
        for row in ids.outer_iter() {
            let mut groups: Vec<u32> = row.iter().map(|&i| i / 4).collect();
            groups.sort_unstable();
            groups.dedup();
            prop_assert!(groups.len() <= 2);
        }
    }
}

#[test]
fn bias_changes_selection_but_never_weights() {
    let l = array![[0.0f32, 0.1, 0.2, 0.3]];
    let plain = RouterConfig::builder(4, 1)
        .score(ScoreFunction::Sigmoid)
        .build()
        .unwrap();
    let biased = plain
        .to_builder()
        .expert_bias(vec![1.0, 0.0, 0.0, 0.0])
        .build()
        .unwrap();
    let (i0, w0) = route(&plain, &l);
    let (i1, w1) = route(&biased, &l);
    assert_eq!(i0[[0, 0]], 3);
    assert_eq!(i1[[0, 0]], 0, "bias moves the selection");
    assert_eq!(
        w1[[0, 0]],
        moe_router::math::sigmoid(0.0),
        "weight is the unbiased score"
    );
    assert_ne!(w0[[0, 0]], w1[[0, 0]]);
}

#[test]
fn exact_ties_go_to_the_lower_expert_id() {
    let l = array![[1.0f32, 2.0, 2.0, 2.0, 0.5]];
    let (ids, _) = route(&RouterConfig::builder(5, 2).build().unwrap(), &l);
    assert_eq!(ids.row(0).to_vec(), vec![1, 2]);
}

#[test]
fn saturated_sigmoid_ties_break_by_lower_id_not_by_logit() {
    // sigmoid(30) == sigmoid(40) == 1.0 in f32: the selection key ties, the lower id wins.
    let l = array![[30.0f32, 40.0, 0.0]];
    let cfg = RouterConfig::builder(3, 1)
        .score(ScoreFunction::Sigmoid)
        .build()
        .unwrap();
    let (ids, w) = route(&cfg, &l);
    assert_eq!(ids[[0, 0]], 0);
    assert_eq!(w[[0, 0]], 1.0);
}

#[test]
fn negative_infinity_masks_an_expert() {
    let l = array![[f32::NEG_INFINITY, 0.0, 1.0, f32::NEG_INFINITY]];
    let cfg = RouterConfig::builder(4, 2).build().unwrap();
    let (ids, w) = route(&cfg, &l);
    assert_eq!(ids.row(0).to_vec(), vec![2, 1]);
    assert!(w.iter().all(|x| x.is_finite()));
}

#[test]
fn softmax_with_renormalisation_is_softmax_over_the_selected_logits() {
    let cfg = RouterConfig::builder(4, 2)
        .softmax_position(moe_router::SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .build()
        .unwrap();
    assert_eq!(
        cfg.softmax_position(),
        moe_router::SoftmaxPosition::AfterTopK,
        "canonical form"
    );
    let (_, w) = route(&cfg, &array![[0.0f32, 1.0, 2.0, -1.0]]);
    let e = (-1.0f64).exp();
    assert!((f64::from(w[[0, 0]]) - 1.0 / (1.0 + e)).abs() < 1e-7);
}

#[test]
fn f64_compute_returns_f64_weights() {
    let cfg = RouterConfig::builder(4, 2)
        .compute_dtype(moe_router::ComputeDtype::F64)
        .build()
        .unwrap();
    let r = ReferenceRouter::new(cfg)
        .route(
            &LogitsRef::F32(array![[0.0f32, 1.0, 2.0, -1.0]].view()),
            &CallSite::default(),
        )
        .unwrap();
    assert!(matches!(r.weights, HostWeights::F64(_)));
}

/// Issue 13, item 5: one rule for every score function — a row of −∞ only is `AllMasked`
/// (routing and replay), never a bias-only route with all-zero weights; one finite logit is
/// enough to route.
#[test]
fn a_row_of_minus_infinity_only_is_all_masked_under_every_score_function() {
    use moe_router::{ReferenceRouter, RouteError, Router, RouterConfig, ScoreFunction};
    for score in [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::SqrtSoftplus,
    ] {
        let mut b = RouterConfig::builder(4, 2).score(score);
        if score != ScoreFunction::Softmax {
            b = b.expert_bias(vec![0.4, 0.3, 0.2, 0.1]);
        }
        let r = ReferenceRouter::new(b.build().expect("valid"));
        let mut l = ndarray::Array2::<f32>::zeros((3, 4));
        l.row_mut(2).fill(f32::NEG_INFINITY);
        let lr = moe_router::LogitsRef::F32(l.view());
        assert_eq!(
            r.route_host(&lr).unwrap_err(),
            RouteError::AllMasked { row: 2 },
            "{score:?}"
        );
        let ids = ndarray::array![[0u32, 1], [0, 1], [0, 1]];
        assert_eq!(
            r.weights_host(&lr, ids.view()).unwrap_err(),
            RouteError::AllMasked { row: 2 },
            "{score:?} replay"
        );
        l[[2, 3]] = -5.0;
        let lr = moe_router::LogitsRef::F32(l.view());
        assert!(r.route_host(&lr).is_ok(), "{score:?}: one finite logit routes");
    }
}
