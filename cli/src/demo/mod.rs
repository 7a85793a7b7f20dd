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
//!
//! 4. **Training the gates** (`--train-steps N`, 20 by default, 0 skips it; module `train`). A
//!    smaller MoE policy generates one rollout (engine numerics, routes recorded), then trains
//!    its router (gate) weights for N steps of an importance-weighted policy gradient over the
//!    rollout's response tokens, once routing itself and once replaying the rollout's routes,
//!    backward through [`moe_router::Router::weights_vjp`]. Per step: the k3 KL between rollout
//!    and trainer, the fraction of tokens whose ratio `π_train / π_rollout` is outside
//!    `[0.5, 2]`, the gate gradient's norm, the loss, and the routers that differ from the
//!    rollout; `summary.json` gets them under `training`, `OUT/training.{png,svg}` plots them.

mod phases;
mod report;
mod train;

pub use report::{DemoSummary, PhaseSettings, RunReport, story};
pub use train::{TrainingReport, TrainingRun, TrainingStep};

use crate::CliError;
use crate::backend::{AnyRouter, BackendKind};
use crate::model::{Accumulation, ForwardNumerics, ModelSpec, Precision, Rng, SyntheticModel};
use crate::route::NumericsArg;
use moe_router::policy::{MissingRoutes, Record, Replay, ReplayFromFile};
use moe_router::trace::{RowConvention, TraceFile, TraceHeader, WriterOptions};
use moe_router::{Numerics, Replayed, RouteError, RouterConfig, SeqId};
use phases::{micro_batches, progress, rollout, train};
use report::{plot_mismatch, plot_training, write_summary};
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
paper's metrics per layer for both runs and writes OUT/summary.json and OUT/mismatch.{png,svg}.

Then a smaller MoE policy trains its router (gate) weights on one rollout for --train-steps steps
of importance-weighted policy gradient, backward through the router's weights_vjp: once routing
itself, once replaying the rollout's routes. Per step it reports what RL trainers log: the k3 KL
between rollout and trainer, the share of tokens whose ratio pi_train / pi_rollout is outside
[0.5, 2], the gate gradient's norm; it prints the table and plots OUT/training.{png,svg}.";

const AFTER_HELP: &str = "\
Examples:
  moe-router demo
  moe-router demo --sequences 16 --seq-len 64 --layers 4 --out /tmp/demo
  moe-router demo --preset qwen3-moe          # Qwen3-MoE's rule (softmax, top-8 of 128)
  moe-router demo --rollout-precision f32     # f32 on both sides: no router differs, the gap is bf16
  moe-router demo --json > summary.json
  moe-router demo --train-steps 100           # train the gates longer (0 skips the training section)
  moe-router demo --learning-rate 3e-4        # a slower drift: watch the no-replay ratios anyway

Writes OUT/rollout.mrt (the rollout trace), OUT/train-no-replay.mrt (the trainer's own routes),
OUT/summary.json, OUT/mismatch.png, OUT/mismatch.svg, OUT/training.png and OUT/training.svg.
Compare the two traces yourself with `moe-router diff OUT/rollout.mrt OUT/train-no-replay.mrt`.";

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
    #[arg(long, value_parser = crate::backend::backend_parser(), default_value = "cpu")]
    pub backend: BackendKind,
    /// Backend of the trainer's routers (default: --backend).
    #[arg(long, value_parser = crate::backend::backend_parser())]
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
    /// Optimisation steps of the training section, each run (0 skips the section).
    #[arg(long, default_value_t = 20, value_name = "N", help_heading = "Training",
          value_parser = clap::value_parser!(u32).range(0..=i64::from(train::MAX_STEPS)))]
    pub train_steps: u32,
    /// Sequences of the training section's rollout.
    #[arg(long, default_value_t = 16, value_name = "N", help_heading = "Training")]
    pub train_sequences: usize,
    /// Response tokens per sequence of the training section (the tokens the loss is over).
    #[arg(long, default_value_t = 24, value_name = "T", help_heading = "Training")]
    pub train_len: usize,
    /// MoE layers of the training section's model.
    #[arg(long, default_value_t = 4, value_name = "N", help_heading = "Training")]
    pub train_layers: usize,
    /// Adam's learning rate on the gate weights.
    #[arg(long, default_value_t = 1e-3, value_name = "LR", help_heading = "Training",
          value_parser = positive_finite)]
    pub learning_rate: f64,
}

/// A finite number > 0 (clap value parser).
fn positive_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(x) => Err(format!("must be a finite number > 0, got {x}")),
        Err(e) => Err(format!("not a number: {e}")),
    }
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
            train_steps: 20,
            train_sequences: 16,
            train_len: 24,
            train_layers: 4,
            learning_rate: 1e-3,
        }
    }
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

fn cfg_err(context: &str) -> impl Fn(moe_router::ConfigError) -> CliError + '_ {
    move |e| CliError::Config {
        context: context.to_string(),
        source: e,
    }
}

fn trace_err(path: &Path) -> impl Fn(moe_router::trace::TraceError) -> CliError + '_ {
    move |e| CliError::Input(format!("{}: {e}", path.display()))
}

fn replay_err(e: moe_router::ReplayError) -> CliError {
    CliError::Route(RouteError::from(e))
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
    if a.train_steps > 0 {
        if a.train_sequences == 0 || a.train_len == 0 || a.train_layers == 0 {
            return bad(format!(
                "--train-sequences ({}), --train-len ({}) and --train-layers ({}) must be at least 1 \
                 (or skip the training section with --train-steps 0)",
                a.train_sequences, a.train_len, a.train_layers
            ));
        }
        let rows = a.train_sequences as u128 * a.train_len as u128 * a.train_layers as u128;
        if rows > 1 << 20 {
            return bad(format!(
                "--train-sequences × --train-len × --train-layers is {rows}: too large for a demo (keep it under 2^20)"
            ));
        }
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
    let rule = moe_router::preset(&a.preset).map_err(cfg_err("--preset"))?;
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
            .map(|i| Ok(AnyRouter::new(kind, with_numerics(model.router_config(i), n)?)?))
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

    // ---- 4. Training the gates, without and with replay -------------------------------------
    let training = train::training(a, &rule)?;

    // ---- Report -----------------------------------------------------------------------------
    let mut files = vec![trace_path.clone(), train_path.clone()];
    files.extend(plot_mismatch(a, &model, &layer_ids, &without, &with)?);
    if let Some(t) = &training {
        files.extend(plot_training(a, t)?);
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
        trainer: PhaseSettings {
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
        training,
        files: files.iter().map(|p| p.display().to_string()).collect(),
    };
    write_summary(&summary_path, &summary)?;
    Ok(summary)
}
