//! Reading `.mrt` files: memory-mapped, checksum-verified, recovering a truncated tail and
//! rebuilding a missing or damaged index by scanning.

mod chunk;
mod open;
mod read;

pub use open::{IndexState, OpenOptions, RecoveryReport, TailDamage, Verify};

use crate::trace::codec::RowCodec;
use crate::trace::format::{self, ChunkEntry, ChunkHead, IndexEntry, Version};
use crate::trace::model::Trace;
use crate::trace::{TraceError, TraceHeader};
use moe_router_core::layout::{LayerId, SeqId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

/// One chunk, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    /// Chunk index.
    pub index: u32,
    /// File offset of its frame.
    pub offset: u64,
    /// Frame bytes (header, stored payload, CRC).
    pub frame_bytes: u64,
    /// Uncompressed payload bytes.
    pub raw_bytes: u64,
    /// "none" or "zstd".
    pub codec: String,
    /// Blocks in the payload.
    pub blocks: u32,
}

#[derive(Debug)]
enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ChunkMeta {
    offset: u64,
    head: ChunkHead,
}

#[derive(Debug, Clone, Copy)]
struct BlockLoc {
    start: u64,
    rows: u32,
    chunk: u32,
    data_off: u32,
}

#[derive(Debug, Default)]
struct LayerCount {
    rows: u64,
    nonzero: bool,
}

#[derive(Debug, Default)]
struct Cache {
    map: HashMap<u32, Arc<Vec<u8>>>,
    order: VecDeque<u32>,
}

const CACHE_CHUNKS: usize = 32;

/// A `.mrt` trace file opened for reading (memory-mapped).
///
/// Opening checks the header checksum and version, uses the index when it is intact (else
/// rebuilds it by scanning), recovers every complete chunk before a truncated or torn tail, and
/// verifies chunk checksums and rows before any of their data is returned ([`Verify`]). A bit
/// flip is therefore an error or a reported damage ([`RecoveryReport`]), never data.
#[derive(Debug)]
pub struct TraceFile {
    backing: Backing,
    header: TraceHeader,
    version: Version,
    codec: RowCodec,
    chunks: Vec<ChunkMeta>,
    /// Index entries in chunk order, and for each chunk its range in `entries`.
    entries: Vec<IndexEntry>,
    entry_ranges: Vec<(usize, usize)>,
    lanes: HashMap<(SeqId, LayerId), Vec<BlockLoc>>,
    overlay: Trace,
    verified: Vec<OnceLock<Result<(), TraceError>>>,
    layer_counts: Mutex<Vec<LayerCount>>,
    cache: Mutex<Cache>,
    report: RecoveryReport,
    data_end: u64,
}

impl TraceFile {
    /// The header.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// What opening found and recovered.
    pub fn report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The file's format version (major, minor): 2.0 for files written by this version, 1.x
    /// for older files (still read, and kept at 1.x when appended to).
    pub fn format_version(&self) -> (u16, u16) {
        (self.version.major, self.version.minor)
    }

    /// Offset just past the last recovered chunk (where an appending writer continues).
    pub fn data_end(&self) -> u64 {
        self.data_end
    }

    /// The chunks, in file order.
    pub fn chunk_infos(&self) -> Vec<ChunkInfo> {
        self.chunks
            .iter()
            .map(|c| ChunkInfo {
                index: c.head.index,
                offset: c.offset,
                frame_bytes: c.head.frame_len(),
                raw_bytes: u64::from(c.head.raw_len),
                codec: if c.head.codec == format::CODEC_NONE {
                    "none"
                } else {
                    "zstd"
                }
                .into(),
                blocks: c.head.blocks,
            })
            .collect()
    }

    /// Chunk table and block entries (for an appending writer).
    pub(crate) fn index_tables(&self) -> (Vec<ChunkEntry>, Vec<IndexEntry>) {
        let cs = self
            .chunks
            .iter()
            .map(|c| ChunkEntry {
                offset: c.offset,
                frame_len: c.head.frame_len() as u32,
                raw_len: c.head.raw_len,
                blocks: c.head.blocks,
            })
            .collect();
        (cs, self.entries.clone())
    }
}
