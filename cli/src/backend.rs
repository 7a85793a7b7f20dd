//! Backend selection for the CLI: one host-level interface over the backends compiled in.

use crate::CliError;
use moe_router_core::{HostWeights, LogitsRef, RouteError, RouterConfig};
use moe_router_cpu::CpuRouter;
use ndarray::{Array2, ArrayView2};

/// Backends that can be named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// ndarray + rayon on the CPU (always available).
    Cpu,
}

/// A router on one backend, driven with host data.
pub enum AnyRouter {
    /// CPU.
    Cpu(CpuRouter),
}

impl AnyRouter {
    /// Builds a router for `cfg` on `kind`; an absent device is a typed error.
    pub fn new(kind: BackendKind, cfg: RouterConfig) -> Result<Self, CliError> {
        match kind {
            BackendKind::Cpu => Ok(AnyRouter::Cpu(CpuRouter::new(cfg))),
        }
    }

    /// Backend name and device description.
    pub fn describe(&self) -> String {
        match self {
            AnyRouter::Cpu(_) => format!("cpu ({} threads)", rayon_threads()),
        }
    }

    /// Routes host logits.
    pub fn route_host(&self, logits: &LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError> {
        match self {
            AnyRouter::Cpu(r) => r.route_host(logits),
        }
    }

    /// Weighs given ids on host logits.
    pub fn weights_host(&self, logits: &LogitsRef<'_>, ids: ArrayView2<'_, u32>) -> Result<HostWeights, RouteError> {
        match self {
            AnyRouter::Cpu(r) => r.weights_host(logits, ids),
        }
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
