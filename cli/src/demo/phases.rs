//! The phases of the demo, which run the model and its routers: the rollout (recording the
//! routes) and the trainer (without or with replay), compared with the rollout as it goes.

use super::DemoArgs;
use super::report::RunReport;
use crate::CliError;
use crate::model::{ForwardNumerics, Rng, SyntheticModel};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_router::metrics::Comparator;
use moe_router::trace::Trace;
use moe_router::{BatchLayout, CallSite, HostWeights, LayerId, LogitsRef, Pass, Router, RowAddr, Segment, SeqId};
use ndarray::Array2;
use std::io::IsTerminal;
use std::time::Instant;

fn f32_weights(w: HostWeights) -> Array2<f32> {
    match w {
        HostWeights::F32(a) => a,
        other => other.to_f32(),
    }
}

/// The generated sequences: tokens, and per position the rollout's final hidden state and the
/// log-probability of the token that follows.
pub(super) struct Rollout {
    tokens: Vec<Vec<u32>>,
    hidden: Vec<Vec<f32>>,
    next_logprob: Vec<Vec<f32>>,
}

pub(super) fn progress(len: u64, msg: &str) -> ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template("{msg:>22} [{bar:40}] {pos}/{len} {elapsed}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_string());
    pb
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

/// Whole sequences packed in order into micro-batches of at most `budget` tokens (a sequence
/// longer than the budget gets a micro-batch of its own).
pub(super) fn micro_batches(seqs: &[(SeqId, usize)], budget: usize) -> Vec<Vec<(SeqId, usize)>> {
    let mut out: Vec<Vec<(SeqId, usize)>> = Vec::new();
    let mut cur = Vec::new();
    let mut n = 0usize;
    for &(s, l) in seqs {
        if !cur.is_empty() && n + l > budget {
            out.push(std::mem::take(&mut cur));
            n = 0;
        }
        cur.push((s, l));
        n += l;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The inference engine: prefill every prompt (packed), then decode step by step; decode
/// batches hold the live sequences, padded to a multiple of 8 rows (a CUDA-graph bucket).
pub(super) fn rollout<R>(
    a: &DemoArgs,
    model: &SyntheticModel,
    routers: &[R],
    lens: &[usize],
    num: ForwardNumerics,
    rng: &mut Rng,
) -> Result<Rollout, CliError>
where
    R: for<'l> Router<Logits<'l> = LogitsRef<'l>, Ids = Array2<u32>, Weights = HostWeights>,
{
    let b = lens.len();
    let h = a.hidden;
    let layer_ids = model.moe_layer_ids();
    let mut tokens: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..a.prompt_len).map(|_| rng.below(a.vocab as u64) as u32).collect())
        .collect();
    let mut hidden: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0f32; l * h]).collect();
    let mut next_lp: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0f32; l]).collect();
    let max_len = lens.iter().copied().max().unwrap_or(0);
    let pb = progress((max_len - a.prompt_len) as u64, "rollout (recording)");

    let step = |layout: &BatchLayout, toks: &[u32], pos: &[u64]| -> Result<Vec<f32>, CliError> {
        let out = model.forward(toks, pos, num, |i, logits| {
            let site = CallSite::layer(layer_ids[i]).with_layout(layout);
            let r = routers[i].route(&logits.view(), &site)?;
            Ok::<_, CliError>((r.ids, f32_weights(r.weights)))
        })?;
        Ok(out)
    };

    // Prefill: all prompts packed, positions 0..P.
    let p = a.prompt_len;
    let layout = BatchLayout::packed(&(0..b).map(|s| (SeqId(s as u64), p)).collect::<Vec<_>>())
        .map_err(|e| CliError::Input(e.to_string()))?;
    let toks: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
    let pos: Vec<u64> = (0..b).flat_map(|_| 0..p as u64).collect();
    let hs = step(&layout, &toks, &pos)?;
    for s in 0..b {
        for j in 0..p {
            let row = &hs[(s * p + j) * h..(s * p + j + 1) * h];
            hidden[s][j * h..(j + 1) * h].copy_from_slice(row);
            let lp = model.next_token_logprobs(row, num);
            if j + 1 < p {
                next_lp[s][j + 1] = lp[tokens[s][j + 1] as usize];
            } else {
                let mut r = Rng::new(a.seed ^ 0x5A5A, (s as u64) << 32 | (j as u64 + 1));
                let t = sample(&lp, &mut r);
                next_lp[s][j + 1] = lp[t as usize];
                tokens[s].push(t);
            }
        }
    }
    // Decode: feed position `q` of every sequence that still has a token to produce.
    for q in p..max_len.saturating_sub(1) {
        let live: Vec<usize> = (0..b).filter(|&s| q + 1 < lens[s]).collect();
        if live.is_empty() {
            break;
        }
        let mut segs: Vec<Segment> = live
            .iter()
            .map(|&s| Segment::Tokens {
                seq: SeqId(s as u64),
                start: q as u64,
                len: 1,
            })
            .collect();
        let pad = live.len().next_multiple_of(8) - live.len();
        segs.push(Segment::Padding { len: pad });
        let layout = BatchLayout::new(segs).map_err(|e| CliError::Input(e.to_string()))?;
        let mut toks: Vec<u32> = live.iter().map(|&s| tokens[s][q]).collect();
        let mut pos: Vec<u64> = vec![q as u64; live.len()];
        toks.extend(std::iter::repeat_n(0, pad));
        pos.extend(std::iter::repeat_n(0, pad));
        let hs = step(&layout, &toks, &pos)?;
        for (r, &s) in live.iter().enumerate() {
            let row = &hs[r * h..(r + 1) * h];
            hidden[s][q * h..(q + 1) * h].copy_from_slice(row);
            let lp = model.next_token_logprobs(row, num);
            let mut rr = Rng::new(a.seed ^ 0x5A5A, (s as u64) << 32 | (q as u64 + 1));
            let t = sample(&lp, &mut rr);
            next_lp[s][q + 1] = lp[t as usize];
            tokens[s].push(t);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(Rollout {
        tokens,
        hidden,
        next_logprob: next_lp,
    })
}

/// The trainer: every micro-batch, split zigzag over `cp` ranks, through the whole model;
/// compares each routing call with the rollout trace as it goes. With `recompute`, every
/// routing call is asked again as [`Pass::Recompute`] and must give the same ids.
#[allow(clippy::too_many_arguments)]
pub(super) fn train<R>(
    a: &DemoArgs,
    model: &SyntheticModel,
    routers: &[R],
    groups: &[Vec<(SeqId, usize)>],
    num: ForwardNumerics,
    rollout: &Rollout,
    rollout_trace: &Trace,
    recompute: bool,
    pb: &ProgressBar,
) -> Result<RunReport, CliError>
where
    R: for<'l> Router<Logits<'l> = LogitsRef<'l>, Ids = Array2<u32>, Weights = HostWeights>,
{
    let t0 = Instant::now();
    let h = a.hidden;
    let layer_ids = model.moe_layer_ids();
    let mut cmp = Comparator::new(model.top_k());
    let mut recompute_bad = 0u64;
    let (mut d2, mut n2) = (0f64, 0f64);
    let (mut k3, mut extreme, mut resp) = (0f64, 0u64, 0u64);
    for group in groups {
        for rank in 0..a.cp {
            let layout = BatchLayout::zigzag_rank(group, a.cp, rank).map_err(|e| CliError::Input(e.to_string()))?;
            let addrs: Vec<(usize, usize)> = layout
                .iter_rows()
                .filter_map(|r| match r {
                    RowAddr::Token(s, p) => Some((s.0 as usize, p as usize)),
                    RowAddr::Padding => None,
                })
                .collect();
            let toks: Vec<u32> = addrs.iter().map(|&(s, p)| rollout.tokens[s][p]).collect();
            let pos: Vec<u64> = addrs.iter().map(|&(_, p)| p as u64).collect();
            let hs = model.forward(&toks, &pos, num, |i, logits| {
                let layer = LayerId(layer_ids[i]);
                let site = CallSite::layer(layer.0).with_layout(&layout);
                let r = routers[i].route(&logits.view(), &site)?;
                if recompute {
                    let again = routers[i].route(&logits.view(), &site.with_pass(Pass::Recompute))?;
                    recompute_bad += u64::from(again.ids != r.ids);
                }
                cmp.add_batch(rollout_trace, layer, &layout, r.ids.view())
                    .map_err(|e| CliError::Input(e.to_string()))?;
                Ok::<_, CliError>((r.ids, f32_weights(r.weights)))
            })?;
            for (r, &(s, p)) in addrs.iter().enumerate() {
                let len = rollout.tokens[s].len();
                if p + 1 >= len {
                    continue; // the last token was never routed in the rollout
                }
                let row = &hs[r * h..(r + 1) * h];
                let reference = &rollout.hidden[s][p * h..(p + 1) * h];
                for (x, y) in row.iter().zip(reference) {
                    d2 += f64::from(x - y).powi(2);
                    n2 += f64::from(*y).powi(2);
                }
                if p + 1 >= a.prompt_len {
                    let lp = model.next_token_logprobs(row, num);
                    let d =
                        f64::from(lp[rollout.tokens[s][p + 1] as usize]) - f64::from(rollout.next_logprob[s][p + 1]);
                    k3 += d.exp() - 1.0 - d;
                    extreme += u64::from(d.abs() > std::f64::consts::LN_2);
                    resp += 1;
                }
            }
            pb.inc(1);
        }
    }
    let div = |x: f64, n: f64| if n > 0.0 { x / n } else { 0.0 };
    Ok(RunReport {
        comparison: cmp.finish(),
        final_hidden_rel_l2: div(d2, n2).sqrt(),
        k3_kl: div(k3, resp as f64),
        extreme_token_fraction: div(extreme as f64, resp as f64),
        fallback_rows: None,
        replay_counts: None,
        recompute_mismatched_calls: recompute.then_some(recompute_bad),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
