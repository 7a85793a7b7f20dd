//! [`CudaRouter`]: the [`Router`] on device logits.

use crate::buffers::{DeviceGrad, DeviceIds, DeviceLogits, DeviceWeights, LogitsBuffer, OwnedLogits, RouteBuffers};
use crate::device::{BACKEND, Device, dev_err};
use crate::kernels::{
    LogitsDtype, Params, Part, ROW_KCAP, RouterVariant, ScoreKind, TILE_KMAX, TILE_WARPS, WARP_BLOCK, WarpLayout,
    decode_status, row_launch, tile_slot, tile_smem, warp_layout, warp_layout_native_narrow, warp_layout_with,
    warp_params,
};
use crate::record::{RecordStats, Recorder};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, LaunchConfig};
use moe_router_core::backend::with_router_rows_marked;
use moe_router_core::{
    CallSite, ComputeDtype, HostGrad, HostMatrix, HostWeights, IdsSink, LogitsRef, RouteError, Routed, Router,
    RouterConfig,
};
use ndarray::{Array2, Array3, ArrayView2};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Largest number of experts the CUDA backend routes (the row kernels keep a row in shared
/// memory). Larger configs get [`RouteError::Unsupported`] from [`CudaRouter::new`].
pub const MAX_EXPERTS: usize = 4096;
/// Largest K the CUDA backend routes.
pub const MAX_TOP_K: usize = ROW_KCAP;
/// Batches with at least this many rows use the thread-per-token tile kernels (when the config
/// and alignment allow); smaller ones use one block per token.
const TILE_MIN_ROWS: usize = 2048;
/// With at most this many experts the tile kernels win at every T (measured on an H100).
const TILE_MAX_SMALL_E: usize = 32;
/// Up to this many rows the warp kernels spread a token over as many lanes as K and E allow
/// (latency); above it over about E/8 lanes (several tokens per warp: throughput). H200,
/// 2026-12-03: Qwen3 (E = 128) at T = 4096 took 5–9% less time with 16 lanes than with 32, and
/// level at T = 64.
const WARP_WIDE_MAX_ROWS: usize = 2048;

/// What one launch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Select and weigh.
    Route,
    /// Weigh given ids.
    Replay,
    /// Weigh given ids, and select the rows marked `ROUTER_SELECTS`.
    ReplayFallback,
}

impl crate::device::RouterKernels {
    fn function(&self, op: Op) -> &cudarc::driver::CudaFunction {
        match op {
            Op::Route => &self.route,
            Op::Replay => &self.replay,
            Op::ReplayFallback => &self.replay_fallback,
        }
    }
}

/// Which kernel shape routes a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    /// The warp kernels whenever they take the config (K ≤ 32, E ≤ 1024, group limits on whole
    /// lane sets), except portable softmax-before-top-K from 2048 rows (its sum in expert order
    /// is serial across lanes); otherwise the row kernels below 2048 rows, the tile kernels
    /// above and for E ≤ 32 (when the config and alignment allow).
    #[default]
    Auto,
    /// Always one block per token.
    Row,
    /// Thread-per-token tile kernels whenever the config and alignment allow.
    Tile,
    /// A group of lanes per token (warp kernels) whenever they take the config; otherwise as
    /// [`KernelChoice::Auto`] without them.
    Warp,
}

/// The CUDA router. Create it with [`CudaRouter::new`]; it routes [`DeviceLogits`] on its own
/// stream ([`CudaRouter::stream`]).
#[derive(Debug)]
pub struct CudaRouter {
    cfg: RouterConfig,
    dev: Arc<Device>,
    bias: Option<CudaSlice<f32>>,
    base: Params,
    choice: Mutex<KernelChoice>,
    warp_lanes: Mutex<Option<usize>>,
    pdl: AtomicBool,
    warp_grid: Mutex<HashMap<(RouterVariant, u8, usize), usize>>,
    recorder: Mutex<Option<Recorder>>,
}

/// The kernel shape of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Row,
    Tile(usize),
    Warp(WarpLayout),
}

impl CudaRouter {
    /// A router for `cfg` on device 0. Errors: [`RouteError::Unavailable`] without a CUDA driver,
    /// NVRTC or device; [`RouteError::Unsupported`] for f64 compute, E > [`MAX_EXPERTS`] or
    /// K > [`MAX_TOP_K`].
    pub fn new(cfg: RouterConfig) -> Result<Self, RouteError> {
        Self::on_device(cfg, 0)
    }

    /// A router for `cfg` on device `ordinal`.
    pub fn on_device(cfg: RouterConfig, ordinal: usize) -> Result<Self, RouteError> {
        Self::check_config(&cfg)?;
        let dev = Device::get(ordinal)?;
        let bias = match cfg.expert_bias() {
            Some(b) => Some(dev.stream.clone_htod(b).map_err(dev_err)?),
            None => None,
        };
        let base = crate::kernels::config_params(&cfg);
        let pdl = dev.pdl && std::env::var("MOE_ROUTER_CUDA_PDL").map_or(true, |v| v != "0");
        Ok(CudaRouter {
            cfg,
            dev,
            bias,
            base,
            choice: Mutex::new(KernelChoice::Auto),
            warp_lanes: Mutex::new(None),
            pdl: AtomicBool::new(pdl),
            warp_grid: Mutex::new(HashMap::new()),
            recorder: Mutex::new(None),
        })
    }

    /// Whether the CUDA backend takes `cfg` (without touching a device).
    pub fn check_config(cfg: &RouterConfig) -> Result<(), RouteError> {
        if cfg.compute_dtype() != ComputeDtype::F32 {
            return Err(RouteError::unsupported(
                BACKEND,
                "f64 compute (the CUDA backend computes in f32)",
            ));
        }
        if cfg.num_experts() > MAX_EXPERTS {
            return Err(RouteError::unsupported(
                BACKEND,
                format!("num_experts = {} exceeds the maximum {MAX_EXPERTS}", cfg.num_experts()),
            ));
        }
        if cfg.top_k() > MAX_TOP_K {
            return Err(RouteError::unsupported(
                BACKEND,
                format!("top_k = {} exceeds the maximum {MAX_TOP_K}", cfg.top_k()),
            ));
        }
        Ok(())
    }

    /// The device's name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// The stream every kernel of this router runs on (capture it for CUDA graphs).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.stream
    }

    /// Number of streaming multiprocessors of the device.
    pub fn multiprocessors(&self) -> usize {
        self.dev.sms
    }

    /// Forces a kernel shape (for benchmarks and tests); [`KernelChoice::Auto`] by default.
    pub fn set_kernel_choice(&self, choice: KernelChoice) {
        if let Ok(mut c) = self.choice.lock() {
            *c = choice;
        }
    }

    /// Forces the warp kernels' lanes per token (a power of two in `K..=32`; `None`: chosen per
    /// call), for benchmarks and tests. A count the config does not allow falls back to the
    /// automatic one.
    pub fn set_warp_lanes(&self, lanes: Option<usize>) {
        if let Ok(mut w) = self.warp_lanes.lock() {
            *w = lanes;
        }
    }

    /// Launches the warp kernels with programmatic dependent launch (compute capability 9.0 and
    /// newer; on by default there, `MOE_ROUTER_CUDA_PDL=0` turns it off): a warp kernel may
    /// start while the previous kernel of the stream finishes, and waits for it (its memory)
    /// before touching global memory, which hides most of the launch latency of back-to-back
    /// kernels (CUDA graphs included). Ignored on older devices.
    pub fn set_programmatic_launch(&self, on: bool) {
        self.pdl.store(on && self.dev.pdl, Ordering::Relaxed);
    }

    /// The kernel shape and warp layout a call on `rows` rows of `dtype` logits would use (for
    /// benchmark tables): `"row"`, `"tile"` or `"warp W×N"` (W lanes per token, at most N
    /// experts per lane).
    pub fn plan_name(&self, rows: usize, dtype: LogitsDtype, replay: bool) -> String {
        let op = if replay { Op::Replay } else { Op::Route };
        match self.choose(rows, self.cfg.num_experts(), dtype, true, op) {
            Plan::Row => "row".into(),
            Plan::Tile(_) => "tile".into(),
            Plan::Warp(l) => format!("warp {}×{}", l.w, l.ne),
        }
    }

    /// Compiles (or fetches from the cache) the kernels for every logits dtype, so that the
    /// first routing call does not pay NVRTC's compile time.
    pub fn warm_up(&self) -> Result<(), RouteError> {
        for d in LogitsDtype::ALL {
            self.dev.router_kernels(self.variant(d, Part::Row))?;
        }
        Ok(())
    }

    fn variant(&self, dtype: LogitsDtype, part: Part) -> RouterVariant {
        RouterVariant {
            part,
            dtype,
            portable: self.cfg.numerics() == moe_router_core::Numerics::Portable,
            score: ScoreKind::of(self.cfg.score(), self.cfg.softmax_position()),
        }
    }

    /// Uploads host logits (f64 logits are rounded to f32 first).
    pub fn upload_logits(&self, logits: &LogitsRef<'_>) -> Result<LogitsBuffer, RouteError> {
        let (rows, cols) = logits.dim();
        let s = &self.dev.stream;
        let n = (rows * cols).max(1);
        let data = match logits {
            LogitsRef::F32(a) => {
                let mut v: Vec<f32> = a.iter().copied().collect();
                v.resize(n, 0.0);
                OwnedLogits::F32(s.clone_htod(&v).map_err(dev_err)?)
            }
            LogitsRef::F64(a) => {
                let mut v: Vec<f32> = a.iter().map(|&x| x as f32).collect();
                v.resize(n, 0.0);
                OwnedLogits::F32(s.clone_htod(&v).map_err(dev_err)?)
            }
            LogitsRef::Bf16(a) => {
                let mut v: Vec<u16> = a.iter().map(|x| x.to_bits()).collect();
                v.resize(n, 0);
                OwnedLogits::Bf16(s.clone_htod(&v).map_err(dev_err)?)
            }
            LogitsRef::F16(a) => {
                let mut v: Vec<u16> = a.iter().map(|x| x.to_bits()).collect();
                v.resize(n, 0);
                OwnedLogits::F16(s.clone_htod(&v).map_err(dev_err)?)
            }
        };
        Ok(LogitsBuffer { data, rows, cols })
    }

    fn check_logits_shape(&self, rows: usize, cols: usize) -> Result<(), RouteError> {
        if cols != self.cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: self.cfg.num_experts(),
                rows,
                cols,
            });
        }
        Ok(())
    }

    fn plan(&self, logits: &DeviceLogits<'_>, ptr: u64, op: Op) -> Plan {
        let lb = logits.dtype().size() as u64;
        let aligned = ptr.is_multiple_of(16)
            && (logits.cols as u64 * lb).is_multiple_of(16)
            && (logits.ld as u64 * lb).is_multiple_of(16);
        self.choose(logits.rows, logits.cols, logits.dtype(), aligned, op)
    }

    /// The plan for `rows` rows of `cols` experts (`aligned`: 16-byte aligned rows, `cols` a
    /// multiple of 16 bytes).
    fn choose(&self, rows: usize, cols: usize, dtype: LogitsDtype, aligned: bool, op: Op) -> Plan {
        let choice = self.choice.lock().map(|c| *c).unwrap_or_default();
        if matches!(choice, KernelChoice::Auto | KernelChoice::Warp) {
            let replay = op == Op::Replay;
            let forced = self.warp_lanes.lock().ok().and_then(|w| *w);
            let layout = forced
                .and_then(|w| warp_layout_with(&self.base, dtype, replay, w))
                .or_else(|| {
                    let native = self.cfg.numerics() != moe_router_core::Numerics::Portable;
                    warp_layout(&self.base, dtype, replay, rows <= WARP_WIDE_MAX_ROWS)
                        .map(|l| warp_layout_native_narrow(&self.base, dtype, replay, native, rows).unwrap_or(l))
                });
            let serial_sum = self.cfg.numerics() == moe_router_core::Numerics::Portable
                && ScoreKind::of(self.cfg.score(), self.cfg.softmax_position()) == ScoreKind::SoftmaxBefore
                && rows >= TILE_MIN_ROWS;
            if let Some(l) = layout
                && (choice == KernelChoice::Warp || !serial_sum)
            {
                return Plan::Warp(l);
            }
        }
        let big = match choice {
            KernelChoice::Row => false,
            KernelChoice::Tile => true,
            KernelChoice::Auto | KernelChoice::Warp => rows >= TILE_MIN_ROWS || cols <= TILE_MAX_SMALL_E,
        };
        // A replay with fallback rows selects too: it needs what routing needs.
        match tile_slot(&self.base, op == Op::Replay) {
            Some(ki) if big && aligned => Plan::Tile(ki),
            _ => Plan::Row,
        }
    }

    /// Blocks of a warp launch: enough for every token group, at most what the device holds at
    /// once (the warps loop over further tokens).
    fn warp_blocks(
        &self,
        v: RouterVariant,
        op: Op,
        f: &cudarc::driver::CudaFunction,
        smem: usize,
        rows: usize,
        w: usize,
    ) -> usize {
        let need = rows.div_ceil(32 / w).div_ceil(WARP_BLOCK / 32).max(1);
        let key = (v, op as u8, smem);
        let cached = self.warp_grid.lock().ok().and_then(|m| m.get(&key).copied());
        let per_sm = match cached {
            Some(n) => n,
            None => {
                let n = f
                    .occupancy_max_active_blocks_per_multiprocessor(WARP_BLOCK as u32, smem, None)
                    .map(|n| n.max(1) as usize)
                    .unwrap_or(4);
                if let Ok(mut m) = self.warp_grid.lock() {
                    m.insert(key, n);
                }
                n
            }
        };
        need.min(per_sm * self.dev.sms.max(1)).min(1 << 30)
    }

    fn params(&self, logits: &DeviceLogits<'_>, lptr: u64) -> Params {
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.device_ptr(&self.dev.stream).0)
            .unwrap_or(0);
        Params {
            logits: lptr,
            bias,
            t: logits.rows as i64,
            ld: logits.ld as i64,
            ..self.base
        }
    }

    /// Enqueues the route or replay kernel for `p` on the router's stream.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        mut p: Params,
        rows: usize,
        plan: &Plan,
        op: Op,
        dtype: LogitsDtype,
        aligned: bool,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<(), RouteError> {
        if rows == 0 {
            return Ok(());
        }
        let part = match *plan {
            Plan::Row => Part::Row,
            Plan::Tile(ki) => Part::Tile(TILE_KMAX[ki]),
            Plan::Warp(l) => Part::Warp(l.ne),
        };
        let variant = self.variant(dtype, part);
        let kern = self.dev.router_kernels(variant)?;
        if let Plan::Warp(l) = *plan {
            let prune = variant.portable && variant.score == ScoreKind::Sigmoid;
            let smem = warp_params(&mut p, l, dtype, aligned, prune);
            let f = kern.function(op);
            self.check_smem(smem)?;
            let blocks = self.warp_blocks(variant, op, f, smem, rows, l.w);
            return self.launch_ex(f, blocks, smem, &mut p, stream);
        }
        let (f, cfg) = match *plan {
            Plan::Tile(ki) => {
                let smem = tile_smem(&p, ki, op == Op::Replay);
                let blocks = rows.div_ceil(TILE_WARPS * 32);
                let f = kern.function(op);
                (
                    f,
                    LaunchConfig {
                        grid_dim: (blocks as u32, 1, 1),
                        block_dim: ((TILE_WARPS * 32) as u32, 1, 1),
                        shared_mem_bytes: smem as u32,
                    },
                )
            }
            Plan::Row | Plan::Warp(_) => {
                let (block, smem) = row_launch(&p);
                let grid = rows.min(1 << 30);
                let f = kern.function(op);
                (
                    f,
                    LaunchConfig {
                        grid_dim: (grid as u32, 1, 1),
                        block_dim: (block as u32, 1, 1),
                        shared_mem_bytes: smem as u32,
                    },
                )
            }
        };
        self.check_smem(cfg.shared_mem_bytes as usize)?;
        self.dev.ctx.bind_to_thread().map_err(dev_err)?;
        let mut args = [&mut p as *mut Params as *mut std::ffi::c_void];
        // SAFETY: the kernel takes one `Params` by value (layout checked in kernels.rs) and
        // `args` points at it for the duration of the call; every pointer in it refers to a live
        // device buffer of at least the sizes the kernel indexes (logits [T, ld], ids/weights
        // [T, K], tap rows of stride tap_ld, one status word), kept alive by the caller until
        // `stream` has passed this launch; `stream` belongs to the context bound above.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                stream,
                &mut args,
            )
        }
        .map_err(dev_err)
    }

    /// [`CudaRouter::launch`] on the router's own stream, for `logits` at `lptr`.
    fn launch_own(
        &self,
        p: Params,
        rows: usize,
        plan: &Plan,
        op: Op,
        logits: &DeviceLogits<'_>,
        lptr: u64,
    ) -> Result<(), RouteError> {
        let stream = self.dev.stream.cu_stream();
        self.launch(p, rows, plan, op, logits.dtype(), aligned(logits, lptr), stream)
    }

    /// Enqueues a route (or, with `replay`, a replay of the ids at `ids`) on caller-owned memory
    /// and a caller-owned `stream`, with the plan a call of this router would use (warp, tile or
    /// row kernels): what [`crate::external::ExternalLaunch`] launches.
    ///
    /// # Safety
    ///
    /// As [`crate::external::ExternalLaunch::enqueue`]: every address is live device memory of
    /// this device of the extent the kernel indexes until `stream` has passed the launch, and
    /// `stream` is a valid stream of the device's primary context.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn enqueue_on(
        &self,
        logits: u64,
        dtype: LogitsDtype,
        rows: usize,
        cols: usize,
        ld: usize,
        out: (u64, u64, u64),
        replay: bool,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<(), RouteError> {
        let lb = dtype.size() as u64;
        let aligned =
            logits.is_multiple_of(16) && (cols as u64 * lb).is_multiple_of(16) && (ld as u64 * lb).is_multiple_of(16);
        let op = if replay { Op::Replay } else { Op::Route };
        let plan = self.choose(rows, cols, dtype, aligned, op);
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.device_ptr(&self.dev.stream).0)
            .unwrap_or(0);
        let (ids, weights, status) = out;
        let p = Params {
            logits,
            bias,
            ids,
            weights,
            status,
            t: rows as i64,
            ld: ld as i64,
            ..self.base
        };
        self.launch(p, rows, &plan, op, dtype, aligned, stream)
    }

    /// Compiles (or fetches) the kernels a call on `rows` rows of `dtype` logits would use.
    pub(crate) fn warm_up_for(&self, rows: usize, dtype: LogitsDtype) -> Result<(), RouteError> {
        for op in [Op::Route, Op::Replay] {
            let part = match self.choose(rows, self.cfg.num_experts(), dtype, true, op) {
                Plan::Row => Part::Row,
                Plan::Tile(ki) => Part::Tile(TILE_KMAX[ki]),
                Plan::Warp(l) => Part::Warp(l.ne),
            };
            self.dev.router_kernels(self.variant(dtype, part))?;
        }
        Ok(())
    }

    fn check_smem(&self, bytes: usize) -> Result<(), RouteError> {
        if bytes > self.dev.smem_optin {
            return Err(RouteError::unsupported(
                BACKEND,
                format!(
                    "this config needs {bytes} bytes of shared memory per block, the device allows {}",
                    self.dev.smem_optin
                ),
            ));
        }
        Ok(())
    }

    /// Launches a warp kernel (blocks of [`WARP_BLOCK`] threads) on the router's stream, with
    /// the programmatic-dependent-launch attribute when it is on.
    fn launch_ex(
        &self,
        f: &cudarc::driver::CudaFunction,
        blocks: usize,
        smem: usize,
        p: &mut Params,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<(), RouteError> {
        use cudarc::driver::sys;
        self.dev.ctx.bind_to_thread().map_err(dev_err)?;
        let pdl = self.pdl.load(Ordering::Relaxed);
        // SAFETY: an all-zero launch attribute is valid plain data (id 0 is "ignore"); its id
        // and value are set before use.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: blocks as u32,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: WARP_BLOCK as u32,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem as u32,
            hStream: stream,
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: u32::from(pdl),
        };
        let mut args = [p as *mut Params as *mut std::ffi::c_void];
        // SAFETY: the kernel takes one `Params` by value (layout checked in kernels.rs) and
        // `args` points at it for the duration of the call; every pointer in it refers to a live
        // device buffer of at least the sizes the kernel indexes (logits [T, ld], ids/weights
        // [T, K], tap rows of stride tap_ld, one status word), kept alive by the caller until
        // the stream has passed this launch; `cfg` and `attr` outlive the call; the stream
        // belongs to the context bound above.
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(dev_err)
    }

    fn read_status(&self, status: &CudaSlice<u64>, replay_ids: Option<&DeviceIds>) -> Result<(), RouteError> {
        let w = self.dev.stream.clone_dtoh(status).map_err(dev_err)?;
        let k = self.cfg.top_k();
        decode_status(w.first().copied().unwrap_or(0), self.cfg.num_experts(), k, |row| {
            let ids = replay_ids?;
            self.dev.stream.clone_dtoh(&ids.buf.slice(row * k..(row + 1) * k)).ok()
        })
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, RouteError> {
        // SAFETY: the buffer is uninitialised device memory; every element that is later read
        // back (rows 0..T of the outputs) is written by the kernel first.
        unsafe { self.dev.stream.alloc::<T>(n.max(1)) }.map_err(dev_err)
    }

    /// Allocates buffers for [`CudaRouter::enqueue_route`]: outputs for up to `max_tokens` rows
    /// and, when `layers > 0`, a record buffer `[max_tokens, layers, K]`.
    pub fn alloc_buffers(&self, max_tokens: usize, layers: usize) -> Result<RouteBuffers, RouteError> {
        let k = self.cfg.top_k();
        let record = if layers > 0 {
            Some(
                self.dev
                    .stream
                    .alloc_zeros::<u32>((max_tokens * layers * k).max(1))
                    .map_err(dev_err)?,
            )
        } else {
            None
        };
        Ok(RouteBuffers {
            ids: self.alloc(max_tokens * k)?,
            weights: self.alloc(max_tokens * k)?,
            status: self.dev.stream.alloc_zeros::<u64>(1).map_err(dev_err)?,
            record,
            max_tokens,
            layers,
            k,
            rows: 0,
        })
    }

    /// Enqueues routing of `logits` into `out` (and, with a record buffer, into its layer
    /// `layer`), without allocating or synchronising: safe to capture into a CUDA graph. Errors
    /// in the data are latched in `out` and returned by [`CudaRouter::take_status`].
    pub fn enqueue_route(
        &self,
        logits: &DeviceLogits<'_>,
        layer: usize,
        out: &mut RouteBuffers,
    ) -> Result<(), RouteError> {
        let (t, e) = logits.dim();
        self.check_logits_shape(t, e)?;
        if t > out.max_tokens || out.k != self.cfg.top_k() {
            return Err(RouteError::BufferTooSmall {
                buffer: "route buffers",
                detail: format!(
                    "they hold {} rows of K = {}, the call needs {t} rows of K = {}",
                    out.max_tokens,
                    out.k,
                    self.cfg.top_k()
                ),
            });
        }
        if out.record.is_some() && layer >= out.layers {
            return Err(RouteError::BufferTooSmall {
                buffer: "record buffer",
                detail: format!("layer {layer} is out of its {} layers", out.layers),
            });
        }
        let s = &self.dev.stream;
        let (lptr, _g) = logits.raw_ptr(s);
        let mut p = self.params(logits, lptr);
        p.ids = out.ids.device_ptr(s).0;
        p.weights = out.weights.device_ptr(s).0;
        p.status = out.status.device_ptr(s).0;
        if let Some(r) = &out.record {
            p.tap = r.device_ptr(s).0 + (layer * out.k * 4) as u64;
            p.tap_ld = (out.layers * out.k) as i64;
        }
        let plan = self.plan(logits, lptr, Op::Route);
        self.launch_own(p, t, &plan, Op::Route, logits, lptr)?;
        out.rows = t;
        Ok(())
    }

    /// Enqueues replay: the weights of `ids` (`[T, K]` on the device) into `out`'s weights.
    /// Launch only, like [`CudaRouter::enqueue_route`].
    pub fn enqueue_replay(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &CudaView<'_, u32>,
        out: &mut RouteBuffers,
    ) -> Result<(), RouteError> {
        let (t, e) = logits.dim();
        self.check_logits_shape(t, e)?;
        let k = self.cfg.top_k();
        if t > out.max_tokens || out.k != k || ids.len() < t * k {
            return Err(RouteError::IdsShape {
                expected_rows: t,
                expected_k: k,
                rows: ids.len() / k.max(1),
                cols: k,
            });
        }
        let s = &self.dev.stream;
        let (lptr, _g) = logits.raw_ptr(s);
        let (iptr, _gi) = ids.device_ptr(s);
        let mut p = self.params(logits, lptr);
        p.ids = iptr;
        p.weights = out.weights.device_ptr(s).0;
        p.status = out.status.device_ptr(s).0;
        let plan = self.plan(logits, lptr, Op::Replay);
        self.launch_own(p, t, &plan, Op::Replay, logits, lptr)?;
        out.rows = t;
        Ok(())
    }

    /// What asynchronous recording ([`Router::record_ids`]) has cost on this router so far:
    /// records delivered, the time the routing thread waited for a free pinned buffer
    /// (backpressure) and the delivery thread's time per stage. All zero before the first
    /// record.
    pub fn record_stats(&self) -> RecordStats {
        match self.recorder.lock() {
            Ok(g) => g.as_ref().map(Recorder::stats).unwrap_or_default(),
            Err(p) => p.get_ref().as_ref().map(Recorder::stats).unwrap_or_default(),
        }
    }

    /// Waits for the router's stream, returns the first error latched in `out` since the last
    /// call (in the reference router's order) and clears it.
    pub fn take_status(&self, out: &mut RouteBuffers) -> Result<(), RouteError> {
        let r = self.read_status(&out.status, None);
        self.dev.stream.memset_zeros(&mut out.status).map_err(dev_err)?;
        r
    }

    /// Copies the record buffer to the host as `[max_tokens, layers, K]`.
    pub fn recorded_ids(&self, out: &RouteBuffers) -> Result<Array3<u32>, RouteError> {
        let Some(r) = &out.record else {
            return Err(RouteError::BufferTooSmall {
                buffer: "record buffer",
                detail: "these route buffers were allocated without one".into(),
            });
        };
        let mut v = self.dev.stream.clone_dtoh(r).map_err(dev_err)?;
        v.truncate(out.max_tokens * out.layers * out.k);
        Array3::from_shape_vec((out.max_tokens, out.layers, out.k), v)
            .map_err(|e| RouteError::array_shape(&[out.max_tokens, out.layers, out.k], e))
    }

    /// Weighs `ids` (replay), or with [`Op::ReplayFallback`] also selects the rows marked
    /// `ROUTER_SELECTS`, writing their ids into `ids`.
    fn weigh(&self, logits: &DeviceLogits<'_>, ids: &DeviceIds, op: Op) -> Result<DeviceWeights, RouteError> {
        let (t, e) = logits.dim();
        self.check_logits_shape(t, e)?;
        let k = self.cfg.top_k();
        if ids.rows != t || ids.k != k {
            return Err(RouteError::IdsShape {
                expected_rows: t,
                expected_k: k,
                rows: ids.rows,
                cols: ids.k,
            });
        }
        let weights = self.alloc::<f32>(t * k)?;
        let status = self.dev.stream.alloc_zeros::<u64>(1).map_err(dev_err)?;
        {
            let s = &self.dev.stream;
            let (lptr, _g) = logits.raw_ptr(s);
            let mut p = self.params(logits, lptr);
            p.ids = ids.buf.device_ptr(s).0;
            p.weights = weights.device_ptr(s).0;
            p.status = status.device_ptr(s).0;
            let plan = self.plan(logits, lptr, op);
            self.launch_own(p, t, &plan, op, logits, lptr)?;
        }
        self.read_status(&status, Some(ids))?;
        Ok(DeviceWeights {
            buf: weights,
            rows: t,
            k,
        })
    }

    pub(crate) fn device(&self) -> &Arc<Device> {
        &self.dev
    }
}

/// Whether rows of `logits` at `ptr` can be read with 16-byte loads (pointer and row stride).
fn aligned(logits: &DeviceLogits<'_>, ptr: u64) -> bool {
    ptr.is_multiple_of(16) && (logits.ld as u64 * logits.dtype().size() as u64).is_multiple_of(16)
}

impl Router for CudaRouter {
    type Logits<'a> = DeviceLogits<'a>;
    type Ids = DeviceIds;
    type Weights = DeviceWeights;
    type LogitsGrad = DeviceGrad;

    fn config(&self) -> &RouterConfig {
        &self.cfg
    }
    fn weights_vjp(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        losses: &moe_router_core::LossGrads<'_>,
        _site: &CallSite<'_>,
    ) -> Result<DeviceGrad, RouteError> {
        self.backward(logits, ids, grad, losses)
    }
    fn weights_from_host(&self, weights: &HostMatrix) -> Result<DeviceWeights, RouteError> {
        if self.cfg.compute_dtype() != ComputeDtype::F32 {
            return Err(RouteError::unsupported(
                BACKEND,
                "f64 compute (the CUDA backend computes in f32)",
            ));
        }
        // f64 values are rounded to f32, as the host routers do for f32 compute.
        let a = weights.to_f32();
        let (rows, k) = a.dim();
        let mut v: Vec<f32> = a.iter().copied().collect();
        if v.is_empty() {
            v.push(0.0);
        }
        let buf = self.dev.stream.clone_htod(&v).map_err(dev_err)?;
        Ok(DeviceWeights { buf, rows, k })
    }
    fn logits_grad_to_host(&self, grad: &DeviceGrad) -> Result<HostGrad, RouteError> {
        let (rows, cols) = grad.dim();
        let mut v = self.dev.stream.clone_dtoh(&grad.buf).map_err(dev_err)?;
        v.truncate(rows * cols);
        Array2::from_shape_vec((rows, cols), v)
            .map(HostGrad::F32)
            .map_err(|e| RouteError::array_shape(&[rows, cols], e))
    }
    fn first_differing_row(&self, a: &DeviceIds, b: &DeviceIds) -> Result<Option<usize>, RouteError> {
        // Two handles of one buffer (what a forward hands to its backward) are equal at once.
        if Arc::ptr_eq(&a.buf, &b.buf) && a.dim() == b.dim() {
            return Ok(None);
        }
        if a.dim() != b.dim() {
            return Ok(Some(0));
        }
        let a = self.ids_to_host(a)?;
        let b = self.ids_to_host(b)?;
        Ok(a.outer_iter().zip(b.outer_iter()).position(|(x, y)| x != y))
    }
    fn backend_name(&self) -> &'static str {
        BACKEND
    }
    fn batch_rows(&self, logits: &DeviceLogits<'_>) -> usize {
        logits.rows
    }

    fn route(
        &self,
        logits: &DeviceLogits<'_>,
        _site: &CallSite<'_>,
    ) -> Result<Routed<DeviceIds, DeviceWeights>, RouteError> {
        let (t, e) = logits.dim();
        self.check_logits_shape(t, e)?;
        let k = self.cfg.top_k();
        let ids = self.alloc::<u32>(t * k)?;
        let weights = self.alloc::<f32>(t * k)?;
        let status = self.dev.stream.alloc_zeros::<u64>(1).map_err(dev_err)?;
        {
            let s = &self.dev.stream;
            let (lptr, _g) = logits.raw_ptr(s);
            let mut p = self.params(logits, lptr);
            p.ids = ids.device_ptr(s).0;
            p.weights = weights.device_ptr(s).0;
            p.status = status.device_ptr(s).0;
            let plan = self.plan(logits, lptr, Op::Route);
            self.launch_own(p, t, &plan, Op::Route, logits, lptr)?;
        }
        self.read_status(&status, None)?;
        Ok(Routed {
            ids: DeviceIds {
                buf: Arc::new(ids),
                rows: t,
                k,
                // `read_status` waited for the stream, so the kernel's writes are done.
                complete: true,
            },
            weights: DeviceWeights {
                buf: weights,
                rows: t,
                k,
            },
        })
    }

    fn weights_for(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        _site: &CallSite<'_>,
    ) -> Result<DeviceWeights, RouteError> {
        self.weigh(logits, ids, Op::Replay)
    }

    fn replay_with_fallback(
        &self,
        logits: &DeviceLogits<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
        _site: &CallSite<'_>,
    ) -> Result<Routed<DeviceIds, DeviceWeights>, RouteError> {
        // Fallback rows carry ROUTER_SELECTS (the caller's convention, enforced here): the
        // kernel selects them and writes their ids in place, in the same launch.
        let mut dev = with_router_rows_marked(ids, router_rows, |ids| self.ids_from_host(ids))?;
        let op = if router_rows.is_empty() {
            Op::Replay
        } else {
            Op::ReplayFallback
        };
        let weights = self.weigh(logits, &dev, op)?;
        // `weigh` waited for the stream: the upload and the fallback rows' writes are done.
        dev.complete = true;
        Ok(Routed { ids: dev, weights })
    }

    fn ids_from_host(&self, ids: ArrayView2<'_, u32>) -> Result<DeviceIds, RouteError> {
        let (rows, k) = ids.dim();
        if k != self.cfg.top_k() {
            return Err(RouteError::IdsShape {
                expected_rows: rows,
                expected_k: self.cfg.top_k(),
                rows,
                cols: k,
            });
        }
        let buf = match ids.as_slice() {
            Some(s) if !s.is_empty() => self.dev.stream.clone_htod(s),
            _ => {
                let mut v: Vec<u32> = ids.iter().copied().collect();
                if v.is_empty() {
                    v.push(0);
                }
                self.dev.stream.clone_htod(&v)
            }
        }
        .map_err(dev_err)?;
        Ok(DeviceIds {
            buf: Arc::new(buf),
            rows,
            k,
            // The upload may still be in flight on the stream.
            complete: false,
        })
    }

    fn ids_to_host(&self, ids: &DeviceIds) -> Result<Array2<u32>, RouteError> {
        let mut v = self.dev.stream.clone_dtoh(&*ids.buf).map_err(dev_err)?;
        v.truncate(ids.rows * ids.k);
        Array2::from_shape_vec((ids.rows, ids.k), v).map_err(|e| RouteError::array_shape(&[ids.rows, ids.k], e))
    }

    fn weights_to_host(&self, weights: &DeviceWeights) -> Result<HostWeights, RouteError> {
        let mut v = self.dev.stream.clone_dtoh(&weights.buf).map_err(dev_err)?;
        v.truncate(weights.rows * weights.k);
        Array2::from_shape_vec((weights.rows, weights.k), v)
            .map(HostWeights::F32)
            .map_err(|e| RouteError::array_shape(&[weights.rows, weights.k], e))
    }

    fn record_ids(&self, ids: &DeviceIds, sink: IdsSink) -> Result<(), RouteError> {
        let mut guard = self.recorder.lock().map_err(|_| RouteError::Recorder {
            reason: "its lock is poisoned (a thread panicked while recording)".into(),
        })?;
        if guard.is_none() {
            *guard = Some(Recorder::new(self.dev.clone())?);
        }
        match guard.as_ref() {
            Some(r) => r.record(ids, sink),
            None => Err(RouteError::Recorder {
                reason: "no recorder could be started".into(),
            }),
        }
    }
    fn with_host_logits<T, F>(&self, logits: &LogitsRef<'_>, f: F) -> Result<T, RouteError>
    where
        F: for<'l> FnOnce(&DeviceLogits<'l>) -> Result<T, RouteError>,
    {
        let buf = self.upload_logits(logits)?;
        f(&buf.view())
    }
    fn tokens_per_expert(&self, ids: &DeviceIds) -> Result<Vec<u64>, RouteError> {
        self.count_experts(ids)
    }
    fn flush_records(&self) -> Result<(), RouteError> {
        let guard = self.recorder.lock().map_err(|_| RouteError::Recorder {
            reason: "its lock is poisoned (a thread panicked while recording)".into(),
        })?;
        match guard.as_ref() {
            Some(r) => r.flush(),
            None => Ok(()),
        }
    }
}
