//! Token addressing: layer ids, sequence ids and batch layouts.
//!
//! A [`BatchLayout`] says, for every row of a batch, which (sequence, position) it holds, or that
//! it is padding. It expresses padding removal, sequence packing, micro-batching and
//! context-parallel splits, so a trace recorded per sequence replays into any batch shape.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A model layer id (the index of the transformer layer in the model, not of the MoE layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct LayerId(pub u32);

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What kind of model layer a layer id names. Layer ids are unique across kinds: an MTP layer or
/// a hash-routed layer has its own id (Hugging Face numbering: MTP blocks follow the decoder
/// stack, `num_hidden_layers + i`), never the id of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// A decoder layer whose MLP is routed by scores (top-K of the router's logits).
    #[default]
    Decoder,
    /// A multi-token-prediction block with a routed MLP (DeepSeek-V3's `num_nextn_predict_layers`).
    Mtp,
    /// A hash-routed layer: its ids come from a `[vocab, K]` table indexed by the token id
    /// (DeepSeek-V4's first layers); the weights still come from the live scores.
    Hash,
}

impl LayerKind {
    /// Every kind, in code order.
    pub const ALL: [LayerKind; 3] = [LayerKind::Decoder, LayerKind::Mtp, LayerKind::Hash];

    /// The one-byte code of the trace header's layer-kind record: 0 decoder, 1 MTP, 2 hash.
    pub fn code(self) -> u8 {
        match self {
            LayerKind::Decoder => 0,
            LayerKind::Mtp => 1,
            LayerKind::Hash => 2,
        }
    }
    /// Parses [`LayerKind::code`] (`None` for an unknown code).
    pub fn from_code(code: u8) -> Option<Self> {
        LayerKind::ALL.into_iter().find(|k| k.code() == code)
    }
    /// The name used in JSON and messages: `decoder`, `mtp`, `hash`.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Decoder => "decoder",
            LayerKind::Mtp => "mtp",
            LayerKind::Hash => "hash",
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A sequence id (a rollout sample, a conversation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One run of rows in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Segment {
    /// `len` consecutive positions `start..start+len` of sequence `seq`.
    Tokens {
        /// Sequence id.
        seq: SeqId,
        /// First position.
        start: u64,
        /// Number of rows.
        len: usize,
    },
    /// `len` rows of padding (not tokens; never recorded, never replayed).
    Padding {
        /// Number of rows.
        len: usize,
    },
}

impl Segment {
    /// Rows covered.
    pub fn len(&self) -> usize {
        match *self {
            Segment::Tokens { len, .. } | Segment::Padding { len } => len,
        }
    }
    /// True when the segment covers no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a batch row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowAddr {
    /// A token: sequence and position.
    Token(SeqId, u64),
    /// Padding.
    Padding,
}

/// The rows of a batch, in order, as segments.
///
/// A layout may also say, per sequence, at which position its recorded routes **start**
/// ([`BatchLayout::with_route_start`]): the routes of a turn that began after a cached prefix
/// (SGLang's `routed_experts_start_len`, vLLM's prefix-cached positions, a delta replay) cover
/// only positions `start..`. Rows of that sequence before it are *uncovered*: replay leaves them
/// to the router (they are neither replayed, nor missing routes, nor errors in strict mode) and
/// counts them apart.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BatchLayout {
    segments: Vec<Segment>,
    rows: usize,
    /// Per sequence (ascending by id, one entry each): the first position its routes cover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    route_starts: Vec<(SeqId, u64)>,
}

/// An invalid batch layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Two segments cover the same (sequence, position).
    #[error("segments {first} and {second} both cover sequence {seq} position {position}")]
    Overlap {
        /// First segment index.
        first: usize,
        /// Second segment index.
        second: usize,
        /// Sequence id.
        seq: u64,
        /// A position covered twice.
        position: u64,
    },
    /// A segment's positions overflow u64.
    #[error("segment {index}: positions overflow")]
    Overflow {
        /// Segment index.
        index: usize,
    },
}

impl BatchLayout {
    /// Builds a layout from segments, rejecting overlapping token ranges. Empty segments are
    /// dropped.
    pub fn new(segments: Vec<Segment>) -> Result<Self, LayoutError> {
        let segments: Vec<Segment> = segments.into_iter().filter(|s| !s.is_empty()).collect();
        let mut spans: Vec<(u64, u64, u64, usize)> = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            if let Segment::Tokens { seq, start, len } = *s {
                let end = start
                    .checked_add(len as u64)
                    .ok_or(LayoutError::Overflow { index: i })?;
                spans.push((seq.0, start, end, i));
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            let (s0, _, e0, i0) = w[0];
            let (s1, b1, _, i1) = w[1];
            if s0 == s1 && b1 < e0 {
                return Err(LayoutError::Overlap {
                    first: i0.min(i1),
                    second: i0.max(i1),
                    seq: s0,
                    position: b1,
                });
            }
        }
        let rows = segments.iter().map(Segment::len).sum();
        Ok(BatchLayout {
            segments,
            rows,
            route_starts: Vec::new(),
        })
    }

    /// Says that the recorded routes of `seq` start at position `start` (a turn after a cached
    /// prefix): rows of `seq` at positions below it are uncovered (see the type docs). Setting it
    /// again replaces the earlier value; `start = 0` removes it.
    pub fn with_route_start(mut self, seq: SeqId, start: u64) -> Self {
        match self.route_starts.binary_search_by_key(&seq, |&(s, _)| s) {
            Ok(i) if start == 0 => {
                self.route_starts.remove(i);
            }
            Ok(i) => self.route_starts[i].1 = start,
            Err(_) if start == 0 => {}
            Err(i) => self.route_starts.insert(i, (seq, start)),
        }
        self
    }

    /// [`BatchLayout::with_route_start`] for several sequences.
    pub fn with_route_starts(self, starts: &[(SeqId, u64)]) -> Self {
        starts
            .iter()
            .fold(self, |l, &(seq, start)| l.with_route_start(seq, start))
    }

    /// Whole sequences packed back to back, each `(seq, len, route_start)`: positions `0..len`,
    /// whose recorded routes cover positions `route_start..` only.
    pub fn packed_with_route_starts(seqs: &[(SeqId, usize, u64)]) -> Result<Self, LayoutError> {
        let l = BatchLayout::packed(&seqs.iter().map(|&(s, len, _)| (s, len)).collect::<Vec<_>>())?;
        Ok(l.with_route_starts(&seqs.iter().map(|&(s, _, p)| (s, p)).collect::<Vec<_>>()))
    }

    /// The first position the routes of `seq` cover (0 unless set).
    pub fn route_start(&self, seq: SeqId) -> u64 {
        self.route_starts
            .binary_search_by_key(&seq, |&(s, _)| s)
            .map_or(0, |i| self.route_starts[i].1)
    }

    /// Every route start set, ascending by sequence id.
    pub fn route_starts(&self) -> &[(SeqId, u64)] {
        &self.route_starts
    }

    /// True when `addr` is a token at or after its sequence's route start (padding is never
    /// covered).
    pub fn is_covered(&self, addr: RowAddr) -> bool {
        match addr {
            RowAddr::Token(seq, pos) => pos >= self.route_start(seq),
            RowAddr::Padding => false,
        }
    }

    /// One sequence `seq`, positions `0..len`.
    pub fn single(seq: SeqId, len: usize) -> Self {
        BatchLayout::new(vec![Segment::Tokens { seq, start: 0, len }]).unwrap_or_default()
    }

    /// Whole sequences packed back to back (padding removed): `(seq, len)` each from position 0.
    pub fn packed(seqs: &[(SeqId, usize)]) -> Result<Self, LayoutError> {
        BatchLayout::new(
            seqs.iter()
                .map(|&(seq, len)| Segment::Tokens { seq, start: 0, len })
                .collect(),
        )
    }

    /// A right-padded `[B, S]` batch flattened row-major: each sequence from position 0 followed
    /// by padding up to `max_len`.
    pub fn right_padded(seqs: &[(SeqId, usize)], max_len: usize) -> Result<Self, LayoutError> {
        let mut segs = Vec::new();
        for &(seq, len) in seqs {
            let len = len.min(max_len);
            segs.push(Segment::Tokens { seq, start: 0, len });
            segs.push(Segment::Padding { len: max_len - len });
        }
        BatchLayout::new(segs)
    }

    /// The rows one context-parallel rank holds under the zigzag split: each sequence is cut in
    /// `2·cp_size` equal chunks (its length must be divisible by `2·cp_size`; the last chunk takes
    /// the remainder otherwise) and rank `r` holds chunks `r` and `2·cp_size − 1 − r`.
    pub fn zigzag_rank(seqs: &[(SeqId, usize)], cp_size: usize, rank: usize) -> Result<Self, LayoutError> {
        let parts = 2 * cp_size.max(1);
        let mut segs = Vec::new();
        for &(seq, len) in seqs {
            let chunk = len / parts;
            let bounds = |c: usize| -> (u64, usize) {
                let start = c * chunk;
                let end = if c + 1 == parts { len } else { start + chunk };
                (start as u64, end - start)
            };
            for c in [rank, parts - 1 - rank] {
                let (start, l) = bounds(c);
                segs.push(Segment::Tokens { seq, start, len: l });
            }
        }
        BatchLayout::new(segs)
    }

    /// Splits the layout into consecutive micro-batches of at most `rows` rows each (segments are
    /// cut where needed). Each micro-batch keeps the route starts.
    pub fn micro_batches(&self, rows: usize) -> Vec<BatchLayout> {
        let rows = rows.max(1);
        let mut out = Vec::new();
        let mut cur: Vec<Segment> = Vec::new();
        let mut cur_rows = 0usize;
        for seg in &self.segments {
            let mut seg = *seg;
            while !seg.is_empty() {
                let room = rows - cur_rows;
                let take = seg.len().min(room);
                let (head, tail) = match seg {
                    Segment::Tokens { seq, start, len } => (
                        Segment::Tokens { seq, start, len: take },
                        Segment::Tokens {
                            seq,
                            start: start + take as u64,
                            len: len - take,
                        },
                    ),
                    Segment::Padding { len } => (Segment::Padding { len: take }, Segment::Padding { len: len - take }),
                };
                cur.push(head);
                cur_rows += take;
                seg = tail;
                if cur_rows == rows {
                    out.push(BatchLayout {
                        segments: std::mem::take(&mut cur),
                        rows: cur_rows,
                        route_starts: self.route_starts.clone(),
                    });
                    cur_rows = 0;
                }
            }
        }
        if cur_rows > 0 {
            out.push(BatchLayout {
                segments: cur,
                rows: cur_rows,
                route_starts: self.route_starts.clone(),
            });
        }
        out
    }

    /// Segments in row order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Total rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Iterates the address of every row in order.
    pub fn iter_rows(&self) -> impl Iterator<Item = RowAddr> + '_ {
        self.segments.iter().flat_map(|s| {
            let (seq, start, len, pad) = match *s {
                Segment::Tokens { seq, start, len } => (seq, start, len, false),
                Segment::Padding { len } => (SeqId(0), 0, len, true),
            };
            (0..len).map(move |i| {
                if pad {
                    RowAddr::Padding
                } else {
                    RowAddr::Token(seq, start + i as u64)
                }
            })
        })
    }

    /// The address of row `row`, or `None` past the end.
    pub fn row(&self, row: usize) -> Option<RowAddr> {
        let mut base = 0usize;
        for s in &self.segments {
            let l = s.len();
            if row < base + l {
                return Some(match *s {
                    Segment::Tokens { seq, start, .. } => RowAddr::Token(seq, start + (row - base) as u64),
                    Segment::Padding { .. } => RowAddr::Padding,
                });
            }
            base += l;
        }
        None
    }
}
