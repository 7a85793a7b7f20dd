//! Adapter selection and the per-device context (device, queue, limits, pipeline cache).

use moe_router_core::RouteError;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Environment variable naming the wgpu backend(s) to use: a comma list of `vulkan`, `gl`
/// (case-insensitive). Overrides the default (every backend compiled in).
pub const ENV_BACKEND: &str = "MOE_ROUTER_WGPU_BACKEND";
/// Environment variable with a case-insensitive substring of the adapter name to use (for
/// example `llvmpipe`, `lavapipe`, `H100`).
pub const ENV_ADAPTER: &str = "MOE_ROUTER_WGPU_ADAPTER";

pub(crate) const BACKEND: &str = "wgpu";

pub(crate) fn device_err(message: impl Into<String>) -> RouteError {
    RouteError::device(BACKEND, message)
}

pub(crate) fn unavailable(reason: impl Into<String>) -> RouteError {
    RouteError::Unavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// How to pick the adapter (GPU or software rasteriser) the router runs on.
///
/// The default takes the best adapter available: discrete GPU, then integrated, virtual, then
/// CPU (software) adapters; Vulkan before GL on equal rank. Environment variables
/// [`ENV_BACKEND`] and [`ENV_ADAPTER`] override it ([`AdapterOptions::from_env`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct AdapterOptions {
    /// Backends to consider, as a comma list (`"vulkan"`, `"gl"`, `"vulkan,gl"`); `None` = all
    /// compiled in.
    pub backends: Option<String>,
    /// Case-insensitive substring the adapter name must contain; `None` = any.
    pub name_contains: Option<String>,
}

impl AdapterOptions {
    /// Options from [`ENV_BACKEND`] and [`ENV_ADAPTER`] (unset or empty = no restriction).
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|s| !s.trim().is_empty());
        AdapterOptions {
            backends: get(ENV_BACKEND),
            name_contains: get(ENV_ADAPTER),
        }
    }

    /// Restricts to the given backends (comma list, e.g. `"vulkan"`).
    pub fn backends(mut self, list: impl Into<String>) -> Self {
        self.backends = Some(list.into());
        self
    }

    /// Restricts to adapters whose name contains `s` (case-insensitive).
    pub fn adapter_name(mut self, s: impl Into<String>) -> Self {
        self.name_contains = Some(s.into());
        self
    }

    fn wgpu_backends(&self) -> Result<wgpu::Backends, RouteError> {
        match &self.backends {
            None => Ok(wgpu::Backends::VULKAN | wgpu::Backends::GL),
            Some(s) => {
                let b = wgpu::Backends::from_comma_list(s);
                if b.is_empty() {
                    Err(unavailable(format!(
                        "no known wgpu backend in {s:?} (expected a comma list of vulkan, gl)"
                    )))
                } else {
                    Ok(b)
                }
            }
        }
    }
}

fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    };
    (kind, backend)
}

/// Description of the adapter a context runs on.
#[derive(Debug, Clone)]
pub struct AdapterDescription {
    /// Adapter name as the driver reports it (e.g. `"NVIDIA H100 80GB HBM3"`, `"llvmpipe (LLVM
    /// 15.0.6, 256 bits)"`).
    pub name: String,
    /// wgpu backend (`"Vulkan"`, `"Gl"`).
    pub backend: String,
    /// Device type (`"DiscreteGpu"`, `"Cpu"`, ...).
    pub device_type: String,
    /// Driver name and version info.
    pub driver: String,
}

/// A wgpu device and queue with the routing pipelines compiled for it. Routers on the same
/// context share it (and its pipeline cache); [`WgpuContext::shared`] hands out one context per
/// adapter choice per process.
pub struct WgpuContext {
    _instance: wgpu::Instance,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) limits: wgpu::Limits,
    desc: AdapterDescription,
    /// Features enabled on the device (the adapter's SUBGROUP, where it has it).
    features: wgpu::Features,
    /// The adapter's subgroup size range (min, max).
    subgroup_sizes: (u32, u32),
    /// Whether the adapter is a software rasteriser (device type CPU).
    software: bool,
    /// Lanes of the subgroup row kernels once probed (`None`: they cannot run here).
    subgroup_lanes: OnceLock<Option<u32>>,
    /// Compiled pipelines shared by every router on this context: keyed by the pipelines' type
    /// and the `Debug` text of the spec they were compiled for (which determines them).
    pipelines: Mutex<HashMap<(TypeId, String), Arc<dyn Any + Send + Sync>>>,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) count_layout: wgpu::BindGroupLayout,
}

impl std::fmt::Debug for WgpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuContext")
            .field("adapter", &self.desc)
            .finish_non_exhaustive()
    }
}

type SharedMap = Mutex<HashMap<AdapterOptions, Arc<WgpuContext>>>;

fn shared_map() -> &'static SharedMap {
    static MAP: OnceLock<SharedMap> = OnceLock::new();
    MAP.get_or_init(|| Mutex::new(HashMap::new()))
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl WgpuContext {
    /// The process-wide context for `opts` (created on first use, then shared).
    pub fn shared(opts: &AdapterOptions) -> Result<Arc<WgpuContext>, RouteError> {
        let mut map = shared_map().lock().map_err(|_| device_err("context cache poisoned"))?;
        if let Some(c) = map.get(opts) {
            return Ok(c.clone());
        }
        let c = Arc::new(Self::new(opts)?);
        map.insert(opts.clone(), c.clone());
        Ok(c)
    }

    /// The adapters wgpu can see for `opts`, best first (name, backend, device type).
    pub fn list_adapters(opts: &AdapterOptions) -> Result<Vec<AdapterDescription>, RouteError> {
        let (_, adapters) = Self::enumerate(opts)?;
        Ok(adapters.iter().map(|a| describe(&a.get_info())).collect())
    }

    fn enumerate(opts: &AdapterOptions) -> Result<(wgpu::Instance, Vec<wgpu::Adapter>), RouteError> {
        let backends = opts.wgpu_backends()?;
        let mut idesc = wgpu::InstanceDescriptor::new_without_display_handle();
        idesc.backends = backends;
        let instance = wgpu::Instance::new(idesc);
        let mut adapters: Vec<wgpu::Adapter> = pollster::block_on(instance.enumerate_adapters(backends))
            .into_iter()
            .filter(|a| {
                let info = a.get_info();
                let compute = a
                    .get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS);
                let name_ok = opts
                    .name_contains
                    .as_ref()
                    .is_none_or(|n| info.name.to_lowercase().contains(&n.to_lowercase()));
                compute && name_ok
            })
            .collect();
        adapters.sort_by_key(|a| rank(&a.get_info()));
        Ok((instance, adapters))
    }

    /// Creates a new (unshared) context on the best adapter matching `opts`.
    ///
    /// Returns [`RouteError::Unavailable`] when no adapter with compute shaders matches.
    pub fn new(opts: &AdapterOptions) -> Result<WgpuContext, RouteError> {
        let (instance, adapters) = Self::enumerate(opts)?;
        let Some(adapter) = adapters.into_iter().next() else {
            return Err(unavailable(format!(
                "no wgpu adapter with compute shaders found (backends {:?}, adapter filter {:?}); \
                 install a Vulkan driver (e.g. mesa-vulkan-drivers) or Mesa GL",
                opts.backends.as_deref().unwrap_or("vulkan,gl"),
                opts.name_contains.as_deref().unwrap_or("none")
            )));
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        if limits.max_storage_buffers_per_shader_stage < 5 {
            return Err(unavailable(format!(
                "adapter {:?} allows {} storage buffers per shader stage; the router needs 5",
                info.name, limits.max_storage_buffers_per_shader_stage
            )));
        }
        // Subgroup operations are optional: the row kernels use them where the adapter has them.
        let features = adapter.features() & wgpu::Features::SUBGROUP;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("moe-router"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| unavailable(format!("adapter {:?}: request_device failed: {e}", info.name)))?;
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            eprintln!("moe-router-wgpu: uncaptured wgpu error: {e}");
        }));
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("moe-router route"),
            entries: &[
                uniform(0),
                storage(1, true),
                storage(2, true),
                storage(3, false),
                storage(4, false),
                storage(5, false),
            ],
        });
        let count_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("moe-router stats"),
            entries: &[uniform(0), storage(1, true), storage(2, true), storage(3, false)],
        });
        Ok(WgpuContext {
            _instance: instance,
            device,
            queue,
            limits,
            desc: describe(&info),
            features,
            subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
            software: info.device_type == wgpu::DeviceType::Cpu,
            subgroup_lanes: OnceLock::new(),
            pipelines: Mutex::new(HashMap::new()),
            layout,
            count_layout,
        })
    }

    /// The adapter this context runs on.
    pub fn adapter(&self) -> &AdapterDescription {
        &self.desc
    }

    /// The wgpu device (to create buffers the router can read, e.g. for [`crate::DeviceLogits`]).
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The device limits in force.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Whether the adapter is a software rasteriser (llvmpipe, lavapipe: device type CPU).
    pub fn is_software(&self) -> bool {
        self.software
    }

    /// Lanes per row of the subgroup row kernels on this device (its subgroup size), or `None`
    /// where they cannot run: the adapter lacks subgroup operations, its subgroup size is not one
    /// fixed power of two in 4..=128, or a probe kernel found a subgroup layout other than the one
    /// the kernels rely on (aligned blocks of consecutive invocations). Probed once per context.
    pub fn subgroup_lanes(&self) -> Option<u32> {
        *self.subgroup_lanes.get_or_init(|| self.probe_subgroups())
    }

    fn probe_subgroups(&self) -> Option<u32> {
        let (lo, hi) = self.subgroup_sizes;
        if !self.features.contains(wgpu::Features::SUBGROUP)
            || lo != hi
            || !lo.is_power_of_two()
            || !(4..=128).contains(&lo)
        {
            return None;
        }
        let l = lo;
        let rw = crate::kernels::subgroup_rows_invocations(l);
        if rw > self.limits.max_compute_invocations_per_workgroup {
            return None;
        }
        let groups = 4u32;
        let n = u64::from(rw * groups);
        let src = format!(
            "const L: u32 = {l}u;\nconst RW: u32 = {rw}u;\n{}",
            crate::kernels::PROBE_SUBGROUP_WGSL
        );
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("moe-router subgroup probe"),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let pipe = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("moe-router subgroup probe"),
            layout: None,
            module: &module,
            entry_point: Some("probe"),
            compilation_options: Default::default(),
            cache: None,
        });
        let out = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-router subgroup probe"),
            size: n * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.get_bind_group_layout(0),
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: out.as_entire_binding(),
            }],
        });
        if pollster::block_on(scope.pop()).is_some() {
            return None;
        }
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("moe-router subgroup probe"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups, 1, 1);
        }
        self.queue.submit([enc.finish()]);
        let bytes = self.read_bytes(&out, 0, n * 4).ok()?;
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        words.iter().all(|&w| w == 1).then_some(l)
    }

    /// The pipelines of type `T` for `spec`, built by `build` once per context and shared by
    /// every router on it.
    pub(crate) fn cached<T: Any + Send + Sync, S: std::fmt::Debug>(
        &self,
        spec: &S,
        build: impl FnOnce(&Self) -> Result<T, RouteError>,
    ) -> Result<Arc<T>, RouteError> {
        let key = (TypeId::of::<T>(), format!("{spec:?}"));
        if let Some(k) = self
            .pipelines
            .lock()
            .map_err(|_| device_err("pipeline cache poisoned"))?
            .get(&key)
            .cloned()
        {
            return k
                .downcast::<T>()
                .map_err(|_| device_err("pipeline cache holds a wrong type"));
        }
        // Compile outside the lock (compilation can take a while); the first insert wins.
        let built: Arc<dyn Any + Send + Sync> = Arc::new(build(self)?);
        let mut map = self
            .pipelines
            .lock()
            .map_err(|_| device_err("pipeline cache poisoned"))?;
        map.entry(key)
            .or_insert(built)
            .clone()
            .downcast::<T>()
            .map_err(|_| device_err("pipeline cache holds a wrong type"))
    }

    /// Blocks until all submitted work is done.
    pub(crate) fn wait(&self) -> Result<(), RouteError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| device_err(format!("poll failed: {e}")))
    }

    /// Copies `size` bytes of `src` at `offset` to the host (blocking).
    pub(crate) fn read_bytes(&self, src: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>, RouteError> {
        if size == 0 {
            return Ok(Vec::new());
        }
        let padded = size.div_ceil(4) * 4;
        let rb = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-router readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(src, offset, &rb, 0, padded);
        self.queue.submit([enc.finish()]);
        let out = self.map_read(&rb, padded)?;
        Ok(out[..size as usize].to_vec())
    }

    /// Maps a MAP_READ buffer (after its copies were submitted) and returns its first `size` bytes.
    pub(crate) fn map_read(&self, rb: &wgpu::Buffer, size: u64) -> Result<Vec<u8>, RouteError> {
        let slice = rb.slice(0..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| device_err("map callback dropped"))?
            .map_err(|e| device_err(format!("buffer map failed: {e}")))?;
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| device_err(format!("mapped range: {e}")))?;
            view.to_vec()
        };
        rb.unmap();
        Ok(out)
    }
}

fn describe(info: &wgpu::AdapterInfo) -> AdapterDescription {
    AdapterDescription {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
    }
}
