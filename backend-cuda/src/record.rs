//! Recording without stalling: the routing thread only takes a pinned buffer from the pool
//! (and, for ids that may still be being written, records an event on the routing stream). A
//! starting thread enqueues each record's copy into its pinned buffer on a side stream as soon as
//! the record arrives, so copies run back to back on the copy engine; a delivering thread waits
//! for each copy in order, hands the sink a view of the pinned buffer (no host copy) and returns
//! the buffer to the pool when the sink is done. The routing stream never waits, and the routing
//! thread makes at most one driver call per record.
//!
//! The hot path allocates nothing: the pool holds at most [`MAX_SLOTS`] pinned buffers, each with
//! its two events (created once), and a buffer is (re)allocated only while the pool is still
//! filling or when a call needs more rows than any free buffer holds. When every buffer is in
//! flight (the copies or the sinks are slower than the routing loop), `record` waits for the
//! oldest one to come back instead of allocating without bound.

use crate::buffers::DeviceIds;
use crate::device::{Device, dev_err};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use moe_router_core::{IdsSink, RouteError};
use ndarray::ArrayView2;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Pinned buffers in the pool at most (records in flight at once).
const MAX_SLOTS: usize = 4;
/// Smallest pinned buffer, in ids.
const MIN_SLOT_IDS: usize = 1024;

/// One pinned buffer and its events: `ready` (recorded on the routing stream when the ids may
/// still be being written, waited for by the side stream) and `done` (recorded on the side
/// stream after the copy, waited for by the delivery thread).
struct Slot {
    pinned: PinnedHostSlice<u32>,
    ready: CudaEvent,
    done: CudaEvent,
}

#[derive(Default)]
struct PoolState {
    free: Vec<Slot>,
    /// Slots that exist (free or in flight).
    total: usize,
}

#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    returned: Condvar,
}

impl Pool {
    fn give_back(&self, slot: Slot) {
        if let Ok(mut s) = self.state.lock() {
            s.free.push(slot);
        }
        self.returned.notify_one();
    }
}

/// What asynchronous recording ([`Router::record_ids`](moe_router_core::Router::record_ids)) has
/// cost on one router so far ([`CudaRouter::record_stats`](crate::CudaRouter::record_stats)):
/// where a recording loop's time goes when recording slows it down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordStats {
    /// Records delivered to their sinks.
    pub delivered: u64,
    /// Ids delivered (rows × K over all records).
    pub ids: u64,
    /// Time the routing thread waited in `record_ids` for a free pinned buffer (every buffer in
    /// flight: the copies or the sinks are slower than the routing loop).
    pub backpressure: Duration,
    /// Delivery thread: time spent waiting for device-to-host copies to finish.
    pub copy_wait: Duration,
    /// Delivery thread: time spent in the sinks (which read the ids in place, from pinned
    /// memory).
    pub sinks: Duration,
}

/// [`RecordStats`] as counters both threads add to (nanoseconds).
#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    ids: AtomicU64,
    backpressure: AtomicU64,
    copy_wait: AtomicU64,
    sinks: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, since: Instant) -> Instant {
        let now = Instant::now();
        c.fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
        now
    }

    fn snapshot(&self) -> RecordStats {
        let d = |c: &AtomicU64| Duration::from_nanos(c.load(Ordering::Relaxed));
        RecordStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            ids: self.ids.load(Ordering::Relaxed),
            backpressure: d(&self.backpressure),
            copy_wait: d(&self.copy_wait),
            sinks: d(&self.sinks),
        }
    }
}

/// A record on its way: the buffer it is copied into, the device ids (kept alive until the copy
/// has completed) and where they go.
struct Record {
    slot: Slot,
    ids: Arc<CudaSlice<u32>>,
    rows: usize,
    k: usize,
    /// The side stream must wait for `slot.ready` (the ids may still be being written).
    after_ready: bool,
    sink: IdsSink,
}

enum Job {
    Copy(Record),
    Flush(SyncSender<()>),
}

/// The side stream, the pinned-buffer pool and the delivery thread of one router.
pub(crate) struct Recorder {
    pool: Arc<Pool>,
    tx: Option<Sender<Job>>,
    /// The starting thread, then the delivering thread.
    workers: Vec<JoinHandle<()>>,
    failed: Arc<Mutex<Option<String>>>,
    counters: Arc<Counters>,
    dev: Arc<Device>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

fn fail(failed: &Mutex<Option<String>>, why: String) {
    if let Ok(mut f) = failed.lock()
        && f.is_none()
    {
        *f = Some(why);
    }
}

/// What the two record threads share: the side stream, the pool slots go back to, and what
/// they report.
struct Delivery {
    dev: Arc<Device>,
    side: Arc<CudaStream>,
    pool: Arc<Pool>,
    failed: Arc<Mutex<Option<String>>>,
    counters: Arc<Counters>,
}

impl Delivery {
    /// Enqueues the copy of `r`'s ids into its pinned buffer on the side stream, then `done`.
    fn start(&self, r: &mut Record) -> Result<(), RouteError> {
        let n = r.rows * r.k;
        if r.after_ready {
            self.side.wait(&r.slot.ready).map_err(dev_err)?;
        }
        if n > 0 {
            let host = r.slot.pinned.as_mut_slice().map_err(dev_err)?;
            let (src, _guard) = r.ids.device_ptr(&self.side);
            // SAFETY: `host[..n]` is pinned memory of the slot, read only after `done`
            // completes; `src` holds at least n u32, kept alive by the record until then. The
            // ids are complete or the side stream waits for the routing stream (`ready`).
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..n], src, self.side.cu_stream()) }
                .map_err(dev_err)?;
        }
        r.slot.done.record(&self.side).map_err(dev_err)
    }

    /// Waits for `r`'s copy, hands the ids in the pinned buffer to the sink (a view: nothing is
    /// copied here) and returns the buffer to the pool once the sink is done with it.
    fn deliver(&self, r: Record) {
        let c = &self.counters;
        let t0 = Instant::now();
        let waited = r.slot.done.synchronize();
        let t1 = Counters::add(&c.copy_wait, t0);
        drop(r.ids);
        let n = r.rows * r.k;
        let pinned = waited.and_then(|()| r.slot.pinned.as_slice());
        match pinned.map(|s| ArrayView2::from_shape((r.rows, r.k), &s[..n])) {
            Ok(Ok(view)) => {
                // A panicking sink fails later records with its message instead of stopping
                // this thread (and every record after it) silently.
                let sink = r.sink;
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(view)));
                if let Err(p) = res {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-string panic".into());
                    fail(&self.failed, format!("an ids sink panicked: {msg}"));
                }
            }
            Ok(Err(e)) => fail(
                &self.failed,
                format!("recorded ids of shape [{}, {}]: {e}", r.rows, r.k),
            ),
            Err(e) => fail(&self.failed, format!("{e:?}")),
        }
        Counters::add(&c.sinks, t1);
        self.pool.give_back(r.slot);
        c.delivered.fetch_add(1, Ordering::Relaxed);
        c.ids.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The starting thread: binds the device, then enqueues each record's copy as soon as it
    /// arrives (copies run back to back on the side stream, overlapping the delivery of earlier
    /// records) and passes every job on to the delivering thread, in order.
    fn start_all(&self, rx: Receiver<Job>, out: Sender<Job>) {
        if let Err(e) = self.dev.ctx.bind_to_thread() {
            fail(&self.failed, format!("the record thread cannot use the device: {e:?}"));
        }
        for job in rx {
            let job = match job {
                Job::Copy(mut r) => match self.start(&mut r) {
                    Ok(()) => Job::Copy(r),
                    Err(e) => {
                        // Nothing that reads the slot is left in flight after a failure once
                        // the side stream has drained: reuse it.
                        let _ = self.side.synchronize();
                        self.pool.give_back(r.slot);
                        fail(&self.failed, format!("{e}"));
                        continue;
                    }
                },
                flush => flush,
            };
            if out.send(job).is_err() {
                return;
            }
        }
    }

    /// The delivering thread: waits for each copy in order and hands it to its sink; a flush
    /// is acknowledged once everything sent before it was delivered.
    fn deliver_all(&self, rx: Receiver<Job>) {
        if let Err(e) = self.dev.ctx.bind_to_thread() {
            fail(&self.failed, format!("the record thread cannot use the device: {e:?}"));
        }
        for job in rx {
            match job {
                Job::Copy(r) => self.deliver(r),
                Job::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

impl Recorder {
    pub fn new(dev: Arc<Device>) -> Result<Self, RouteError> {
        let side = dev.ctx.new_stream().map_err(dev_err)?;
        let pool = Arc::new(Pool::default());
        let failed = Arc::new(Mutex::new(None));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = channel();
        let (to_deliver, delivered) = channel();
        let delivery = Arc::new(Delivery {
            dev: dev.clone(),
            side,
            pool: pool.clone(),
            failed: failed.clone(),
            counters: counters.clone(),
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| RouteError::Recorder {
                    reason: format!("cannot start the record thread: {e}"),
                })
        };
        let d = delivery.clone();
        let deliverer = spawn("moe-router-cuda-deliver", Box::new(move || d.deliver_all(delivered)))?;
        let starter = spawn(
            "moe-router-cuda-record",
            Box::new(move || delivery.start_all(rx, to_deliver)),
        )?;
        Ok(Recorder {
            pool,
            tx: Some(tx),
            workers: vec![starter, deliverer],
            failed,
            counters,
            dev,
        })
    }

    /// What recording has cost so far.
    pub fn stats(&self) -> RecordStats {
        self.counters.snapshot()
    }

    fn stopped() -> RouteError {
        RouteError::Recorder {
            reason: "the record thread stopped".into(),
        }
    }

    /// Pinned memory for `n` ids (not write-combined: the host reads it).
    fn pinned(&self, n: usize) -> Result<PinnedHostSlice<u32>, RouteError> {
        // SAFETY: the contents are uninitialised until the copy into it completes; the worker
        // reads them only after waiting for that copy's event.
        unsafe { self.dev.ctx.alloc_pinned_with_flags::<u32>(n.max(MIN_SLOT_IDS), 0) }.map_err(dev_err)
    }

    fn new_slot(&self, n: usize) -> Result<Slot, RouteError> {
        // The delivery thread sleeps on `done` instead of spinning a host core for the copy.
        Ok(Slot {
            pinned: self.pinned(n)?,
            ready: self.dev.ctx.new_event(None).map_err(dev_err)?,
            done: self
                .dev
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(dev_err)?,
        })
    }

    /// A free slot of at least `n` ids: a free one that fits; else a new one while the pool has
    /// fewer than [`MAX_SLOTS`]; else a free one regrown; else (all in flight) the next one the
    /// worker returns.
    fn take(&self, n: usize) -> Result<Slot, RouteError> {
        let poisoned = || RouteError::Recorder {
            reason: "its pool lock is poisoned (a thread panicked while recording)".into(),
        };
        let mut st = self.pool.state.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(i) = st.free.iter().position(|s| s.pinned.len() >= n) {
                return Ok(st.free.swap_remove(i));
            }
            if st.total < MAX_SLOTS {
                st.total += 1;
                drop(st);
                let s = self.new_slot(n);
                if s.is_err()
                    && let Ok(mut st) = self.pool.state.lock()
                {
                    st.total -= 1;
                }
                return s;
            }
            if let Some(mut s) = st.free.pop() {
                drop(st);
                s.pinned = match self.pinned(n) {
                    Ok(p) => p,
                    Err(e) => {
                        self.pool.give_back(s);
                        return Err(e);
                    }
                };
                return Ok(s);
            }
            if self.workers.iter().any(|w| w.is_finished()) {
                return Err(Self::stopped());
            }
            let t0 = Instant::now();
            st = self
                .pool
                .returned
                .wait_timeout(st, Duration::from_millis(100))
                .map_err(|_| poisoned())?
                .0;
            Counters::add(&self.counters.backpressure, t0);
        }
    }

    /// Sends `ids` to the delivery thread, which copies them to the host and hands them to
    /// `sink`. One driver call here at most: an event on the routing stream when the ids may
    /// still be being written.
    pub fn record(&self, ids: &DeviceIds, sink: IdsSink) -> Result<(), RouteError> {
        if let Ok(f) = self.failed.lock()
            && let Some(e) = f.as_ref()
        {
            return Err(RouteError::Recorder {
                reason: format!("an earlier recording failed: {e}"),
            });
        }
        let (rows, k) = ids.dim();
        let slot = self.take(rows * k)?;
        let after_ready = !ids.complete;
        if after_ready && let Err(e) = slot.ready.record(&self.dev.stream) {
            self.pool.give_back(slot);
            return Err(dev_err(e));
        }
        let job = Job::Copy(Record {
            slot,
            ids: ids.buf.clone(),
            rows,
            k,
            after_ready,
            sink,
        });
        self.tx
            .as_ref()
            .and_then(|t| t.send(job).ok())
            .ok_or_else(Self::stopped)
    }

    /// Waits until every job sent so far was delivered.
    pub fn flush(&self) -> Result<(), RouteError> {
        let (ack_tx, ack_rx) = sync_channel(1);
        self.tx
            .as_ref()
            .and_then(|t| t.send(Job::Flush(ack_tx)).ok())
            .ok_or_else(Self::stopped)?;
        ack_rx.recv().map_err(|_| Self::stopped())?;
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(e) => Err(RouteError::Recorder {
                reason: format!("a recording failed: {e}"),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Closing the channel ends the starting thread, which closes the delivering one's.
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
