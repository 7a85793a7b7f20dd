//! The demo's report: the JSON summary (`OUT/summary.json`) and its types, the per-layer mismatch
//! plot, and the story printed at the end with its table.

use super::train::{TrainingReport, TrainingStep};
use super::{DemoArgs, numerics_name};
use crate::CliError;
use crate::model::{Accumulation, ModelSpec, Precision, SyntheticModel};
use crate::plot::{LayerSeries, StepPanel, StepScale, StepSeries, plot_mismatch_per_layer, plot_training_curves};
use moe_router::Numerics;
use moe_router::metrics::{Comparison, PolicyCounts};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One training run compared with the rollout.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The R3 paper's metrics against the rollout trace (fallback rows are not compared: the
    /// rollout has no route for them; they are `rows_only_in_b`).
    pub comparison: Comparison,
    /// Relative L2 distance `‖h_train − h_rollout‖ / ‖h_rollout‖` of the final hidden states over
    /// every routed token.
    pub final_hidden_rel_l2: f64,
    /// k3 estimate of KL(rollout ‖ training) over response tokens: mean of `e^d − 1 − d`, with
    /// `d = log p_train − log p_rollout` of the sampled token.
    pub k3_kl: f64,
    /// Fraction of response tokens with `|d| > ln 2` (the R3 paper's extreme tokens, τ = 2).
    pub extreme_token_fraction: f64,
    /// Replay only: token rows that had no recorded route (the last position of each
    /// sequence) and were routed by the trainer itself, per training forward pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_rows: Option<u64>,
    /// Replay only: the policy's cumulative fallback and replayed rows per layer (forward and
    /// recompute calls both count, so each row appears twice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_counts: Option<PolicyCounts>,
    /// Replay only: routing calls asked again in the recompute pass whose ids differed from the
    /// forward pass (0: recompute sees the same experts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recompute_mismatched_calls: Option<u64>,
    /// Wall time of the run in seconds.
    pub seconds: f64,
}

/// The JSON summary written to `OUT/summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// Routing rule (preset name).
    pub preset: String,
    /// E.
    pub num_experts: usize,
    /// K.
    pub top_k: usize,
    /// Model sizes.
    pub model: ModelSpec,
    /// Model layer ids of the MoE layers (layer 0 is dense).
    pub moe_layers: Vec<u32>,
    /// Parameters of the synthetic model.
    pub parameters: usize,
    /// Sequences generated.
    pub sequences: usize,
    /// Tokens in all sequences.
    pub tokens: u64,
    /// Tokens routed in the rollout (every token but the last of each sequence).
    pub routed_tokens: u64,
    /// Rollout settings.
    pub rollout: PhaseSettings,
    /// Trainer settings (the training runs above and the training section below).
    pub trainer: PhaseSettings,
    /// Training micro-batches (each split over `cp` ranks).
    pub micro_batches: usize,
    /// Context-parallel ranks.
    pub cp: usize,
    /// Rollout wall time in seconds.
    pub rollout_seconds: f64,
    /// Training without replay, against the rollout.
    pub without_replay: RunReport,
    /// Training with R3 replay, against the rollout.
    pub with_replay: RunReport,
    /// The training section (`--train-steps`): the gates trained without and with replay, per
    /// step. Absent with `--train-steps 0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingReport>,
    /// Files written.
    pub files: Vec<String>,
}

/// Numerics and backend of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSettings {
    /// Backend and device.
    pub backend: String,
    /// Activation precision.
    pub precision: Precision,
    /// Accumulation order of the matmuls.
    pub accumulation: Accumulation,
    /// Router numerics.
    pub router_numerics: Numerics,
}

fn per_layer(c: &Comparison, layers: &[u32]) -> Vec<f64> {
    layers
        .iter()
        .map(|l| {
            c.per_layer
                .iter()
                .find(|m| m.layer == *l)
                .map_or(0.0, |m| m.mismatch_fraction)
        })
        .collect()
}

/// Draws the fraction of routers that differ from the rollout per MoE layer, for both training
/// runs, to `OUT/mismatch.png` and `OUT/mismatch.svg`; returns the files written.
pub(super) fn plot_mismatch(
    a: &DemoArgs,
    model: &SyntheticModel,
    layer_ids: &[u32],
    without: &RunReport,
    with: &RunReport,
) -> Result<Vec<PathBuf>, CliError> {
    let plot_series = [
        LayerSeries {
            label: "training without replay".into(),
            values: per_layer(&without.comparison, layer_ids),
        },
        LayerSeries {
            label: "training with R3 replay".into(),
            values: per_layer(&with.comparison, layer_ids),
        },
    ];
    let title = format!(
        "Routers that differ from the rollout ({}, E={}, K={})",
        a.preset,
        model.num_experts(),
        model.top_k()
    );
    let mut files = Vec::new();
    for ext in ["png", "svg"] {
        let p = a.out.join(format!("mismatch.{ext}"));
        plot_mismatch_per_layer(&p, &title, layer_ids, &plot_series)?;
        files.push(p);
    }
    Ok(files)
}

/// Draws the training section's per-step metrics for both runs to `OUT/training.png` and
/// `OUT/training.svg`; returns the files written.
pub(super) fn plot_training(a: &DemoArgs, t: &TrainingReport) -> Result<Vec<PathBuf>, CliError> {
    let series = |f: &dyn Fn(&TrainingStep) -> f64| {
        vec![
            StepSeries {
                label: "without replay".into(),
                values: t.without_replay.steps.iter().map(f).collect(),
            },
            StepSeries {
                label: "with R3 replay".into(),
                values: t.with_replay.steps.iter().map(f).collect(),
            },
        ]
    };
    let panels = [
        StepPanel {
            title: "k3 KL(rollout || training)".into(),
            scale: StepScale::Log,
            series: series(&|s| s.k3_kl),
        },
        StepPanel {
            title: format!(
                "tokens with ratio outside [{}, {}]",
                t.extreme_ratio_band[0], t.extreme_ratio_band[1]
            ),
            scale: StepScale::Percent,
            series: series(&|s| s.extreme_fraction),
        },
        StepPanel {
            title: "gate gradient norm".into(),
            scale: StepScale::Linear,
            series: series(&|s| s.grad_norm),
        },
        StepPanel {
            title: "routers that differ from the rollout".into(),
            scale: StepScale::Percent,
            series: series(&|s| s.router_mismatch_fraction),
        },
    ];
    let title = format!(
        "Training the gates on one rollout ({}, {} layers, {} response tokens, Adam lr {})",
        a.preset,
        t.layers,
        t.sequences * t.response_len,
        t.learning_rate
    );
    let mut files = Vec::new();
    for ext in ["png", "svg"] {
        let p = a.out.join(format!("training.{ext}"));
        plot_training_curves(&p, &title, &panels)?;
        files.push(p);
    }
    Ok(files)
}

/// Writes `summary` to `path` as pretty-printed JSON with a final newline.
pub(super) fn write_summary(path: &Path, summary: &DemoSummary) -> Result<(), CliError> {
    let json = serde_json::to_string_pretty(summary).map_err(|e| CliError::Input(e.to_string()))?;
    std::fs::write(path, json + "\n").map_err(|e| CliError::io(path, &e))
}

fn pct(x: f64) -> String {
    if x == 0.0 {
        "0%".into()
    } else if x < 0.001 {
        format!("{:.3}%", x * 100.0)
    } else {
        format!("{:.1}%", x * 100.0)
    }
}

/// The few-line story printed at the end, with the per-layer table.
pub fn story(s: &DemoSummary, a: &DemoArgs) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let w = &s.without_replay;
    let r = &s.with_replay;
    let fb = r.fallback_rows.unwrap_or(0);
    let _ = writeln!(o, "R3 demo: rollout routing replay on a synthetic MoE model");
    let _ = writeln!(
        o,
        "  model     dense layer 0 + {} MoE layers (ids {}..={}), {} routing (E={}, K={}), {:.1}M parameters",
        s.moe_layers.len(),
        s.moe_layers.first().copied().unwrap_or(0),
        s.moe_layers.last().copied().unwrap_or(0),
        s.preset,
        s.num_experts,
        s.top_k,
        s.parameters as f64 / 1e6
    );
    let _ = writeln!(
        o,
        "  rollout   {} sequences, {} tokens: {} activations, {} router math, {}",
        s.sequences,
        s.tokens,
        s.rollout.precision.name(),
        numerics_name(s.rollout.router_numerics),
        s.rollout.backend
    );
    let _ = writeln!(
        o,
        "            recorded {} routed tokens to {} in {:.1}s (each sequence's last token is never routed)",
        s.routed_tokens,
        a.out.join("rollout.mrt").display(),
        s.rollout_seconds
    );
    let _ = writeln!(
        o,
        "  training  {} activations, {} router math, {}",
        s.trainer.precision.name(),
        numerics_name(s.trainer.router_numerics),
        s.trainer.backend
    );
    let _ = writeln!(
        o,
        "            {} packed micro-batches, each split zigzag over {} context-parallel ranks; {:.1}s without, {:.1}s with replay",
        s.micro_batches, s.cp, w.seconds, r.seconds
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "  routers that differ from the rollout, per MoE layer");
    let _ = writeln!(o, "  layer   without replay   with R3 replay   R3 fallback rows");
    for l in &s.moe_layers {
        let find = |c: &Comparison| {
            c.per_layer
                .iter()
                .find(|m| m.layer == *l)
                .map_or(0.0, |m| m.mismatch_fraction)
        };
        let f = r
            .replay_counts
            .as_ref()
            .and_then(|c| c.per_layer.iter().find(|x| x.layer == *l))
            .map_or(0, |x| x.fallbacks / 2);
        let _ = writeln!(
            o,
            "  {:>5}   {:>14}   {:>14}   {:>16}",
            l,
            pct(find(&w.comparison)),
            pct(find(&r.comparison)),
            f
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "                                    without replay   with R3 replay   R3 paper (Qwen3-30B-A3B)"
    );
    let row = |o: &mut String, name: &str, x: String, y: String, paper: &str| {
        let line = format!("  {name:<32}  {x:>14}   {y:>14}   {paper}");
        let _ = writeln!(o, "{}", line.trim_end());
    };
    row(
        &mut o,
        "routers that differ",
        pct(w.comparison.router_mismatch_fraction),
        pct(r.comparison.router_mismatch_fraction),
        "~10%",
    );
    row(
        &mut o,
        "tokens with a differing layer",
        pct(w.comparison.token_any_layer_mismatch_fraction),
        pct(r.comparison.token_any_layer_mismatch_fraction),
        "94%",
    );
    row(
        &mut o,
        "differing layers per token",
        format!("{:.2}", w.comparison.mean_mismatched_layers_per_token),
        format!("{:.2}", r.comparison.mean_mismatched_layers_per_token),
        "~6 of 48",
    );
    row(
        &mut o,
        "final hidden states (rel. L2)",
        format!("{:.2e}", w.final_hidden_rel_l2),
        format!("{:.2e}", r.final_hidden_rel_l2),
        "",
    );
    row(
        &mut o,
        "k3 KL(rollout || training)",
        format!("{:.2e}", w.k3_kl),
        format!("{:.2e}", r.k3_kl),
        "",
    );
    row(
        &mut o,
        "extreme tokens (ratio > 2)",
        pct(w.extreme_token_fraction),
        pct(r.extreme_token_fraction),
        "",
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Without replay the trainer sends {} of (token, layer) pairs to other experts than the engine did: it",
        pct(w.comparison.router_mismatch_fraction)
    );
    let _ = writeln!(
        o,
        "scores the samples with a different network than the one that produced them. With R3 replay all {}",
        r.comparison.routers_compared
    );
    let _ = writeln!(
        o,
        "recorded routes are replayed exactly (recompute too: {} calls differed), {} rows without a route (the",
        r.recompute_mismatched_calls.unwrap_or(0),
        fb
    );
    let _ = writeln!(
        o,
        "never-routed last token of each sequence) fall back to the trainer's choice, and what is left of the"
    );
    let _ = writeln!(o, "gap is numerics, not routing.");
    if let Some(t) = &s.training {
        training_story(&mut o, s, t);
    }
    let _ = writeln!(o, "Wrote {}", s.files.join(", "));
    o
}

/// The steps the table shows: all up to 24, else 20 evenly spaced ones and the last.
fn shown_steps(n: usize) -> Vec<usize> {
    if n <= 24 {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..20).map(|i| i * (n - 1) / 20).collect();
    v.push(n - 1);
    v.dedup();
    v
}

/// The training section of the story: the per-step table and what its last row says.
fn training_story(o: &mut String, s: &DemoSummary, t: &TrainingReport) {
    use std::fmt::Write as _;
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Training the gates: {} layers (H={}, {} routing, E={}, K={}), {} sequences x {} response tokens",
        t.layers, t.hidden, s.preset, s.num_experts, s.top_k, t.sequences, t.response_len
    );
    let _ = writeln!(
        o,
        "  one rollout ({} numerics), then {} steps of importance-weighted policy gradient (Adam, lr {}) on it,",
        s.rollout.precision.name(),
        t.steps,
        t.learning_rate
    );
    let _ = writeln!(
        o,
        "  backward through Router::weights_vjp; ratio = pi_train / pi_rollout of the sampled token, per step:"
    );
    let _ = writeln!(o);
    let band = format!("of [{}, {}]", t.extreme_ratio_band[0], t.extreme_ratio_band[1]);
    let head = |a: &str, b: &str, c: &str, d: &str| format!("{a:>9}   {b:>11}  {c:>5}  {d:>8}");
    let h1 = head("k3 KL", "ratio out", "grad", "routers");
    let h2 = head("", &band, "norm", "differ");
    let _ = writeln!(o, "       {:-^40}    {:-^40}", " without replay ", " with R3 replay ");
    let _ = writeln!(o, "  step {h1}    {h1}");
    let _ = writeln!(o, "{}", format!("       {h2}    {h2}").trim_end());
    let cells = |x: &TrainingStep| {
        format!(
            "{:>9.2e}   {:>11}  {:>5.2}  {:>8}",
            x.k3_kl,
            pct(x.extreme_fraction),
            x.grad_norm,
            pct(x.router_mismatch_fraction)
        )
    };
    let (w, r) = (&t.without_replay.steps, &t.with_replay.steps);
    for i in shown_steps(w.len().min(r.len())) {
        let _ = writeln!(o, "  {:>4} {}    {}", w[i].step, cells(&w[i]), cells(&r[i]));
    }
    let (Some(lw), Some(lr)) = (w.last(), r.last()) else {
        return;
    };
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "At step {} the trainer that routes itself sends {} of (token, layer) pairs to other experts than the",
        lw.step,
        pct(lw.router_mismatch_fraction)
    );
    let _ = writeln!(
        o,
        "rollout did ({} at step 0): {} of its ratios are outside [{}, {}] and the k3 KL is {:.2e}. Replaying the",
        pct(w[0].router_mismatch_fraction),
        pct(lw.extreme_fraction),
        t.extreme_ratio_band[0],
        t.extreme_ratio_band[1],
        lw.k3_kl
    );
    let verdict = if lr.k3_kl < lw.k3_kl && lr.extreme_fraction <= lw.extreme_fraction {
        "the ratios stay closer to 1"
    } else {
        "replay did not bring the ratios closer to 1 here"
    };
    let _ = writeln!(
        o,
        "rollout's routes: {} outside, k3 KL {:.2e} ({verdict}; what is left is the gates' own",
        pct(lr.extreme_fraction),
        lr.k3_kl
    );
    let _ = writeln!(o, "change through the routing weights, and numerics).");
}
