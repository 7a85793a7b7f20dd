//! # moe-router-core
//!
//! The semantics of Mixture-of-Experts top-k routing with router replay, independent of any
//! device: [`RouterConfig`] (with presets and Hugging Face / Megatron import), the [`Router`] and
//! [`ReplayPolicy`] traits and the [`Replayed`] decorator that composes them, the portable math
//! ([`math`]) and the [`ReferenceRouter`] that every backend is tested against, capacity
//! dropping and routing statistics.
//!
//! ```
//! use moe_router_core::{RouterConfig, ReferenceRouter, Router, CallSite, LogitsRef};
//! use ndarray::array;
//!
//! let cfg = RouterConfig::builder(4, 2).build().unwrap();
//! let router = ReferenceRouter::new(cfg);
//! let logits = array![[0.1f32, 2.0, -1.0, 1.5]];
//! let out = router.route(&LogitsRef::F32(logits.view()), &CallSite::layer(0)).unwrap();
//! assert_eq!(out.ids.row(0).to_vec(), vec![1, 3]);
//! ```

pub mod backend;
pub mod backward;
pub mod capacity;
pub mod config;
pub mod error;
pub mod hash_routing;
pub mod import;
pub mod layout;
pub mod logits;
pub mod math;
pub mod reference;
pub mod replay;
pub mod replay_slots;
pub mod router;
pub mod stats;

pub use backend::LogitsDtype;
pub use backward::LossGrads;
pub use config::{
    AuxLoss, AuxLossKind, Capacity, ComputeDtype, DropPolicy, GroupLimit, GroupScore, Normalization, Numerics,
    RouterConfig, RouterConfigBuilder, ScoreFunction, SoftmaxPosition,
};
pub use error::{ConfigError, ErrorSource, ReplayError, RouteError};
pub use hash_routing::{HashLayers, HashRouteError, HashTable, HashTableError};
pub use import::presets::{preset, preset_names};
pub use layout::{BatchLayout, LayerId, LayerKind, LayoutError, RowAddr, Segment, SeqId};
pub use logits::LogitsRef;
pub use reference::ReferenceRouter;
pub use replay::{ForcedIds, PassThrough, Plan, ReplayPolicy, Replayed, RouteShape};
pub use replay_slots::{ROUTER_SLOT, ReplayThreshold, SlotCounts, SlotReplay};
pub use router::{
    CallSite, HostGrad, HostMatrix, HostWeights, IdsSink, Pass, ROUTER_SELECTS, Routed, Router, validate_ids,
};

/// Largest E supported by every backend (ids are stored in u16 traces with one sentinel).
pub const MAX_EXPERTS: usize = 65_535;
