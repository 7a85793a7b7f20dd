//! Named presets: the routing rules of published MoE models.
//!
//! Every preset is the Hugging Face importer ([`crate::import::hf`]) run on an embedded minimal
//! `config.json` holding the routing keys of the model's published config, so a preset and an
//! import of the real file cannot disagree. Presets whose model selects on a checkpoint bias
//! (`deepseek-v3`, `kimi-k2`, `glm-4.5`, `minimax-m2`) carry no bias: install each layer's
//! `e_score_correction_bias` with [`RouterConfig::set_expert_bias`] (see
//! [`preset_expects_expert_bias`]).

use crate::config::RouterConfig;
use crate::error::ConfigError;
use crate::import::hf::import_hf;

/// (name, minimal `config.json`) for every preset, values from the models' published configs.
const PRESETS: &[(&str, &str)] = &[
    // deepseek-ai/DeepSeek-V2 (and V2-Chat, V2.5): 160 routed experts, 6 per token, 8 groups keep 3.
    (
        "deepseek-v2",
        r#"{"model_type": "deepseek_v2", "n_routed_experts": 160, "num_experts_per_tok": 6,
            "scoring_func": "softmax", "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
            "norm_topk_prob": false, "routed_scaling_factor": 16.0}"#,
    ),
    // deepseek-ai/DeepSeek-V2-Lite: 64 routed experts, 6 per token, greedy.
    (
        "deepseek-v2-lite",
        r#"{"model_type": "deepseek_v2", "n_routed_experts": 64, "num_experts_per_tok": 6,
            "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
            "norm_topk_prob": false, "routed_scaling_factor": 1.0}"#,
    ),
    // deepseek-ai/DeepSeek-V3 (and R1): 256 experts, 8 per token, 8 groups keep 4, scale 2.5.
    (
        "deepseek-v3",
        r#"{"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
            "norm_topk_prob": true, "routed_scaling_factor": 2.5}"#,
    ),
    // moonshotai/Kimi-K2-Instruct: 384 experts, 8 per token, one group, scale 2.827.
    (
        "kimi-k2",
        r#"{"model_type": "kimi_k2", "n_routed_experts": 384, "num_experts_per_tok": 8,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
            "norm_topk_prob": true, "routed_scaling_factor": 2.827}"#,
    ),
    // zai-org/GLM-4.5 (355B-A32B): 160 experts, 8 per token, one group, scale 2.5.
    (
        "glm-4.5",
        r#"{"model_type": "glm4_moe", "n_routed_experts": 160, "num_experts_per_tok": 8,
            "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 2.5}"#,
    ),
    // Qwen/Qwen1.5-MoE-A2.7B (model_type qwen2_moe): 60 experts, 4 per token, not renormalised.
    (
        "qwen2-moe",
        r#"{"model_type": "qwen2_moe", "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": false}"#,
    ),
    // Qwen/Qwen3-30B-A3B: 128 experts, 8 per token, renormalised.
    (
        "qwen3-moe",
        r#"{"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true}"#,
    ),
    // Qwen/Qwen3-Next-80B-A3B: 512 experts, 10 per token, renormalised.
    (
        "qwen3-next",
        r#"{"model_type": "qwen3_next", "num_experts": 512, "num_experts_per_tok": 10, "norm_topk_prob": true}"#,
    ),
    // mistralai/Mixtral-8x7B (and 8x22B): 8 experts, 2 per token.
    (
        "mixtral",
        r#"{"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}"#,
    ),
    // openai/gpt-oss-120b: 128 experts, 4 per token.
    (
        "gpt-oss-120b",
        r#"{"model_type": "gpt_oss", "num_local_experts": 128, "num_experts_per_tok": 4}"#,
    ),
    // openai/gpt-oss-20b: 32 experts, 4 per token.
    (
        "gpt-oss-20b",
        r#"{"model_type": "gpt_oss", "num_local_experts": 32, "num_experts_per_tok": 4}"#,
    ),
    // meta-llama/Llama-4-Scout-17B-16E: 16 experts, top-1.
    (
        "llama4-scout",
        r#"{"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": 16,
            "num_experts_per_tok": 1}}"#,
    ),
    // meta-llama/Llama-4-Maverick-17B-128E: 128 experts, top-1.
    (
        "llama4-maverick",
        r#"{"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": 128,
            "num_experts_per_tok": 1}}"#,
    ),
    // MiniMaxAI/MiniMax-M2: 256 experts, 8 per token, sigmoid with routing bias.
    (
        "minimax-m2",
        r#"{"model_type": "minimax_m2", "num_local_experts": 256, "num_experts_per_tok": 8,
            "scoring_func": "sigmoid", "use_routing_bias": true}"#,
    ),
    // allenai/OLMoE-1B-7B-0924: 64 experts, 8 per token, not renormalised.
    (
        "olmoe",
        r#"{"model_type": "olmoe", "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": false}"#,
    ),
];

const NAMES: &[&str] = &[
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

/// Names of every preset, in a fixed order.
pub fn preset_names() -> &'static [&'static str] {
    NAMES
}

/// The embedded minimal `config.json` a preset is built from.
pub fn preset_hf_config(name: &str) -> Result<&'static str, ConfigError> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, json)| *json)
        .ok_or_else(|| ConfigError::UnknownPreset {
            found: name.to_string(),
            available: NAMES.join(", "),
        })
}

/// The routing rule of a published model, by name (see [`preset_names`]).
///
/// ```
/// let cfg = moe_router_core::preset("qwen3-moe").unwrap();
/// assert_eq!((cfg.num_experts(), cfg.top_k()), (128, 8));
/// assert!(moe_router_core::preset("gpt-5").is_err());
/// ```
pub fn preset(name: &str) -> Result<RouterConfig, ConfigError> {
    Ok(import_hf(preset_hf_config(name)?)?.config)
}

/// Whether the preset's model selects on a per-layer checkpoint bias (`e_score_correction_bias`)
/// that must be installed with [`RouterConfig::set_expert_bias`].
pub fn preset_expects_expert_bias(name: &str) -> Result<bool, ConfigError> {
    Ok(import_hf(preset_hf_config(name)?)?.expects_expert_bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_table_agree_and_every_preset_builds() {
        assert_eq!(NAMES.len(), PRESETS.len());
        for (n, (m, _)) in NAMES.iter().zip(PRESETS) {
            assert_eq!(n, m);
            preset(n).unwrap_or_else(|e| panic!("preset {n}: {e}"));
        }
    }
}
