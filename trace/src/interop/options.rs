//! What the caller supplies for importing ([`ImportOptions`]) and exporting ([`ExportOptions`]).

use super::IntDtype;
use moe_router_core::layout::SeqId;

/// Default bound on the elements (`T × L × K`) one import or export may hold in memory (2³⁰:
/// 4 GiB of `u32` ids).
pub const DEFAULT_MAX_ELEMENTS: u64 = 1 << 30;

/// Caller-supplied facts for importing (see the module docs for the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// E. Needed for range checks when the format does not record it.
    pub num_experts: Option<usize>,
    /// L, for formats that do not record the shape (SGLang; R3/v1 needs L or K).
    pub num_layers: Option<usize>,
    /// K, for formats that do not record the shape (SGLang; R3/v1 needs L or K).
    pub top_k: Option<usize>,
    /// The model layer ids of the L axis (strictly ascending). Default: the format's, else `0..L`.
    pub layers: Option<Vec<u32>>,
    /// The sequence id of the imported rows (default 0).
    pub seq: SeqId,
    /// Bound on `T × L × K` held in memory (default [`DEFAULT_MAX_ELEMENTS`]).
    pub max_elements: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            num_experts: None,
            num_layers: None,
            top_k: None,
            layers: None,
            seq: SeqId(0),
            max_elements: DEFAULT_MAX_ELEMENTS,
        }
    }
}

impl ImportOptions {
    /// Sets E.
    pub fn with_num_experts(mut self, e: usize) -> Self {
        self.num_experts = Some(e);
        self
    }
    /// Sets L and K (SGLang, R3/v1).
    pub fn with_shape(mut self, num_layers: usize, top_k: usize) -> Self {
        self.num_layers = Some(num_layers);
        self.top_k = Some(top_k);
        self
    }
    /// Sets the layer ids of the L axis.
    pub fn with_layers(mut self, layers: Vec<u32>) -> Self {
        self.layers = Some(layers);
        self
    }
    /// Sets the memory bound.
    pub fn with_max_elements(mut self, n: u64) -> Self {
        self.max_elements = n;
        self
    }
}

/// Choices for exporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Which sequence to export (required when the trace has several).
    pub seq: Option<SeqId>,
    /// Element type for npy / safetensors / NeMo Gym (default: int32 for npy and safetensors,
    /// the narrowest that holds E for NeMo Gym). Values that do not fit are refused.
    pub dtype: Option<IntDtype>,
    /// Bound on `T × L × K` held in memory (default [`DEFAULT_MAX_ELEMENTS`]).
    pub max_elements: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            seq: None,
            dtype: None,
            max_elements: DEFAULT_MAX_ELEMENTS,
        }
    }
}
