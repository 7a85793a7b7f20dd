//! Backend selection for the CLI: one host-level interface over the backends compiled in.
//!
//! [`AnyRouter`] wraps the CPU router and, with the cli crate's cargo features `cuda` and
//! `wgpu`, the CUDA and wgpu routers. It takes host logits and returns host ids and weights, and
//! it implements [`Router`] on host data, so it composes with the replay policies
//! ([`moe_router_core::Replayed`]) like any backend. Naming a backend that is not compiled in,
//! or whose device is absent, is a typed error that says what to do.

use crate::CliError;
use moe_router_core::{CallSite, HostWeights, LogitsRef, RouteError, Routed, Router, RouterConfig};
use moe_router_cpu::CpuRouter;
use ndarray::{Array2, ArrayView2};

/// Backends that can be named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// ndarray + rayon on the CPU (always available).
    Cpu,
    /// CUDA (NVRTC kernels; needs the cli built with `--features cuda`, a driver and a GPU).
    Cuda,
    /// wgpu (WGSL; needs the cli built with `--features wgpu` and a Vulkan or GL adapter).
    Wgpu,
}

impl BackendKind {
    /// Every backend, in the order `bench` tries them.
    pub const ALL: [BackendKind; 3] = [BackendKind::Cpu, BackendKind::Cuda, BackendKind::Wgpu];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// Whether this build of the CLI contains the backend (cargo feature).
    pub fn compiled_in(self) -> bool {
        match self {
            BackendKind::Cpu => true,
            BackendKind::Cuda => cfg!(feature = "cuda"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
        }
    }
}

/// A router on one backend, driven with host data.
#[allow(clippy::large_enum_variant)]
pub enum AnyRouter {
    /// CPU.
    Cpu(CpuRouter),
    /// CUDA (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(moe_router_cuda::CudaRouter),
    /// wgpu (feature `wgpu`).
    #[cfg(feature = "wgpu")]
    Wgpu(moe_router_wgpu::WgpuRouter),
}

impl std::fmt::Debug for AnyRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn not_built(kind: BackendKind) -> CliError {
    CliError::Route(RouteError::Unavailable {
        backend: kind.name(),
        reason: format!(
            "this moe-router was built without it; rebuild with `cargo build --release -p moe-router-cli --features {}`",
            kind.name()
        ),
    })
}

impl AnyRouter {
    /// Builds a router for `cfg` on `kind`. A backend that is not compiled in, or has no device,
    /// is a [`RouteError::Unavailable`] (wrapped in [`CliError::Route`]).
    pub fn new(kind: BackendKind, cfg: RouterConfig) -> Result<Self, CliError> {
        match kind {
            BackendKind::Cpu => Ok(AnyRouter::Cpu(CpuRouter::new(cfg))),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(AnyRouter::Cuda(moe_router_cuda::CudaRouter::new(cfg)?)),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(AnyRouter::Wgpu(moe_router_wgpu::WgpuRouter::new(cfg)?)),
            #[allow(unreachable_patterns)]
            other => Err(not_built(other)),
        }
    }

    /// Which backend this is.
    pub fn kind(&self) -> BackendKind {
        match self {
            AnyRouter::Cpu(_) => BackendKind::Cpu,
            #[cfg(feature = "cuda")]
            AnyRouter::Cuda(_) => BackendKind::Cuda,
            #[cfg(feature = "wgpu")]
            AnyRouter::Wgpu(_) => BackendKind::Wgpu,
        }
    }

    /// The device: the CPU model and thread count, the GPU name or the wgpu adapter.
    pub fn device_name(&self) -> String {
        match self {
            AnyRouter::Cpu(_) => format!("{} ({} threads)", cpu_name(), rayon_threads()),
            #[cfg(feature = "cuda")]
            AnyRouter::Cuda(r) => r.device_name().to_string(),
            #[cfg(feature = "wgpu")]
            AnyRouter::Wgpu(r) => {
                let a = r.context().adapter();
                format!("{} ({}, {})", a.name, a.backend, a.device_type)
            }
        }
    }

    /// Backend name and device description, e.g. `cpu: AMD EPYC 7B13 (2 threads)`.
    pub fn describe(&self) -> String {
        format!("{}: {}", self.kind().name(), self.device_name())
    }

    /// Routes host logits.
    pub fn route_host(&self, logits: &LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError> {
        match self {
            AnyRouter::Cpu(r) => r.route_host(logits),
            #[cfg(feature = "cuda")]
            AnyRouter::Cuda(r) => r.route_host(logits),
            #[cfg(feature = "wgpu")]
            AnyRouter::Wgpu(r) => r.route_host(logits),
        }
    }

    /// Weighs given ids on host logits.
    pub fn weights_host(&self, logits: &LogitsRef<'_>, ids: ArrayView2<'_, u32>) -> Result<HostWeights, RouteError> {
        match self {
            AnyRouter::Cpu(r) => r.weights_host(logits, ids),
            #[cfg(feature = "cuda")]
            AnyRouter::Cuda(r) => r.weights_host(logits, ids),
            #[cfg(feature = "wgpu")]
            AnyRouter::Wgpu(r) => r.weights_host(logits, ids),
        }
    }

    fn cfg(&self) -> &RouterConfig {
        match self {
            AnyRouter::Cpu(r) => r.config(),
            #[cfg(feature = "cuda")]
            AnyRouter::Cuda(r) => r.config(),
            #[cfg(feature = "wgpu")]
            AnyRouter::Wgpu(r) => r.config(),
        }
    }
}

/// [`Router`] on host data: logits are a [`LogitsRef`], ids and weights come back on the host.
/// For the GPU backends every call uploads the logits and copies the results back (the CLI's
/// convenience; embed the backend's own router to keep data on the device).
impl Router for AnyRouter {
    type Logits<'a> = LogitsRef<'a>;
    type Ids = Array2<u32>;
    type Weights = HostWeights;

    fn config(&self) -> &RouterConfig {
        self.cfg()
    }
    fn backend_name(&self) -> &'static str {
        self.kind().name()
    }
    fn batch_rows(&self, logits: &LogitsRef<'_>) -> usize {
        logits.rows()
    }
    fn route(
        &self,
        logits: &LogitsRef<'_>,
        _site: &CallSite<'_>,
    ) -> Result<Routed<Array2<u32>, HostWeights>, RouteError> {
        let (ids, weights) = self.route_host(logits)?;
        Ok(Routed { ids, weights })
    }
    fn weights_for(
        &self,
        logits: &LogitsRef<'_>,
        ids: &Array2<u32>,
        _site: &CallSite<'_>,
    ) -> Result<HostWeights, RouteError> {
        self.weights_host(logits, ids.view())
    }
    fn ids_from_host(&self, ids: ArrayView2<'_, u32>) -> Result<Array2<u32>, RouteError> {
        Ok(ids.to_owned())
    }
    fn ids_to_host(&self, ids: &Array2<u32>) -> Result<Array2<u32>, RouteError> {
        Ok(ids.clone())
    }
    fn weights_to_host(&self, weights: &HostWeights) -> Result<HostWeights, RouteError> {
        Ok(weights.clone())
    }
}

/// Threads the CPU backend uses (rayon's pool size).
pub fn rayon_threads() -> usize {
    rayon::current_num_threads()
}

/// The CPU model name from `/proc/cpuinfo` (or the architecture when unknown).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
