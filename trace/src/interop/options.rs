//! What the caller supplies for importing ([`ImportOptions`]) and exporting ([`ExportOptions`]).

use super::IntDtype;
use moe_router_core::layout::{LayerKind, SeqId};

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
    /// The position of row 0: the routes begin after a cached prefix of this many tokens (SGLang's
    /// `routed_experts_start_len`, a delta turn). Default: the format's own start (prime-rl
    /// `start`, an R3/v1 suffix, safetensors metadata), else 0. A format whose own nonzero start
    /// differs is [`super::InteropError::Conflict`].
    pub start: Option<u64>,
    /// Kinds of layers of the L axis that are not decoder layers (MTP blocks, hash-routed
    /// layers), written into the trace header ([`crate::trace::TraceHeader::with_layer_kind`]).
    pub layer_kinds: Vec<(u32, LayerKind)>,
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
            start: None,
            layer_kinds: Vec::new(),
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
    /// Sets the position of row 0 (routes after a cached prefix; see [`ImportOptions::start`]).
    pub fn with_start(mut self, start: u64) -> Self {
        self.start = Some(start);
        self
    }
    /// Marks layers of the L axis as MTP or hash-routed layers.
    pub fn with_layer_kinds(mut self, layers: &[u32], kind: LayerKind) -> Self {
        self.layer_kinds.extend(layers.iter().map(|&l| (l, kind)));
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
