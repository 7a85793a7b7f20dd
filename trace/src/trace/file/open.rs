//! Opening a `.mrt` file: the header, the index (rebuilt by scanning when it is missing or
//! damaged), recovery of a truncated or torn tail, salvage of damaged chunks, and verification on
//! open.

use super::{Backing, BlockLoc, Cache, ChunkMeta, LayerCount, TraceFile};
use crate::trace::TraceError;
use crate::trace::codec::RowCodec;
use crate::trace::format::{self, ChunkHead, FrameProbe, IndexEntry};
use crate::trace::model::Trace;
use moe_router_core::layout::{LayerId, SeqId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// How much of the file is checked when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// Every chunk's checksum and rows are checked at open (one pass over the file): open fails
    /// or reports damage before any data is used.
    #[default]
    Eager,
    /// With an intact index, chunks are checked on first use (open touches only the header and
    /// the index). Damage is then reported by the read that touches it. Without an index the
    /// file is scanned, which checks everything anyway.
    Lazy,
}

/// Options of [`TraceFile::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OpenOptions {
    /// When to verify chunks.
    pub verify: Verify,
    /// Salvage mode: a damaged chunk in the middle of the file is skipped and reported
    /// ([`RecoveryReport::damaged`]) instead of failing the open. For inspection and recovery
    /// tools; replay should use the default (strict).
    pub salvage: bool,
}

/// The state of the file's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IndexState {
    /// The index and footer are intact and were used.
    Present,
    /// The file has no footer (not closed: a crash, a copy in progress); the index was rebuilt
    /// by scanning.
    Absent,
    /// The footer or index is damaged; it was ignored and rebuilt by scanning.
    Rebuilt {
        /// What was wrong.
        reason: String,
    },
}

/// Bytes lost at the end of a file (torn write, truncated copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailDamage {
    /// Offset of the first byte not recovered (end of the last complete chunk).
    pub offset: u64,
    /// Bytes from there to the end of the file.
    pub bytes: u64,
    /// What was found there.
    pub reason: String,
}

/// A damaged region skipped in salvage mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedRange {
    /// First byte.
    pub offset: u64,
    /// Length.
    pub bytes: u64,
    /// What was wrong.
    pub reason: String,
}

/// What opening a file found and recovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// File size.
    pub file_bytes: u64,
    /// Major format version of the file (1 or 2).
    pub major_version: u16,
    /// Minor format version of the file.
    pub minor_version: u16,
    /// Index state.
    pub index: IndexState,
    /// Complete, checksum-verified chunks recovered.
    pub chunks: u64,
    /// Bytes of the header and the recovered chunks.
    pub recovered_bytes: u64,
    /// The truncated or torn tail, if any.
    pub tail: Option<TailDamage>,
    /// Damaged regions skipped (salvage mode only).
    pub damaged: Vec<DamagedRange>,
}

impl RecoveryReport {
    /// True when the file was closed cleanly and nothing was lost or damaged.
    pub fn is_clean(&self) -> bool {
        self.index == IndexState::Present && self.tail.is_none() && self.damaged.is_empty()
    }
    /// True when bytes at the end of the file were not recovered.
    pub fn truncated(&self) -> bool {
        self.tail.is_some()
    }
}

/// Maps `f` read-only.
#[allow(unsafe_code)]
fn map_file(f: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and private to this `TraceFile`. Trace files are
    // append-only: writers (this crate's included) only ever add bytes past the end, which a
    // mapping of the old length never sees. Another process truncating the file while it is
    // mapped would fault on access (SIGBUS) rather than yield wrong data; every byte read is
    // checksum-verified before use.
    unsafe { memmap2::Mmap::map(f) }
}

impl TraceFile {
    /// Opens and memory-maps `path` with default options (eager verification, strict).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        Self::open_with(path, OpenOptions::default())
    }

    /// Opens and memory-maps `path`.
    pub fn open_with(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let f = File::open(path).map_err(|e| TraceError::io(format!("opening {}", path.display()), &e))?;
        let len = f
            .metadata()
            .map_err(|e| TraceError::io(format!("reading metadata of {}", path.display()), &e))?
            .len();
        if len == 0 {
            return Self::from_backing(Backing::Owned(Vec::new()), opts);
        }
        let m = map_file(&f).map_err(|e| TraceError::io(format!("mapping {}", path.display()), &e))?;
        Self::from_backing(Backing::Mmap(m), opts)
    }

    /// Reads a trace from bytes in memory (same checks as a file).
    pub fn from_bytes(bytes: Vec<u8>, opts: OpenOptions) -> Result<Self, TraceError> {
        Self::from_backing(Backing::Owned(bytes), opts)
    }

    fn from_backing(backing: Backing, opts: OpenOptions) -> Result<Self, TraceError> {
        let b = backing.bytes();
        let (header, version, body_start) = format::decode_header(b)?;
        let codec = RowCodec::new(&header);
        let file_bytes = b.len() as u64;
        let mut report = RecoveryReport {
            file_bytes,
            major_version: version.major,
            minor_version: version.minor,
            index: IndexState::Present,
            chunks: 0,
            recovered_bytes: body_start as u64,
            tail: None,
            damaged: Vec::new(),
        };
        let from_index = match Self::load_index(b, body_start, version.major, codec.row_bytes()) {
            Ok(Some(x)) => Some(x),
            Ok(None) => {
                report.index = IndexState::Absent;
                None
            }
            Err(reason) => {
                report.index = IndexState::Rebuilt { reason };
                None
            }
        };
        let (chunks, index_entries, data_end) = match from_index {
            Some((cs, es, end)) => (cs, Some(es), end),
            None => {
                let (cs, end) = Self::scan(b, body_start, version.major, opts.salvage, &mut report)?;
                (cs, None, end)
            }
        };
        report.chunks = chunks.len() as u64;
        report.recovered_bytes = body_start as u64 + chunks.iter().map(|c| c.head.frame_len()).sum::<u64>();
        let nchunks = chunks.len();
        let mut tf = TraceFile {
            backing,
            overlay: Trace::new(header.clone()),
            header,
            version,
            codec,
            chunks,
            entries: Vec::new(),
            entry_ranges: vec![(0, 0); nchunks],
            lanes: HashMap::new(),
            verified: (0..nchunks).map(|_| OnceLock::new()).collect(),
            layer_counts: Mutex::new(Vec::new()),
            cache: Mutex::new(Cache::default()),
            report,
            data_end,
        };
        *tf.layer_counts.lock().unwrap_or_else(|p| p.into_inner()) =
            (0..tf.header.layers().len()).map(|_| LayerCount::default()).collect();
        let lazy = opts.verify == Verify::Lazy && index_entries.is_some();
        match index_entries {
            Some(es) if lazy => tf.set_entries(es)?,
            _ => {
                // Eager: verify every chunk and build the entries from the payloads.
                let mut es = Vec::new();
                let mut keep = Vec::with_capacity(tf.chunks.len());
                let mut damaged_any = false;
                for i in 0..tf.chunks.len() {
                    match tf.parse_chunk(i) {
                        Ok(blocks) => {
                            keep.push(tf.chunks[i]);
                            let ci = (keep.len() - 1) as u32;
                            es.extend(blocks.iter().map(|bl| IndexEntry::of_block(bl, ci)));
                        }
                        Err(e) if opts.salvage => {
                            damaged_any = true;
                            let c = tf.chunks[i];
                            tf.report.damaged.push(DamagedRange {
                                offset: c.offset,
                                bytes: c.head.frame_len(),
                                reason: e.to_string(),
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
                if damaged_any {
                    tf.chunks = keep;
                    tf.report.chunks = tf.chunks.len() as u64;
                    tf.report.recovered_bytes =
                        body_start as u64 + tf.chunks.iter().map(|c| c.head.frame_len()).sum::<u64>();
                }
                // Every kept chunk was just verified (layer counts accumulate only for chunks
                // that verified completely).
                tf.verified = (0..tf.chunks.len()).map(|_| OnceLock::from(Ok(()))).collect();
                tf.entry_ranges = vec![(0, 0); tf.chunks.len()];
                tf.set_entries(es)?;
            }
        }
        Ok(tf)
    }

    /// Installs index entries: builds the lane map, checks bounds and materialises lanes whose
    /// blocks overlap.
    fn set_entries(&mut self, mut es: Vec<IndexEntry>) -> Result<(), TraceError> {
        let rb = self.codec.row_bytes() as u64;
        let nl = u64::from(self.header.layers().len() as u32);
        es.sort_by_key(|e| e.chunk);
        for (i, e) in es.iter().enumerate() {
            let bad = |reason: String| TraceError::Malformed {
                what: "index entry".into(),
                offset: 0,
                reason: format!("entry {i}: {reason}"),
            };
            let Some(c) = self.chunks.get(e.chunk as usize) else {
                return Err(bad(format!("chunk {} does not exist", e.chunk)));
            };
            if e.layers == 0 || u64::from(e.layer_index) + u64::from(e.layers) > nl || e.rows == 0 {
                return Err(bad(format!(
                    "layer index {} / {} layer(s) / rows {}",
                    e.layer_index, e.layers, e.rows
                )));
            }
            if u64::from(e.data_off) + u64::from(e.layers) * u64::from(e.rows) * rb > u64::from(c.head.raw_len) {
                return Err(bad("block runs past its chunk's payload".into()));
            }
            if e.start.checked_add(u64::from(e.rows)).is_none() {
                return Err(bad("positions overflow".into()));
            }
        }
        let mut ranges = vec![(0usize, 0usize); self.chunks.len()];
        let mut i = 0;
        while i < es.len() {
            let c = es[i].chunk as usize;
            let j = i + es[i..].iter().take_while(|e| e.chunk as usize == c).count();
            ranges[c] = (i, j);
            i = j;
        }
        let mut lanes: HashMap<(SeqId, LayerId), Vec<BlockLoc>> = HashMap::new();
        let rbu = self.codec.row_bytes();
        for e in &es {
            let b = e.block();
            for j in 0..e.layers {
                let layer = self.header.layers()[(e.layer_index + j) as usize];
                lanes.entry((SeqId(e.seq), layer)).or_default().push(BlockLoc {
                    start: e.start,
                    rows: e.rows,
                    chunk: e.chunk,
                    data_off: b.layer_data_off(j, rbu) as u32,
                });
            }
        }
        self.entries = es;
        self.entry_ranges = ranges;
        // Lanes whose blocks overlap (a later block filling missing rows, or duplicates written by
        // another producer) are materialised in file order with the strict append rule.
        let mut complex = Vec::new();
        for (key, blocks) in lanes.iter_mut() {
            // Blocks are in file order (chunk order, then payload order).
            let mut sorted = blocks.clone();
            sorted.sort_by_key(|b| b.start);
            let overlaps = sorted
                .windows(2)
                .any(|w| w[0].start + u64::from(w[0].rows) > w[1].start);
            if overlaps {
                complex.push((*key, blocks.clone()));
            } else {
                *blocks = sorted;
            }
        }
        let mut overlay = Trace::new(self.header.clone());
        for (key, blocks) in complex {
            lanes.remove(&key);
            for bl in blocks {
                let raw = self.payload(bl.chunk)?;
                let off = bl.data_off as usize;
                let len = bl.rows as usize * self.codec.row_bytes();
                let c = self.chunks[bl.chunk as usize];
                overlay
                    .insert(key.0, key.1, bl.start, &raw[off..off + len], true)
                    .map_err(|e| TraceError::InChunk {
                        chunk: c.head.index,
                        offset: c.offset,
                        source: Box::new(e),
                    })?;
            }
        }
        self.overlay = overlay;
        self.lanes = lanes;
        Ok(())
    }

    /// Reads the index of a file of format `major` through the footer. `Ok(None)`: no footer;
    /// `Err`: footer or index damaged.
    #[allow(clippy::type_complexity)]
    fn load_index(
        b: &[u8],
        body_start: usize,
        major: u16,
        row_bytes: usize,
    ) -> Result<Option<(Vec<ChunkMeta>, Vec<IndexEntry>, u64)>, String> {
        let Some((ioff, ilen)) = format::read_footer(b, body_start)? else {
            return Ok(None);
        };
        let flen = b.len() as u64;
        if ioff < body_start as u64 || ioff.checked_add(ilen) != Some(flen - format::FOOTER_LEN as u64) {
            return Err(format!("footer points to an index at {ioff}+{ilen} outside the file"));
        }
        match format::probe_frame(&b[..(flen - format::FOOTER_LEN as u64) as usize], ioff as usize, major) {
            FrameProbe::Index(len) if len == ilen => {}
            FrameProbe::Index(..) => return Err("index length disagrees with the footer".into()),
            FrameProbe::Bad(r) => return Err(format!("index at offset {ioff}: {r}")),
            _ => return Err(format!("no index frame at offset {ioff}")),
        };
        let frame = &b[ioff as usize..(ioff + ilen) as usize];
        let (cs, es) =
            format::decode_index(frame, major, row_bytes).map_err(|r| format!("index at offset {ioff}: {r}"))?;
        let mut metas = Vec::with_capacity(cs.len());
        let mut expect = body_start as u64;
        for (i, c) in cs.iter().enumerate() {
            if c.offset != expect {
                return Err(format!(
                    "index chunk {i} at offset {} but the previous chunk ends at {expect}",
                    c.offset
                ));
            }
            // Parse the chunk header (not yet verified) to know its layout.
            let o = c.offset as usize;
            let stored_len = c
                .frame_len
                .checked_sub((format::CHUNK_HEADER + 4) as u32)
                .ok_or_else(|| format!("index chunk {i}: frame length {} is too short", c.frame_len))?;
            let framed = (o + format::CHUNK_HEADER <= b.len() && b[o..o + 4] == format::CHUNK_TAG).then(|| ChunkHead {
                index: format::u32_at(b, o + 4),
                codec: b[o + 8],
                blocks: format::u32_at(b, o + 12),
                raw_len: format::u32_at(b, o + 16),
                stored_len: format::u32_at(b, o + 20),
            });
            let v2 = major >= format::VERSION_MAJOR;
            let head = match framed {
                Some(h)
                    if h.frame_len() == u64::from(c.frame_len)
                        && h.raw_len == c.raw_len
                        && h.index == i as u32
                        && (!v2 || h.blocks == c.blocks) =>
                {
                    h
                }
                // The index is intact (its checksum matched) but the frame it points to is not
                // what it describes: the frame is damaged. The index's description is kept, and
                // verifying the chunk reports the damage (its checksum fails over the extent the
                // index gives), as for damage inside the payload.
                _ => ChunkHead {
                    index: i as u32,
                    codec: framed.map_or(format::CODEC_NONE, |h| h.codec),
                    blocks: if v2 { c.blocks } else { framed.map_or(0, |h| h.blocks) },
                    raw_len: c.raw_len,
                    stored_len,
                },
            };
            expect += head.frame_len();
            metas.push(ChunkMeta { offset: c.offset, head });
        }
        if expect != ioff {
            return Err(format!("chunks end at {expect} but the index starts at {ioff}"));
        }
        Ok(Some((metas, es, ioff)))
    }

    /// Scans frames from `body_start`; returns verified chunks and the end of the last one.
    fn scan(
        b: &[u8],
        body_start: usize,
        major: u16,
        salvage: bool,
        report: &mut RecoveryReport,
    ) -> Result<(Vec<ChunkMeta>, u64), TraceError> {
        let mut chunks = Vec::new();
        let mut off = body_start;
        let mut end = body_start as u64;
        let mut next_index = 0u64;
        while off < b.len() {
            match format::probe_frame(b, off, major) {
                FrameProbe::Chunk(head) => {
                    // Chunk indices count up by one; in salvage mode a gap left by skipped damage
                    // is allowed.
                    let expected = next_index;
                    let ok = if salvage && !report.damaged.is_empty() {
                        u64::from(head.index) >= expected
                    } else {
                        u64::from(head.index) == expected
                    };
                    if !ok {
                        let err = TraceError::Malformed {
                            what: "chunk".into(),
                            offset: off as u64,
                            reason: format!("chunk index {} where {expected} was expected", head.index),
                        };
                        if !salvage {
                            return Err(err);
                        }
                        report.damaged.push(DamagedRange {
                            offset: off as u64,
                            bytes: head.frame_len(),
                            reason: err.to_string(),
                        });
                        off += head.frame_len() as usize;
                        continue;
                    }
                    chunks.push(ChunkMeta {
                        offset: off as u64,
                        head,
                    });
                    next_index = u64::from(head.index) + 1;
                    off += head.frame_len() as usize;
                    end = off as u64;
                }
                FrameProbe::Index(len) => {
                    // A complete index (its footer is missing or damaged): nothing after it but
                    // the footer.
                    let after = off + len as usize;
                    let rest = b.len() - after;
                    if rest != format::FOOTER_LEN || b[b.len() - 4..] != format::FOOTER_TAG {
                        report.tail = Some(TailDamage {
                            offset: after as u64,
                            bytes: rest as u64,
                            reason: "incomplete or damaged footer after the index".into(),
                        });
                    }
                    return Ok((chunks, end));
                }
                FrameProbe::Short => {
                    report.tail = Some(TailDamage {
                        offset: off as u64,
                        bytes: (b.len() - off) as u64,
                        reason: "incomplete frame at the end of the file (truncated or torn write)".into(),
                    });
                    return Ok((chunks, end));
                }
                FrameProbe::Bad(reason) => {
                    // Damage in the middle (a later intact chunk exists) or a torn tail.
                    match Self::resync(b, off + 1, major) {
                        Some(next) => {
                            if !salvage {
                                return Err(TraceError::Malformed {
                                    what: "chunk frame".into(),
                                    offset: off as u64,
                                    reason: format!("{reason} (damaged chunk in the middle of the file)"),
                                });
                            }
                            report.damaged.push(DamagedRange {
                                offset: off as u64,
                                bytes: (next - off) as u64,
                                reason,
                            });
                            off = next;
                        }
                        None => {
                            report.tail = Some(TailDamage {
                                offset: off as u64,
                                bytes: (b.len() - off) as u64,
                                reason: format!("{reason} (torn or damaged tail)"),
                            });
                            return Ok((chunks, end));
                        }
                    }
                }
            }
        }
        Ok((chunks, end))
    }

    /// Offset of the next intact chunk or index frame at or after `from` (format `major`).
    fn resync(b: &[u8], from: usize, major: u16) -> Option<usize> {
        let mut i = from;
        while i + 4 <= b.len() {
            let t = &b[i..i + 4];
            if (t == format::CHUNK_TAG || t == format::INDEX_TAG)
                && matches!(
                    format::probe_frame(b, i, major),
                    FrameProbe::Chunk(_) | FrameProbe::Index(..)
                )
            {
                return Some(i);
            }
            i += 1;
        }
        None
    }
}
