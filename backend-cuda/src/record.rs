//! Recording without stalling: ids are copied into pinned host memory on a side stream that
//! waits on an event of the routing stream; a worker thread waits for the copy, hands a host
//! array to the sink and returns the pinned buffer to the pool. The routing stream never waits.
//!
//! The hot path allocates nothing: the pool holds at most [`MAX_SLOTS`] pinned buffers, each with
//! its two events (created once), and a buffer is (re)allocated only while the pool is still
//! filling or when a call needs more rows than any free buffer holds. When every buffer is in
//! flight (the sinks are slower than the routing loop), `record` waits for the oldest one to come
//! back instead of allocating without bound.

use crate::buffers::DeviceIds;
use crate::device::{Device, dev_err};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use moe_router_core::{IdsSink, RouteError};
use ndarray::Array2;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Pinned buffers in the pool at most (records in flight at once).
const MAX_SLOTS: usize = 4;
/// Smallest pinned buffer, in ids.
const MIN_SLOT_IDS: usize = 1024;

/// One pinned buffer and its events: `ready` (recorded on the routing stream, waited for by the
/// side stream) and `done` (recorded on the side stream after the copy, waited for by the worker).
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

enum Job {
    Copy {
        slot: Slot,
        // Keeps the device buffer alive until its copy has completed.
        _keep: Arc<CudaSlice<u32>>,
        rows: usize,
        k: usize,
        sink: IdsSink,
    },
    Flush(SyncSender<()>),
}

/// The side stream, the pinned-buffer pool and the delivery thread of one router.
pub(crate) struct Recorder {
    dev: Arc<Device>,
    side: Arc<CudaStream>,
    pool: Arc<Pool>,
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    failed: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

/// The first `n` ids of `src` as an owned vector. One thread: measured on the lent H200 host,
/// a 2 MiB copy takes ~16 µs into memory the allocator reuses, while spreading it over threads
/// (or zeroing fresh memory first) costs more in wake-ups and page faults than it saves.
fn copy_out(src: &[u32], n: usize) -> Vec<u32> {
    src[..n].to_vec()
}

fn fail(failed: &Mutex<Option<String>>, why: String) {
    if let Ok(mut f) = failed.lock()
        && f.is_none()
    {
        *f = Some(why);
    }
}

fn worker(rx: Receiver<Job>, pool: Arc<Pool>, failed: Arc<Mutex<Option<String>>>) {
    for job in rx {
        match job {
            Job::Flush(ack) => {
                let _ = ack.send(());
            }
            Job::Copy {
                slot,
                _keep,
                rows,
                k,
                sink,
            } => {
                // Wait for the copy (recorded on the side stream), then read the pinned buffer.
                let ids = slot
                    .done
                    .synchronize()
                    .and_then(|()| slot.pinned.as_slice())
                    .map(|s| copy_out(s, rows * k));
                drop(_keep);
                pool.give_back(slot);
                match ids {
                    Ok(v) => match Array2::from_shape_vec((rows, k), v) {
                        Ok(a) => {
                            // A panicking sink fails later records with its message instead of
                            // stopping this thread (and every record after it) silently.
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(a)));
                            if let Err(p) = r {
                                let msg = p
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| p.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "a non-string panic".into());
                                fail(&failed, format!("an ids sink panicked: {msg}"));
                            }
                        }
                        Err(e) => fail(&failed, format!("recorded ids of shape [{rows}, {k}]: {e}")),
                    },
                    Err(e) => fail(&failed, format!("{e:?}")),
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
        let (tx, rx) = channel();
        let (p2, f2) = (pool.clone(), failed.clone());
        let worker = std::thread::Builder::new()
            .name("moe-router-cuda-record".into())
            .spawn(move || worker(rx, p2, f2))
            .map_err(|e| RouteError::Recorder {
                reason: format!("cannot start the record thread: {e}"),
            })?;
        Ok(Recorder {
            dev,
            side,
            pool,
            tx: Some(tx),
            worker: Some(worker),
            failed,
        })
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
        Ok(Slot {
            pinned: self.pinned(n)?,
            ready: self.dev.ctx.new_event(None).map_err(dev_err)?,
            done: self.dev.ctx.new_event(None).map_err(dev_err)?,
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
            if self.worker.as_ref().is_none_or(|w| w.is_finished()) {
                return Err(Self::stopped());
            }
            st = self
                .pool
                .returned
                .wait_timeout(st, Duration::from_millis(100))
                .map_err(|_| poisoned())?
                .0;
        }
    }

    /// Starts copying `ids` to the host and delivers them to `sink` when the copy is done.
    pub fn record(&self, ids: &DeviceIds, sink: IdsSink) -> Result<(), RouteError> {
        if let Ok(f) = self.failed.lock()
            && let Some(e) = f.as_ref()
        {
            return Err(RouteError::Recorder {
                reason: format!("an earlier recording failed: {e}"),
            });
        }
        let (rows, k) = ids.dim();
        let n = rows * k;
        let mut slot = self.take(n)?;
        let enqueue = |slot: &mut Slot| -> Result<(), RouteError> {
            slot.ready.record(&self.dev.stream).map_err(dev_err)?;
            self.side.wait(&slot.ready).map_err(dev_err)?;
            if n > 0 {
                let host = slot.pinned.as_mut_slice().map_err(dev_err)?;
                let (src, _guard) = ids.buf.device_ptr(&self.side);
                // SAFETY: `host[..n]` is pinned memory of the slot, which moves into the job
                // below and is read only after `done` completes; `src` holds at least n u32 and
                // its buffer is kept alive by the job until then. The side stream waits for the
                // routing kernel (event `ready`).
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..n], src, self.side.cu_stream()) }
                    .map_err(dev_err)?;
            }
            slot.done.record(&self.side).map_err(dev_err)
        };
        if let Err(e) = enqueue(&mut slot) {
            // Nothing that reads the slot was enqueued after a failure: wait for the side
            // stream, then reuse it.
            let _ = self.side.synchronize();
            self.pool.give_back(slot);
            return Err(e);
        }
        let job = Job::Copy {
            slot,
            _keep: ids.buf.clone(),
            rows,
            k,
            sink,
        };
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
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
