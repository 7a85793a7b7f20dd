//! Golden cases: for every preset, a row of logits whose expected ids and weights were derived
//! by hand from the model's published routing code, and the reference router (portable mode)
//! must reproduce them: ids exactly, weights within 1e-6 relative.
//!
//! Derivation: `tests/fixtures/golden_derive.py` restates each family's router (transformers
//! `modeling_*.py`, or the remote code the checkpoint ships) operation by operation in plain
//! Python f64 and prints the numbers below. Logits are `base(i) = -3 + ((37 i) mod 23) / 16`
//! with a few experts overridden; every logit and bias is a multiple of 1/16, so exact in f32.
//! Slot order is this crate's: selection key descending, ties → lower expert id.

use moe_router::Router;
use moe_router::{LogitsRef, Numerics, ReferenceRouter, RouterConfig, preset};
use ndarray::Array2;

fn base(i: usize) -> f32 {
    -3.0 + ((i * 37) % 23) as f32 / 16.0
}

fn row(e: usize, overrides: &[(usize, f32)]) -> Vec<f32> {
    let mut z: Vec<f32> = (0..e).map(base).collect();
    for &(i, v) in overrides {
        z[i] = v;
    }
    z
}

fn bias(e: usize, overrides: &[(usize, f32)]) -> Vec<f32> {
    let mut b = vec![0.0f32; e];
    for &(i, v) in overrides {
        b[i] = v;
    }
    b
}

/// Routes `rows` with the reference router and checks ids exactly and weights within 1e-6
/// relative; also checks that replaying the ids gives the same weight bits.
fn check(cfg: RouterConfig, rows: &[Vec<f32>], expected: &[(&[u32], &[f64])]) {
    assert_eq!(cfg.numerics(), Numerics::Portable);
    let e = cfg.num_experts();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let logits = Array2::from_shape_vec((rows.len(), e), flat).unwrap();
    let router = ReferenceRouter::new(cfg);
    let (ids, w) = router.route_host(&LogitsRef::F32(logits.view())).unwrap();
    let w = w.to_f64();
    for (r, (want_ids, want_w)) in expected.iter().enumerate() {
        assert_eq!(ids.row(r).to_vec(), want_ids.to_vec(), "row {r} ids");
        for (j, (&got, &want)) in w.row(r).iter().zip(want_w.iter()).enumerate() {
            let rel = ((got - want) / want).abs();
            assert!(rel <= 1e-6, "row {r} slot {j}: got {got}, want {want} (rel {rel:e})");
        }
    }
    let replayed = router.weights_host(&LogitsRef::F32(logits.view()), ids.view()).unwrap();
    assert_eq!(
        replayed.to_f64().mapv(f64::to_bits),
        w.mapv(f64::to_bits),
        "replayed weights differ"
    );
}

#[test]
fn deepseek_v2_keeps_three_of_eight_groups_by_max_probability_and_scales_by_16() {
    // 160 experts in 8 groups of 20. Group 1 holds six experts at 4.0, but its max (4.0) loses to
    // groups 0 (5.0), 2 (4.5) and 3 (4.25); a plain top-6 would take 3, 45, 70, 110, 20, 21.
    // Weights: full-row softmax probability × 16 (norm_topk_prob = false).
    let z = row(
        160,
        &[
            (3, 5.0),
            (20, 4.0),
            (21, 4.0),
            (22, 4.0),
            (23, 4.0),
            (24, 4.0),
            (25, 4.0),
            (45, 4.5),
            (70, 4.25),
            (110, 4.125),
            (50, 3.0),
            (61, 2.75),
            (10, 2.5),
        ],
    );
    check(
        preset("deepseek-v2").unwrap(),
        &[z],
        &[(
            &[3, 45, 70, 50, 61, 10],
            &[
                3.116924613757152,
                1.8905103422566705,
                1.4723309349540845,
                0.4218298754299938,
                0.32852143730779226,
                0.2558527526310521,
            ],
        )],
    );
}

#[test]
fn deepseek_v2_lite_weights_are_unnormalised_full_row_softmax_probabilities() {
    // Greedy top-6 of 64; the six weights are softmax(z)[i] over all 64 experts (sum < 1).
    let z = row(64, &[(5, 2.0), (17, 1.5), (33, 1.25), (40, 1.0), (63, 0.75), (0, 0.5)]);
    check(
        preset("deepseek-v2-lite").unwrap(),
        &[z],
        &[(
            &[5, 17, 33, 40, 63, 0],
            &[
                0.2614651724381771,
                0.158586643530805,
                0.12350740216645667,
                0.09618766152235139,
                0.0749110261154145,
                0.05834076579936727,
            ],
        )],
    );
}

#[test]
fn deepseek_v3_keeps_four_of_eight_groups_by_sum_of_top2_biased_scores() {
    // 256 experts in 8 groups of 32. Group 0 has the single best expert (logit 3.0, sigmoid .953)
    // but a weak second (.164): sum 1.117 ranks it last of the candidates, so it is dropped while
    // groups 1 (.818 + .777 − .0625 bias), 2 (.731 + .706), 3 (.881 + .622) and 4 (.852 + .769)
    // are kept — a max rule would have kept group 0. Expert 130 (logit −1, sigmoid .269) enters
    // the top-8 only through its bias +0.5, and weighs its unbiased sigmoid:
    // w = sigmoid / (Σ + 1e-20) × 2.5.
    let z = row(
        256,
        &[
            (0, 3.0),
            (32, 1.5),
            (33, 1.25),
            (64, 1.0),
            (65, 0.875),
            (96, 2.0),
            (97, 0.5),
            (128, 1.75),
            (129, 0.25),
            (130, -1.0),
        ],
    );
    let mut cfg = preset("deepseek-v3").unwrap();
    cfg.set_expert_bias(bias(256, &[(130, 0.5), (33, -0.0625)])).unwrap();
    check(
        cfg,
        &[z],
        &[(
            &[96, 128, 32, 130, 64, 33, 65, 97],
            &[
                0.38932882990793166,
                0.376579118868779,
                0.3613832540292037,
                0.11887715288081994,
                0.3231416044948807,
                0.34358111874474156,
                0.31197022097889,
                0.2751387000947535,
            ],
        )],
    );
}

#[test]
fn kimi_k2_selects_on_biased_sigmoid_and_weighs_renormalised_unbiased_sigmoid_times_2_827() {
    // 384 experts, no groups. Expert 250 (logit −2.5) ranks first by its key sigmoid + 1.0 = 1.076
    // but weighs sigmoid(−2.5) = .076 before normalisation; expert 2 (logit 0) falls out through
    // its bias −0.5.
    let z = row(
        384,
        &[
            (7, 2.0),
            (100, 1.5),
            (200, 1.0),
            (300, 0.5),
            (383, 0.25),
            (1, 0.125),
            (2, 0.0),
            (3, -0.25),
            (250, -2.5),
        ],
    );
    let mut cfg = preset("kimi-k2").unwrap();
    cfg.set_expert_bias(bias(384, &[(250, 1.0), (2, -0.5)])).unwrap();
    check(
        cfg,
        &[z],
        &[(
            &[250, 7, 100, 200, 300, 383, 1, 3],
            &[
                0.04602984619072691,
                0.5344572465778886,
                0.4960945197751743,
                0.4435976966666874,
                0.37770095811922194,
                0.3411220498642031,
                0.3223315632489332,
                0.26566611955716424,
            ],
        )],
    );
}

#[test]
fn glm_4_5_selects_top8_on_biased_sigmoid_renormalises_and_scales_by_2_5() {
    // 160 experts, one group. Expert 159 (logit −1.5) is selected through its bias +0.75; expert
    // 80 (logit −0.25) is pushed out by its bias −1.0.
    let z = row(
        160,
        &[
            (10, 2.5),
            (20, 2.0),
            (30, 1.5),
            (40, 1.0),
            (50, 0.5),
            (60, 0.25),
            (70, 0.0),
            (80, -0.25),
            (159, -1.5),
        ],
    );
    let mut cfg = preset("glm-4.5").unwrap();
    cfg.set_expert_bias(bias(160, &[(159, 0.75), (80, -1.0)])).unwrap();
    check(
        cfg,
        &[z],
        &[(
            &[159, 10, 20, 30, 40, 50, 60, 70],
            &[
                0.08735794731227764,
                0.4425429662160226,
                0.42178650840809007,
                0.39151115767660327,
                0.35008136724299377,
                0.2980765428246095,
                0.2692089578249629,
                0.23943455249444046,
            ],
        )],
    );
}

#[test]
fn qwen2_moe_top4_weights_are_unnormalised_softmax_probabilities() {
    let z = row(60, &[(4, 1.5), (9, 1.0), (59, 0.75), (30, 0.5)]);
    check(
        preset("qwen2-moe").unwrap(),
        &[z],
        &[(
            &[4, 9, 59, 30],
            &[
                0.26448136220659046,
                0.16041605510085927,
                0.12493214932977481,
                0.09729725572882232,
            ],
        )],
    );
}

#[test]
fn qwen3_moe_renormalises_top8_softmax_probabilities_to_sum_one() {
    // p_i / Σ_top8 p_j == softmax over the 8 selected logits.
    let z = row(
        128,
        &[
            (1, 2.0),
            (2, 1.75),
            (3, 1.5),
            (64, 1.25),
            (65, 1.0),
            (127, 0.75),
            (100, 0.5),
            (50, 0.25),
        ],
    );
    check(
        preset("qwen3-moe").unwrap(),
        &[z],
        &[(
            &[1, 2, 3, 64, 65, 127, 100, 50],
            &[
                0.2558207969403308,
                0.19923343698308046,
                0.15516315673643044,
                0.12084118797016316,
                0.09411121181844191,
                0.0732938854600014,
                0.05708133539059495,
                0.04445498870095685,
            ],
        )],
    );
}

#[test]
fn qwen3_next_renormalises_top10_of_512_softmax_probabilities() {
    let z = row(
        512,
        &[
            (0, 1.0),
            (511, 1.5),
            (256, 2.0),
            (128, 0.5),
            (384, 0.25),
            (5, 0.125),
            (6, 0.0625),
            (7, 0.0),
            (300, -0.25),
            (301, -0.5),
        ],
    );
    check(
        preset("qwen3-next").unwrap(),
        &[z],
        &[(
            &[256, 511, 0, 128, 384, 5, 6, 7, 300, 301],
            &[
                0.33427461311019346,
                0.20274780161491096,
                0.12297275786877808,
                0.0745867479568319,
                0.058088217715530195,
                0.051262672210615014,
                0.048156823909377096,
                0.04523914944407716,
                0.0352322850125316,
                0.027438931157154536,
            ],
        )],
    );
}

#[test]
fn mixtral_renormalises_top2_softmax_and_breaks_ties_by_lower_expert_id() {
    // Row 0 by hand: top-2 logits 2.0 (expert 1) and 1.5 (expert 5);
    // w = e^2 / (e^2 + e^1.5) = 1 / (1 + e^−0.5) = 0.62245933…, and 1 − that.
    // Row 1: experts 2 and 6 tie at 1.0 → both weigh 0.5, the lower id takes slot 0.
    check(
        preset("mixtral").unwrap(),
        &[
            vec![0.5, 2.0, -1.0, 1.0, 0.0, 1.5, -0.5, 0.25],
            vec![0.0, -1.0, 1.0, 0.5, -2.0, 0.25, 1.0, -0.5],
        ],
        &[
            (&[1, 5], &[0.6224593312018546, 0.37754066879814546]),
            (&[2, 6], &[0.5, 0.5]),
        ],
    );
}

#[test]
fn gpt_oss_120b_takes_top4_logits_then_softmax_over_those_four() {
    let z = row(128, &[(17, 3.0), (90, 2.5), (3, 2.25), (127, 2.0)]);
    check(
        preset("gpt-oss-120b").unwrap(),
        &[z],
        &[(
            &[17, 90, 3, 127],
            &[
                0.4087009733881603,
                0.2478896710143163,
                0.19305666990126247,
                0.15035268569626095,
            ],
        )],
    );
}

#[test]
fn gpt_oss_20b_takes_top4_of_32_logits_then_softmax_over_those_four() {
    let z = row(32, &[(31, 1.0), (0, 0.75), (16, 0.5), (8, 0.375)]);
    check(
        preset("gpt-oss-20b").unwrap(),
        &[z],
        &[(
            &[31, 0, 16, 8],
            &[
                0.34239623393788804,
                0.26665845511152714,
                0.2076738136534684,
                0.18327149729711634,
            ],
        )],
    );
}

#[test]
fn llama4_scout_routes_top1_of_16_with_weight_sigmoid_of_its_logit() {
    // w = sigmoid(0.75) = 1 / (1 + e^−0.75) = 0.67917869…, not normalised to 1.
    check(
        preset("llama4-scout").unwrap(),
        &[row(16, &[(11, 0.75)])],
        &[(&[11], &[0.679178699175393])],
    );
}

#[test]
fn llama4_maverick_routes_top1_of_128_even_when_the_best_logit_is_negative() {
    // w = sigmoid(−0.5) = 0.37754066… (below 0.5: sigmoid weights are not renormalised).
    check(
        preset("llama4-maverick").unwrap(),
        &[row(128, &[(77, -0.5)])],
        &[(&[77], &[0.3775406687981454])],
    );
}

#[test]
fn minimax_m2_selects_on_biased_sigmoid_and_renormalises_unbiased_sigmoid() {
    // Expert 200 (logit −2.0) enters the top-8 through its bias +1.0 and weighs
    // sigmoid(−2) / Σ = .119 / 5.476; expert 15 (logit .25) is pushed out by its bias −0.5.
    let z = row(
        256,
        &[
            (8, 2.0),
            (9, 1.75),
            (10, 1.5),
            (11, 1.25),
            (12, 1.0),
            (13, 0.75),
            (14, 0.5),
            (15, 0.25),
            (200, -2.0),
        ],
    );
    let mut cfg = preset("minimax-m2").unwrap();
    cfg.set_expert_bias(bias(256, &[(200, 1.0), (15, -0.5)])).unwrap();
    check(
        cfg,
        &[z],
        &[(
            &[200, 8, 9, 10, 11, 12, 13, 14],
            &[
                0.021754248634864446,
                0.1607433635530989,
                0.1554793520560615,
                0.14920538969116487,
                0.14185536861841655,
                0.13341644496950236,
                0.1239484908484363,
                0.11359734162845511,
            ],
        )],
    );
}

#[test]
fn olmoe_top8_weights_are_unnormalised_softmax_probabilities() {
    let z = row(
        64,
        &[
            (0, 1.0),
            (8, 0.875),
            (16, 0.75),
            (24, 0.625),
            (32, 0.5),
            (40, 0.375),
            (48, 0.25),
            (56, 0.125),
        ],
    );
    check(
        preset("olmoe").unwrap(),
        &[z],
        &[(
            &[0, 8, 16, 24, 32, 40, 48, 56],
            &[
                0.13162812113616865,
                0.11616140919569876,
                0.1025120838150659,
                0.09046659644428809,
                0.0798364911494548,
                0.07045545615261634,
                0.062176721824868685,
                0.054870764423310625,
            ],
        )],
    );
}

#[test]
fn every_preset_has_a_golden_case() {
    // Keep this list in step with the tests above.
    let covered = [
        "deepseek-v2",
        "deepseek-v2-lite",
        "deepseek-v3",
        "kimi-k2",
        "glm-4.5",
        "qwen2-moe",
        "qwen3-moe",
        "qwen3-next",
        "mixtral",
        "gpt-oss-120b",
        "gpt-oss-20b",
        "llama4-scout",
        "llama4-maverick",
        "minimax-m2",
        "olmoe",
    ];
    for name in moe_router::preset_names() {
        assert!(covered.contains(name), "preset {name} has no golden case");
    }
}
