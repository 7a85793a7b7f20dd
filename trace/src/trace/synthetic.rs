//! Synthetic, realistic routing traces for tests, benchmarks and size measurements: correlated
//! logits routed through the [`ReferenceRouter`].
//!
//! Per layer, each expert has a fixed popularity (`N(0, popularity²)`, so the load is uneven
//! like a real router's); per (sequence, layer) a latent vector follows an AR(1) process over
//! positions (`z ← ρ·z + √(1−ρ²)·N(0, 1)`), so consecutive tokens share experts. The logits
//! `scale·z + popularity` are routed by the reference router (softmax, top-K) with the config
//! given. Deterministic for a seed.

use super::{Trace, TraceError, TraceHeader};
use moe_router_core::Router;
use moe_router_core::config::RouterConfig;
use moe_router_core::layout::{LayerId, SeqId};
use moe_router_core::logits::LogitsRef;
use moe_router_core::reference::ReferenceRouter;
use ndarray::Array2;

/// Parameters of a synthetic trace.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticRoutes {
    /// Routing config (E, K, score function, ...).
    pub config: RouterConfig,
    /// MoE layer ids.
    pub layers: Vec<u32>,
    /// Number of sequences (ids `0..sequences`).
    pub sequences: u64,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Temporal correlation ρ of the latent logits (0 = independent tokens).
    pub rho: f64,
    /// Scale of the latent part of the logits.
    pub scale: f64,
    /// Standard deviation of the per-expert popularity.
    pub popularity: f64,
    /// Seed.
    pub seed: u64,
}

impl SyntheticRoutes {
    /// Defaults: ρ = 0.9, scale 2, popularity 0.5, seed 1.
    pub fn new(config: RouterConfig, layers: Vec<u32>, sequences: u64, tokens: usize) -> Self {
        SyntheticRoutes {
            config,
            layers,
            sequences,
            tokens,
            rho: 0.9,
            scale: 2.0,
            popularity: 0.5,
            seed: 1,
        }
    }

    /// The logits `[tokens, E]` of one (sequence, layer).
    pub fn logits(&self, seq: u64, layer_index: usize) -> Array2<f32> {
        let e = self.config.num_experts();
        let mut pop_rng = Rng::new(self.seed ^ 0x9E37_79B9_7F4A_7C15 ^ (layer_index as u64).wrapping_mul(0xA24B_AED4));
        let pop: Vec<f64> = (0..e).map(|_| pop_rng.normal() * self.popularity).collect();
        let mut rng = Rng::new(
            self.seed
                .wrapping_add(seq.wrapping_mul(0x1000_0000_01B3))
                .wrapping_add((layer_index as u64) << 40),
        );
        let mut z: Vec<f64> = (0..e).map(|_| rng.normal()).collect();
        let innov = (1.0 - self.rho * self.rho).max(0.0).sqrt();
        let mut out = Array2::<f32>::zeros((self.tokens, e));
        for t in 0..self.tokens {
            for (j, zj) in z.iter_mut().enumerate() {
                if t > 0 {
                    *zj = self.rho * *zj + innov * rng.normal();
                }
                out[[t, j]] = (self.scale * *zj + pop[j]) as f32;
            }
        }
        out
    }

    /// Routes every (sequence, layer) and returns the trace.
    pub fn generate(&self) -> Result<Trace, TraceError> {
        let header = TraceHeader::for_config(&self.config, &self.layers)?.with_producer("moe-router synthetic");
        let mut trace = Trace::new(header);
        let router = ReferenceRouter::new(self.config.clone());
        for seq in 0..self.sequences {
            for (li, &layer) in self.layers.iter().enumerate() {
                let l = self.logits(seq, li);
                let (ids, _) = router
                    .route_host(&LogitsRef::F32(l.view()))
                    .map_err(|e| TraceError::InvalidHeader(format!("synthetic routing failed: {e}")))?;
                trace.append(SeqId(seq), LayerId(layer), 0, ids.view())?;
            }
        }
        trace.shrink_to_fit();
        Ok(trace)
    }
}

/// SplitMix64 with Box–Muller normals (no external dependency).
#[derive(Debug, Clone)]
struct Rng(u64, Option<f64>);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed, None)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        if let Some(x) = self.1.take() {
            return x;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let a = std::f64::consts::TAU * v;
        self.1 = Some(r * a.sin());
        r * a.cos()
    }
}
