//! Hugging Face `config.json` import.
//!
//! Each supported `model_type` maps to the routing rule of its published modeling code. The
//! numbers come from the file (expert count, top-k, groups, scaling, normalisation flag); the rule
//! (score function, where softmax sits, group score, normalisation epsilon) comes from the family.
//! Keys the router does not need (attention sizes, `auto_map`, quantisation, ...) are ignored;
//! optional routing keys that are absent take the family's default from its Hugging Face config
//! class. The expert count and top-k are always required: a file without them is not a MoE
//! checkpoint config, and a default would be a guess. Families whose router cannot be expressed
//! exactly are refused with their reason ([`REFUSED_MODEL_TYPES`]); any other `model_type` is
//! [`ConfigError::UnsupportedModelType`]. Multimodal wrappers are read from their text model's
//! config (`text_config` of `llama4`, `qwen3_vl_moe`, `glm4v_moe`, `aria`, `qwen3_5_moe`,
//! `ernie4_5_vl_moe`; `thinker_config.text_config` of `qwen3_omni_moe`); the bare text
//! `model_type` gives the same rule.
//! `docs/families.md` has the full table with the keys each family reads.
//!
//! | `model_type` | rule |
//! |---|---|
//! | `deepseek_v2` | softmax over E → top-k on probabilities (`topk_method` `greedy`, or `group_limited_greedy`: keep `topk_group` of `n_group` groups by their max probability); if `norm_topk_prob` and K > 1: `w / (Σw + 1e-20)`, else `w · routed_scaling_factor` |
//! | `deepseek_v3`, `deepseek_v32`, `kimi_k2`, `glm4_moe`, `glm4v_moe`, `dots1` | sigmoid; selection on `sigmoid + e_score_correction_bias`; groups scored by the sum of their top-2 biased scores, keep `topk_group` of `n_group`; weights = unbiased sigmoid; if `norm_topk_prob`: `w / (Σw + 1e-20)`; then `· routed_scaling_factor` |
//! | `qwen2_moe`, `qwen3_moe`, `qwen3_next`, `qwen3_omni_moe`, `olmoe`, `flex_olmo` | softmax over E → top-k; if `norm_topk_prob`: `w / Σw` (default true for Qwen3-Next and Qwen3-Omni's thinker) |
//! | `mixtral`, `minimax`, `qwen3_vl_moe`, `hunyuan_v1_moe` | softmax over E → top-k → `w / Σw` (always) |
//! | `jamba` | softmax over E → top-k, never normalised |
//! | `dbrx` | softmax over E → top-k → `w / Σw` (`ffn_config.moe_normalize_expert_weights` = 1; `null`: none) |
//! | `gpt_oss`, `granitemoe`, `granitemoeshared`, `granitemoehybrid`, `jetmoe` | top-k on logits → softmax over the K selected logits |
//! | `llama4` (`text_config`), `llama4_text` | top-k on logits → `sigmoid(logit)`, no normalisation |
//! | `minimax_m2` | sigmoid; selection on `sigmoid + e_score_correction_bias` (when `use_routing_bias`); weights = unbiased sigmoid `/ Σw` |
//! | `lfm2_moe` | sigmoid; selection on `sigmoid + expert_bias` (when `use_expert_bias`); weights = unbiased sigmoid, `/ (Σw + 1e-6)` if `norm_topk_prob`; `· routed_scaling_factor` |
//! | `ernie4_5_moe`, `ernie4_5_vl_moe` (`text_config` or top level), `ernie4_5_vl_moe_text` | softmax over E; selection on `softmax + e_score_correction_bias`; weights = unbiased probabilities `/ max(Σw, moe_norm_min)` |
//! | `longcat_flash` | softmax over `n_routed_experts + zero_expert_num`; selection on `softmax + e_score_correction_bias`; weights = unbiased probabilities `· routed_scaling_factor` |
//! | `aria` (`text_config`), `aria_text` | top-k on logits → softmax over the K selected logits |
//! | `afmoe` | sigmoid; selection on `sigmoid + expert_bias`; weights = unbiased sigmoid `/ (Σw + 1e-20) · route_scale` |
//! | `nemotron_h`, `glm4_moe_lite`, `glm_moe_dsa`, `solar_open`, `exaone_moe` | the DeepSeek-V3 rule above, with each family's defaults |
//! | `mistral4` | softmax over E; groups by the sum of their top-2 probabilities; top-k on probabilities; `w / (Σw + 1e-20)` if `norm_topk_prob`; `· routed_scaling_factor` |
//! | `qwen3_5_moe` (`text_config`), `qwen3_5_moe_text` | softmax over E → top-k → `w / Σw` (always) |
//! | `bailing_moe` (remote code) | softmax over E → top-k; `w / Σw` if K > 1 and `norm_topk_prob` |
//! | `bailing_moe_v2` (remote code) | the DeepSeek-V3 rule on `expert_bias`; `w / (Σw + 1e-20)` when K > 1; `· routed_scaling_factor` |
//!
//! **Selection bias.** `e_score_correction_bias` (LFM2-MoE, AFMoE, Ling 2.0: `expert_bias`) is a
//! checkpoint tensor, not part of `config.json`. For the families that use it the imported [`RouterConfig`]
//! has *no* bias, and [`HfImport::expects_expert_bias`] is `true` ([`HfImport::bias_tensor`] names
//! the tensor): load the tensor of each MoE layer and install it with
//! [`RouterConfig::set_expert_bias`] before routing, or the selection ignores the bias.
//!
//! **Known deviations from the Python code**, all outside normal operation:
//! - DeepSeek-V3/GLM-4.5/MiniMax fill the experts of dropped groups with `0.0` where this crate
//!   uses −∞ (as DeepSeek's own `inference/model.py` does); they differ only when fewer than K
//!   kept experts have a positive biased score.
//! - Ties: torch's top-k order is unspecified; this crate breaks ties by the lower expert id.
//! - Selection on sigmoid scores (Llama 4, sigmoid families) can tie where the logits do not when
//!   sigmoid saturates to 1.0 in f32; the Python code for Llama 4 selects on the logits.
//! - GPT-OSS computes the K-way softmax, DBRX the full softmax, in the logits' dtype (bf16 in
//!   practice); this crate computes in f32 (or f64).
//!
//! **Which layers are MoE.** [`hf_moe_layers`] derives the model layer ids whose MLP is routed
//! (the layer map of a trace, the `--layers` of the CLI) from the same file, with each family's
//! rule (layer `i` is `model.layers.<i>`, 0-based):
//!
//! | `model_type` | MoE layers |
//! |---|---|
//! | `deepseek_v2`, `deepseek_v3`, `deepseek_v32`, `kimi_k2` | `i >= first_k_dense_replace` and `i % moe_layer_freq == 0` (defaults: 0 for V2, 3 for V3 and V3.2, required for Kimi-K2; `moe_layer_freq` 1) |
//! | `glm4_moe`, `glm4v_moe` (`text_config`) | `i >= first_k_dense_replace` (default 1) |
//! | `dots1` | `i >= first_k_dense_replace` (default 0) |
//! | `lfm2_moe` | `i >= num_dense_layers` (default 2) |
//! | `qwen2_moe`, `qwen3_moe`, `qwen3_next`, `qwen3_vl_moe` (`text_config`), `qwen3_omni_moe` (`thinker_config.text_config`) | `i` not in `mlp_only_layers` (default none) and `(i + 1) % decoder_sparse_step == 0` (default 1) |
//! | `jamba` | `i % expert_layer_period == expert_layer_offset` (defaults 2 and 1), when `num_experts > 1` |
//! | `llama4` (`text_config`), `llama4_text` | `moe_layers` when given, else `interleave_moe_layer_step − 1, 2·step − 1, …` (default step 1) |
//! | `mixtral`, `minimax`, `olmoe`, `flex_olmo`, `gpt_oss`, `minimax_m2`, `hunyuan_v1_moe`, `granitemoe`, `granitemoeshared`, `granitemoehybrid`, `jetmoe` | every layer |
//! | `dbrx` | every layer (the count is `n_layers`) |
//! | `ernie4_5_moe` | `(i + 1) % moe_layer_interval == 0` and `moe_layer_start_index <= i <= moe_layer_end_index` (defaults 1, 1, −1 = last) |
//! | `ernie4_5_vl_moe`, `glm4_moe_lite` | `mlp_layer_types` (`"sparse"`), else every layer but the first; GLM-4.7-Flash: MTP as GLM-4.5 |
//! | `glm_moe_dsa`, `exaone_moe` | `mlp_layer_types`, else `i >= first_k_dense_replace` (3, 1); GLM-5: MTP as GLM-4.5 |
//! | `longcat_flash` | every layer of `num_layers` |
//! | `aria`, `solar_open`, `qwen3_5_moe` | every layer |
//! | `afmoe` | `i >= num_dense_layers` (default 1) |
//! | `nemotron_h` | the `"moe"` blocks of `layers_block_type`, else the `E` of `hybrid_override_pattern` |
//! | `mistral4`, `bailing_moe` | `i >= first_k_dense_replace` (default 0) |
//! | `bailing_moe_v2` | `first_k_dense_replace <= i < num_hidden_layers − num_nextn_predict_layers`; the last `num_nextn_predict_layers` layers are MTP blocks |
//!
//! DeepSeek-V3, V3.2, Kimi-K2, GLM-4.5, GLM-4.7-Flash and GLM-5 append `num_nextn_predict_layers`
//! multi-token-prediction blocks after the decoder (ids `num_hidden_layers..`), each with a routed
//! MLP; Ling 2.0 counts its MTP blocks in `num_hidden_layers` (they are its last layers). They are
//! listed apart ([`HfMoeLayers::mtp_layers`]) because engines capture them only when speculative
//! decoding runs them.

use crate::config::{GroupScore, Normalization, RouterConfig, RouterConfigBuilder, ScoreFunction, SoftmaxPosition};
use crate::error::ConfigError;
use serde_json::{Map, Value};

mod families;

/// The `model_type` values [`import_hf`] understands.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "kimi_k2",
    "glm4_moe",
    "glm4v_moe",
    "glm4v_moe_text",
    "dots1",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_vl_moe",
    "qwen3_vl_moe_text",
    "qwen3_omni_moe",
    "qwen3_omni_moe_text",
    "olmoe",
    "flex_olmo",
    "jamba",
    "mixtral",
    "minimax",
    "hunyuan_v1_moe",
    "dbrx",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "jetmoe",
    "llama4",
    "llama4_text",
    "minimax_m2",
    "lfm2_moe",
    "ernie4_5_moe",
    "ernie4_5_vl_moe",
    "ernie4_5_vl_moe_text",
    "longcat_flash",
    "aria",
    "aria_text",
    "afmoe",
    "nemotron_h",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "solar_open",
    "exaone_moe",
    "mistral4",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "bailing_moe",
    "bailing_moe_v2",
];

/// MoE families of Hugging Face transformers whose router this crate cannot reproduce exactly,
/// with the reason. Importing one is [`ConfigError::BadKey`] on `model_type` naming the reason
/// (never a guess, and not the generic "unsupported" of an unknown type).
pub const REFUSED_MODEL_TYPES: &[(&str, &str)] = &[
    (
        "phimoe",
        "PhiMoE routes with SparseMixer, not a top-K over its gate: the first expert is the arg-max, \
         its weight a softmax over the logits left after a relative-threshold mask \
         (router_jitter_noise), and the second expert is chosen and weighted the same way with the \
         first masked out; no top-K rule reproduces those weights",
    ),
    (
        "switch_transformers",
        "Switch Transformers drops tokens at an absolute capacity: each expert keeps the first \
         `expert_capacity` tokens (a fixed count, default 64) of a forward call's flattened batch, which \
         RouterConfig's capacity (ceil(T*K/E * factor), a fraction of the routed batch) does not express; \
         and it is an encoder-decoder whose encoder and decoder MoE blocks (`encoder.block.<i>`, \
         `decoder.block.<i>`) share layer indices, which one layer map cannot name",
    ),
    (
        "nllb-moe",
        "NLLB-MoE's top-2 router is not a deterministic top-K rule: the second expert is drawn with Gumbel \
         noise (second_expert_policy \"sampling\") or dropped at random (\"random\"); its capacity counts every \
         token's first choice before any second choice (optionally ordered by router probability), the \
         weights are renormalised after dropping, and expert outputs are scaled by 1 - moe_token_dropout at \
         inference",
    ),
    (
        "doge",
        "Doge's cross-domain MoE routes by product keys: its gate emits 2 * sqrt(E) key scores and an \
         expert's score is the sum of one score from each half; there is no row of E gate logits to route",
    ),
];

/// Name of the checkpoint tensor that holds the selection bias of the families that use one.
pub const BIAS_TENSOR: &str = "e_score_correction_bias";

const SRC: &str = "Hugging Face";

/// The result of importing a Hugging Face `config.json`: the routing rule plus what the rule
/// needs that the file cannot hold.
#[derive(Debug, Clone, PartialEq)]
pub struct HfImport {
    /// The top-level `model_type` of the file.
    pub model_type: String,
    /// The routing rule, validated and in canonical form. It carries no selection bias, even when
    /// [`HfImport::expects_expert_bias`] is set.
    pub config: RouterConfig,
    /// Whether the model selects on `score + bias` with a per-layer bias stored in the checkpoint
    /// (tensor `…mlp.gate.e_score_correction_bias`, see [`BIAS_TENSOR`]). When set, install each
    /// layer's bias with [`RouterConfig::set_expert_bias`] before routing: without it the selection
    /// differs from the model's.
    pub expects_expert_bias: bool,
}

impl RouterConfig {
    /// Builds the routing rule of a Hugging Face `config.json` (see [`crate::import::hf`] for the
    /// supported `model_type`s and their rules).
    ///
    /// Families with a checkpoint selection bias (DeepSeek-V3, Kimi-K2, GLM-4.5, MiniMax-M2) get
    /// a config without the bias; use [`import_hf`] to learn whether one is expected.
    ///
    /// ```
    /// use moe_router_core::{RouterConfig, ScoreFunction};
    /// let cfg = RouterConfig::from_hf_config(
    ///     r#"{"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}"#,
    /// ).unwrap();
    /// assert_eq!((cfg.num_experts(), cfg.top_k(), cfg.score()), (8, 2, ScoreFunction::Softmax));
    /// ```
    pub fn from_hf_config(json: &str) -> Result<RouterConfig, ConfigError> {
        import_hf(json).map(|i| i.config)
    }

    /// [`RouterConfig::from_hf_config`] on an already parsed `config.json`.
    pub fn from_hf_config_value(value: &Value) -> Result<RouterConfig, ConfigError> {
        import_hf_value(value).map(|i| i.config)
    }
}

/// Imports a Hugging Face `config.json` given as text. Malformed JSON is [`ConfigError::Json`].
pub fn import_hf(json: &str) -> Result<HfImport, ConfigError> {
    let v: Value = serde_json::from_str(json).map_err(|e| ConfigError::from_json(&e))?;
    import_hf_value(&v)
}

/// Imports a parsed Hugging Face `config.json`.
pub fn import_hf_value(value: &Value) -> Result<HfImport, ConfigError> {
    let obj = value.as_object().ok_or_else(|| ConfigError::BadKey {
        key: "<root>".into(),
        source_kind: SRC,
        reason: format!("expected a JSON object, found {}", kind_of(value)),
    })?;
    let top = Keys { obj, prefix: "" };
    let model_type = top.req_str("model_type")?;
    let text;
    let k = match nested_text(&top, model_type)? {
        Some(t) => {
            text = t;
            &text
        }
        None => &top,
    };
    let (config, expects_expert_bias) = match model_type {
        "deepseek_v2" => deepseek_v2(k)?,
        "deepseek_v3" => v3_family(k, V3Family::DeepSeekV3)?,
        "deepseek_v32" => v3_family(k, V3Family::DeepSeekV32)?,
        "kimi_k2" => v3_family(k, V3Family::KimiK2)?,
        "glm4_moe" => v3_family(k, V3Family::Glm4Moe)?,
        "glm4v_moe" | "glm4v_moe_text" => v3_family(k, V3Family::Glm4vMoe)?,
        "dots1" => v3_family(k, V3Family::Dots1)?,
        "qwen2_moe" | "qwen3_moe" | "olmoe" | "flex_olmo" => {
            softmax_topk(k, &["num_experts", "num_local_experts"], false)?
        }
        "qwen3_next" | "qwen3_omni_moe" | "qwen3_omni_moe_text" => {
            softmax_topk(k, &["num_experts", "num_local_experts"], true)?
        }
        "qwen3_vl_moe" | "qwen3_vl_moe_text" => softmax_fixed(k, &["num_experts", "num_local_experts"], true)?,
        "jamba" => softmax_fixed(k, &["num_experts"], false)?,
        "mixtral" | "minimax" => softmax_fixed(k, &["num_local_experts", "num_experts"], true)?,
        "hunyuan_v1_moe" => hunyuan_v1_moe(k)?,
        "dbrx" => dbrx(k)?,
        "gpt_oss" | "granitemoe" | "granitemoeshared" | "jetmoe" => topk_then_softmax(k)?,
        "granitemoehybrid" => {
            if k.get("num_local_experts").and_then(Value::as_u64) == Some(0) {
                return Err(k.bad(
                    "num_local_experts",
                    "0: this Granite-4.0 checkpoint is dense (no routed MLP, nothing to route)",
                ));
            }
            topk_then_softmax(k)?
        }
        "llama4" | "llama4_text" => llama4_text(k)?,
        "minimax_m2" => minimax_m2(k)?,
        "lfm2_moe" => lfm2_moe(k)?,
        "ernie4_5_moe" | "ernie4_5_vl_moe" | "ernie4_5_vl_moe_text" => families::ernie(k)?,
        "longcat_flash" => families::longcat_flash(k)?,
        "aria" | "aria_text" => families::aria(k)?,
        "afmoe" => families::afmoe(k)?,
        "nemotron_h" => {
            families::nemotron_h_has_moe(k)?;
            v3_family(k, V3Family::NemotronH)?
        }
        "glm4_moe_lite" => v3_family(k, V3Family::Glm4MoeLite)?,
        "glm_moe_dsa" => v3_family(k, V3Family::GlmMoeDsa)?,
        "solar_open" => v3_family(k, V3Family::SolarOpen)?,
        "exaone_moe" => v3_family(k, V3Family::ExaoneMoe)?,
        "mistral4" => families::mistral4(k)?,
        "qwen3_5_moe" | "qwen3_5_moe_text" => softmax_fixed(k, &["num_experts", "num_local_experts"], true)?,
        "bailing_moe" => families::bailing_moe(k)?,
        "bailing_moe_v2" => families::bailing_moe_v2(k)?,
        other => return Err(unsupported(&top, other)),
    };
    Ok(HfImport {
        model_type: model_type.to_string(),
        config,
        expects_expert_bias,
    })
}

/// Multimodal wrappers keep the text model's config nested: (wrapper `model_type`, path of keys,
/// the dotted prefix errors use, the text model's own `model_type`, whether a file without the
/// nested object keeps the text keys at the top level).
const NESTED_TEXT: &[(&str, &[&str], &str, &str, bool)] = &[
    ("llama4", &["text_config"], "text_config.", "llama4_text", false),
    (
        "qwen3_vl_moe",
        &["text_config"],
        "text_config.",
        "qwen3_vl_moe_text",
        false,
    ),
    ("glm4v_moe", &["text_config"], "text_config.", "glm4v_moe_text", false),
    // Qwen3-Omni's text model is the thinker's (`get_text_config`); the talker's MoE is not read.
    (
        "qwen3_omni_moe",
        &["thinker_config", "text_config"],
        "thinker_config.text_config.",
        "qwen3_omni_moe_text",
        false,
    ),
    ("aria", &["text_config"], "text_config.", "aria_text", false),
    (
        "qwen3_5_moe",
        &["text_config"],
        "text_config.",
        "qwen3_5_moe_text",
        false,
    ),
    // Ernie4_5_VLMoeConfig builds its text config from the top-level keys when `text_config` is
    // absent.
    (
        "ernie4_5_vl_moe",
        &["text_config"],
        "text_config.",
        "ernie4_5_vl_moe_text",
        true,
    ),
];

/// The nested text config of a wrapper `model_type` (see [`NESTED_TEXT`]), checked to be the
/// expected text model when it names its own `model_type`; `None` for a flat config.
fn nested_text<'a>(top: &Keys<'a>, model_type: &str) -> Result<Option<Keys<'a>>, ConfigError> {
    let Some(&(_, path, prefix, inner, optional)) = NESTED_TEXT.iter().find(|(outer, ..)| *outer == model_type) else {
        return Ok(None);
    };
    if optional && top.get(path[0]).is_none() {
        return Ok(None);
    }
    let mut keys = Keys {
        obj: top.obj,
        prefix: "",
    };
    let mut walked = 0;
    for key in path {
        let obj = keys.req_object(key)?;
        walked += key.len() + 1;
        // The prefix of the object just entered, for the errors of the next step.
        keys = Keys {
            obj,
            prefix: &prefix[..walked],
        };
    }
    if let Some(mt) = keys.opt_str("model_type")?
        && mt != inner
    {
        return Err(keys.bad(
            "model_type",
            format!("expected {inner:?} inside {model_type}, found {mt:?}"),
        ));
    }
    Ok(Some(keys))
}

/// The error for a `model_type` this crate does not route: a known-but-refused family names its
/// reason ([`REFUSED_MODEL_TYPES`]); anything else lists the supported types.
fn unsupported(top: &Keys<'_>, model_type: &str) -> ConfigError {
    match REFUSED_MODEL_TYPES.iter().find(|(mt, _)| *mt == model_type) {
        Some((_, why)) => top.bad(
            "model_type",
            format!(
                "{model_type:?} is refused: {why}. Supported model types: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ),
        ),
        None => ConfigError::UnsupportedModelType {
            found: model_type.to_string(),
            supported: SUPPORTED_MODEL_TYPES.join(", "),
        },
    }
}

impl HfImport {
    /// The name of the per-layer checkpoint tensor that holds the selection bias, when
    /// [`HfImport::expects_expert_bias`] is set: [`BIAS_TENSOR`] for the DeepSeek-V3 rule and
    /// MiniMax-M2 (`…mlp.gate.e_score_correction_bias`), ERNIE-4.5
    /// (`…mlp.gate.moe_statics.e_score_correction_bias`) and LongCat-Flash
    /// (`…mlp.router.e_score_correction_bias`); `expert_bias` for LFM2-MoE
    /// (`…feed_forward.expert_bias`), AFMoE (`…mlp.expert_bias`) and Ling 2.0
    /// (`…mlp.gate.expert_bias`).
    pub fn bias_tensor(&self) -> Option<&'static str> {
        match (self.expects_expert_bias, self.model_type.as_str()) {
            (false, _) => None,
            (true, "lfm2_moe" | "afmoe" | "bailing_moe_v2") => Some("expert_bias"),
            (true, _) => Some(BIAS_TENSOR),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to one JSON object of the config, naming keys by their dotted path in errors.
/// A `null` value counts as absent (`save_pretrained` writes `null` for unset optional keys).
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'static str,
}

impl<'a> Keys<'a> {
    fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
    fn bad(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::BadKey {
            key: self.path(key),
            source_kind: SRC,
            reason: reason.into(),
        }
    }
    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::MissingKey {
            key: self.path(key),
            source_kind: SRC,
        }
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, format!("expected a string, found {}", kind_of(v)))),
        }
    }
    fn req_str(&self, key: &str) -> Result<&'a str, ConfigError> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }
    fn req_object(&self, key: &str) -> Result<&'a Map<String, Value>, ConfigError> {
        match self.get(key) {
            None => Err(self.missing(key)),
            Some(Value::Object(m)) => Ok(m),
            Some(v) => Err(self.bad(key, format!("expected an object, found {}", kind_of(v)))),
        }
    }
    /// A positive integer.
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
    /// A non-negative integer (a layer index or a count that may be 0).
    fn opt_index(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => usize::try_from(n)
                    .map(Some)
                    .map_err(|_| self.bad(key, format!("{n} is too large"))),
                None => Err(self.bad(key, format!("expected a non-negative integer, found {v}"))),
            },
        }
    }
    fn index_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.opt_index(key)?.unwrap_or(default))
    }
    /// A list of non-negative integers.
    fn opt_index_list(&self, key: &str) -> Result<Option<Vec<usize>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| self.bad(key, format!("expected a list of layer indices, found {x} in it")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.bad(key, format!("expected a list of layer indices, found {}", kind_of(v)))),
        }
    }
    fn count_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.opt_count(key)?.unwrap_or(default))
    }
    fn req_count(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_count(key)?.ok_or_else(|| self.missing(key))
    }
    /// The first present key among `names` (aliases from the config class's `attribute_map`);
    /// missing names the first.
    fn req_count_any(&self, names: &[&'static str]) -> Result<(usize, &'static str), ConfigError> {
        for &n in names {
            if let Some(c) = self.opt_count(n)? {
                return Ok((c, n));
            }
        }
        Err(self.missing(names[0]))
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, format!("expected a boolean, found {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        Ok(self.opt_bool(key)?.unwrap_or(default))
    }
    fn req_bool(&self, key: &str) -> Result<bool, ConfigError> {
        self.opt_bool(key)?.ok_or_else(|| self.missing(key))
    }
    /// A finite, positive scaling factor.
    fn opt_scale(&self, key: &str) -> Result<Option<f32>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 && (x as f32).is_finite() => Ok(Some(x as f32)),
                Some(x) => Err(self.bad(key, format!("must be finite and > 0 (found {x})"))),
                None => Err(self.bad(key, format!("expected a number, found {v}"))),
            },
        }
    }
    /// A signed integer (ERNIE's `moe_layer_end_index` is `-1` for "the last layer").
    fn opt_int(&self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected an integer, found {v}"))),
        }
    }
    /// A list of strings (per-layer type lists such as `mlp_layer_types`).
    fn opt_str_list(&self, key: &str) -> Result<Option<Vec<&'a str>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .ok_or_else(|| self.bad(key, format!("expected a list of strings, found {x} in it")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.bad(key, format!("expected a list of strings, found {}", kind_of(v)))),
        }
    }
    /// A positive minimum that is a normal f32 (the clamp minimum of a normalisation; a subnormal
    /// one would be flushed to 0 by the portable arithmetic).
    fn opt_clamp_min(&self, key: &str) -> Result<Option<f32>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && (x as f32).is_normal() && x > 0.0 => Ok(Some(x as f32)),
                Some(x) => Err(self.bad(
                    key,
                    format!("must be a positive number within the normal f32 range (found {x})"),
                )),
                None => Err(self.bad(key, format!("expected a number, found {v}"))),
            },
        }
    }
    /// A string key that, when present, must be one of `allowed` (the only values the family's
    /// modeling code implements).
    fn check_str(&self, key: &str, allowed: &[&str]) -> Result<Option<&'a str>, ConfigError> {
        match self.opt_str(key)? {
            Some(s) if !allowed.contains(&s) => Err(self.bad(
                key,
                format!(
                    "{s:?} is not implemented by this model family (expected one of: {})",
                    allowed.join(", ")
                ),
            )),
            other => Ok(other),
        }
    }
}

/// E and K with the K ≤ E check, named by their keys.
fn experts_and_k(k: &Keys<'_>, expert_keys: &[&'static str]) -> Result<(usize, usize), ConfigError> {
    let (e, _) = k.req_count_any(expert_keys)?;
    let top_k = k.req_count("num_experts_per_tok")?;
    checked_k(k, "num_experts_per_tok", e, top_k)
}

/// `top_k <= e`, or an error on `k_key`.
fn checked_k(k: &Keys<'_>, k_key: &str, e: usize, top_k: usize) -> Result<(usize, usize), ConfigError> {
    if top_k > e {
        return Err(k.bad(k_key, format!("{top_k} exceeds the number of experts {e}")));
    }
    Ok((e, top_k))
}

/// Validates `n_group` / `topk_group` against E; `None` when the limit keeps every group (a
/// no-op, e.g. Kimi-K2's and GLM-4.5's `n_group = 1`).
fn groups(k: &Keys<'_>, e: usize, n_group: usize, topk_group: usize) -> Result<Option<(usize, usize)>, ConfigError> {
    if !e.is_multiple_of(n_group) {
        return Err(k.bad("n_group", format!("{n_group} groups do not divide {e} experts")));
    }
    if topk_group > n_group {
        return Err(k.bad("topk_group", format!("{topk_group} exceeds n_group = {n_group}")));
    }
    Ok((topk_group < n_group).then_some((n_group, topk_group)))
}

fn finish(b: RouterConfigBuilder) -> Result<RouterConfig, ConfigError> {
    b.build()
}

/// DeepSeek-V2 / V2-Lite / V2.5 (DeepSeek's `modeling_deepseek.py` `MoEGate`, the code shipped
/// with the checkpoints). Softmax over E, top-k on the probabilities (greedy or group-limited by
/// the group's max probability). `norm_topk_prob` with K > 1 divides by `Σw + 1e-20` and then
/// does *not* apply `routed_scaling_factor`; otherwise the weights are scaled. (The Hugging Face
/// port ignores `norm_topk_prob`; every published V2 config has it `false`, where both agree.)
fn deepseek_v2(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["n_routed_experts", "num_experts"])?;
    k.check_str("scoring_func", &["softmax"])?;
    let method = k
        .check_str("topk_method", &["greedy", "group_limited_greedy"])?
        .unwrap_or("greedy");
    let norm = k.bool_or("norm_topk_prob", false)?;
    let scale = k.opt_scale("routed_scaling_factor")?.unwrap_or(1.0);
    let mut b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK);
    if method == "group_limited_greedy" {
        let g = k.req_count("n_group")?;
        let kept = k.req_count("topk_group")?;
        if let Some((g, kept)) = groups(k, e, g, kept)? {
            if kept * (e / g) < top_k {
                return Err(k.bad(
                    "topk_group",
                    format!(
                        "{kept} groups of {} experts cannot hold num_experts_per_tok = {top_k}",
                        e / g
                    ),
                ));
            }
            b = b.group_limit(g, kept, GroupScore::Max);
        }
    }
    b = if norm && top_k > 1 {
        b.normalization(Normalization::Sum { eps: 1e-20 })
    } else {
        b.scaling_factor(scale)
    };
    Ok((finish(b)?, false))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum V3Family {
    DeepSeekV3,
    DeepSeekV32,
    KimiK2,
    Glm4Moe,
    Glm4vMoe,
    Dots1,
    NemotronH,
    Glm4MoeLite,
    GlmMoeDsa,
    SolarOpen,
    ExaoneMoe,
}

/// DeepSeek-V3/R1 (`DeepseekV3MoE.route_tokens_to_experts`), GLM-4.5 (`Glm4MoeMoE`, the same
/// rule) and Kimi-K2 (shipped as `kimi_k2` with DeepSeek's V3 remote code), and the families that
/// reuse the rule: Nemotron-H (`NemotronHTopkRouter`), GLM-4.7-Flash (`Glm4MoeLiteMoE`), GLM-5
/// (`GlmMoeDsa`, DeepSeek-V3.2's MoE), Solar Open (`SolarOpenMoE` = `Glm4MoeMoE`) and K-EXAONE
/// (`ExaoneMoeSparseMoEBlock` = `DeepseekV3MoE`). Sigmoid scores; the selection key adds
/// `e_score_correction_bias`; groups are scored by the sum of their two best keys; weights are
/// the unbiased sigmoid, divided by `Σw + 1e-20` when `norm_topk_prob`, then multiplied by
/// `routed_scaling_factor`.
fn v3_family(k: &Keys<'_>, fam: V3Family) -> Result<(RouterConfig, bool), ConfigError> {
    let expert_keys: &[&'static str] = match fam {
        V3Family::DeepSeekV3 | V3Family::DeepSeekV32 | V3Family::KimiK2 => &["n_routed_experts", "num_local_experts"],
        V3Family::Glm4Moe | V3Family::SolarOpen => &["n_routed_experts", "num_experts"],
        V3Family::Glm4vMoe | V3Family::Dots1 | V3Family::NemotronH | V3Family::Glm4MoeLite => {
            &["n_routed_experts", "num_local_experts"]
        }
        // GlmMoeDsaConfig maps `num_experts` onto `n_routed_experts` for old files.
        V3Family::GlmMoeDsa => &["n_routed_experts", "num_local_experts", "num_experts"],
        V3Family::ExaoneMoe => &["num_experts"],
    };
    let (e, top_k) = experts_and_k(k, expert_keys)?;
    // Only DeepSeek's, Kimi's and GLM-4.5's configs carry these keys; the other families' routers
    // do not read them.
    if matches!(
        fam,
        V3Family::DeepSeekV3 | V3Family::DeepSeekV32 | V3Family::KimiK2 | V3Family::Glm4Moe
    ) {
        k.check_str("scoring_func", &["sigmoid"])?;
        k.check_str("topk_method", &["noaux_tc"])?;
    }
    let (n_group, topk_group, norm, scale) = match fam {
        // Defaults of transformers' DeepseekV3Config (DeepSeek-V3.2 changes attention only; its
        // MoE gate is V3's).
        V3Family::DeepSeekV3 | V3Family::DeepSeekV32 => (
            k.count_or("n_group", 8)?,
            k.count_or("topk_group", 4)?,
            k.bool_or("norm_topk_prob", true)?,
            k.opt_scale("routed_scaling_factor")?.unwrap_or(2.5),
        ),
        // Kimi-K2 loads DeepSeek's remote configuration class, whose defaults (no groups,
        // greedy, no normalisation, scale 1) do not describe the model: require the keys.
        V3Family::KimiK2 => (
            k.req_count("n_group")?,
            k.req_count("topk_group")?,
            k.req_bool("norm_topk_prob")?,
            k.opt_scale("routed_scaling_factor")?
                .ok_or_else(|| k.missing("routed_scaling_factor"))?,
        ),
        // Defaults of transformers' Glm4MoeConfig, Glm4vMoeTextConfig (GLM-4.5V's `text_config`)
        // and Dots1Config.
        V3Family::Glm4Moe | V3Family::Glm4vMoe => (
            k.count_or("n_group", 1)?,
            k.count_or("topk_group", 1)?,
            k.bool_or("norm_topk_prob", true)?,
            k.opt_scale("routed_scaling_factor")?.unwrap_or(1.0),
        ),
        V3Family::Dots1 => (
            k.count_or("n_group", 1)?,
            k.count_or("topk_group", 1)?,
            k.bool_or("norm_topk_prob", false)?,
            k.opt_scale("routed_scaling_factor")?.unwrap_or(1.0),
        ),
        // Defaults of NemotronHConfig and SolarOpenConfig (Glm4MoeConfig's): one group,
        // renormalised, scale 1.
        V3Family::NemotronH | V3Family::SolarOpen => (
            k.count_or("n_group", 1)?,
            k.count_or("topk_group", 1)?,
            k.bool_or("norm_topk_prob", true)?,
            k.opt_scale("routed_scaling_factor")?.unwrap_or(1.0),
        ),
        V3Family::Glm4MoeLite => (
            k.count_or("n_group", 1)?,
            k.count_or("topk_group", 1)?,
            k.bool_or("norm_topk_prob", true)?,
            k.opt_scale("routed_scaling_factor")?.unwrap_or(1.8),
        ),
        V3Family::GlmMoeDsa | V3Family::ExaoneMoe => (
            k.count_or("n_group", 1)?,
            k.count_or("topk_group", 1)?,
            k.bool_or("norm_topk_prob", true)?,
            k.opt_scale("routed_scaling_factor")?.unwrap_or(2.5),
        ),
    };
    let mut b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Sigmoid)
        .expect_expert_bias();
    b = families::top2_groups(k, b, e, top_k, n_group, topk_group)?;
    if norm {
        b = b.normalization(Normalization::Sum { eps: 1e-20 });
    }
    Ok((finish(b.scaling_factor(scale))?, true))
}

/// Qwen2-MoE / Qwen1.5-MoE, Qwen3-MoE, Qwen3-Next and OLMoE (`Qwen2MoeTopKRouter`,
/// `OlmoeSparseMoeBlock`): softmax over E in f32, top-k, and `w / Σw` (no epsilon) when
/// `norm_topk_prob`, whose default is the family's (`true` only for Qwen3-Next).
fn softmax_topk(
    k: &Keys<'_>,
    expert_keys: &[&'static str],
    norm_default: bool,
) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, expert_keys)?;
    let mut b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK);
    if k.bool_or("norm_topk_prob", norm_default)? {
        b = b.normalization(Normalization::Sum { eps: 0.0 });
    }
    Ok((finish(b)?, false))
}

/// Softmax over E in f32, top-k, and `w / Σw` (no epsilon) always (`norm`) or never: Mixtral
/// (`MixtralSparseMoeBlock`), MiniMax-Text-01 (`MiniMaxSparseMoeBlock`, Mixtral's), Qwen3-VL-MoE (`Qwen3VLMoeTextTopKRouter`, which renormalises whatever
/// `norm_topk_prob` says), Jamba (`JambaSparseMoeBlock`, never).
fn softmax_fixed(k: &Keys<'_>, expert_keys: &[&'static str], norm: bool) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, expert_keys)?;
    let mut b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK);
    if norm {
        b = b.normalization(Normalization::Sum { eps: 0.0 });
    }
    Ok((finish(b)?, false))
}

/// Top-k on the logits, then softmax over the K selected values: GPT-OSS (`GptOssTopKRouter`; the
/// router's linear bias is part of the logits), Granite-MoE and its shared and hybrid variants
/// (`GraniteMoeTopKGating`) and JetMoE (`JetMoeTopKGating`, both in f32).
fn topk_then_softmax(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["num_local_experts", "num_experts"])?;
    let b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::AfterTopK);
    Ok((finish(b)?, false))
}

/// A count that is either one positive integer or a per-layer list of them (Hunyuan's
/// `num_experts` / `moe_topk`). A list must hold one value: a [`RouterConfig`] has one E and K.
fn uniform_count(k: &Keys<'_>, key: &str) -> Result<usize, ConfigError> {
    match k.get(key) {
        Some(Value::Array(a)) => {
            let mut vals = a.iter().map(|x| {
                x.as_u64()
                    .filter(|&n| n > 0)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| k.bad(key, format!("expected positive integers, found {x} in the list")))
            });
            let first = vals.next().ok_or_else(|| k.bad(key, "empty per-layer list"))??;
            for v in vals {
                let v = v?;
                if v != first {
                    return Err(k.bad(
                        key,
                        format!(
                            "per-layer values differ ({first} and {v}); one router config holds one value, \
                             import a single-valued copy per layer"
                        ),
                    ));
                }
            }
            Ok(first)
        }
        _ => k.req_count(key),
    }
}

/// Hunyuan-MoE (`HunYuanMoEV1Moe.route_tokens_to_experts`): softmax over E in f32, top-k,
/// always `w / Σw`. E is `num_experts`, K `moe_topk` (an int, or a per-layer list of one value).
fn hunyuan_v1_moe(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let e = uniform_count(k, "num_experts")?;
    let top_k = uniform_count(k, "moe_topk")?;
    let (e, top_k) = checked_k(k, "moe_topk", e, top_k)?;
    let b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::Sum { eps: 0.0 });
    Ok((finish(b)?, false))
}

/// DBRX (`DbrxFFN.route_tokens_to_experts`): softmax over E, top-k on the probabilities, then
/// divided by their p-norm with p = `ffn_config.moe_normalize_expert_weights` (default 1; the
/// weights are positive, so p = 1 is `w / Σw`); `null` there means no normalisation. Any other p
/// is refused: this crate normalises by the sum only.
fn dbrx(top: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let k = Keys {
        obj: top.req_object("ffn_config")?,
        prefix: "ffn_config.",
    };
    let e = k.req_count("moe_num_experts")?;
    let top_k = k.req_count("moe_top_k")?;
    let (e, top_k) = checked_k(&k, "moe_top_k", e, top_k)?;
    let key = "moe_normalize_expert_weights";
    let norm = match k.obj.get(key) {
        None => true,
        Some(Value::Null) => false,
        Some(v) => match v.as_f64() {
            Some(1.0) => true,
            Some(p) => {
                return Err(k.bad(
                    key,
                    format!("{p}: a p-norm with p != 1 is not a sum normalisation; only 1 (or null) is supported"),
                ));
            }
            None => return Err(k.bad(key, format!("expected a number or null, found {v}"))),
        },
    };
    let mut b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Softmax)
        .softmax_position(SoftmaxPosition::BeforeTopK);
    if norm {
        b = b.normalization(Normalization::Sum { eps: 0.0 });
    }
    Ok((finish(b)?, false))
}

/// LFM2-MoE (`Lfm2MoeSparseMoeBlock.route_tokens_to_experts`): sigmoid scores; selection on
/// `sigmoid + expert_bias` when `use_expert_bias` (default true; the tensor is the checkpoint's
/// `feed_forward.expert_bias`); weights = unbiased sigmoid, `/ (Σw + 1e-6)` when `norm_topk_prob`
/// (default true), then `· routed_scaling_factor` (default 1).
fn lfm2_moe(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["num_experts", "num_local_experts"])?;
    let bias = k.bool_or("use_expert_bias", true)?;
    let mut b = RouterConfig::builder(e, top_k).score(ScoreFunction::Sigmoid);
    if k.bool_or("norm_topk_prob", true)? {
        b = b.normalization(Normalization::Sum { eps: 1e-6 });
    }
    b = b.scaling_factor(k.opt_scale("routed_scaling_factor")?.unwrap_or(1.0));
    if bias {
        b = b.expect_expert_bias();
    }
    Ok((finish(b)?, bias))
}

/// Llama 4 (`Llama4Router`): top-k on the logits, weight = `sigmoid(logit)`, no normalisation
/// (Scout and Maverick route top-1).
fn llama4_text(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["num_local_experts"])?;
    let b = RouterConfig::builder(e, top_k).score(ScoreFunction::Sigmoid);
    Ok((finish(b)?, false))
}

/// MiniMax-M2 (`MiniMaxM2TopKRouter`): sigmoid scores in f32, selection on
/// `sigmoid + e_score_correction_bias`, weights = unbiased sigmoid `/ Σw` (no epsilon, no
/// scaling). `use_routing_bias: false` drops the bias.
fn minimax_m2(k: &Keys<'_>) -> Result<(RouterConfig, bool), ConfigError> {
    let (e, top_k) = experts_and_k(k, &["num_local_experts", "num_experts"])?;
    k.check_str("scoring_func", &["sigmoid"])?;
    if let Some(s) = k.opt_scale("routed_scaling_factor")?
        && s != 1.0
    {
        return Err(k.bad(
            "routed_scaling_factor",
            format!(
                "{s}: the Hugging Face MiniMax-M2 router ignores it while vLLM and SGLang apply it; \
                 the rule is ambiguous"
            ),
        ));
    }
    let bias = k.bool_or("use_routing_bias", true)?;
    let mut b = RouterConfig::builder(e, top_k)
        .score(ScoreFunction::Sigmoid)
        .normalization(Normalization::Sum { eps: 0.0 });
    if bias {
        b = b.expect_expert_bias();
    }
    Ok((finish(b)?, bias))
}

/// The MoE layers of a Hugging Face model, by model layer id (see the module docs for each
/// family's rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfMoeLayers {
    /// The top-level `model_type` of the file.
    pub model_type: String,
    /// The decoder layers `0..num_hidden_layers`: the file's `num_hidden_layers` (DBRX: `n_layers`;
    /// LongCat-Flash: `num_layers`; Nemotron-H: the length of its layer pattern; Ling 2.0: without
    /// its trailing MTP blocks).
    pub num_hidden_layers: usize,
    /// Decoder layers whose MLP is routed, ascending (never empty).
    pub layers: Vec<u32>,
    /// Multi-token-prediction blocks with a routed MLP (`num_nextn_predict_layers` of them, ids
    /// from [`HfMoeLayers::num_hidden_layers`]), ascending; empty for families without MTP.
    pub mtp_layers: Vec<u32>,
}

impl HfMoeLayers {
    /// [`HfMoeLayers::layers`] followed by [`HfMoeLayers::mtp_layers`].
    pub fn with_mtp(&self) -> Vec<u32> {
        self.layers.iter().chain(&self.mtp_layers).copied().collect()
    }
}

/// The MoE layer ids of a Hugging Face `config.json` given as text (see the module docs for the
/// rules). Malformed JSON is [`ConfigError::Json`]; an unsupported `model_type`,
/// [`ConfigError::UnsupportedModelType`]; a missing `num_hidden_layers`, [`ConfigError::MissingKey`];
/// keys with impossible values (a dense prefix covering every layer, an `mlp_only_layers` entry
/// beyond the model), [`ConfigError::BadKey`].
///
/// ```
/// use moe_router_core::import::hf::hf_moe_layers;
/// let m = hf_moe_layers(
///     r#"{"model_type": "deepseek_v3", "num_hidden_layers": 61, "first_k_dense_replace": 3,
///         "num_nextn_predict_layers": 1}"#,
/// ).unwrap();
/// assert_eq!((m.layers.first(), m.layers.last(), m.layers.len()), (Some(&3), Some(&60), 58));
/// assert_eq!(m.mtp_layers, vec![61]);
/// ```
pub fn hf_moe_layers(json: &str) -> Result<HfMoeLayers, ConfigError> {
    let v: Value = serde_json::from_str(json).map_err(|e| ConfigError::from_json(&e))?;
    hf_moe_layers_value(&v)
}

/// [`hf_moe_layers`] on an already parsed `config.json`.
pub fn hf_moe_layers_value(value: &Value) -> Result<HfMoeLayers, ConfigError> {
    let obj = value.as_object().ok_or_else(|| ConfigError::BadKey {
        key: "<root>".into(),
        source_kind: SRC,
        reason: format!("expected a JSON object, found {}", kind_of(value)),
    })?;
    let top = Keys { obj, prefix: "" };
    let model_type = top.req_str("model_type")?;
    let text;
    let k = match nested_text(&top, model_type)? {
        Some(t) => {
            text = t;
            &text
        }
        None => &top,
    };
    if !SUPPORTED_MODEL_TYPES.contains(&model_type) {
        return Err(unsupported(&top, model_type));
    }
    if let Some((n, n_key, layers, mtp)) = families::moe_layers(model_type, k)? {
        return layer_map(model_type, k, n, n_key, layers, mtp);
    }
    // DBRX names the layer count `n_layers` (its config class maps `num_hidden_layers` onto it).
    let (n, n_key) = if model_type == "dbrx" {
        k.req_count_any(&["n_layers", "num_hidden_layers"])?
    } else {
        (k.req_count("num_hidden_layers")?, "num_hidden_layers")
    };
    if n > u32::MAX as usize {
        return Err(k.bad(n_key, format!("{n} is too large")));
    }
    let all = 0..n as u32;
    let mut mtp = 0usize;
    let layers: Vec<u32> = match model_type {
        "deepseek_v2" | "deepseek_v3" | "deepseek_v32" | "kimi_k2" => {
            let first = match model_type {
                "deepseek_v2" => k.index_or("first_k_dense_replace", 0)?,
                "deepseek_v3" | "deepseek_v32" => k.index_or("first_k_dense_replace", 3)?,
                // Kimi-K2's remote configuration class defaults to 0, which is not the model.
                _ => k
                    .opt_index("first_k_dense_replace")?
                    .ok_or_else(|| k.missing("first_k_dense_replace"))?,
            };
            let freq = k.count_or("moe_layer_freq", 1)?;
            if model_type != "deepseek_v2" {
                mtp = k.index_or("num_nextn_predict_layers", 0)?;
            }
            all.filter(|&i| i as usize >= first && (i as usize).is_multiple_of(freq))
                .collect()
        }
        "glm4_moe" => {
            let first = k.index_or("first_k_dense_replace", 1)?;
            mtp = k.index_or("num_nextn_predict_layers", 0)?;
            all.filter(|&i| i as usize >= first).collect()
        }
        // GLM-4.5V's text model (Glm4vMoeTextConfig): the GLM-4.5 rule, no MTP key.
        "glm4v_moe" | "glm4v_moe_text" => {
            let first = k.index_or("first_k_dense_replace", 1)?;
            all.filter(|&i| i as usize >= first).collect()
        }
        // dots1 (DeepseekV3DecoderLayer): dense below first_k_dense_replace (default 0).
        "dots1" => {
            let first = k.index_or("first_k_dense_replace", 0)?;
            all.filter(|&i| i as usize >= first).collect()
        }
        "lfm2_moe" => {
            let first = k.index_or("num_dense_layers", 2)?;
            all.filter(|&i| i as usize >= first).collect()
        }
        // Jamba: layer i has `num_experts` experts when i % expert_layer_period ==
        // expert_layer_offset (defaults 2 and 1), else a dense MLP; one expert is a dense MLP too.
        "jamba" => {
            let period = k.count_or("expert_layer_period", 2)?;
            let offset = k.index_or("expert_layer_offset", 1)?;
            if offset >= period {
                return Err(k.bad(
                    "expert_layer_offset",
                    format!("{offset} is not below expert_layer_period = {period}: no layer is MoE"),
                ));
            }
            if k.count_or("num_experts", 16)? < 2 {
                return Err(k.bad("num_experts", "1: every feed-forward is a dense MLP, no layer is MoE"));
            }
            all.filter(|&i| i as usize % period == offset).collect()
        }
        "granitemoehybrid" if k.get("num_local_experts").and_then(Value::as_u64) == Some(0) => {
            return Err(k.bad(
                "num_local_experts",
                "0: this Granite-4.0 checkpoint is dense (no routed MLP, nothing to route)",
            ));
        }
        "qwen2_moe"
        | "qwen3_moe"
        | "qwen3_next"
        | "qwen3_vl_moe"
        | "qwen3_vl_moe_text"
        | "qwen3_omni_moe"
        | "qwen3_omni_moe_text" => {
            let step = k.count_or("decoder_sparse_step", 1)?;
            let dense = k.opt_index_list("mlp_only_layers")?.unwrap_or_default();
            if let Some(&bad) = dense.iter().find(|&&i| i >= n) {
                return Err(k.bad(
                    "mlp_only_layers",
                    format!("layer {bad} is beyond num_hidden_layers = {n}"),
                ));
            }
            all.filter(|&i| !dense.contains(&(i as usize)) && (i as usize + 1).is_multiple_of(step))
                .collect()
        }
        "llama4" | "llama4_text" => match k.opt_index_list("moe_layers")? {
            Some(given) => {
                if let Some(&bad) = given.iter().find(|&&i| i >= n) {
                    return Err(k.bad("moe_layers", format!("layer {bad} is beyond num_hidden_layers = {n}")));
                }
                let mut v: Vec<u32> = given.iter().map(|&i| i as u32).collect();
                v.sort_unstable();
                v.dedup();
                v
            }
            None => {
                let step = k.count_or("interleave_moe_layer_step", 1)?;
                all.filter(|&i| (i as usize + 1).is_multiple_of(step)).collect()
            }
        },
        "mixtral" | "minimax" | "olmoe" | "flex_olmo" | "gpt_oss" | "minimax_m2" | "hunyuan_v1_moe" | "dbrx"
        | "granitemoe" | "granitemoeshared" | "granitemoehybrid" | "jetmoe" => all.collect(),
        other => return Err(unsupported(&top, other)),
    };
    layer_map(model_type, k, n, n_key, layers, mtp)
}

/// The result of [`hf_moe_layers`] from a family's rule: `n` decoder layers (counted by `n_key`),
/// the MoE ones, and `mtp` multi-token-prediction blocks after them. No MoE layer is an error.
fn layer_map(
    model_type: &str,
    k: &Keys<'_>,
    n: usize,
    n_key: &str,
    layers: Vec<u32>,
    mtp: usize,
) -> Result<HfMoeLayers, ConfigError> {
    if layers.is_empty() {
        return Err(k.bad(
            n_key,
            format!("{n} layers and this family's dense-layer keys leave no MoE layer"),
        ));
    }
    let mtp_layers: Vec<u32> = (0..mtp)
        .map(|j| u32::try_from(n + j))
        .collect::<Result<_, _>>()
        .map_err(|_| k.bad("num_nextn_predict_layers", format!("{mtp} is too large")))?;
    Ok(HfMoeLayers {
        model_type: model_type.to_string(),
        num_hidden_layers: n,
        layers,
        mtp_layers,
    })
}
