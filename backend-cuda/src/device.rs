//! Device discovery, contexts and the per-device module cache.

use crate::kernels::{self, BackwardVariant, LogitsDtype, Part, RouterVariant};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use moe_router_core::RouteError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub(crate) const BACKEND: &str = "cuda";

pub(crate) fn dev_err(e: DriverError) -> RouteError {
    RouteError::device_with_source(BACKEND, format!("{e:?}"), e)
}

pub(crate) fn unavailable(reason: impl Into<String>) -> RouteError {
    RouteError::Unavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// Checks that NVRTC can be loaded (for compiling kernels). Needs no driver or device.
pub fn probe_nvrtc() -> Result<(), RouteError> {
    // SAFETY: `is_culib_present` only tries to dlopen the library candidates and closes them.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(unavailable("NVRTC (libnvrtc.so.13) not found on the loader path"))
    }
}

/// Checks that the CUDA driver and NVRTC load and that at least one device exists; the error
/// says what is missing. Every CUDA entry point calls this before touching cudarc, whose
/// dynamic loader would otherwise panic on a machine without CUDA.
pub fn probe() -> Result<usize, RouteError> {
    static PROBE: OnceLock<Result<usize, RouteError>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // SAFETY: as above, a dlopen probe.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err(unavailable("CUDA driver library (libcuda.so.1) not found"));
            }
            probe_nvrtc()?;
            match CudaContext::device_count() {
                Ok(n) if n > 0 => Ok(n as usize),
                Ok(_) => Err(unavailable("no CUDA device present")),
                Err(e) => Err(unavailable(format!("CUDA driver failed to initialise: {e:?}"))),
            }
        })
        .clone()
}

/// Compiles and loads `variants` on device `ordinal`, and the backward kernels of the same
/// dtypes, numerics and score functions, with `threads` parallel NVRTC compilations, so that
/// later routing and backward calls find their kernels cached (NVRTC takes 0.1–2 s per
/// variant).
pub fn precompile(ordinal: usize, variants: &[RouterVariant], threads: usize) -> Result<(), RouteError> {
    let dev = Device::get(ordinal)?;
    let mut backward: Vec<BackwardVariant> = Vec::new();
    for v in variants {
        let b = BackwardVariant {
            dtype: v.dtype,
            portable: v.portable,
            score: v.score,
        };
        if !backward.contains(&b) {
            backward.push(b);
        }
    }
    // The backward modules first: they are the largest, and fewer.
    let jobs = backward.len() + variants.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_err = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= jobs {
                        break;
                    }
                    let r = match backward.get(i) {
                        Some(b) => dev.backward_kernels(*b).map(|_| ()),
                        None => dev.router_kernels(variants[i - backward.len()]).map(|_| ()),
                    };
                    if let Err(e) = r
                        && let Ok(mut f) = first_err.lock()
                    {
                        f.get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_err.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// The route and replay kernels of one variant, loaded on one device.
#[derive(Debug)]
pub(crate) struct RouterKernels {
    pub route: CudaFunction,
    pub replay: CudaFunction,
    /// Replay that selects the rows marked `ROUTER_SELECTS` itself (fallback rows).
    pub replay_fallback: CudaFunction,
    _module: Arc<CudaModule>,
}

/// Statistics kernels of one dtype, loaded on one device.
#[derive(Debug)]
pub(crate) struct StatsKernels {
    pub aux_stats: CudaFunction,
    pub tokens_per_expert: CudaFunction,
    _module: Arc<CudaModule>,
}

/// The backward kernels of one variant, loaded on one device.
#[derive(Debug)]
pub(crate) struct BackwardKernels {
    pub aux_counts: CudaFunction,
    pub grad_sparse: CudaFunction,
    pub grad_dense: CudaFunction,
    pub grad_rows8: CudaFunction,
    pub grad_rows16: CudaFunction,
    /// The other K <= 8 instantiations (staged, early, late), in
    /// [`crate::backward::BackwardRowsVariant`] order after the piped one.
    pub rows8_alt: [CudaFunction; 3],
    _module: Arc<CudaModule>,
}

impl BackwardKernels {
    /// The `bwd_grad_rows` instantiation for top-`k` of `e` experts (slot arrays of 8 or 16).
    pub fn grad_rows(&self, k: i32, e: i32) -> &CudaFunction {
        use crate::backward::{BackwardRowsVariant as V, backward_rows_variant};
        if k > 8 {
            return &self.grad_rows16;
        }
        match backward_rows_variant().resolve(usize::try_from(e).unwrap_or(0)) {
            V::Staged => &self.rows8_alt[0],
            V::Early => &self.rows8_alt[1],
            V::Late => &self.rows8_alt[2],
            V::Piped | V::Default => &self.grad_rows8,
        }
    }
}

/// One device: its context, routing stream and loaded modules.
#[derive(Debug)]
pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub arch: &'static str,
    pub sm: &'static str,
    pub sms: usize,
    pub smem_optin: usize,
    /// Programmatic dependent launch (compute capability 9.0+).
    pub pdl: bool,
    routers: Mutex<HashMap<RouterVariant, Arc<RouterKernels>>>,
    stats: Mutex<HashMap<LogitsDtype, Arc<StatsKernels>>>,
    backward: Mutex<HashMap<BackwardVariant, Arc<BackwardKernels>>>,
}

fn arch_of(major: i32, minor: i32) -> Result<&'static str, RouteError> {
    Ok(match (major, minor) {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (m, _) if m >= 9 => "compute_90",
        (8, _) => "compute_80",
        _ => {
            return Err(RouteError::unsupported(
                BACKEND,
                format!("compute capability {major}.{minor}: the CUDA backend needs 8.0 or newer (cp.async)"),
            ));
        }
    })
}

fn set_smem(f: &CudaFunction, optin: usize) -> Result<(), RouteError> {
    use cudarc::driver::result::function::{get_function_attribute, set_function_attribute};
    // SAFETY: `f` is a live function handle of a loaded module; the value set is the device's
    // opt-in limit less the kernel's static shared memory, both queried from the driver.
    unsafe {
        let stat = get_function_attribute(
            f.cu_function(),
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
        )
        .map_err(dev_err)?;
        set_function_attribute(
            f.cu_function(),
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            optin as i32 - stat,
        )
    }
    .map_err(dev_err)
}

impl Device {
    /// The device of `ordinal`, created once per process.
    pub fn get(ordinal: usize) -> Result<Arc<Device>, RouteError> {
        let n = probe()?;
        if ordinal >= n {
            return Err(unavailable(format!(
                "CUDA device {ordinal} does not exist ({n} present)"
            )));
        }
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
        let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().map_err(|_| unavailable("device table poisoned"))?;
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("cannot create a context: {e:?}")))?;
        // SAFETY: called before this context allocates anything. The backend synchronises its
        // two streams itself: kernels run on `stream`; the record side stream waits on an event
        // recorded after the kernel, and a recorded buffer is kept alive until its copy is done.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev_err)?;
        let (major, minor) = ctx.compute_capability().map_err(dev_err)?;
        let arch = arch_of(major, minor)?;
        let sm: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let name = ctx.name().map_err(dev_err)?;
        use cudarc::driver::sys::CUdevice_attribute_enum as A;
        let sms = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(dev_err)? as usize;
        let smem_optin = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(dev_err)? as usize;
        let d = Arc::new(Device {
            ctx,
            stream,
            name,
            arch,
            sm,
            sms,
            smem_optin,
            pdl: major >= 9,
            routers: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            backward: Mutex::new(HashMap::new()),
        });
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    fn load(&self, src: &str, opts: cudarc::nvrtc::CompileOptions) -> Result<Arc<CudaModule>, RouteError> {
        let name = opts.name.clone().unwrap_or_default();
        let options = kernels::option_strings(&opts, self.sm);
        // An optional directory of compiled modules (`MOE_ROUTER_CUDA_CUBIN_CACHE`, filled by
        // `nvrtc-check --cache=DIR` or by earlier runs), keyed by the hash of source and options.
        let cached = std::env::var_os("MOE_ROUTER_CUDA_CUBIN_CACHE")
            .map(|d| std::path::PathBuf::from(d).join(kernels::cubin_cache_name(src, &options)));
        let cubin = match cached.as_ref().and_then(|f| std::fs::read(f).ok()) {
            Some(c) => c,
            None => {
                let c = kernels::compile_cubin(src, &name, &options)
                    .map_err(|log| RouteError::device(BACKEND, format!("kernel compilation failed: {log}")))?;
                if let Some(f) = &cached {
                    // Best effort: a cache that cannot be written only costs a compile next time.
                    let _ = std::fs::write(f, &c);
                }
                c
            }
        };
        self.ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(dev_err)
    }

    /// The routing kernels of `v`, compiled and loaded on first use.
    pub fn router_kernels(&self, v: RouterVariant) -> Result<Arc<RouterKernels>, RouteError> {
        if let Some(k) = self
            .routers
            .lock()
            .map_err(|_| unavailable("module cache poisoned"))?
            .get(&v)
        {
            return Ok(k.clone());
        }
        // Compile outside the lock so that several variants can compile in parallel.
        let module = self.load(&v.source(), v.options(self.arch))?;
        // The row replay kernel selects fallback rows itself; the tile one has a separate entry.
        let (rn, pn, fbn) = match v.part {
            Part::Row => (
                "row_route".to_string(),
                "row_replay".to_string(),
                "row_replay".to_string(),
            ),
            Part::Tile(n) => (
                format!("tile_route_k{n}"),
                format!("tile_replay_k{n}"),
                format!("tile_replay_fb_k{n}"),
            ),
            Part::Warp(n) => (
                format!("warp_route_n{n}"),
                format!("warp_replay_n{n}"),
                format!("warp_replay_fb_n{n}"),
            ),
        };
        let route = module.load_function(&rn).map_err(dev_err)?;
        let replay = module.load_function(&pn).map_err(dev_err)?;
        let replay_fallback = module.load_function(&fbn).map_err(dev_err)?;
        set_smem(&route, self.smem_optin)?;
        set_smem(&replay, self.smem_optin)?;
        set_smem(&replay_fallback, self.smem_optin)?;
        let k = Arc::new(RouterKernels {
            route,
            replay,
            replay_fallback,
            _module: module,
        });
        let mut map = self.routers.lock().map_err(|_| unavailable("module cache poisoned"))?;
        Ok(map.entry(v).or_insert(k).clone())
    }

    /// The statistics kernels of `dtype`, compiled and loaded on first use.
    pub fn stats_kernels(&self, dtype: LogitsDtype) -> Result<Arc<StatsKernels>, RouteError> {
        let mut map = self.stats.lock().map_err(|_| unavailable("module cache poisoned"))?;
        if let Some(k) = map.get(&dtype) {
            return Ok(k.clone());
        }
        let module = self.load(&kernels::stats_source(dtype), kernels::stats_options(dtype, self.arch))?;
        let aux_stats = module.load_function("aux_stats").map_err(dev_err)?;
        let tokens_per_expert = module.load_function("tokens_per_expert").map_err(dev_err)?;
        set_smem(&aux_stats, self.smem_optin)?;
        set_smem(&tokens_per_expert, self.smem_optin)?;
        let k = Arc::new(StatsKernels {
            aux_stats,
            tokens_per_expert,
            _module: module,
        });
        map.insert(dtype, k.clone());
        Ok(k)
    }

    /// The backward kernels of `v`, compiled and loaded on first use.
    pub fn backward_kernels(&self, v: BackwardVariant) -> Result<Arc<BackwardKernels>, RouteError> {
        if let Some(k) = self
            .backward
            .lock()
            .map_err(|_| unavailable("module cache poisoned"))?
            .get(&v)
        {
            return Ok(k.clone());
        }
        let module = self.load(&v.source(), v.options(self.arch))?;
        let aux_counts = module.load_function("bwd_aux_counts").map_err(dev_err)?;
        let grad_sparse = module.load_function("bwd_grad_sparse").map_err(dev_err)?;
        let grad_dense = module.load_function("bwd_grad_dense").map_err(dev_err)?;
        let grad_rows8 = module.load_function("bwd_grad_rows8").map_err(dev_err)?;
        let grad_rows16 = module.load_function("bwd_grad_rows16").map_err(dev_err)?;
        let rows8_alt = ["bwd_grad_rows8_staged", "bwd_grad_rows8_early", "bwd_grad_rows8_late"]
            .map(|n| module.load_function(n).map_err(dev_err));
        let [a, b, c] = rows8_alt;
        let rows8_alt = [a?, b?, c?];
        set_smem(&aux_counts, self.smem_optin)?;
        set_smem(&grad_sparse, self.smem_optin)?;
        set_smem(&grad_dense, self.smem_optin)?;
        let k = Arc::new(BackwardKernels {
            aux_counts,
            grad_sparse,
            grad_dense,
            grad_rows8,
            grad_rows16,
            rows8_alt,
            _module: module,
        });
        let mut map = self.backward.lock().map_err(|_| unavailable("module cache poisoned"))?;
        Ok(map.entry(v).or_insert(k).clone())
    }
}
