//! Byte layout of `.mrt` files (documented in `docs/trace-format.md`): header, chunk frames,
//! blocks, index frame and footer. All integers little-endian.

use super::kernels;
use super::{IdWidth, RowConvention, TraceError, TraceHeader};
use moe_router_core::layout::LayerId;

/// File magic: `\x89MRT\r\n\x1a\n` (the PNG trick: detects 7-bit and newline mangling).
pub(crate) const MAGIC: [u8; 8] = [0x89, b'M', b'R', b'T', b'\r', b'\n', 0x1A, b'\n'];
/// Major version this code writes and reads.
pub(crate) const VERSION_MAJOR: u16 = 1;
/// Minor version this code writes.
pub(crate) const VERSION_MINOR: u16 = 0;
/// Fixed part of the file header before the body.
pub(crate) const HEADER_PREFIX: usize = 16;
/// Largest header body accepted.
pub(crate) const MAX_HEADER_BODY: u32 = 1 << 20;
/// Fixed part of the header body (before the layer ids).
pub(crate) const HEADER_BODY_FIXED: usize = 36;

/// Chunk frame tag.
pub(crate) const CHUNK_TAG: [u8; 4] = *b"MRTC";
/// Chunk frame header bytes (before the payload).
pub(crate) const CHUNK_HEADER: usize = 24;
/// Index frame tag.
pub(crate) const INDEX_TAG: [u8; 4] = *b"MRTI";
/// Index frame header bytes.
pub(crate) const INDEX_HEADER: usize = 24;
/// Bytes per chunk-table entry in the index.
pub(crate) const INDEX_CHUNK_ENTRY: usize = 16;
/// Bytes per block entry in the index.
pub(crate) const INDEX_BLOCK_ENTRY: usize = 32;
/// Footer tag (the file's last 4 bytes when closed cleanly).
pub(crate) const FOOTER_TAG: [u8; 4] = *b"MRTE";
/// Footer bytes.
pub(crate) const FOOTER_LEN: usize = 24;
/// Largest chunk payload (raw or stored) accepted by readers.
pub(crate) const MAX_CHUNK_PAYLOAD: u32 = 1 << 30;

/// Chunk codec: stored as is.
pub(crate) const CODEC_NONE: u8 = 0;
/// Chunk codec: one zstd frame.
pub(crate) const CODEC_ZSTD: u8 = 1;
/// Chunk codec: row-rank transform of every block's ids (u8 ids only), then one zstd frame.
pub(crate) const CODEC_RANK_ZSTD: u8 = 2;

/// Row-rank transform of one block's u8 rows (`k` ids per row, E experts), in place.
///
/// A list starts as `0, 1, …, E−1`. Each id of a row is replaced by its index in the list after
/// removing the ids of the same row already coded; then the list becomes that row's ids (slot
/// order) followed by the other ids in their previous order. Rows that repeat experts of the
/// previous row (consecutive tokens of a real router) become small numbers that zstd's entropy
/// stage codes in a few bits. Missing rows (all `0xFF`) pass through and leave the list alone.
///
/// Implementation: only the position of every expert in the list is kept (`pos`). The rank of
/// slot j is `pos[id_j]` minus the earlier slots of the row that sit before it; after the row,
/// every other expert moves back by the number of the row's experts that were ahead of it (one
/// vectorised compare-and-count pass over E bytes per slot) and the row's experts take positions
/// `0..K`: O(K·E/vector width + K²) per row instead of moving list entries one by one (see
/// `kernels::rank_encode_rows`). Rows must be valid (distinct ids `< E`) or missing; other bytes
/// give meaningless ranks but never panic.
pub(crate) fn rank_encode(data: &mut [u8], k: usize, e: usize) {
    kernels::rank_encode_rows(data, k, e);
}

/// Inverse of [`rank_encode`], in place. Errors when a rank is outside the list.
///
/// Implementation: the list itself is kept (`list[position] = id`). The rank of slot j selects
/// the rank-th entry not yet taken by the row (a walk over the row's taken positions, sorted);
/// after the row, the entries up to the last taken position close the gaps in one backward pass
/// and the row's ids are written at the front.
pub(crate) fn rank_decode(data: &mut [u8], k: usize, e: usize) -> Result<(), String> {
    kernels::rank_decode_rows(data, k, e).map_err(|(ri, r, len)| format!("row {ri}: rank {r} outside a list of {len}"))
}

pub(crate) fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

pub(crate) fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Appends an unsigned LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint at `*pos` (at most 10 bytes, no overflow).
pub(crate) fn get_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        let bits = u64::from(byte & 0x7F);
        if i == 9 && bits > 1 {
            return None;
        }
        v |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encodes the whole file header (prefix, body, CRC).
pub(crate) fn encode_header(h: &TraceHeader) -> Vec<u8> {
    let mut body = Vec::with_capacity(HEADER_BODY_FIXED + 4 * h.layers().len() + 4 + h.producer().len());
    body.extend_from_slice(&(h.num_experts() as u32).to_le_bytes());
    body.extend_from_slice(&(h.top_k() as u16).to_le_bytes());
    body.push(h.id_width().code());
    body.push(h.row_convention().code());
    body.extend_from_slice(&h.fingerprint().to_le_bytes());
    body.push(u8::from(h.weight_version().is_some()));
    body.extend_from_slice(&[0u8; 7]);
    body.extend_from_slice(&h.weight_version().unwrap_or(0).to_le_bytes());
    body.extend_from_slice(&(h.layers().len() as u32).to_le_bytes());
    for l in h.layers() {
        body.extend_from_slice(&l.0.to_le_bytes());
    }
    body.extend_from_slice(&(h.producer().len() as u32).to_le_bytes());
    body.extend_from_slice(h.producer().as_bytes());
    let mut out = Vec::with_capacity(HEADER_PREFIX + body.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    out.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let c = crc(&out);
    out.extend_from_slice(&c.to_le_bytes());
    out
}

/// Decodes the file header; returns it, the minor version and the header's total length.
pub(crate) fn decode_header(b: &[u8]) -> Result<(TraceHeader, u16, usize), TraceError> {
    let avail = b.len() as u64;
    let trunc = |needed: u64| TraceError::Truncated {
        what: "file header".into(),
        offset: 0,
        needed,
        available: avail,
    };
    if b.len() < MAGIC.len() || b[..MAGIC.len()] != MAGIC {
        if b.len() < MAGIC.len() && MAGIC.starts_with(b) {
            return Err(trunc(HEADER_PREFIX as u64));
        }
        return Err(TraceError::BadMagic {
            found: b[..b.len().min(8)].to_vec(),
        });
    }
    if b.len() < HEADER_PREFIX {
        return Err(trunc(HEADER_PREFIX as u64));
    }
    let major = u16_at(b, 8);
    let minor = u16_at(b, 10);
    let body_len = u32_at(b, 12);
    if body_len > MAX_HEADER_BODY {
        // Cannot trust anything: check whether the CRC could even be located.
        return Err(TraceError::Malformed {
            what: "file header".into(),
            offset: 12,
            reason: format!("header body length {body_len} exceeds {MAX_HEADER_BODY} (corrupted?)"),
        });
    }
    let total = HEADER_PREFIX + body_len as usize + 4;
    if b.len() < total {
        return Err(trunc(total as u64));
    }
    let stored = u32_at(b, total - 4);
    let computed = crc(&b[..total - 4]);
    if stored != computed {
        return Err(TraceError::Checksum {
            what: "header".into(),
            offset: 0,
            stored,
            computed,
        });
    }
    if major != VERSION_MAJOR {
        return Err(TraceError::UnsupportedVersion {
            major,
            minor,
            supported: VERSION_MAJOR,
        });
    }
    let body = &b[HEADER_PREFIX..total - 4];
    let bad = |off: usize, reason: String| TraceError::Malformed {
        what: "file header".into(),
        offset: (HEADER_PREFIX + off) as u64,
        reason,
    };
    if body.len() < HEADER_BODY_FIXED {
        return Err(bad(
            0,
            format!("body of {} bytes is shorter than {HEADER_BODY_FIXED}", body.len()),
        ));
    }
    let e = u32_at(body, 0);
    let k = u16_at(body, 4);
    let width = IdWidth::from_code(body[6]).ok_or_else(|| bad(6, format!("id width code {}", body[6])))?;
    let conv = RowConvention::from_code(body[7]).ok_or_else(|| bad(7, format!("row convention code {}", body[7])))?;
    let fp = u64_at(body, 8);
    let flags = body[16];
    if flags & !1 != 0 {
        return Err(bad(16, format!("unknown flags {flags:#04x}")));
    }
    let wv = (flags & 1 != 0).then(|| u64_at(body, 24));
    let nl = u32_at(body, 32) as usize;
    let layers_end = HEADER_BODY_FIXED
        .checked_add(
            nl.checked_mul(4)
                .ok_or_else(|| bad(32, "layer count overflows".into()))?,
        )
        .ok_or_else(|| bad(32, "layer count overflows".into()))?;
    if body.len() < layers_end + 4 {
        return Err(bad(32, format!("{nl} layer ids do not fit in the header body")));
    }
    let layers: Vec<LayerId> = (0..nl)
        .map(|i| LayerId(u32_at(body, HEADER_BODY_FIXED + 4 * i)))
        .collect();
    let pl = u32_at(body, layers_end) as usize;
    let prod_end = layers_end + 4 + pl;
    if body.len() < prod_end {
        return Err(bad(
            layers_end,
            format!("producer of {pl} bytes does not fit in the header body"),
        ));
    }
    let producer = std::str::from_utf8(&body[layers_end + 4..prod_end])
        .map_err(|_| bad(layers_end + 4, "producer is not UTF-8".into()))?
        .to_string();
    let h =
        TraceHeader::from_parts(e, k, width, layers, conv, fp, wv, producer).map_err(|err| bad(0, err.to_string()))?;
    Ok((h, minor, total))
}

/// One block of a decoded chunk payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub seq: u64,
    pub layer_index: u32,
    pub start: u64,
    pub rows: u32,
    /// Offset of the ids within the raw payload.
    pub data_off: u32,
}

/// Appends one block to a raw payload.
pub(crate) fn put_block(out: &mut Vec<u8>, seq: u64, layer_index: u32, start: u64, data: &[u8], rows: usize) {
    put_varint(out, seq);
    put_varint(out, u64::from(layer_index));
    put_varint(out, start);
    put_varint(out, rows as u64);
    out.extend_from_slice(data);
}

/// Parses the blocks of a raw payload (`row_bytes` per row, `layers` in the map). Errors carry
/// the offset within the payload.
pub(crate) fn parse_blocks(
    raw: &[u8],
    expected: u32,
    row_bytes: usize,
    layers: usize,
) -> Result<Vec<Block>, (usize, String)> {
    let mut pos = 0usize;
    // Every block takes at least one payload byte: never reserve by a count the input claims.
    let mut out = Vec::with_capacity((expected as usize).min(raw.len()));
    while pos < raw.len() {
        let at = pos;
        let seq = get_varint(raw, &mut pos).ok_or((at, "bad sequence varint".to_string()))?;
        let li = get_varint(raw, &mut pos).ok_or((at, "bad layer varint".to_string()))?;
        let start = get_varint(raw, &mut pos).ok_or((at, "bad start varint".to_string()))?;
        let rows = get_varint(raw, &mut pos).ok_or((at, "bad row-count varint".to_string()))?;
        if li >= layers as u64 {
            return Err((at, format!("layer index {li} but the layer map has {layers} layers")));
        }
        if rows == 0 || rows > u64::from(u32::MAX) {
            return Err((at, format!("block row count {rows}")));
        }
        if start.checked_add(rows).is_none() {
            return Err((at, format!("positions {start}+{rows} overflow")));
        }
        let len = (rows as usize)
            .checked_mul(row_bytes)
            .filter(|&l| l <= raw.len() - pos)
            .ok_or((at, format!("block of {rows} rows runs past the payload end")))?;
        out.push(Block {
            seq,
            layer_index: li as u32,
            start,
            rows: rows as u32,
            data_off: pos as u32,
        });
        pos += len;
    }
    if out.len() != expected as usize {
        return Err((
            raw.len(),
            format!("payload holds {} blocks, chunk header says {expected}", out.len()),
        ));
    }
    Ok(out)
}

/// The 24-byte chunk frame header.
pub(crate) fn chunk_header(index: u32, codec: u8, blocks: u32, raw_len: u32, stored_len: u32) -> [u8; CHUNK_HEADER] {
    let mut h = [0u8; CHUNK_HEADER];
    h[..4].copy_from_slice(&CHUNK_TAG);
    h[4..8].copy_from_slice(&index.to_le_bytes());
    h[8] = codec;
    h[12..16].copy_from_slice(&blocks.to_le_bytes());
    h[16..20].copy_from_slice(&raw_len.to_le_bytes());
    h[20..24].copy_from_slice(&stored_len.to_le_bytes());
    h
}

/// Encodes a chunk frame (header, stored payload, CRC).
#[allow(dead_code)]
pub(crate) fn encode_chunk(index: u32, codec: u8, blocks: u32, raw_len: u32, stored: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER + stored.len() + 4);
    out.extend_from_slice(&CHUNK_TAG);
    out.extend_from_slice(&index.to_le_bytes());
    out.push(codec);
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(&blocks.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    out.extend_from_slice(stored);
    let c = crc(&out);
    out.extend_from_slice(&c.to_le_bytes());
    out
}

/// A parsed chunk frame header (not yet checksum-verified unless said so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHead {
    pub index: u32,
    pub codec: u8,
    pub blocks: u32,
    pub raw_len: u32,
    pub stored_len: u32,
}

impl ChunkHead {
    pub(crate) fn frame_len(&self) -> u64 {
        (CHUNK_HEADER + 4) as u64 + u64::from(self.stored_len)
    }
}

/// What is found at an offset where a chunk frame may start.
pub(crate) enum FrameProbe {
    /// A complete chunk frame whose checksum matches.
    Chunk(ChunkHead),
    /// A complete index frame whose checksum matches: (chunks, entries, frame length).
    Index(u64, u64, u64),
    /// Fewer bytes than the frame needs (or than a frame header): a torn tail.
    Short,
    /// Anything else (bad tag, bad fields, checksum mismatch), with a reason.
    Bad(String),
}

/// Examines the bytes at `off`.
pub(crate) fn probe_frame(b: &[u8], off: usize) -> FrameProbe {
    let rest = &b[off.min(b.len())..];
    if rest.len() < 4 {
        return if FOOTER_TAG.starts_with(rest) || CHUNK_TAG.starts_with(rest) || INDEX_TAG.starts_with(rest) {
            FrameProbe::Short
        } else {
            FrameProbe::Bad("unknown frame tag".into())
        };
    }
    let tag: [u8; 4] = [rest[0], rest[1], rest[2], rest[3]];
    if tag == CHUNK_TAG {
        if rest.len() < CHUNK_HEADER {
            return FrameProbe::Short;
        }
        let head = ChunkHead {
            index: u32_at(rest, 4),
            codec: rest[8],
            blocks: u32_at(rest, 12),
            raw_len: u32_at(rest, 16),
            stored_len: u32_at(rest, 20),
        };
        if head.stored_len > MAX_CHUNK_PAYLOAD || head.raw_len > MAX_CHUNK_PAYLOAD {
            return FrameProbe::Bad(format!(
                "chunk payload lengths {} / {} exceed the limit",
                head.stored_len, head.raw_len
            ));
        }
        let fl = head.frame_len() as usize;
        if rest.len() < fl {
            return FrameProbe::Short;
        }
        let stored = u32_at(rest, fl - 4);
        let computed = crc(&rest[..fl - 4]);
        if stored != computed {
            return FrameProbe::Bad(format!(
                "chunk checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ));
        }
        if rest[9..12] != [0, 0, 0] || head.codec > CODEC_RANK_ZSTD {
            return FrameProbe::Bad(format!("unknown chunk codec {} or reserved bytes set", head.codec));
        }
        if head.codec == CODEC_NONE && head.raw_len != head.stored_len {
            return FrameProbe::Bad("uncompressed chunk with raw length != stored length".into());
        }
        return FrameProbe::Chunk(head);
    }
    if tag == INDEX_TAG {
        if rest.len() < INDEX_HEADER {
            return FrameProbe::Short;
        }
        let chunks = u64_at(rest, 8);
        let entries = u64_at(rest, 16);
        let len = chunks
            .checked_mul(INDEX_CHUNK_ENTRY as u64)
            .and_then(|a| {
                entries
                    .checked_mul(INDEX_BLOCK_ENTRY as u64)
                    .and_then(|b| a.checked_add(b))
            })
            .and_then(|x| x.checked_add((INDEX_HEADER + 4) as u64));
        let Some(len) = len else {
            return FrameProbe::Bad("index counts overflow".into());
        };
        if (rest.len() as u64) < len {
            return FrameProbe::Short;
        }
        let l = len as usize;
        let stored = u32_at(rest, l - 4);
        let computed = crc(&rest[..l - 4]);
        if stored != computed {
            return FrameProbe::Bad(format!(
                "index checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ));
        }
        return FrameProbe::Index(chunks, entries, len);
    }
    if tag == FOOTER_TAG {
        return FrameProbe::Bad("footer tag where a frame was expected".into());
    }
    FrameProbe::Bad(format!("unknown frame tag {tag:02x?}"))
}

/// A chunk-table entry of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkEntry {
    pub offset: u64,
    pub frame_len: u32,
    pub raw_len: u32,
}

/// A block entry of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub seq: u64,
    pub start: u64,
    pub layer_index: u32,
    pub rows: u32,
    pub chunk: u32,
    pub data_off: u32,
}

/// Encodes the index frame and the footer (`index_offset` = where the index frame starts).
pub(crate) fn encode_index(chunks: &[ChunkEntry], entries: &[IndexEntry], index_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        INDEX_HEADER + chunks.len() * INDEX_CHUNK_ENTRY + entries.len() * INDEX_BLOCK_ENTRY + 4 + FOOTER_LEN,
    );
    out.extend_from_slice(&INDEX_TAG);
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for c in chunks {
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.frame_len.to_le_bytes());
        out.extend_from_slice(&c.raw_len.to_le_bytes());
    }
    for e in entries {
        out.extend_from_slice(&e.seq.to_le_bytes());
        out.extend_from_slice(&e.start.to_le_bytes());
        out.extend_from_slice(&e.layer_index.to_le_bytes());
        out.extend_from_slice(&e.rows.to_le_bytes());
        out.extend_from_slice(&e.chunk.to_le_bytes());
        out.extend_from_slice(&e.data_off.to_le_bytes());
    }
    let c = crc(&out);
    out.extend_from_slice(&c.to_le_bytes());
    let index_len = out.len() as u64;
    let f0 = out.len();
    out.extend_from_slice(&index_offset.to_le_bytes());
    out.extend_from_slice(&index_len.to_le_bytes());
    let c = crc(&out[f0..]);
    out.extend_from_slice(&c.to_le_bytes());
    out.extend_from_slice(&FOOTER_TAG);
    out
}

/// Decodes a verified index frame.
pub(crate) fn decode_index(frame: &[u8], chunks: u64, entries: u64) -> (Vec<ChunkEntry>, Vec<IndexEntry>) {
    let mut p = INDEX_HEADER;
    let mut cs = Vec::with_capacity(chunks as usize);
    for _ in 0..chunks {
        cs.push(ChunkEntry {
            offset: u64_at(frame, p),
            frame_len: u32_at(frame, p + 8),
            raw_len: u32_at(frame, p + 12),
        });
        p += INDEX_CHUNK_ENTRY;
    }
    let mut es = Vec::with_capacity(entries as usize);
    for _ in 0..entries {
        es.push(IndexEntry {
            seq: u64_at(frame, p),
            start: u64_at(frame, p + 8),
            layer_index: u32_at(frame, p + 16),
            rows: u32_at(frame, p + 20),
            chunk: u32_at(frame, p + 24),
            data_off: u32_at(frame, p + 28),
        });
        p += INDEX_BLOCK_ENTRY;
    }
    (cs, es)
}

/// Reads the footer at the end of `b`: `Ok(Some((index_offset, index_len)))` when present and
/// intact, `Ok(None)` when the file does not end with the footer tag, `Err(reason)` when it does
/// but the footer's checksum fails.
pub(crate) fn read_footer(b: &[u8], body_start: usize) -> Result<Option<(u64, u64)>, String> {
    if b.len() < body_start + FOOTER_LEN || b[b.len() - 4..] != FOOTER_TAG {
        return Ok(None);
    }
    let f = &b[b.len() - FOOTER_LEN..];
    let stored = u32_at(f, 16);
    let computed = crc(&f[..16]);
    if stored != computed {
        return Err(format!(
            "footer checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    Ok(Some((u64_at(f, 0), u64_at(f, 8))))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The original list-based implementation (the documented algorithm, step by step).
    /// Row-rank transform of one block's u8 rows (`k` ids per row, E experts), in place.
    ///
    /// A list starts as `0, 1, …, E−1`. Each id of a row is replaced by its index in the list after
    /// removing the ids of the same row already coded; then the list becomes that row's ids (slot
    /// order) followed by the other ids in their previous order. Rows that repeat experts of the
    /// previous row (consecutive tokens of a real router) become small numbers that zstd's entropy
    /// stage codes in a few bits. Missing rows (all `0xFF`) pass through and leave the list alone.
    fn rank_encode_reference(data: &mut [u8], k: usize, e: usize) {
        let mut list: Vec<u8> = (0..e).map(|x| x as u8).collect();
        let mut work: Vec<u8> = Vec::with_capacity(e);
        for row in data.chunks_exact_mut(k) {
            if row.iter().all(|&b| b == 0xFF) {
                continue;
            }
            let ids: Vec<u8> = row.to_vec();
            work.clear();
            work.extend_from_slice(&list);
            for slot in row.iter_mut() {
                let id = *slot;
                let r = work.iter().position(|&x| x == id).unwrap_or(0);
                work.remove(r);
                *slot = r as u8;
            }
            let rest: Vec<u8> = list.iter().copied().filter(|x| !ids.contains(x)).collect();
            list.clear();
            list.extend_from_slice(&ids);
            list.extend_from_slice(&rest);
        }
    }

    /// Inverse of [`rank_encode_reference`], in place. Errors when a rank is outside the list.
    fn rank_decode_reference(data: &mut [u8], k: usize, e: usize) -> Result<(), String> {
        let mut list: Vec<u8> = (0..e).map(|x| x as u8).collect();
        let mut work: Vec<u8> = Vec::with_capacity(e);
        for (ri, row) in data.chunks_exact_mut(k).enumerate() {
            if row.iter().all(|&b| b == 0xFF) {
                continue;
            }
            work.clear();
            work.extend_from_slice(&list);
            for slot in row.iter_mut() {
                let r = *slot as usize;
                if r >= work.len() {
                    return Err(format!("row {ri}: rank {r} outside a list of {}", work.len()));
                }
                *slot = work.remove(r);
            }
            let rest: Vec<u8> = list.iter().copied().filter(|x| !row.contains(x)).collect();
            list.clear();
            list.extend_from_slice(row);
            list.extend_from_slice(&rest);
        }
        Ok(())
    }

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Rows with correlated (sticky) experts, some missing.
    fn rows(e: usize, k: usize, n: usize, seed: u64) -> Vec<u8> {
        let mut next = rng(seed);
        let mut prev: Vec<u8> = (0..k).map(|x| x as u8).collect();
        let mut out = Vec::with_capacity(n * k);
        for _ in 0..n {
            if next().is_multiple_of(17) {
                out.extend(std::iter::repeat_n(0xFF, k));
                continue;
            }
            let mut row: Vec<u8> = Vec::with_capacity(k);
            for &p in &prev {
                let cand = if !next().is_multiple_of(3) {
                    p
                } else {
                    (next() % e as u64) as u8
                };
                let mut c = cand;
                while row.contains(&c) {
                    c = (next() % e as u64) as u8;
                }
                row.push(c);
            }
            prev = row.clone();
            out.extend(row);
        }
        out
    }

    #[test]
    fn fast_row_rank_matches_the_reference_list_algorithm() {
        for (e, k) in [
            (2usize, 1usize),
            (2, 2),
            (8, 2),
            (8, 8),
            (16, 5),
            (128, 8),
            (255, 1),
            (256, 8),
            (256, 16),
            (256, 256),
            (60, 7),
        ] {
            for seed in 1..6u64 {
                let raw = rows(e, k, 300, seed * 7919 + e as u64);
                let mut a = raw.clone();
                let mut b = raw.clone();
                rank_encode(&mut a, k, e);
                rank_encode_reference(&mut b, k, e);
                assert_eq!(a, b, "encode e {e} k {k}");
                let mut d = a.clone();
                rank_decode(&mut d, k, e).unwrap();
                assert_eq!(d, raw, "decode e {e} k {k}");
                let mut d2 = a.clone();
                rank_decode_reference(&mut d2, k, e).unwrap();
                assert_eq!(d2, raw);
            }
        }
    }

    #[test]
    fn fast_row_rank_decode_matches_the_reference_on_arbitrary_bytes() {
        for (e, k) in [(8usize, 2usize), (16, 4), (128, 8), (256, 8), (5, 5)] {
            let mut next = rng(e as u64 * 31 + k as u64);
            for _ in 0..200 {
                let n = (next() % 40) as usize * k;
                let bytes: Vec<u8> = (0..n).map(|_| (next() % (e as u64 + 3)) as u8).collect();
                let mut a = bytes.clone();
                let mut b = bytes.clone();
                let ra = rank_decode(&mut a, k, e);
                let rb = rank_decode_reference(&mut b, k, e);
                assert_eq!(ra, rb);
                if ra.is_ok() {
                    assert_eq!(a, b);
                }
            }
        }
    }
}
