//! The routing rules and MoE-layer rules of the families added after the first import table:
//! ERNIE-4.5 (text and VL), LongCat-Flash, Aria, AFMoE, Mistral 4, Ling / Ring (Bailing, remote
//! code), and the layer maps of the DeepSeek-V3-rule families whose layer keys differ from
//! DeepSeek's (Nemotron-H, GLM-4.7-Flash, GLM-5, Solar Open, K-EXAONE). The parent module's docs
//! hold the table; each function names the modeling code it restates.

use super::{Keys, checked_k, experts_and_k, finish, groups};
use crate::config::{GroupScore, Normalization, RouterConfig, RouterConfigBuilder, ScoreFunction, SoftmaxPosition};
use crate::error::ConfigError;
use serde_json::Value;

/// ERNIE-4.5-MoE (`Ernie4_5_MoeTopKRouter.forward`) and ERNIE-4.5-VL's text and vision routers
/// (`Ernie4_5_VLMoeMoeTopKRouter`, the same class): softmax over E in f32; top-k of
/// `softmax + moe_statics.e_score_correction_bias`; weights = the unbiased probabilities of the
/// selected experts, divided by `max(Σw, moe_norm_min)` (default 1e-12). The bias is always part
/// of the rule (the module holds it even when a checkpoint lacks it, as zeros).
pub(super) fn ernie(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, _) = k.req_count_any(&["moe_num_experts", "num_experts"])?;
    let (top_k, k_key) = k.req_count_any(&["moe_k", "num_experts_per_tok"])?;
    let (e, top_k) = checked_k(k, k_key, e, top_k)?;
    let min = k.opt_clamp_min("moe_norm_min")?.unwrap_or(1e-12);
    let b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::SumClampMin { min })
        .expect_expert_bias();
    Ok((finish(b)?, true))
}

/// LongCat-Flash (`LongcatFlashTopkRouter.forward`): softmax over `n_routed_experts +
/// zero_expert_num` experts (ids from `n_routed_experts` on are the identity "zero-computation"
/// experts); top-k of `softmax + e_score_correction_bias`; weights = the unbiased probabilities
/// times `routed_scaling_factor` (default 6.0), never normalised. `zero_expert_num` absent takes
/// the configuration class's default 256; `null` means none (the router reads `zero_expert_num or
/// 0`).
pub(super) fn longcat_flash(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (routed, _) = k.req_count_any(&["n_routed_experts", "num_local_experts"])?;
    let zero = match k.obj.get("zero_expert_num") {
        None => 256,
        Some(Value::Null) => 0,
        Some(_) => k.opt_index("zero_expert_num")?.unwrap_or(0),
    };
    let e = routed
        .checked_add(zero)
        .ok_or_else(|| k.bad("zero_expert_num", format!("{zero} is too large")))?;
    let (top_k, k_key) = k.req_count_any(&["moe_topk", "num_experts_per_tok"])?;
    let (e, top_k) = checked_k(k, k_key, e, top_k)?;
    if k.opt_bool("norm_topk_prob")? == Some(true) {
        return Err(k.bad(
            "norm_topk_prob",
            "true: transformers' LongcatFlashTopkRouter never normalises the selected probabilities while \
             other implementations of LongCat-Flash honour this key; the rule is ambiguous",
        ));
    }
    let scale = k.opt_scale("routed_scaling_factor")?.unwrap_or(6.0);
    let b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .scaling_factor(scale)
        .expect_expert_bias();
    Ok((finish(b)?, true))
}

/// Aria (`AriaExperts.route_tokens_to_experts`, in `text_config`): top-k on the logits, then
/// softmax over the K selected logits (GPT-OSS's rule). E is `moe_num_experts`, K `moe_topk`.
pub(super) fn aria(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let e = k.req_count("moe_num_experts")?;
    let top_k = k.req_count("moe_topk")?;
    let (e, top_k) = checked_k(k, "moe_topk", e, top_k)?;
    let b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::AfterTopK);
    Ok((finish(b)?, false))
}

/// AFMoE / Arcee Trinity (`AfmoeTokenChoiceRouter.forward`): sigmoid in f32; top-k of
/// `sigmoid + expert_bias` (the MoE block's `expert_bias`); weights = unbiased sigmoid
/// `/ (Σw + 1e-20)`, times `route_scale` (default 1). The transformers router implements sigmoid
/// scores and the normalisation only; a config that asks otherwise (`score_func`, `route_norm:
/// false`, which Arcee's remote code honours) is ambiguous and refused.
pub(super) fn afmoe(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["num_experts"])?;
    k.check_str("score_func", &["sigmoid"])?;
    if k.opt_bool("route_norm")? == Some(false) {
        return Err(k.bad(
            "route_norm",
            "false: transformers' AfmoeTokenChoiceRouter always normalises the selected scores while \
             Arcee's remote code skips it; the rule is ambiguous",
        ));
    }
    let scale = k.opt_scale("route_scale")?.unwrap_or(1.0);
    let b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Sigmoid)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .scaling_factor(scale)
        .expect_expert_bias();
    Ok((finish(b)?, true))
}

/// Group limit scored by the sum of each group's two best keys (DeepSeek-V3's rule and its
/// copies), validated against E and K; no-op when every group is kept.
pub(super) fn top2_groups(
    k: &Keys<'_>,
    b: RouterConfigBuilder,
    e: usize,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
) -> Result<RouterConfigBuilder, ConfigError> {
    let Some((g, kept)) = groups(k, e, n_group, topk_group)? else {
        return Ok(b);
    };
    let per = e / g;
    if per < 2 {
        return Err(k.bad(
            "n_group",
            format!("groups of {per} expert cannot be scored by their top-2 (the model's group rule)"),
        ));
    }
    if kept * per < top_k {
        return Err(k.bad(
            "topk_group",
            format!("{kept} groups of {per} experts cannot hold num_experts_per_tok = {top_k}"),
        ));
    }
    Ok(b.group_limit(g, kept, GroupScore::SumTopN(2)))
}

/// Mistral 4 (`Mistral4MoE.route_tokens_to_experts`): softmax over E; groups scored by the sum of
/// their two best probabilities, keep `topk_group` of `n_group` (defaults 1 and 1: no limit);
/// top-k of the probabilities; `w / (Σw + 1e-20)` if `norm_topk_prob` (default true); times
/// `routed_scaling_factor` (default 1). No selection bias.
pub(super) fn mistral4(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["n_routed_experts", "num_local_experts"])?;
    let n_group = k.count_or("n_group", 1)?;
    let topk_group = k.count_or("topk_group", 1)?;
    let mut b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK);
    b = top2_groups(k, b, e, top_k, n_group, topk_group)?;
    if k.bool_or("norm_topk_prob", true)? {
        b = b.normalization(Normalization::Sum { eps: 1e-20 });
    }
    b = b.scaling_factor(k.opt_scale("routed_scaling_factor")?.unwrap_or(1.0));
    Ok((finish(b)?, false))
}

/// Ling / Ring 1.x (`bailing_moe`, inclusionAI's remote `modeling_bailing_moe.py`,
/// `BailingMoeGate.forward`): softmax over E in f32, top-k, and `w / Σw` when K > 1 and
/// `norm_topk_prob` (the remote configuration's default: true).
pub(super) fn bailing_moe(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["num_experts"])?;
    let mut b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK);
    if top_k > 1 && k.bool_or("norm_topk_prob", true)? {
        b = b.normalization(Normalization::Sum { eps: 0.0 });
    }
    Ok((finish(b)?, false))
}

/// Ling / Ring 2.0 (`bailing_moe_v2`, inclusionAI's remote `modeling_bailing_moe_v2.py`,
/// `BailingMoeV2Gate.forward`): sigmoid in f32; top-k of `sigmoid + expert_bias` (the gate's
/// `expert_bias` buffer) within the `topk_group` of `n_group` groups with the best sum of their
/// top-2 keys (experts of dropped groups are −∞, as in this crate); weights = unbiased sigmoid,
/// `/ (Σw + 1e-20)` when K > 1 (whatever `norm_topk_prob` says), times `routed_scaling_factor`.
/// Absent keys take the remote configuration class's defaults (8 groups, keep 4, scale 2.5).
/// `moe_router_enable_expert_bias: false` means no bias; a `score_function` other than sigmoid, or
/// `norm_topk_prob: false` with K > 1 (which the remote gate ignores and other implementations
/// honour), is refused as ambiguous.
pub(super) fn bailing_moe_v2(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["num_experts"])?;
    k.check_str("score_function", &["sigmoid"])?;
    if top_k > 1 && k.opt_bool("norm_topk_prob")? == Some(false) {
        return Err(k.bad(
            "norm_topk_prob",
            "false: the published BailingMoeV2Gate always normalises when K > 1 while other implementations \
             honour this key; the rule is ambiguous",
        ));
    }
    let n_group = k.count_or("n_group", 8)?;
    let topk_group = k.count_or("topk_group", 4)?;
    let scale = k.opt_scale("routed_scaling_factor")?.unwrap_or(2.5);
    let bias = k.bool_or("moe_router_enable_expert_bias", true)?;
    let mut b = RouterConfig::builder(e, top_k).score(ScoreFunction::Sigmoid);
    b = top2_groups(k, b, e, top_k, n_group, topk_group)?;
    if top_k > 1 {
        b = b.normalization(Normalization::Sum { eps: 1e-20 });
    }
    b = b.scaling_factor(scale);
    if bias {
        b = b.expect_expert_bias();
    }
    Ok((finish(b)?, bias))
}

/// A Nemotron-H checkpoint routes only if its layer pattern holds a MoE block (the earlier
/// Nemotron-H models are dense hybrids with the same `model_type`).
pub(super) fn nemotron_h_has_moe(k: &Keys<'_>) -> Result<(), ConfigError> {
    let (types, key) = nemotron_h_types(k)?;
    if !types.iter().any(|&t| t) {
        return Err(k.bad(
            key,
            "no MoE block (\"moe\" / 'E'): this Nemotron-H checkpoint is a dense hybrid, nothing to route",
        ));
    }
    Ok(())
}

/// Nemotron-H's per-layer MoE flags and the key they came from: `layers_block_type` (alias
/// `layer_types`), else the legacy `hybrid_override_pattern` string (`M` Mamba, `E` MoE, `*`
/// attention, `-` MLP), else the configuration class's default (four layers, the second MoE).
fn nemotron_h_types(k: &Keys<'_>) -> Result<(Vec<bool>, &'static str), ConfigError> {
    for key in ["layers_block_type", "layer_types"] {
        if let Some(list) = k.opt_str_list(key)? {
            let flags = list
                .iter()
                .map(|&t| match t {
                    "moe" => Ok(true),
                    "mlp" | "full_attention" | "linear_attention" | "attention" | "mamba" => Ok(false),
                    other => Err(k.bad(key, format!("unknown block type {other:?}"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok((flags, key));
        }
    }
    let key = "hybrid_override_pattern";
    if let Some(p) = k.opt_str(key)? {
        let flags = p
            .chars()
            .map(|c| match c {
                'E' => Ok(true),
                'M' | '*' | '-' => Ok(false),
                other => Err(k.bad(
                    key,
                    format!("unknown block character {other:?} (expected M, E, * or -)"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((flags, key));
    }
    Ok((vec![false, true, false, false], "layers_block_type"))
}

/// The MoE layers of a family of this module: `(decoder layer count, the key it came from, MoE
/// layer ids, multi-token-prediction blocks after the decoder)`. `None` for other families.
pub(super) type LayerMap = (usize, &'static str, Vec<u32>, usize);

/// Per-layer `"dense"` / `"sparse"` list (`mlp_layer_types`) of `n` entries, as MoE flags.
fn mlp_layer_types(k: &Keys<'_>, n: usize) -> Result<Option<Vec<bool>>, ConfigError> {
    let key = "mlp_layer_types";
    let Some(list) = k.opt_str_list(key)? else {
        return Ok(None);
    };
    if list.len() != n {
        return Err(k.bad(key, format!("{} entries for num_hidden_layers = {n}", list.len())));
    }
    list.iter()
        .map(|&t| match t {
            "sparse" => Ok(true),
            "dense" => Ok(false),
            other => Err(k.bad(
                key,
                format!("unknown MLP type {other:?} (expected \"dense\" or \"sparse\")"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn ids(flags: &[bool]) -> Vec<u32> {
    flags
        .iter()
        .enumerate()
        .filter(|(_, f)| **f)
        .map(|(i, _)| i as u32)
        .collect()
}

/// Layers `first..n`, or `mlp_layer_types` when the file has it (it takes precedence, as in the
/// configuration classes).
fn dense_prefix_or_types(k: &Keys<'_>, n: usize, first: usize) -> Result<Vec<u32>, ConfigError> {
    Ok(match mlp_layer_types(k, n)? {
        Some(flags) => ids(&flags),
        None => (first.min(n) as u32..n as u32).collect(),
    })
}

/// The layer map of `model_type` when it is one of this module's families.
pub(super) fn moe_layers(model_type: &str, k: &Keys<'_>) -> Result<Option<LayerMap>, ConfigError> {
    let n_key = "num_hidden_layers";
    let req_n = |key: &'static str| -> Result<usize, ConfigError> {
        let n = k.req_count(key)?;
        if n > u32::MAX as usize {
            return Err(k.bad(key, format!("{n} is too large")));
        }
        Ok(n)
    };
    let map = match model_type {
        // Ernie4_5_MoeDecoderLayer: MoE when (i + 1) % moe_layer_interval == 0 and
        // moe_layer_start_index <= i <= moe_layer_end_index (-1: the last layer).
        "ernie4_5_moe" => {
            let n = req_n(n_key)?;
            let start = k.opt_int("moe_layer_start_index")?.unwrap_or(1);
            let end = match k.opt_int("moe_layer_end_index")?.unwrap_or(-1) {
                -1 => n as i64 - 1,
                v => v,
            };
            let interval = k.count_or("moe_layer_interval", 1)?;
            let layers = (0..n as u32)
                .filter(|&i| (i as usize + 1).is_multiple_of(interval) && i64::from(i) >= start && i64::from(i) <= end)
                .collect();
            (n, n_key, layers, 0)
        }
        // Ernie4_5_VLMoeTextConfig: mlp_layer_types, default the first layer dense.
        "ernie4_5_vl_moe" | "ernie4_5_vl_moe_text" => {
            let n = req_n(n_key)?;
            (n, n_key, dense_prefix_or_types(k, n, 1)?, 0)
        }
        // LongcatFlashModel: `num_layers` decoder layers, each with one routed (shortcut) MoE;
        // `num_hidden_layers` counts the attention sublayers (twice as many).
        "longcat_flash" => {
            let n = req_n("num_layers")?;
            (n, "num_layers", (0..n as u32).collect(), 0)
        }
        // Every decoder layer is MoE.
        "aria" | "aria_text" | "solar_open" | "qwen3_5_moe" | "qwen3_5_moe_text" => {
            let n = req_n(n_key)?;
            (n, n_key, (0..n as u32).collect(), 0)
        }
        "afmoe" => {
            let n = req_n(n_key)?;
            let first = k.index_or("num_dense_layers", 1)?;
            (n, n_key, (first.min(n) as u32..n as u32).collect(), 0)
        }
        // NemotronHBlock: the layer count is the pattern's length.
        "nemotron_h" => {
            let (flags, key) = nemotron_h_types(k)?;
            if flags.len() > u32::MAX as usize {
                return Err(k.bad(key, "too many layers"));
            }
            (flags.len(), key, ids(&flags), 0)
        }
        // Glm4MoeLiteConfig: mlp_layer_types, default the first layer dense. The class does not
        // read first_k_dense_replace; a file whose value disagrees with that default is ambiguous
        // (engines read it).
        "glm4_moe_lite" => {
            let n = req_n(n_key)?;
            if k.get("mlp_layer_types").is_none()
                && let Some(f) = k.opt_index("first_k_dense_replace")?
                && f != 1
            {
                return Err(k.bad(
                    "first_k_dense_replace",
                    format!(
                        "{f}: transformers' Glm4MoeLiteConfig ignores it (one dense layer unless \
                         mlp_layer_types says otherwise) while engines honour it; give mlp_layer_types"
                    ),
                ));
            }
            let mtp = k.index_or("num_nextn_predict_layers", 0)?;
            (n, n_key, dense_prefix_or_types(k, n, 1)?, mtp)
        }
        // GlmMoeDsaConfig (DeepseekV32Config): mlp_layer_types, else first_k_dense_replace (3).
        "glm_moe_dsa" => {
            let n = req_n(n_key)?;
            let first = k.index_or("first_k_dense_replace", 3)?;
            let mtp = k.index_or("num_nextn_predict_layers", 0)?;
            (n, n_key, dense_prefix_or_types(k, n, first)?, mtp)
        }
        // ExaoneMoeConfig: mlp_layer_types, else first_k_dense_replace (1). Its MTP module
        // (`mtp.*`) is not a decoder layer and is not listed.
        "exaone_moe" => {
            let n = req_n(n_key)?;
            let first = k.index_or("first_k_dense_replace", 1)?;
            (n, n_key, dense_prefix_or_types(k, n, first)?, 0)
        }
        // Mistral4DecoderLayer and the Bailing 1.x remote decoder layer: i >= first_k_dense_replace
        // (default 0).
        "mistral4" | "bailing_moe" => {
            let n = req_n(n_key)?;
            let first = k.index_or("first_k_dense_replace", 0)?;
            (n, n_key, (first.min(n) as u32..n as u32).collect(), 0)
        }
        // BailingMoeV2Model: the last num_nextn_predict_layers of num_hidden_layers are MTP
        // blocks (each with a routed MLP); the decoder layers before them are MoE from
        // first_k_dense_replace on.
        "bailing_moe_v2" => {
            let total = req_n(n_key)?;
            let mtp = k.index_or("num_nextn_predict_layers", 0)?;
            if mtp >= total {
                return Err(k.bad(
                    "num_nextn_predict_layers",
                    format!("{mtp} MTP blocks leave no decoder layer of num_hidden_layers = {total}"),
                ));
            }
            let n = total - mtp;
            let first = k.index_or("first_k_dense_replace", 0)?;
            (n, n_key, (first.min(n) as u32..n as u32).collect(), mtp)
        }
        _ => return Ok(None),
    };
    Ok(Some(map))
}
