//! Backend choice at run time: [`BackendKind`] names a backend, [`AnyRouter`] is a router on
//! whichever one was chosen, driven with host data.
//!
//! The CPU backend is always compiled in; `cuda` and `wgpu` are cargo features of this crate. Naming a backend that is not compiled in, or whose device is
//! absent, is a [`RouteError::Unavailable`] that says what to do; [`AnyRouter::auto`] takes the
//! first that works: CUDA, then wgpu, then the CPU.

use moe_router_core::{
    CallSite, HostGrad, HostMatrix, HostWeights, LogitsRef, LossGrads, RouteError, Routed, Router, RouterConfig,
};
use ndarray::{Array2, ArrayView2};
use std::fmt;
use std::str::FromStr;

/// A backend, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// ndarray + rayon on the CPU (always compiled in).
    Cpu,
    /// CUDA (NVRTC kernels; feature `cuda`, a driver and a GPU at run time).
    Cuda,
    /// wgpu (WGSL; feature `wgpu` and a Vulkan or GL adapter at run time).
    Wgpu,
}

impl BackendKind {
    /// Every backend, in the order benchmarks list them.
    pub const ALL: [BackendKind; 3] = [BackendKind::Cpu, BackendKind::Cuda, BackendKind::Wgpu];

    /// The order [`AnyRouter::auto`] tries them in.
    pub const AUTO_ORDER: [BackendKind; 3] = [BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu];

    /// The names accepted by [`FromStr`] (`auto` is handled by [`AnyRouter::from_name`]).
    pub const NAMES: [&'static str; 3] = ["cpu", "cuda", "wgpu"];

    /// The backend's name: `cpu`, `cuda` or `wgpu`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// Whether this build contains the backend (cargo feature of this crate).
    pub fn compiled_in(self) -> bool {
        match self {
            BackendKind::Cpu => true,
            BackendKind::Cuda => cfg!(feature = "cuda"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    fn not_built(self) -> RouteError {
        RouteError::Unavailable {
            backend: self.name(),
            reason: format!(
                "this build of moe-router does not contain it; rebuild with the cargo feature `{}`",
                self.name()
            ),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend name that is not `cpu`, `cuda` or `wgpu`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend {0:?}; backends: cpu, cuda, wgpu (or auto)")]
pub struct UnknownBackend(pub String);

impl FromStr for BackendKind {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "wgpu" => Ok(BackendKind::Wgpu),
            other => Err(UnknownBackend(other.to_string())),
        }
    }
}

/// A router on one of the compiled-in backends, driven with host data.
///
/// It implements [`Router`] with host logits ([`LogitsRef`]) in and host ids and weights out, so
/// it composes with the replay policies ([`crate::Replayed`]) like any backend. The GPU variants
/// upload the logits and copy results back on every call; to keep data on the device, use the
/// backend's own router (`AnyRouter::as_cuda`, `AnyRouter::as_wgpu` with the `cuda` and `wgpu` features).
#[allow(clippy::large_enum_variant)]
pub enum AnyRouter {
    /// CPU (always compiled in).
    Cpu(moe_router_cpu::CpuRouter),
    /// CUDA (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(moe_router_cuda::CudaRouter),
    /// wgpu (feature `wgpu`).
    #[cfg(feature = "wgpu")]
    Wgpu(moe_router_wgpu::WgpuRouter),
}

impl fmt::Debug for AnyRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Calls `$body` with the inner router of every compiled-in variant.
macro_rules! each {
    ($self:expr, $r:ident => $body:expr) => {
        match $self {
            AnyRouter::Cpu($r) => $body,
            #[cfg(feature = "cuda")]
            AnyRouter::Cuda($r) => $body,
            #[cfg(feature = "wgpu")]
            AnyRouter::Wgpu($r) => $body,
        }
    };
}

impl AnyRouter {
    /// A router for `cfg` on `kind`. A backend that is not compiled in, or has no device, is a
    /// [`RouteError::Unavailable`] that says why.
    pub fn new(kind: BackendKind, cfg: RouterConfig) -> Result<Self, RouteError> {
        match kind {
            BackendKind::Cpu => Ok(AnyRouter::Cpu(moe_router_cpu::CpuRouter::new(cfg))),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(AnyRouter::Cuda(moe_router_cuda::CudaRouter::new(cfg)?)),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(AnyRouter::Wgpu(moe_router_wgpu::WgpuRouter::new(cfg)?)),
            #[allow(unreachable_patterns)]
            other => Err(other.not_built()),
        }
    }

    /// The first backend that is compiled in and has a device, in the order CUDA, wgpu, CPU. When
    /// none does, the error lists why each was passed over.
    pub fn auto(cfg: RouterConfig) -> Result<Self, RouteError> {
        let mut why = Vec::new();
        for kind in BackendKind::AUTO_ORDER {
            match AnyRouter::new(kind, cfg.clone()) {
                Ok(r) => return Ok(r),
                Err(RouteError::Unavailable { backend, reason }) => why.push(format!("{backend}: {reason}")),
                Err(other) => return Err(other),
            }
        }
        Err(RouteError::Unavailable {
            backend: "auto",
            reason: why.join("; "),
        })
    }

    /// A router from a backend name: `cpu`, `cuda`, `wgpu` or `auto` ([`AnyRouter::auto`]).
    /// Any other name is a [`RouteError::Unavailable`] listing the names.
    pub fn from_name(name: &str, cfg: RouterConfig) -> Result<Self, RouteError> {
        if name == "auto" {
            return AnyRouter::auto(cfg);
        }
        match name.parse::<BackendKind>() {
            Ok(kind) => AnyRouter::new(kind, cfg),
            Err(e) => Err(RouteError::Unavailable {
                backend: "unknown",
                reason: e.to_string(),
            }),
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
            AnyRouter::Cpu(_) => format!("{} ({} threads)", cpu_name(), rayon::current_num_threads()),
            #[cfg(feature = "cuda")]
            AnyRouter::Cuda(r) => r.device_name().to_string(),
            #[cfg(feature = "wgpu")]
            AnyRouter::Wgpu(r) => {
                let a = r.context().adapter();
                format!("{} ({}, {})", a.name, a.backend, a.device_type)
            }
        }
    }

    /// Backend name and device, e.g. `cpu: AMD EPYC 7B13 (2 threads)`.
    pub fn describe(&self) -> String {
        format!("{}: {}", self.kind().name(), self.device_name())
    }

    /// The CPU router, if this is one.
    pub fn as_cpu(&self) -> Option<&moe_router_cpu::CpuRouter> {
        match self {
            AnyRouter::Cpu(r) => Some(r),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The CUDA router, if this is one.
    #[cfg(feature = "cuda")]
    pub fn as_cuda(&self) -> Option<&moe_router_cuda::CudaRouter> {
        match self {
            AnyRouter::Cuda(r) => Some(r),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The wgpu router, if this is one.
    #[cfg(feature = "wgpu")]
    pub fn as_wgpu(&self) -> Option<&moe_router_wgpu::WgpuRouter> {
        match self {
            AnyRouter::Wgpu(r) => Some(r),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

/// [`Router`] on host data: logits are a [`LogitsRef`], ids and weights come back on the host.
impl Router for AnyRouter {
    type Logits<'a> = LogitsRef<'a>;
    type Ids = Array2<u32>;
    type Weights = HostWeights;
    type LogitsGrad = HostGrad;

    fn config(&self) -> &RouterConfig {
        each!(self, r => r.config())
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
        site: &CallSite<'_>,
    ) -> Result<Routed<Array2<u32>, HostWeights>, RouteError> {
        let (ids, weights) = each!(self, r => r.route_host_at(logits, site))?;
        Ok(Routed { ids, weights })
    }
    fn weights_for(
        &self,
        logits: &LogitsRef<'_>,
        ids: &Array2<u32>,
        site: &CallSite<'_>,
    ) -> Result<HostWeights, RouteError> {
        each!(self, r => r.weights_host_at(logits, ids.view(), site))
    }
    fn weights_vjp(
        &self,
        logits: &LogitsRef<'_>,
        ids: &Array2<u32>,
        grad: &HostWeights,
        losses: &LossGrads<'_>,
        site: &CallSite<'_>,
    ) -> Result<HostGrad, RouteError> {
        each!(self, r => r.weights_vjp_host_at(logits, ids.view(), grad, losses, site))
    }
    fn weights_from_host(&self, weights: &HostMatrix) -> Result<HostWeights, RouteError> {
        Ok(moe_router_core::reference::host_in_compute_precision(
            self.config(),
            weights,
        ))
    }
    fn logits_grad_to_host(&self, grad: &HostGrad) -> Result<HostGrad, RouteError> {
        Ok(grad.clone())
    }
    fn first_differing_row(&self, a: &Array2<u32>, b: &Array2<u32>) -> Result<Option<usize>, RouteError> {
        if a.dim() != b.dim() {
            return Ok(Some(0));
        }
        Ok(a.outer_iter().zip(b.outer_iter()).position(|(x, y)| x != y))
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
    fn with_host_logits<T, F>(&self, logits: &LogitsRef<'_>, f: F) -> Result<T, RouteError>
    where
        F: for<'l> FnOnce(&LogitsRef<'l>) -> Result<T, RouteError>,
    {
        f(logits)
    }
    fn flush_records(&self) -> Result<(), RouteError> {
        each!(self, r => r.flush_records())
    }
    fn replay_with_fallback(
        &self,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
        site: &CallSite<'_>,
    ) -> Result<Routed<Array2<u32>, HostWeights>, RouteError> {
        each!(self, r => r.with_host_logits(logits, |l| {
            let out = r.replay_with_fallback(l, ids, router_rows, site)?;
            Ok(Routed {
                ids: r.ids_to_host(&out.ids)?,
                weights: r.weights_to_host(&out.weights)?,
            })
        }))
    }
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
