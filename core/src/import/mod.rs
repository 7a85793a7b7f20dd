//! Importers: build a [`RouterConfig`](crate::RouterConfig) from a Hugging Face `config.json`
//! ([`hf`]), from Megatron-Core `TransformerConfig` option names ([`megatron`]), or by the name of
//! a published model ([`presets`]).

pub mod hf;
pub mod megatron;
pub mod presets;

pub use hf::{BIAS_TENSOR, HfImport, SUPPORTED_MODEL_TYPES, import_hf, import_hf_value};
pub use presets::{preset, preset_expects_expert_bias, preset_hf_config, preset_names};
