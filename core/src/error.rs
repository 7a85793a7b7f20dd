//! Typed errors. Every variant says what was wrong and where.

use thiserror::Error;

/// An invalid or unsupported router configuration.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConfigError {
    /// A field has an impossible value or conflicts with another field.
    #[error("invalid config field `{field}`: {reason}")]
    Invalid {
        /// The offending field, named as in [`crate::RouterConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A Hugging Face `config.json` names a `model_type` this crate does not know.
    #[error("unsupported model_type {found:?}; supported model types: {supported}")]
    UnsupportedModelType {
        /// The `model_type` found in the file.
        found: String,
        /// Comma-separated list of supported model types.
        supported: String,
    },
    /// A key needed to build the router is absent from an imported config.
    #[error("missing key `{key}` in {source_kind} config")]
    MissingKey {
        /// The missing key (dotted path for nested keys).
        key: String,
        /// "Hugging Face" or "Megatron".
        source_kind: &'static str,
    },
    /// A key of an imported config has the wrong type or an unsupported value.
    #[error("bad value for key `{key}` in {source_kind} config: {reason}")]
    BadKey {
        /// The key (dotted path for nested keys).
        key: String,
        /// "Hugging Face" or "Megatron".
        source_kind: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The input is not valid JSON.
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Json {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// No preset has this name.
    #[error("unknown preset {found:?}; presets: {available}")]
    UnknownPreset {
        /// The name asked for.
        found: String,
        /// Comma-separated list of preset names.
        available: String,
    },
}

impl ConfigError {
    /// Builds [`ConfigError::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// Converts a `serde_json` error into [`ConfigError::Json`].
    pub fn from_json(e: &serde_json::Error) -> Self {
        ConfigError::Json {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }
    }
}

/// An error raised while routing or replaying a batch.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RouteError {
    /// The logits tensor does not have the shape the router expects.
    #[error("logits shape mismatch: expected [T, {expected_experts}] but got [{rows}, {cols}]")]
    LogitsShape {
        /// E from the config.
        expected_experts: usize,
        /// Rows of the given tensor.
        rows: usize,
        /// Columns of the given tensor.
        cols: usize,
    },
    /// A logit is NaN or +∞ (−∞ is legal: a masked expert).
    #[error("non-finite logit {value} at row {row}, expert {expert} (NaN and +inf are rejected; -inf masks an expert)")]
    NonFiniteLogit {
        /// Token row.
        row: usize,
        /// Expert column.
        expert: usize,
        /// The value, printed.
        value: String,
    },
    /// Every logit of a row is −∞, so softmax weights are undefined.
    #[error("row {row}: every logit is -inf, softmax weights are undefined")]
    AllMasked {
        /// Token row.
        row: usize,
    },
    /// Replay ids have the wrong shape.
    #[error("replay ids shape mismatch: expected [{expected_rows}, {expected_k}] but got [{rows}, {cols}]")]
    IdsShape {
        /// Expected rows (tokens).
        expected_rows: usize,
        /// Expected columns (K).
        expected_k: usize,
        /// Given rows.
        rows: usize,
        /// Given columns.
        cols: usize,
    },
    /// A replay id is not a valid expert.
    #[error("replay id {id} at row {row}, slot {slot} is out of range (num_experts = {num_experts})")]
    IdOutOfRange {
        /// Token row.
        row: usize,
        /// Slot within the row.
        slot: usize,
        /// The offending id (as given, may be negative).
        id: i64,
        /// E.
        num_experts: usize,
    },
    /// A replay row names the same expert twice.
    #[error("replay row {row} names expert {id} twice (slots {first_slot} and {second_slot})")]
    DuplicateId {
        /// Token row.
        row: usize,
        /// The repeated expert id.
        id: u32,
        /// First slot holding it.
        first_slot: usize,
        /// Second slot holding it.
        second_slot: usize,
    },
    /// The bias vector given at run time has the wrong length.
    #[error("expert bias has length {got}, expected num_experts = {expected}")]
    BiasLength {
        /// E.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// The rule expects a selection bias (from the checkpoint) that has not been installed.
    #[error(
        "this routing rule expects a selection bias of {num_experts} values (e.g. the checkpoint's e_score_correction_bias) but none is installed; set it with RouterConfig::set_expert_bias (CLI: --bias)"
    )]
    BiasMissing {
        /// E.
        num_experts: usize,
    },
    /// A batch layout does not cover the batch it is used with.
    #[error("batch layout covers {layout_rows} rows but the batch has {batch_rows}")]
    LayoutRows {
        /// Rows the layout describes.
        layout_rows: usize,
        /// Rows in the logits.
        batch_rows: usize,
    },
    /// The backend cannot run this config or operation (f64 compute on a GPU, E or K above the
    /// backend's maximum, a device too old).
    #[error("the {backend} backend does not support this: {reason}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What is not supported, with the limit.
        reason: String,
    },
    /// A caller-provided buffer (device logits, preallocated outputs, a record buffer) is smaller
    /// than the call needs, or does not have the shape or kind it needs.
    #[error("{buffer} is too small or of the wrong kind: {detail}")]
    BufferTooSmall {
        /// Which buffer (e.g. "logits view", "route buffers", "record buffer").
        buffer: &'static str,
        /// What it holds and what the call needs.
        detail: String,
    },
    /// A row range or row stride does not fit the tensor it addresses.
    #[error("rows {start}..{end} do not fit a tensor of {rows} rows (row stride {stride}, row length {cols})")]
    RowRange {
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// Rows of the tensor.
        rows: usize,
        /// Elements from one row to the next.
        stride: usize,
        /// Elements per row.
        cols: usize,
    },
    /// The background recorder that copies ids to the host failed or stopped.
    #[error("the id recorder failed: {reason}")]
    Recorder {
        /// What happened (a poisoned lock, a stopped thread, an earlier failed copy).
        reason: String,
    },
    /// An array could not be built with the shape the call needs (a backend bug if it happens).
    #[error("array of shape {shape:?} could not be built: {source}")]
    ArrayShape {
        /// The shape asked for.
        shape: Vec<usize>,
        /// ndarray's error.
        #[source]
        source: ndarray::ShapeError,
    },
    /// The upstream gradient of a backward call does not have the shape `[T, K]` of its ids.
    #[error("grad_weights has shape [{rows}, {cols}], expected [{expected_rows}, {expected_k}] (the ids' [T, K])")]
    GradShape {
        /// Rows T of the ids.
        expected_rows: usize,
        /// K.
        expected_k: usize,
        /// Rows of the gradient given.
        rows: usize,
        /// Columns of the gradient given.
        cols: usize,
    },
    /// An input of a backward call other than the tensors is invalid (a non-finite scalar, aux
    /// counts of the wrong length).
    #[error("backward input `{what}` is invalid: {detail}")]
    BackwardInput {
        /// Which input.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A backward call through [`crate::Replayed`] at a layer (and batch layout) that no forward
    /// through the same router has routed, or whose tape entry a backward already consumed.
    #[error(
        "backward at layer {layer}: no forward through this replayed router routed this layer and batch \
         (each forward is matched by exactly one backward; call the inner router to differentiate other ids)"
    )]
    BackwardWithoutForward {
        /// Model layer id.
        layer: u32,
    },
    /// The ids of a backward (or of an activation recompute) differ from those the forward at
    /// the same layer and batch used.
    #[error("{pass} at layer {layer}: ids of row {row} differ from those of the forward")]
    IdsDifferFromForward {
        /// "backward" or "recompute".
        pass: &'static str,
        /// Model layer id.
        layer: u32,
        /// The first row that differs.
        row: usize,
    },
    /// The backend has no usable device.
    #[error("backend {backend} unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// Why it cannot run.
        reason: String,
    },
    /// A device or driver call failed.
    #[error("{backend} device error: {message}")]
    Device {
        /// Backend name.
        backend: &'static str,
        /// What the backend was doing, and the driver's message.
        message: String,
        /// The driver's own error, when there is one (downcast with [`ErrorSource::downcast_ref`]).
        #[source]
        source: Option<ErrorSource>,
    },
    /// The replay policy failed (missing route, layer mismatch, trace error, ...).
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

/// An error raised by a replay policy.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ReplayError {
    /// A row has no recorded route and the policy is strict.
    #[error("no recorded route for layer {layer}, sequence {sequence}, position {position} (strict replay)")]
    MissingRoute {
        /// Model layer id.
        layer: u32,
        /// Sequence id.
        sequence: u64,
        /// Token position within the sequence.
        position: u64,
    },
    /// The policy was asked about a layer the trace does not hold.
    #[error("layer {layer} is not a MoE layer of this trace (trace MoE layers: {known})")]
    UnknownLayer {
        /// Layer id asked for.
        layer: u32,
        /// The trace's layer ids.
        known: String,
    },
    /// The model's MoE layers and the trace's layer map disagree.
    #[error("layer map mismatch: model MoE layers {model:?}, trace MoE layers {trace:?}")]
    LayerMapMismatch {
        /// The model's MoE layer ids.
        model: Vec<u32>,
        /// The trace's MoE layer ids.
        trace: Vec<u32>,
    },
    /// A call site needs a batch layout but none was given.
    #[error("replay at layer {layer} needs a batch layout (sequence ids and positions) but the call site has none")]
    NoLayout {
        /// Model layer id.
        layer: u32,
    },
    /// A recorded route is invalid (duplicate, out of range, all zero).
    #[error("invalid recorded route: {0}")]
    InvalidRoute(String),
    /// Two recordings disagree about K or E.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A key was replayed a different number of times than expected (strict counting).
    #[error("replay count mismatch: {0}")]
    CountMismatch(String),
    /// An I/O or trace-format error while recording or replaying. The trace crate's
    /// `TraceError` is kept as the source (`err.downcast_ref::<TraceError>()`).
    #[error("trace error: {0}")]
    Trace(#[source] ErrorSource),
}

impl RouteError {
    /// A [`RouteError::Device`] without an underlying error value.
    pub fn device(backend: &'static str, message: impl Into<String>) -> Self {
        RouteError::Device {
            backend,
            message: message.into(),
            source: None,
        }
    }

    /// A [`RouteError::Device`] that keeps the driver's error as its source.
    pub fn device_with_source(
        backend: &'static str,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        RouteError::Device {
            backend,
            message: message.into(),
            source: Some(ErrorSource::new(source)),
        }
    }

    /// A [`RouteError::Unsupported`].
    pub fn unsupported(backend: &'static str, reason: impl Into<String>) -> Self {
        RouteError::Unsupported {
            backend,
            reason: reason.into(),
        }
    }

    /// A [`RouteError::ArrayShape`] for `shape`.
    pub fn array_shape(shape: &[usize], source: ndarray::ShapeError) -> Self {
        RouteError::ArrayShape {
            shape: shape.to_vec(),
            source,
        }
    }
}

/// A shared handle on an underlying error (a driver error, a trace-format error), kept as the
/// [`source`](std::error::Error::source) of the error that wraps it, so that callers can
/// inspect it (`downcast_ref`) while the wrapping errors stay `Clone` and comparable.
///
/// Two sources compare equal when they are the same value or print the same message.
#[derive(Clone)]
pub struct ErrorSource(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl ErrorSource {
    /// Wraps `err`.
    pub fn new(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        ErrorSource(std::sync::Arc::new(err))
    }

    /// The wrapped error as a `T`, if it is one.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl std::fmt::Debug for ErrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for ErrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for ErrorSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for ErrorSource {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}
