//! The CPU backend passes the shared conformance suite: bit-identical to the reference router in
//! portable mode for every config, dtype and hard case; f64 compute equals the reference's f64.

use crate::conformance::{self, Backend, Size};
use moe_router::Router;
use moe_router::cpu::CpuRouter;
use moe_router::{ComputeDtype, HostWeights, LogitsRef, RouteError, RouterConfig};
use ndarray::{Array2, ArrayView2};

pub struct Cpu;

impl Backend for Cpu {
    fn name(&self) -> String {
        "cpu".into()
    }
    fn supports(&self, _cfg: &RouterConfig, _dtype: &str) -> bool {
        true
    }
    fn route(&self, cfg: &RouterConfig, logits: LogitsRef<'_>) -> Result<(Array2<u32>, HostWeights), RouteError> {
        CpuRouter::new(cfg.clone()).route_host(&logits)
    }
    fn weights_for(
        &self,
        cfg: &RouterConfig,
        logits: LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
    ) -> Result<HostWeights, RouteError> {
        CpuRouter::new(cfg.clone()).weights_host(&logits, ids)
    }
    fn replay_fallback(
        &self,
        cfg: &RouterConfig,
        logits: LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        router_rows: &[usize],
    ) -> Result<(Array2<u32>, HostWeights), RouteError> {
        conformance::host_replay_fallback(&CpuRouter::new(cfg.clone()), logits, ids, router_rows)
    }
}

#[test]
fn cpu_is_bit_identical_to_reference_on_random_configs_and_dtypes() {
    conformance::check_random(
        &Cpu,
        Size {
            cases: 160,
            max_tokens: 64,
        },
    );
}

#[test]
fn cpu_native_mode_matches_reference_ids_and_weights_within_tolerance() {
    conformance::check_native(&Cpu);
}

#[test]
fn cpu_reports_bad_logits_and_bad_replay_ids_with_row() {
    conformance::check_errors(&Cpu);
}

#[test]
fn cpu_replay_selects_fallback_rows_itself_bit_identical_to_reference() {
    conformance::check_replay_fallback(&Cpu, Size::CI);
}

#[test]
fn cpu_is_bit_identical_on_large_shapes_up_to_512_experts_and_k16() {
    conformance::check_large(&Cpu);
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
    let (_, w) = Cpu.route(&cfg, LogitsRef::F64(l.view())).unwrap();
    assert!(matches!(w, HostWeights::F64(_)));
}
