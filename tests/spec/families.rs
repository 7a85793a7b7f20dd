//! Model families of Hugging Face transformers 5.x beyond the first presets: each routes from its
//! `config.json` (`tests/fixtures/hf/<family>.json`, real key names and the family's defaults),
//! nested `text_config` of vision-language wrappers included, and reproduces a golden case
//! derived from the family's modeling code by `tests/fixtures/golden_derive_families.py` (plain
//! Python f64, no call into this crate): ids exactly, weights within 1e-6 relative. Families whose
//! router is not expressible exactly are refused with their reason; unknown types still list the
//! supported ones. Logits follow golden.rs: `base(i) = -3 + ((37 i) mod 23) / 16`, a few experts
//! overridden, every value a multiple of 1/16.
//!
//! Softmax with a selection bias (ERNIE-4.5, LongCat-Flash) is a rule of its own: the key is the
//! probability plus the bias, the weights the unbiased probabilities; the CPU and wgpu backends
//! compute it bit for bit as the reference does, forward and backward.

use crate::conformance::{self, Backend};
use moe_router::Router;
use moe_router::import::hf::{
    REFUSED_MODEL_TYPES, SUPPORTED_MODEL_TYPES, hf_moe_layers, hf_moe_layers_value, import_hf,
};
use moe_router::{
    ConfigError, GroupLimit, GroupScore, LogitsRef, LossGrads, Normalization, Numerics, ReferenceRouter, RouteError,
    RouterConfig, ScoreFunction, SoftmaxPosition,
};
use ndarray::Array2;
use serde_json::{Value, json};

const DEEPSEEK_V32: &str = include_str!("../fixtures/hf/deepseek_v32.json");
const GLM4V_MOE: &str = include_str!("../fixtures/hf/glm4v_moe.json");
const QWEN3_VL_MOE: &str = include_str!("../fixtures/hf/qwen3_vl_moe.json");
const QWEN3_OMNI_MOE: &str = include_str!("../fixtures/hf/qwen3_omni_moe.json");
const DOTS1: &str = include_str!("../fixtures/hf/dots1.json");
const FLEX_OLMO: &str = include_str!("../fixtures/hf/flex_olmo.json");
const JAMBA: &str = include_str!("../fixtures/hf/jamba.json");
const HUNYUAN_V1_MOE: &str = include_str!("../fixtures/hf/hunyuan_v1_moe.json");
const DBRX: &str = include_str!("../fixtures/hf/dbrx.json");
const GRANITEMOE: &str = include_str!("../fixtures/hf/granitemoe.json");
const GRANITEMOESHARED: &str = include_str!("../fixtures/hf/granitemoeshared.json");
const GRANITEMOEHYBRID: &str = include_str!("../fixtures/hf/granitemoehybrid.json");
const JETMOE: &str = include_str!("../fixtures/hf/jetmoe.json");
const LFM2_MOE: &str = include_str!("../fixtures/hf/lfm2_moe.json");
const PHIMOE: &str = include_str!("../fixtures/hf/phimoe.json");
const ERNIE4_5_MOE: &str = include_str!("../fixtures/hf/ernie4_5_moe.json");
const MINIMAX: &str = include_str!("../fixtures/hf/minimax.json");
const LONGCAT_FLASH: &str = include_str!("../fixtures/hf/longcat_flash.json");
const ERNIE4_5_VL_MOE: &str = include_str!("../fixtures/hf/ernie4_5_vl_moe.json");
const ARIA: &str = include_str!("../fixtures/hf/aria.json");
const AFMOE: &str = include_str!("../fixtures/hf/afmoe.json");
const NEMOTRON_H: &str = include_str!("../fixtures/hf/nemotron_h.json");
const GLM4_MOE_LITE: &str = include_str!("../fixtures/hf/glm4_moe_lite.json");
const GLM_MOE_DSA: &str = include_str!("../fixtures/hf/glm_moe_dsa.json");
const SOLAR_OPEN: &str = include_str!("../fixtures/hf/solar_open.json");
const EXAONE_MOE: &str = include_str!("../fixtures/hf/exaone_moe.json");
const MISTRAL4: &str = include_str!("../fixtures/hf/mistral4.json");
const QWEN3_5_MOE: &str = include_str!("../fixtures/hf/qwen3_5_moe.json");
const BAILING_MOE: &str = include_str!("../fixtures/hf/bailing_moe.json");
const BAILING_MOE_V2: &str = include_str!("../fixtures/hf/bailing_moe_v2.json");

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

fn hf(json: &str) -> RouterConfig {
    RouterConfig::from_hf_config(json).unwrap_or_else(|e| panic!("import failed: {e}"))
}

fn hf_value(v: Value) -> Result<RouterConfig, ConfigError> {
    RouterConfig::from_hf_config_value(&v)
}

/// The fixture with `edit` applied to the object at `path` (empty: the top level).
fn edited(json: &str, path: &[&str], edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut v: Value = serde_json::from_str(json).unwrap();
    let mut o = &mut v;
    for p in path {
        o = o.get_mut(*p).unwrap();
    }
    edit(o.as_object_mut().unwrap());
    v
}

/// Qwen3-Omni's thinker text config, on its own.
fn flat_omni(json: &str) -> Value {
    serde_json::from_str::<Value>(json).unwrap()["thinker_config"]["text_config"].clone()
}

fn bad_key(r: Result<RouterConfig, ConfigError>) -> (String, String) {
    match r {
        Err(ConfigError::BadKey { key, reason, .. }) => (key, reason),
        other => panic!("expected BadKey, got {other:?}"),
    }
}

/// Routes `rows` with the reference router (portable mode) and checks ids exactly and weights
/// within 1e-6 relative; replaying the ids must give the same weight bits.
fn check(cfg: RouterConfig, rows: &[Vec<f32>], expected: &[(&[u32], &[f64])]) {
    check_within(cfg, rows, expected, 1e-6);
}

/// [`check`] with a relative weight tolerance `tol`.
fn check_within(cfg: RouterConfig, rows: &[Vec<f32>], expected: &[(&[u32], &[f64])], tol: f64) {
    assert_eq!(cfg.numerics(), Numerics::Portable);
    assert_eq!(rows.len(), expected.len());
    let e = cfg.num_experts();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let logits = Array2::from_shape_vec((rows.len(), e), flat).unwrap();
    let router = ReferenceRouter::new(cfg);
    let (ids, w) = router.route_host(&LogitsRef::F32(logits.view())).unwrap();
    let w = w.to_f64();
    for (r, (want_ids, want_w)) in expected.iter().enumerate() {
        assert_eq!(ids.row(r).to_vec(), want_ids.to_vec(), "row {r} ids");
        assert_eq!(w.row(r).len(), want_w.len(), "row {r} slots");
        for (j, (&got, &want)) in w.row(r).iter().zip(want_w.iter()).enumerate() {
            let rel = ((got - want) / want).abs();
            assert!(rel <= tol, "row {r} slot {j}: got {got}, want {want} (rel {rel:e})");
        }
    }
    let replayed = router.weights_host(&LogitsRef::F32(logits.view()), ids.view()).unwrap();
    assert_eq!(
        replayed.to_f64().mapv(f64::to_bits),
        w.mapv(f64::to_bits),
        "replayed weights differ"
    );
}

// ---------------------------------------------------------------------------------------------
// Golden cases, one per newly supported family (values: golden_derive_families.py)
// ---------------------------------------------------------------------------------------------

#[test]
fn deepseek_v3_2_keeps_the_v3_gate_four_of_eight_groups_by_top2_sum_renormalised_times_2_5() {
    // Group 7 has the best expert (224, logit 2.5) but a weak second: dropped by the
    // sum-of-top-2 rule. Expert 70 (logit −1) enters only through its bias +0.5.
    let imp = import_hf(DEEPSEEK_V32).unwrap();
    assert!(imp.expects_expert_bias);
    assert_eq!(imp.bias_tensor(), Some("e_score_correction_bias"));
    let mut cfg = imp.config;
    assert_eq!(
        cfg.group_limit(),
        Some(GroupLimit {
            num_groups: 8,
            groups_selected: 4,
            score: GroupScore::SumTopN(2)
        })
    );
    cfg.set_expert_bias(bias(256, &[(70, 0.5)])).unwrap();
    let z = row(
        256,
        &[
            (224, 2.5),
            (32, 1.5),
            (33, 1.25),
            (64, 1.0),
            (65, 0.875),
            (96, 2.0),
            (97, 0.5),
            (128, 1.75),
            (129, 0.25),
            (70, -1.0),
        ],
    );
    check(
        cfg,
        &[z],
        &[(
            &[96, 128, 32, 33, 70, 64, 65, 97],
            &[
                0.38932882990793166,
                0.376579118868779,
                0.3613832540292037,
                0.34358111874474156,
                0.11887715288081994,
                0.3231416044948807,
                0.31197022097889,
                0.2751387000947535,
            ],
        )],
    );
}

#[test]
fn glm_4_5v_reads_text_config_and_selects_on_biased_sigmoid_renormalised_with_scale_1() {
    let imp = import_hf(GLM4V_MOE).unwrap();
    assert_eq!(imp.model_type, "glm4v_moe");
    assert!(imp.expects_expert_bias);
    let mut cfg = imp.config;
    assert_eq!((cfg.num_experts(), cfg.top_k()), (128, 8));
    assert_eq!(cfg.score(), ScoreFunction::Sigmoid);
    assert_eq!(cfg.group_limit(), None, "one group is no limit");
    assert_eq!(cfg.normalization(), Normalization::Sum { eps: 1e-20 });
    assert_eq!(cfg.scaling_factor(), 1.0);
    cfg.set_expert_bias(bias(128, &[(127, 0.75), (3, -1.0)])).unwrap();
    let z = row(
        128,
        &[
            (0, 2.5),
            (16, 2.0),
            (32, 1.5),
            (48, 1.0),
            (64, 0.75),
            (80, 0.5),
            (96, 0.375),
            (3, 0.25),
            (127, -1.5),
        ],
    );
    check(
        cfg,
        &[z],
        &[(
            &[127, 0, 16, 32, 48, 64, 80, 96],
            &[
                0.033593991681227904,
                0.17018239534066465,
                0.16220038234259312,
                0.15055782534678697,
                0.1346257656086333,
                0.1250719915398721,
                0.11462701686686444,
                0.10914063127335753,
            ],
        )],
    );
}

#[test]
fn dots1_selects_top6_on_biased_sigmoid_renormalises_and_scales_by_2_5() {
    let imp = import_hf(DOTS1).unwrap();
    assert!(imp.expects_expert_bias);
    let mut cfg = imp.config;
    assert_eq!((cfg.num_experts(), cfg.top_k(), cfg.scaling_factor()), (128, 6, 2.5));
    cfg.set_expert_bias(bias(128, &[(100, 1.0)])).unwrap();
    let z = row(
        128,
        &[
            (5, 2.0),
            (6, 1.5),
            (7, 1.0),
            (8, 0.5),
            (9, 0.25),
            (10, 0.125),
            (100, -2.0),
        ],
    );
    check(
        cfg,
        &[z],
        &[(
            &[100, 5, 6, 7, 8, 9],
            &[
                0.07982476325241296,
                0.5898296537559372,
                0.5474923592163617,
                0.4895566062714291,
                0.4168326405473855,
                0.37646397695647343,
            ],
        )],
    );
}

#[test]
fn qwen3_vl_moe_reads_text_config_and_always_renormalises_its_top8_softmax() {
    // The router divides by the sum whatever norm_topk_prob says; row 1 ties experts 10 and 20.
    let cfg = hf(QWEN3_VL_MOE);
    assert_eq!((cfg.num_experts(), cfg.top_k()), (128, 8));
    let off = hf_value(edited(QWEN3_VL_MOE, &["text_config"], |m| {
        m.insert("norm_topk_prob".into(), json!(false));
    }))
    .unwrap();
    assert_eq!(off, cfg, "norm_topk_prob is not read by the Qwen3-VL-MoE router");
    check(
        cfg,
        &[
            row(
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
            ),
            row(
                128,
                &[
                    (10, 1.0),
                    (20, 1.0),
                    (30, 0.875),
                    (40, 0.75),
                    (50, 0.625),
                    (60, 0.5),
                    (70, 0.375),
                    (80, 0.3125),
                ],
            ),
        ],
        &[
            (
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
            ),
            (
                &[10, 20, 30, 40, 50, 60, 70, 80],
                &[
                    0.16685547390674993,
                    0.16685547390674993,
                    0.14724943890199158,
                    0.12994717373832718,
                    0.11467797832369604,
                    0.10120296066532512,
                    0.08931129931954007,
                    0.08390020123762021,
                ],
            ),
        ],
    );
}

#[test]
fn minimax_text_01_renormalises_its_top2_softmax_like_mixtral() {
    // w = 1 / (1 + e^(−0.25 − 0.5)) = sigmoid(0.75) = 0.67917869…
    let cfg = hf(MINIMAX);
    assert_eq!((cfg.num_experts(), cfg.top_k()), (32, 2));
    check(
        cfg,
        &[row(32, &[(20, 0.5), (4, -0.25)])],
        &[(&[20, 4], &[0.679178699175393, 0.320821300824607])],
    );
}

#[test]
fn qwen3_omni_moe_reads_the_thinkers_text_config_and_renormalises_its_top8_softmax() {
    // The thinker (thinker_config.text_config) is the text model; the talker's MoE (top-6, not
    // renormalised in the fixture) is not what the import reads.
    let cfg = hf(QWEN3_OMNI_MOE);
    assert_eq!((cfg.num_experts(), cfg.top_k()), (128, 8));
    // Qwen3OmniMoeTextConfig's norm_topk_prob default is true.
    let default = hf_value(edited(QWEN3_OMNI_MOE, &["thinker_config", "text_config"], |m| {
        m.remove("norm_topk_prob");
    }))
    .unwrap();
    assert_eq!(default, cfg);
    check(
        cfg,
        &[row(
            128,
            &[
                (127, 1.5),
                (0, 1.25),
                (64, 1.0),
                (32, 0.875),
                (96, 0.75),
                (16, 0.5),
                (48, 0.25),
                (80, 0.125),
            ],
        )],
        &[(
            &[127, 0, 64, 32, 96, 16, 48, 80],
            &[
                0.23254822876848835,
                0.1811087426667669,
                0.14104763060995562,
                0.12447409713018202,
                0.1098480051693997,
                0.08554971244476021,
                0.06662618304351275,
                0.05879740016693431,
            ],
        )],
    );
}

#[test]
fn flex_olmo_top5_of_7_weights_are_unnormalised_softmax_probabilities() {
    let cfg = hf(FLEX_OLMO);
    assert_eq!(cfg.softmax_position(), SoftmaxPosition::BeforeTopK);
    assert_eq!(cfg.normalization(), Normalization::None);
    check(
        cfg,
        &[vec![0.5, -1.0, 1.25, 0.0, 2.0, -0.5, 0.75]],
        &[(
            &[4, 2, 6, 0, 3],
            &[
                0.4446007739849365,
                0.21001453495325148,
                0.12738025443443754,
                0.09920384190137474,
                0.060170171674468614,
            ],
        )],
    );
}

#[test]
fn jamba_top2_of_16_weights_are_unnormalised_softmax_probabilities() {
    let cfg = hf(JAMBA);
    assert_eq!(cfg.normalization(), Normalization::None);
    assert_eq!(cfg.softmax_position(), SoftmaxPosition::BeforeTopK);
    check(
        cfg,
        &[row(16, &[(3, 1.5), (12, 1.25)])],
        &[(&[3, 12], &[0.4783088186816565, 0.37250728253923265])],
    );
}

#[test]
fn hunyuan_moe_always_renormalises_its_moe_topk_softmax_probabilities() {
    let cfg = hf(HUNYUAN_V1_MOE);
    assert_eq!((cfg.num_experts(), cfg.top_k()), (64, 8));
    check(
        cfg,
        &[row(
            64,
            &[
                (0, 1.0),
                (9, 0.875),
                (18, 0.75),
                (27, 0.625),
                (36, 0.5),
                (45, 0.375),
                (54, 0.25),
                (63, 0.125),
            ],
        )],
        &[(
            &[0, 9, 18, 27, 36, 45, 54, 63],
            &[
                0.18588716309616743,
                0.16404484566260527,
                0.14476906818221713,
                0.12775825426086473,
                0.11274626366482832,
                0.09949822846219711,
                0.08780687843054336,
                0.07748929824057664,
            ],
        )],
    );
}

#[test]
fn dbrx_reads_ffn_config_and_divides_its_top4_softmax_by_the_l1_norm() {
    let cfg = hf(DBRX);
    assert_eq!((cfg.num_experts(), cfg.top_k()), (16, 4));
    check(
        cfg,
        &[row(16, &[(15, 2.0), (0, 1.0), (7, 0.5), (8, 0.25)])],
        &[(
            &[15, 0, 7, 8],
            &[
                0.566641729498984,
                0.20845584279250579,
                0.12643485984989153,
                0.09846756785861885,
            ],
        )],
    );
}

#[test]
fn granite_moe_takes_top8_of_40_logits_then_softmax_over_those_eight() {
    let cfg = hf(GRANITEMOE);
    assert_eq!(cfg.softmax_position(), SoftmaxPosition::AfterTopK);
    check(
        cfg,
        &[row(
            40,
            &[
                (39, 1.5),
                (0, 1.25),
                (20, 1.0),
                (10, 0.75),
                (30, 0.5),
                (5, 0.25),
                (15, 0.125),
                (25, 0.0),
            ],
        )],
        &[(
            &[39, 0, 20, 10, 30, 5, 15, 25],
            &[
                0.2507489878844086,
                0.19528350811873962,
                0.15208694904380546,
                0.11844543501025655,
                0.092245397537221,
                0.07184078783672075,
                0.06339927274514313,
                0.055949661823704776,
            ],
        )],
    );
}

#[test]
fn granite_moe_shared_takes_top8_logits_then_softmax_and_breaks_ties_by_lower_id() {
    check(
        hf(GRANITEMOESHARED),
        &[row(
            32,
            &[
                (31, 2.0),
                (1, 1.0),
                (2, 1.0),
                (3, 0.5),
                (4, 0.25),
                (5, 0.125),
                (6, 0.0625),
                (7, 0.0),
            ],
        )],
        &[(
            &[31, 1, 2, 3, 4, 5, 6, 7],
            &[
                0.38980019267058374,
                0.1433994770481749,
                0.1433994770481749,
                0.08697617941647616,
                0.06773711663811065,
                0.0597777956231441,
                0.056156042074575786,
                0.05275371948075966,
            ],
        )],
    );
}

#[test]
fn granite_moe_hybrid_takes_top10_of_72_logits_then_softmax_over_those_ten() {
    check(
        hf(GRANITEMOEHYBRID),
        &[row(
            72,
            &[
                (71, 1.0),
                (70, 0.875),
                (60, 0.75),
                (50, 0.625),
                (40, 0.5),
                (30, 0.375),
                (20, 0.25),
                (10, 0.125),
                (0, 0.0),
                (35, -0.125),
            ],
        )],
        &[(
            &[71, 70, 60, 50, 40, 30, 20, 10, 0, 35],
            &[
                0.16468659760895377,
                0.14533541228709734,
                0.12825805117921854,
                0.11318733289719687,
                0.09988747069358772,
                0.08815038349410072,
                0.07779244039518812,
                0.06865158769325028,
                0.060584813496808096,
                0.053465910254598535,
            ],
        )],
    );
}

#[test]
fn jetmoe_takes_top2_of_8_logits_then_softmax_over_those_two() {
    // w = 1 / (1 + e^(1.0 − 1.5)) = 0.62245933…
    check(
        hf(JETMOE),
        &[vec![0.25, -0.5, 1.5, 0.75, -1.0, 0.0, 1.0, -0.25]],
        &[(&[2, 6], &[0.6224593312018546, 0.37754066879814546])],
    );
}

#[test]
fn lfm2_moe_selects_on_sigmoid_plus_expert_bias_and_renormalises_with_1e_6() {
    let imp = import_hf(LFM2_MOE).unwrap();
    assert!(imp.expects_expert_bias);
    assert_eq!(imp.bias_tensor(), Some("expert_bias"));
    let mut cfg = imp.config;
    assert_eq!(cfg.score(), ScoreFunction::Sigmoid);
    assert_eq!(cfg.normalization(), Normalization::Sum { eps: 1e-6 });
    cfg.set_expert_bias(bias(32, &[(31, 1.0), (3, -1.0)])).unwrap();
    check(
        cfg,
        &[row(32, &[(0, 2.0), (1, 1.5), (2, 1.0), (3, 0.5), (31, -2.0)])],
        &[(
            &[31, 0, 1, 2],
            &[
                0.046771297666885224,
                0.34559574228039913,
                0.3207892771605515,
                0.2868432905251241,
            ],
        )],
    );
}

// ---------------------------------------------------------------------------------------------
// Keys and defaults
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_routing_keys_take_each_new_familys_transformers_defaults() {
    // Dots1Config: n_group 1, norm_topk_prob false, routed_scaling_factor 1.
    let c = hf_value(json!({"model_type": "dots1", "n_routed_experts": 128, "num_experts_per_tok": 6})).unwrap();
    assert_eq!(
        (c.group_limit(), c.normalization(), c.scaling_factor()),
        (None, Normalization::None, 1.0)
    );
    // Glm4vMoeTextConfig: renormalised, scale 1.
    let c = hf_value(
        json!({"model_type": "glm4v_moe", "text_config": {"n_routed_experts": 128, "num_experts_per_tok": 8}}),
    )
    .unwrap();
    assert_eq!(
        (c.normalization(), c.scaling_factor()),
        (Normalization::Sum { eps: 1e-20 }, 1.0)
    );
    // DeepSeek-V3.2 has DeepseekV3Config's defaults: 8 groups keep 4, renormalised, x 2.5.
    let c = hf_value(json!({"model_type": "deepseek_v32", "n_routed_experts": 256, "num_experts_per_tok": 8})).unwrap();
    assert_eq!(c, hf(DEEPSEEK_V32));
    // Lfm2MoeConfig: expert bias on, renormalised (1e-6), scale 1.
    let i = import_hf(r#"{"model_type": "lfm2_moe", "num_experts": 32, "num_experts_per_tok": 4}"#).unwrap();
    assert!(i.expects_expert_bias);
    assert_eq!(i.config, hf(LFM2_MOE));
    // DbrxFFNConfig: moe_normalize_expert_weights 1.
    let c = hf_value(json!({"model_type": "dbrx", "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4, "moe_normalize_expert_weights": 1}}))
        .unwrap();
    assert_eq!(c, hf(DBRX));
}

#[test]
fn lfm2_moe_without_expert_bias_selects_on_plain_sigmoid_and_may_skip_normalisation() {
    let imp = import_hf(
        &edited(LFM2_MOE, &[], |m| {
            m.insert("use_expert_bias".into(), json!(false));
            m.insert("norm_topk_prob".into(), json!(false));
            m.insert("routed_scaling_factor".into(), json!(2.0));
        })
        .to_string(),
    )
    .unwrap();
    assert!(!imp.expects_expert_bias);
    assert_eq!(imp.bias_tensor(), None);
    assert!(!imp.config.has_bias());
    assert_eq!(imp.config.normalization(), Normalization::None);
    assert_eq!(imp.config.scaling_factor(), 2.0);
}

#[test]
fn dbrx_null_normalisation_means_none_and_a_p_norm_other_than_1_is_refused() {
    let c = hf_value(edited(DBRX, &["ffn_config"], |m| {
        m.insert("moe_normalize_expert_weights".into(), Value::Null);
    }))
    .unwrap();
    assert_eq!(c.normalization(), Normalization::None);
    assert_eq!(c.softmax_position(), SoftmaxPosition::BeforeTopK);
    let (key, reason) = bad_key(hf_value(edited(DBRX, &["ffn_config"], |m| {
        m.insert("moe_normalize_expert_weights".into(), json!(2.0));
    })));
    assert_eq!(key, "ffn_config.moe_normalize_expert_weights");
    assert!(reason.contains("p-norm"), "{reason}");
    let (key, _) = bad_key(hf_value(edited(DBRX, &["ffn_config"], |m| {
        m.insert("moe_top_k".into(), json!(17));
    })));
    assert_eq!(key, "ffn_config.moe_top_k");
    assert!(matches!(
        hf_value(json!({"model_type": "dbrx", "n_layers": 40})),
        Err(ConfigError::MissingKey { ref key, .. }) if key == "ffn_config"
    ));
}

#[test]
fn hunyuan_per_layer_lists_are_accepted_only_when_every_layer_has_the_same_value() {
    let c = hf_value(edited(HUNYUAN_V1_MOE, &[], |m| {
        m.insert("moe_topk".into(), json!([8, 8, 8]));
    }))
    .unwrap();
    assert_eq!(c, hf(HUNYUAN_V1_MOE));
    let (key, reason) = bad_key(hf_value(edited(HUNYUAN_V1_MOE, &[], |m| {
        m.insert("num_experts".into(), json!([64, 32]));
    })));
    assert_eq!(key, "num_experts");
    assert!(reason.contains("differ"), "{reason}");
    let (key, _) = bad_key(hf_value(edited(HUNYUAN_V1_MOE, &[], |m| {
        m.insert("moe_topk".into(), json!(65));
    })));
    assert_eq!(key, "moe_topk");
    assert!(matches!(
        hf_value(json!({"model_type": "hunyuan_v1_moe", "num_experts": 64})),
        Err(ConfigError::MissingKey { ref key, .. }) if key == "moe_topk"
    ));
}

#[test]
fn nested_text_configs_are_resolved_and_their_errors_name_the_nested_key() {
    // The text model's own model_type is accepted flat, with the same rule.
    let flat = |json: &str| -> Value { serde_json::from_str::<Value>(json).unwrap()["text_config"].clone() };
    assert_eq!(hf_value(flat(QWEN3_VL_MOE)).unwrap(), hf(QWEN3_VL_MOE));
    assert_eq!(hf_value(flat(GLM4V_MOE)).unwrap(), hf(GLM4V_MOE));
    assert!(matches!(
        hf_value(json!({"model_type": "qwen3_vl_moe", "vision_config": {}})),
        Err(ConfigError::MissingKey { ref key, .. }) if key == "text_config"
    ));
    let (key, reason) = bad_key(hf_value(edited(GLM4V_MOE, &["text_config"], |m| {
        m.insert("model_type".into(), json!("glm4_moe"));
    })));
    assert_eq!(key, "text_config.model_type", "{reason}");
    let (key, _) = bad_key(hf_value(edited(QWEN3_VL_MOE, &["text_config"], |m| {
        m.insert("num_experts_per_tok".into(), json!(129));
    })));
    assert_eq!(key, "text_config.num_experts_per_tok");
    // Two levels down: Qwen3-Omni's thinker.
    assert!(matches!(
        hf_value(json!({"model_type": "qwen3_omni_moe", "thinker_config": {}})),
        Err(ConfigError::MissingKey { ref key, .. }) if key == "thinker_config.text_config"
    ));
    assert!(matches!(
        hf_value(json!({"model_type": "qwen3_omni_moe"})),
        Err(ConfigError::MissingKey { ref key, .. }) if key == "thinker_config"
    ));
    let (key, _) = bad_key(hf_value(edited(
        QWEN3_OMNI_MOE,
        &["thinker_config", "text_config"],
        |m| {
            m.insert("num_experts".into(), json!("many"));
        },
    )));
    assert_eq!(key, "thinker_config.text_config.num_experts");
    let (key, _) = bad_key(hf_value(edited(
        QWEN3_OMNI_MOE,
        &["thinker_config", "text_config"],
        |m| {
            m.insert("model_type".into(), json!("qwen3_omni_moe_talker_text"));
        },
    )));
    assert_eq!(key, "thinker_config.text_config.model_type");
    assert_eq!(hf_value(flat_omni(QWEN3_OMNI_MOE)).unwrap(), hf(QWEN3_OMNI_MOE));
}

#[test]
fn granite_moe_hybrid_with_zero_experts_is_a_dense_checkpoint_and_is_refused() {
    let (key, reason) = bad_key(hf_value(edited(GRANITEMOEHYBRID, &[], |m| {
        m.insert("num_local_experts".into(), json!(0));
    })));
    assert_eq!(key, "num_local_experts");
    assert!(reason.contains("dense"), "{reason}");
    let err = hf_moe_layers_value(&edited(GRANITEMOEHYBRID, &[], |m| {
        m.insert("num_local_experts".into(), json!(0));
    }))
    .unwrap_err();
    assert!(matches!(err, ConfigError::BadKey { ref key, .. } if key == "num_local_experts"));
}

// ---------------------------------------------------------------------------------------------
// Refused and unknown families
// ---------------------------------------------------------------------------------------------

#[test]
fn phimoe_is_refused_because_sparsemixer_is_not_a_top_k_rule() {
    for r in [
        RouterConfig::from_hf_config(PHIMOE).map(|_| ()),
        hf_moe_layers(PHIMOE).map(|_| ()),
    ] {
        match r {
            Err(ConfigError::BadKey { key, reason, .. }) => {
                assert_eq!(key, "model_type");
                assert!(reason.contains("SparseMixer"), "{reason}");
                assert!(
                    reason.contains("jamba") && reason.contains("dbrx"),
                    "lists supported: {reason}"
                );
            }
            other => panic!("expected BadKey, got {other:?}"),
        }
    }
}

#[test]
fn switch_transformers_nllb_moe_and_doge_are_refused_with_their_reason() {
    let cases = [
        (
            json!({"model_type": "switch_transformers", "num_experts": 8, "expert_capacity": 64, "num_layers": 12}),
            "expert_capacity",
        ),
        (
            json!({"model_type": "nllb-moe", "num_experts": 128, "second_expert_policy": "all"}),
            "second_expert_policy",
        ),
        (
            json!({"model_type": "doge", "num_experts": 16384, "num_experts_per_tok": 64}),
            "product keys",
        ),
    ];
    for (v, why) in cases {
        for err in [hf_value(v.clone()).err(), hf_moe_layers_value(&v).err()] {
            match err {
                Some(ConfigError::BadKey { key, reason, .. }) => {
                    assert_eq!(key, "model_type");
                    assert!(reason.contains(why), "{reason}");
                    assert!(reason.contains("mixtral"), "lists supported: {reason}");
                }
                other => panic!("expected BadKey, got {other:?}"),
            }
        }
    }
}

#[test]
fn refused_families_are_not_in_the_supported_list_and_unknown_types_list_the_new_ones() {
    for (mt, why) in REFUSED_MODEL_TYPES {
        assert!(!SUPPORTED_MODEL_TYPES.contains(mt), "{mt}");
        assert!(why.len() > 40, "{mt} needs a reason, not a word");
    }
    // A MoE family removed from transformers 5 (GPTSAN-japanese, a Switch-style top-1 router) is
    // unknown, not guessed.
    let err = RouterConfig::from_hf_config(r#"{"model_type": "gptsan-japanese", "num_experts": 16}"#).unwrap_err();
    assert!(matches!(err, ConfigError::UnsupportedModelType { ref found, .. } if found == "gptsan-japanese"));
    let msg = err.to_string();
    for mt in [
        "deepseek_v32",
        "glm4v_moe",
        "qwen3_vl_moe",
        "qwen3_omni_moe",
        "dots1",
        "flex_olmo",
        "jamba",
        "hunyuan_v1_moe",
        "minimax",
        "dbrx",
        "granitemoe",
        "granitemoeshared",
        "granitemoehybrid",
        "jetmoe",
        "lfm2_moe",
        "ernie4_5_moe",
        "ernie4_5_vl_moe",
        "longcat_flash",
        "aria",
        "afmoe",
        "nemotron_h",
        "glm4_moe_lite",
        "glm_moe_dsa",
        "solar_open",
        "exaone_moe",
        "mistral4",
        "qwen3_5_moe",
        "bailing_moe",
        "bailing_moe_v2",
    ] {
        assert!(SUPPORTED_MODEL_TYPES.contains(&mt), "{mt}");
        assert!(msg.contains(mt), "{mt} missing from: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// MoE layers
// ---------------------------------------------------------------------------------------------

fn ids(r: std::ops::RangeInclusive<u32>) -> Vec<u32> {
    r.collect()
}

#[test]
fn moe_layer_ids_of_the_new_families_follow_each_familys_rule() {
    let cases: Vec<(&str, &str, Vec<u32>, Vec<u32>)> = vec![
        // V3 rule: 3 dense layers, one MTP block after 61 decoder layers.
        ("deepseek_v32", DEEPSEEK_V32, ids(3..=60), vec![61]),
        // text_config: first_k_dense_replace 1 of 46.
        ("glm4v_moe", GLM4V_MOE, ids(1..=45), vec![]),
        // text_config: Qwen rule, every layer.
        ("qwen3_vl_moe", QWEN3_VL_MOE, ids(0..=47), vec![]),
        // thinker_config.text_config: 48 layers (the talker's 20 are not counted).
        ("qwen3_omni_moe", QWEN3_OMNI_MOE, ids(0..=47), vec![]),
        ("dots1", DOTS1, ids(1..=61), vec![]),
        ("flex_olmo", FLEX_OLMO, ids(0..=31), vec![]),
        // Jamba: odd layers (period 2, offset 1).
        ("jamba", JAMBA, (0..16).map(|i| 2 * i + 1).collect(), vec![]),
        ("hunyuan_v1_moe", HUNYUAN_V1_MOE, ids(0..=31), vec![]),
        // DBRX counts its blocks in n_layers.
        ("dbrx", DBRX, ids(0..=39), vec![]),
        ("minimax", MINIMAX, ids(0..=79), vec![]),
        ("granitemoe", GRANITEMOE, ids(0..=31), vec![]),
        ("granitemoeshared", GRANITEMOESHARED, ids(0..=23), vec![]),
        ("granitemoehybrid", GRANITEMOEHYBRID, ids(0..=39), vec![]),
        ("jetmoe", JETMOE, ids(0..=23), vec![]),
        // LFM2: num_dense_layers 2.
        ("lfm2_moe", LFM2_MOE, ids(2..=23), vec![]),
        // ERNIE: moe_layer_start_index 1 ..= moe_layer_end_index 27, every layer (interval 1).
        ("ernie4_5_moe", ERNIE4_5_MOE, ids(1..=27), vec![]),
        // ERNIE-VL text_config: default mlp_layer_types, the first layer dense.
        ("ernie4_5_vl_moe", ERNIE4_5_VL_MOE, ids(1..=27), vec![]),
        // LongCat: num_layers 28 (num_hidden_layers counts the attention sublayers).
        ("longcat_flash", LONGCAT_FLASH, ids(0..=27), vec![]),
        ("aria", ARIA, ids(0..=27), vec![]),
        ("afmoe", AFMOE, ids(2..=31), vec![]),
        // Nemotron-H: the 'E' blocks of hybrid_override_pattern.
        (
            "nemotron_h",
            NEMOTRON_H,
            vec![
                1, 3, 6, 8, 10, 13, 15, 17, 20, 22, 24, 27, 29, 31, 34, 36, 38, 40, 43, 45, 47, 49, 51,
            ],
            vec![],
        ),
        // GLM-4.7-Flash: one dense layer, one MTP block after 47 layers.
        ("glm4_moe_lite", GLM4_MOE_LITE, ids(1..=46), vec![47]),
        // GLM-5: three dense layers, one MTP block after 78 layers.
        ("glm_moe_dsa", GLM_MOE_DSA, ids(3..=77), vec![78]),
        ("solar_open", SOLAR_OPEN, ids(0..=47), vec![]),
        ("exaone_moe", EXAONE_MOE, ids(1..=47), vec![]),
        ("mistral4", MISTRAL4, ids(0..=35), vec![]),
        ("qwen3_5_moe", QWEN3_5_MOE, ids(0..=39), vec![]),
        ("bailing_moe", BAILING_MOE, ids(0..=27), vec![]),
        ("bailing_moe_v2", BAILING_MOE_V2, ids(1..=19), vec![]),
    ];
    for (name, json, layers, mtp) in cases {
        let m = hf_moe_layers(json).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.model_type, name);
        assert_eq!(m.layers, layers, "{name}");
        assert_eq!(m.mtp_layers, mtp, "{name}");
    }
}

#[test]
fn moe_layer_ids_honour_jamba_periods_dense_prefixes_and_nested_sparse_steps() {
    let m = |v: Value| hf_moe_layers_value(&v).unwrap().layers;
    assert_eq!(
        m(json!({"model_type": "jamba", "num_hidden_layers": 8, "expert_layer_period": 4, "expert_layer_offset": 2})),
        vec![2, 6]
    );
    // Jamba's class defaults: period 2, offset 1.
    assert_eq!(m(json!({"model_type": "jamba", "num_hidden_layers": 4})), vec![1, 3]);
    assert_eq!(m(json!({"model_type": "lfm2_moe", "num_hidden_layers": 4})), vec![2, 3]);
    assert_eq!(m(json!({"model_type": "dots1", "num_hidden_layers": 2})), vec![0, 1]);
    assert_eq!(
        m(json!({"model_type": "glm4v_moe", "text_config": {"num_hidden_layers": 3}})),
        vec![1, 2]
    );
    assert_eq!(
        m(
            json!({"model_type": "qwen3_vl_moe", "text_config": {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}})
        ),
        vec![1, 5]
    );
    assert_eq!(
        m(json!({"model_type": "deepseek_v32", "num_hidden_layers": 5, "num_nextn_predict_layers": 0})),
        vec![3, 4]
    );
}

#[test]
fn moe_layer_ids_refuse_configs_of_new_families_that_leave_no_moe_layer() {
    let err = |v: Value| hf_moe_layers_value(&v).unwrap_err();
    let key_of = |e: ConfigError| match e {
        ConfigError::BadKey { key, .. } | ConfigError::MissingKey { key, .. } => key,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        key_of(err(
            json!({"model_type": "jamba", "num_hidden_layers": 4, "expert_layer_period": 2, "expert_layer_offset": 2})
        )),
        "expert_layer_offset"
    );
    assert_eq!(
        key_of(err(
            json!({"model_type": "jamba", "num_hidden_layers": 4, "num_experts": 1})
        )),
        "num_experts"
    );
    assert_eq!(
        key_of(err(json!({"model_type": "lfm2_moe", "num_hidden_layers": 2}))),
        "num_hidden_layers"
    );
    assert_eq!(key_of(err(json!({"model_type": "dbrx"}))), "n_layers");
    assert_eq!(
        key_of(err(json!({"model_type": "glm4v_moe", "text_config": {}}))),
        "text_config.num_hidden_layers"
    );
}

// ---------------------------------------------------------------------------------------------
// Softmax with a selection bias: the rule
// ---------------------------------------------------------------------------------------------

#[test]
fn softmax_before_top_k_accepts_a_selection_bias_and_keeps_its_literal_form() {
    let b = bias(8, &[(3, 0.25)]);
    let cfg = RouterConfig::builder(8, 2)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .expert_bias(b.clone())
        .build()
        .unwrap();
    // With a bias, renormalised softmax is not softmax over the K selected logits.
    assert_eq!(cfg.softmax_position(), SoftmaxPosition::BeforeTopK);
    assert_eq!(cfg.normalization(), Normalization::Sum { eps: 1e-20 });
    // Without it, the canonical form applies as before.
    let plain = cfg.to_builder().no_expert_bias().build().unwrap();
    assert_eq!(plain.softmax_position(), SoftmaxPosition::AfterTopK);
    assert_eq!(plain.normalization(), Normalization::None);
    // Expected at run time (the import's way) keeps the literal form too.
    let expected = RouterConfig::builder(8, 2)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .expect_expert_bias()
        .build()
        .unwrap();
    assert_eq!(expected.softmax_position(), SoftmaxPosition::BeforeTopK);
    let mut installed = expected.clone();
    installed.set_expert_bias(b).unwrap();
    assert_eq!(installed.normalization(), Normalization::Sum { eps: 1e-20 });
}

#[test]
fn a_selection_bias_with_softmax_after_top_k_is_refused_naming_the_field() {
    for r in [
        RouterConfig::builder(8, 2).expert_bias(vec![0.0; 8]).build(),
        RouterConfig::builder(8, 2).expect_expert_bias().build(),
    ] {
        match r {
            Err(ConfigError::Invalid { field, reason }) => {
                assert_eq!(field, "expert_bias");
                assert!(reason.contains("softmax before top-k"), "{reason}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
    // A rewritten (bias-free) softmax config cannot take a bias afterwards: its rule selects on
    // logits.
    let mut c = RouterConfig::builder(8, 2)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::Sum { eps: 0.0 })
        .build()
        .unwrap();
    assert!(c.set_expert_bias(vec![0.0; 8]).is_err());
}

#[test]
fn a_clamp_minimum_that_can_bind_keeps_softmax_before_top_k_literal() {
    // The K selected of E probabilities sum to at least 1/E: a minimum at or below it never binds
    // and the canonical form applies; above it, the clamp is part of the rule.
    let never = RouterConfig::builder(8, 2)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::SumClampMin { min: 0.125 })
        .build()
        .unwrap();
    assert_eq!(never.softmax_position(), SoftmaxPosition::AfterTopK);
    let binds = RouterConfig::builder(8, 2)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::SumClampMin { min: 0.5 })
        .build()
        .unwrap();
    assert_eq!(binds.softmax_position(), SoftmaxPosition::BeforeTopK);
    assert_eq!(binds.normalization(), Normalization::SumClampMin { min: 0.5 });
    // Two experts of probabilities 0.2 and 0.15 (the rest 0.65 over six): 0.35 < 0.5, so the
    // weights are p / 0.5, not p / 0.35.
    let z: Vec<f32> = [
        0.2f64,
        0.15,
        0.65 / 6.0,
        0.65 / 6.0,
        0.65 / 6.0,
        0.65 / 6.0,
        0.65 / 6.0,
        0.65 / 6.0,
    ]
    .iter()
    .map(|p| p.ln() as f32)
    .collect();
    let (ids, w) = ReferenceRouter::new(binds)
        .route_host(&LogitsRef::F32(Array2::from_shape_vec((1, 8), z).unwrap().view()))
        .unwrap();
    assert_eq!(ids.row(0).to_vec(), vec![0, 1]);
    let w = w.to_f64();
    assert!(
        (w[[0, 0]] - 0.4).abs() < 1e-6 && (w[[0, 1]] - 0.3).abs() < 1e-6,
        "{w:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Golden cases of the families added with the softmax + bias rule (issue 12)
// ---------------------------------------------------------------------------------------------

#[test]
fn ernie_4_5_moe_selects_on_softmax_plus_bias_and_divides_by_the_sum_clamped_at_moe_norm_min() {
    // Expert 60 (logit −1) enters through its bias +0.25; expert 2 (third-best logit) is pushed
    // out by −0.25. The weights are the unbiased probabilities over their sum (≫ 1e-12).
    let imp = import_hf(ERNIE4_5_MOE).unwrap();
    assert!(imp.expects_expert_bias);
    assert_eq!(imp.bias_tensor(), Some("e_score_correction_bias"));
    let mut cfg = imp.config;
    assert_eq!((cfg.num_experts(), cfg.top_k()), (64, 6));
    assert_eq!(
        (cfg.score(), cfg.softmax_position(), cfg.normalization()),
        (
            ScoreFunction::Softmax,
            SoftmaxPosition::BeforeTopK,
            Normalization::SumClampMin { min: 1e-12 }
        )
    );
    let z = row(
        64,
        &[(0, 2.0), (1, 1.5), (2, 1.25), (3, 1.0), (4, 0.75), (5, 0.5), (60, -1.0)],
    );
    // Routing before the checkpoint's bias is installed is an error, never a bias-free guess.
    let r = ReferenceRouter::new(cfg.clone()).route_host(&LogitsRef::F32(
        Array2::from_shape_vec((1, 64), z.clone()).unwrap().view(),
    ));
    assert!(matches!(r, Err(RouteError::BiasMissing { .. })), "{r:?}");
    cfg.set_expert_bias(bias(64, &[(60, 0.25), (2, -0.25)])).unwrap();
    check(
        cfg,
        &[z],
        &[(
            &[60, 0, 1, 3, 4, 5],
            &[
                0.019648921430852607,
                0.3946591369002035,
                0.23937286666569893,
                0.14518698273605063,
                0.11307173584661076,
                0.08806035642058349,
            ],
        )],
    );
}

#[test]
fn ernie_4_5_moe_clamp_binds_when_the_biased_selection_holds_little_probability() {
    // moe_norm_min 0.5 (edited): the bias selects six experts whose probabilities sum below 0.5,
    // so every weight is p / 0.5.
    let mut cfg = hf_value(edited(ERNIE4_5_MOE, &[], |m| {
        m.insert("moe_norm_min".into(), json!(0.5));
    }))
    .unwrap();
    assert_eq!(cfg.normalization(), Normalization::SumClampMin { min: 0.5 });
    cfg.set_expert_bias(bias(
        64,
        &[(10, 0.5), (11, 0.5), (12, 0.5), (13, 0.5), (14, 0.5), (15, 0.5)],
    ))
    .unwrap();
    let z = row(
        64,
        &[
            (0, 2.0),
            (1, 1.75),
            (2, 1.5),
            (3, 1.25),
            (10, -1.0),
            (11, -1.125),
            (12, -1.25),
            (13, -1.375),
            (14, -1.5),
            (15, -1.625),
        ],
    );
    check(
        cfg,
        &[z],
        &[(
            &[10, 11, 12, 13, 14, 15],
            &[
                0.025754334472037767,
                0.022728120399701,
                0.020057495854305888,
                0.01770067796502831,
                0.015620793477784882,
                0.013785301860058809,
            ],
        )],
    );
}

#[test]
fn ernie_4_5_moe_keys_aliases_and_bad_clamp_minimums_are_named() {
    let a = hf_value(json!({"model_type": "ernie4_5_moe", "num_experts": 64, "num_experts_per_tok": 6})).unwrap();
    assert_eq!(a, hf(ERNIE4_5_MOE), "attribute_map aliases, moe_norm_min default 1e-12");
    for bad in [json!(0.0), json!(-1.0), json!(1e-45), json!("small")] {
        let (key, _) = bad_key(hf_value(edited(ERNIE4_5_MOE, &[], |m| {
            m.insert("moe_norm_min".into(), bad.clone());
        })));
        assert_eq!(key, "moe_norm_min", "{bad}");
    }
    let (key, _) = bad_key(hf_value(edited(ERNIE4_5_MOE, &[], |m| {
        m.insert("moe_k".into(), json!(65));
    })));
    assert_eq!(key, "moe_k");
}

#[test]
fn ernie_4_5_vl_reads_text_config_or_the_top_level_and_routes_like_ernie() {
    let imp = import_hf(ERNIE4_5_VL_MOE).unwrap();
    assert_eq!(imp.model_type, "ernie4_5_vl_moe");
    assert!(imp.expects_expert_bias);
    let flat_text = serde_json::from_str::<Value>(ERNIE4_5_VL_MOE).unwrap()["text_config"].clone();
    assert_eq!(hf_value(flat_text.clone()).unwrap(), imp.config);
    // Ernie4_5_VLMoeConfig builds its text config from the top-level keys when text_config is
    // absent.
    let mut top = flat_text.as_object().unwrap().clone();
    top.insert("model_type".into(), json!("ernie4_5_vl_moe"));
    assert_eq!(hf_value(Value::Object(top)).unwrap(), imp.config);
    let mut cfg = imp.config;
    cfg.set_expert_bias(bias(64, &[(1, 0.125), (63, -0.0625)])).unwrap();
    check(
        cfg,
        &[row(
            64,
            &[
                (63, 1.5),
                (32, 1.25),
                (16, 1.0),
                (8, 0.875),
                (4, 0.75),
                (2, 0.5),
                (1, -0.5),
            ],
        )],
        &[(
            &[1, 32, 63, 16, 8, 4],
            &[
                0.03835713693568386,
                0.22073008285400456,
                0.2834230366121329,
                0.1719047613741148,
                0.15170541945220034,
                0.1338795627718636,
            ],
        )],
    );
}

#[test]
fn longcat_flash_routes_over_routed_plus_zero_experts_on_softmax_plus_bias_times_6() {
    // 512 routed + 256 zero-computation experts: zero expert 700 (logit −1.5) enters through its
    // bias +0.125, expert 11 is pushed out by −0.125; weights are probabilities × 6, unnormalised.
    // The f32 softmax sums 768 terms (as the model's own f32 softmax does, in another order): its
    // rounding reaches ~1e-6 relative, so the f64 derivation is met within 4e-6.
    let imp = import_hf(LONGCAT_FLASH).unwrap();
    assert!(imp.expects_expert_bias);
    assert_eq!(imp.bias_tensor(), Some("e_score_correction_bias"));
    let mut cfg = imp.config;
    assert_eq!((cfg.num_experts(), cfg.top_k(), cfg.scaling_factor()), (768, 12, 6.0));
    assert_eq!(cfg.normalization(), Normalization::None);
    assert_eq!(cfg.softmax_position(), SoftmaxPosition::BeforeTopK);
    cfg.set_expert_bias(bias(768, &[(700, 0.125), (11, -0.125)])).unwrap();
    let z = row(
        768,
        &[
            (0, 2.0),
            (1, 1.875),
            (2, 1.75),
            (3, 1.625),
            (4, 1.5),
            (5, 1.375),
            (6, 1.25),
            (7, 1.125),
            (8, 1.0),
            (9, 0.875),
            (10, 0.75),
            (11, 0.625),
            (12, 0.5),
            (700, -1.5),
        ],
    );
    check_within(
        cfg,
        &[z],
        &[(
            &[700, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            &[
                0.010136306386287791,
                0.33566836717369947,
                0.29622629432641845,
                0.26141878720717704,
                0.23070126998775514,
                0.2035931561865264,
                0.1796703297220313,
                0.1585585094660456,
                0.1399273934822155,
                0.12348549133479109,
                0.10897556361709003,
                0.09617059734949246,
            ],
        )],
        4e-6,
    );
}

#[test]
fn longcat_flash_zero_expert_count_defaults_to_256_null_means_none_and_normalisation_is_refused() {
    let base = |m: &mut serde_json::Map<String, Value>| {
        m.remove("zero_expert_num");
    };
    assert_eq!(
        hf_value(edited(LONGCAT_FLASH, &[], base)).unwrap().num_experts(),
        768,
        "LongcatFlashConfig default 256"
    );
    let none = hf_value(edited(LONGCAT_FLASH, &[], |m| {
        m.insert("zero_expert_num".into(), Value::Null);
    }))
    .unwrap();
    assert_eq!(none.num_experts(), 512, "`zero_expert_num or 0`");
    let (key, reason) = bad_key(hf_value(edited(LONGCAT_FLASH, &[], |m| {
        m.insert("norm_topk_prob".into(), json!(true));
    })));
    assert_eq!(key, "norm_topk_prob");
    assert!(reason.contains("ambiguous"), "{reason}");
}

#[test]
fn aria_reads_text_config_and_takes_top6_logits_then_softmax_over_those_six() {
    let cfg = hf(ARIA);
    assert_eq!((cfg.num_experts(), cfg.top_k()), (64, 6));
    assert_eq!(cfg.softmax_position(), SoftmaxPosition::AfterTopK);
    let flat = serde_json::from_str::<Value>(ARIA).unwrap()["text_config"].clone();
    assert_eq!(hf_value(flat).unwrap(), cfg);
    check(
        cfg,
        &[row(
            64,
            &[
                (5, 1.5),
                (50, 1.25),
                (25, 1.0),
                (12, 0.75),
                (37, 0.5),
                (60, 0.25),
                (0, 0.125),
            ],
        )],
        &[(
            &[5, 50, 25, 12, 37, 60],
            &[
                0.28473137401093823,
                0.22174901704471575,
                0.17269830811973894,
                0.13449757759875944,
                0.10474681875512089,
                0.08157690447072666,
            ],
        )],
    );
}

#[test]
fn afmoe_selects_on_sigmoid_plus_expert_bias_renormalises_and_scales_by_route_scale() {
    let imp = import_hf(AFMOE).unwrap();
    assert!(imp.expects_expert_bias);
    assert_eq!(imp.bias_tensor(), Some("expert_bias"));
    let mut cfg = imp.config;
    assert_eq!((cfg.num_experts(), cfg.top_k(), cfg.scaling_factor()), (128, 8, 2.826));
    assert_eq!(cfg.normalization(), Normalization::Sum { eps: 1e-20 });
    cfg.set_expert_bias(bias(128, &[(127, 0.75), (7, -0.5)])).unwrap();
    check(
        cfg,
        &[row(
            128,
            &[
                (0, 2.0),
                (1, 1.75),
                (2, 1.5),
                (3, 1.25),
                (4, 1.0),
                (5, 0.75),
                (6, 0.5),
                (7, 0.25),
                (127, -2.0),
            ],
        )],
        &[(
            &[0, 127, 1, 2, 3, 4, 5, 6],
            &[
                0.4542607454010575,
                0.06147750664212693,
                0.43938464891042983,
                0.42165443126723195,
                0.4008832717156452,
                0.3770348734838137,
                0.350278435137681,
                0.32102608744201416,
            ],
        )],
    );
}

#[test]
fn afmoe_configs_the_transformers_router_does_not_implement_are_refused() {
    let (key, reason) = bad_key(hf_value(edited(AFMOE, &[], |m| {
        m.insert("route_norm".into(), json!(false));
    })));
    assert_eq!(key, "route_norm");
    assert!(reason.contains("ambiguous"), "{reason}");
    let (key, _) = bad_key(hf_value(edited(AFMOE, &[], |m| {
        m.insert("score_func".into(), json!("softmax"));
    })));
    assert_eq!(key, "score_func");
    // AfmoeConfig defaults: route_scale 1.
    let c = hf_value(json!({"model_type": "afmoe", "num_experts": 64, "num_experts_per_tok": 6})).unwrap();
    assert_eq!(c.scaling_factor(), 1.0);
}

/// A DeepSeek-V3-rule family: imports with the bias expected (tensor `e_score_correction_bias`),
/// one group, renormalised (+1e-20) and `scale`, then routes the golden row.
fn v3_rule_golden(json: &str, e: usize, k: usize, scale: f32, b: &[(usize, f32)], z: Vec<f32>, want: (&[u32], &[f64])) {
    let imp = import_hf(json).unwrap();
    assert!(imp.expects_expert_bias);
    assert_eq!(imp.bias_tensor(), Some("e_score_correction_bias"));
    let mut cfg = imp.config;
    assert_eq!(
        (cfg.num_experts(), cfg.top_k(), cfg.score(), cfg.scaling_factor()),
        (e, k, ScoreFunction::Sigmoid, scale)
    );
    assert_eq!(cfg.group_limit(), None);
    assert_eq!(cfg.normalization(), Normalization::Sum { eps: 1e-20 });
    cfg.set_expert_bias(bias(e, b)).unwrap();
    check(cfg, &[z], &[want]);
}

#[test]
fn nemotron_h_routes_with_the_deepseek_v3_gate_top6_of_128_renormalised_times_2_5() {
    v3_rule_golden(
        NEMOTRON_H,
        128,
        6,
        2.5,
        &[(100, 1.0)],
        row(
            128,
            &[
                (0, 1.5),
                (1, 1.25),
                (2, 1.0),
                (3, 0.75),
                (4, 0.5),
                (5, 0.25),
                (100, -2.0),
            ],
        ),
        (
            &[100, 0, 1, 2, 3, 4],
            &[
                0.07953704053741992,
                0.5455189617189766,
                0.5186460996024166,
                0.4877920340990846,
                0.453175667274685,
                0.41533019676741745,
            ],
        ),
    );
}

#[test]
fn nemotron_h_without_a_moe_block_is_a_dense_hybrid_and_is_refused() {
    for (key, v) in [
        ("hybrid_override_pattern", json!("M-M*M-")),
        (
            "layers_block_type",
            json!(["linear_attention", "mlp", "full_attention"]),
        ),
    ] {
        let bad = edited(NEMOTRON_H, &[], |m| {
            m.remove("hybrid_override_pattern");
            m.insert(key.into(), v.clone());
        });
        let (k, reason) = bad_key(hf_value(bad.clone()));
        assert_eq!(k, key);
        assert!(reason.contains("dense"), "{reason}");
        assert!(hf_moe_layers_value(&bad).is_err());
    }
    let (k, _) = bad_key(hf_value(edited(NEMOTRON_H, &[], |m| {
        m.insert("hybrid_override_pattern".into(), json!("MEX"));
    })));
    assert_eq!(k, "hybrid_override_pattern");
}

#[test]
fn glm_4_7_flash_routes_with_the_glm_4_5_gate_top4_of_64_times_1_8() {
    v3_rule_golden(
        GLM4_MOE_LITE,
        64,
        4,
        1.8,
        &[(40, 0.5)],
        row(64, &[(10, 2.0), (20, 1.5), (30, 1.0), (50, 0.5), (40, -1.0)]),
        (
            &[10, 20, 40, 30],
            &[
                0.5875524213517587,
                0.5453785839364849,
                0.1794024835896336,
                0.487666511122123,
            ],
        ),
    );
}

#[test]
fn glm_5_routes_with_the_deepseek_v3_gate_top8_of_256_times_2_5() {
    v3_rule_golden(
        GLM_MOE_DSA,
        256,
        8,
        2.5,
        &[(255, 0.625)],
        row(
            256,
            &[
                (0, 2.0),
                (32, 1.75),
                (64, 1.5),
                (96, 1.25),
                (128, 1.0),
                (160, 0.75),
                (192, 0.5),
                (224, 0.25),
                (255, -1.0),
            ],
        ),
        (
            &[255, 0, 32, 64, 96, 128, 160, 192],
            &[
                0.11943901773286186,
                0.3911689663858904,
                0.3783589946967054,
                0.3630913076260047,
                0.3452050317487942,
                0.3246689115122361,
                0.3016286456781631,
                0.2764391246193442,
            ],
        ),
    );
}

#[test]
fn solar_open_routes_with_the_glm_4_5_gate_top8_of_128() {
    v3_rule_golden(
        SOLAR_OPEN,
        128,
        8,
        1.0,
        &[(3, -0.5), (90, 0.25)],
        row(
            128,
            &[
                (1, 2.0),
                (2, 1.75),
                (3, 1.5),
                (4, 1.25),
                (5, 1.0),
                (6, 0.75),
                (7, 0.5),
                (8, 0.25),
                (9, 0.125),
                (90, -0.5),
            ],
        ),
        (
            &[1, 2, 4, 5, 6, 90, 7, 8],
            &[
                0.16065717077640912,
                0.15539598191389564,
                0.141779303841375,
                0.1333449052580405,
                0.12388202798268194,
                0.06886332529780084,
                0.11353642918962649,
                0.10254085574017054,
            ],
        ),
    );
}

#[test]
fn k_exaone_routes_with_the_deepseek_v3_gate_reading_num_experts() {
    v3_rule_golden(
        EXAONE_MOE,
        128,
        8,
        2.5,
        &[(64, 0.75)],
        row(
            128,
            &[
                (0, 1.5),
                (16, 1.25),
                (32, 1.0),
                (48, 0.875),
                (80, 0.75),
                (96, 0.625),
                (112, 0.5),
                (127, 0.375),
                (64, -1.5),
            ],
        ),
        (
            &[64, 0, 16, 32, 48, 80, 96, 112],
            &[
                0.0882623909075443,
                0.3955645926522471,
                0.37607864715359535,
                0.3537058669040638,
                0.3414778410600445,
                0.3286049813200933,
                0.3151430593983731,
                0.3011626206040384,
            ],
        ),
    );
}

#[test]
fn the_new_deepseek_v3_rule_families_take_their_configuration_classes_defaults() {
    let c = |v: Value| hf_value(v).unwrap();
    // NemotronHConfig and SolarOpenConfig (Glm4MoeConfig): scale 1, renormalised, one group.
    for mt in ["nemotron_h", "solar_open"] {
        let cfg = c(
            json!({"model_type": mt, "n_routed_experts": 64, "num_experts_per_tok": 4,
                           "layers_block_type": ["moe"]}),
        );
        assert_eq!(
            (cfg.scaling_factor(), cfg.normalization(), cfg.group_limit()),
            (1.0, Normalization::Sum { eps: 1e-20 }, None),
            "{mt}"
        );
    }
    assert_eq!(
        c(json!({"model_type": "glm4_moe_lite", "n_routed_experts": 64, "num_experts_per_tok": 4})).scaling_factor(),
        1.8
    );
    assert_eq!(
        c(json!({"model_type": "glm_moe_dsa", "n_routed_experts": 256, "num_experts_per_tok": 8})),
        hf(GLM_MOE_DSA)
    );
    assert_eq!(
        c(json!({"model_type": "exaone_moe", "num_experts": 128, "num_experts_per_tok": 8})),
        hf(EXAONE_MOE)
    );
    // A group limit in the file is honoured (DeepSeek-V3's top-2-sum rule).
    let g = c(
        json!({"model_type": "glm_moe_dsa", "n_routed_experts": 256, "num_experts_per_tok": 8,
                     "n_group": 8, "topk_group": 4}),
    );
    assert_eq!(
        g.group_limit(),
        Some(GroupLimit {
            num_groups: 8,
            groups_selected: 4,
            score: GroupScore::SumTopN(2)
        })
    );
}

#[test]
fn mistral_4_takes_the_top4_softmax_probabilities_renormalised() {
    let cfg = hf(MISTRAL4);
    assert_eq!((cfg.num_experts(), cfg.top_k(), cfg.has_bias()), (128, 4, false));
    check(
        cfg,
        &[row(128, &[(7, 1.5), (70, 1.25), (17, 1.0), (117, 0.75), (27, 0.5)])],
        &[(
            &[7, 70, 17, 117],
            &[
                0.3499320087587727,
                0.2725273224430819,
                0.21224449212702542,
                0.16529617667112,
            ],
        )],
    );
}

#[test]
fn mistral_4_groups_are_scored_by_the_sum_of_their_two_best_probabilities() {
    // n_group 8 / topk_group 2 (edited): group 0 holds the best expert but a weak second and is
    // dropped.
    let cfg = hf_value(edited(MISTRAL4, &[], |m| {
        m.insert("n_group".into(), json!(8));
        m.insert("topk_group".into(), json!(2));
    }))
    .unwrap();
    assert_eq!(cfg.softmax_position(), SoftmaxPosition::BeforeTopK);
    assert_eq!(
        cfg.group_limit(),
        Some(GroupLimit {
            num_groups: 8,
            groups_selected: 2,
            score: GroupScore::SumTopN(2)
        })
    );
    check(
        cfg,
        &[row(
            128,
            &[(0, 2.0), (16, 1.75), (17, 1.5), (32, 1.625), (33, 1.375), (48, 1.0)],
        )],
        &[(
            &[16, 32, 17, 33],
            &[
                0.29863342676099575,
                0.2635430741248024,
                0.23257594661276051,
                0.2052475525014414,
            ],
        )],
    );
}

#[test]
fn qwen3_5_moe_reads_text_config_and_always_renormalises_its_top8_softmax() {
    let cfg = hf(QWEN3_5_MOE);
    assert_eq!((cfg.num_experts(), cfg.top_k()), (256, 8));
    let flat = serde_json::from_str::<Value>(QWEN3_5_MOE).unwrap()["text_config"].clone();
    assert_eq!(hf_value(flat).unwrap(), cfg);
    check(
        cfg,
        &[row(
            256,
            &[
                (255, 1.5),
                (128, 1.375),
                (64, 1.25),
                (192, 1.125),
                (32, 1.0),
                (96, 0.875),
                (160, 0.75),
                (224, 0.625),
            ],
        )],
        &[(
            &[255, 128, 64, 192, 32, 96, 160, 224],
            &[
                0.18588716309616743,
                0.16404484566260527,
                0.14476906818221713,
                0.12775825426086476,
                0.11274626366482832,
                0.09949822846219712,
                0.08780687843054337,
                0.07748929824057665,
            ],
        )],
    );
}

#[test]
fn ling_1_bailing_moe_renormalises_its_top6_softmax_when_k_exceeds_one() {
    let cfg = hf(BAILING_MOE);
    check(
        cfg,
        &[row(
            64,
            &[(3, 1.5), (13, 1.25), (23, 1.0), (33, 0.75), (43, 0.5), (53, 0.25)],
        )],
        &[(
            &[3, 13, 23, 33, 43, 53],
            &[
                0.2847313740109383,
                0.22174901704471578,
                0.17269830811973896,
                0.13449757759875944,
                0.1047468187551209,
                0.08157690447072669,
            ],
        )],
    );
    // K = 1: the gate skips the normalisation.
    let one = hf_value(edited(BAILING_MOE, &[], |m| {
        m.insert("num_experts_per_tok".into(), json!(1));
    }))
    .unwrap();
    assert_eq!(one.normalization(), Normalization::None);
    assert_eq!(one.softmax_position(), SoftmaxPosition::BeforeTopK);
}

#[test]
fn ling_2_bailing_moe_v2_routes_with_the_deepseek_v3_rule_on_expert_bias() {
    // Group 7 has the best expert (224) but a weak second and is dropped; expert 70 enters
    // through its bias.
    let imp = import_hf(BAILING_MOE_V2).unwrap();
    assert!(imp.expects_expert_bias);
    assert_eq!(imp.bias_tensor(), Some("expert_bias"));
    let mut cfg = imp.config;
    assert_eq!(
        cfg.group_limit(),
        Some(GroupLimit {
            num_groups: 8,
            groups_selected: 4,
            score: GroupScore::SumTopN(2)
        })
    );
    assert_eq!(cfg.scaling_factor(), 2.5);
    cfg.set_expert_bias(bias(256, &[(70, 0.5)])).unwrap();
    let z = row(
        256,
        &[
            (224, 2.5),
            (32, 1.5),
            (33, 1.25),
            (64, 1.0),
            (65, 0.875),
            (96, 2.0),
            (97, 0.5),
            (128, 1.75),
            (129, 0.25),
            (70, -1.0),
        ],
    );
    check(
        cfg,
        &[z],
        &[(
            &[96, 128, 32, 33, 70, 64, 65, 97],
            &[
                0.38932882990793166,
                0.376579118868779,
                0.3613832540292037,
                0.34358111874474156,
                0.11887715288081994,
                0.3231416044948807,
                0.31197022097889,
                0.2751387000947535,
            ],
        )],
    );
}

#[test]
fn ling_2_options_the_remote_gate_ignores_are_refused_and_the_bias_can_be_off() {
    let (key, reason) = bad_key(hf_value(edited(BAILING_MOE_V2, &[], |m| {
        m.insert("norm_topk_prob".into(), json!(false));
    })));
    assert_eq!(key, "norm_topk_prob");
    assert!(reason.contains("ambiguous"), "{reason}");
    let (key, _) = bad_key(hf_value(edited(BAILING_MOE_V2, &[], |m| {
        m.insert("score_function".into(), json!("softmax"));
    })));
    assert_eq!(key, "score_function");
    let off = import_hf(
        &edited(BAILING_MOE_V2, &[], |m| {
            m.insert("moe_router_enable_expert_bias".into(), json!(false));
        })
        .to_string(),
    )
    .unwrap();
    assert!(!off.expects_expert_bias && !off.config.has_bias());
    // The remote configuration class's defaults: 8 groups keep 4, scale 2.5.
    let d = hf_value(json!({"model_type": "bailing_moe_v2", "num_experts": 256, "num_experts_per_tok": 8})).unwrap();
    assert_eq!(d.group_limit(), hf(BAILING_MOE_V2).group_limit());
    assert_eq!(d.scaling_factor(), 2.5);
}

#[test]
fn moe_layer_ids_of_the_issue_12_families_honour_their_layer_keys() {
    let m = |v: Value| hf_moe_layers_value(&v).unwrap();
    // ERNIE: interval 2 from layer 1 to 5 → (i + 1) % 2 == 0 → 1, 3, 5; end -1 is the last layer.
    let e = m(json!({"model_type": "ernie4_5_moe", "num_hidden_layers": 8,
                     "moe_layer_start_index": 1, "moe_layer_end_index": 5, "moe_layer_interval": 2}));
    assert_eq!(e.layers, vec![1, 3, 5]);
    assert_eq!(
        m(json!({"model_type": "ernie4_5_moe", "num_hidden_layers": 4})).layers,
        vec![1, 2, 3]
    );
    // mlp_layer_types wins over first_k_dense_replace.
    assert_eq!(
        m(
            json!({"model_type": "glm_moe_dsa", "num_hidden_layers": 4, "first_k_dense_replace": 3,
                 "mlp_layer_types": ["dense", "sparse", "dense", "sparse"]})
        )
        .layers,
        vec![1, 3]
    );
    assert_eq!(
        m(json!({"model_type": "exaone_moe", "num_hidden_layers": 3})).layers,
        vec![1, 2]
    );
    // Nemotron-H: layers_block_type (or its alias layer_types) gives the count and the MoE blocks.
    let n = m(json!({"model_type": "nemotron_h", "num_hidden_layers": 99,
                     "layer_types": ["linear_attention", "moe", "full_attention", "moe"]}));
    assert_eq!((n.num_hidden_layers, n.layers), (4, vec![1, 3]));
    // Ling 2.0: the last num_nextn_predict_layers of num_hidden_layers are MTP blocks.
    let b = m(
        json!({"model_type": "bailing_moe_v2", "num_hidden_layers": 6, "first_k_dense_replace": 1,
                     "num_nextn_predict_layers": 1}),
    );
    assert_eq!(
        (b.num_hidden_layers, b.layers, b.mtp_layers),
        (5, vec![1, 2, 3, 4], vec![5])
    );
    // LongCat counts `num_layers`.
    assert!(matches!(
        hf_moe_layers_value(&json!({"model_type": "longcat_flash", "num_hidden_layers": 56})),
        Err(ConfigError::MissingKey { ref key, .. }) if key == "num_layers"
    ));
}

#[test]
fn moe_layer_keys_of_the_issue_12_families_that_are_wrong_or_ambiguous_are_named() {
    let key_of = |v: Value| match hf_moe_layers_value(&v).unwrap_err() {
        ConfigError::BadKey { key, .. } | ConfigError::MissingKey { key, .. } => key,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        key_of(json!({"model_type": "glm_moe_dsa", "num_hidden_layers": 4, "mlp_layer_types": ["dense", "sparse"]})),
        "mlp_layer_types"
    );
    assert_eq!(
        key_of(json!({"model_type": "exaone_moe", "num_hidden_layers": 2, "mlp_layer_types": ["dense", "moe"]})),
        "mlp_layer_types"
    );
    // Glm4MoeLiteConfig ignores first_k_dense_replace; a value other than its default is ambiguous.
    assert_eq!(
        key_of(json!({"model_type": "glm4_moe_lite", "num_hidden_layers": 4, "first_k_dense_replace": 2})),
        "first_k_dense_replace"
    );
    assert_eq!(
        key_of(json!({"model_type": "bailing_moe_v2", "num_hidden_layers": 2, "num_nextn_predict_layers": 2})),
        "num_nextn_predict_layers"
    );
    assert_eq!(
        key_of(json!({"model_type": "ernie4_5_moe", "num_hidden_layers": 4, "moe_layer_start_index": 9})),
        "num_hidden_layers"
    );
    assert_eq!(
        key_of(json!({"model_type": "nemotron_h", "layers_block_type": ["mamba", "moa"]})),
        "layers_block_type"
    );
}

// ---------------------------------------------------------------------------------------------
// Every backend computes the softmax + bias rule as the reference does
// ---------------------------------------------------------------------------------------------

/// The ERNIE and LongCat fixtures with a bias that moves the selection, on logits with ties,
/// −∞ and huge values, every dtype: ids, weight bits and gradient bits equal the reference's.
fn softmax_bias_rules_match_reference<B: Backend>(b: &B) {
    let mut cfgs = Vec::new();
    for (json, scale) in [(ERNIE4_5_MOE, 0.02f32), (LONGCAT_FLASH, 0.002)] {
        let mut c = hf(json);
        let e = c.num_experts();
        c.set_expert_bias((0..e).map(|i| ((i * 7919) % 13) as f32 * scale - 6.0 * scale).collect())
            .unwrap();
        cfgs.push(c);
    }
    let clamp = hf_value(edited(ERNIE4_5_MOE, &[], |m| {
        m.insert("moe_norm_min".into(), json!(0.5));
    }))
    .unwrap();
    let mut clamp = clamp;
    clamp
        .set_expert_bias((0..64).map(|i| if i % 9 == 0 { 0.5 } else { 0.0 }).collect())
        .unwrap();
    cfgs.push(clamp);
    for cfg in cfgs {
        let e = cfg.num_experts();
        let t = 24;
        let l = Array2::from_shape_fn((t, e), |(r, x)| match (r * 31 + x * 17) % 11 {
            0 => f32::NEG_INFINITY,
            1 => 1.0,
            2 if r % 5 == 0 => 40.0,
            _ => ((r * 13 + x * 7) % 29) as f32 * 0.25 - 3.5,
        });
        let lb = l.mapv(half::bf16::from_f32);
        for logits in [LogitsRef::F32(l.view()), LogitsRef::Bf16(lb.view())] {
            conformance::assert_same_as_reference(b, &cfg, logits, "softmax + bias fixture");
        }
        let ids = ReferenceRouter::new(cfg.clone())
            .route_host(&LogitsRef::F32(l.view()))
            .unwrap()
            .0;
        let g = conformance::upstream_grad(t, cfg.top_k(), 7);
        conformance::assert_backward_same_as_reference(
            b,
            &cfg,
            LogitsRef::F32(l.view()),
            ids.view(),
            &g,
            &LossGrads::default().z_loss(0.5),
            "softmax + bias fixture backward",
        );
    }
}

#[test]
fn cpu_computes_softmax_plus_bias_rules_bit_identically_to_the_reference() {
    softmax_bias_rules_match_reference(&crate::cpu::Cpu);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_computes_softmax_plus_bias_rules_bit_identically_to_the_reference() {
    use moe_router::wgpu::{AdapterOptions, WgpuContext, WgpuRouter};
    struct W;
    impl Backend for W {
        type Router = WgpuRouter;
        fn name(&self) -> String {
            "wgpu".into()
        }
        fn router(&self, cfg: &RouterConfig) -> Result<WgpuRouter, RouteError> {
            WgpuRouter::with_options(cfg.clone(), &AdapterOptions::from_env())
        }
    }
    if let Err(e) = WgpuContext::shared(&AdapterOptions::from_env()) {
        println!("skipped: {e}");
        return;
    }
    softmax_bias_rules_match_reference(&W);
}

#[test]
fn softmax_plus_bias_backward_flows_through_the_unbiased_probabilities_only() {
    // f64 compute, the ids the biased selection chose held fixed: the gradient of Σ g∘w equals
    // central finite differences of the weights (which depend on the unbiased softmax only),
    // for ERNIE with the clamp free and binding, and LongCat's unnormalised 768-way rule.
    use moe_router::{CallSite, ComputeDtype, HostMatrix};
    let ernie_clamped = hf_value(edited(ERNIE4_5_MOE, &[], |m| {
        m.insert("moe_norm_min".into(), json!(0.5));
    }))
    .unwrap();
    for (base, t) in [(hf(ERNIE4_5_MOE), 4), (ernie_clamped, 4), (hf(LONGCAT_FLASH), 2)] {
        let e = base.num_experts();
        let mut cfg = base.to_builder().compute_dtype(ComputeDtype::F64).build().unwrap();
        cfg.set_expert_bias((0..e).map(|i| if i % 5 == 0 { 0.5 } else { 0.0 }).collect())
            .unwrap();
        let r = ReferenceRouter::new(cfg.clone());
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let z = Array2::from_shape_fn((t, e), |_| next() * 6.0 - 3.0);
        let ids = r.route_host(&LogitsRef::F64(z.view())).unwrap().0;
        assert!(
            ids.iter().any(|&i| i % 5 == 0),
            "the bias moves the selection in this case"
        );
        let g = conformance::upstream_grad(t, cfg.top_k(), 11).mapv(f64::from);
        let dz = r
            .weights_vjp_host_at(
                &LogitsRef::F64(z.view()),
                ids.view(),
                &HostMatrix::F64(g.clone()),
                &LossGrads::default(),
                &CallSite::default(),
            )
            .unwrap()
            .to_f64();
        let f = |zz: &Array2<f64>| -> f64 {
            let w = r.weights_host(&LogitsRef::F64(zz.view()), ids.view()).unwrap().to_f64();
            (&w * &g).sum()
        };
        let h = 1e-6;
        for ti in 0..t {
            let scale = dz.row(ti).iter().fold(1e-3f64, |m, &x| m.max(x.abs()));
            for ei in 0..e {
                let (mut zp, mut zm) = (z.clone(), z.clone());
                zp[[ti, ei]] += h;
                zm[[ti, ei]] -= h;
                let fd = (f(&zp) - f(&zm)) / (2.0 * h);
                assert!(
                    (fd - dz[[ti, ei]]).abs() <= 1e-6 * scale.max(1.0),
                    "E = {e}, row {ti}, expert {ei}: finite difference {fd:e}, backward {:e}",
                    dz[[ti, ei]]
                );
            }
        }
    }
}
