//! The bad-input catalogue: every malformed input is a typed error that says what and where —
//! never a panic, never a silent default.

use moe_router::Router;
use moe_router::cpu::CpuRouter;
use moe_router::npy::{self, NpyError};
use moe_router::{ConfigError, LogitsRef, ReferenceRouter, RouteError, RouterConfig, ScoreFunction};
use ndarray::{Array2, array};

#[test]
fn nan_and_positive_infinity_logits_name_row_and_expert() {
    let cfg = RouterConfig::builder(4, 2).build().unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let mut l = Array2::<f32>::zeros((3, 4));
        l[[1, 2]] = bad;
        for r in [
            ReferenceRouter::new(cfg.clone())
                .route_host(&LogitsRef::F32(l.view()))
                .map(|_| ()),
            CpuRouter::new(cfg.clone())
                .route_host(&LogitsRef::F32(l.view()))
                .map(|_| ()),
        ] {
            let e = r.unwrap_err();
            assert!(
                matches!(e, RouteError::NonFiniteLogit { row: 1, expert: 2, .. }),
                "{e:?}"
            );
            assert!(e.to_string().contains("row 1"));
        }
    }
}

#[test]
fn top_k_larger_than_experts_is_a_config_error_naming_top_k() {
    let e = RouterConfig::builder(4, 5).build().unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { field: "top_k", .. }), "{e}");
}

#[test]
fn impossible_configs_name_their_field() {
    let cases: Vec<(RouterConfig, &str)> = vec![];
    assert!(cases.is_empty());
    let b = || RouterConfig::builder(16, 4);
    let field = |r: Result<RouterConfig, ConfigError>| match r {
        Err(ConfigError::Invalid { field, .. }) => field,
        other => panic!("expected Invalid, got {other:?}"),
    };
    assert_eq!(field(RouterConfig::builder(16, 0).build()), "top_k");
    assert_eq!(field(RouterConfig::builder(0, 1).build()), "num_experts");
    assert_eq!(
        field(b().group_limit(3, 1, moe_router::GroupScore::Max).build()),
        "group_limit.num_groups"
    );
    assert_eq!(
        field(b().group_limit(8, 1, moe_router::GroupScore::Max).build()),
        "group_limit.groups_selected"
    );
    assert_eq!(
        field(b().group_limit(4, 5, moe_router::GroupScore::Max).build()),
        "group_limit.groups_selected"
    );
    assert_eq!(
        field(b().group_limit(4, 2, moe_router::GroupScore::SumTopN(5)).build()),
        "group_limit.score"
    );
    assert_eq!(field(b().scaling_factor(f32::NAN).build()), "scaling_factor");
    assert_eq!(field(b().scaling_factor(0.0).build()), "scaling_factor");
    assert_eq!(field(b().scaling_factor(f32::INFINITY).build()), "scaling_factor");
    let cap = |f: f64| moe_router::Capacity {
        factor: f,
        min_capacity: None,
        policy: moe_router::DropPolicy::Probs,
        pad_to_capacity: false,
    };
    assert_eq!(field(b().capacity(cap(0.0)).build()), "capacity.factor");
    assert_eq!(field(b().capacity(cap(-1.0)).build()), "capacity.factor");
    assert_eq!(
        field(b().normalization(moe_router::Normalization::Sum { eps: -1.0 }).build()),
        "normalization.eps"
    );
    assert_eq!(
        field(b().aux_loss(moe_router::AuxLossKind::MicroBatch, f64::NAN).build()),
        "aux_losses.coeff"
    );
    assert_eq!(field(b().z_loss_coeff(-1.0).build()), "z_loss_coeff");
}

#[test]
fn wrong_bias_length_or_values_or_softmax_bias_is_rejected() {
    let b = || RouterConfig::builder(4, 2).score(ScoreFunction::Sigmoid);
    assert!(matches!(
        b().expert_bias(vec![0.0; 3]).build(),
        Err(ConfigError::Invalid {
            field: "expert_bias",
            ..
        })
    ));
    assert!(matches!(
        b().expert_bias(vec![0.0, f32::NAN, 0.0, 0.0]).build(),
        Err(ConfigError::Invalid {
            field: "expert_bias",
            ..
        })
    ));
    assert!(matches!(
        RouterConfig::builder(4, 2).expert_bias(vec![0.0; 4]).build(),
        Err(ConfigError::Invalid {
            field: "expert_bias",
            ..
        })
    ));
    let mut cfg = b().build().unwrap();
    assert!(cfg.set_expert_bias(vec![0.0; 5]).is_err());
}

#[test]
fn replay_ids_out_of_range_duplicated_or_misshapen_name_the_row() {
    let cfg = RouterConfig::builder(4, 2).build().unwrap();
    let l = Array2::<f32>::zeros((3, 4));
    let r = CpuRouter::new(cfg);
    let lv = LogitsRef::F32(l.view());
    let e = r
        .weights_host(&lv, array![[0u32, 1], [2, 4], [0, 1]].view())
        .unwrap_err();
    assert!(
        matches!(
            e,
            RouteError::IdOutOfRange {
                row: 1,
                slot: 1,
                id: 4,
                num_experts: 4
            }
        ),
        "{e}"
    );
    let e = r
        .weights_host(&lv, array![[0u32, 1], [2, 3], [3, 3]].view())
        .unwrap_err();
    assert!(matches!(e, RouteError::DuplicateId { row: 2, id: 3, .. }), "{e}");
    let e = r
        .weights_host(&lv, array![[0u32, 1, 2], [2, 3, 0], [1, 3, 0]].view())
        .unwrap_err();
    assert!(
        matches!(
            e,
            RouteError::IdsShape {
                expected_k: 2,
                cols: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let e = RouterConfig::from_hf_config(r#"{"model_type": "llama", "num_experts": 8}"#).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("unsupported model_type"), "{msg}");
    assert!(msg.contains("deepseek_v3") && msg.contains("mixtral"), "{msg}");
}

#[test]
fn malformed_json_reports_line_and_column() {
    let e = RouterConfig::from_hf_config("{\n  \"model_type\": \"mixtral\",,\n}").unwrap_err();
    assert!(matches!(e, ConfigError::Json { line: 2, .. }), "{e:?}");
    let e = RouterConfig::from_megatron("[1, 2").unwrap_err();
    assert!(matches!(e, ConfigError::Json { .. }), "{e:?}");
}

#[test]
fn truncated_npy_reports_the_byte_offset_at_every_cut() {
    let data: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let bytes = npy::to_bytes(&[4, 6], npy::NpyDtype::F32, &npy::f32_bytes(&data));
    assert_eq!(npy::parse(&bytes).unwrap().to_f32("x").unwrap(), data);
    for cut in 0..bytes.len() {
        let e = npy::parse(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(
                e,
                NpyError::Truncated { .. } | NpyError::BadMagic | NpyError::Header { .. }
            ),
            "cut {cut}: {e:?}"
        );
    }
    let e = npy::parse(&bytes[..bytes.len() - 3]).unwrap_err();
    assert!(
        matches!(
            e,
            NpyError::Truncated {
                offset: 128,
                needed: 96,
                available: 93
            }
        ),
        "{e:?}"
    );
}

#[test]
fn npy_integer_values_that_do_not_fit_are_refused_not_wrapped() {
    let v: Vec<u8> = [300i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let a = npy::parse(&npy::to_bytes(&[2], npy::NpyDtype::I64, &v)).unwrap();
    assert_eq!(a.to_ints("ids").unwrap(), vec![300, -1]);
    assert!(a.to_f32("ids").is_err(), "integers are not silently read as floats");
}

#[test]
fn all_masked_softmax_row_is_a_typed_error() {
    let cfg = RouterConfig::builder(3, 1).build().unwrap();
    let l = array![
        [0.0f32, 1.0, 2.0],
        [f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY]
    ];
    let e = CpuRouter::new(cfg).route_host(&LogitsRef::F32(l.view())).unwrap_err();
    assert_eq!(e, RouteError::AllMasked { row: 1 });
}
