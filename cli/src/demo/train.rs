//! The demo's training section (`--train-steps N`): a small MoE policy trains its router (gate)
//! weights with an importance-weighted policy gradient over one rollout, once routing the
//! trainer's own way (no replay) and once replaying the rollout's routes (R3). The gradient goes
//! through [`Router::weights_vjp`] (through [`Replayed`] in both runs, so its backward tape holds
//! every backward to the ids of its forward and recompute).
//!
//! **The model.** Its own, smaller than the demo's first model (the backward runs through it
//! every step): a token embedding plus a sinusoidal position signal, then `L` MoE layers
//! `h ← h + Σ_k w_k · expert_{i_k}(rmsnorm(h))` with router logits `W_l · rmsnorm(h)` and experts
//! `H → F → H` (SiLU), then `rmsnorm` and an output head over the vocabulary. No attention: the
//! next-token distribution at a position depends on that position's token and index only. The
//! gates `W_l` train; everything else is frozen. The routing rule is `--preset`, with a seeded
//! selection bias per layer when the rule selects on one (held fixed: no bias update, no aux
//! loss — `facade/examples/train_with_replay.rs` shows both).
//!
//! **Rollout.** Engine numerics (`--rollout-precision`, `--rollout-numerics`, sums in 8 lanes):
//! `--train-sequences` prompts of [`PROMPT`] random tokens, `--train-len` sampled response tokens
//! each; every route is recorded (in memory, rows = tokens − 1) with the sampled tokens'
//! log-probabilities `log π_rollout(a_t)`.
//!
//! **A step.** The trainer (trainer numerics: `--train-precision`, `--train-numerics`, the gate
//! as a GEMM, the other sums in blocks of 16) runs the response positions
//! of every sequence as one packed batch: the forward (layer inputs kept as activation
//! checkpoints), `ρ_t = π_θ(a_t) / π_rollout(a_t)`, the loss `−mean_t A_s·ρ_t` (`A_s`: the
//! sequence's reward — its share of tokens in the first quarter of the vocabulary — minus the
//! batch mean, over the standard deviation), then the backward layer by
//! layer: recompute the layer from its checkpoint ([`Pass::Recompute`]: the same ids), the
//! upstream gradient on the routing weights `∂L/∂w_{t,k} = ∂L/∂h_t · expert_{i_k}(x_t)`,
//! `dlogits = weights_vjp(…)`, the gate's gradient `dlogits^T · X`, and the gradient on the layer
//! input through the experts and the gate. Adam updates the gates.
//!
//! **Per step** (on the step's forward, before its update): the k3 estimate of
//! KL(π_rollout ‖ π_θ) over the response tokens (mean of `ρ − 1 − log ρ`), the fraction of
//! tokens whose ratio is outside `[1/2, 2]` (the R3 paper's extreme tokens, τ = 2), the gate
//! gradient's L2 norm over all layers, the loss, and the fraction of routers whose top-k set
//! differs from the rollout's.

use super::{DemoArgs, cfg_err, numerics, replay_err};
use crate::CliError;
use crate::backend::{AnyRouter, BackendKind};
use crate::model::{Accumulation, ForwardNumerics, Precision, Rng, RouterLogits};
use half::bf16;
use moe_router::metrics::Comparator;
use moe_router::policy::{Record, RecordOutput, Replay};
use moe_router::trace::{RowConvention, Trace, TraceHeader};
use moe_router::{
    BatchLayout, CallSite, HostGrad, HostMatrix, HostWeights, LayerId, LogitsRef, LossGrads, Pass, PassThrough,
    Replayed, Router, RouterConfig, Segment, SeqId,
};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// Prompt tokens of every training sequence.
pub const PROMPT: usize = 4;
/// Hidden size of the training model.
pub const HIDDEN: usize = 32;
/// Hidden size of one expert MLP of the training model.
pub const EXPERT_FFN: usize = 16;
/// Vocabulary of the training model.
pub const VOCAB: usize = 128;
/// The band of importance ratios counted as normal: a token whose ratio is outside it is extreme.
pub const RATIO_BAND: [f64; 2] = [0.5, 2.0];
/// Largest `--train-steps`.
pub const MAX_STEPS: u32 = 10_000;

/// What one optimisation step saw (on its forward, before its update).
#[derive(Debug, Clone, Serialize)]
pub struct TrainingStep {
    /// Step index (0: the rollout's own weights).
    pub step: u32,
    /// k3 estimate of KL(π_rollout ‖ π_θ) over the response tokens: mean of `ρ − 1 − log ρ`.
    pub k3_kl: f64,
    /// Fraction of response tokens with `ρ` outside `[0.5, 2]` (the bounds are in [`TrainingReport::extreme_ratio_band`]).
    pub extreme_fraction: f64,
    /// Largest `|log ρ|` over the response tokens.
    pub max_abs_log_ratio: f64,
    /// L2 norm of the gradient on every gate weight (all layers), before the update.
    pub grad_norm: f64,
    /// The policy-gradient loss `−mean_t A_s·ρ_t`.
    pub loss: f64,
    /// Fraction of (token, layer) routers whose top-k set differs from the rollout's.
    pub router_mismatch_fraction: f64,
}

/// One training run: every step's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingRun {
    /// The steps, in order.
    pub steps: Vec<TrainingStep>,
    /// Replay only: routed rows answered from the rollout trace, summed over the steps and both
    /// passes (forward and recompute).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed_rows: Option<u64>,
    /// Wall time of the run in seconds.
    pub seconds: f64,
}

impl TrainingRun {
    /// The last step's numbers.
    pub fn last(&self) -> Option<&TrainingStep> {
        self.steps.last()
    }
}

/// The training section of `OUT/summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingReport {
    /// Optimisation steps of each run.
    pub steps: u32,
    /// Sequences of the rollout.
    pub sequences: usize,
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// Response tokens per sequence (the tokens the loss is over).
    pub response_len: usize,
    /// MoE layers of the training model (model layer ids `1..=layers`).
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Hidden size of one expert MLP.
    pub expert_ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Adam's learning rate on the gates.
    pub learning_rate: f64,
    /// The ratio band `[low, high]`: a token whose `ρ` is outside it is extreme.
    pub extreme_ratio_band: [f64; 2],
    /// Mean reward of the rollout (share of response tokens in the first quarter of the vocabulary).
    pub rollout_mean_reward: f64,
    /// Rollout wall time in seconds.
    pub rollout_seconds: f64,
    /// The trainer routes itself every step.
    pub without_replay: TrainingRun,
    /// The trainer replays the rollout's routes (R3) in the forward and the recompute.
    pub with_replay: TrainingRun,
}

/// The frozen part of the training model, its initial gates and routing rules.
struct Policy {
    e: usize,
    k: usize,
    layers: usize,
    embed: Vec<f32>,
    pos: Vec<(f32, f32)>,
    /// Per layer, per expert: up `[F, H]` then down `[H, F]`.
    experts: Vec<Vec<f32>>,
    head: Vec<f32>,
    gates0: Vec<Vec<f32>>,
    rules: Vec<RouterConfig>,
}

#[inline]
fn r16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

#[inline]
fn round_to(x: f32, p: Precision) -> f32 {
    match p {
        Precision::Bf16 => r16(x),
        Precision::F32 => x,
    }
}

fn bf16_normals(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| r16((rng.normal() * std) as f32)).collect()
}

/// `w · x` summed in the engine's (8 interleaved lanes, combined pairwise) or the trainer's
/// order (blocks of 16, front to back).
#[inline]
fn dot(w: &[f32], x: &[f32], acc: Accumulation) -> f32 {
    match acc {
        Accumulation::Lanes8 => {
            let mut lanes = [0f32; 8];
            let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
            let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
            for (a, b) in wc.zip(xc) {
                for i in 0..8 {
                    lanes[i] += a[i] * b[i];
                }
            }
            ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])) + tail
        }
        Accumulation::Blocks16 => w
            .chunks(16)
            .zip(x.chunks(16))
            .map(|(a, b)| a.iter().zip(b).fold(0f32, |s, (p, q)| s + p * q))
            .fold(0f32, |t, s| t + s),
    }
}

/// `out[r] = W[r, :] · x` for `W` `[out.len(), x.len()]`.
fn matvec(w: &[f32], x: &[f32], out: &mut [f32], acc: Accumulation) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len())) {
        *o = dot(row, x, acc);
    }
}

/// `1 / sqrt(mean(x²) + 1e-6)`.
fn inv_rms(x: &[f32]) -> f32 {
    1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + 1e-6).sqrt()
}

/// Every `h`-row of `x` normalised to unit RMS (rounded to the precision).
fn rmsnorm_rows(x: &[f32], h: usize, p: Precision) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(o, r)| {
        let inv = inv_rms(r);
        for (y, v) in o.iter_mut().zip(r) {
            *y = round_to(v * inv, p);
        }
    });
    out
}

/// The gradient on `x` of `rmsnorm(x)` given the gradient `dy` on its output, added to `dx`:
/// `r·dy − r³/H · (x·dy) · x`.
fn rmsnorm_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let r = inv_rms(x);
    let xd: f32 = x.iter().zip(dy).map(|(a, b)| a * b).sum();
    let c = r * r * r * xd / x.len() as f32;
    for ((d, &a), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d += r * g - c * a;
    }
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// Log-softmax of `z` in f32.
fn log_softmax(z: &mut [f32]) {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + z.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
    for v in z.iter_mut() {
        *v -= lse;
    }
}

impl Policy {
    fn new(a: &DemoArgs, rule: &RouterConfig) -> Result<Self, CliError> {
        let (h, f, v) = (HIDDEN, EXPERT_FFN, VOCAB);
        let e = rule.num_experts();
        let mut rng = Rng::new(a.seed, 500);
        let embed = bf16_normals(&mut rng, v * h, 1.0);
        let pos = (0..h)
            .map(|_| {
                let freq = (0.02 + 0.5 * rng.uniform()) as f32;
                (freq, (rng.uniform() * std::f64::consts::TAU) as f32)
            })
            .collect();
        let head = bf16_normals(&mut rng, v * h, 3.0 / (h as f64).sqrt());
        let mut experts = Vec::with_capacity(a.train_layers);
        let mut gates0 = Vec::with_capacity(a.train_layers);
        let mut rules = Vec::with_capacity(a.train_layers);
        for l in 0..a.train_layers {
            let mut lr = Rng::new(a.seed, 600 + l as u64);
            gates0.push(bf16_normals(&mut lr, e * h, (1.0 / h as f64).sqrt()));
            let mut ex = Vec::with_capacity(e * 2 * f * h);
            for _ in 0..e {
                ex.extend(bf16_normals(&mut lr, f * h, (1.0 / h as f64).sqrt()));
                ex.extend(bf16_normals(&mut lr, h * f, 1.0 / (f as f64).sqrt()));
            }
            experts.push(ex);
            let mut cfg = rule.clone();
            if rule.has_bias() {
                let bias: Vec<f32> = (0..e).map(|_| (lr.normal() * 0.05) as f32).collect();
                cfg.set_expert_bias(bias).map_err(cfg_err("--preset"))?;
            }
            rules.push(cfg);
        }
        Ok(Policy {
            e,
            k: rule.top_k(),
            layers: a.train_layers,
            embed,
            pos,
            experts,
            head,
            gates0,
            rules,
        })
    }

    fn layer_ids(&self) -> Vec<u32> {
        (1..=self.layers as u32).collect()
    }

    /// Input hidden states `[rows, H]`: the token's embedding plus the position signal.
    fn embed(&self, tokens: &[u32], positions: &[u64], p: Precision) -> Vec<f32> {
        let h = HIDDEN;
        let mut out = vec![0f32; tokens.len() * h];
        for (row, (&t, &q)) in out.chunks_mut(h).zip(tokens.iter().zip(positions)) {
            let e = &self.embed[t as usize * h..(t as usize + 1) * h];
            for (i, (o, &x)) in row.iter_mut().zip(e).enumerate() {
                let (freq, phase) = self.pos[i];
                *o = round_to(x + 0.5 * (q as f32 * freq + phase).sin(), p);
            }
        }
        out
    }

    /// Router logits `[rows, E]` of gate `w` on normalised inputs `xn`: the engine sums each dot
    /// product in 8 lanes ([`Accumulation::Lanes8`]); the trainer runs a GEMM (ndarray's
    /// `matrixmultiply`: blocked, vectorised, another order again).
    fn gate_logits(&self, w: &[f32], xn: &[f32], num: ForwardNumerics) -> Result<RouterLogits, CliError> {
        let e = self.e;
        let rows = xn.len() / HIDDEN;
        let shape = |e: ndarray::ShapeError| CliError::Input(format!("gate logits: {e}"));
        let z = match num.accumulation {
            Accumulation::Lanes8 => {
                let mut z = vec![0f32; rows * e];
                z.par_chunks_mut(e)
                    .zip(xn.par_chunks(HIDDEN))
                    .for_each(|(out, x)| matvec(w, x, out, num.accumulation));
                Array2::from_shape_vec((rows, e), z).map_err(shape)?
            }
            Accumulation::Blocks16 => {
                let x = ArrayView2::from_shape((rows, HIDDEN), xn).map_err(shape)?;
                let w = ArrayView2::from_shape((e, HIDDEN), w).map_err(shape)?;
                x.dot(&w.t())
            }
        };
        Ok(match num.precision {
            Precision::Bf16 => RouterLogits::Bf16(z.mapv(bf16::from_f32)),
            Precision::F32 => RouterLogits::F32(z),
        })
    }

    /// `h ← h + Σ_k w_k · expert_{ids_k}(xn)` for MoE layer `l`.
    fn apply_experts(
        &self,
        l: usize,
        h: &mut [f32],
        xn: &[f32],
        ids: &Array2<u32>,
        w: &Array2<f32>,
        num: ForwardNumerics,
    ) {
        let (hd, f) = (HIDDEN, EXPERT_FFN);
        let per = 2 * f * hd;
        let ex = &self.experts[l];
        let p = num.precision;
        h.par_chunks_mut(hd)
            .zip(xn.par_chunks(hd))
            .zip(ids.outer_iter().into_par_iter().zip(w.outer_iter().into_par_iter()))
            .for_each(|((row, x), (ids, ws))| {
                let mut mid = [0f32; EXPERT_FFN];
                let mut y = [0f32; HIDDEN];
                let mut acc = [0f32; HIDDEN];
                for (&id, &wk) in ids.iter().zip(ws.iter()) {
                    let (up, down) = ex[id as usize * per..(id as usize + 1) * per].split_at(f * hd);
                    matvec(up, x, &mut mid, num.accumulation);
                    for m in mid.iter_mut() {
                        *m = round_to(silu(*m), p);
                    }
                    matvec(down, &mid, &mut y, num.accumulation);
                    for (a, v) in acc.iter_mut().zip(y) {
                        *a += wk * round_to(v, p);
                    }
                }
                for (o, a) in row.iter_mut().zip(acc) {
                    *o = round_to(*o + a, p);
                }
            });
    }

    /// Log-probabilities `[V]` of the next token after the final hidden state `h` (engine:
    /// bf16 logits).
    fn logprobs(&self, h: &[f32], num: ForwardNumerics) -> Vec<f32> {
        let inv = inv_rms(h);
        let xn: Vec<f32> = h.iter().map(|v| round_to(v * inv, num.precision)).collect();
        let mut z = vec![0f32; VOCAB];
        matvec(&self.head, &xn, &mut z, num.accumulation);
        for v in z.iter_mut() {
            *v = round_to(*v, num.precision);
        }
        log_softmax(&mut z);
        z
    }

    /// The whole stack on one batch with the given gates; `route(l, logits)` returns layer
    /// `l`'s ids and weights. Returns the final hidden states and the layer inputs.
    fn forward(
        &self,
        x: Vec<f32>,
        gates: &[Vec<f32>],
        num: ForwardNumerics,
        mut route: impl FnMut(usize, &RouterLogits) -> Result<(Array2<u32>, Array2<f32>), CliError>,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>), CliError> {
        let mut h = x;
        let mut inputs = Vec::with_capacity(self.layers);
        for (l, gate) in gates.iter().enumerate() {
            let xn = rmsnorm_rows(&h, HIDDEN, num.precision);
            let logits = self.gate_logits(gate, &xn, num)?;
            let (ids, w) = route(l, &logits)?;
            inputs.push(h.clone());
            self.apply_experts(l, &mut h, &xn, &ids, &w, num);
        }
        Ok((h, inputs))
    }

    /// Backward through the experts of layer `l` for one row: the upstream gradient on the
    /// routing weights (`gw[k] = dh · expert_{ids_k}(x)`) and, added to `dx`, the gradient on the
    /// normalised input through the experts (`Σ_k w_k · J_k^T dh`). Trainer numerics (f32).
    #[allow(clippy::too_many_arguments)]
    fn expert_backward(&self, l: usize, x: &[f32], ids: &[u32], w: &[f32], dh: &[f32], gw: &mut [f32], dx: &mut [f32]) {
        let (hd, f) = (HIDDEN, EXPERT_FFN);
        let per = 2 * f * hd;
        let ex = &self.experts[l];
        let mut pre = [0f32; EXPERT_FFN];
        let mut act = [0f32; EXPERT_FFN];
        let mut dmid = [0f32; EXPERT_FFN];
        for ((&id, &wk), g) in ids.iter().zip(w).zip(gw.iter_mut()) {
            let (up, down) = ex[id as usize * per..(id as usize + 1) * per].split_at(f * hd);
            matvec(up, x, &mut pre, Accumulation::Blocks16);
            for (a, &p) in act.iter_mut().zip(&pre) {
                *a = silu(p);
            }
            // y = down · silu(up · x): dL/dw_k = dh · y, dL/dsilu = w_k · down^T dh.
            let mut gy = 0f32;
            dmid.fill(0.0);
            for (&dj, drow) in dh.iter().zip(down.chunks_exact(f)) {
                gy += dj * dot(drow, &act, Accumulation::Blocks16);
                for (m, &d) in dmid.iter_mut().zip(drow) {
                    *m += d * dj;
                }
            }
            *g = gy;
            for ((m, &p), urow) in dmid.iter().zip(&pre).zip(up.chunks_exact(hd)) {
                let c = wk * m * silu_grad(p);
                for (d, &u) in dx.iter_mut().zip(urow) {
                    *d += c * u;
                }
            }
        }
    }
}

/// The rollout: sequences, their recorded routes and the sampled tokens' log-probabilities.
struct Rollout {
    tokens: Vec<Vec<u32>>,
    /// Per sequence, `log π_rollout` of response token `j` (position `PROMPT + j`).
    logprob: Vec<Vec<f32>>,
    trace: Trace,
    seconds: f64,
}

fn sample(logprobs: &[f32], rng: &mut Rng) -> u32 {
    let u = rng.uniform() as f32;
    let mut acc = 0f32;
    for (i, &lp) in logprobs.iter().enumerate() {
        acc += lp.exp();
        if u < acc {
            return i as u32;
        }
    }
    (logprobs.len() - 1) as u32
}

fn layout_err(e: moe_router::LayoutError) -> CliError {
    CliError::Input(e.to_string())
}

fn host_f32(w: HostWeights) -> Array2<f32> {
    match w {
        HostMatrix::F32(a) => a,
        other => other.to_f32(),
    }
}

/// Routers for every training layer on `kind` with the given router numerics.
fn routers(policy: &Policy, kind: BackendKind, n: crate::route::NumericsArg) -> Result<Vec<AnyRouter>, CliError> {
    policy
        .rules
        .iter()
        .map(|r| {
            let cfg = r
                .to_builder()
                .numerics(numerics(n))
                .build()
                .map_err(cfg_err("--numerics"))?;
            Ok(AnyRouter::new(kind, cfg)?)
        })
        .collect()
}

/// Generates the rollout with engine numerics, recording every route.
fn rollout(a: &DemoArgs, policy: &Policy, num: ForwardNumerics) -> Result<Rollout, CliError> {
    let t0 = Instant::now();
    let layer_ids = policy.layer_ids();
    let header = TraceHeader::for_config(&policy.rules[0], &layer_ids)
        .map_err(|e| CliError::Input(format!("training rollout trace: {e}")))?
        .with_row_convention(RowConvention::TokensMinusOne)
        .with_producer("moe-router demo training rollout");
    let record = Record::in_memory(header);
    let engine: Vec<_> = routers(policy, a.backend, a.rollout_numerics)?
        .into_iter()
        .map(|r| Replayed::new(r, record.clone()).with_tape_depth(0))
        .collect();
    let s = a.train_sequences;
    let len = PROMPT + a.train_len;
    let mut rng = Rng::new(a.seed, 501);
    let mut tokens: Vec<Vec<u32>> = (0..s)
        .map(|_| (0..PROMPT).map(|_| rng.below(VOCAB as u64) as u32).collect())
        .collect();
    let mut logprob = vec![Vec::with_capacity(a.train_len); s];
    // Prefill (every prompt, packed), then decode one position of every sequence per step.
    let step = |layout: &BatchLayout, toks: &[u32], pos: &[u64]| -> Result<Vec<f32>, CliError> {
        let x = policy.embed(toks, pos, num.precision);
        let (h, _) = policy.forward(x, &policy.gates0, num, |l, logits| {
            let site = CallSite::layer(layer_ids[l]).with_layout(layout);
            let r = engine[l].route(&logits.view(), &site)?;
            Ok((r.ids, host_f32(r.weights)))
        })?;
        Ok(h)
    };
    let prefill =
        BatchLayout::packed(&(0..s).map(|i| (SeqId(i as u64), PROMPT)).collect::<Vec<_>>()).map_err(layout_err)?;
    let toks: Vec<u32> = tokens.iter().flatten().copied().collect();
    let pos: Vec<u64> = (0..s).flat_map(|_| 0..PROMPT as u64).collect();
    let mut h = step(&prefill, &toks, &pos)?;
    let mut last: Vec<usize> = (0..s).map(|i| i * PROMPT + PROMPT - 1).collect();
    for q in PROMPT..len {
        for i in 0..s {
            let lp = policy.logprobs(&h[last[i] * HIDDEN..(last[i] + 1) * HIDDEN], num);
            let mut r = Rng::new(a.seed ^ 0xA5A5, (i as u64) << 32 | q as u64);
            let t = sample(&lp, &mut r);
            logprob[i].push(lp[t as usize]);
            tokens[i].push(t);
        }
        if q + 1 == len {
            break; // the last token is never routed
        }
        let layout = BatchLayout::new(
            (0..s)
                .map(|i| Segment::Tokens {
                    seq: SeqId(i as u64),
                    start: q as u64,
                    len: 1,
                })
                .collect(),
        )
        .map_err(layout_err)?;
        let toks: Vec<u32> = tokens.iter().map(|t| t[q]).collect();
        h = step(&layout, &toks, &vec![q as u64; s])?;
        last = (0..s).collect();
    }
    drop(engine);
    let trace = match record.finish().map_err(replay_err)? {
        RecordOutput::Memory(t) => t,
        RecordOutput::File(_) => {
            return Err(CliError::Input("the training rollout records in memory".into()));
        }
    };
    Ok(Rollout {
        tokens,
        logprob,
        trace,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What both runs share: the trainer's batch and the rollout's numbers.
struct Batch<'a> {
    policy: &'a Policy,
    rollout: &'a Rollout,
    layout: BatchLayout,
    /// Embedded inputs of the batch rows (trainer numerics).
    x0: Vec<f32>,
    /// Per row: the sampled next token, its rollout log-probability, the sequence's advantage.
    targets: Vec<(u32, f32, f32)>,
    num: ForwardNumerics,
}

/// Adam on every gate weight.
struct Adam {
    lr: f32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: i32,
}

impl Adam {
    fn new(lr: f64, shapes: &[Vec<f32>]) -> Self {
        Adam {
            lr: lr as f32,
            m: shapes.iter().map(|g| vec![0.0; g.len()]).collect(),
            v: shapes.iter().map(|g| vec![0.0; g.len()]).collect(),
            t: 0,
        }
    }
    fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>]) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= self.lr * (*m / c1) / ((*v / c2).sqrt() + eps);
            }
        }
    }
}

/// The bounds every training router meets: host logits, ids, weights and gradients (the CLI's
/// [`AnyRouter`], and a [`Replayed`] one).
trait HostRouter:
    for<'l> Router<Logits<'l> = LogitsRef<'l>, Ids = Array2<u32>, Weights = HostWeights, LogitsGrad = HostGrad>
{
}

impl<R> HostRouter for R where
    R: for<'l> Router<Logits<'l> = LogitsRef<'l>, Ids = Array2<u32>, Weights = HostWeights, LogitsGrad = HostGrad>
{
}

/// One step at `gates`: the forward through `routers` (layer inputs kept as activation
/// checkpoints), the loss and the per-step numbers, and with `backward` the gradient on every
/// gate (recomputing each layer from its checkpoint, then [`Router::weights_vjp`]). Without
/// `backward` the gradient is empty and `grad_norm` is 0.
fn step<R: HostRouter>(
    b: &Batch<'_>,
    routers: &[R],
    gates: &[Vec<f32>],
    index: u32,
    backward: bool,
) -> Result<(TrainingStep, Vec<Vec<f32>>), CliError> {
    let p = b.policy;
    let (h, e, k) = (HIDDEN, p.e, p.k);
    let layer_ids = p.layer_ids();
    let rows = b.layout.rows();
    let shape = |e: ndarray::ShapeError| CliError::Input(format!("training step: {e}"));

    // ---- Forward ----
    let mut cmp = Comparator::new(k);
    let (hf, inputs) = p.forward(b.x0.clone(), gates, b.num, |l, logits| {
        let site = CallSite::layer(layer_ids[l]).with_layout(&b.layout);
        let r = routers[l].route(&logits.view(), &site)?;
        cmp.add_batch(&b.rollout.trace, LayerId(layer_ids[l]), &b.layout, r.ids.view())
            .map_err(|e| CliError::Input(e.to_string()))?;
        Ok((r.ids, host_f32(r.weights)))
    })?;

    // ---- Loss, ratios and the gradient on the final hidden states ----
    let n = rows as f64;
    let per_row: Vec<(f64, Vec<f32>)> = hf
        .par_chunks(h)
        .zip(b.targets.par_iter())
        .map(|(hr, &(tok, old, adv))| {
            let lp = p.logprobs(hr, b.num);
            let d = f64::from(lp[tok as usize]) - f64::from(old);
            // L = −mean_t A·ρ_t: dL/dlog π(a) = −A·ρ/N; dlog π(a)/dz = onehot(a) − softmax(z).
            let c = (-f64::from(adv) * d.exp() / n) as f32;
            let mut dxn = vec![0f32; h];
            for (v, (row, &l)) in p.head.chunks_exact(h).zip(&lp).enumerate() {
                let g = c * (f32::from(u8::from(v == tok as usize)) - l.exp());
                for (d, &w) in dxn.iter_mut().zip(row) {
                    *d += g * w;
                }
            }
            let mut dh = vec![0f32; h];
            rmsnorm_backward(hr, &dxn, &mut dh);
            (d, dh)
        })
        .collect();
    let (mut k3, mut extreme, mut max_d, mut loss) = (0f64, 0u64, 0f64, 0f64);
    let (lo, hi) = (RATIO_BAND[0].ln(), RATIO_BAND[1].ln());
    for ((d, _), &(_, _, adv)) in per_row.iter().zip(&b.targets) {
        k3 += d.exp() - 1.0 - d;
        extreme += u64::from(*d < lo || *d > hi);
        max_d = max_d.max(d.abs());
        loss -= f64::from(adv) * d.exp() / n;
    }
    let mut dh: Vec<f32> = per_row.into_iter().flat_map(|(_, g)| g).collect();

    // ---- Backward, from the top layer down ----
    let mut grads: Vec<Vec<f32>> = Vec::new();
    if backward {
        grads = vec![Vec::new(); p.layers];
        // The weights' term only: no aux loss, no z-loss.
        let losses = LossGrads::default();
        for l in (0..p.layers).rev() {
            // Recompute the layer from its checkpoint: the router must give the forward's ids.
            let hin = &inputs[l];
            let xn = rmsnorm_rows(hin, h, b.num.precision);
            let logits = p.gate_logits(&gates[l], &xn, b.num)?;
            let view = logits.view();
            let site = CallSite::layer(layer_ids[l]).with_layout(&b.layout);
            let again = routers[l].route(&view, &site.with_pass(Pass::Recompute))?;
            let ids: Vec<u32> = again.ids.iter().copied().collect();
            let w: Vec<f32> = host_f32(again.weights).iter().copied().collect();
            // The upstream gradient on the routing weights, and the input's through the experts.
            let mut gw = vec![0f32; rows * k];
            let mut dxn = vec![0f32; rows * h];
            gw.par_chunks_mut(k)
                .zip(dxn.par_chunks_mut(h))
                .enumerate()
                .for_each(|(t, (g, dx))| {
                    let (x, d) = (&xn[t * h..(t + 1) * h], &dh[t * h..(t + 1) * h]);
                    p.expert_backward(l, x, &ids[t * k..(t + 1) * k], &w[t * k..(t + 1) * k], d, g, dx);
                });
            let gw = Array2::from_shape_vec((rows, k), gw).map_err(shape)?;
            let dz = host_f32(routers[l].weights_vjp(&view, &again.ids, &HostMatrix::F32(gw), &losses, &site)?);
            // The gate's gradient: dlogits^T · X. The input's: dlogits · W, then through the norm.
            let xa = ArrayView2::from_shape((rows, h), &xn).map_err(shape)?;
            let wa = ArrayView2::from_shape((e, h), &gates[l]).map_err(shape)?;
            grads[l] = dz.t().dot(&xa).iter().copied().collect();
            let dxg = dz.dot(&wa);
            dxn.par_chunks_mut(h)
                .zip(dxg.outer_iter().into_par_iter())
                .for_each(|(d, g)| {
                    for (x, y) in d.iter_mut().zip(g.iter()) {
                        *x += y;
                    }
                });
            // h_out = h_in + experts(rmsnorm(h_in)): dh_in = dh_out + rmsnorm'(h_in)^T dxn.
            dh.par_chunks_mut(h)
                .zip(hin.par_chunks(h))
                .zip(dxn.par_chunks(h))
                .for_each(|((d, x), dx)| rmsnorm_backward(x, dx, d));
        }
    }
    let grad_norm = grads
        .iter()
        .flatten()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let numbers = TrainingStep {
        step: index,
        k3_kl: k3 / n,
        extreme_fraction: extreme as f64 / n,
        max_abs_log_ratio: max_d,
        grad_norm,
        loss,
        router_mismatch_fraction: cmp.finish().router_mismatch_fraction,
    };
    Ok((numbers, grads))
}

/// One run of `--train-steps` optimisation steps from the rollout's gates through `routers`
/// (each a [`Replayed`] router: its backward tape holds the backward to the ids of the forward,
/// and the recompute to them too). `end_step` is called after each step's backward (the replay
/// policy's count check).
fn run<R: HostRouter>(
    a: &DemoArgs,
    b: &Batch<'_>,
    routers: &[R],
    mut end_step: impl FnMut() -> Result<(), CliError>,
    pb: &indicatif::ProgressBar,
) -> Result<TrainingRun, CliError> {
    let t0 = Instant::now();
    let mut gates = b.policy.gates0.clone();
    let mut adam = Adam::new(a.learning_rate, &gates);
    let mut steps = Vec::with_capacity(a.train_steps as usize);
    for i in 0..a.train_steps {
        let (numbers, grads) = step(b, routers, &gates, i, true)?;
        end_step()?;
        adam.step(&mut gates, &grads);
        steps.push(numbers);
        pb.inc(1);
    }
    Ok(TrainingRun {
        steps,
        replayed_rows: None,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The trainer's batch for `rollout`: the response positions of every sequence, packed, with
/// each row's target (sampled token, rollout log-probability, sequence advantage). Also returns
/// the rollout's mean reward.
fn batch<'a>(a: &DemoArgs, policy: &'a Policy, rollout: &'a Rollout) -> Result<(Batch<'a>, f64), CliError> {
    let num = ForwardNumerics {
        precision: a.train_precision,
        accumulation: Accumulation::Blocks16,
    };
    let (s, r) = (a.train_sequences, a.train_len);
    let first = PROMPT - 1;
    let layout = BatchLayout::new(
        (0..s)
            .map(|i| Segment::Tokens {
                seq: SeqId(i as u64),
                start: first as u64,
                len: r,
            })
            .collect(),
    )
    .map_err(layout_err)?;
    let toks: Vec<u32> = rollout
        .tokens
        .iter()
        .flat_map(|t| t[first..first + r].iter().copied())
        .collect();
    let pos: Vec<u64> = (0..s).flat_map(|_| first as u64..(first + r) as u64).collect();
    // Reward: the share of response tokens in the first quarter of the vocabulary; advantage:
    // reward minus the batch mean, over the standard deviation (GRPO-style, one group).
    let rewards: Vec<f64> = rollout
        .tokens
        .iter()
        .map(|t| t[PROMPT..].iter().filter(|&&x| (x as usize) < VOCAB / 4).count() as f64 / r as f64)
        .collect();
    let mean = rewards.iter().sum::<f64>() / s as f64;
    let std = (rewards.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / s as f64).sqrt();
    let targets: Vec<(u32, f32, f32)> = (0..s)
        .flat_map(|i| {
            let adv = ((rewards[i] - mean) / (std + 1e-6)) as f32;
            (0..r).map(move |j| (rollout.tokens[i][PROMPT + j], rollout.logprob[i][j], adv))
        })
        .collect();
    let batch = Batch {
        policy,
        rollout,
        x0: policy.embed(&toks, &pos, num.precision),
        layout,
        targets,
        num,
    };
    Ok((batch, mean))
}

/// Runs the training section: the rollout, then both runs. `None` when `--train-steps 0`.
pub(super) fn training(a: &DemoArgs, rule: &RouterConfig) -> Result<Option<TrainingReport>, CliError> {
    if a.train_steps == 0 {
        return Ok(None);
    }
    let policy = Policy::new(a, rule)?;
    let layer_ids = policy.layer_ids();
    let roll_num = ForwardNumerics {
        precision: a.rollout_precision,
        accumulation: Accumulation::Lanes8,
    };
    let rollout = rollout(a, &policy, roll_num)?;
    let (batch, mean_reward) = batch(a, &policy, &rollout)?;
    let train_kind = a.train_backend.unwrap_or(a.backend);

    // Without replay: the trainer's own routes (a pass-through policy keeps the backward tape).
    let pb = super::phases::progress(u64::from(a.train_steps), "training (no replay)");
    let plain: Vec<_> = routers(&policy, train_kind, a.train_numerics)?
        .into_iter()
        .map(|r| Replayed::new(r, PassThrough))
        .collect();
    let without = run(a, &batch, &plain, || Ok(()), &pb)?;
    pb.finish_and_clear();

    // With R3: every route replayed from the rollout (strict: a missing one is an error), each
    // (layer, batch) key asked exactly twice per step (forward and recompute).
    let pb = super::phases::progress(u64::from(a.train_steps), "training (R3 replay)");
    let policy_replay = Replay::new(rollout.trace.clone(), &layer_ids)
        .map_err(replay_err)?
        .expect_each_key(2);
    let replayed: Vec<_> = routers(&policy, train_kind, a.train_numerics)?
        .into_iter()
        .map(|r| Replayed::new(r, &policy_replay))
        .collect();
    let mut with = run(
        a,
        &batch,
        &replayed,
        || policy_replay.finish().map(|_| ()).map_err(replay_err),
        &pb,
    )?;
    pb.finish_and_clear();
    with.replayed_rows = Some(policy_replay.counts().total_replayed_rows);

    Ok(Some(TrainingReport {
        steps: a.train_steps,
        sequences: a.train_sequences,
        prompt_len: PROMPT,
        response_len: a.train_len,
        layers: policy.layers,
        hidden: HIDDEN,
        expert_ffn: EXPERT_FFN,
        vocab: VOCAB,
        learning_rate: a.learning_rate,
        extreme_ratio_band: RATIO_BAND,
        rollout_mean_reward: mean_reward,
        rollout_seconds: rollout.seconds,
        without_replay: without,
        with_replay: with,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(preset: &str) -> DemoArgs {
        DemoArgs {
            preset: preset.into(),
            train_sequences: 4,
            train_len: 8,
            train_layers: 3,
            ..DemoArgs::default()
        }
    }

    /// The gradient the step computes (experts, norms, the head by hand; the routing weights
    /// through `Router::weights_vjp`; the gates as `dlogits^T · X`) is the derivative of the
    /// loss it reports: under replay the routes are fixed and the loss is smooth in the gates,
    /// so a central difference along a random direction must agree with `⟨grad, direction⟩`.
    fn gradient_matches_finite_differences(preset: &str) {
        let a = small(preset);
        let rule = moe_router::preset(preset).unwrap();
        let policy = Policy::new(&a, &rule).unwrap();
        let roll = ForwardNumerics {
            precision: Precision::Bf16,
            accumulation: Accumulation::Lanes8,
        };
        let rollout = rollout(&a, &policy, roll).unwrap();
        let (b, _) = batch(&a, &policy, &rollout).unwrap();
        let replay = Replay::new(rollout.trace.clone(), &policy.layer_ids()).unwrap();
        let routers: Vec<_> = routers(&policy, BackendKind::Cpu, a.train_numerics)
            .unwrap()
            .into_iter()
            .map(|r| Replayed::new(r, &replay))
            .collect();
        let gates = policy.gates0.clone();
        let (_, grads) = step(&b, &routers, &gates, 0, true).unwrap();
        let mut rng = Rng::new(9, 9);
        let dir: Vec<Vec<f32>> = gates
            .iter()
            .map(|g| g.iter().map(|_| rng.normal() as f32).collect())
            .collect();
        let along: f64 = grads
            .iter()
            .flatten()
            .zip(dir.iter().flatten())
            .map(|(&g, &d)| f64::from(g) * f64::from(d))
            .sum();
        let eps = 1e-3f32;
        let loss_at = |sign: f32| {
            let moved: Vec<Vec<f32>> = gates
                .iter()
                .zip(&dir)
                .map(|(g, d)| g.iter().zip(d).map(|(&x, &y)| x + sign * eps * y).collect())
                .collect();
            step(&b, &routers, &moved, 0, false).unwrap().0.loss
        };
        let fd = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * f64::from(eps));
        assert!(along.abs() > 1e-4, "{preset}: a degenerate direction ({along})");
        assert!(
            (fd - along).abs() <= 0.005 * along.abs(),
            "{preset}: finite difference {fd} vs gradient {along}"
        );
    }

    #[test]
    fn the_gate_gradient_is_the_derivative_of_the_loss_for_a_sigmoid_rule_with_groups_and_bias() {
        gradient_matches_finite_differences("deepseek-v3");
    }

    #[test]
    fn the_gate_gradient_is_the_derivative_of_the_loss_for_a_softmax_rule() {
        gradient_matches_finite_differences("qwen3-moe");
    }
}
