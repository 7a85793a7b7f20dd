//! Routing statistics (DESIGN §2 step 9): tokens per expert, Megatron's load-balancing losses,
//! z-loss and the aux-loss-free expert-bias update. Computed on the host in f64 from the widened
//! f32 logits; device backends match these within 1e-6 relative.

use crate::config::{RouterConfig, ScoreFunction};
use crate::error::RouteError;
use crate::logits::LogitsRef;
use crate::math::NativeF64;
use crate::reference::widen_checked;
use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

/// Tokens routed to each expert.
pub fn tokens_per_expert(ids: ArrayView2<'_, u32>, num_experts: usize) -> Vec<u64> {
    let mut c = vec![0u64; num_experts];
    for &e in ids.iter() {
        if let Some(x) = c.get_mut(e as usize) {
            *x += 1;
        }
    }
    c
}

/// Megatron's aux-loss scores `[T, E]`: softmax over all E, or sigmoid / sqrt-softplus
/// normalised over all E (`s / (Σs + 1e-20)`), in f64.
pub fn aux_scores(cfg: &RouterConfig, logits: &LogitsRef<'_>) -> Result<Array2<f64>, RouteError> {
    let (t, e) = logits.dim();
    let mut out = Array2::<f64>::zeros((t, e));
    let mut z = Vec::new();
    for r in 0..t {
        widen_checked::<NativeF64>(logits, r, &mut z)?;
        // Aux statistics use f32-rounded logits, like the routing path.
        for x in z.iter_mut() {
            *x = f64::from(*x as f32);
        }
        let s: Vec<f64> = match cfg.score() {
            ScoreFunction::Softmax => {
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    return Err(RouteError::AllMasked { row: r });
                }
                let ex: Vec<f64> = z.iter().map(|&x| (x - m).exp()).collect();
                let sum: f64 = ex.iter().sum();
                ex.iter().map(|&x| x / sum).collect()
            }
            ScoreFunction::Sigmoid | ScoreFunction::SqrtSoftplus => {
                let v: Vec<f64> = z
                    .iter()
                    .map(|&x| {
                        if cfg.score() == ScoreFunction::Sigmoid {
                            1.0 / (1.0 + (-x).exp())
                        } else {
                            (x.max(0.0) + (-x.abs()).exp().ln_1p()).sqrt()
                        }
                    })
                    .collect();
                let sum: f64 = v.iter().sum();
                v.iter().map(|&x| x / (sum + 1e-20)).collect()
            }
        };
        out.row_mut(r).assign(&ndarray::ArrayView1::from(&s[..]));
    }
    Ok(out)
}

/// Plain top-k counts over aux scores (ties → lower id): Megatron's `routing_map.sum(0)` for the
/// aux loss, which ignores groups, bias and replay. The losses of this module count by the
/// logits instead ([`crate::backward::aux_counts`]), which selects the same experts (every aux
/// score is monotone in the logit) without the ties that rounding of saturated scores creates.
pub fn aux_counts(scores: ArrayView2<'_, f64>, top_k: usize) -> Vec<f64> {
    let (_, e) = scores.dim();
    let mut c = vec![0f64; e];
    let mut order: Vec<usize> = (0..e).collect();
    for row in scores.outer_iter() {
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &i in &order[..top_k] {
            c[i] += 1.0;
        }
    }
    c
}

/// `Σ_e (Σ_t probs[t,e]) · counts[e] · E·coeff / (K · T²)` — Megatron's
/// `switch_load_balancing_loss_func` for one group of T tokens.
pub fn switch_loss(scores: ArrayView2<'_, f64>, counts: &[f64], top_k: usize, coeff: f64) -> f64 {
    let (t, e) = scores.dim();
    if t == 0 {
        return 0.0;
    }
    let mut total = 0.0;
    for (ei, &cnt) in counts.iter().enumerate().take(e) {
        let p: f64 = scores.column(ei).sum();
        total += p * cnt;
    }
    total * (e as f64 * coeff) / (top_k as f64 * t as f64 * t as f64)
}

/// Counts of the aux loss per sequence: the K largest logits of every row
/// ([`crate::backward::aux_topk_row`], the order of every aux score; ties → lower id), as f64.
fn aux_counts_by_logits(
    logits: &LogitsRef<'_>,
    top_k: usize,
    seq_lens: Option<&[usize]>,
) -> Result<Vec<Vec<f64>>, RouteError> {
    Ok(crate::backward::aux_counts(logits, top_k, seq_lens)?
        .into_iter()
        .map(|c| c.into_iter().map(|x| x as f64).collect())
        .collect())
}

/// Micro-batch aux loss (`aux_loss`).
pub fn aux_loss_micro_batch(cfg: &RouterConfig, logits: &LogitsRef<'_>, coeff: f64) -> Result<f64, RouteError> {
    let s = aux_scores(cfg, logits)?;
    let c = aux_counts_by_logits(logits, cfg.top_k(), None)?;
    Ok(switch_loss(s.view(), &c[0], cfg.top_k(), coeff))
}

/// Per-sequence aux loss (`seq_aux_loss`): the loss of each sequence (consecutive rows of the
/// given lengths), averaged over sequences.
pub fn aux_loss_per_sequence(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    seq_lens: &[usize],
    coeff: f64,
) -> Result<f64, RouteError> {
    let s = aux_scores(cfg, logits)?;
    let total: usize = seq_lens.iter().sum();
    if total != s.nrows() {
        return Err(RouteError::LayoutRows {
            layout_rows: total,
            batch_rows: s.nrows(),
        });
    }
    if seq_lens.is_empty() {
        return Ok(0.0);
    }
    let counts = aux_counts_by_logits(logits, cfg.top_k(), Some(seq_lens))?;
    let mut acc = 0.0;
    let mut start = 0;
    for (&l, c) in seq_lens.iter().zip(&counts) {
        let part = s.slice(ndarray::s![start..start + l, ..]);
        acc += switch_loss(part, c, cfg.top_k(), coeff);
        start += l;
    }
    Ok(acc / seq_lens.len() as f64)
}

/// Running state of the global aux loss (`global_aux_loss`): counts accumulated over the
/// micro-batches of a global batch. Call [`GlobalAuxLoss::reset`] per global batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GlobalAuxLoss {
    counts: Vec<f64>,
    steps: u64,
}

impl GlobalAuxLoss {
    /// A fresh accumulator.
    pub fn new() -> Self {
        Self::default()
    }
    /// The running mean of the counts over the micro-batches so far (what the last
    /// [`GlobalAuxLoss::step`] used; empty before the first step): the
    /// [`crate::LossGrads::global_counts`] of the backward of that micro-batch.
    pub fn counts(&self) -> Vec<f64> {
        self.counts.iter().map(|&x| x / self.steps.max(1) as f64).collect()
    }
    /// Clears the accumulated counts.
    pub fn reset(&mut self) {
        self.counts.clear();
        self.steps = 0;
    }
    /// Adds one micro-batch and returns its loss, computed with the running mean of the counts.
    pub fn step(&mut self, cfg: &RouterConfig, logits: &LogitsRef<'_>, coeff: f64) -> Result<f64, RouteError> {
        let s = aux_scores(cfg, logits)?;
        let c = aux_counts_by_logits(logits, cfg.top_k(), None)?.remove(0);
        if self.counts.len() != c.len() {
            self.counts = vec![0.0; c.len()];
            self.steps = 0;
        }
        for (a, b) in self.counts.iter_mut().zip(&c) {
            *a += *b;
        }
        self.steps += 1;
        let mean: Vec<f64> = self.counts.iter().map(|&x| x / self.steps as f64).collect();
        Ok(switch_loss(s.view(), &mean, cfg.top_k(), coeff))
    }
}

/// z-loss: `coeff · mean_t (logsumexp_e z[t,e])²`.
pub fn z_loss(logits: &LogitsRef<'_>, coeff: f64) -> Result<f64, RouteError> {
    let (t, _) = logits.dim();
    if t == 0 {
        return Ok(0.0);
    }
    let mut z = Vec::new();
    let mut acc = 0.0;
    for r in 0..t {
        widen_checked::<NativeF64>(logits, r, &mut z)?;
        let m = z.iter().map(|&x| f64::from(x as f32)).fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return Err(RouteError::AllMasked { row: r });
        }
        let s: f64 = z.iter().map(|&x| (f64::from(x as f32) - m).exp()).sum();
        let lse = m + s.ln();
        acc += lse * lse;
    }
    Ok(coeff * acc / t as f64)
}

/// Aux-loss-free bias update: `bias += rate · sign(mean(count) − count)` (sign(0) = 0), in f32
/// as Megatron keeps the bias.
pub fn updated_bias(bias: &[f32], tokens_per_expert: &[u64], rate: f32) -> Vec<f32> {
    let e = tokens_per_expert.len().max(1) as f64;
    let mean = tokens_per_expert.iter().map(|&c| c as f64).sum::<f64>() / e;
    bias.iter()
        .zip(tokens_per_expert)
        .map(|(&b, &c)| {
            let d = mean - c as f64;
            let sign = if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            };
            b + rate * sign
        })
        .collect()
}

/// Statistics of one routed batch, as written to `stats.json` by the CLI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingStats {
    /// Tokens per expert (after capacity dropping and padding when capacity applies).
    pub tokens_per_expert: Vec<u64>,
    /// Tokens per expert of the selection before dropping (present when capacity applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_expert_before_drop: Option<Vec<u64>>,
    /// Expert capacity C (when capacity applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
    /// Dropped (token, slot) assignments (when capacity applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// Sum of the configured load-balancing losses (when a coefficient is set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// z-loss (when its coefficient is set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub z_loss: Option<f64>,
    /// Bias after one update step (when a bias and a rate are given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_bias: Option<Vec<f32>>,
    /// Replay: forced (non-sentinel) slots of the replay ids
    /// ([`crate::replay_slots::SlotCounts::replayed_slots`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_slots: Option<u64>,
    /// Replay: slots given as `-1` ("take the router's choice") in rows that force other slots,
    /// filled from the router's top-K ([`crate::replay_slots::SlotCounts::sentinel_slots`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_slots: Option<u64>,
    /// Replay: rows the router selected entirely — every slot `-1`, padding, uncovered rows
    /// ([`crate::replay_slots::SlotCounts::router_rows`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_rows: Option<u64>,
    /// Threshold replay: replayed slots the threshold dropped and refilled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_slots: Option<u64>,
    /// Threshold replay: replaced slots / replayed slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_rate: Option<f64>,
}
