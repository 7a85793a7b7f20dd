//! Megatron-Core import: a JSON object whose keys are `TransformerConfig` option names
//! (`num_moe_experts`, `moe_router_topk`, `moe_router_score_function`, ...), mapped with
//! Megatron's own rules (`megatron/core/transformer/moe/moe_utils.py`
//! `topk_routing_with_score_function`, `group_limited_topk`, and the validations of
//! `transformer_config.py`):
//!
//! - softmax with `moe_router_pre_softmax`: softmax over E, top-k on probabilities, weights not
//!   renormalised; without it (the default): top-k on logits, softmax over the K selected logits
//!   (top-1 without pre-softmax is rejected, as Megatron does);
//! - sigmoid / sqrtsoftplus: activation before top-k (`moe_router_pre_softmax` is ignored);
//!   weights renormalised as `w / (Σw + 1e-20)` except when K = 1;
//! - group-limited routing when `moe_router_group_topk` is set: group score = sum of the group's
//!   top-(K / group_topk) selection keys;
//! - `moe_router_topk_scaling_factor` multiplies after normalisation (`null` or `0` = none);
//! - `moe_router_enable_expert_bias` (sigmoid/sqrtsoftplus only) gives a zero selection bias of
//!   length E, as Megatron initialises its `expert_bias` buffer, and the update rate
//!   `moe_router_bias_update_rate` (default 1e-3). When resuming from a checkpoint, install the
//!   trained bias with [`RouterConfig::set_expert_bias`];
//! - `moe_router_load_balancing_type` (string or list) with `moe_aux_loss_coeff` (number or list of
//!   the same length): `aux_loss`, `seq_aux_loss`, `global_aux_loss` become aux losses (those with
//!   coefficient 0 are off, as in Megatron), `none` adds nothing, `sinkhorn` and
//!   `quantile_balancing` are rejected (not supported by this crate);
//! - `moe_z_loss_coeff`; `moe_expert_capacity_factor` (negative or `null` = no dropping) with
//!   `moe_token_drop_policy` and `moe_pad_expert_input_to_capacity`;
//! - `moe_router_dtype`: `fp64` → f64 compute, `fp32` or `null` → f32 (`null` means the input
//!   dtype in Megatron, usually bf16; this crate computes in f32 at least).
//!
//! Absent keys take Megatron's defaults; `null` counts as absent. Keys that do not start with
//! `moe_` are ignored (the rest of `TransformerConfig`). A `moe_*` key must be one of Megatron's
//! MoE options ([`MEGATRON_MOE_KEYS`]; those that do not change the routing rule, such as
//! `moe_grouped_gemm` or `moe_token_dispatcher_type`, are accepted and ignored): a misspelt key
//! (`moe_router_score_functon`) is [`ConfigError::BadKey`] naming it and the nearest known key,
//! never a silently applied default.
//!
//! The expert-bias update rate follows the one rule of [`RouterConfig`]'s builder (finite and
//! `>= 0`), reported under the Megatron key.

use crate::config::{
    AuxLossKind, Capacity, ComputeDtype, DropPolicy, GroupScore, Normalization, RouterConfig, ScoreFunction,
    SoftmaxPosition,
};
use crate::error::ConfigError;
use serde_json::{Map, Value};

const SRC: &str = "Megatron";

/// Every `moe_*` option of Megatron-Core's `TransformerConfig` (current and recently renamed or
/// deprecated names). The importer reads the routing ones; the others (kernels, dispatchers,
/// communication, recompute, logging) do not change which experts a token goes to and are
/// accepted and ignored. Any other `moe_*` key is refused as a probable typo.
pub const MEGATRON_MOE_KEYS: &[&str] = &[
    // Read by the importer.
    "moe_router_topk",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_topk_scaling_factor",
    "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate",
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "moe_z_loss_coeff",
    "moe_expert_capacity_factor",
    "moe_pad_expert_input_to_capacity",
    "moe_token_drop_policy",
    "moe_router_dtype",
    "moe_router_topk_limited_devices",
    "moe_router_force_load_balancing",
    "moe_router_force_biased",
    // Accepted and ignored: they do not change the routing rule.
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_shared_expert_overlap",
    "moe_shared_expert_glu_interleave_size",
    "moe_layer_freq",
    "moe_ffn_hidden_size",
    "moe_enable_routing_replay",
    "moe_router_padding_for_quantization",
    "moe_router_padding_for_fp8",
    "moe_n_hash_layers",
    "moe_grouped_gemm",
    "moe_single_grouped_weight",
    "moe_single_grouped_bias",
    "moe_use_legacy_grouped_gemm",
    "moe_input_jitter_eps",
    "moe_token_dropping",
    "moe_token_dispatcher_type",
    "moe_enable_deepep",
    "moe_flex_dispatcher_backend",
    "moe_flex_dispatcher_num_sms",
    "moe_permute_fusion_into_hybridep",
    "moe_hybridep_pad_variable_tokens",
    "moe_per_layer_logging",
    "moe_expert_rank_capacity_factor",
    "moe_pad_experts_for_cuda_graph_inference",
    "moe_layer_recompute",
    "moe_permute_fusion",
    "moe_router_fusion",
    "moe_apply_probs_on_input",
    "moe_latent_size",
    "moe_deepep_num_sms",
    "moe_hybridep_num_sms",
    "moe_hybridep_num_blocks_permute",
    "moe_hybridep_num_blocks_unpermute",
    "moe_hybridep_num_sms_preprocessing",
    "moe_ncclep_static_shape",
    "moe_ncclep_use_symm_mem",
    "moe_mlp_glu_interleave_size",
    "moe_extended_tp",
    "moe_use_upcycling",
    "moe_upcycling_granularity",
];

impl RouterConfig {
    /// Builds the routing rule of a Megatron-Core MoE layer from a JSON object of
    /// `TransformerConfig` option names (see [`crate::import::megatron`] for the mapping).
    ///
    /// ```
    /// use moe_router_core::{RouterConfig, ScoreFunction, Normalization};
    /// let cfg = RouterConfig::from_megatron(r#"{
    ///     "num_moe_experts": 64, "moe_router_topk": 6,
    ///     "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": true
    /// }"#).unwrap();
    /// assert_eq!(cfg.score(), ScoreFunction::Sigmoid);
    /// assert_eq!(cfg.normalization(), Normalization::Sum { eps: 1e-20 });
    /// assert_eq!(cfg.expert_bias().unwrap(), &[0.0; 64][..]);
    /// ```
    pub fn from_megatron(json: &str) -> Result<RouterConfig, ConfigError> {
        let v: Value = serde_json::from_str(json).map_err(|e| ConfigError::from_json(&e))?;
        RouterConfig::from_megatron_value(&v)
    }

    /// [`RouterConfig::from_megatron`] on an already parsed JSON object.
    pub fn from_megatron_value(value: &Value) -> Result<RouterConfig, ConfigError> {
        let obj = value.as_object().ok_or_else(|| ConfigError::BadKey {
            key: "<root>".into(),
            source_kind: SRC,
            reason: "expected a JSON object of TransformerConfig options".into(),
        })?;
        import(&Keys { obj })
    }
}

struct Keys<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn bad(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::BadKey {
            key: key.to_string(),
            source_kind: SRC,
            reason: reason.into(),
        }
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn opt_count(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(0) => Err(self.bad(key, "must be at least 1 (found 0)")),
                Some(n) => usize::try_from(n)
                    .map(Some)
                    .map_err(|_| self.bad(key, format!("{n} is too large"))),
                None => Err(self.bad(key, format!("expected a positive integer, found {v}"))),
            },
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(key, format!("expected a boolean, found {v}"))),
        }
    }
    fn opt_num(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.bad(key, format!("expected a finite number, found {v}"))),
            },
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, format!("expected a string, found {v}"))),
        }
    }
}

/// Refuses a `moe_*` key that is not a Megatron MoE option, naming the nearest one.
fn check_known_keys(k: &Keys<'_>) -> Result<(), ConfigError> {
    let mut unknown: Vec<&str> = k
        .obj
        .keys()
        .map(String::as_str)
        .filter(|key| key.starts_with("moe_") && !MEGATRON_MOE_KEYS.contains(key))
        .collect();
    unknown.sort_unstable();
    if let Some(key) = unknown.first() {
        let nearest = super::nearest(key, MEGATRON_MOE_KEYS).unwrap_or("");
        return Err(k.bad(
            key,
            format!(
                "unknown Megatron MoE option (did you mean `{nearest}`?); a misspelt option would \
                 otherwise silently take its default"
            ),
        ));
    }
    Ok(())
}

fn import(k: &Keys<'_>) -> Result<RouterConfig, ConfigError> {
    check_known_keys(k)?;
    let e = k.opt_count("num_moe_experts")?.ok_or_else(|| ConfigError::MissingKey {
        key: "num_moe_experts".into(),
        source_kind: SRC,
    })?;
    let top_k = k.opt_count("moe_router_topk")?.unwrap_or(2);
    if top_k > e {
        return Err(k.bad("moe_router_topk", format!("{top_k} exceeds num_moe_experts = {e}")));
    }
    for key in ["moe_router_topk_limited_devices"] {
        if k.get(key).is_some() {
            return Err(k.bad(
                key,
                "deprecated (it maps groups onto the expert-parallel size, unknown here): give \
                 moe_router_num_groups and moe_router_group_topk instead",
            ));
        }
    }
    if k.bool_or("moe_router_force_load_balancing", false)? {
        return Err(k.bad(
            "moe_router_force_load_balancing",
            "routes on random logits (a benchmarking mode), not a routing rule this crate reproduces",
        ));
    }
    if let Some(std) = k.opt_num("moe_router_force_biased")? {
        return Err(k.bad(
            "moe_router_force_biased",
            format!(
                "{std}: adds a random expert bias (a benchmarking mode), not a routing rule this crate \
                 reproduces; remove the key or set it to null"
            ),
        ));
    }

    // Load balancing first: sinkhorn changes the whole rule.
    let aux = aux_losses(k)?;

    let score = match k.opt_str("moe_router_score_function")?.unwrap_or("softmax") {
        "softmax" => ScoreFunction::Softmax,
        "sigmoid" => ScoreFunction::Sigmoid,
        "sqrtsoftplus" => ScoreFunction::SqrtSoftplus,
        other => {
            return Err(k.bad(
                "moe_router_score_function",
                format!("{other:?} is not one of softmax, sigmoid, sqrtsoftplus"),
            ));
        }
    };
    let pre_softmax = k.bool_or("moe_router_pre_softmax", false)?;
    let mut b = RouterConfig::builder(e, top_k).score(score);
    match score {
        ScoreFunction::Softmax if pre_softmax => {
            b = b.softmax_position(SoftmaxPosition::BeforeTopK);
        }
        ScoreFunction::Softmax => {
            if top_k == 1 {
                return Err(k.bad(
                    "moe_router_pre_softmax",
                    "top-1 with softmax after top-k gives every token weight 1 and no router gradient; \
                     Megatron requires moe_router_pre_softmax when moe_router_topk is 1",
                ));
            }
            b = b.softmax_position(SoftmaxPosition::AfterTopK);
        }
        ScoreFunction::Sigmoid | ScoreFunction::SqrtSoftplus => {
            if top_k > 1 {
                b = b.normalization(Normalization::Sum { eps: 1e-20 });
            }
        }
    }

    // Group-limited routing: active iff group_topk is set (Megatron's `if group_topk:`).
    let num_groups = k.opt_count("moe_router_num_groups")?;
    if let Some(g_top) = k.opt_count("moe_router_group_topk")? {
        let g = num_groups.ok_or_else(|| {
            k.bad(
                "moe_router_group_topk",
                "needs moe_router_num_groups (Megatron: group_topk requires num_groups)",
            )
        })?;
        if !e.is_multiple_of(g) {
            return Err(k.bad(
                "moe_router_num_groups",
                format!("{g} groups do not divide num_moe_experts = {e}"),
            ));
        }
        if g_top > g {
            return Err(k.bad(
                "moe_router_group_topk",
                format!("{g_top} exceeds moe_router_num_groups = {g}"),
            ));
        }
        let per = e / g;
        let n = top_k / g_top;
        if n == 0 {
            return Err(k.bad(
                "moe_router_group_topk",
                format!(
                    "groups are scored by the sum of their top-(topk / group_topk) = top-{top_k}/{g_top} = top-0 \
                     keys, which ranks every group equal"
                ),
            ));
        }
        if n > per {
            return Err(k.bad(
                "moe_router_group_topk",
                format!("groups of {per} experts cannot be scored by their top-{n} (topk / group_topk)"),
            ));
        }
        if g_top * per < top_k {
            return Err(k.bad(
                "moe_router_group_topk",
                format!("{g_top} groups of {per} experts cannot hold moe_router_topk = {top_k}"),
            ));
        }
        if g_top < g {
            b = b.group_limit(g, g_top, GroupScore::SumTopN(n));
        }
    }

    if let Some(s) = k.opt_num("moe_router_topk_scaling_factor")? {
        if s < 0.0 {
            return Err(k.bad("moe_router_topk_scaling_factor", format!("must be >= 0 (found {s})")));
        }
        // Megatron: `if scaling_factor:` — 0 means no scaling.
        if s != 0.0 {
            b = b.scaling_factor(s as f32);
        }
    }

    if k.bool_or("moe_router_enable_expert_bias", false)? {
        if score == ScoreFunction::Softmax {
            return Err(k.bad(
                "moe_router_enable_expert_bias",
                "the expert bias needs moe_router_score_function sigmoid or sqrtsoftplus",
            ));
        }
        // Validated by the builder's rule (finite, >= 0), the same rule as the CLI's
        // --bias-update-rate; its error is reported under the Megatron key below.
        let rate = k.opt_num("moe_router_bias_update_rate")?.unwrap_or(1e-3);
        b = b.expert_bias(vec![0.0; e]).bias_update_rate(rate as f32);
    }

    for (kind, coeff) in aux {
        b = b.aux_loss(kind, coeff);
    }
    if let Some(z) = k.opt_num("moe_z_loss_coeff")? {
        if z < 0.0 {
            return Err(k.bad("moe_z_loss_coeff", format!("must be >= 0 (found {z})")));
        }
        b = b.z_loss_coeff(z);
    }

    // Capacity: negative means none (Megatron's __post_init__).
    let cf = k.opt_num("moe_expert_capacity_factor")?.filter(|cf| *cf >= 0.0);
    let pad = k.bool_or("moe_pad_expert_input_to_capacity", false)?;
    let policy = match k.opt_str("moe_token_drop_policy")?.unwrap_or("probs") {
        "probs" => DropPolicy::Probs,
        "position" => DropPolicy::Position,
        other => {
            return Err(k.bad(
                "moe_token_drop_policy",
                format!("{other:?} is not one of probs, position"),
            ));
        }
    };
    match cf {
        None if pad => {
            return Err(k.bad(
                "moe_pad_expert_input_to_capacity",
                "needs moe_expert_capacity_factor (Megatron: padding requires a capacity factor)",
            ));
        }
        None => {}
        Some(0.0) => {
            return Err(k.bad(
                "moe_expert_capacity_factor",
                "0 gives every expert capacity 0 and drops every token",
            ));
        }
        Some(cf) => {
            b = b.capacity(Capacity {
                factor: cf,
                min_capacity: None,
                policy,
                pad_to_capacity: pad,
            });
        }
    }

    b = b.compute_dtype(match k.opt_str("moe_router_dtype")? {
        None | Some("fp32") => ComputeDtype::F32,
        Some("fp64") => ComputeDtype::F64,
        Some(other) => {
            return Err(k.bad(
                "moe_router_dtype",
                format!("{other:?} is not one of fp32, fp64 (or null)"),
            ));
        }
    });
    b.build().map_err(|e| match e {
        ConfigError::Invalid {
            field: "bias_update_rate",
            reason,
        } => k.bad("moe_router_bias_update_rate", reason),
        other => other,
    })
}

/// `moe_router_load_balancing_type` × `moe_aux_loss_coeff` → (kind, coefficient > 0) pairs.
fn aux_losses(k: &Keys<'_>) -> Result<Vec<(AuxLossKind, f64)>, ConfigError> {
    const TYPE: &str = "moe_router_load_balancing_type";
    const COEFF: &str = "moe_aux_loss_coeff";
    let coeff_of = |v: &Value, key: &str| -> Result<f64, ConfigError> {
        match v.as_f64() {
            Some(c) if c.is_finite() && c >= 0.0 => Ok(c),
            _ => Err(k.bad(key, format!("expected a finite number >= 0, found {v}"))),
        }
    };
    let (types, coeffs): (Vec<&str>, Vec<f64>) = match (k.get(TYPE), k.get(COEFF)) {
        (None | Some(Value::String(_)), None | Some(Value::Number(_))) => {
            let t = k.opt_str(TYPE)?.unwrap_or("aux_loss");
            let c = match k.get(COEFF) {
                None => 0.0,
                Some(v) => coeff_of(v, COEFF)?,
            };
            (vec![t], vec![c])
        }
        (Some(Value::Array(ts)), Some(Value::Array(cs))) => {
            if ts.len() != cs.len() {
                return Err(k.bad(
                    COEFF,
                    format!(
                        "{} coefficients for {} load-balancing types (Megatron needs one per type)",
                        cs.len(),
                        ts.len()
                    ),
                ));
            }
            let mut types = Vec::with_capacity(ts.len());
            for t in ts {
                types.push(
                    t.as_str()
                        .ok_or_else(|| k.bad(TYPE, format!("expected a list of strings, found {t}")))?,
                );
            }
            let mut coeffs = Vec::with_capacity(cs.len());
            for c in cs {
                coeffs.push(coeff_of(c, COEFF)?);
            }
            (types, coeffs)
        }
        (Some(Value::Array(_)), _) => {
            return Err(k.bad(
                COEFF,
                "must be a list of the same length as moe_router_load_balancing_type",
            ));
        }
        (Some(Value::String(_)), Some(_)) => {
            return Err(k.bad(
                COEFF,
                "must be a number when moe_router_load_balancing_type is a string",
            ));
        }
        (Some(v), _) => return Err(k.bad(TYPE, format!("expected a string or a list of strings, found {v}"))),
        (None, Some(v)) => return Err(k.bad(COEFF, format!("expected a number, found {v}"))),
    };
    let mut out = Vec::new();
    for (t, c) in types.into_iter().zip(coeffs) {
        let kind = match t {
            "aux_loss" => AuxLossKind::MicroBatch,
            "seq_aux_loss" => AuxLossKind::PerSequence,
            "global_aux_loss" => AuxLossKind::Global,
            "none" => continue,
            "sinkhorn" | "quantile_balancing" => {
                return Err(k.bad(
                    TYPE,
                    format!(
                        "{t:?} routing is not supported by moe-router (supported: aux_loss, seq_aux_loss, \
                         global_aux_loss, none)"
                    ),
                ));
            }
            other => {
                return Err(k.bad(
                    TYPE,
                    format!(
                        "{other:?} is not one of aux_loss, seq_aux_loss, global_aux_loss, sinkhorn, \
                         quantile_balancing, none"
                    ),
                ));
            }
        };
        if c > 0.0 {
            out.push((kind, c));
        }
    }
    Ok(out)
}
