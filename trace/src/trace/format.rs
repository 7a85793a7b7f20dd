//! Byte layout of `.mrt` files (documented in `docs/trace-format.md`): header, chunk frames,
//! blocks, index frame and footer. All integers little-endian.

use super::kernels;
use super::{IdWidth, RowConvention, TraceError, TraceHeader};
use moe_router_core::layout::{LayerId, LayerKind};

/// File magic: `\x89MRT\r\n\x1a\n` (the PNG trick: detects 7-bit and newline mangling).
pub(crate) const MAGIC: [u8; 8] = [0x89, b'M', b'R', b'T', b'\r', b'\n', 0x1A, b'\n'];
/// Major version this code writes (new files); it reads this one and [`VERSION_1`].
pub(crate) const VERSION_MAJOR: u16 = 2;
/// Format 1: one layer per block and 32-byte index entries. Still read, and still written when
/// appending to a 1.x file (so that the file stays readable by 1.x readers).
pub(crate) const VERSION_1: u16 = 1;
/// Minor version this code writes for a header without the 2.1 additions (so such files stay
/// byte for byte what a 2.0 writer wrote).
pub(crate) const VERSION_MINOR: u16 = 0;
/// Minor version of a header with layer kinds or slot sentinels (format 2.1).
pub(crate) const VERSION_MINOR_KINDS: u16 = 1;
/// Header flag bit 0: a weight version is present.
pub(crate) const FLAG_WEIGHT_VERSION: u8 = 1;
/// Header flag bit 1 (2.1): present rows may hold slot sentinels.
pub(crate) const FLAG_SLOT_SENTINELS: u8 = 2;
/// Header extension record (2.1): one layer-kind code per layer of the map.
pub(crate) const RECORD_LAYER_KINDS: u8 = 1;
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
/// Index frame header bytes, format 1.
pub(crate) const INDEX_HEADER_V1: usize = 24;
/// Bytes per chunk-table entry in the index, format 1.
pub(crate) const INDEX_CHUNK_ENTRY_V1: usize = 16;
/// Bytes per block entry in the index, format 1.
pub(crate) const INDEX_BLOCK_ENTRY_V1: usize = 32;
/// Index frame header bytes, format 2 (the format 1 fields and the byte length of the entries).
pub(crate) const INDEX_HEADER_V2: usize = 32;
/// Bytes per chunk-table entry in the index, format 2 (format 1's and the block count).
pub(crate) const INDEX_CHUNK_ENTRY_V2: usize = 20;
/// Fewest bytes of a format 2 block entry (five one-byte varints).
pub(crate) const INDEX_BLOCK_ENTRY_V2_MIN: usize = 5;
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

/// Bytes of the minimal unsigned LEB128 encoding of `v` (1..=10).
pub(crate) fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Zigzag code of a difference modulo 2⁶⁴ read as a two's-complement `i64`.
pub(crate) fn zigzag(d: u64) -> u64 {
    (d << 1) ^ (((d as i64) >> 63) as u64)
}

/// Inverse of [`zigzag`].
pub(crate) fn unzigzag(z: u64) -> u64 {
    (z >> 1) ^ (z & 1).wrapping_neg()
}

/// Appends an unsigned LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at `*pos` as [`get_varint`] does; with `minimal`, a varint longer than its
/// minimal encoding (a last byte of 0 after other bytes) is refused too (format 2).
pub(crate) fn get_varint_checked(b: &[u8], pos: &mut usize, minimal: bool) -> Option<u64> {
    let p0 = *pos;
    let v = get_varint(b, pos)?;
    if minimal && *pos - p0 != varint_len(v) {
        return None;
    }
    Some(v)
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
    let mut flags = 0u8;
    if h.weight_version().is_some() {
        flags |= FLAG_WEIGHT_VERSION;
    }
    if h.slot_sentinels() {
        flags |= FLAG_SLOT_SENTINELS;
    }
    body.push(flags);
    body.extend_from_slice(&[0u8; 7]);
    body.extend_from_slice(&h.weight_version().unwrap_or(0).to_le_bytes());
    body.extend_from_slice(&(h.layers().len() as u32).to_le_bytes());
    for l in h.layers() {
        body.extend_from_slice(&l.0.to_le_bytes());
    }
    body.extend_from_slice(&(h.producer().len() as u32).to_le_bytes());
    body.extend_from_slice(h.producer().as_bytes());
    if h.has_layer_kinds() {
        body.push(RECORD_LAYER_KINDS);
        body.extend_from_slice(&(h.layers().len() as u32).to_le_bytes());
        body.extend(h.layer_kinds().iter().map(|k| k.code()));
    }
    let minor = if h.has_layer_kinds() || h.slot_sentinels() {
        VERSION_MINOR_KINDS
    } else {
        VERSION_MINOR
    };
    let mut out = Vec::with_capacity(HEADER_PREFIX + body.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    out.extend_from_slice(&minor.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let c = crc(&out);
    out.extend_from_slice(&c.to_le_bytes());
    out
}

/// The version of a file: major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    pub major: u16,
    pub minor: u16,
}

/// Decodes the file header; returns it, the version and the header's total length.
pub(crate) fn decode_header(b: &[u8]) -> Result<(TraceHeader, Version, usize), TraceError> {
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
    if major != VERSION_MAJOR && major != VERSION_1 {
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
    if flags & !(FLAG_WEIGHT_VERSION | FLAG_SLOT_SENTINELS) != 0 {
        return Err(bad(16, format!("unknown flags {flags:#04x}")));
    }
    let wv = (flags & FLAG_WEIGHT_VERSION != 0).then(|| u64_at(body, 24));
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
    let nlayers = layers.len();
    let mut h =
        TraceHeader::from_parts(e, k, width, layers, conv, fp, wv, producer).map_err(|err| bad(0, err.to_string()))?;
    if flags & FLAG_SLOT_SENTINELS != 0 {
        h = h.with_slot_sentinels(true).map_err(|err| bad(16, err.to_string()))?;
    }
    // Extension records (2.1): `tag u8, length u32, length bytes` up to the end of the body;
    // unknown tags are skipped.
    let mut pos = prod_end;
    while pos < body.len() {
        if body.len() - pos < 5 {
            return Err(bad(pos, format!("{} stray bytes after the producer", body.len() - pos)));
        }
        let tag = body[pos];
        let len = u32_at(body, pos + 1) as usize;
        let data = pos + 5;
        if body.len() - data < len {
            return Err(bad(
                pos,
                format!("header record {tag} of {len} bytes does not fit in the header body"),
            ));
        }
        if tag == RECORD_LAYER_KINDS {
            if len != nlayers {
                return Err(bad(
                    pos + 1,
                    format!("layer-kind record of {len} bytes for {nlayers} layers"),
                ));
            }
            let mut kinds = Vec::with_capacity(len);
            for (i, &c) in body[data..data + len].iter().enumerate() {
                kinds.push(
                    LayerKind::from_code(c).ok_or_else(|| bad(data + i, format!("unknown layer kind code {c}")))?,
                );
            }
            h = h.with_kind_list(&kinds).map_err(|err| bad(data, err.to_string()))?;
        }
        pos = data + len;
    }
    Ok((h, Version { major, minor }, total))
}

/// One block of a decoded chunk payload: `rows` positions from `start` of sequence `seq` at
/// `layers` consecutive layers of the map from `layer_index` (always one layer in format 1). The
/// ids are layer-major: the rows of the first layer, then those of the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub seq: u64,
    pub layer_index: u32,
    pub layers: u32,
    pub start: u64,
    pub rows: u32,
    /// Offset of the ids within the raw payload.
    pub data_off: u32,
}

impl Block {
    /// Payload offset of the rows of the `j`-th layer of the block.
    pub(crate) fn layer_data_off(&self, j: u32, row_bytes: usize) -> usize {
        self.data_off as usize + j as usize * self.rows as usize * row_bytes
    }
}

/// Appends one block header (format `major`; format 1 has no layer count, `layers` is then 1).
pub(crate) fn put_block_header(out: &mut Vec<u8>, major: u16, b: &Block) {
    put_varint(out, b.seq);
    put_varint(out, u64::from(b.layer_index));
    if major >= VERSION_MAJOR {
        put_varint(out, u64::from(b.layers));
    }
    put_varint(out, b.start);
    put_varint(out, u64::from(b.rows));
}

/// Bytes of a block header as [`put_block_header`] writes it.
pub(crate) fn block_header_len(major: u16, b: &Block) -> usize {
    varint_len(b.seq)
        + varint_len(u64::from(b.layer_index))
        + if major >= VERSION_MAJOR {
            varint_len(u64::from(b.layers))
        } else {
            0
        }
        + varint_len(b.start)
        + varint_len(u64::from(b.rows))
}

/// Parses the blocks of a raw payload of format `major` (`row_bytes` per row, `layers` in the
/// map). Errors carry the offset within the payload.
pub(crate) fn parse_blocks(
    raw: &[u8],
    expected: u32,
    row_bytes: usize,
    layers: usize,
    major: u16,
) -> Result<Vec<Block>, (usize, String)> {
    let mut pos = 0usize;
    let v2 = major >= VERSION_MAJOR;
    let what = if v2 { " (or not minimal)" } else { "" };
    // Every block takes at least one payload byte: never reserve by a count the input claims.
    let mut out = Vec::with_capacity((expected as usize).min(raw.len()));
    while pos < raw.len() {
        let at = pos;
        let mut field =
            |name: &str| get_varint_checked(raw, &mut pos, v2).ok_or((at, format!("bad {name} varint{what}")));
        let seq = field("sequence")?;
        let li = field("layer")?;
        let nl = if v2 { field("layer-count")? } else { 1 };
        let start = field("start")?;
        let rows = field("row-count")?;
        if li >= layers as u64 {
            return Err((at, format!("layer index {li} but the layer map has {layers} layers")));
        }
        if nl == 0 || nl > layers as u64 - li {
            return Err((
                at,
                format!("block of {nl} layers from layer index {li}, but the layer map has {layers} layers"),
            ));
        }
        if rows == 0 || rows > u64::from(u32::MAX) {
            return Err((at, format!("block row count {rows}")));
        }
        if start.checked_add(rows).is_none() {
            return Err((at, format!("positions {start}+{rows} overflow")));
        }
        let len = (rows as usize)
            .checked_mul(nl as usize)
            .and_then(|n| n.checked_mul(row_bytes))
            .filter(|&l| l <= raw.len() - pos)
            .ok_or((
                at,
                format!("block of {nl} layer(s) × {rows} rows runs past the payload end"),
            ))?;
        out.push(Block {
            seq,
            layer_index: li as u32,
            layers: nl as u32,
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
    /// A complete index frame whose checksum matches, with its length.
    Index(u64),
    /// Fewer bytes than the frame needs (or than a frame header): a torn tail.
    Short,
    /// Anything else (bad tag, bad fields, checksum mismatch), with a reason.
    Bad(String),
}

/// Examines the bytes at `off` of a file of format `major`.
pub(crate) fn probe_frame(b: &[u8], off: usize, major: u16) -> FrameProbe {
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
        let v2 = major >= VERSION_MAJOR;
        let head = if v2 { INDEX_HEADER_V2 } else { INDEX_HEADER_V1 };
        if rest.len() < head {
            return FrameProbe::Short;
        }
        let chunks = u64_at(rest, 8);
        let len = if v2 {
            // Chunk table, then the block entries (their byte length at offset 24).
            chunks
                .checked_mul(INDEX_CHUNK_ENTRY_V2 as u64)
                .and_then(|a| a.checked_add(u64_at(rest, 24)))
        } else {
            chunks.checked_mul(INDEX_CHUNK_ENTRY_V1 as u64).and_then(|a| {
                u64_at(rest, 16)
                    .checked_mul(INDEX_BLOCK_ENTRY_V1 as u64)
                    .and_then(|b| a.checked_add(b))
            })
        }
        .and_then(|x| x.checked_add((head + 4) as u64));
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
        return FrameProbe::Index(len);
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
    /// Blocks in the chunk (stored in the format 2 index; in format 1 taken from the frame).
    pub blocks: u32,
}

/// A block entry of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub seq: u64,
    pub start: u64,
    pub layer_index: u32,
    /// Consecutive layers of the block (1 in format 1).
    pub layers: u32,
    pub rows: u32,
    pub chunk: u32,
    pub data_off: u32,
}

impl IndexEntry {
    /// The entry of block `b` of chunk `chunk`.
    pub(crate) fn of_block(b: &Block, chunk: u32) -> Self {
        IndexEntry {
            seq: b.seq,
            start: b.start,
            layer_index: b.layer_index,
            layers: b.layers,
            rows: b.rows,
            chunk,
            data_off: b.data_off,
        }
    }
    /// The block this entry describes.
    pub(crate) fn block(&self) -> Block {
        Block {
            seq: self.seq,
            layer_index: self.layer_index,
            layers: self.layers,
            start: self.start,
            rows: self.rows,
            data_off: self.data_off,
        }
    }
}

/// Encodes the index frame of format `major` and the footer (`index_offset` = where the index
/// frame starts). Entries are in chunk order, each chunk's in payload order.
pub(crate) fn encode_index(chunks: &[ChunkEntry], entries: &[IndexEntry], index_offset: u64, major: u16) -> Vec<u8> {
    let v2 = major >= VERSION_MAJOR;
    let mut out = Vec::with_capacity(
        INDEX_HEADER_V2
            + chunks.len() * INDEX_CHUNK_ENTRY_V2
            + entries.len() * if v2 { 8 } else { INDEX_BLOCK_ENTRY_V1 }
            + 4
            + FOOTER_LEN,
    );
    out.extend_from_slice(&INDEX_TAG);
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    if v2 {
        // Byte length of the entries, filled in below.
        out.extend_from_slice(&[0u8; 8]);
    }
    for c in chunks {
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.frame_len.to_le_bytes());
        out.extend_from_slice(&c.raw_len.to_le_bytes());
        if v2 {
            out.extend_from_slice(&c.blocks.to_le_bytes());
        }
    }
    let e0 = out.len();
    let (mut seq, mut start) = (0u64, 0u64);
    for e in entries {
        if v2 {
            put_varint(&mut out, zigzag(e.seq.wrapping_sub(seq)));
            put_varint(&mut out, u64::from(e.layer_index));
            put_varint(&mut out, u64::from(e.layers));
            put_varint(&mut out, zigzag(e.start.wrapping_sub(start)));
            put_varint(&mut out, u64::from(e.rows));
            (seq, start) = (e.seq, e.start);
        } else {
            out.extend_from_slice(&e.seq.to_le_bytes());
            out.extend_from_slice(&e.start.to_le_bytes());
            out.extend_from_slice(&e.layer_index.to_le_bytes());
            out.extend_from_slice(&e.rows.to_le_bytes());
            out.extend_from_slice(&e.chunk.to_le_bytes());
            out.extend_from_slice(&e.data_off.to_le_bytes());
        }
    }
    if v2 {
        let n = (out.len() - e0) as u64;
        out[24..32].copy_from_slice(&n.to_le_bytes());
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

/// Decodes an index frame of format `major` whose checksum was verified (`frame` is the whole
/// frame, CRC included). Errors say what is inconsistent. In format 1 the chunk-table block
/// counts are 0 (the caller takes them from the frames); in format 2 the blocks' data offsets
/// follow from their minimal-varint headers (`row_bytes` per row).
pub(crate) fn decode_index(
    frame: &[u8],
    major: u16,
    row_bytes: usize,
) -> Result<(Vec<ChunkEntry>, Vec<IndexEntry>), String> {
    let v2 = major >= VERSION_MAJOR;
    let chunks = u64_at(frame, 8);
    let entries = u64_at(frame, 16);
    let (mut p, ce) = if v2 {
        (INDEX_HEADER_V2, INDEX_CHUNK_ENTRY_V2)
    } else {
        (INDEX_HEADER_V1, INDEX_CHUNK_ENTRY_V1)
    };
    let body_end = frame.len() - 4;
    // The frame length was computed from these counts and checked, so the tables fit.
    let mut cs = Vec::with_capacity(chunks as usize);
    for _ in 0..chunks {
        cs.push(ChunkEntry {
            offset: u64_at(frame, p),
            frame_len: u32_at(frame, p + 8),
            raw_len: u32_at(frame, p + 12),
            blocks: if v2 { u32_at(frame, p + 16) } else { 0 },
        });
        p += ce;
    }
    if !v2 {
        let mut es = Vec::with_capacity(entries as usize);
        for _ in 0..entries {
            es.push(IndexEntry {
                seq: u64_at(frame, p),
                start: u64_at(frame, p + 8),
                layer_index: u32_at(frame, p + 16),
                layers: 1,
                rows: u32_at(frame, p + 20),
                chunk: u32_at(frame, p + 24),
                data_off: u32_at(frame, p + 28),
            });
            p += INDEX_BLOCK_ENTRY_V1;
        }
        return Ok((cs, es));
    }
    let total: u64 = cs.iter().map(|c| u64::from(c.blocks)).sum();
    if total != entries {
        return Err(format!(
            "the chunk table counts {total} blocks, the index header {entries}"
        ));
    }
    // Never reserve by a claimed count: every entry takes at least 5 bytes.
    let mut es = Vec::with_capacity((entries as usize).min((body_end - p) / INDEX_BLOCK_ENTRY_V2_MIN));
    let (mut seq, mut start) = (0u64, 0u64);
    for (ci, c) in cs.iter().enumerate() {
        let mut off = 0u64;
        for bi in 0..c.blocks {
            let at = p;
            let bad = || format!("block entry {bi} of chunk {ci} at index byte {at}: bad varint");
            let mut field = || {
                if p >= body_end {
                    return None;
                }
                get_varint_checked(&frame[..body_end], &mut p, true)
            };
            let dseq = field().ok_or_else(bad)?;
            let li = field().ok_or_else(bad)?;
            let nl = field().ok_or_else(bad)?;
            let dstart = field().ok_or_else(bad)?;
            let rows = field().ok_or_else(bad)?;
            seq = seq.wrapping_add(unzigzag(dseq));
            start = start.wrapping_add(unzigzag(dstart));
            if li > u64::from(u32::MAX)
                || nl == 0
                || nl > u64::from(u32::MAX)
                || rows == 0
                || rows > u64::from(u32::MAX)
            {
                return Err(format!(
                    "block entry {bi} of chunk {ci}: layer index {li}, {nl} layers, {rows} rows"
                ));
            }
            let mut b = Block {
                seq,
                layer_index: li as u32,
                layers: nl as u32,
                start,
                rows: rows as u32,
                data_off: 0,
            };
            off += block_header_len(major, &b) as u64;
            if off > u64::from(c.raw_len) {
                return Err(format!("block entry {bi} of chunk {ci} runs past the chunk's payload"));
            }
            b.data_off = off as u32;
            off = off.saturating_add(nl.saturating_mul(rows).saturating_mul(row_bytes as u64));
            es.push(IndexEntry::of_block(&b, ci as u32));
        }
        if off != u64::from(c.raw_len) {
            return Err(format!(
                "the block entries of chunk {ci} cover {off} payload bytes, the chunk holds {}",
                c.raw_len
            ));
        }
    }
    if p != body_end {
        return Err(format!("{} bytes after the last block entry", body_end - p));
    }
    Ok((cs, es))
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
