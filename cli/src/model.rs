//! A small synthetic Mixture-of-Experts language model, built in code from a seed, for the R3
//! demo (`moe-router demo`).
//!
//! Layer 0 is a dense MLP; layers `1..=moe_layers` are MoE layers (so the MoE layer-id map is
//! `[1, 2, …]`, not `0..L`, as in DeepSeek-V3 whose first layers are dense). Each MoE layer has a
//! router (weights `[E, H]` and, for rules that select on a bias, a per-layer selection bias) and
//! E small expert MLPs `H → F → H` (SiLU). The hidden state flows layer to layer:
//! `h ← h + Σ_k w_k · expert_k(rmsnorm(h))`. There is no attention: a token's forward depends only
//! on its own token id and position, so any batch layout gives the same result for a token
//! (given the same numerics), which is what makes a trace recorded per sequence replayable into
//! any training layout.
//!
//! Weights are bf16-representable (like a bf16 checkpoint), so the only differences between two
//! forwards are the activation precision ([`Precision`]) and the accumulation order of the
//! matrix-vector products ([`Accumulation`]): exactly the kind of difference that separates an
//! inference engine from a trainer.

use half::bf16;
use moe_router::{LogitsRef, Router, RouterConfig};
use ndarray::Array2;
use rayon::prelude::*;

/// Activation precision of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Activations rounded to bfloat16 after every layer and at every matmul input; router
    /// logits in bf16 (inference-engine style).
    Bf16,
    /// f32 activations and router logits (trainer style).
    F32,
}

/// Accumulation order of the dot products (in the router GEMM and the expert matmuls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Accumulation {
    /// 8 interleaved partial sums, combined pairwise (an inference kernel).
    Lanes8,
    /// Blocks of 16 summed front to back, then the blocks (a split-K trainer GEMM).
    Blocks16,
}

/// Numerics of one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ForwardNumerics {
    /// Activation precision.
    pub precision: Precision,
    /// Dot-product order.
    pub accumulation: Accumulation,
}

/// Sizes of the synthetic model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ModelSpec {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// Hidden size F of one expert MLP.
    pub expert_ffn: usize,
    /// Number of MoE layers (the model has one more: the dense layer 0).
    pub moe_layers: usize,
    /// Seed of every weight.
    pub seed: u64,
}

/// One MoE layer's weights.
#[derive(Debug, Clone)]
struct MoeLayer {
    /// Router weights `[E, H]`.
    router: Vec<f32>,
    /// Per expert: up projection `[F, H]` then down projection `[H, F]`, contiguous.
    experts: Vec<f32>,
}

/// The synthetic MoE model. See the module docs.
#[derive(Debug, Clone)]
pub struct SyntheticModel {
    spec: ModelSpec,
    num_experts: usize,
    top_k: usize,
    routers: Vec<RouterConfig>,
    embed: Vec<f32>,
    /// Position signal: per hidden dimension a frequency and a phase.
    pos_freq: Vec<(f32, f32)>,
    dense_up: Vec<f32>,
    dense_down: Vec<f32>,
    moe: Vec<MoeLayer>,
    lm_head: Vec<f32>,
}

/// A deterministic generator (splitmix64) for weights, prompts and sampling.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`, mixed with `stream` (independent streams per use).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = Rng(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Rounds to the nearest bf16 value (as f32).
#[inline]
fn r16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// `n` bf16-representable weights `N(0, std²)`.
fn weights(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| r16((rng.normal() * std) as f32)).collect()
}

#[inline]
fn dot(w: &[f32], x: &[f32], acc: Accumulation) -> f32 {
    match acc {
        Accumulation::Lanes8 => {
            let mut l = [0f32; 8];
            let mut wc = w.chunks_exact(8);
            let mut xc = x.chunks_exact(8);
            for (a, b) in (&mut wc).zip(&mut xc) {
                for i in 0..8 {
                    l[i] += a[i] * b[i];
                }
            }
            let mut tail = 0f32;
            for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
                tail += a * b;
            }
            ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])) + tail
        }
        Accumulation::Blocks16 => {
            let mut total = 0f32;
            for (a, b) in w.chunks(16).zip(x.chunks(16)) {
                let mut s = 0f32;
                for (p, q) in a.iter().zip(b) {
                    s += p * q;
                }
                total += s;
            }
            total
        }
    }
}

/// `out[r] = W[r, :] · x` for `W` `[rows, cols]`.
fn matvec(w: &[f32], x: &[f32], out: &mut [f32], acc: Accumulation) {
    let cols = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
        *o = dot(row, x, acc);
    }
}

fn rmsnorm(x: &[f32], out: &mut [f32], p: Precision) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + 1e-6).sqrt();
    for (o, v) in out.iter_mut().zip(x) {
        *o = round_if(v * inv, p);
    }
}

#[inline]
fn round_if(x: f32, p: Precision) -> f32 {
    match p {
        Precision::Bf16 => r16(x),
        Precision::F32 => x,
    }
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Router logits of one batch in the pass's precision.
#[derive(Debug, Clone)]
pub enum RouterLogits {
    /// bf16 logits `[T, E]`.
    Bf16(Array2<bf16>),
    /// f32 logits `[T, E]`.
    F32(Array2<f32>),
}

impl Precision {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

impl RouterLogits {
    /// A borrowed view for routing.
    pub fn view(&self) -> LogitsRef<'_> {
        match self {
            RouterLogits::Bf16(a) => LogitsRef::Bf16(a.view()),
            RouterLogits::F32(a) => LogitsRef::F32(a.view()),
        }
    }
}

impl SyntheticModel {
    /// Builds the model for `spec` with the routing rule `rule` (E and K come from it). When the
    /// rule selects on a per-layer bias (DeepSeek-V3's `e_score_correction_bias`), each MoE
    /// layer gets its own seeded bias; rules without one must not carry one.
    pub fn new(spec: ModelSpec, rule: &RouterConfig) -> Result<Self, moe_router::ConfigError> {
        let (v, h, f) = (spec.vocab, spec.hidden, spec.expert_ffn);
        let e = rule.num_experts();
        let mut rng = Rng::new(spec.seed, 1);
        let embed = weights(&mut rng, v * h, 1.0);
        let pos_freq = (0..h)
            .map(|_| {
                let f = (0.02 + 0.5 * rng.uniform()) as f32;
                (f, (rng.uniform() * std::f64::consts::TAU) as f32)
            })
            .collect();
        let dense_up = weights(&mut rng, 2 * h * h, (1.0 / h as f64).sqrt());
        let dense_down = weights(&mut rng, 2 * h * h, 0.5 / (2.0 * h as f64).sqrt());
        let mut moe = Vec::with_capacity(spec.moe_layers);
        let mut routers = Vec::with_capacity(spec.moe_layers);
        for l in 0..spec.moe_layers {
            let mut lr = Rng::new(spec.seed, 100 + l as u64);
            // Router logits ~ N(0, 1) on a normalised input, with a per-expert popularity.
            let mut router = weights(&mut lr, e * h, (1.0 / h as f64).sqrt());
            for ex in 0..e {
                let pop = (lr.normal() * 0.3) as f32;
                let row = &mut router[ex * h..(ex + 1) * h];
                row[0] = r16(row[0] + pop);
            }
            let mut experts = Vec::with_capacity(e * 2 * f * h);
            for _ in 0..e {
                experts.extend(weights(&mut lr, f * h, (1.0 / h as f64).sqrt()));
                experts.extend(weights(&mut lr, h * f, 0.6 / (f as f64).sqrt()));
            }
            let mut cfg = rule.clone();
            if rule.has_bias() {
                let bias: Vec<f32> = (0..e).map(|_| (lr.normal() * 0.05) as f32).collect();
                cfg.set_expert_bias(bias)?;
            }
            routers.push(cfg);
            moe.push(MoeLayer { router, experts });
        }
        let lm_head = weights(&mut rng, v * h, 2.0 / (h as f64).sqrt());
        let mut model = SyntheticModel {
            spec,
            num_experts: e,
            top_k: rule.top_k(),
            routers,
            embed,
            pos_freq,
            dense_up,
            dense_down,
            moe,
            lm_head,
        };
        if rule.has_bias() {
            model.balance_biases()?;
        }
        Ok(model)
    }

    /// Trains each layer's selection bias the way DeepSeek-V3 does (auxiliary-loss-free load
    /// balancing: `bias += rate · sign(mean load − load)`, [`stats::updated_bias`]) on a
    /// calibration batch of random tokens, layer by layer, so the experts are about evenly used
    /// as in a trained model.
    ///
    /// [`stats::updated_bias`]: moe_router::stats::updated_bias
    fn balance_biases(&mut self) -> Result<(), moe_router::ConfigError> {
        use moe_router::stats::{tokens_per_expert, updated_bias};
        let num = ForwardNumerics {
            precision: Precision::F32,
            accumulation: Accumulation::Blocks16,
        };
        let n = 2048;
        let mut rng = Rng::new(self.spec.seed, 3);
        let tokens: Vec<u32> = (0..n).map(|_| rng.below(self.spec.vocab as u64) as u32).collect();
        let positions: Vec<u64> = (0..n).map(|_| rng.below(256)).collect();
        let mut h = self.embed_and_dense(&tokens, &positions, num);
        for i in 0..self.moe.len() {
            let logits = self.router_logits(i, &h, num);
            let mut cfg = self.routers[i].clone();
            for step in 0..48 {
                let router = moe_router::cpu::CpuRouter::new(cfg.clone());
                let Ok((ids, _)) = router.route_host(&logits.view()) else {
                    break;
                };
                let counts = tokens_per_expert(ids.view(), self.num_experts);
                let rate = if step < 32 { 0.02 } else { 0.005 };
                let b = updated_bias(cfg.expert_bias().unwrap_or(&[]), &counts, rate);
                cfg.set_expert_bias(b)?;
            }
            self.routers[i] = cfg;
            let router = moe_router::cpu::CpuRouter::new(self.routers[i].clone());
            if let Ok((ids, w)) = router.route_host(&logits.view()) {
                self.apply_experts(i, &mut h, &ids, &w.to_f32(), num);
            }
        }
        Ok(())
    }

    /// The sizes.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The model layer ids of the MoE layers: `[1, 2, …, moe_layers]` (layer 0 is dense).
    pub fn moe_layer_ids(&self) -> Vec<u32> {
        (1..=self.spec.moe_layers as u32).collect()
    }

    /// The routing rule of MoE layer `i` (0-based among MoE layers), with its bias installed.
    pub fn router_config(&self, i: usize) -> &RouterConfig {
        &self.routers[i]
    }

    /// Parameters (all weights), for the story.
    pub fn parameters(&self) -> usize {
        let moe: usize = self.moe.iter().map(|m| m.router.len() + m.experts.len()).sum();
        self.embed.len() + self.dense_up.len() + self.dense_down.len() + moe + self.lm_head.len()
    }

    /// Input hidden states `[rows, H]` of the given tokens at the given positions (embedding plus
    /// a sinusoidal position signal of random frequencies and phases), then the dense layer 0.
    pub fn embed_and_dense(&self, tokens: &[u32], positions: &[u64], num: ForwardNumerics) -> Vec<f32> {
        let h = self.spec.hidden;
        let mut out = vec![0f32; tokens.len() * h];
        out.par_chunks_mut(h)
            .zip(tokens.par_iter().zip(positions.par_iter()))
            .for_each_init(
                || (vec![0f32; h], vec![0f32; 2 * h], vec![0f32; h]),
                |(xn, mid, y), (row, (&t, &p))| {
                    let e = &self.embed[t as usize * h..(t as usize + 1) * h];
                    for (i, (o, &v)) in row.iter_mut().zip(e).enumerate() {
                        let (freq, phase) = self.pos_freq[i];
                        let pe = (p as f32 * freq + phase).sin();
                        *o = round_if(v + 0.5 * pe, num.precision);
                    }
                    rmsnorm(row, xn, num.precision);
                    matvec(&self.dense_up, xn, mid, num.accumulation);
                    for m in mid.iter_mut() {
                        *m = round_if(silu(*m), num.precision);
                    }
                    matvec(&self.dense_down, mid, y, num.accumulation);
                    for (o, d) in row.iter_mut().zip(y.iter()) {
                        *o = round_if(*o + d, num.precision);
                    }
                },
            );
        out
    }

    /// Router logits `[rows, E]` of MoE layer `i` for hidden states `h` `[rows, H]`: bf16
    /// inputs and outputs under [`Precision::Bf16`], f32 otherwise.
    pub fn router_logits(&self, i: usize, h: &[f32], num: ForwardNumerics) -> RouterLogits {
        let hd = self.spec.hidden;
        let e = self.num_experts;
        let rows = h.len() / hd;
        let w = &self.moe[i].router;
        let mut logits = vec![0f32; rows * e];
        logits.par_chunks_mut(e).zip(h.par_chunks(hd)).for_each_init(
            || vec![0f32; hd],
            |xn, (out, x)| {
                rmsnorm(x, xn, num.precision);
                matvec(w, xn, out, num.accumulation);
            },
        );
        match num.precision {
            Precision::Bf16 => RouterLogits::Bf16(
                Array2::from_shape_vec((rows, e), logits.into_iter().map(bf16::from_f32).collect())
                    .unwrap_or_else(|_| Array2::from_elem((0, e), bf16::ZERO)),
            ),
            Precision::F32 => {
                RouterLogits::F32(Array2::from_shape_vec((rows, e), logits).unwrap_or_else(|_| Array2::zeros((0, e))))
            }
        }
    }

    /// Applies MoE layer `i`'s experts in place: `h ← h + Σ_k w_k · expert_{ids_k}(rmsnorm(h))`.
    pub fn apply_experts(&self, i: usize, h: &mut [f32], ids: &Array2<u32>, w: &Array2<f32>, num: ForwardNumerics) {
        let (hd, f) = (self.spec.hidden, self.spec.expert_ffn);
        let experts = &self.moe[i].experts;
        let per = 2 * f * hd;
        let k = ids.ncols().max(1);
        let ids = ids.as_standard_layout();
        let w = w.as_standard_layout();
        let (ids, w) = (ids.as_slice().unwrap_or(&[]), w.as_slice().unwrap_or(&[]));
        h.par_chunks_mut(hd)
            .zip(ids.par_chunks(k).zip(w.par_chunks(k)))
            .for_each_init(
                || (vec![0f32; hd], vec![0f32; f], vec![0f32; hd], vec![0f32; hd]),
                |(xn, mid, y, acc), (row, (ids, ws))| {
                    rmsnorm(row, xn, num.precision);
                    acc.fill(0.0);
                    for (&id, &wk) in ids.iter().zip(ws.iter()) {
                        let base = id as usize * per;
                        let (up, down) = experts[base..base + per].split_at(f * hd);
                        matvec(up, xn, mid, num.accumulation);
                        for m in mid.iter_mut() {
                            *m = round_if(silu(*m), num.precision);
                        }
                        matvec(down, mid, y, num.accumulation);
                        for (a, v) in acc.iter_mut().zip(y.iter()) {
                            *a += wk * round_if(*v, num.precision);
                        }
                    }
                    for (o, a) in row.iter_mut().zip(acc.iter()) {
                        *o = round_if(*o + a, num.precision);
                    }
                },
            );
    }

    /// Log-probabilities `[V]` of the next token after a final hidden state `h` `[H]`.
    pub fn next_token_logprobs(&self, h: &[f32], num: ForwardNumerics) -> Vec<f32> {
        let mut xn = vec![0f32; h.len()];
        rmsnorm(h, &mut xn, num.precision);
        let mut logits = vec![0f32; self.spec.vocab];
        matvec(&self.lm_head, &xn, &mut logits, num.accumulation);
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + logits.iter().map(|&z| (z - m).exp()).sum::<f32>().ln();
        logits.iter().map(|&z| z - lse).collect()
    }

    /// Runs the whole stack on one batch: dense layer, then every MoE layer, calling
    /// `route(moe_index, logits)` for its ids and weights. Returns the final hidden states
    /// `[rows, H]`.
    pub fn forward<E>(
        &self,
        tokens: &[u32],
        positions: &[u64],
        num: ForwardNumerics,
        mut route: impl FnMut(usize, &RouterLogits) -> Result<(Array2<u32>, Array2<f32>), E>,
    ) -> Result<Vec<f32>, E> {
        let mut h = self.embed_and_dense(tokens, positions, num);
        for i in 0..self.moe.len() {
            let logits = self.router_logits(i, &h, num);
            let (ids, w) = route(i, &logits)?;
            self.apply_experts(i, &mut h, &ids, &w, num);
        }
        Ok(h)
    }

    /// E.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// K.
    pub fn top_k(&self) -> usize {
        self.top_k
    }
}
