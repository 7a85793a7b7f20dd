//! Chunk access shared by opening and reading: verifying a chunk (checksum, payload structure,
//! every row), decoding its payload, and the cache of decompressed payloads.

use super::{CACHE_CHUNKS, TraceFile};
use crate::trace::TraceError;
use crate::trace::format::{self, Block, FrameProbe};
use moe_router_core::layout::SeqId;
use std::sync::Arc;

impl TraceFile {
    /// Verifies chunk `i` (checksum, codec, payload structure, every row) and returns its blocks.
    /// Accumulates per-layer counts.
    pub(super) fn parse_chunk(&self, i: usize) -> Result<Vec<Block>, TraceError> {
        let c = self.chunks[i];
        let wrap = |e: TraceError| TraceError::InChunk {
            chunk: c.head.index,
            offset: c.offset,
            source: Box::new(e),
        };
        let b = self.backing.bytes();
        match format::probe_frame(b, c.offset as usize, self.version.major) {
            FrameProbe::Chunk(h) if h == c.head => {}
            other => {
                // Not the frame the index (or the scan) describes. Over the extent known for
                // it, a checksum mismatch means the bytes were corrupted (a flipped tag or
                // length included).
                let fl = c.head.frame_len() as usize;
                let o = c.offset as usize;
                if o + fl <= b.len() {
                    let (stored, computed) = (format::u32_at(b, o + fl - 4), format::crc(&b[o..o + fl - 4]));
                    if stored != computed {
                        return Err(TraceError::Checksum {
                            what: format!("chunk {i}"),
                            offset: c.offset,
                            stored,
                            computed,
                        });
                    }
                }
                return Err(match other {
                    FrameProbe::Chunk(_) => TraceError::Malformed {
                        what: format!("chunk {i}"),
                        offset: c.offset,
                        reason: "chunk header differs from the index".into(),
                    },
                    FrameProbe::Bad(reason) => TraceError::Malformed {
                        what: format!("chunk {i}"),
                        offset: c.offset,
                        reason,
                    },
                    _ => TraceError::Truncated {
                        what: format!("chunk {i}"),
                        offset: c.offset,
                        needed: c.head.frame_len(),
                        available: (b.len() as u64).saturating_sub(c.offset),
                    },
                });
            }
        }
        let raw = self.decode_payload(i)?;
        let rb = self.codec.row_bytes();
        let blocks = format::parse_blocks(&raw, c.head.blocks, rb, self.header.layers().len(), self.version.major)
            .map_err(|(at, reason)| TraceError::Malformed {
                what: format!("chunk {i} payload"),
                offset: c.offset + format::CHUNK_HEADER as u64,
                reason: format!("at payload byte {at}: {reason}"),
            })?;
        let mut counts: Vec<(u64, bool)> = vec![(0, false); self.header.layers().len()];
        for bl in &blocks {
            for j in 0..bl.layers {
                let li = (bl.layer_index + j) as usize;
                let layer = self.header.layers()[li];
                let a = bl.layer_data_off(j, rb);
                let data = &raw[a..a + bl.rows as usize * rb];
                let cnt = &mut counts[li];
                match self.codec.check_stored_rows(data) {
                    Ok((present, nonzero)) => {
                        cnt.0 += present;
                        cnt.1 |= nonzero;
                    }
                    Err((r, f)) => {
                        return Err(wrap(f.locate(
                            SeqId(bl.seq),
                            layer,
                            bl.start + r as u64,
                            self.header.num_experts(),
                        )));
                    }
                }
            }
        }
        let mut lc = self.layer_counts.lock().unwrap_or_else(|p| p.into_inner());
        for (l, (rows, nz)) in lc.iter_mut().zip(counts) {
            l.rows += rows;
            l.nonzero |= nz;
        }
        Ok(blocks)
    }

    /// The raw payload of chunk `i`, decompressing when needed (no verification).
    fn decode_payload(&self, i: usize) -> Result<std::borrow::Cow<'_, [u8]>, TraceError> {
        let c = self.chunks[i];
        let b = self.backing.bytes();
        let p0 = c.offset as usize + format::CHUNK_HEADER;
        let stored = &b[p0..p0 + c.head.stored_len as usize];
        match c.head.codec {
            format::CODEC_NONE => Ok(stored.into()),
            _ => {
                let raw =
                    zstd::bulk::decompress(stored, c.head.raw_len as usize).map_err(|e| TraceError::Malformed {
                        what: format!("chunk {i} payload"),
                        offset: p0 as u64,
                        reason: format!("zstd: {e}"),
                    })?;
                if raw.len() != c.head.raw_len as usize {
                    return Err(TraceError::Malformed {
                        what: format!("chunk {i} payload"),
                        offset: p0 as u64,
                        reason: format!("decompressed to {} bytes, header says {}", raw.len(), c.head.raw_len),
                    });
                }
                let mut raw = raw;
                if c.head.codec == format::CODEC_RANK_ZSTD {
                    let bad = |reason: String| TraceError::Malformed {
                        what: format!("chunk {i} payload"),
                        offset: p0 as u64,
                        reason,
                    };
                    if self.header.id_width() != crate::trace::IdWidth::U8 {
                        return Err(bad("row-rank codec on a trace with two-byte ids".into()));
                    }
                    let rb = self.codec.row_bytes();
                    let blocks =
                        format::parse_blocks(&raw, c.head.blocks, rb, self.header.layers().len(), self.version.major)
                            .map_err(|(at, r)| bad(format!("at payload byte {at}: {r}")))?;
                    // The transform restarts for the rows of each layer of each block.
                    for bl in blocks {
                        for j in 0..bl.layers {
                            let a = bl.layer_data_off(j, rb);
                            format::rank_decode(
                                &mut raw[a..a + bl.rows as usize * rb],
                                self.header.top_k(),
                                self.header.num_experts(),
                            )
                            .map_err(|r| {
                                bad(format!(
                                    "block of sequence {} at layer {}: {r}",
                                    bl.seq,
                                    self.header.layers()[(bl.layer_index + j) as usize].0
                                ))
                            })?;
                        }
                    }
                }
                Ok(raw.into())
            }
        }
    }

    /// Verifies chunk `i` once (lazy mode), checking its blocks against the index.
    fn ensure_verified(&self, i: usize) -> Result<(), TraceError> {
        self.verified[i]
            .get_or_init(|| {
                let blocks = self.parse_chunk(i)?;
                let (a, z) = self.entry_ranges[i];
                let key = |b: &format::Block| (b.data_off, b.seq, b.layer_index, b.layers, b.start, b.rows);
                let mut from_index: Vec<_> = self.entries[a..z].iter().map(|e| key(&e.block())).collect();
                let mut parsed: Vec<_> = blocks.iter().map(key).collect();
                from_index.sort_unstable();
                parsed.sort_unstable();
                if from_index != parsed {
                    return Err(TraceError::Malformed {
                        what: format!("chunk {i}"),
                        offset: self.chunks[i].offset,
                        reason: "index entries disagree with the chunk's blocks".into(),
                    });
                }
                Ok(())
            })
            .clone()
    }

    /// The verified raw payload of chunk `i` (mapped bytes, or a cached decompressed copy).
    pub(super) fn payload(&self, chunk: u32) -> Result<PayloadRef<'_>, TraceError> {
        let i = chunk as usize;
        self.ensure_verified(i)?;
        let c = self.chunks[i];
        if c.head.codec == format::CODEC_NONE {
            let p0 = c.offset as usize + format::CHUNK_HEADER;
            return Ok(PayloadRef::Mapped(
                &self.backing.bytes()[p0..p0 + c.head.raw_len as usize],
            ));
        }
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = cache.map.get(&chunk) {
                return Ok(PayloadRef::Cached(v.clone()));
            }
        }
        let raw = Arc::new(self.decode_payload(i)?.into_owned());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.map.insert(chunk, raw.clone()).is_none() {
            cache.order.push_back(chunk);
        }
        while cache.order.len() > CACHE_CHUNKS {
            if let Some(old) = cache.order.pop_front() {
                cache.map.remove(&old);
            }
        }
        Ok(PayloadRef::Cached(raw))
    }

    /// Verifies every chunk not yet verified (lazy mode); the first damage found is an error.
    pub fn verify_all(&self) -> Result<(), TraceError> {
        for i in 0..self.chunks.len() {
            self.ensure_verified(i)?;
        }
        Ok(())
    }
}

pub(super) enum PayloadRef<'a> {
    Mapped(&'a [u8]),
    Cached(Arc<Vec<u8>>),
}

impl std::ops::Deref for PayloadRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            PayloadRef::Mapped(s) => s,
            PayloadRef::Cached(v) => v,
        }
    }
}
