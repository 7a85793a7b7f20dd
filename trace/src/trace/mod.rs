//! Routing traces: the in-memory model ([`Trace`]), the `.mrt` file ([`TraceWriter`],
//! [`TraceFile`]), per-rank shards merged by a [`Manifest`], and the [`RouteSource`] trait the
//! replay policies read from.
//!
//! A trace maps **(sequence id, model layer id, position) → K expert ids**. Its
//! [`TraceHeader`] is self-describing: E, K, the id width ([`IdWidth`]: one byte per id when
//! E ≤ 256), the layer-id map (the model layers that are MoE, so dense, MTP or hash-routed layers
//! never shift the others), the [`RowConvention`] (engines that return `tokens − 1` rows leave
//! the last position *missing*, never zero), the routing-config fingerprint, an optional weight
//! version and a producer string.
//!
//! ## Rows, missing rows and ids
//!
//! Public APIs exchange ids as `u32`. A row whose K slots all hold [`MISSING_ID`] is *missing*
//! (no route known for that token); any other row must hold K distinct ids `< E`. Positions never
//! appended are missing too. Storage uses the header's id width; a missing row is stored as K
//! copies of the width's maximum value (`0xFF` / `0xFFFF`), which a valid row can never be when
//! K ≥ 2 (its ids are distinct) — so E = 256 still fits one byte per id.
//!
//! ## Appending (multi-turn, partial-rollout resume)
//!
//! Appending never rewrites or duplicates a recorded row ([`Trace::append`]):
//! * re-appending a position with the *same* ids is a no-op (so a resumed rollout may resend its
//!   prefix);
//! * re-appending a recorded position with *different* ids is [`TraceError::Conflict`] (nothing is
//!   changed); [`Trace::append_keep_existing`] instead keeps the old row and counts the conflict;
//! * a missing row never overwrites a recorded one, and a recorded row may fill a position that
//!   was missing (e.g. the last position of a `tokens − 1` turn, routed in the next turn).
//!
//! The file writer follows the same rules with first-write-wins (it does not re-read rows it has
//! already written, see [`TraceWriter`]).

mod codec;
mod file;
mod format;
mod kernels;
mod manifest;
mod model;
pub mod synthetic;
mod writer;

pub use codec::RowCodec;
pub use file::{ChunkInfo, IndexState, OpenOptions, RecoveryReport, TailDamage, TraceFile, Verify};
pub use manifest::{Manifest, ManifestShard, ShardedTrace};
pub use model::{AppendStats, LaneRef, LayerSummary, RunRef, Trace, TraceSummary, ValidationIssue};
pub use writer::{
    Compression, DEFAULT_CHUNK_ID_BYTES, DEFAULT_CHUNK_MAX_AGE, DEFAULT_COMPRESSION, TraceWriter, WriterOptions,
    WriterStats,
};

use moe_router_core::config::RouterConfig;
use moe_router_core::error::ReplayError;
use moe_router_core::layout::{LayerId, LayerKind, SeqId};
use ndarray::ArrayViewMut2;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The id value that marks a slot of a missing row in the `u32` APIs (a row is missing when all
/// its K slots hold it).
pub const MISSING_ID: u32 = u32::MAX;

/// File extension of trace files.
pub const FILE_EXTENSION: &str = "mrt";

/// Bytes per stored id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdWidth {
    /// One byte (E ≤ 256; E ≤ 255 when K = 1). Missing rows are stored as `0xFF` in every slot.
    U8,
    /// Two bytes, little-endian (E ≤ 65 535). Missing rows are stored as `0xFFFF` in every slot.
    U16,
}

impl IdWidth {
    /// The narrowest width able to store E experts with K slots, keeping the all-maximum row free
    /// for "missing": u8 when E ≤ 256 (E ≤ 255 when K = 1, where a single slot of 255 would be
    /// ambiguous), else u16 (E ≤ 65 535). See [`IdWidth::max_experts`].
    pub fn for_shape(num_experts: usize, top_k: usize) -> Option<IdWidth> {
        [IdWidth::U8, IdWidth::U16]
            .into_iter()
            .find(|w| num_experts <= w.max_experts(top_k))
    }

    /// Bytes per id (1 or 2).
    pub fn bytes(self) -> usize {
        match self {
            IdWidth::U8 => 1,
            IdWidth::U16 => 2,
        }
    }

    /// The reserved value (the width's maximum) stored in every slot of a missing row.
    pub fn sentinel(self) -> u32 {
        match self {
            IdWidth::U8 => 0xFF,
            IdWidth::U16 => 0xFFFF,
        }
    }

    /// The largest E this width stores with K slots: 256 / 65 536 when K ≥ 2 (a valid row holds
    /// distinct ids, so it is never all-sentinel), 255 / 65 535 when K = 1. Capped by
    /// [`moe_router_core::MAX_EXPERTS`].
    pub fn max_experts(self, top_k: usize) -> usize {
        let all = self.sentinel() as usize + 1;
        let cap = if top_k >= 2 { all } else { all - 1 };
        cap.min(moe_router_core::MAX_EXPERTS)
    }

    /// The code in the file header (1 or 2: bytes per id).
    pub fn code(self) -> u8 {
        self.bytes() as u8
    }

    /// Parses [`IdWidth::code`].
    pub fn from_code(code: u8) -> Option<IdWidth> {
        match code {
            1 => Some(IdWidth::U8),
            2 => Some(IdWidth::U16),
            _ => None,
        }
    }
}

/// How the rows of a sequence relate to its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowConvention {
    /// Every token position has a row.
    #[default]
    AllTokens,
    /// The producer returns `tokens − 1` rows (vLLM, SGLang): the last position of each sequence
    /// was never routed and is *missing* — replaying it is a missing route (strict error or
    /// fallback), never expert 0.
    TokensMinusOne,
}

impl RowConvention {
    /// The code in the file header.
    pub fn code(self) -> u8 {
        match self {
            RowConvention::AllTokens => 0,
            RowConvention::TokensMinusOne => 1,
        }
    }
    /// Parses [`RowConvention::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(RowConvention::AllTokens),
            1 => Some(RowConvention::TokensMinusOne),
            _ => None,
        }
    }
}

/// The self-describing header of a trace (in memory and in the file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHeader {
    num_experts: u32,
    top_k: u16,
    id_width: IdWidth,
    layers: Vec<LayerId>,
    row_convention: RowConvention,
    fingerprint: u64,
    weight_version: Option<u64>,
    producer: String,
    /// The layers of the map that are not decoder layers, ascending by id (format 2.1 record 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    layer_kinds: Vec<(LayerId, LayerKind)>,
    /// Present rows may hold the sentinel in some slots ("take the router's choice"; flag bit 1).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    slot_sentinels: bool,
}

/// Longest producer string stored in a header (bytes).
pub const MAX_PRODUCER_BYTES: usize = 4096;
/// Most MoE layers a header may list.
pub const MAX_LAYERS: usize = 1 << 16;

impl TraceHeader {
    /// A header for E experts, K slots and the model's MoE layer ids (strictly ascending, at
    /// least one). The id width is the narrowest that fits ([`IdWidth::for_shape`]). Row
    /// convention [`RowConvention::AllTokens`], fingerprint 0, no weight version, empty producer.
    pub fn new(num_experts: usize, top_k: usize, layers: &[u32]) -> Result<Self, TraceError> {
        if num_experts == 0 || num_experts > moe_router_core::MAX_EXPERTS {
            return Err(TraceError::InvalidHeader(format!(
                "num_experts = {num_experts} (must be 1..={})",
                moe_router_core::MAX_EXPERTS
            )));
        }
        if top_k == 0 || top_k > num_experts || top_k > usize::from(u16::MAX) {
            return Err(TraceError::InvalidHeader(format!(
                "top_k = {top_k} (must be 1..=num_experts = {num_experts})"
            )));
        }
        let id_width = IdWidth::for_shape(num_experts, top_k).ok_or_else(|| {
            TraceError::InvalidHeader(format!(
                "num_experts = {num_experts} with top_k = {top_k} fits no id width"
            ))
        })?;
        check_layers(layers)?;
        Ok(TraceHeader {
            num_experts: num_experts as u32,
            top_k: top_k as u16,
            id_width,
            layers: layers.iter().map(|&l| LayerId(l)).collect(),
            row_convention: RowConvention::AllTokens,
            fingerprint: 0,
            weight_version: None,
            producer: String::new(),
            layer_kinds: Vec::new(),
            slot_sentinels: false,
        })
    }

    /// A header for a routing config (E, K and [`RouterConfig::fingerprint`]) and the model's MoE
    /// layer ids.
    pub fn for_config(cfg: &RouterConfig, layers: &[u32]) -> Result<Self, TraceError> {
        Ok(TraceHeader::new(cfg.num_experts(), cfg.top_k(), layers)?.with_fingerprint(cfg.fingerprint()))
    }

    /// Sets the row convention.
    pub fn with_row_convention(mut self, c: RowConvention) -> Self {
        self.row_convention = c;
        self
    }
    /// Sets the model/config fingerprint.
    pub fn with_fingerprint(mut self, f: u64) -> Self {
        self.fingerprint = f;
        self
    }
    /// Sets the weight version (policy version, training step).
    pub fn with_weight_version(mut self, v: Option<u64>) -> Self {
        self.weight_version = v;
        self
    }
    /// Sets the producer string (truncated to [`MAX_PRODUCER_BYTES`] at a char boundary).
    pub fn with_producer(mut self, p: impl Into<String>) -> Self {
        let mut p: String = p.into();
        if p.len() > MAX_PRODUCER_BYTES {
            let mut cut = MAX_PRODUCER_BYTES;
            while !p.is_char_boundary(cut) {
                cut -= 1;
            }
            p.truncate(cut);
        }
        self.producer = p;
        self
    }
    /// Forces a wider id width than needed (u16 for a small E, e.g. to match a consumer).
    /// Narrowing below what E needs is an error.
    pub fn with_id_width(mut self, w: IdWidth) -> Result<Self, TraceError> {
        if self.num_experts() > w.max_experts(self.top_k())
            || (self.slot_sentinels && self.num_experts() > w.sentinel() as usize)
        {
            return Err(TraceError::InvalidHeader(format!(
                "id width {w:?} cannot hold num_experts = {} with top_k = {}",
                self.num_experts, self.top_k
            )));
        }
        self.id_width = w;
        Ok(self)
    }

    /// Marks `layer` (a layer of the map) as a layer of `kind`; [`LayerKind::Decoder`] is the
    /// default of every layer. An MTP layer follows the decoder stack, so its id must be greater
    /// than every decoder and hash layer id of the map (an MTP layer numbered like a decoder
    /// layer, as Megatron numbers them from 1, would alias it): otherwise, and for a layer not in
    /// the map, [`TraceError::InvalidHeader`].
    pub fn with_layer_kind(mut self, layer: u32, kind: LayerKind) -> Result<Self, TraceError> {
        if self.layer_index(LayerId(layer)).is_none() {
            return Err(TraceError::InvalidHeader(format!(
                "layer {layer} is not in the layer map {:?}, so it has no kind",
                self.layer_ids()
            )));
        }
        self.layer_kinds.retain(|(l, _)| l.0 != layer);
        if kind != LayerKind::Decoder {
            self.layer_kinds.push((LayerId(layer), kind));
            self.layer_kinds.sort_unstable();
        }
        check_kinds(&self.layers, &self.layer_kinds)?;
        Ok(self)
    }
    /// [`TraceHeader::with_layer_kind`] for each of `layers`.
    pub fn with_layers_of_kind(self, layers: &[u32], kind: LayerKind) -> Result<Self, TraceError> {
        layers.iter().try_fold(self, |h, &l| h.with_layer_kind(l, kind))
    }
    /// The kind of `layer` (`None` when it is not in the map).
    pub fn layer_kind(&self, layer: LayerId) -> Option<LayerKind> {
        self.layer_index(layer)?;
        Some(
            self.layer_kinds
                .iter()
                .find(|(l, _)| *l == layer)
                .map_or(LayerKind::Decoder, |&(_, k)| k),
        )
    }
    /// The kind of every layer of the map, in map order.
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        self.layers
            .iter()
            .map(|&l| self.layer_kind(l).unwrap_or_default())
            .collect()
    }
    /// The layer ids of one kind, ascending.
    pub fn layers_of_kind(&self, kind: LayerKind) -> Vec<u32> {
        self.layers
            .iter()
            .filter(|&&l| self.layer_kind(l) == Some(kind))
            .map(|l| l.0)
            .collect()
    }
    /// True when some layer of the map is not a decoder layer.
    pub fn has_layer_kinds(&self) -> bool {
        !self.layer_kinds.is_empty()
    }
    /// Allows (`true`) the slot sentinel in present rows: a slot holding [`MISSING_ID`] (stored as
    /// the width's maximum) in a row that is not missing means "don't replay this slot: take the
    /// router's choice" ([`moe_router_core::ROUTER_SLOT`]). The sentinel must not be a valid id:
    /// E must be below the width's maximum (E ≤ 255 with one-byte ids: widen E = 256 to two-byte
    /// ids with [`TraceHeader::with_id_width`] first), otherwise [`TraceError::InvalidHeader`].
    /// Written as flag bit 1, which format 2.0 readers refuse.
    pub fn with_slot_sentinels(mut self, on: bool) -> Result<Self, TraceError> {
        if on && self.num_experts() > self.id_width.sentinel() as usize {
            return Err(TraceError::InvalidHeader(format!(
                "slot sentinels need E below the id width's maximum {} (E = {}): use two-byte ids",
                self.id_width.sentinel(),
                self.num_experts
            )));
        }
        self.slot_sentinels = on;
        Ok(self)
    }
    /// Whether present rows may hold slot sentinels.
    pub fn slot_sentinels(&self) -> bool {
        self.slot_sentinels
    }

    /// E.
    pub fn num_experts(&self) -> usize {
        self.num_experts as usize
    }
    /// K.
    pub fn top_k(&self) -> usize {
        usize::from(self.top_k)
    }
    /// Bytes per stored id.
    pub fn id_width(&self) -> IdWidth {
        self.id_width
    }
    /// The model's MoE layer ids, ascending.
    pub fn layers(&self) -> &[LayerId] {
        &self.layers
    }
    /// The MoE layer ids as plain integers.
    pub fn layer_ids(&self) -> Vec<u32> {
        self.layers.iter().map(|l| l.0).collect()
    }
    /// Index of `layer` in the layer map, if it is a MoE layer of this trace.
    pub fn layer_index(&self, layer: LayerId) -> Option<usize> {
        self.layers.binary_search(&layer).ok()
    }
    /// Row convention.
    pub fn row_convention(&self) -> RowConvention {
        self.row_convention
    }
    /// Model/config fingerprint (0 when unknown).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
    /// Weight version, if recorded.
    pub fn weight_version(&self) -> Option<u64> {
        self.weight_version
    }
    /// Producer string.
    pub fn producer(&self) -> &str {
        &self.producer
    }
    /// Bytes of one stored row (K × id width).
    pub fn row_bytes(&self) -> usize {
        self.top_k() * self.id_width.bytes()
    }

    /// Errors with [`ReplayError::LayerMapMismatch`] unless `model_layers` (the model's MoE layer
    /// ids, in order) equals this trace's layer map.
    pub fn check_layer_map(&self, model_layers: &[u32]) -> Result<(), ReplayError> {
        let mine = self.layer_ids();
        if mine != model_layers {
            return Err(ReplayError::LayerMapMismatch {
                model: model_layers.to_vec(),
                trace: mine,
            });
        }
        Ok(())
    }

    /// Errors unless `other` describes the same routing (E, K, id width, layers, row convention,
    /// fingerprint, weight version); the producer may differ. Used when merging shards.
    pub fn check_compatible(&self, other: &TraceHeader) -> Result<(), TraceError> {
        let mut a = self.clone();
        a.producer = other.producer.clone();
        if &a != other {
            return Err(TraceError::HeaderMismatch(format!("{self:?} vs {other:?}")));
        }
        Ok(())
    }

    /// [`ReplayError::UnknownLayer`] for `layer`.
    pub(crate) fn unknown_layer(&self, layer: LayerId) -> ReplayError {
        ReplayError::UnknownLayer {
            layer: layer.0,
            known: format!("{:?}", self.layer_ids()),
        }
    }

    /// Internal constructor used by the file decoder (fields already checked).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        num_experts: u32,
        top_k: u16,
        id_width: IdWidth,
        layers: Vec<LayerId>,
        row_convention: RowConvention,
        fingerprint: u64,
        weight_version: Option<u64>,
        producer: String,
    ) -> Result<Self, TraceError> {
        let h = TraceHeader::new(num_experts as usize, usize::from(top_k), &[0])?;
        let ids: Vec<u32> = layers.iter().map(|l| l.0).collect();
        check_layers(&ids)?;
        let h = TraceHeader { layers, ..h };
        h.with_id_width(id_width).map(|h| TraceHeader {
            row_convention,
            fingerprint,
            weight_version,
            producer,
            ..h
        })
    }

    /// Sets every layer's kind from a list in map order (file decoder; checked).
    pub(crate) fn with_kind_list(mut self, kinds: &[LayerKind]) -> Result<Self, TraceError> {
        self.layer_kinds = self
            .layers
            .iter()
            .zip(kinds)
            .filter(|(_, k)| **k != LayerKind::Decoder)
            .map(|(&l, &k)| (l, k))
            .collect();
        check_kinds(&self.layers, &self.layer_kinds)?;
        Ok(self)
    }
}

fn check_kinds(layers: &[LayerId], kinds: &[(LayerId, LayerKind)]) -> Result<(), TraceError> {
    let first_mtp = kinds.iter().find(|(_, k)| *k == LayerKind::Mtp).map(|(l, _)| *l);
    if let Some(m) = first_mtp
        && let Some(&d) = layers
            .iter()
            .rev()
            .find(|&&l| l > m && !kinds.iter().any(|&(x, k)| x == l && k == LayerKind::Mtp))
    {
        return Err(TraceError::InvalidHeader(format!(
            "MTP layer {m} comes before {} layer {d}: MTP layers follow the decoder stack (ids from \
             num_hidden_layers), an MTP id below a decoder id would alias a decoder layer",
            kinds
                .iter()
                .find(|(l, _)| *l == d)
                .map_or(LayerKind::Decoder, |&(_, k)| k)
        )));
    }
    Ok(())
}

fn check_layers(layers: &[u32]) -> Result<(), TraceError> {
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(TraceError::InvalidHeader(format!(
            "the layer map lists {} layers (must be 1..={MAX_LAYERS})",
            layers.len()
        )));
    }
    if let Some(w) = layers.windows(2).find(|w| w[0] >= w[1]) {
        return Err(TraceError::InvalidHeader(format!(
            "layer ids must be strictly ascending, found {} then {}",
            w[0], w[1]
        )));
    }
    Ok(())
}

/// A trace-file or trace-model error. File errors carry the byte offset where the problem was
/// found.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TraceError {
    /// An operating-system I/O error.
    #[error("I/O error while {context}: {message}")]
    Io {
        /// What was being done (with the path).
        context: String,
        /// The OS message.
        message: String,
    },
    /// The file does not start with the trace magic.
    #[error("not a moe-router trace: bad magic at offset 0 (found {found:02x?})")]
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// The file's major version is not supported.
    #[error("unsupported trace format version {major}.{minor} (this reader reads 1.x to {supported}.x)")]
    UnsupportedVersion {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
        /// The newest major version this reader reads (it reads every one from 1).
        supported: u16,
    },
    /// A checksum does not match: the bytes were corrupted (bit flip, torn write).
    #[error("{what} checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// "header", "chunk 3", "index", "footer".
        what: String,
        /// Offset of the start of the checksummed region.
        offset: u64,
        /// CRC32C stored in the file.
        stored: u32,
        /// CRC32C of the bytes read.
        computed: u32,
    },
    /// The file ends inside a structure that must be complete (the header).
    #[error("file truncated: {what} at offset {offset} needs {needed} bytes, file has {available}")]
    Truncated {
        /// The structure being read.
        what: String,
        /// Its offset.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// A structure is malformed (its checksum matched, so the producer wrote it wrong).
    #[error("malformed {what} at offset {offset}: {reason}")]
    Malformed {
        /// The structure.
        what: String,
        /// Byte offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The header describes an impossible trace.
    #[error("invalid trace header: {0}")]
    InvalidHeader(String),
    /// Two headers (shards, a trace and a writer) describe different routing.
    #[error("trace headers disagree: {0}")]
    HeaderMismatch(String),
    /// A row names a layer that is not in the layer map.
    #[error("layer {layer} is not a MoE layer of this trace (layer map {known:?})")]
    UnknownLayer {
        /// The layer id.
        layer: u32,
        /// The layer map.
        known: Vec<u32>,
    },
    /// An id array does not have K columns.
    #[error("ids have {got} columns, the trace has K = {top_k}")]
    Shape {
        /// K.
        top_k: usize,
        /// Columns given.
        got: usize,
    },
    /// Stored rows whose byte length is not a multiple of the row size (K × id width).
    #[error("{bytes} bytes of stored rows is not a multiple of the row size {row_bytes}")]
    StoredLength {
        /// Bytes given.
        bytes: usize,
        /// K × id width.
        row_bytes: usize,
    },
    /// An id is ≥ E.
    #[error(
        "sequence {seq}, layer {layer}, position {position}, slot {slot}: id {id} is out of range (num_experts = {num_experts})"
    )]
    IdOutOfRange {
        /// Sequence id.
        seq: u64,
        /// Layer id.
        layer: u32,
        /// Position.
        position: u64,
        /// Slot within the row.
        slot: usize,
        /// The id.
        id: u32,
        /// E.
        num_experts: usize,
    },
    /// A row names an expert twice (an all-zero row — zero padding or a bypassed capture — is
    /// reported as this too).
    #[error("sequence {seq}, layer {layer}, position {position}: expert {id} appears twice in the row{hint}")]
    DuplicateId {
        /// Sequence id.
        seq: u64,
        /// Layer id.
        layer: u32,
        /// Position.
        position: u64,
        /// The repeated id.
        id: u32,
        /// Extra diagnosis ("" or a hint about all-zero rows).
        hint: String,
    },
    /// Some but not all slots of a row are the missing marker.
    #[error(
        "sequence {seq}, layer {layer}, position {position}: row is partly missing (a row is missing only when every slot is the sentinel)"
    )]
    PartialMissing {
        /// Sequence id.
        seq: u64,
        /// Layer id.
        layer: u32,
        /// Position.
        position: u64,
    },
    /// A recorded position was appended again with different ids.
    #[error(
        "sequence {seq}, layer {layer}, position {position} is already recorded with different ids (appending never rewrites a row)"
    )]
    Conflict {
        /// Sequence id.
        seq: u64,
        /// Layer id.
        layer: u32,
        /// Position.
        position: u64,
    },
    /// Positions overflow u64.
    #[error("sequence {seq}, layer {layer}: positions from {start} overflow")]
    PositionOverflow {
        /// Sequence id.
        seq: u64,
        /// Layer id.
        layer: u32,
        /// First position.
        start: u64,
    },
    /// Every recorded row of a layer routes to expert 0: the capture was bypassed or zero-filled.
    #[error("layer {layer}: all {rows} recorded rows route only to expert 0 (capture bypassed or zero-filled?)")]
    AllZeroLayer {
        /// Layer id.
        layer: u32,
        /// Rows in the layer.
        rows: u64,
    },
    /// The writer was closed, or its background thread failed earlier.
    #[error("trace writer unusable: {0}")]
    WriterClosed(String),
    /// A manifest is malformed or names unusable shards.
    #[error("manifest {path}: {reason}")]
    Manifest {
        /// The manifest path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Data found at a byte offset of a file failed validation.
    #[error("{source} (in chunk {chunk} at file offset {offset})")]
    InChunk {
        /// Chunk index.
        chunk: u32,
        /// Offset of the chunk in the file.
        offset: u64,
        /// The problem.
        source: Box<TraceError>,
    },
}

impl TraceError {
    pub(crate) fn io(context: impl Into<String>, e: &std::io::Error) -> Self {
        TraceError::Io {
            context: context.into(),
            message: e.to_string(),
        }
    }
}

impl From<TraceError> for ReplayError {
    fn from(e: TraceError) -> Self {
        match e {
            TraceError::UnknownLayer { layer, known } => ReplayError::UnknownLayer {
                layer,
                known: format!("{known:?}"),
            },
            TraceError::IdOutOfRange { .. } | TraceError::DuplicateId { .. } | TraceError::PartialMissing { .. } => {
                ReplayError::InvalidRoute(e.to_string())
            }
            TraceError::AllZeroLayer { .. } => ReplayError::InvalidRoute(e.to_string()),
            other => ReplayError::Trace(moe_router_core::ErrorSource::new(other)),
        }
    }
}

/// Where replay policies read recorded routes from: an in-memory [`Trace`], a memory-mapped
/// [`TraceFile`] or a [`ShardedTrace`].
pub trait RouteSource: Send + Sync {
    /// The trace header.
    fn header(&self) -> &TraceHeader;

    /// Fills `out` (`[len, K]`) with the rows of positions `start..start+len` of `seq` at
    /// `layer`; rows with no recorded route are filled with [`MISSING_ID`]. Errors on an unknown
    /// layer or damaged data.
    fn read_rows(&self, seq: SeqId, layer: LayerId, start: u64, out: ArrayViewMut2<'_, u32>) -> Result<(), TraceError>;

    /// Checks the whole content: every layer with recorded rows must route somewhere other than
    /// expert 0 when it holds at least [`ALL_ZERO_MIN_ROWS`] rows ([`TraceError::AllZeroLayer`]),
    /// and damaged data is an error.
    fn validate(&self) -> Result<(), TraceError>;
}

/// A layer is flagged as all-zero (capture bug) only when it holds at least this many recorded
/// rows and every id in them is 0. (With K ≥ 2 a zero row is already a duplicate-id error; this
/// catches K = 1 traces.)
pub const ALL_ZERO_MIN_ROWS: u64 = 16;

impl<S: RouteSource + ?Sized> RouteSource for &S {
    fn header(&self) -> &TraceHeader {
        (**self).header()
    }
    fn read_rows(&self, seq: SeqId, layer: LayerId, start: u64, out: ArrayViewMut2<'_, u32>) -> Result<(), TraceError> {
        (**self).read_rows(seq, layer, start, out)
    }
    fn validate(&self) -> Result<(), TraceError> {
        (**self).validate()
    }
}

impl<S: RouteSource + ?Sized> RouteSource for std::sync::Arc<S> {
    fn header(&self) -> &TraceHeader {
        (**self).header()
    }
    fn read_rows(&self, seq: SeqId, layer: LayerId, start: u64, out: ArrayViewMut2<'_, u32>) -> Result<(), TraceError> {
        (**self).read_rows(seq, layer, start, out)
    }
    fn validate(&self) -> Result<(), TraceError> {
        (**self).validate()
    }
}
