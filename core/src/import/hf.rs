//! Hugging Face `config.json` import (work in progress).

use crate::config::RouterConfig;
use crate::error::ConfigError;

/// Model types the importer understands.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[];

/// The result of importing a Hugging Face config.
#[derive(Debug, Clone, PartialEq)]
pub struct HfImport {
    /// The routing rule.
    pub config: RouterConfig,
}

/// Imports a Hugging Face `config.json` given as text.
pub fn import_hf(json: &str) -> Result<HfImport, ConfigError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| ConfigError::from_json(&e))?;
    import_hf_value(&v)
}

/// Imports a parsed Hugging Face `config.json`.
pub fn import_hf_value(_v: &serde_json::Value) -> Result<HfImport, ConfigError> {
    Err(ConfigError::UnsupportedModelType {
        found: String::new(),
        supported: String::new(),
    })
}
