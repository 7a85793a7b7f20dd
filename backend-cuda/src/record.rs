//! Recording without stalling: ids are copied into pinned host memory on a side stream that
//! waits on an event of the routing stream; a worker thread waits for the copy, hands a host
//! array to the sink and recycles the pinned buffer. The routing stream never waits.

use crate::buffers::DeviceIds;
use crate::device::{Device, dev_err};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use moe_router_core::{IdsSink, RouteError};
use ndarray::Array2;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Pool = Arc<Mutex<Vec<PinnedHostSlice<u32>>>>;

enum Job {
    Copy {
        pinned: PinnedHostSlice<u32>,
        done: CudaEvent,
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
    pool: Pool,
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    failed: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

fn worker(rx: Receiver<Job>, pool: Pool, failed: Arc<Mutex<Option<String>>>) {
    for job in rx {
        match job {
            Job::Flush(ack) => {
                let _ = ack.send(());
            }
            Job::Copy {
                pinned,
                done,
                _keep,
                rows,
                k,
                sink,
            } => {
                // Wait for the copy (recorded on the side stream), then read the pinned buffer.
                match done.synchronize().and_then(|()| pinned.as_slice()) {
                    Ok(s) => {
                        let v = s[..rows * k].to_vec();
                        if let Ok(a) = Array2::from_shape_vec((rows, k), v) {
                            sink(a);
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = failed.lock() {
                            *f = Some(format!("{e:?}"));
                        }
                    }
                }
                drop(_keep);
                if let Ok(mut p) = pool.lock() {
                    p.push(pinned);
                }
            }
        }
    }
}

impl Recorder {
    pub fn new(dev: Arc<Device>) -> Result<Self, RouteError> {
        let side = dev.ctx.new_stream().map_err(dev_err)?;
        let pool: Pool = Arc::new(Mutex::new(Vec::new()));
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

    fn pinned(&self, n: usize) -> Result<PinnedHostSlice<u32>, RouteError> {
        if let Ok(mut p) = self.pool.lock()
            && let Some(i) = p.iter().position(|b| b.len() >= n)
        {
            return Ok(p.swap_remove(i));
        }
        // Not write-combined: the host reads this memory.
        // SAFETY: the contents are uninitialised until the copy into it completes; the worker
        // reads them only after waiting for that copy's event.
        unsafe { self.dev.ctx.alloc_pinned_with_flags::<u32>(n.max(1024), 0) }.map_err(dev_err)
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
        let mut pinned = self.pinned(n)?;
        let ev = self.dev.stream.record_event(None).map_err(dev_err)?;
        self.side.wait(&ev).map_err(dev_err)?;
        if n > 0 {
            let host = pinned.as_mut_slice().map_err(dev_err)?;
            let (src, _guard) = ids.buf.device_ptr(&self.side);
            // SAFETY: `host[..n]` is pinned memory that moves into the job below and is read only
            // after `done` completes; `src` holds at least n u32 and its buffer is kept alive by
            // the job until then. The side stream waits for the routing kernel (event `ev`).
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..n], src, self.side.cu_stream()) }
                .map_err(dev_err)?;
        }
        let done = self.side.record_event(None).map_err(dev_err)?;
        let job = Job::Copy {
            pinned,
            done,
            _keep: ids.buf.clone(),
            rows,
            k,
            sink,
        };
        self.tx
            .as_ref()
            .and_then(|t| t.send(job).ok())
            .ok_or_else(|| RouteError::Recorder {
                reason: "the record thread stopped".into(),
            })
    }

    /// Waits until every job sent so far was delivered.
    pub fn flush(&self) -> Result<(), RouteError> {
        let (ack_tx, ack_rx) = sync_channel(1);
        self.tx
            .as_ref()
            .and_then(|t| t.send(Job::Flush(ack_tx)).ok())
            .ok_or_else(|| RouteError::Recorder {
                reason: "the record thread stopped".into(),
            })?;
        ack_rx.recv().map_err(|_| RouteError::Recorder {
            reason: "the record thread stopped".into(),
        })
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
