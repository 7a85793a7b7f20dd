//! Import: Hugging Face `config.json` of every supported family (fixtures are the published
//! configs, `tests/fixtures/hf/`), Megatron `TransformerConfig` options with Megatron's rules, and
//! named presets; every error is typed and names the key.

use moe_router::Router;
use moe_router::import::hf::{SUPPORTED_MODEL_TYPES, hf_moe_layers, hf_moe_layers_value, import_hf};
use moe_router::import::presets::{preset_expects_expert_bias, preset_hf_config};
use moe_router::{
    AuxLoss, AuxLossKind, Capacity, ComputeDtype, ConfigError, DropPolicy, GroupLimit, GroupScore, Normalization,
    RouterConfig, ScoreFunction, SoftmaxPosition, preset, preset_names,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const DEEPSEEK_V2: &str = include_str!("../fixtures/hf/deepseek_v2.json");
const DEEPSEEK_V2_LITE: &str = include_str!("../fixtures/hf/deepseek_v2_lite.json");
const DEEPSEEK_V3: &str = include_str!("../fixtures/hf/deepseek_v3.json");
const KIMI_K2: &str = include_str!("../fixtures/hf/kimi_k2.json");
const GLM4_MOE: &str = include_str!("../fixtures/hf/glm4_moe.json");
const QWEN2_MOE: &str = include_str!("../fixtures/hf/qwen2_moe.json");
const QWEN3_MOE: &str = include_str!("../fixtures/hf/qwen3_moe.json");
const QWEN3_NEXT: &str = include_str!("../fixtures/hf/qwen3_next.json");
const MIXTRAL: &str = include_str!("../fixtures/hf/mixtral.json");
const GPT_OSS: &str = include_str!("../fixtures/hf/gpt_oss.json");
const LLAMA4: &str = include_str!("../fixtures/hf/llama4.json");
const MINIMAX_M2: &str = include_str!("../fixtures/hf/minimax_m2.json");
const OLMOE: &str = include_str!("../fixtures/hf/olmoe.json");
const MEGATRON_DSV3: &str = include_str!("../fixtures/megatron/deepseek_v3.json");

fn hf(json: &str) -> RouterConfig {
    RouterConfig::from_hf_config(json).unwrap_or_else(|e| panic!("import failed: {e}"))
}

fn hf_value(v: &Value) -> Result<RouterConfig, ConfigError> {
    RouterConfig::from_hf_config_value(v)
}

fn meg(v: Value) -> Result<RouterConfig, ConfigError> {
    RouterConfig::from_megatron_value(&v)
}

/// The fixture with `edit` applied to its top-level object.
fn edited(json: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut v: Value = serde_json::from_str(json).unwrap();
    edit(v.as_object_mut().unwrap());
    v
}

fn group(num_groups: usize, groups_selected: usize, score: GroupScore) -> Option<GroupLimit> {
    Some(GroupLimit {
        num_groups,
        groups_selected,
        score,
    })
}

fn bad_key(r: Result<RouterConfig, ConfigError>) -> (String, String) {
    match r {
        Err(ConfigError::BadKey { key, reason, .. }) => (key, reason),
        other => panic!("expected BadKey, got {other:?}"),
    }
}

fn missing_key(r: Result<RouterConfig, ConfigError>) -> String {
    match r {
        Err(ConfigError::MissingKey { key, .. }) => key,
        other => panic!("expected MissingKey, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face families
// ---------------------------------------------------------------------------------------------

#[test]
fn deepseek_v2_is_softmax_before_topk_keeping_3_of_8_groups_by_max_and_scaled_by_16() {
    let c = hf(DEEPSEEK_V2);
    assert_eq!((c.num_experts(), c.top_k()), (160, 6));
    assert_eq!(c.score(), ScoreFunction::Softmax);
    assert_eq!(c.softmax_position(), SoftmaxPosition::BeforeTopK);
    assert_eq!(c.group_limit(), group(8, 3, GroupScore::Max));
    assert_eq!(c.normalization(), Normalization::None);
    assert_eq!(c.scaling_factor(), 16.0);
    assert!(!c.has_bias());
    assert!(!import_hf(DEEPSEEK_V2).unwrap().expects_expert_bias);
}

#[test]
fn deepseek_v2_lite_is_greedy_unnormalised_softmax_and_null_keys_are_ignored() {
    // The fixture has `"q_lora_rank": null` and `n_group = topk_group = 1`.
    let c = hf(DEEPSEEK_V2_LITE);
    assert_eq!((c.num_experts(), c.top_k()), (64, 6));
    assert_eq!(c.softmax_position(), SoftmaxPosition::BeforeTopK);
    assert_eq!(c.group_limit(), None);
    assert_eq!(c.normalization(), Normalization::None);
    assert_eq!(c.scaling_factor(), 1.0);
}

#[test]
fn deepseek_v2_norm_topk_prob_renormalises_with_1e_20_and_then_skips_the_scaling_factor() {
    // DeepSeek's modeling_deepseek.py: `if top_k > 1 and norm_topk_prob: w /= sum + 1e-20`
    // `else: w *= routed_scaling_factor`. Softmax renormalisation is stored canonically as
    // softmax over the K selected logits.
    let v = edited(DEEPSEEK_V2, |m| {
        m.insert("norm_topk_prob".into(), json!(true));
    });
    let c = hf_value(&v).unwrap();
    assert_eq!(c.scaling_factor(), 1.0);
    assert_eq!(c.softmax_position(), SoftmaxPosition::AfterTopK);
    assert_eq!(c.normalization(), Normalization::None);
    assert_eq!(c.group_limit(), group(8, 3, GroupScore::Max));
}

#[test]
fn deepseek_v3_is_sigmoid_with_sum_of_top2_groups_4_of_8_renormalised_scaled_by_2_5_and_expects_a_bias() {
    let imp = import_hf(DEEPSEEK_V3).unwrap();
    assert_eq!(imp.model_type, "deepseek_v3");
    assert!(imp.expects_expert_bias);
    let c = imp.config;
    assert_eq!((c.num_experts(), c.top_k()), (256, 8));
    assert_eq!(c.score(), ScoreFunction::Sigmoid);
    assert_eq!(c.group_limit(), group(8, 4, GroupScore::SumTopN(2)));
    assert_eq!(c.normalization(), Normalization::Sum { eps: 1e-20 });
    assert_eq!(c.scaling_factor(), 2.5);
    assert!(
        c.expert_bias().is_none(),
        "the bias is a checkpoint tensor: absent until installed"
    );
    assert!(c.expects_expert_bias(), "routing refuses to run until it is installed");
    let logits = ndarray::Array2::<f32>::zeros((1, 256));
    let err = moe_router::ReferenceRouter::new(c.clone()).route_host(&moe_router::LogitsRef::F32(logits.view()));
    assert!(
        matches!(err, Err(moe_router::RouteError::BiasMissing { num_experts: 256 })),
        "{err:?}"
    );
}

#[test]
fn deepseek_v3_missing_optional_keys_take_the_transformers_defaults() {
    let c = hf_value(&json!({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8})).unwrap();
    assert_eq!(c, hf(DEEPSEEK_V3));
}

#[test]
fn kimi_k2_is_flat_sigmoid_with_bias_renormalised_and_scaled_by_2_827() {
    let imp = import_hf(KIMI_K2).unwrap();
    assert_eq!(imp.model_type, "kimi_k2");
    assert!(imp.expects_expert_bias);
    let c = imp.config;
    assert_eq!((c.num_experts(), c.top_k()), (384, 8));
    assert_eq!(c.score(), ScoreFunction::Sigmoid);
    assert_eq!(c.group_limit(), None, "n_group = topk_group = 1 keeps every expert");
    assert_eq!(c.normalization(), Normalization::Sum { eps: 1e-20 });
    assert_eq!(c.scaling_factor(), 2.827);
}

#[test]
fn kimi_k2_requires_its_routing_keys_because_the_remote_class_defaults_do_not_describe_it() {
    for key in ["n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor"] {
        let v = edited(KIMI_K2, |m| {
            m.remove(key);
        });
        assert_eq!(missing_key(hf_value(&v)), key);
    }
}

#[test]
fn kimi_k2_shipped_as_deepseek_v3_imports_to_the_same_rule() {
    let v = edited(KIMI_K2, |m| {
        m.insert("model_type".into(), json!("deepseek_v3"));
    });
    assert_eq!(hf_value(&v).unwrap(), hf(KIMI_K2));
}

#[test]
fn glm4_moe_is_the_deepseek_v3_rule_with_one_group_and_scale_2_5() {
    let imp = import_hf(GLM4_MOE).unwrap();
    assert!(imp.expects_expert_bias);
    let c = imp.config;
    assert_eq!((c.num_experts(), c.top_k()), (160, 8));
    assert_eq!(c.score(), ScoreFunction::Sigmoid);
    assert_eq!(c.group_limit(), None);
    assert_eq!(c.normalization(), Normalization::Sum { eps: 1e-20 });
    assert_eq!(c.scaling_factor(), 2.5);
    // Glm4MoeConfig defaults: one group, renormalised, scale 1.
    let d = hf_value(&json!({"model_type": "glm4_moe", "n_routed_experts": 128, "num_experts_per_tok": 8})).unwrap();
    assert_eq!((d.group_limit(), d.scaling_factor()), (None, 1.0));
    assert_eq!(d.normalization(), Normalization::Sum { eps: 1e-20 });
}

#[test]
fn qwen2_moe_is_softmax_before_topk_without_renormalisation() {
    let c = hf(QWEN2_MOE);
    assert_eq!((c.num_experts(), c.top_k()), (60, 4));
    assert_eq!(c.score(), ScoreFunction::Softmax);
    assert_eq!(c.softmax_position(), SoftmaxPosition::BeforeTopK);
    assert_eq!(c.normalization(), Normalization::None);
    assert_eq!(c.scaling_factor(), 1.0);
}

#[test]
fn qwen3_moe_renormalised_softmax_is_stored_as_softmax_over_the_k_selected_logits() {
    let c = hf(QWEN3_MOE);
    assert_eq!((c.num_experts(), c.top_k()), (128, 8));
    assert_eq!(c.softmax_position(), SoftmaxPosition::AfterTopK);
    assert_eq!(c.normalization(), Normalization::None);
    assert!(!import_hf(QWEN3_MOE).unwrap().expects_expert_bias);
}

#[test]
fn norm_topk_prob_defaults_per_family_false_for_qwen2_qwen3_olmoe_true_for_qwen3_next() {
    for (mt, renorm) in [
        ("qwen2_moe", false),
        ("qwen3_moe", false),
        ("olmoe", false),
        ("qwen3_next", true),
    ] {
        let c = hf_value(&json!({"model_type": mt, "num_experts": 64, "num_experts_per_tok": 4})).unwrap();
        let pos = if renorm {
            SoftmaxPosition::AfterTopK
        } else {
            SoftmaxPosition::BeforeTopK
        };
        assert_eq!(c.softmax_position(), pos, "{mt}");
    }
}

#[test]
fn qwen3_next_is_renormalised_softmax_top10_of_512() {
    let c = hf(QWEN3_NEXT);
    assert_eq!((c.num_experts(), c.top_k()), (512, 10));
    assert_eq!(c.softmax_position(), SoftmaxPosition::AfterTopK);
}

#[test]
fn mixtral_always_renormalises_its_top2_softmax() {
    let c = hf(MIXTRAL);
    assert_eq!((c.num_experts(), c.top_k()), (8, 2));
    assert_eq!(c.score(), ScoreFunction::Softmax);
    assert_eq!(c.softmax_position(), SoftmaxPosition::AfterTopK);
    // Even a (wrong) norm_topk_prob key does not switch it off: Mixtral's code has no such flag.
    let v = edited(MIXTRAL, |m| {
        m.insert("norm_topk_prob".into(), json!(false));
    });
    assert_eq!(hf_value(&v).unwrap(), c);
}

#[test]
fn gpt_oss_is_topk_on_logits_then_softmax_over_the_k_selected() {
    let c = hf(GPT_OSS);
    assert_eq!((c.num_experts(), c.top_k()), (128, 4));
    assert_eq!(c.score(), ScoreFunction::Softmax);
    assert_eq!(c.softmax_position(), SoftmaxPosition::AfterTopK);
    assert_eq!(c.normalization(), Normalization::None);
}

#[test]
fn llama4_reads_text_config_and_routes_top1_by_sigmoid_without_normalisation() {
    let c = hf(LLAMA4);
    assert_eq!((c.num_experts(), c.top_k()), (16, 1));
    assert_eq!(c.score(), ScoreFunction::Sigmoid);
    assert_eq!(c.normalization(), Normalization::None);
    assert_eq!(c.scaling_factor(), 1.0);
    // The text config on its own (model_type llama4_text) gives the same rule.
    let v: Value = serde_json::from_str(LLAMA4).unwrap();
    assert_eq!(hf_value(&v["text_config"]).unwrap(), c);
}

#[test]
fn llama4_errors_name_the_nested_key() {
    let v = edited(LLAMA4, |m| {
        m.remove("text_config");
    });
    assert_eq!(missing_key(hf_value(&v)), "text_config");
    let v = edited(LLAMA4, |m| {
        m["text_config"].as_object_mut().unwrap().remove("num_local_experts");
    });
    assert_eq!(missing_key(hf_value(&v)), "text_config.num_local_experts");
}

#[test]
fn minimax_m2_is_sigmoid_with_routing_bias_renormalised_without_epsilon() {
    let imp = import_hf(MINIMAX_M2).unwrap();
    assert!(imp.expects_expert_bias);
    let c = imp.config;
    assert_eq!((c.num_experts(), c.top_k()), (256, 8));
    assert_eq!(c.score(), ScoreFunction::Sigmoid);
    assert_eq!(c.normalization(), Normalization::Sum { eps: 0.0 });
    assert_eq!(c.scaling_factor(), 1.0);
    let v = edited(MINIMAX_M2, |m| {
        m.insert("use_routing_bias".into(), json!(false));
    });
    assert!(!moe_router::import::import_hf_value(&v).unwrap().expects_expert_bias);
}

#[test]
fn minimax_m2_rejects_a_scaling_factor_the_implementations_disagree_on() {
    let v = edited(MINIMAX_M2, |m| {
        m.insert("routed_scaling_factor".into(), json!(2.0));
    });
    assert_eq!(bad_key(hf_value(&v)).0, "routed_scaling_factor");
}

#[test]
fn olmoe_is_unnormalised_softmax_top8_of_64() {
    let c = hf(OLMOE);
    assert_eq!((c.num_experts(), c.top_k()), (64, 8));
    assert_eq!(c.softmax_position(), SoftmaxPosition::BeforeTopK);
    assert_eq!(c.normalization(), Normalization::None);
}

#[test]
fn text_and_value_entry_points_agree() {
    for json in [DEEPSEEK_V2, DEEPSEEK_V3, QWEN3_MOE, LLAMA4, MINIMAX_M2] {
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(hf_value(&v).unwrap(), hf(json));
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face errors
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_model_type_is_an_error_listing_every_supported_type() {
    let err = RouterConfig::from_hf_config(r#"{"model_type": "llama", "hidden_size": 4096}"#).unwrap_err();
    assert!(matches!(err, ConfigError::UnsupportedModelType { ref found, .. } if found == "llama"));
    let msg = err.to_string();
    assert!(msg.contains("unsupported model_type"), "{msg}");
    for mt in SUPPORTED_MODEL_TYPES {
        assert!(msg.contains(mt), "{mt} missing from: {msg}");
    }
    // A MoE family this crate does not know is not guessed either.
    let err = RouterConfig::from_hf_config(r#"{"model_type": "gptsan-japanese", "num_experts": 16}"#).unwrap_err();
    assert!(err.to_string().contains("unsupported model_type"));
}

#[test]
fn malformed_json_is_a_json_error_with_its_position() {
    let err =
        RouterConfig::from_hf_config("{\n  \"model_type\": \"mixtral\",\n  \"num_local_experts\": 8,,\n}").unwrap_err();
    match err {
        ConfigError::Json { line, column, .. } => assert_eq!((line, column), (3, 26)),
        other => panic!("expected Json, got {other:?}"),
    }
    assert!(matches!(
        RouterConfig::from_megatron("{\"num_moe_experts\": 8"),
        Err(ConfigError::Json { .. })
    ));
}

#[test]
fn missing_required_keys_are_missing_key_errors() {
    assert_eq!(missing_key(hf_value(&json!({"num_local_experts": 8}))), "model_type");
    let v = edited(DEEPSEEK_V2, |m| {
        m.remove("num_experts_per_tok");
    });
    assert_eq!(missing_key(hf_value(&v)), "num_experts_per_tok");
    let v = edited(MIXTRAL, |m| {
        m.remove("num_local_experts");
    });
    assert_eq!(missing_key(hf_value(&v)), "num_local_experts");
    let v = edited(DEEPSEEK_V2, |m| {
        m.remove("n_group");
    });
    assert_eq!(
        missing_key(hf_value(&v)),
        "n_group",
        "group_limited_greedy needs its groups"
    );
    let e = hf_value(&json!({"model_type": "qwen3_moe", "num_experts_per_tok": 8})).unwrap_err();
    assert!(
        e.to_string()
            .contains("missing key `num_experts` in Hugging Face config"),
        "{e}"
    );
}

#[test]
fn wrong_types_and_values_are_bad_key_errors_naming_the_key() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"model_type": 7}), "model_type"),
        (
            json!({"model_type": "mixtral", "num_local_experts": "8", "num_experts_per_tok": 2}),
            "num_local_experts",
        ),
        (
            json!({"model_type": "mixtral", "num_local_experts": 8.5, "num_experts_per_tok": 2}),
            "num_local_experts",
        ),
        (
            json!({"model_type": "mixtral", "num_local_experts": 0, "num_experts_per_tok": 2}),
            "num_local_experts",
        ),
        (
            json!({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 9}),
            "num_experts_per_tok",
        ),
        (
            json!({"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": "yes"}),
            "norm_topk_prob",
        ),
        (
            json!({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
                   "scoring_func": "softmax"}),
            "scoring_func",
        ),
        (
            json!({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
                   "routed_scaling_factor": -1.0}),
            "routed_scaling_factor",
        ),
        (
            json!({"model_type": "deepseek_v3", "n_routed_experts": 100, "num_experts_per_tok": 8, "n_group": 8}),
            "n_group",
        ),
        (
            json!({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
                   "n_group": 8, "topk_group": 9}),
            "topk_group",
        ),
        (
            json!({"model_type": "deepseek_v2", "n_routed_experts": 64, "num_experts_per_tok": 6,
                   "topk_method": "noaux_tc"}),
            "topk_method",
        ),
        (json!({"model_type": "llama4", "text_config": [1, 2]}), "text_config"),
        (
            json!({"model_type": "llama4", "text_config": {"model_type": "llama4_vision_model",
                   "num_local_experts": 16, "num_experts_per_tok": 1}}),
            "text_config.model_type",
        ),
    ];
    for (v, key) in cases {
        let (k, reason) = bad_key(hf_value(&v));
        assert_eq!(k, key, "{v}: {reason}");
        assert!(!reason.is_empty());
    }
    let (k, _) = bad_key(hf_value(&json!([1, 2, 3])));
    assert_eq!(k, "<root>");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Keys the router does not read (attention sizes, quantisation, auto_map, ...) never change
    /// the imported rule, whatever their values.
    #[test]
    fn unrelated_keys_never_change_the_imported_rule(
        extra in prop::collection::btree_map("[a-z]{1,8}_x[a-z_]{0,8}", any::<i32>(), 0..6),
        fixture in 0usize..6,
    ) {
        let json = [DEEPSEEK_V3, KIMI_K2, QWEN3_MOE, MIXTRAL, GPT_OSS, MINIMAX_M2][fixture];
        let v = edited(json, |m| {
            for (k, x) in &extra {
                m.insert(k.clone(), json!(x));
            }
        });
        prop_assert_eq!(hf_value(&v).unwrap(), hf(json));
    }

    /// E and K come straight from the file for every softmax family.
    #[test]
    fn expert_count_and_top_k_come_from_the_file(e in 1usize..600, k_frac in 0.0f64..1.0, fam in 0usize..5) {
        let k = 1 + ((e - 1) as f64 * k_frac) as usize;
        let v = match fam {
            0 => json!({"model_type": "qwen2_moe", "num_experts": e, "num_experts_per_tok": k}),
            1 => json!({"model_type": "olmoe", "num_experts": e, "num_experts_per_tok": k}),
            2 => json!({"model_type": "mixtral", "num_local_experts": e, "num_experts_per_tok": k}),
            3 => json!({"model_type": "gpt_oss", "num_local_experts": e, "num_experts_per_tok": k}),
            _ => json!({"model_type": "minimax_m2", "num_local_experts": e, "num_experts_per_tok": k}),
        };
        let c = hf_value(&v).unwrap();
        prop_assert_eq!((c.num_experts(), c.top_k()), (e, k));
    }
}

// ---------------------------------------------------------------------------------------------
// Presets
// ---------------------------------------------------------------------------------------------

#[test]
fn presets_equal_the_import_of_the_published_config() {
    for (name, json) in [
        ("deepseek-v2", DEEPSEEK_V2),
        ("deepseek-v2-lite", DEEPSEEK_V2_LITE),
        ("deepseek-v3", DEEPSEEK_V3),
        ("kimi-k2", KIMI_K2),
        ("glm-4.5", GLM4_MOE),
        ("qwen2-moe", QWEN2_MOE),
        ("qwen3-moe", QWEN3_MOE),
        ("qwen3-next", QWEN3_NEXT),
        ("mixtral", MIXTRAL),
        ("gpt-oss-120b", GPT_OSS),
        ("llama4-scout", LLAMA4),
        ("minimax-m2", MINIMAX_M2),
        ("olmoe", OLMOE),
    ] {
        assert_eq!(preset(name).unwrap(), hf(json), "{name}");
        assert_eq!(
            preset_expects_expert_bias(name).unwrap(),
            import_hf(json).unwrap().expects_expert_bias,
            "{name}"
        );
    }
}

#[test]
fn every_named_preset_exists_and_is_built_from_its_embedded_config() {
    let required = [
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
    for name in required {
        assert!(preset_names().contains(&name), "{name}");
    }
    for name in preset_names() {
        let cfg = preset(name).unwrap();
        assert_eq!(cfg, hf(preset_hf_config(name).unwrap()), "{name}");
        assert!(cfg.expert_bias().is_none(), "{name}: presets carry no bias values");
        assert_eq!(
            cfg.expects_expert_bias(),
            preset_expects_expert_bias(name).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        (
            preset("gpt-oss-20b").unwrap().num_experts(),
            preset("gpt-oss-20b").unwrap().top_k()
        ),
        (32, 4)
    );
    let m = preset("llama4-maverick").unwrap();
    assert_eq!(
        (m.num_experts(), m.top_k(), m.score()),
        (128, 1, ScoreFunction::Sigmoid)
    );
}

#[test]
fn unknown_preset_is_an_error_listing_every_preset() {
    let err = preset("deepseek-v4").unwrap_err();
    assert!(matches!(err, ConfigError::UnknownPreset { ref found, .. } if found == "deepseek-v4"));
    let msg = err.to_string();
    for name in preset_names() {
        assert!(msg.contains(name), "{name} missing from: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// MoE layer ids from a Hugging Face config.json
// ---------------------------------------------------------------------------------------------

fn ids(r: std::ops::RangeInclusive<u32>) -> Vec<u32> {
    r.collect()
}

#[test]
fn moe_layer_ids_of_every_published_config_follow_the_family_rule() {
    let cases: Vec<(&str, &str, Vec<u32>, Vec<u32>)> = vec![
        // first_k_dense_replace dense layers first.
        ("deepseek_v2", DEEPSEEK_V2, ids(1..=59), vec![]),
        ("deepseek_v2_lite", DEEPSEEK_V2_LITE, ids(1..=26), vec![]),
        // ... plus one MTP block after the 61 decoder layers.
        ("deepseek_v3", DEEPSEEK_V3, ids(3..=60), vec![61]),
        ("glm4_moe", GLM4_MOE, ids(3..=91), vec![92]),
        ("kimi_k2", KIMI_K2, ids(1..=60), vec![]),
        // Qwen3-30B-A3B: every one of its 48 layers is MoE, 0-47 (not 1-47).
        ("qwen3_moe", QWEN3_MOE, ids(0..=47), vec![]),
        ("qwen2_moe", QWEN2_MOE, ids(0..=23), vec![]),
        ("qwen3_next", QWEN3_NEXT, ids(0..=47), vec![]),
        ("mixtral", MIXTRAL, ids(0..=31), vec![]),
        ("olmoe", OLMOE, ids(0..=15), vec![]),
        ("gpt_oss", GPT_OSS, ids(0..=35), vec![]),
        ("minimax_m2", MINIMAX_M2, ids(0..=61), vec![]),
        ("llama4", LLAMA4, ids(0..=47), vec![]),
    ];
    for (name, json, layers, mtp) in cases {
        let m = hf_moe_layers(json).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.layers, layers, "{name}");
        assert_eq!(m.mtp_layers, mtp, "{name}");
        assert_eq!(m.with_mtp(), [layers, mtp].concat(), "{name}");
    }
}

#[test]
fn moe_layer_ids_honour_sparse_steps_dense_lists_frequencies_and_interleaving() {
    let m = |v: Value| hf_moe_layers_value(&v).unwrap().layers;
    // Qwen: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    assert_eq!(
        m(json!({"model_type": "qwen2_moe", "num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3]})),
        vec![1, 5, 7]
    );
    // DeepSeek: i >= first_k_dense_replace and i % moe_layer_freq == 0.
    assert_eq!(
        m(
            json!({"model_type": "deepseek_v2", "num_hidden_layers": 7, "first_k_dense_replace": 1, "moe_layer_freq": 2})
        ),
        vec![2, 4, 6]
    );
    // Family defaults: DeepSeek-V3 keeps 3 dense layers, GLM-4.5 one, DeepSeek-V2 none.
    assert_eq!(
        m(json!({"model_type": "deepseek_v3", "num_hidden_layers": 5})),
        vec![3, 4]
    );
    assert_eq!(m(json!({"model_type": "glm4_moe", "num_hidden_layers": 3})), vec![1, 2]);
    assert_eq!(
        m(json!({"model_type": "deepseek_v2", "num_hidden_layers": 2})),
        vec![0, 1]
    );
    // Llama 4: every interleave_moe_layer_step-th layer, or the explicit moe_layers.
    assert_eq!(
        m(json!({"model_type": "llama4_text", "num_hidden_layers": 6, "interleave_moe_layer_step": 2})),
        vec![1, 3, 5]
    );
    assert_eq!(
        m(json!({"model_type": "llama4", "text_config": {"num_hidden_layers": 6, "moe_layers": [4, 0]}})),
        vec![0, 4]
    );
}

#[test]
fn moe_layer_ids_refuse_configs_that_do_not_say_or_leave_no_moe_layer() {
    let err = |v: Value| hf_moe_layers_value(&v).unwrap_err();
    assert!(matches!(
        err(json!({"model_type": "mixtral"})),
        ConfigError::MissingKey { ref key, .. } if key == "num_hidden_layers"
    ));
    // Kimi-K2's remote class default (0) is not the model's: the key is required.
    assert!(matches!(
        err(json!({"model_type": "kimi_k2", "num_hidden_layers": 61})),
        ConfigError::MissingKey { ref key, .. } if key == "first_k_dense_replace"
    ));
    let (key, _) = bad_key(Err(err(
        json!({"model_type": "deepseek_v3", "num_hidden_layers": 3, "first_k_dense_replace": 3}),
    )));
    assert_eq!(key, "num_hidden_layers");
    let (key, reason) = bad_key(Err(err(
        json!({"model_type": "qwen3_moe", "num_hidden_layers": 4, "mlp_only_layers": [9]}),
    )));
    assert_eq!(key, "mlp_only_layers", "{reason}");
    let (key, _) = bad_key(Err(err(
        json!({"model_type": "qwen3_moe", "num_hidden_layers": 4, "mlp_only_layers": "none"}),
    )));
    assert_eq!(key, "mlp_only_layers");
    assert!(matches!(
        err(json!({"model_type": "gptsan-japanese", "num_hidden_layers": 4})),
        ConfigError::UnsupportedModelType { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Megatron
// ---------------------------------------------------------------------------------------------

#[test]
fn megatron_deepseek_v3_options_give_the_hf_deepseek_v3_rule_plus_zero_bias_and_seq_aux_loss() {
    let c = RouterConfig::from_megatron(MEGATRON_DSV3).unwrap();
    let h = hf(DEEPSEEK_V3);
    assert_eq!(
        (c.num_experts(), c.top_k(), c.score()),
        (h.num_experts(), h.top_k(), h.score())
    );
    // Megatron: group score = sum of top-(K / group_topk) = top-(8 / 4) = top-2, as in HF.
    assert_eq!(c.group_limit(), h.group_limit());
    assert_eq!(c.normalization(), h.normalization());
    assert_eq!(c.scaling_factor(), h.scaling_factor());
    assert_eq!(c.expert_bias(), Some(&[0.0f32; 256][..]));
    assert_eq!(c.bias_update_rate(), Some(1e-3));
    assert_eq!(
        c.aux_losses(),
        &[AuxLoss {
            kind: AuxLossKind::PerSequence,
            coeff: 1e-4
        }]
    );
    assert_eq!(
        (c.z_loss_coeff(), c.capacity(), c.compute_dtype()),
        (0.0, None, ComputeDtype::F32)
    );
}

#[test]
fn megatron_sigmoid_top1_is_not_renormalised_but_top2_is() {
    let c = meg(json!({"num_moe_experts": 16, "moe_router_topk": 1, "moe_router_score_function": "sigmoid"})).unwrap();
    assert_eq!(c.normalization(), Normalization::None);
    let c = meg(json!({"num_moe_experts": 16, "moe_router_topk": 2, "moe_router_score_function": "sigmoid"})).unwrap();
    assert_eq!(c.normalization(), Normalization::Sum { eps: 1e-20 });
    let c =
        meg(json!({"num_moe_experts": 16, "moe_router_topk": 4, "moe_router_score_function": "sqrtsoftplus"})).unwrap();
    assert_eq!(
        (c.score(), c.normalization()),
        (ScoreFunction::SqrtSoftplus, Normalization::Sum { eps: 1e-20 })
    );
}

#[test]
fn megatron_pre_softmax_is_softmax_before_topk_without_renormalisation() {
    for k in [1, 4] {
        let c = meg(json!({"num_moe_experts": 16, "moe_router_topk": k, "moe_router_pre_softmax": true})).unwrap();
        assert_eq!(c.softmax_position(), SoftmaxPosition::BeforeTopK);
        assert_eq!(c.normalization(), Normalization::None);
    }
}

#[test]
fn megatron_default_softmax_is_topk_then_softmax_and_top1_without_pre_softmax_is_rejected() {
    let c = meg(json!({"num_moe_experts": 8})).unwrap();
    assert_eq!((c.top_k(), c.score()), (2, ScoreFunction::Softmax));
    assert_eq!(c.softmax_position(), SoftmaxPosition::AfterTopK);
    assert!(c.aux_losses().is_empty(), "default aux_loss with coefficient 0 is off");
    let (key, _) = bad_key(meg(json!({"num_moe_experts": 8, "moe_router_topk": 1})));
    assert_eq!(key, "moe_router_pre_softmax");
}

#[test]
fn megatron_group_score_sums_the_top_k_over_group_topk_keys() {
    let c = meg(
        json!({"num_moe_experts": 64, "moe_router_topk": 8, "moe_router_score_function": "sigmoid",
                       "moe_router_num_groups": 8, "moe_router_group_topk": 2}),
    )
    .unwrap();
    assert_eq!(c.group_limit(), group(8, 2, GroupScore::SumTopN(4)));
    // Pre-softmax with groups sums probabilities and keeps its literal form.
    let c = meg(
        json!({"num_moe_experts": 64, "moe_router_topk": 6, "moe_router_pre_softmax": true,
                       "moe_router_num_groups": 8, "moe_router_group_topk": 3}),
    )
    .unwrap();
    assert_eq!(c.group_limit(), group(8, 3, GroupScore::SumTopN(2)));
    assert_eq!(c.softmax_position(), SoftmaxPosition::BeforeTopK);
    // num_groups alone (no group_topk) is inactive, as in Megatron.
    let c = meg(json!({"num_moe_experts": 64, "moe_router_num_groups": 8})).unwrap();
    assert_eq!(c.group_limit(), None);
}

#[test]
fn megatron_load_balancing_list_pairs_each_type_with_its_coefficient() {
    let c = meg(json!({"num_moe_experts": 32, "moe_router_topk": 4,
                       "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
                       "moe_aux_loss_coeff": [0.01, 0.001, 0.0, 0.5],
                       "moe_z_loss_coeff": 0.001}))
    .unwrap();
    assert_eq!(
        c.aux_losses(),
        &[
            AuxLoss {
                kind: AuxLossKind::MicroBatch,
                coeff: 0.01
            },
            AuxLoss {
                kind: AuxLossKind::PerSequence,
                coeff: 0.001
            },
        ],
        "coefficient 0 is off and `none` adds nothing"
    );
    assert_eq!(c.z_loss_coeff(), 0.001);
    let (key, _) = bad_key(meg(json!({"num_moe_experts": 32,
        "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"], "moe_aux_loss_coeff": [0.01]})));
    assert_eq!(key, "moe_aux_loss_coeff");
    let (key, _) = bad_key(meg(json!({"num_moe_experts": 32,
        "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"], "moe_aux_loss_coeff": 0.01})));
    assert_eq!(key, "moe_aux_loss_coeff");
    let c = meg(
        json!({"num_moe_experts": 32, "moe_router_load_balancing_type": "global_aux_loss",
                       "moe_aux_loss_coeff": 0.02}),
    )
    .unwrap();
    assert_eq!(c.aux_losses()[0].kind, AuxLossKind::Global);
}

#[test]
fn megatron_capacity_factor_negative_or_null_means_no_dropping() {
    for cf in [json!(-1.0), Value::Null] {
        let c = meg(json!({"num_moe_experts": 8, "moe_expert_capacity_factor": cf})).unwrap();
        assert_eq!(c.capacity(), None);
    }
    let c = meg(json!({"num_moe_experts": 8, "moe_expert_capacity_factor": 1.25,
                       "moe_token_drop_policy": "position", "moe_pad_expert_input_to_capacity": true}))
    .unwrap();
    assert_eq!(
        c.capacity(),
        Some(Capacity {
            factor: 1.25,
            min_capacity: None,
            policy: DropPolicy::Position,
            pad_to_capacity: true
        })
    );
    let c = meg(json!({"num_moe_experts": 8, "moe_expert_capacity_factor": 2})).unwrap();
    assert_eq!(c.capacity().unwrap().policy, DropPolicy::Probs);
}

#[test]
fn megatron_validations_are_errors_naming_the_option() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"num_moe_experts": 8, "moe_pad_expert_input_to_capacity": true}),
            "moe_pad_expert_input_to_capacity",
        ),
        (
            json!({"num_moe_experts": 8, "moe_pad_expert_input_to_capacity": true, "moe_expert_capacity_factor": -1}),
            "moe_pad_expert_input_to_capacity",
        ),
        (
            json!({"num_moe_experts": 64, "moe_router_group_topk": 2}),
            "moe_router_group_topk",
        ),
        (
            json!({"num_moe_experts": 60, "moe_router_num_groups": 8, "moe_router_group_topk": 2}),
            "moe_router_num_groups",
        ),
        (
            json!({"num_moe_experts": 64, "moe_router_num_groups": 8, "moe_router_group_topk": 9}),
            "moe_router_group_topk",
        ),
        (
            json!({"num_moe_experts": 64, "moe_router_topk": 2, "moe_router_num_groups": 8, "moe_router_group_topk": 4}),
            "moe_router_group_topk",
        ),
        (
            json!({"num_moe_experts": 64, "moe_router_enable_expert_bias": true}),
            "moe_router_enable_expert_bias",
        ),
        (
            json!({"num_moe_experts": 64, "moe_router_score_function": "relu"}),
            "moe_router_score_function",
        ),
        (
            json!({"num_moe_experts": 64, "moe_router_dtype": "bf16"}),
            "moe_router_dtype",
        ),
        (
            json!({"num_moe_experts": 64, "moe_token_drop_policy": "random"}),
            "moe_token_drop_policy",
        ),
        (json!({"num_moe_experts": 64, "moe_router_topk": 65}), "moe_router_topk"),
        (
            json!({"num_moe_experts": 64, "moe_router_topk_limited_devices": 4}),
            "moe_router_topk_limited_devices",
        ),
        (json!({"num_moe_experts": "64"}), "num_moe_experts"),
    ];
    for (v, key) in cases {
        let (k, reason) = bad_key(meg(v.clone()));
        assert_eq!(k, key, "{v}: {reason}");
    }
    assert_eq!(missing_key(meg(json!({"moe_router_topk": 2}))), "num_moe_experts");
    assert_eq!(missing_key(meg(json!({"num_moe_experts": null}))), "num_moe_experts");
}

#[test]
fn megatron_sinkhorn_is_rejected_as_unsupported() {
    for t in [json!("sinkhorn"), json!(["aux_loss", "sinkhorn"])] {
        let coeff = if t.is_array() { json!([0.01, 0.0]) } else { json!(0.0) };
        let err = meg(
            json!({"num_moe_experts": 8, "moe_router_topk": 1, "moe_router_load_balancing_type": t,
                             "moe_aux_loss_coeff": coeff}),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sinkhorn") && msg.contains("not supported"), "{msg}");
    }
}

#[test]
fn megatron_unknown_moe_key_is_refused_naming_it_and_the_nearest_known_key() {
    for (typo, nearest) in [
        ("moe_router_score_functon", "moe_router_score_function"),
        ("moe_router_topK", "moe_router_topk"),
        ("moe_aux_loss_coef", "moe_aux_loss_coeff"),
        ("moe_router_enable_expert_biass", "moe_router_enable_expert_bias"),
    ] {
        let mut v = json!({"num_moe_experts": 64, "moe_router_topk": 4});
        v[typo] = json!("sigmoid");
        let (key, reason) = bad_key(meg(v));
        assert_eq!(key, typo);
        assert!(reason.contains(&format!("`{nearest}`")), "{typo}: {reason}");
    }
}

#[test]
fn megatron_moe_options_that_do_not_change_routing_are_accepted_and_ignored() {
    let plain = json!({"num_moe_experts": 64, "moe_router_topk": 4});
    let mut busy = plain.clone();
    for (k, v) in [
        ("moe_grouped_gemm", json!(true)),
        ("moe_token_dispatcher_type", json!("alltoall")),
        ("moe_ffn_hidden_size", json!(1408)),
        ("moe_layer_freq", json!([0, 1, 1])),
        ("moe_permute_fusion", json!(true)),
        ("moe_enable_routing_replay", json!(true)),
        ("num_layers", json!(27)),
        ("not_a_moe_key_at_all", json!(1)),
    ] {
        busy[k] = v;
    }
    assert_eq!(meg(busy).unwrap(), meg(plain).unwrap());
}

#[test]
fn megatron_bias_update_rate_follows_the_builders_rule_reported_under_its_key() {
    for rate in [-1e-3, -1.0] {
        let (key, reason) = bad_key(meg(json!({
            "num_moe_experts": 64, "moe_router_topk": 4, "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": true, "moe_router_bias_update_rate": rate
        })));
        assert_eq!(key, "moe_router_bias_update_rate");
        // The same rule (and words) as the builder's.
        let builder = RouterConfig::builder(64, 4)
            .bias_update_rate(rate as f32)
            .build()
            .unwrap_err();
        match builder {
            ConfigError::Invalid {
                field: "bias_update_rate",
                reason: r,
            } => assert_eq!(reason, r),
            other => panic!("{other:?}"),
        }
    }
    let (key, _) = bad_key(meg(json!({"num_moe_experts": 64, "moe_router_force_biased": 0.01})));
    assert_eq!(key, "moe_router_force_biased");
}

#[test]
fn megatron_router_dtype_and_scaling_factor() {
    let c =
        meg(json!({"num_moe_experts": 8, "moe_router_dtype": "fp64", "moe_router_topk_scaling_factor": 1.5})).unwrap();
    assert_eq!((c.compute_dtype(), c.scaling_factor()), (ComputeDtype::F64, 1.5));
    // Megatron's `if scaling_factor:` treats null and 0 as "no scaling".
    for s in [Value::Null, json!(0.0)] {
        let c = meg(json!({"num_moe_experts": 8, "moe_router_topk_scaling_factor": s})).unwrap();
        assert_eq!(c.scaling_factor(), 1.0);
    }
}
