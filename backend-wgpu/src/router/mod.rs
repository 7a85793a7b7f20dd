//! [`WgpuRouter`]: the [`Router`] on a wgpu device — construction, the public API and the
//! `Router` implementation. The dispatch machinery (chunking, params, bind groups, error
//! flags) is in [`launch`].

mod backward;
mod launch;

pub use backward::BackwardBuffers;

pub(crate) use launch::Params;

use crate::buffers::{DeviceGrad, DeviceIds, DeviceLogits, DeviceWeights, LogitsBuffer, RouteBuffers};
use crate::context::{AdapterOptions, WgpuContext, device_err};
use crate::kernels::{KernelSet, KernelSpec, Lanes, RowKernels, RowSpec, WORKGROUP_LANES};
use bytemuck::Pod;
use launch::Plan;
use moe_router_core::LogitsDtype;
use moe_router_core::backend::with_router_rows_marked;
use moe_router_core::{
    CallSite, ComputeDtype, HostWeights, IdsSink, LogitsRef, Normalization, Numerics, RouteError, Routed, Router,
    RouterConfig,
};
use ndarray::{Array2, ArrayView2};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Host data of one logits batch, as bytes the kernels read.
enum HostBytes<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl HostBytes<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            HostBytes::Borrowed(b) => b,
            HostBytes::Owned(v) => v,
        }
    }
}

fn host_bytes<'a>(l: &LogitsRef<'a>) -> (HostBytes<'a>, LogitsDtype) {
    fn cast<'a, T: Pod>(a: &ndarray::ArrayView2<'a, T>) -> HostBytes<'a> {
        match a.to_slice() {
            Some(s) => HostBytes::Borrowed(bytemuck::cast_slice(s)),
            None => HostBytes::Owned(bytemuck::cast_slice(&a.iter().copied().collect::<Vec<T>>()).to_vec()),
        }
    }
    match l {
        LogitsRef::F32(a) => (cast(a), LogitsDtype::F32),
        LogitsRef::Bf16(a) => (cast(a), LogitsDtype::Bf16),
        LogitsRef::F16(a) => (cast(a), LogitsDtype::F16),
        LogitsRef::F64(a) => {
            let v: Vec<f32> = a.iter().map(|&x| x as f32).collect();
            (HostBytes::Owned(bytemuck::cast_slice(&v).to_vec()), LogitsDtype::F32)
        }
    }
}

/// Environment variable choosing the routing kernels ([`KernelPath`]): `auto`, `token`,
/// `subgroup` or `workgroup` (case-insensitive; unset or empty = `auto`).
pub const ENV_KERNEL: &str = "MOE_ROUTER_WGPU_KERNEL";

/// Batches up to this many rows take the workgroup row kernels under [`KernelPath::Auto`] on
/// adapters without usable subgroups (larger ones take the one-invocation-per-token kernels).
pub const SMALL_BATCH_ROWS: usize = 4096;

/// Which routing kernels a [`WgpuRouter`] dispatches. Every path gives the same ids and weight
/// bits (portable mode: the reference's); only speed differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KernelPath {
    /// Subgroup row kernels where the adapter allows them
    /// ([`WgpuContext::subgroup_lanes`]) and the rule has at least two experts per lane; otherwise
    /// the workgroup row kernels for batches of up to [`SMALL_BATCH_ROWS`] rows (same expert
    /// condition) and the one-invocation-per-token kernels for everything else. Software
    /// adapters ([`WgpuContext::is_software`]) always take the per-token kernels: they pay per
    /// instruction, and emulate the lanes' operations.
    #[default]
    Auto,
    /// One invocation per token: no subgroup operations, no workgroup memory (the kernels every
    /// adapter runs; best for rules with few experts).
    PerToken,
    /// The lanes of one subgroup route one row: coalesced loads, exact lane reductions.
    /// Routing fails with [`RouteError::Unsupported`] where [`WgpuContext::subgroup_lanes`] is
    /// `None`.
    SubgroupRows,
    /// The lanes of one workgroup route one row through workgroup memory and barriers (no
    /// subgroup operations): the same algorithm as [`KernelPath::SubgroupRows`].
    WorkgroupRows,
}

impl KernelPath {
    /// The path named by [`ENV_KERNEL`], or `None` when it is unset or names none.
    pub fn from_env() -> Option<KernelPath> {
        let v = std::env::var(ENV_KERNEL).ok()?;
        match v.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(KernelPath::Auto),
            "token" | "per-token" => Some(KernelPath::PerToken),
            "subgroup" | "subgroup-rows" => Some(KernelPath::SubgroupRows),
            "workgroup" | "workgroup-rows" => Some(KernelPath::WorkgroupRows),
            _ => None,
        }
    }
}

/// The wgpu router: WGSL compute kernels for every [`RouterConfig`], bit-identical to the
/// reference router in portable mode (ids and weight bits) on any adapter, GPU or software.
///
/// ```no_run
/// use moe_router_core::{LogitsRef, Router, RouterConfig};
/// use moe_router_wgpu::WgpuRouter;
/// let cfg = RouterConfig::builder(8, 2).build().unwrap();
/// let router = WgpuRouter::new(cfg)?;
/// let logits = ndarray::Array2::<f32>::zeros((4, 8));
/// let (ids, weights) = router.route_host(&LogitsRef::F32(logits.view()))?;
/// # Ok::<(), moe_router_core::RouteError>(())
/// ```
pub struct WgpuRouter {
    cfg: RouterConfig,
    ctx: Arc<WgpuContext>,
    bias: wgpu::Buffer,
    base_params: Params,
    kernels: Mutex<HashMap<LogitsDtype, Arc<KernelSet>>>,
    row_kernels: Mutex<HashMap<(LogitsDtype, Lanes), Arc<RowKernels>>>,
    max_rows: Option<usize>,
    max_grid: Option<u32>,
    prune: bool,
    path: KernelPath,
}

impl std::fmt::Debug for WgpuRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuRouter")
            .field("adapter", &self.ctx.adapter().name)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl WgpuRouter {
    /// A router for `cfg` on the best adapter available (overridable by the environment
    /// variables [`crate::ENV_BACKEND`] and [`crate::ENV_ADAPTER`]).
    ///
    /// Errors: [`RouteError::Unavailable`] when no adapter exists, [`RouteError::Unsupported`]
    /// for f64 compute (CPU only).
    pub fn new(cfg: RouterConfig) -> Result<WgpuRouter, RouteError> {
        Self::with_options(cfg, &AdapterOptions::from_env())
    }

    /// A router for `cfg` on the adapter chosen by `opts` (shared context per `opts`).
    pub fn with_options(cfg: RouterConfig, opts: &AdapterOptions) -> Result<WgpuRouter, RouteError> {
        Self::with_context(cfg, WgpuContext::shared(opts)?)
    }

    /// A router for `cfg` on an existing context (pipelines are shared with other routers on it).
    pub fn with_context(cfg: RouterConfig, ctx: Arc<WgpuContext>) -> Result<WgpuRouter, RouteError> {
        if cfg.compute_dtype() != ComputeDtype::F32 {
            return Err(RouteError::unsupported(
                "wgpu",
                "f64 compute (the wgpu backend computes in f32; f64 is CPU-only)",
            ));
        }
        let native = cfg.numerics() == Numerics::Native;
        let fz = |x: f32| if native { x } else { moe_router_core::math::ftz(x) };
        let mut base = Params::base();
        match cfg.normalization() {
            Normalization::None => {}
            Normalization::Sum { eps } => base.eps = fz(eps),
            Normalization::SumClampMin { min } => base.clamp_min = fz(min),
        }
        base.scale = fz(cfg.scaling_factor());
        let bias_vals: Vec<f32> = match cfg.expert_bias() {
            Some(b) => b.iter().map(|&x| fz(x)).collect(),
            None => vec![0.0; 4],
        };
        let bias = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-router bias"),
            size: (bias_vals.len() * 4).max(16) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.queue.write_buffer(&bias, 0, bytemuck::cast_slice(&bias_vals));
        Ok(WgpuRouter {
            cfg,
            ctx,
            bias,
            base_params: base,
            kernels: Mutex::new(HashMap::new()),
            row_kernels: Mutex::new(HashMap::new()),
            max_rows: None,
            max_grid: None,
            prune: std::env::var_os("MOE_ROUTER_WGPU_NO_PRUNE").is_none(),
            path: KernelPath::from_env().unwrap_or_default(),
        })
    }

    /// Caps the rows of one dispatch at `rows` (rounded down to a multiple of 256, at least 256).
    /// Batches are always split where the device's storage-binding limit requires it; this
    /// only lowers the split point (for tests of the splitting, or to bound one dispatch's time).
    pub fn with_max_rows_per_dispatch(mut self, rows: usize) -> Self {
        self.max_rows = Some((rows / 256 * 256).max(256));
        self
    }

    /// Caps the workgroups per grid dimension of the row kernels' dispatches at `n` (at least 1;
    /// the device limit always applies). The row kernels lay their workgroups out on a 2-D grid
    /// once a dispatch needs more than that; this only lowers the point where it does (for tests
    /// of the 2-D grid).
    pub fn with_max_workgroups_per_dimension(mut self, n: u32) -> Self {
        self.max_grid = Some(n.max(1));
        self
    }

    /// Turns the bound-based skipping of exact keys on or off (on by default; the environment
    /// variable `MOE_ROUTER_WGPU_NO_PRUNE` turns it off). In portable mode with sigmoid or
    /// sqrt-softplus scores the kernel first bounds each key with the device's fast built-ins and
    /// computes the exact (software) key only where the bound does not rule the expert out; the
    /// ids and weights are the same either way, only the speed differs.
    pub fn with_pruning(mut self, on: bool) -> Self {
        self.prune = on;
        self.kernels = Mutex::new(HashMap::new());
        self.row_kernels = Mutex::new(HashMap::new());
        self
    }

    /// Chooses the routing kernels (default: [`KernelPath::Auto`], or the path named by
    /// [`ENV_KERNEL`]). Rules whose rows do not fit the row kernels' registers (more than
    /// 64 values per lane) run on the per-token kernels under every path.
    pub fn with_kernel_path(mut self, path: KernelPath) -> Self {
        self.path = path;
        self
    }

    /// The kernel path this router was given.
    pub fn kernel_path(&self) -> KernelPath {
        self.path
    }

    /// The kernels a batch of `rows` rows of `dtype` runs on: [`KernelPath::PerToken`],
    /// [`KernelPath::SubgroupRows`] or [`KernelPath::WorkgroupRows`] (never `Auto`).
    ///
    /// Errors: [`RouteError::Unsupported`] for [`KernelPath::SubgroupRows`] on an adapter
    /// without usable subgroups.
    pub fn kernels_for_batch(&self, rows: usize, dtype: LogitsDtype) -> Result<KernelPath, RouteError> {
        Ok(match self.choose(rows, dtype)? {
            None => KernelPath::PerToken,
            Some(s) => match s.lanes {
                Lanes::Subgroup(_) => KernelPath::SubgroupRows,
                Lanes::Workgroup(_) => KernelPath::WorkgroupRows,
            },
        })
    }

    /// The row layout a batch runs on, or `None` for the per-token kernels.
    fn choose(&self, rows: usize, dtype: LogitsDtype) -> Result<Option<RowSpec>, RouteError> {
        let spec = KernelSpec::new(&self.cfg, dtype, self.prune);
        let rows_spec = |lanes: Lanes| RowSpec::new(&spec, lanes);
        // Auto takes row kernels only where every lane holds at least two experts.
        let wide = |l: u32| self.cfg.num_experts() >= 2 * l as usize;
        Ok(match self.path {
            KernelPath::PerToken => None,
            KernelPath::Auto if self.ctx.is_software() => None,
            KernelPath::WorkgroupRows => rows_spec(Lanes::Workgroup(WORKGROUP_LANES)),
            KernelPath::SubgroupRows => match self.ctx.subgroup_lanes() {
                Some(l) => rows_spec(Lanes::Subgroup(l)),
                None => {
                    return Err(RouteError::unsupported(
                        "wgpu",
                        format!(
                            "subgroup row kernels on adapter {:?} (no subgroups of one fixed power-of-two size, \
                             or a subgroup layout other than aligned blocks of invocations)",
                            self.ctx.adapter().name
                        ),
                    ));
                }
            },
            KernelPath::Auto => match self.ctx.subgroup_lanes() {
                Some(l) if wide(l) => rows_spec(Lanes::Subgroup(l)),
                Some(_) => None,
                None if rows <= SMALL_BATCH_ROWS && wide(WORKGROUP_LANES) => {
                    rows_spec(Lanes::Workgroup(WORKGROUP_LANES))
                }
                None => None,
            },
        })
    }

    /// The compiled kernels for a batch of `rows` rows of `dtype`.
    fn plan(&self, rows: usize, dtype: LogitsDtype) -> Result<Plan, RouteError> {
        let Some(spec) = self.choose(rows, dtype)? else {
            return Ok(Plan::Token(self.kernels_for(dtype)?));
        };
        let key = (dtype, spec.lanes);
        let mut map = self.row_kernels.lock().map_err(|_| device_err("kernel map poisoned"))?;
        if let Some(k) = map.get(&key) {
            return Ok(Plan::Rows(k.clone()));
        }
        let k = self.ctx.cached(&spec, |ctx| RowKernels::build(ctx, &spec))?;
        map.insert(key, k.clone());
        Ok(Plan::Rows(k))
    }

    /// Name of the adapter the router runs on (e.g. `"NVIDIA H100 80GB HBM3"`).
    pub fn adapter_name(&self) -> &str {
        &self.ctx.adapter().name
    }

    /// The context (device, queue, adapter description).
    pub fn context(&self) -> &Arc<WgpuContext> {
        &self.ctx
    }

    /// Compiles (or fetches from the context's cache) the kernels for `dtype` now, so that the
    /// first routing call does not pay for it.
    pub fn prepare(&self, dtype: LogitsDtype) -> Result<(), RouteError> {
        self.kernels_for(dtype)?;
        self.plan(1, dtype)?;
        self.plan(usize::MAX, dtype).map(|_| ())
    }

    fn kernels_for(&self, dtype: LogitsDtype) -> Result<Arc<KernelSet>, RouteError> {
        let mut map = self.kernels.lock().map_err(|_| device_err("kernel map poisoned"))?;
        if let Some(k) = map.get(&dtype) {
            return Ok(k.clone());
        }
        let spec = KernelSpec::new(&self.cfg, dtype, self.prune);
        let k = self.ctx.cached(&spec, |ctx| KernelSet::build(ctx, &spec))?;
        map.insert(dtype, k.clone());
        Ok(k)
    }

    fn check_cols(&self, rows: usize, cols: usize) -> Result<(), RouteError> {
        if cols != self.cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: self.cfg.num_experts(),
                rows,
                cols,
            });
        }
        Ok(())
    }

    /// Copies host logits to a new device buffer (f64 is rounded to f32, as the f32 compute
    /// does); route it through [`LogitsBuffer::view`].
    pub fn upload_logits(&self, logits: &LogitsRef<'_>) -> Result<LogitsBuffer, RouteError> {
        let (rows, cols) = logits.dim();
        let (bytes, dtype) = host_bytes(logits);
        let b = bytes.bytes();
        let size = (b.len() as u64).div_ceil(16).max(1) * 16;
        let buffer = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-router logits"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut v = b.to_vec();
        v.resize(size as usize, 0);
        self.ctx.queue.write_buffer(&buffer, 0, &v);
        Ok(LogitsBuffer {
            buffer,
            rows,
            cols,
            dtype,
        })
    }

    /// Preallocated outputs for [`WgpuRouter::enqueue_route`] / [`WgpuRouter::enqueue_replay`]:
    /// batches of `rows` rows of `dtype`.
    pub fn alloc_buffers(&self, rows: usize, dtype: LogitsDtype) -> RouteBuffers {
        let k = self.cfg.top_k();
        RouteBuffers {
            ids: DeviceIds {
                buffer: self.out_buffer(rows, "moe-router ids"),
                rows,
                k,
            },
            weights: DeviceWeights {
                buffer: self.out_buffer(rows, "moe-router weights"),
                rows,
                k,
            },
            params: self.device_params(rows, dtype),
            err: self.new_err_buffer(),
            dtype,
        }
    }

    fn check_buffers(&self, logits: &DeviceLogits<'_>, t: &RouteBuffers) -> Result<(), RouteError> {
        if t.ids.rows != logits.rows || t.dtype != logits.dtype {
            return Err(RouteError::BufferTooSmall {
                buffer: "route buffers",
                detail: format!(
                    "they were made for {} rows of {} and are used with {} rows of {}",
                    t.ids.rows,
                    t.dtype.name(),
                    logits.rows,
                    logits.dtype.name()
                ),
            });
        }
        Ok(())
    }

    /// Records the routing of device `logits` into `enc` without any synchronisation: ids and
    /// weights land in `t`. Errors (NaN/+inf, all-masked rows) are only flagged in `t`; read
    /// them with [`WgpuRouter::take_status`] after the submission. For embedding routing
    /// in a larger command stream and for benchmarks.
    pub fn enqueue_route(
        &self,
        enc: &mut wgpu::CommandEncoder,
        logits: &DeviceLogits<'_>,
        t: &RouteBuffers,
    ) -> Result<(), RouteError> {
        self.check_buffers(logits, t)?;
        self.encode_device(enc, false, logits, &t.ids.buffer, &t.weights.buffer, &t.params, &t.err)
    }

    /// Records the replay (weights of the ids already in `t.ids()`) of device `logits` into
    /// `enc`, like [`WgpuRouter::enqueue_route`].
    pub fn enqueue_replay(
        &self,
        enc: &mut wgpu::CommandEncoder,
        logits: &DeviceLogits<'_>,
        t: &RouteBuffers,
    ) -> Result<(), RouteError> {
        self.check_buffers(logits, t)?;
        self.encode_device(enc, true, logits, &t.ids.buffer, &t.weights.buffer, &t.params, &t.err)
    }

    /// Waits for the queue, returns the first error latched in `out` since the last call (in
    /// the reference router's order: invalid replay ids, then rows in order) and clears it.
    /// `logits` are the logits of the flagged dispatches: the flagged row is read back from them
    /// to name the expert and value, as the reference does.
    pub fn take_status(&self, out: &RouteBuffers, logits: &DeviceLogits<'_>) -> Result<(), RouteError> {
        let e = self.ctx.read_bytes(&out.err, 0, 16)?;
        self.ctx.queue.write_buffer(&out.err, 0, &[0u8; 16]);
        let err: [u32; 4] = bytemuck::pod_read_unaligned(&e);
        self.decode_flags(err, logits, &out.ids.buffer)
    }

    /// Reads a device ids buffer into a host array.
    fn ids_host(&self, ids: &DeviceIds) -> Result<Array2<u32>, RouteError> {
        let b = self.ctx.read_bytes(&ids.buffer, 0, (ids.rows * ids.k * 4) as u64)?;
        Array2::from_shape_vec((ids.rows, ids.k), bytemuck::pod_collect_to_vec(&b))
            .map_err(|e| device_err(e.to_string()))
    }
}

impl Router for WgpuRouter {
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
        self.vjp_device(logits, ids, grad, losses)
    }
    fn weights_from_host(&self, weights: &moe_router_core::HostMatrix) -> Result<DeviceWeights, RouteError> {
        if self.cfg.compute_dtype() != ComputeDtype::F32 {
            return Err(RouteError::unsupported(
                "wgpu",
                "f64 compute (the wgpu backend computes in f32; f64 is CPU-only)",
            ));
        }
        let a = weights.to_f32();
        let (rows, k) = a.dim();
        let v: Vec<f32> = a.iter().copied().collect();
        let buffer = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-router weights"),
            size: ((rows * k * 4) as u64).max(16).div_ceil(16) * 16,
            usage: crate::buffers::STORAGE_OUT,
            mapped_at_creation: false,
        });
        if !v.is_empty() {
            self.ctx.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(&v));
        }
        Ok(DeviceWeights { buffer, rows, k })
    }
    fn logits_grad_to_host(&self, grad: &DeviceGrad) -> Result<moe_router_core::HostGrad, RouteError> {
        let b = self
            .ctx
            .read_bytes(&grad.buffer, 0, (grad.rows * grad.cols * 4) as u64)?;
        let a = Array2::from_shape_vec((grad.rows, grad.cols), bytemuck::pod_collect_to_vec(&b))
            .map_err(|e| device_err(e.to_string()))?;
        Ok(moe_router_core::HostGrad::F32(a))
    }
    fn first_differing_row(&self, a: &DeviceIds, b: &DeviceIds) -> Result<Option<usize>, RouteError> {
        if a.dim() != b.dim() {
            return Ok(Some(0));
        }
        if a.buffer == b.buffer {
            return Ok(None);
        }
        let (x, y) = (self.ids_host(a)?, self.ids_host(b)?);
        Ok(x.outer_iter().zip(y.outer_iter()).position(|(p, q)| p != q))
    }
    fn backend_name(&self) -> &'static str {
        "wgpu"
    }
    fn batch_rows(&self, logits: &DeviceLogits<'_>) -> usize {
        logits.dim().0
    }
    fn route(
        &self,
        logits: &DeviceLogits<'_>,
        _site: &CallSite<'_>,
    ) -> Result<Routed<DeviceIds, DeviceWeights>, RouteError> {
        let (t, e) = logits.dim();
        self.check_cols(t, e)?;
        self.run_device(logits, None)
    }
    fn weights_for(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        _site: &CallSite<'_>,
    ) -> Result<DeviceWeights, RouteError> {
        let (t, e) = logits.dim();
        self.check_cols(t, e)?;
        if ids.rows != t || ids.k != self.cfg.top_k() {
            return Err(RouteError::IdsShape {
                expected_rows: t,
                expected_k: self.cfg.top_k(),
                rows: ids.rows,
                cols: ids.k,
            });
        }
        Ok(self.run_device(logits, Some(ids))?.weights)
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
        let buffer = self.out_buffer(rows, "moe-router ids");
        let v: Vec<u32> = ids.iter().copied().collect();
        if !v.is_empty() {
            self.ctx.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(&v));
        }
        Ok(DeviceIds { buffer, rows, k })
    }
    fn ids_to_host(&self, ids: &DeviceIds) -> Result<Array2<u32>, RouteError> {
        self.ids_host(ids)
    }
    fn weights_to_host(&self, weights: &DeviceWeights) -> Result<HostWeights, RouteError> {
        let b = self
            .ctx
            .read_bytes(&weights.buffer, 0, (weights.rows * weights.k * 4) as u64)?;
        let a = Array2::from_shape_vec((weights.rows, weights.k), bytemuck::pod_collect_to_vec(&b))
            .map_err(|e| device_err(e.to_string()))?;
        Ok(HostWeights::F32(a))
    }
    fn record_ids(&self, ids: &DeviceIds, sink: IdsSink) -> Result<(), RouteError> {
        sink(self.ids_host(ids)?.view());
        Ok(())
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
    fn replay_with_fallback(
        &self,
        logits: &DeviceLogits<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
        site: &CallSite<'_>,
    ) -> Result<Routed<DeviceIds, DeviceWeights>, RouteError> {
        // Fallback rows carry ROUTER_SELECTS (the caller's convention, enforced here): the
        // replay kernel selects them and writes their ids in place, in the same dispatch.
        let dev = with_router_rows_marked(ids, router_rows, |ids| self.ids_from_host(ids))?;
        let weights = self.weights_for(logits, &dev, site)?;
        Ok(Routed { ids: dev, weights })
    }
}
