//! The streaming `.mrt` writer: appends are copied into per-lane buffers under a short lock;
//! full chunks are compressed, checksummed and written by a background thread.

use super::codec::RowCodec;
use super::file::TraceFile;
use super::format::{self, ChunkEntry, IndexEntry};
use super::{TraceError, TraceHeader};
use moe_router_core::layout::{LayerId, SeqId};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, IoSlice, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Default limit of id bytes per chunk (1 MiB).
pub const DEFAULT_CHUNK_ID_BYTES: usize = 1 << 20;

/// Per-chunk compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Chunks are stored as is.
    #[default]
    None,
    /// Each chunk is one zstd frame at this level (1–22; 3 is a good default). A chunk that does
    /// not shrink is stored uncompressed.
    Zstd(i32),
    /// The row-rank transform (ids that repeat the previous row's experts become small numbers;
    /// see `docs/trace-format.md`) then zstd at this level: 25–35% smaller than plain zstd on
    /// correlated routes. Applies to one-byte ids (E ≤ 256); two-byte traces use plain zstd.
    ZstdRanked(i32),
}

/// Writer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterOptions {
    /// Most id bytes per chunk (default 1 MiB). A crash loses at most the chunk being written.
    /// Raised to one row when smaller.
    pub chunk_id_bytes: usize,
    /// Per-chunk compression.
    pub compression: Compression,
    /// Call `fsync` when the writer finishes.
    pub sync_on_finish: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_id_bytes: DEFAULT_CHUNK_ID_BYTES,
            compression: Compression::None,
            sync_on_finish: false,
        }
    }
}

impl WriterOptions {
    /// Default options with zstd at `level`.
    pub fn zstd(level: i32) -> Self {
        WriterOptions {
            compression: Compression::Zstd(level),
            ..WriterOptions::default()
        }
    }
    /// Sets the chunk limit in id bytes.
    pub fn with_chunk_id_bytes(mut self, n: usize) -> Self {
        self.chunk_id_bytes = n;
        self
    }
}

/// What a writer wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterStats {
    /// Chunks written (including those of an earlier session when appending to a file).
    pub chunks: u64,
    /// Rows written by this writer (present and missing).
    pub rows: u64,
    /// Id bytes written by this writer (rows × K × width).
    pub id_bytes: u64,
    /// Rows dropped because their position was already written (first write wins: never
    /// duplicated, never rewritten).
    pub overlap_rows_dropped: u64,
    /// File size after finishing (0 before).
    pub file_bytes: u64,
}

/// Intervals `[a, b)` sorted and merged.
#[derive(Debug, Default, Clone)]
struct Intervals(Vec<(u64, u64)>);

impl Intervals {
    fn intersects(&self, a: u64, b: u64) -> bool {
        let i = self.0.partition_point(|&(_, e)| e <= a);
        self.0.get(i).is_some_and(|&(s, _)| s < b)
    }
    fn contains(&self, p: u64) -> bool {
        self.intersects(p, p + 1)
    }
    fn add(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        if let Some(last) = self.0.last_mut()
            && last.1 <= a
        {
            if last.1 == a {
                last.1 = b;
            } else {
                self.0.push((a, b));
            }
            return;
        }
        let i0 = self.0.partition_point(|&(_, e)| e < a);
        let i1 = self.0.partition_point(|&(s, _)| s <= b);
        let (mut na, mut nb) = (a, b);
        if i0 < i1 {
            na = na.min(self.0[i0].0);
            nb = nb.max(self.0[i1 - 1].1);
        }
        self.0.splice(i0..i1, [(na, nb)]);
    }
    fn remove(&mut self, p: u64) {
        let i = self.0.partition_point(|&(_, e)| e <= p);
        if let Some(&(s, e)) = self.0.get(i)
            && s <= p
        {
            let mut repl = Vec::with_capacity(2);
            if s < p {
                repl.push((s, p));
            }
            if p + 1 < e {
                repl.push((p + 1, e));
            }
            self.0.splice(i..=i, repl);
        }
    }
}

#[derive(Debug, Default)]
struct Coverage {
    /// Positions written (present or missing).
    written: Intervals,
    /// Positions written as missing.
    missing: Intervals,
}

type Pending = BTreeMap<(u64, u32), Vec<(u64, Vec<u8>)>>;

enum Job {
    Chunk { index: u32, pending: Pending },
    Finish(SyncSender<Result<(u64, u64), TraceError>>),
}

struct State {
    pending: Pending,
    pending_bytes: usize,
    next_chunk: u32,
    coverage: HashMap<(SeqId, LayerId), Coverage>,
    stats: WriterStats,
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    closed: bool,
}

/// Streams a trace into a `.mrt` file. Thread-safe: several threads (layers) may append to one
/// writer; each append validates and copies its rows under a short lock, and full chunks are
/// compressed, checksummed and written by a background thread (bounded queue: a slow disk makes
/// appends wait instead of growing memory).
///
/// Overlaps follow the trace rule with *first write wins*: rows at positions this writer already
/// wrote are dropped and counted ([`WriterStats::overlap_rows_dropped`]) — never duplicated,
/// never rewritten — except that a recorded row may fill a position written as missing.
/// Call [`TraceWriter::finish`] to write the index; a writer dropped without it still flushes
/// its chunks and index on a best-effort basis. After a crash the file is readable up to the
/// last complete chunk, and [`TraceWriter::append_to`] continues it.
pub struct TraceWriter {
    header: TraceHeader,
    codec: RowCodec,
    opts: WriterOptions,
    limit: usize,
    path: PathBuf,
    state: Mutex<State>,
    error: Arc<Mutex<Option<TraceError>>>,
    pool: Arc<BufferPool>,
}

impl std::fmt::Debug for TraceWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceWriter")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("opts", &self.opts)
            .finish()
    }
}

impl TraceWriter {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: impl AsRef<Path>, header: TraceHeader, opts: WriterOptions) -> Result<Self, TraceError> {
        let path = path.as_ref().to_path_buf();
        let mut f = File::create(&path).map_err(|e| TraceError::io(format!("creating {}", path.display()), &e))?;
        let h = format::encode_header(&header);
        f.write_all(&h)
            .map_err(|e| TraceError::io(format!("writing header of {}", path.display()), &e))?;
        Ok(Self::start(
            path,
            f,
            header,
            opts,
            h.len() as u64,
            0,
            Vec::new(),
            Vec::new(),
            HashMap::new(),
        ))
    }

    /// Opens an existing trace file to append more rows (multi-turn, partial-rollout resume, or
    /// after a crash). The file is recovered as by [`TraceFile::open`] (a torn tail is cut off,
    /// the old index is removed and rewritten on finish); `header` must match the file's up to
    /// the producer. Positions already in the file count as written (first write wins).
    pub fn append_to(path: impl AsRef<Path>, header: &TraceHeader, opts: WriterOptions) -> Result<Self, TraceError> {
        let path = path.as_ref().to_path_buf();
        let (hdr, chunks, entries, end, coverage) = {
            let tf = TraceFile::open(&path)?;
            tf.header().check_compatible(header)?;
            let trace = tf.to_trace()?;
            let mut cov: HashMap<(SeqId, LayerId), Coverage> = HashMap::new();
            let codec = *trace.codec();
            let rb = codec.row_bytes();
            for lane in trace.lanes() {
                let c = cov.entry((lane.seq, lane.layer)).or_default();
                for r in lane.runs {
                    c.written.add(r.start, r.start + r.rows as u64);
                    for (i, row) in r.bytes.chunks_exact(rb).enumerate() {
                        if codec.is_missing(row) {
                            c.missing.add(r.start + i as u64, r.start + i as u64 + 1);
                        }
                    }
                }
            }
            let (chunks, entries) = tf.index_tables();
            (tf.header().clone(), chunks, entries, tf.data_end(), cov)
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| TraceError::io(format!("opening {} for append", path.display()), &e))?;
        f.set_len(end)
            .and_then(|_| f.seek(SeekFrom::Start(end)))
            .map_err(|e| TraceError::io(format!("truncating {} to {end} bytes", path.display()), &e))?;
        let next = chunks.len() as u32;
        let mut w = Self::start(path, f, hdr, opts, end, next, chunks, entries, coverage);
        w.header = header.clone().with_producer(header.producer());
        Ok(w)
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        path: PathBuf,
        f: File,
        header: TraceHeader,
        opts: WriterOptions,
        offset: u64,
        next_chunk: u32,
        chunks: Vec<ChunkEntry>,
        entries: Vec<IndexEntry>,
        coverage: HashMap<(SeqId, LayerId), Coverage>,
    ) -> Self {
        let codec = RowCodec::new(&header);
        let limit = opts.chunk_id_bytes.max(codec.row_bytes());
        let error = Arc::new(Mutex::new(None));
        let pool = Arc::new(BufferPool::default());
        let (tx, rx) = sync_channel::<Job>(4);
        let ctx = WriterThread {
            file: BufWriter::with_capacity(1 << 20, f),
            offset,
            chunks,
            entries,
            compression: opts.compression,
            sync: opts.sync_on_finish,
            row_bytes: codec.row_bytes(),
            top_k: header.top_k(),
            num_experts: header.num_experts(),
            ranked_ok: header.id_width() == super::IdWidth::U8,
            error: error.clone(),
            pool: pool.clone(),
            path: path.clone(),
            raw: Vec::new(),
            ranked: Vec::new(),
            packed: Vec::new(),
            zstd: None,
        };
        let thread = std::thread::Builder::new()
            .name("mrt-writer".into())
            .spawn(move || ctx.run(rx))
            .ok();
        let mut stats = WriterStats {
            chunks: u64::from(next_chunk),
            ..WriterStats::default()
        };
        stats.file_bytes = 0;
        TraceWriter {
            header,
            codec,
            opts,
            limit,
            path,
            state: Mutex::new(State {
                pending: BTreeMap::new(),
                pending_bytes: 0,
                next_chunk,
                coverage,
                stats,
                tx: thread.as_ref().map(|_| tx),
                thread,
                closed: false,
            }),
            error,
            pool,
        }
    }

    /// The header being written.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }
    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The options.
    pub fn options(&self) -> WriterOptions {
        self.opts
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_error(&self) -> Result<(), TraceError> {
        let e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        match &*e {
            Some(err) => Err(TraceError::WriterClosed(format!(
                "background write failed earlier: {err}"
            ))),
            None => Ok(()),
        }
    }

    fn layer_index(&self, layer: LayerId) -> Result<u32, TraceError> {
        self.header
            .layer_index(layer)
            .map(|i| i as u32)
            .ok_or_else(|| TraceError::UnknownLayer {
                layer: layer.0,
                known: self.header.layer_ids(),
            })
    }

    /// Appends `[rows, K]` ids (rows of [`super::MISSING_ID`] are missing) for positions `start..`
    /// of `seq` at `layer`. Validates every row (ids `< E`, distinct) before anything is written.
    pub fn append(
        &self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        ids: ArrayView2<'_, u32>,
    ) -> Result<WriterStats, TraceError> {
        let li = self.layer_index(layer)?;
        let mut buf = self.pool.take();
        let present = self.codec.encode_rows(ids, &mut buf, seq, layer, start)?;
        let has_missing = present < ids.nrows();
        self.push(seq, layer, li, start, buf, has_missing)
    }

    /// Appends stored rows (`rows × K × width` bytes, see [`RowCodec`]), validating each.
    pub fn append_stored(
        &self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        bytes: &[u8],
    ) -> Result<WriterStats, TraceError> {
        let li = self.layer_index(layer)?;
        let rb = self.codec.row_bytes();
        if !bytes.len().is_multiple_of(rb) {
            return Err(TraceError::StoredLength {
                bytes: bytes.len(),
                row_bytes: rb,
            });
        }
        let (present, _) = self
            .codec
            .check_stored_rows(bytes)
            .map_err(|(r, f)| f.locate(seq, layer, start + r as u64, self.header.num_experts()))?;
        let has_missing = present < (bytes.len() / rb) as u64;
        let mut buf = self.pool.take();
        buf.extend_from_slice(bytes);
        self.push(seq, layer, li, start, buf, has_missing)
    }

    /// Queues validated stored rows; `has_missing` says whether any of them is a missing row
    /// (when false, the per-row scan for missing rows is skipped).
    fn push(
        &self,
        seq: SeqId,
        layer: LayerId,
        li: u32,
        start: u64,
        data: Vec<u8>,
        has_missing: bool,
    ) -> Result<WriterStats, TraceError> {
        self.check_error()?;
        let rb = self.codec.row_bytes();
        let rows = (data.len() / rb) as u64;
        let end = start.checked_add(rows).ok_or(TraceError::PositionOverflow {
            seq: seq.0,
            layer: layer.0,
            start,
        })?;
        let mut st = self.lock();
        if st.closed {
            return Err(TraceError::WriterClosed("finish() was called".into()));
        }
        if rows == 0 {
            return Ok(st.stats);
        }
        let codec = self.codec;
        let cov = st.coverage.entry((seq, layer)).or_default();
        // Pieces to write: (start, bytes).
        let mut pieces: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut dropped = 0u64;
        if !cov.written.intersects(start, end) {
            cov.written.add(start, end);
            if has_missing {
                for (i, row) in data.chunks_exact(rb).enumerate() {
                    if codec.is_missing(row) {
                        let p = start + i as u64;
                        cov.missing.add(p, p + 1);
                    }
                }
            }
            pieces.push((start, data));
        } else {
            let mut cur: Option<(u64, Vec<u8>)> = None;
            for (i, row) in data.chunks_exact(rb).enumerate() {
                let p = start + i as u64;
                let missing = codec.is_missing(row);
                let keep = if !cov.written.contains(p) {
                    cov.written.add(p, p + 1);
                    if missing {
                        cov.missing.add(p, p + 1);
                    }
                    true
                } else if !missing && cov.missing.contains(p) {
                    cov.missing.remove(p);
                    true
                } else {
                    false
                };
                if keep {
                    match &mut cur {
                        Some((s, b)) if *s + (b.len() / rb) as u64 == p => b.extend_from_slice(row),
                        _ => {
                            if let Some(c) = cur.take() {
                                pieces.push(c);
                            }
                            cur = Some((p, row.to_vec()));
                        }
                    }
                } else {
                    dropped += 1;
                }
            }
            pieces.extend(cur);
        }
        st.stats.overlap_rows_dropped += dropped;
        for (mut p0, bytes) in pieces {
            let mut off = 0usize;
            while off < bytes.len() {
                let room = (self.limit - st.pending_bytes) / rb * rb;
                if room == 0 {
                    self.flush_locked(&mut st)?;
                    continue;
                }
                let take = room.min(bytes.len() - off);
                let lane = st.pending.entry((seq.0, li)).or_default();
                match lane.last_mut() {
                    Some((s, b)) if *s + (b.len() / rb) as u64 == p0 => b.extend_from_slice(&bytes[off..off + take]),
                    // The whole piece fits: move it instead of copying.
                    _ if off == 0 && take == bytes.len() => {
                        lane.push((p0, bytes));
                        st.pending_bytes += take;
                        st.stats.rows += (take / rb) as u64;
                        st.stats.id_bytes += take as u64;
                        if st.pending_bytes >= self.limit {
                            self.flush_locked(&mut st)?;
                        }
                        break;
                    }
                    _ => lane.push((p0, bytes[off..off + take].to_vec())),
                }
                st.pending_bytes += take;
                st.stats.rows += (take / rb) as u64;
                st.stats.id_bytes += take as u64;
                p0 += (take / rb) as u64;
                off += take;
                if st.pending_bytes >= self.limit {
                    self.flush_locked(&mut st)?;
                }
            }
        }
        Ok(st.stats)
    }

    fn flush_locked(&self, st: &mut State) -> Result<(), TraceError> {
        if st.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut st.pending);
        st.pending_bytes = 0;
        let index = st.next_chunk;
        st.next_chunk = st
            .next_chunk
            .checked_add(1)
            .ok_or_else(|| TraceError::WriterClosed("more than 2^32 chunks".into()))?;
        st.stats.chunks += 1;
        let tx = st
            .tx
            .as_ref()
            .ok_or_else(|| TraceError::WriterClosed("writer thread failed to start".into()))?;
        tx.send(Job::Chunk { index, pending })
            .map_err(|_| TraceError::WriterClosed("writer thread stopped".into()))?;
        self.check_error()
    }

    /// Writes the pending rows as a chunk now (a chunk is also written whenever the limit is
    /// reached). Rows handed to `flush` survive a later crash once the background thread has
    /// written them.
    pub fn flush(&self) -> Result<(), TraceError> {
        let mut st = self.lock();
        if st.closed {
            return Err(TraceError::WriterClosed("finish() was called".into()));
        }
        self.flush_locked(&mut st)
    }

    /// Writes the last chunk, the index and the footer, and closes the file. Further appends
    /// fail with [`TraceError::WriterClosed`]; calling `finish` again returns the same stats.
    pub fn finish(&self) -> Result<WriterStats, TraceError> {
        let mut st = self.lock();
        if st.closed {
            self.check_error()?;
            return Ok(st.stats);
        }
        self.flush_locked(&mut st)?;
        st.closed = true;
        let tx = st
            .tx
            .take()
            .ok_or_else(|| TraceError::WriterClosed("writer thread failed to start".into()))?;
        let (rtx, rrx) = sync_channel(1);
        tx.send(Job::Finish(rtx))
            .map_err(|_| TraceError::WriterClosed("writer thread stopped".into()))?;
        drop(tx);
        let res = rrx
            .recv()
            .map_err(|_| TraceError::WriterClosed("writer thread stopped".into()))?;
        if let Some(t) = st.thread.take() {
            let _ = t.join();
        }
        let (file_bytes, _) = res?;
        st.stats.file_bytes = file_bytes;
        Ok(st.stats)
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

struct WriterThread {
    file: BufWriter<File>,
    offset: u64,
    chunks: Vec<ChunkEntry>,
    entries: Vec<IndexEntry>,
    compression: Compression,
    sync: bool,
    row_bytes: usize,
    top_k: usize,
    num_experts: usize,
    ranked_ok: bool,
    error: Arc<Mutex<Option<TraceError>>>,
    pool: Arc<BufferPool>,
    path: PathBuf,
    /// Buffers and the zstd context kept between chunks (no 1 MiB allocation per chunk).
    raw: Vec<u8>,
    ranked: Vec<u8>,
    packed: Vec<u8>,
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

/// Row buffers handed back by the background thread once written, reused by appends (no
/// allocation, page faults or cross-thread frees per append in steady state). Holds at most
/// [`POOL_BYTES`] of capacity.
#[derive(Debug, Default)]
struct BufferPool(Mutex<(Vec<Vec<u8>>, usize)>);

/// Most capacity (bytes) kept by a [`BufferPool`].
const POOL_BYTES: usize = 8 << 20;

impl BufferPool {
    /// An empty buffer, reused when one is available.
    fn take(&self) -> Vec<u8> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match g.0.pop() {
            Some(b) => {
                g.1 -= b.capacity();
                b
            }
            None => Vec::new(),
        }
    }
    /// Returns buffers (cleared) for reuse; those beyond the limit are freed.
    fn put(&self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for mut b in bufs {
            if g.1 + b.capacity() <= POOL_BYTES {
                b.clear();
                g.1 += b.capacity();
                g.0.push(b);
            }
        }
    }
}

/// Most runs in an uncompressed chunk written by gathering (`writev`); a chunk of more, smaller
/// runs is assembled into one buffer first (fewer, larger I/O slices).
const MAX_GATHER_RUNS: usize = 256;

/// `write_all` for a list of slices (`Write::write_all_vectored` is not stable).
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl WriterThread {
    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Chunk { index, pending } => {
                    if self.failed() {
                        continue;
                    }
                    if let Err(e) = self.write_chunk(index, pending) {
                        self.fail(e);
                    }
                }
                Job::Finish(reply) => {
                    let r = if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                        Err(e)
                    } else {
                        self.write_index()
                    };
                    let _ = reply.send(r);
                    return;
                }
            }
        }
        // Sender dropped without Finish (writer leaked): flush what we have.
        let _ = self.file.flush();
    }

    fn failed(&self) -> bool {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn fail(&self, e: TraceError) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    }

    fn write_chunk(&mut self, index: u32, pending: Pending) -> Result<(), TraceError> {
        // Block headers (varints), their ends in `heads`, and the runs, in payload order.
        let nruns: usize = pending.values().map(Vec::len).sum();
        let mut heads: Vec<u8> = Vec::with_capacity(16 * nruns);
        let mut head_ends: Vec<usize> = Vec::with_capacity(nruns);
        let mut runs: Vec<Vec<u8>> = Vec::with_capacity(nruns);
        let mut entries = Vec::with_capacity(nruns);
        let mut raw_len = 0usize;
        for ((seq, li), lane) in pending {
            for (start, bytes) in lane {
                let rows = bytes.len() / self.row_bytes;
                let h0 = heads.len();
                format::put_block(&mut heads, seq, li, start, &[], rows);
                raw_len += heads.len() - h0;
                entries.push(IndexEntry {
                    seq,
                    start,
                    layer_index: li,
                    rows: rows as u32,
                    chunk: index,
                    data_off: raw_len as u32,
                });
                raw_len += bytes.len();
                head_ends.push(heads.len());
                runs.push(bytes);
            }
        }
        let blocks = runs.len() as u32;
        let ctx = |e: std::io::Error| TraceError::io(format!("writing chunk {index} to {}", self.path.display()), &e);
        let stored_len = if self.compression == Compression::None && runs.len() <= MAX_GATHER_RUNS {
            // Uncompressed: the frame is gathered from the runs as they are (one `writev`, no
            // payload copy); the CRC32C runs over the same pieces.
            let head = format::chunk_header(index, format::CODEC_NONE, blocks, raw_len as u32, raw_len as u32);
            let mut crc = crc32c::crc32c(&head);
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * runs.len() + 2);
            slices.push(IoSlice::new(&head));
            let mut h0 = 0;
            for (run, &h1) in runs.iter().zip(&head_ends) {
                crc = crc32c::crc32c_append(crc, &heads[h0..h1]);
                crc = crc32c::crc32c_append(crc, run);
                slices.push(IoSlice::new(&heads[h0..h1]));
                slices.push(IoSlice::new(run));
                h0 = h1;
            }
            let tail = crc.to_le_bytes();
            slices.push(IoSlice::new(&tail));
            write_all_vectored(&mut self.file, &mut slices).map_err(ctx)?;
            drop(slices);
            self.pool.put(runs);
            raw_len
        } else {
            // Assemble the raw payload (buffer kept between chunks).
            let mut raw = std::mem::take(&mut self.raw);
            raw.clear();
            raw.reserve(raw_len);
            let mut h0 = 0;
            for (run, &h1) in runs.iter().zip(&head_ends) {
                raw.extend_from_slice(&heads[h0..h1]);
                raw.extend_from_slice(run);
                h0 = h1;
            }
            self.pool.put(runs);
            let r = self.write_assembled(index, blocks, &raw, &entries);
            self.raw = raw;
            r?
        };
        let frame_len = format::CHUNK_HEADER + stored_len + 4;
        self.chunks.push(ChunkEntry {
            offset: self.offset,
            frame_len: frame_len as u32,
            raw_len: raw_len as u32,
        });
        self.entries.extend(entries);
        self.offset += frame_len as u64;
        Ok(())
    }

    /// Compresses (per the options) and writes the frame of an assembled raw payload; returns
    /// the stored payload length.
    fn write_assembled(
        &mut self,
        index: u32,
        blocks: u32,
        raw: &[u8],
        entries: &[IndexEntry],
    ) -> Result<usize, TraceError> {
        let level = match self.compression {
            Compression::None => 0,
            Compression::Zstd(l) | Compression::ZstdRanked(l) => l,
        };
        let mut packed = std::mem::take(&mut self.packed);
        let codec = match self.compression {
            Compression::None => format::CODEC_NONE,
            Compression::Zstd(_) => {
                self.compress(index, level, raw, &mut packed)?;
                if packed.len() < raw.len() {
                    format::CODEC_ZSTD
                } else {
                    format::CODEC_NONE
                }
            }
            Compression::ZstdRanked(_) => {
                let mut t = std::mem::take(&mut self.ranked);
                t.clear();
                t.extend_from_slice(raw);
                let (k, e) = (self.top_k, self.num_experts);
                if self.ranked_ok {
                    for en in entries {
                        let a = en.data_off as usize;
                        format::rank_encode(&mut t[a..a + en.rows as usize * self.row_bytes], k, e);
                    }
                }
                let r = self.compress(index, level, &t, &mut packed);
                self.ranked = t;
                r?;
                if packed.len() >= raw.len() {
                    format::CODEC_NONE
                } else if self.ranked_ok {
                    format::CODEC_RANK_ZSTD
                } else {
                    format::CODEC_ZSTD
                }
            }
        };
        let stored: &[u8] = if codec == format::CODEC_NONE { raw } else { &packed };
        // Frame = header, stored payload, CRC32C of both; written without another copy.
        let head = format::chunk_header(index, codec, blocks, raw.len() as u32, stored.len() as u32);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), stored);
        let ctx = |e: std::io::Error| TraceError::io(format!("writing chunk {index} to {}", self.path.display()), &e);
        let r = self
            .file
            .write_all(&head)
            .and_then(|_| self.file.write_all(stored))
            .and_then(|_| self.file.write_all(&crc.to_le_bytes()))
            .map_err(ctx);
        let stored_len = stored.len();
        self.packed = packed;
        r?;
        Ok(stored_len)
    }

    /// One zstd frame of `src` into `dst` (replaced), with a compression context kept between
    /// chunks.
    fn compress(&mut self, index: u32, level: i32, src: &[u8], dst: &mut Vec<u8>) -> Result<(), TraceError> {
        let err = |e: std::io::Error| TraceError::io(format!("compressing chunk {index}"), &e);
        if self.zstd.as_ref().is_none_or(|(l, _)| *l != level) {
            self.zstd = Some((level, zstd::bulk::Compressor::new(level).map_err(err)?));
        }
        let Some((_, c)) = self.zstd.as_mut() else {
            return Err(TraceError::WriterClosed("no compression context".into()));
        };
        dst.clear();
        dst.reserve(zstd::zstd_safe::compress_bound(src.len()));
        c.compress_to_buffer(src, dst).map_err(err)?;
        Ok(())
    }

    fn write_index(&mut self) -> Result<(u64, u64), TraceError> {
        let bytes = format::encode_index(&self.chunks, &self.entries, self.offset);
        let ctx = |e: std::io::Error| TraceError::io(format!("writing index of {}", self.path.display()), &e);
        self.file.write_all(&bytes).map_err(ctx)?;
        self.file.flush().map_err(ctx)?;
        if self.sync {
            self.file.get_ref().sync_all().map_err(ctx)?;
        }
        self.offset += bytes.len() as u64;
        Ok((self.offset, self.chunks.len() as u64))
    }
}
