//! The CPU backend passes the conformance suite: bit-identical to the reference router in
//! portable mode for every config, dtype and hard case, replay (with fallback rows, through
//! `Replayed`), statistics and errors; f64 compute equals the reference's f64.

use crate::conformance::{self, Backend, Size};
use moe_router::cpu::CpuRouter;
use moe_router::{ComputeDtype, HostWeights, LogitsRef, RouteError, RouterConfig};
use ndarray::Array2;

pub struct Cpu;

impl Backend for Cpu {
    type Router = CpuRouter;
    fn name(&self) -> String {
        "cpu".into()
    }
    fn supports(&self, _cfg: &RouterConfig, _dtype: &str) -> bool {
        true
    }
    fn router(&self, cfg: &RouterConfig) -> Result<CpuRouter, RouteError> {
        Ok(CpuRouter::new(cfg.clone()))
    }
}

#[test]
fn cpu_passes_the_conformance_suite() {
    let report = conformance::run_suite(
        &Cpu,
        Size {
            cases: 160,
            max_tokens: 64,
            large: true,
        },
    );
    assert_eq!(report.skipped, None);
}

#[test]
fn cpu_f64_compute_equals_reference_f64_and_accepts_f64_logits() {
    let cfg = RouterConfig::builder(64, 6)
        .score(moe_router::ScoreFunction::Sigmoid)
        .normalization(moe_router::Normalization::Sum { eps: 1e-20 })
        .group_limit(8, 3, moe_router::GroupScore::SumTopN(2))
        .compute_dtype(ComputeDtype::F64)
        .build()
        .unwrap();
    let l = Array2::from_shape_fn((300, 64), |(t, e)| ((t * 37 + e * 11) % 97) as f64 * 0.03 - 1.4);
    conformance::assert_same_as_reference(&Cpu, &cfg, LogitsRef::F64(l.view()), "f64");
    let (_, w) = conformance::route(&Cpu, &cfg, LogitsRef::F64(l.view())).unwrap();
    assert!(matches!(w, HostWeights::F64(_)));
}
