//! `moe-router demo`: rollout routing replay (R3), end to end, on a small synthetic MoE model.
//!
//! 1. **Rollout.** An "inference engine" generates a batch of sequences with engine-style
//!    numerics (bf16 activations, bf16 router logits, native router math, decode batches padded
//!    to a multiple of 8 rows) and records every routing decision per sequence into
//!    `OUT/rollout.mrt` ([`Record::create_file`], row convention
//!    [`RowConvention::TokensMinusOne`]: the last generated token is never routed).
//! 2. **Training, no replay.** A "trainer" re-runs the same full sequences with trainer numerics
//!    (f32 activations, portable router math, another GEMM accumulation order) in another batch
//!    layout: sequences packed into micro-batches (padding removed), each split zigzag over
//!    context-parallel ranks. Its routes are recorded to `OUT/train-no-replay.mrt`.
//! 3. **Training with R3.** The same, but every MoE router is a
//!    [`Replayed`]`<router, `[`ReplayFromFile`]`>` reading the rollout trace ([`MissingRoutes::Fallback`]:
//!    the last position of each sequence has no route and falls back to the trainer's own
//!    choice; the counts are reported). Each call is asked twice (forward and activation
//!    recompute); the policy checks that every key was replayed exactly twice.
//!
//! Both training runs are compared with the rollout: per layer and overall, the fraction of
//! routers whose top-k set differs, the fraction of tokens with any differing layer, the mean
//! differing layers per token (the R3 paper's metrics), how far the final hidden states move
//! (relative L2) and the k3 KL estimate between rollout and training next-token probabilities.

use crate::CliError;
use crate::backend::{AnyRouter, BackendKind};
use crate::model::{Accumulation, ForwardNumerics, ModelSpec, Precision, Rng, SyntheticModel};
use crate::plot::{LayerSeries, plot_mismatch_per_layer};
use crate::route::NumericsArg;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_router_core::metrics::{Comparator, Comparison, PolicyCounts};
use moe_router_core::policy::{MissingRoutes, Record, Replay, ReplayFromFile};
use moe_router_core::trace::{RowConvention, Trace, TraceFile, TraceHeader, WriterOptions};
use moe_router_core::{
    BatchLayout, CallSite, HostWeights, LayerId, LogitsRef, Numerics, Pass, Replayed, RouteError, Router, RouterConfig,
    RowAddr, Segment, SeqId,
};
use ndarray::Array2;
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const ABOUT: &str = "Play out rollout routing replay (R3) end to end on a small synthetic MoE model";

/// The long help of `demo` (the story in a few lines).
pub const LONG_ABOUT: &str = "\
Play out rollout routing replay (R3) end to end on a small synthetic MoE model.

An inference engine generates sequences with bf16 numerics and records every routing decision to
OUT/rollout.mrt. A trainer then re-runs the same sequences with f32 numerics in another batch
layout (packed micro-batches, zigzag context-parallel split): without replay its routers pick
other experts for a share of the (token, layer) pairs, and the hidden states drift; replaying the
recorded ids (R3) makes every router agree with the rollout, exactly. The demo prints the R3
paper's metrics per layer for both runs and writes OUT/summary.json and OUT/mismatch.{png,svg}.";

const AFTER_HELP: &str = "\
Examples:
  moe-router demo
  moe-router demo --sequences 16 --seq-len 64 --layers 4 --out /tmp/demo
  moe-router demo --preset qwen3-moe          # Qwen3-MoE's rule (softmax, top-8 of 128)
  moe-router demo --rollout-precision f32     # f32 on both sides: no router differs, the gap is bf16
  moe-router demo --json > summary.json

Writes OUT/rollout.mrt (the rollout trace), OUT/train-no-replay.mrt (the trainer's own routes),
OUT/summary.json, OUT/mismatch.png and OUT/mismatch.svg. Compare the two traces yourself with
`moe-router diff OUT/rollout.mrt OUT/train-no-replay.mrt`.";

/// Arguments of `demo`.
#[derive(Debug, Clone, clap::Args)]
#[command(about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct DemoArgs {
    /// Sequences generated in the rollout.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub sequences: usize,
    /// Longest sequence (prompt + response); lengths vary between half of it and it.
    #[arg(long, default_value_t = 160, value_name = "T")]
    pub seq_len: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 16, value_name = "P")]
    pub prompt_len: usize,
    /// MoE layers (the model also has a dense layer 0, so the MoE layer ids are 1..=N).
    #[arg(long, default_value_t = 12, value_name = "N")]
    pub layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 64, value_name = "H")]
    pub hidden: usize,
    /// Hidden size of each expert MLP.
    #[arg(long, default_value_t = 32, value_name = "F")]
    pub expert_ffn: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 512, value_name = "V")]
    pub vocab: usize,
    /// Seed of the model weights, prompts and sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Routing rule (a preset name; rules that select on a bias get a seeded one per layer).
    #[arg(long, default_value = "deepseek-v3", value_name = "NAME")]
    pub preset: String,
    /// Backend of the rollout's routers.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Backend of the trainer's routers (default: --backend).
    #[arg(long, value_enum)]
    pub train_backend: Option<BackendKind>,
    /// Router numerics of the rollout (inference engines use fast intrinsics).
    #[arg(long, value_enum, default_value = "native")]
    pub rollout_numerics: NumericsArg,
    /// Router numerics of the trainer.
    #[arg(long, value_enum, default_value = "portable")]
    pub train_numerics: NumericsArg,
    /// Activation precision of the rollout.
    #[arg(long, value_enum, default_value = "bf16")]
    pub rollout_precision: Precision,
    /// Activation precision of the trainer.
    #[arg(long, value_enum, default_value = "f32")]
    pub train_precision: Precision,
    /// Token budget of one training micro-batch (whole sequences are packed up to it).
    #[arg(long, default_value_t = 2048, value_name = "TOKENS")]
    pub micro_batch_tokens: usize,
    /// Context-parallel ranks of the training split (zigzag).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub cp: usize,
    /// Output directory (created if missing).
    #[arg(long, default_value = "out/demo", value_name = "DIR")]
    pub out: PathBuf,
    /// Print the JSON summary on stdout (the story goes to stderr).
    #[arg(long)]
    pub json: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            sequences: 64,
            seq_len: 160,
            prompt_len: 16,
            layers: 12,
            hidden: 64,
            expert_ffn: 32,
            vocab: 512,
            seed: 0,
            preset: "deepseek-v3".into(),
            backend: BackendKind::Cpu,
            train_backend: None,
            rollout_numerics: NumericsArg::Native,
            train_numerics: NumericsArg::Portable,
            rollout_precision: Precision::Bf16,
            train_precision: Precision::F32,
            micro_batch_tokens: 2048,
            cp: 2,
            out: PathBuf::from("out/demo"),
            json: false,
        }
    }
}

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
    /// Training settings.
    pub training: PhaseSettings,
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

fn numerics(n: NumericsArg) -> Numerics {
    match n {
        NumericsArg::Portable => Numerics::Portable,
        NumericsArg::Native => Numerics::Native,
    }
}

fn numerics_name(n: Numerics) -> &'static str {
    match n {
        Numerics::Portable => "portable",
        Numerics::Native => "native",
    }
}

fn cfg_err(context: &str) -> impl Fn(moe_router_core::ConfigError) -> CliError + '_ {
    move |e| CliError::Config {
        context: context.to_string(),
        source: e,
    }
}

fn trace_err(path: &Path) -> impl Fn(moe_router_core::trace::TraceError) -> CliError + '_ {
    move |e| CliError::Input(format!("{}: {e}", path.display()))
}

fn replay_err(e: moe_router_core::ReplayError) -> CliError {
    CliError::Route(RouteError::from(e))
}

fn f32_weights(w: HostWeights) -> Array2<f32> {
    match w {
        HostWeights::F32(a) => a,
        other => other.to_f32(),
    }
}

/// The generated sequences: tokens, and per position the rollout's final hidden state and the
/// log-probability of the token that follows.
struct Rollout {
    tokens: Vec<Vec<u32>>,
    hidden: Vec<Vec<f32>>,
    next_logprob: Vec<Vec<f32>>,
}

fn progress(len: u64, msg: &str) -> ProgressBar {
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

fn check_args(a: &DemoArgs) -> Result<(), CliError> {
    let bad = |m: String| Err(CliError::Input(m));
    if a.sequences == 0 || a.layers == 0 || a.hidden < 2 || a.expert_ffn == 0 || a.vocab < 2 || a.cp == 0 {
        return bad(
            "--sequences, --layers, --expert-ffn and --cp must be at least 1, --hidden and --vocab at least 2".into(),
        );
    }
    if a.prompt_len == 0 || a.seq_len < a.prompt_len + 2 {
        return bad(format!(
            "--seq-len ({}) must be at least --prompt-len ({}) + 2, and --prompt-len at least 1",
            a.seq_len, a.prompt_len
        ));
    }
    let tokens = a.sequences as u128 * a.seq_len as u128 * a.hidden as u128;
    if tokens > 1 << 31 {
        return bad("sequences × seq-len × hidden is too large for a demo (keep it under 2^31)".into());
    }
    Ok(())
}

/// Runs `demo`.
pub fn run(a: &DemoArgs) -> Result<u8, CliError> {
    let summary = run_demo(a)?;
    let story = story(&summary, a);
    if a.json {
        eprint!("{story}");
        let json = serde_json::to_string_pretty(&summary).map_err(|e| CliError::Input(e.to_string()))?;
        println!("{json}");
    } else {
        print!("{story}");
    }
    Ok(crate::EXIT_OK)
}

/// Runs the demo and writes its files; returns the summary (also in `OUT/summary.json`).
pub fn run_demo(a: &DemoArgs) -> Result<DemoSummary, CliError> {
    check_args(a)?;
    let rule = moe_router_core::preset(&a.preset).map_err(cfg_err("--preset"))?;
    let spec = ModelSpec {
        vocab: a.vocab,
        hidden: a.hidden,
        expert_ffn: a.expert_ffn,
        moe_layers: a.layers,
        seed: a.seed,
    };
    let model = SyntheticModel::new(spec, &rule).map_err(cfg_err("model"))?;
    let layer_ids = model.moe_layer_ids();
    std::fs::create_dir_all(&a.out).map_err(|e| CliError::io(&a.out, &e))?;

    let roll_num = ForwardNumerics {
        precision: a.rollout_precision,
        accumulation: Accumulation::Lanes8,
    };
    let train_num = ForwardNumerics {
        precision: a.train_precision,
        accumulation: Accumulation::Blocks16,
    };
    let with_numerics = |cfg: &RouterConfig, n: NumericsArg| -> Result<RouterConfig, CliError> {
        cfg.to_builder()
            .numerics(numerics(n))
            .build()
            .map_err(cfg_err("--numerics"))
    };
    let routers = |kind: BackendKind, n: NumericsArg| -> Result<Vec<AnyRouter>, CliError> {
        (0..a.layers)
            .map(|i| AnyRouter::new(kind, with_numerics(model.router_config(i), n)?))
            .collect()
    };
    let train_kind = a.train_backend.unwrap_or(a.backend);
    let roll_routers = routers(a.backend, a.rollout_numerics)?;
    let roll_device = roll_routers[0].describe();
    let train_device = AnyRouter::new(train_kind, model.router_config(0).clone())?.describe();

    // Sequence lengths and prompts.
    let mut rng = Rng::new(a.seed, 7);
    let lo = (a.seq_len / 2).max(a.prompt_len + 2);
    let lens: Vec<usize> = (0..a.sequences)
        .map(|_| lo + rng.below((a.seq_len - lo + 1) as u64) as usize)
        .collect();

    // ---- 1. Rollout -------------------------------------------------------------------------
    let t0 = Instant::now();
    let trace_path = a.out.join("rollout.mrt");
    let header = TraceHeader::for_config(model.router_config(0), &layer_ids)
        .map_err(trace_err(&trace_path))?
        .with_row_convention(RowConvention::TokensMinusOne)
        .with_producer(format!(
            "moe-router demo rollout ({} activations, {} router numerics, {})",
            a.rollout_precision.name(),
            numerics_name(numerics(a.rollout_numerics)),
            roll_device
        ));
    let record = Record::create_file(&trace_path, header, WriterOptions::default()).map_err(replay_err)?;
    let roll_routers: Vec<_> = roll_routers
        .into_iter()
        .map(|r| Replayed::new(r, record.clone()))
        .collect();
    let rollout = rollout(a, &model, &roll_routers, &lens, roll_num, &mut rng)?;
    record.finish().map_err(replay_err)?;
    drop(roll_routers);
    let rollout_seconds = t0.elapsed().as_secs_f64();

    let rollout_file = TraceFile::open(&trace_path).map_err(trace_err(&trace_path))?;
    let rollout_trace = rollout_file.to_trace().map_err(trace_err(&trace_path))?;

    // ---- 2./3. Training ---------------------------------------------------------------------
    let seqs: Vec<(SeqId, usize)> = lens.iter().enumerate().map(|(s, &l)| (SeqId(s as u64), l)).collect();
    let groups = micro_batches(&seqs, a.micro_batch_tokens);

    let train_path = a.out.join("train-no-replay.mrt");
    let theader = TraceHeader::for_config(model.router_config(0), &layer_ids)
        .map_err(trace_err(&train_path))?
        .with_producer(format!(
            "moe-router demo training without replay ({} activations, {} router numerics, {})",
            a.train_precision.name(),
            numerics_name(numerics(a.train_numerics)),
            train_device
        ));
    let trec = Record::create_file(&train_path, theader, WriterOptions::default()).map_err(replay_err)?;
    let plain: Vec<_> = routers(train_kind, a.train_numerics)?
        .into_iter()
        .map(|r| Replayed::new(r, trec.clone()))
        .collect();
    let pb = progress((groups.len() * a.cp) as u64, "training (no replay)");
    let without = train(
        a,
        &model,
        &plain,
        &groups,
        train_num,
        &rollout,
        &rollout_trace,
        false,
        &pb,
    )?;
    pb.finish_and_clear();
    trec.finish().map_err(replay_err)?;
    drop(plain);

    let policy = Arc::new(
        Replay::new(rollout_file, &layer_ids)
            .map_err(replay_err)?
            .with_missing(MissingRoutes::Fallback)
            .expect_each_key(2),
    );
    let replayed: Vec<Replayed<AnyRouter, Arc<ReplayFromFile>>> = routers(train_kind, a.train_numerics)?
        .into_iter()
        .map(|r| Replayed::new(r, policy.clone()))
        .collect();
    let pb = progress((groups.len() * a.cp) as u64, "training (R3 replay)");
    let mut with = train(
        a,
        &model,
        &replayed,
        &groups,
        train_num,
        &rollout,
        &rollout_trace,
        true,
        &pb,
    )?;
    pb.finish_and_clear();
    let rs = policy.finish().map_err(replay_err)?;
    with.fallback_rows = Some(rs.counts.total_fallbacks / 2);
    with.replay_counts = Some(rs.counts);

    if with.comparison.router_mismatch_fraction != 0.0 {
        return Err(CliError::Input(format!(
            "replay did not reproduce the rollout's routes ({} of routers differ): this is a bug, please report it",
            with.comparison.router_mismatch_fraction
        )));
    }

    // ---- Report -----------------------------------------------------------------------------
    let plot_series = [
        LayerSeries {
            label: "training without replay".into(),
            values: per_layer(&without.comparison, &layer_ids),
        },
        LayerSeries {
            label: "training with R3 replay".into(),
            values: per_layer(&with.comparison, &layer_ids),
        },
    ];
    let title = format!(
        "Routers that differ from the rollout ({}, E={}, K={})",
        a.preset,
        model.num_experts(),
        model.top_k()
    );
    let mut files = vec![trace_path.clone(), train_path.clone()];
    for ext in ["png", "svg"] {
        let p = a.out.join(format!("mismatch.{ext}"));
        plot_mismatch_per_layer(&p, &title, &layer_ids, &plot_series)?;
        files.push(p);
    }
    let summary_path = a.out.join("summary.json");
    files.push(summary_path.clone());
    let tokens: u64 = lens.iter().map(|&l| l as u64).sum();
    let summary = DemoSummary {
        preset: a.preset.clone(),
        num_experts: model.num_experts(),
        top_k: model.top_k(),
        model: *model.spec(),
        moe_layers: layer_ids.clone(),
        parameters: model.parameters(),
        sequences: a.sequences,
        tokens,
        routed_tokens: tokens - a.sequences as u64,
        rollout: PhaseSettings {
            backend: roll_device,
            precision: a.rollout_precision,
            accumulation: roll_num.accumulation,
            router_numerics: numerics(a.rollout_numerics),
        },
        training: PhaseSettings {
            backend: train_device,
            precision: a.train_precision,
            accumulation: train_num.accumulation,
            router_numerics: numerics(a.train_numerics),
        },
        micro_batches: groups.len(),
        cp: a.cp,
        rollout_seconds,
        without_replay: without,
        with_replay: with,
        files: files.iter().map(|p| p.display().to_string()).collect(),
    };
    let json = serde_json::to_string_pretty(&summary).map_err(|e| CliError::Input(e.to_string()))?;
    std::fs::write(&summary_path, json + "\n").map_err(|e| CliError::io(&summary_path, &e))?;
    Ok(summary)
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

/// Whole sequences packed in order into micro-batches of at most `budget` tokens (a sequence
/// longer than the budget gets a micro-batch of its own).
fn micro_batches(seqs: &[(SeqId, usize)], budget: usize) -> Vec<Vec<(SeqId, usize)>> {
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
fn rollout<R>(
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
fn train<R>(
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
        s.training.precision.name(),
        numerics_name(s.training.router_numerics),
        s.training.backend
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
    let _ = writeln!(o, "Wrote {}", s.files.join(", "));
    o
}
