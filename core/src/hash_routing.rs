//! Hash-routed layers (DeepSeek-V4's first layers): the K expert ids of a token come from a
//! `[vocab, K]` table indexed by the token id, not from a top-K of the scores; the weights still
//! come from the live scores ([`Router::weights_for`]: the unbiased scores at those ids,
//! normalised and scaled by the layer's rule), so gradients reach the router as in replay.
//!
//! * [`HashTable`] holds the table (every row: K distinct ids `< E`) and routes host logits given
//!   the batch's token ids ([`HashTable::route_host`]).
//! * [`HashLayers`] is a [`ReplayPolicy`] wrapper that turns hash layers into policy-supplied ids,
//!   so a [`crate::Replayed`] router records, replays and traces them like any other layer: for a
//!   call at a hash layer it asks the inner policy first (a trace's recorded ids win; padding
//!   stays with the router), and supplies `table[token]` for every token row the inner policy
//!   leaves to the router (a plain call, a fallback row, a sentinel slot). Token ids are looked
//!   up by (sequence, position) from [`HashLayers::set_tokens`]; a trace header marks those
//!   layers as [`crate::LayerKind::Hash`].

use crate::error::{ReplayError, RouteError};
use crate::layout::{LayerId, RowAddr, SeqId};
use crate::logits::LogitsRef;
use crate::replay::{ForcedIds, Plan, ReplayPolicy, RouteShape};
use crate::replay_slots::{ReplayThreshold, SlotCounts};
use crate::router::{CallSite, HostWeights, IdsSink, Router};
use ndarray::{Array2, ArrayView2};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

/// A bad hash table or token id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashTableError {
    /// The table has no row or no column.
    #[error("hash table of shape [{vocab}, {top_k}] is empty")]
    Empty {
        /// Rows.
        vocab: usize,
        /// Columns.
        top_k: usize,
    },
    /// The table's K differs from the layer's.
    #[error("hash table has K = {table} ids per token, the layer's rule has K = {rule}")]
    TopK {
        /// Table columns.
        table: usize,
        /// The rule's K.
        rule: usize,
    },
    /// A table entry is not an expert id.
    #[error("hash table row {token}, slot {slot}: id {id} is out of range (num_experts = {num_experts})")]
    IdOutOfRange {
        /// Token id (table row).
        token: usize,
        /// Slot.
        slot: usize,
        /// The value.
        id: i64,
        /// E.
        num_experts: usize,
    },
    /// A table row names an expert twice.
    #[error("hash table row {token} names expert {id} twice (slots {first_slot} and {second_slot})")]
    DuplicateId {
        /// Token id (table row).
        token: usize,
        /// The repeated id.
        id: u32,
        /// First slot.
        first_slot: usize,
        /// Second slot.
        second_slot: usize,
    },
    /// A token id outside the table.
    #[error("batch row {row}: token id {token} is outside the hash table (vocab = {vocab})")]
    TokenOutOfRange {
        /// Batch row.
        row: usize,
        /// The token id.
        token: u64,
        /// Table rows.
        vocab: usize,
    },
    /// The token list does not have one token per batch row.
    #[error("{tokens} token ids given for a batch of {rows} rows")]
    TokenCount {
        /// Tokens given.
        tokens: usize,
        /// Batch rows.
        rows: usize,
    },
    /// No token id is known for a token row of a hash layer.
    #[error("hash layer {layer}: no token id for sequence {seq}, position {position} (HashLayers::set_tokens)")]
    NoToken {
        /// Layer id.
        layer: u32,
        /// Sequence id.
        seq: u64,
        /// Position.
        position: u64,
    },
}

/// A routing error of a hash-routed layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HashRouteError {
    /// The table or the token ids.
    #[error(transparent)]
    Table(#[from] HashTableError),
    /// Routing (weights, shapes, logits).
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// A `[vocab, K]` table of expert ids per token id; every row K distinct ids `< E`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashTable {
    num_experts: usize,
    ids: Array2<u32>,
}

impl HashTable {
    /// A table for E experts, checking every row (ids `< E`, distinct).
    pub fn new(ids: Array2<u32>, num_experts: usize) -> Result<Self, HashTableError> {
        let (v, k) = ids.dim();
        if v == 0 || k == 0 {
            return Err(HashTableError::Empty { vocab: v, top_k: k });
        }
        for (tok, row) in ids.outer_iter().enumerate() {
            for (j, &id) in row.iter().enumerate() {
                if id as usize >= num_experts {
                    return Err(HashTableError::IdOutOfRange {
                        token: tok,
                        slot: j,
                        id: i64::from(id),
                        num_experts,
                    });
                }
                if let Some(jj) = row.iter().take(j).position(|&p| p == id) {
                    return Err(HashTableError::DuplicateId {
                        token: tok,
                        id,
                        first_slot: jj,
                        second_slot: j,
                    });
                }
            }
        }
        Ok(HashTable { num_experts, ids })
    }

    /// A table from signed ids (as checkpoints store `tid2eid`): negative values are out of range.
    pub fn from_i64(ids: ArrayView2<'_, i64>, num_experts: usize) -> Result<Self, HashTableError> {
        let mut out = Array2::<u32>::zeros(ids.dim());
        for ((t, j), &v) in ids.indexed_iter() {
            if v < 0 || v as u64 >= num_experts as u64 {
                return Err(HashTableError::IdOutOfRange {
                    token: t,
                    slot: j,
                    id: v,
                    num_experts,
                });
            }
            out[[t, j]] = v as u32;
        }
        HashTable::new(out, num_experts)
    }

    /// Table rows (token ids `0..vocab`).
    pub fn vocab(&self) -> usize {
        self.ids.nrows()
    }
    /// K.
    pub fn top_k(&self) -> usize {
        self.ids.ncols()
    }
    /// E.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// The ids of token `token`, in slot order.
    pub fn row(&self, token: u64) -> Option<Vec<u32>> {
        usize::try_from(token)
            .ok()
            .filter(|&t| t < self.vocab())
            .map(|t| self.ids.row(t).to_vec())
    }

    /// The ids `[T, K]` of a batch of token ids (one per row).
    pub fn ids_for(&self, tokens: &[u64]) -> Result<Array2<u32>, HashTableError> {
        let mut out = Array2::<u32>::zeros((tokens.len(), self.top_k()));
        for (r, &tok) in tokens.iter().enumerate() {
            let row = self.row(tok).ok_or(HashTableError::TokenOutOfRange {
                row: r,
                token: tok,
                vocab: self.vocab(),
            })?;
            out.row_mut(r).assign(&ndarray::ArrayView1::from(&row[..]));
        }
        Ok(out)
    }

    fn check_rule<R: Router + ?Sized>(&self, router: &R) -> Result<(), HashRouteError> {
        let cfg = router.config();
        if cfg.top_k() != self.top_k() {
            return Err(HashTableError::TopK {
                table: self.top_k(),
                rule: cfg.top_k(),
            }
            .into());
        }
        if cfg.num_experts() < self.num_experts {
            return Err(RouteError::LogitsShape {
                expected_experts: self.num_experts,
                rows: 0,
                cols: cfg.num_experts(),
            }
            .into());
        }
        Ok(())
    }

    /// Routes host logits of a hash layer: ids `table[token]` per row, weights from the live
    /// logits ([`Router::weights_host_at`]).
    pub fn route_host<R: Router + ?Sized>(
        &self,
        router: &R,
        logits: &LogitsRef<'_>,
        tokens: &[u64],
        site: &CallSite<'_>,
    ) -> Result<(Array2<u32>, HostWeights), HashRouteError> {
        self.check_rule(router)?;
        let rows = logits.dim().0;
        if tokens.len() != rows {
            return Err(HashTableError::TokenCount {
                tokens: tokens.len(),
                rows,
            }
            .into());
        }
        let ids = self.ids_for(tokens)?;
        let w = router.weights_host_at(logits, ids.view(), site)?;
        Ok((ids, w))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A [`ReplayPolicy`] that supplies the ids of hash-routed layers from their tables and defers
/// everything else to the inner policy (see the module docs).
///
/// Rows of a hash layer: what the inner policy replays stays; every token row it leaves to the
/// router, and every sentinel slot, gets `table[token]` (the hash "router's choice"); padding
/// rows stay with the router. A plain call (inner plan [`Plan::Route`]) becomes a replay of the
/// table ids. A token row without a known token id is an error naming layer, sequence and
/// position. The decorator records the final ids, so a hash layer is traced like the others.
#[derive(Debug)]
pub struct HashLayers<P> {
    inner: P,
    tables: BTreeMap<u32, HashTable>,
    tokens: Mutex<HashMap<SeqId, Vec<u64>>>,
}

impl<P: ReplayPolicy> HashLayers<P> {
    /// Wraps `inner` (without hash layers yet).
    pub fn new(inner: P) -> Self {
        HashLayers {
            inner,
            tables: BTreeMap::new(),
            tokens: Mutex::new(HashMap::new()),
        }
    }
    /// Makes `layer` a hash-routed layer with this table.
    pub fn with_table(mut self, layer: u32, table: HashTable) -> Self {
        self.tables.insert(layer, table);
        self
    }
    /// The hash layers, ascending.
    pub fn hash_layers(&self) -> Vec<u32> {
        self.tables.keys().copied().collect()
    }
    /// The inner policy.
    pub fn inner(&self) -> &P {
        &self.inner
    }
    /// Sets the token ids of sequence `seq` (position `i` holds `tokens[i]`).
    pub fn set_tokens(&self, seq: SeqId, tokens: Vec<u64>) {
        lock(&self.tokens).insert(seq, tokens);
    }
    /// Forgets every sequence's token ids (end of a step).
    pub fn clear_tokens(&self) {
        lock(&self.tokens).clear();
    }

    fn table_rows(
        &self,
        table: &HashTable,
        site: &CallSite<'_>,
        rows: &mut Array2<u32>,
        which: impl Iterator<Item = usize>,
        pad: &mut Vec<usize>,
    ) -> Result<(), ReplayError> {
        let layout = site.layout.ok_or(ReplayError::NoLayout { layer: site.layer.0 })?;
        let toks = lock(&self.tokens);
        for r in which {
            match layout.row(r) {
                Some(RowAddr::Token(seq, pos)) => {
                    let tok = toks
                        .get(&seq)
                        .and_then(|v| usize::try_from(pos).ok().and_then(|p| v.get(p)).copied())
                        .ok_or_else(|| hash_err(site.layer, seq, pos))?;
                    let ids = table.row(tok).ok_or_else(|| {
                        ReplayError::InvalidRoute(
                            HashTableError::TokenOutOfRange {
                                row: r,
                                token: tok,
                                vocab: table.vocab(),
                            }
                            .to_string(),
                        )
                    })?;
                    rows.row_mut(r).assign(&ndarray::ArrayView1::from(&ids[..]));
                }
                _ => pad.push(r),
            }
        }
        Ok(())
    }
}

fn hash_err(layer: LayerId, seq: SeqId, position: u64) -> ReplayError {
    ReplayError::InvalidRoute(
        HashTableError::NoToken {
            layer: layer.0,
            seq: seq.0,
            position,
        }
        .to_string(),
    )
}

impl<P: ReplayPolicy> ReplayPolicy for HashLayers<P> {
    fn plan(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Plan, ReplayError> {
        let plan = self.inner.plan(site, shape)?;
        let Some(table) = self.tables.get(&site.layer.0) else {
            return Ok(plan);
        };
        if table.top_k() != shape.top_k || table.num_experts() > shape.num_experts {
            return Err(ReplayError::Shape(format!(
                "hash layer {}: the table is [{}, {}] over E = {}, the router has E = {}, K = {}",
                site.layer,
                table.vocab(),
                table.top_k(),
                table.num_experts(),
                shape.num_experts,
                shape.top_k
            )));
        }
        let (mut ids, to_fill, mut router_rows) = match plan {
            Plan::Route => (
                Array2::<u32>::zeros((shape.rows, shape.top_k)),
                (0..shape.rows).collect::<Vec<_>>(),
                Vec::new(),
            ),
            Plan::Replay(ForcedIds { ids, router_rows }) => (ids, router_rows, Vec::new()),
        };
        self.table_rows(table, site, &mut ids, to_fill.into_iter(), &mut router_rows)?;
        // Sentinel slots of replayed rows: the table's ids, in order, skipping ids in the row.
        let mut rr = router_rows.iter().copied().peekable();
        let layout = site.layout.ok_or(ReplayError::NoLayout { layer: site.layer.0 })?;
        for r in 0..shape.rows {
            if rr.peek() == Some(&r) {
                rr.next();
                continue;
            }
            let mut row: Vec<u32> = ids.row(r).to_vec();
            if crate::replay_slots::has_router_slot(&row)
                && let Some(RowAddr::Token(seq, pos)) = layout.row(r)
            {
                let mut own = Array2::<u32>::zeros((shape.rows, shape.top_k));
                self.table_rows(table, site, &mut own, std::iter::once(r), &mut Vec::new())?;
                crate::replay_slots::fill_router_slots(&mut row, &own.row(r).to_vec());
                if crate::replay_slots::has_router_slot(&row) {
                    return Err(hash_err(site.layer, seq, pos));
                }
                ids.row_mut(r).assign(&ndarray::ArrayView1::from(&row[..]));
            }
        }
        router_rows.sort_unstable();
        Ok(Plan::Replay(ForcedIds { ids, router_rows }))
    }

    fn recorder(&self, site: &CallSite<'_>, shape: RouteShape) -> Result<Option<IdsSink>, ReplayError> {
        self.inner.recorder(site, shape)
    }

    /// Hash layers have no score-based top-K to judge against: no threshold there.
    fn threshold(&self, site: &CallSite<'_>) -> Option<ReplayThreshold> {
        if self.tables.contains_key(&site.layer.0) {
            None
        } else {
            self.inner.threshold(site)
        }
    }

    fn slots_resolved(&self, site: &CallSite<'_>, counts: &SlotCounts) {
        self.inner.slots_resolved(site, counts)
    }
}
