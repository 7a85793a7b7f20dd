//! Model families of Hugging Face transformers 5.x beyond the first presets: each routes from its
//! `config.json` (`tests/fixtures/hf/<family>.json`, real key names and the family's defaults),
//! nested `text_config` of vision-language wrappers included, and reproduces a golden case
//! derived from the family's modeling code by `tests/fixtures/golden_derive_families.py` (plain
//! Python f64, no call into this crate): ids exactly, weights within 1e-6 relative. Families whose
//! router is not expressible exactly are refused with their reason; unknown types still list the
//! supported ones. Logits follow golden.rs: `base(i) = -3 + ((37 i) mod 23) / 16`, a few experts
//! overridden, every value a multiple of 1/16.

use moe_router::Router;
use moe_router::import::hf::{
    REFUSED_MODEL_TYPES, SUPPORTED_MODEL_TYPES, hf_moe_layers, hf_moe_layers_value, import_hf,
};
use moe_router::{
    ConfigError, GroupLimit, GroupScore, LogitsRef, Normalization, Numerics, ReferenceRouter, RouterConfig,
    ScoreFunction, SoftmaxPosition,
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
fn ernie_4_5_moe_is_refused_because_it_selects_on_softmax_plus_a_checkpoint_bias() {
    // ERNIE normalises with a clamp minimum (moe_norm_min), which the semantics have, but it adds
    // `e_score_correction_bias` to softmax probabilities for selection, which RouterConfig cannot.
    for r in [
        RouterConfig::from_hf_config(ERNIE4_5_MOE).map(|_| ()),
        hf_moe_layers(ERNIE4_5_MOE).map(|_| ()),
    ] {
        match r {
            Err(ConfigError::BadKey { key, reason, .. }) => {
                assert_eq!(key, "model_type");
                assert!(reason.contains("e_score_correction_bias"), "{reason}");
                assert!(reason.contains("clamp minimum"), "{reason}");
            }
            other => panic!("expected BadKey, got {other:?}"),
        }
    }
}

#[test]
fn longcat_flash_is_refused_because_it_selects_on_softmax_plus_a_bias_over_zero_experts() {
    match RouterConfig::from_hf_config(LONGCAT_FLASH) {
        Err(ConfigError::BadKey { key, reason, .. }) => {
            assert_eq!(key, "model_type");
            assert!(reason.contains("zero_expert_num"), "{reason}");
            assert!(reason.contains("e_score_correction_bias"), "{reason}");
        }
        other => panic!("expected BadKey, got {other:?}"),
    }
}

#[test]
fn refused_families_are_not_in_the_supported_list_and_unknown_types_list_the_new_ones() {
    for (mt, why) in REFUSED_MODEL_TYPES {
        assert!(!SUPPORTED_MODEL_TYPES.contains(mt), "{mt}");
        assert!(why.len() > 40, "{mt} needs a reason, not a word");
    }
    let err = RouterConfig::from_hf_config(r#"{"model_type": "switch_transformers", "num_experts": 8}"#).unwrap_err();
    assert!(matches!(err, ConfigError::UnsupportedModelType { ref found, .. } if found == "switch_transformers"));
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
