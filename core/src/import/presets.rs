//! Named presets (work in progress).

use crate::config::RouterConfig;
use crate::error::ConfigError;

/// Names of every preset.
pub fn preset_names() -> &'static [&'static str] {
    &[]
}

/// The routing rule of a published model, by name.
pub fn preset(name: &str) -> Result<RouterConfig, ConfigError> {
    Err(ConfigError::UnknownPreset {
        found: name.to_string(),
        available: preset_names().join(", "),
    })
}
