//! The streaming `.mrt` writer: appends are copied into per-lane buffers under a short lock;
//! full (or old enough) chunks are compressed, checksummed and written by a background thread.

use super::codec::RowCodec;
use super::file::TraceFile;
use super::format::{self, Block, ChunkEntry, IndexEntry};
use super::{TraceError, TraceHeader};
use moe_router_core::layout::{LayerId, SeqId};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::{BufWriter, IoSlice, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default limit of id bytes per chunk (1 MiB).
pub const DEFAULT_CHUNK_ID_BYTES: usize = 1 << 20;

/// Default age after which a chunk is closed even when it is not full (1 s).
pub const DEFAULT_CHUNK_MAX_AGE: Duration = Duration::from_secs(1);

/// Default compression: [`Compression::Zstd`] at level 3.
pub const DEFAULT_COMPRESSION: Compression = Compression::Zstd(3);

/// Per-chunk compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Chunks are stored as is.
    None,
    /// Each chunk is one zstd frame at this level (1–22; 3, the default
    /// [`DEFAULT_COMPRESSION`], is a good trade-off). A chunk that does not shrink is stored
    /// uncompressed.
    Zstd(i32),
    /// The row-rank transform (ids that repeat the previous row's experts become small numbers;
    /// see `docs/trace-format.md`) then zstd at this level: 25–35% smaller than plain zstd on
    /// correlated routes. Applies to one-byte ids (E ≤ 256); two-byte traces use plain zstd.
    ZstdRanked(i32),
}

impl Default for Compression {
    /// [`DEFAULT_COMPRESSION`]: zstd at level 3.
    fn default() -> Self {
        DEFAULT_COMPRESSION
    }
}

/// Writer settings.
///
/// Rows wait in memory until their chunk is closed and handed to the background thread, which
/// writes it (and hands it to the operating system) at once. A chunk is closed when the first
/// of two budgets is spent: [`WriterOptions::chunk_id_bytes`] of ids (a row budget: rows × K ×
/// id width) or [`WriterOptions::chunk_max_age`] since its first row. With the defaults, a
/// process crash loses at most the last ~1 s or 1 MiB of ids, whichever is less, plus chunks
/// still queued behind a disk or compressor that falls behind (at most 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterOptions {
    /// Most id bytes per chunk (default 1 MiB): the row budget of a chunk. Raised to one row
    /// when smaller.
    pub chunk_id_bytes: usize,
    /// Time budget of a chunk (default [`DEFAULT_CHUNK_MAX_AGE`], 1 s): a chunk whose first row
    /// was appended this long ago is closed by the next append or, when none comes, by the
    /// background thread within a quarter of this time. `None`: chunks close on the row budget,
    /// [`TraceWriter::flush`] and [`TraceWriter::finish`] only.
    pub chunk_max_age: Option<Duration>,
    /// Per-chunk compression (default zstd level 3; a chunk that compression does not make
    /// smaller is stored uncompressed).
    pub compression: Compression,
    /// Call `fsync` when the writer finishes.
    pub sync_on_finish: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_id_bytes: DEFAULT_CHUNK_ID_BYTES,
            chunk_max_age: Some(DEFAULT_CHUNK_MAX_AGE),
            compression: DEFAULT_COMPRESSION,
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
    /// Default options without compression (every chunk stored as is: one byte or two per id).
    pub fn uncompressed() -> Self {
        WriterOptions {
            compression: Compression::None,
            ..WriterOptions::default()
        }
    }
    /// Sets the chunk limit in id bytes.
    pub fn with_chunk_id_bytes(mut self, n: usize) -> Self {
        self.chunk_id_bytes = n;
        self
    }
    /// Sets the time budget of a chunk (`None`: no time budget).
    pub fn with_chunk_max_age(mut self, age: Option<Duration>) -> Self {
        self.chunk_max_age = age;
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
    /// When the first pending row was queued (`None` while nothing is pending).
    oldest: Option<Instant>,
    next_chunk: u32,
    coverage: HashMap<(SeqId, LayerId), Coverage>,
    stats: WriterStats,
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    closed: bool,
}

impl State {
    /// Closes the pending chunk: takes its rows and gives it the next chunk index (`None` when
    /// nothing is pending).
    fn close_chunk(&mut self) -> Result<Option<(u32, Pending)>, TraceError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let index = self.next_chunk;
        self.next_chunk = self
            .next_chunk
            .checked_add(1)
            .ok_or_else(|| TraceError::WriterClosed("more than 2^32 chunks".into()))?;
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.oldest = None;
        self.stats.chunks += 1;
        Ok(Some((index, pending)))
    }

    /// True when the pending chunk is older than `age`.
    fn aged(&self, age: Option<Duration>) -> bool {
        matches!((age, self.oldest), (Some(a), Some(t0)) if t0.elapsed() >= a)
    }
}

/// Streams a trace into a `.mrt` file. Thread-safe: several threads (layers) may append to one
/// writer; each append validates and copies its rows under a short lock, and closed chunks (full,
/// or older than [`WriterOptions::chunk_max_age`]) are compressed, checksummed and written by a
/// background thread (bounded queue: a slow disk makes appends wait instead of growing memory).
///
/// New files are written in format 2.0: the rows of one sequence at consecutive layers with the
/// same positions share one block, so decode-style recording (many sequences × layers, a few
/// rows each per chunk) stays near one byte per id uncompressed. Appending to a 1.x file
/// ([`TraceWriter::append_to`]) keeps writing format 1.0, so that the file stays one version.
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
    state: Arc<Mutex<State>>,
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
            Resume {
                major: format::VERSION_MAJOR,
                offset: h.len() as u64,
                next_chunk: 0,
                chunks: Vec::new(),
                entries: Vec::new(),
                coverage: HashMap::new(),
            },
        ))
    }

    /// Opens an existing trace file to append more rows (multi-turn, partial-rollout resume, or
    /// after a crash). The file is recovered as by [`TraceFile::open`] (a torn tail is cut off,
    /// the old index is removed and rewritten on finish); `header` must match the file's up to
    /// the producer. Positions already in the file count as written (first write wins). The file
    /// keeps its format version: new chunks and the index of a 1.x file are written in format
    /// 1.0.
    pub fn append_to(path: impl AsRef<Path>, header: &TraceHeader, opts: WriterOptions) -> Result<Self, TraceError> {
        let path = path.as_ref().to_path_buf();
        let (hdr, major, chunks, entries, end, coverage) = {
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
            let major = tf.format_version().0;
            (tf.header().clone(), major, chunks, entries, tf.data_end(), cov)
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| TraceError::io(format!("opening {} for append", path.display()), &e))?;
        f.set_len(end)
            .and_then(|_| f.seek(SeekFrom::Start(end)))
            .map_err(|e| TraceError::io(format!("truncating {} to {end} bytes", path.display()), &e))?;
        let resume = Resume {
            major,
            offset: end,
            next_chunk: chunks.len() as u32,
            chunks,
            entries,
            coverage,
        };
        let mut w = Self::start(path, f, hdr, opts, resume);
        w.header = header.clone().with_producer(header.producer());
        Ok(w)
    }

    fn start(path: PathBuf, f: File, header: TraceHeader, opts: WriterOptions, resume: Resume) -> Self {
        let Resume {
            major,
            offset,
            next_chunk,
            chunks,
            entries,
            coverage,
        } = resume;
        let codec = RowCodec::new(&header);
        let limit = opts.chunk_id_bytes.max(codec.row_bytes());
        let error = Arc::new(Mutex::new(None));
        let pool = Arc::new(BufferPool::default());
        let (tx, rx) = sync_channel::<Job>(QUEUED_CHUNKS);
        let mut stats = WriterStats {
            chunks: u64::from(next_chunk),
            ..WriterStats::default()
        };
        stats.file_bytes = 0;
        let state = Arc::new(Mutex::new(State {
            pending: BTreeMap::new(),
            pending_bytes: 0,
            oldest: None,
            next_chunk,
            coverage,
            stats,
            tx: None,
            thread: None,
            closed: false,
        }));
        let ctx = WriterThread {
            file: BufWriter::with_capacity(1 << 20, f),
            major,
            offset,
            chunks,
            entries,
            compression: opts.compression,
            sync: opts.sync_on_finish,
            row_bytes: codec.row_bytes(),
            top_k: header.top_k(),
            num_experts: header.num_experts(),
            ranked_ok: header.id_width() == super::IdWidth::U8 && !header.slot_sentinels(),
            error: error.clone(),
            pool: pool.clone(),
            path: path.clone(),
            raw: Vec::new(),
            ranked: Vec::new(),
            packed: Vec::new(),
            zstd: None,
            state: Arc::downgrade(&state),
            max_age: opts.chunk_max_age,
            backlog: VecDeque::new(),
        };
        let thread = std::thread::Builder::new()
            .name("mrt-writer".into())
            .spawn(move || ctx.run(rx))
            .ok();
        {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.tx = thread.as_ref().map(|_| tx);
            st.thread = thread;
        }
        TraceWriter {
            header,
            codec,
            opts,
            limit,
            path,
            state,
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
                if st.oldest.is_none() {
                    st.oldest = Some(Instant::now());
                }
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
        if st.aged(self.opts.chunk_max_age) {
            self.flush_locked(&mut st)?;
        }
        Ok(st.stats)
    }

    fn flush_locked(&self, st: &mut State) -> Result<(), TraceError> {
        let Some((index, pending)) = st.close_chunk()? else {
            return Ok(());
        };
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

/// Where a writer starts: a new file, or the recovered state of an existing one.
struct Resume {
    /// Format major version to write (the file's, when appending).
    major: u16,
    /// Where the next chunk goes.
    offset: u64,
    next_chunk: u32,
    chunks: Vec<ChunkEntry>,
    entries: Vec<IndexEntry>,
    coverage: HashMap<(SeqId, LayerId), Coverage>,
}

/// Closed chunks queued for the background thread at most (appends wait beyond that).
const QUEUED_CHUNKS: usize = 4;

struct WriterThread {
    file: BufWriter<File>,
    /// Format major version written (blocks and index).
    major: u16,
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
    /// The writer's state, to close a chunk that grew older than `max_age` while no append
    /// came (a `Weak`: the thread never keeps a dropped writer alive).
    state: Weak<Mutex<State>>,
    max_age: Option<Duration>,
    /// Jobs taken from the queue when closing an aged chunk, to be done before it (in order).
    backlog: VecDeque<Job>,
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
        // The pending chunk is checked four times per time budget: it is closed at most a
        // quarter of the budget late when no append comes to close it.
        let tick = self.max_age.map(|a| (a / 4).max(Duration::from_millis(1)));
        loop {
            let job = match self.backlog.pop_front() {
                Some(j) => j,
                None => match tick {
                    None => match rx.recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    },
                    Some(t) => match rx.recv_timeout(t) {
                        Ok(j) => j,
                        Err(RecvTimeoutError::Timeout) => {
                            self.close_aged_chunk(&rx);
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    },
                },
            };
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

    /// Closes the writer's pending chunk when it is older than the time budget and no append
    /// came to close it. The chunk gets the next index under the writer's lock, so every chunk
    /// queued before it (taken from the queue here, while the lock keeps appends from queueing
    /// more) is written first. Skipped when the lock is busy: an append holds it and checks
    /// the age itself.
    fn close_aged_chunk(&mut self, rx: &Receiver<Job>) {
        let Some(state) = self.state.upgrade() else {
            return;
        };
        let mut st = match state.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if st.closed || !st.aged(self.max_age) {
            return;
        }
        let closed = st.close_chunk();
        while let Ok(j) = rx.try_recv() {
            self.backlog.push_back(j);
        }
        drop(st);
        match closed {
            Ok(Some((index, pending))) => self.backlog.push_back(Job::Chunk { index, pending }),
            Ok(None) => {}
            Err(e) => self.fail(e),
        }
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

    /// Groups the pending rows of a chunk into blocks, in payload order: each (sequence, layer)
    /// run is a block, and in format 2 the single runs of one sequence at consecutive layers
    /// with the same positions share one block (decode steps, packed prefill). Returns the
    /// blocks (data offsets not yet set) and, per block, its runs in layer order.
    fn group_blocks(&self, pending: Pending) -> Vec<(Block, Vec<Vec<u8>>)> {
        let group = self.major >= format::VERSION_MAJOR;
        let mut blocks: Vec<(Block, Vec<Vec<u8>>)> = Vec::new();
        // Whether the last block may take the next layer's run.
        let mut open = false;
        for ((seq, li), lane) in pending {
            let single = lane.len() == 1;
            for (start, bytes) in lane {
                let rows = (bytes.len() / self.row_bytes) as u32;
                if let Some((b, runs)) = blocks.last_mut()
                    && group
                    && open
                    && single
                    && b.seq == seq
                    && b.layer_index + b.layers == li
                    && b.start == start
                    && b.rows == rows
                {
                    b.layers += 1;
                    runs.push(bytes);
                    continue;
                }
                let b = Block {
                    seq,
                    layer_index: li,
                    layers: 1,
                    start,
                    rows,
                    data_off: 0,
                };
                blocks.push((b, vec![bytes]));
            }
            open = single;
        }
        blocks
    }

    fn write_chunk(&mut self, index: u32, pending: Pending) -> Result<(), TraceError> {
        // Block headers (varints), their ends in `heads`, and the blocks' runs, in payload order.
        let blocks = self.group_blocks(pending);
        let mut heads: Vec<u8> = Vec::with_capacity(16 * blocks.len());
        let mut head_ends: Vec<usize> = Vec::with_capacity(blocks.len());
        let mut entries = Vec::with_capacity(blocks.len());
        let mut block_runs: Vec<Vec<Vec<u8>>> = Vec::with_capacity(blocks.len());
        let mut raw_len = 0usize;
        for (mut b, runs) in blocks {
            let h0 = heads.len();
            format::put_block_header(&mut heads, self.major, &b);
            raw_len += heads.len() - h0;
            b.data_off = raw_len as u32;
            entries.push(IndexEntry::of_block(&b, index));
            raw_len += runs.iter().map(Vec::len).sum::<usize>();
            head_ends.push(heads.len());
            block_runs.push(runs);
        }
        let nblocks = block_runs.len() as u32;
        let nruns: usize = block_runs.iter().map(Vec::len).sum();
        let path = self.path.clone();
        let ctx = |e: std::io::Error| TraceError::io(format!("writing chunk {index} to {}", path.display()), &e);
        let stored_len = if self.compression == Compression::None && nruns <= MAX_GATHER_RUNS {
            // Uncompressed: the frame is gathered from the runs as they are (one `writev`, no
            // payload copy); the CRC32C runs over the same pieces.
            let head = format::chunk_header(index, format::CODEC_NONE, nblocks, raw_len as u32, raw_len as u32);
            let mut crc = crc32c::crc32c(&head);
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(block_runs.len() + nruns + 2);
            slices.push(IoSlice::new(&head));
            let mut h0 = 0;
            for (runs, &h1) in block_runs.iter().zip(&head_ends) {
                crc = crc32c::crc32c_append(crc, &heads[h0..h1]);
                slices.push(IoSlice::new(&heads[h0..h1]));
                for run in runs {
                    crc = crc32c::crc32c_append(crc, run);
                    slices.push(IoSlice::new(run));
                }
                h0 = h1;
            }
            let tail = crc.to_le_bytes();
            slices.push(IoSlice::new(&tail));
            write_all_vectored(&mut self.file, &mut slices).map_err(ctx)?;
            drop(slices);
            self.pool.put(block_runs.into_iter().flatten());
            raw_len
        } else {
            // Assemble the raw payload (buffer kept between chunks).
            let mut raw = std::mem::take(&mut self.raw);
            raw.clear();
            raw.reserve(raw_len);
            let mut h0 = 0;
            for (runs, &h1) in block_runs.iter().zip(&head_ends) {
                raw.extend_from_slice(&heads[h0..h1]);
                for run in runs {
                    raw.extend_from_slice(run);
                }
                h0 = h1;
            }
            self.pool.put(block_runs.into_iter().flatten());
            let r = self.write_assembled(index, nblocks, &raw, &entries);
            self.raw = raw;
            r?
        };
        // Hand the chunk to the operating system now: a process crash then loses only the
        // chunks not yet closed or still queued.
        self.file.flush().map_err(ctx)?;
        let frame_len = format::CHUNK_HEADER + stored_len + 4;
        self.chunks.push(ChunkEntry {
            offset: self.offset,
            frame_len: frame_len as u32,
            raw_len: raw_len as u32,
            blocks: nblocks,
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
                    // The transform restarts for the rows of each layer of each block.
                    for en in entries {
                        let b = en.block();
                        for j in 0..b.layers {
                            let a = b.layer_data_off(j, self.row_bytes);
                            format::rank_encode(&mut t[a..a + b.rows as usize * self.row_bytes], k, e);
                        }
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
        let bytes = format::encode_index(&self.chunks, &self.entries, self.offset, self.major);
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
