//! `moe-router demo`, `bench` and the plots: the R3 demo at a tiny size finishes, writes its
//! files, shows routers that differ without replay and none with replay; its training section
//! shows the importance ratios drift without replay and stay near 1 with it; the bench measures
//! the CPU; plots are written as PNG and SVG.

use moe_router_cli::bench::{BenchArgs, BenchDtype, run_bench};
use moe_router_cli::demo::{DemoArgs, run_demo, story};
use moe_router_cli::plot::{
    LayerSeries, StepPanel, StepScale, StepSeries, plot_expert_load_heatmap, plot_mismatch_per_layer,
    plot_training_curves,
};
use moe_router_cli::{backend::BackendKind, route::NumericsArg, run};
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moe-router-spec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny(out: &Path) -> DemoArgs {
    DemoArgs {
        sequences: 8,
        seq_len: 48,
        prompt_len: 6,
        layers: 4,
        hidden: 32,
        expert_ffn: 8,
        vocab: 64,
        micro_batch_tokens: 100,
        out: out.to_path_buf(),
        train_steps: 0,
        ..DemoArgs::default()
    }
}

/// The smallest first part, and the training section at its defaults (20 steps).
fn training_defaults(out: &Path) -> DemoArgs {
    DemoArgs {
        sequences: 2,
        seq_len: 20,
        prompt_len: 4,
        layers: 1,
        out: out.to_path_buf(),
        ..DemoArgs::default()
    }
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 1000)
}

fn is_svg(p: &Path) -> bool {
    std::fs::read_to_string(p).is_ok_and(|s| s.contains("<svg") && s.contains("</svg>"))
}

#[test]
fn tiny_demo_replays_every_recorded_route_and_writes_its_files() {
    let out = scratch("demo");
    let a = tiny(&out);
    let s = run_demo(&a).unwrap();

    // The layer map skips the dense layer 0.
    assert_eq!(s.moe_layers, vec![1, 2, 3, 4]);
    assert_eq!(s.sequences, 8);
    assert_eq!(
        s.routed_tokens,
        s.tokens - 8,
        "the last token of each sequence is never routed"
    );

    // Without replay the trainer's numerics and layout change some routes.
    let w = &s.without_replay;
    assert!(w.comparison.router_mismatch_fraction > 0.0, "{:?}", w.comparison);
    assert!(w.comparison.token_any_layer_mismatch_fraction >= w.comparison.router_mismatch_fraction);
    assert!(w.comparison.mean_mismatched_layers_per_token > 0.0);
    assert_eq!(w.comparison.per_layer.len(), 4);
    assert_eq!(w.comparison.routers_compared, s.routed_tokens * 4);

    // With replay: zero mismatches over every routed token, fallbacks only for the last
    // position of each sequence (one per sequence and layer), recompute identical.
    let r = &s.with_replay;
    assert_eq!(r.comparison.router_mismatch_fraction, 0.0);
    assert_eq!(r.comparison.token_any_layer_mismatch_fraction, 0.0);
    assert_eq!(r.comparison.routers_compared, s.routed_tokens * 4);
    assert!(r.comparison.per_layer.iter().all(|l| l.mismatch_fraction == 0.0));
    assert_eq!(r.fallback_rows, Some(8 * 4));
    assert_eq!(
        r.comparison.rows_only_in_b,
        8 * 4,
        "fallback rows are reported, not compared"
    );
    assert_eq!(r.recompute_mismatched_calls, Some(0));
    let counts = r.replay_counts.as_ref().unwrap();
    assert!(counts.per_layer.iter().all(|l| l.fallbacks == 2 * 8), "{counts:?}");

    // Replay brings the final hidden states and next-token probabilities much closer.
    assert!(
        r.final_hidden_rel_l2 < w.final_hidden_rel_l2,
        "{} vs {}",
        r.final_hidden_rel_l2,
        w.final_hidden_rel_l2
    );
    assert!(r.k3_kl < w.k3_kl);

    for f in ["rollout.mrt", "train-no-replay.mrt", "summary.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(is_png(&out.join("mismatch.png")));
    assert!(is_svg(&out.join("mismatch.svg")));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["with_replay"]["comparison"]["router_mismatch_fraction"], 0.0);
    assert_eq!(json["moe_layers"], serde_json::json!([1, 2, 3, 4]));

    // The rollout trace is a regular trace file: inspect and diff read it, and draw it.
    let trace = out.join("rollout.mrt").display().to_string();
    let train = out.join("train-no-replay.mrt").display().to_string();
    let load = out.join("load.png").display().to_string();
    let diff = out.join("diff.svg").display().to_string();
    assert_eq!(run(["moe-router", "inspect", &trace, "--plot", &load, "--json"]), 0);
    assert!(is_png(Path::new(&load)));
    assert_eq!(
        run(["moe-router", "diff", &trace, &train, "--plot", &diff, "--json"]),
        0
    );
    assert!(is_svg(Path::new(&diff)));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn demo_is_deterministic_for_a_seed() {
    let (o1, o2) = (scratch("det1"), scratch("det2"));
    let mut a = tiny(&o1);
    a.sequences = 3;
    a.layers = 2;
    a.train_steps = 3;
    let s1 = run_demo(&a).unwrap();
    a.out = o2.clone();
    let s2 = run_demo(&a).unwrap();
    assert_eq!(s1.tokens, s2.tokens);
    assert_eq!(
        s1.without_replay.comparison.router_mismatch_fraction,
        s2.without_replay.comparison.router_mismatch_fraction
    );
    let json = |s: &moe_router_cli::demo::DemoSummary| {
        let t = s.training.as_ref().unwrap();
        serde_json::to_string(&(&t.without_replay.steps, &t.with_replay.steps)).unwrap()
    };
    assert_eq!(
        json(&s1),
        json(&s2),
        "the training steps are the same numbers for a seed"
    );
    let _ = std::fs::remove_dir_all(&o1);
    let _ = std::fs::remove_dir_all(&o2);
}

#[test]
fn demo_runs_a_softmax_rule_with_equal_precision_on_both_sides() {
    // Same precision and router math on both sides: only the accumulation order differs; with
    // replay no router differs. A softmax rule (no selection bias) works as well.
    let out = scratch("qwen");
    let mut a = tiny(&out);
    a.preset = "qwen3-moe".into();
    a.rollout_precision = a.train_precision;
    a.rollout_numerics = NumericsArg::Portable;
    let s = run_demo(&a).unwrap();
    assert_eq!(s.num_experts, 128);
    assert_eq!(s.with_replay.comparison.router_mismatch_fraction, 0.0);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn demo_cli_runs_and_rejects_bad_arguments() {
    let out = scratch("cli");
    let o = out.display().to_string();
    let small = [
        "--sequences",
        "3",
        "--seq-len",
        "20",
        "--prompt-len",
        "4",
        "--layers",
        "2",
        "--hidden",
        "16",
        "--expert-ffn",
        "4",
        "--vocab",
        "32",
    ];
    let mut args = vec!["moe-router", "demo", "--out", &o, "--json", "--train-steps", "2"];
    args.extend(small);
    assert_eq!(run(args.clone()), 0);
    assert!(out.join("summary.json").is_file());
    assert!(out.join("training.svg").is_file());
    // Impossible sizes: the command fails (1) with a message; bad flags and an unknown preset
    // are usage errors (2).
    let mut bad = args.clone();
    bad.extend(["--preset", "gpt-5"]);
    assert_eq!(run(bad), 2);
    assert_eq!(
        run(["moe-router", "demo", "--out", &o, "--seq-len", "3", "--prompt-len", "2"]),
        1
    );
    assert_eq!(run(["moe-router", "demo", "--sequences", "many"]), 2);
    assert_eq!(run(["moe-router", "demo", "--backend", "tpu"]), 2);
    // A backend that is not compiled in (or has no device) is an error, not a panic.
    if !BackendKind::Cuda.compiled_in() {
        let mut b = args.clone();
        b.extend(["--backend", "cuda"]);
        assert_eq!(run(b), 1);
    }
    assert_eq!(run(["moe-router", "demo", "--help"]), 0);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn training_the_gates_drifts_the_ratios_without_replay_and_keeps_them_near_one_with_it() {
    let out = scratch("train");
    let a = training_defaults(&out);
    let s = run_demo(&a).unwrap();
    let t = s.training.as_ref().expect("the training section runs by default");
    let (w, r) = (&t.without_replay.steps, &t.with_replay.steps);
    assert_eq!((t.steps, w.len(), r.len()), (20, 20, 20));
    assert_eq!(t.extreme_ratio_band, [0.5, 2.0]);

    // Step 0, the rollout's own gates: the trainer's numerics already flip near-tie routes, so
    // some ratios are off without replay; with replay only numerics is left.
    assert!(w[0].router_mismatch_fraction > 0.0, "{:?}", w[0]);
    assert!(w[0].k3_kl > 10.0 * r[0].k3_kl, "{:?} vs {:?}", w[0], r[0]);
    assert_eq!(r[0].extreme_fraction, 0.0);
    // Replay: every route of every step is the rollout's, in the forward and the recompute.
    assert!(r.iter().all(|x| x.router_mismatch_fraction == 0.0));
    let rows = (t.sequences * t.response_len) as u64;
    assert_eq!(
        t.with_replay.replayed_rows,
        Some(20 * 2 * t.layers as u64 * rows),
        "steps x (forward, recompute) x layers x rows"
    );
    assert_eq!(t.without_replay.replayed_rows, None);

    // As the gates train, the trainer's own routes move away from the rollout's, and with them
    // the ratios; replaying the rollout's routes keeps the ratios near 1.
    let (wl, rl) = (w.last().unwrap(), r.last().unwrap());
    assert!(
        wl.router_mismatch_fraction > 3.0 * w[0].router_mismatch_fraction,
        "{:?} vs {:?}",
        w[0],
        wl
    );
    assert!(
        wl.k3_kl > 10.0 * rl.k3_kl,
        "final k3 KL: {} without, {} with replay",
        wl.k3_kl,
        rl.k3_kl
    );
    assert!(
        wl.extreme_fraction > rl.extreme_fraction + 0.25,
        "final extreme fraction: {} without, {} with replay",
        wl.extreme_fraction,
        rl.extreme_fraction
    );
    assert!(rl.extreme_fraction < 0.05, "{rl:?}");
    assert!(w.iter().chain(r).all(|x| x.grad_norm > 0.0 && x.grad_norm.is_finite()));

    // The files and the documented keys.
    assert!(is_png(&out.join("training.png")));
    assert!(is_svg(&out.join("training.svg")));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let tj = &json["training"];
    assert_eq!(tj["steps"], 20);
    assert_eq!(tj["extreme_ratio_band"], serde_json::json!([0.5, 2.0]));
    for run in ["without_replay", "with_replay"] {
        let steps = tj[run]["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 20);
        for key in [
            "step",
            "k3_kl",
            "extreme_fraction",
            "max_abs_log_ratio",
            "grad_norm",
            "loss",
            "router_mismatch_fraction",
        ] {
            assert!(steps[19][key].is_number(), "{run}: {key} missing");
        }
    }
    assert!(
        json["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().ends_with("training.png"))
    );
    assert!(story(&s, &a).contains("Training the gates"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn train_steps_zero_skips_the_training_section_and_bad_values_are_refused() {
    let out = scratch("train0");
    let mut a = training_defaults(&out);
    a.train_steps = 0;
    let s = run_demo(&a).unwrap();
    assert!(s.training.is_none());
    assert!(!out.join("training.png").exists() && !out.join("training.svg").exists());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(json.get("training").is_none(), "no training key without training");
    assert!(!story(&s, &a).contains("Training the gates"));

    // Malformed values are usage errors (2); sizes no batch can have fail the command (1).
    let o = out.display().to_string();
    let base = [
        "moe-router",
        "demo",
        "--out",
        &o,
        "--sequences",
        "2",
        "--seq-len",
        "20",
        "--layers",
        "1",
    ];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend(extra);
        run(v)
    };
    for bad in [
        &["--train-steps", "-1"][..],
        &["--train-steps", "many"],
        &["--train-steps", "10001"],
        &["--learning-rate", "0"],
        &["--learning-rate", "-0.1"],
        &["--learning-rate", "inf"],
        &["--learning-rate", "NaN"],
    ] {
        assert_eq!(with(bad), 2, "{bad:?}");
    }
    assert_eq!(with(&["--train-len", "0"]), 1);
    assert_eq!(with(&["--train-layers", "0"]), 1);
    assert_eq!(with(&["--train-sequences", "100000", "--train-len", "100000"]), 1);
    // With --train-steps 0 the training sizes are not used.
    assert_eq!(with(&["--train-steps", "0", "--train-len", "0"]), 0);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bench_measures_the_cpu_and_lists_missing_backends() {
    let a = BenchArgs {
        preset: "qwen3-moe".into(),
        tokens: 512,
        dtype: BenchDtype::Bf16,
        numerics: NumericsArg::Portable,
        seconds: 0.02,
        backend: vec![],
        json: true,
    };
    let r = run_bench(&a).unwrap();
    assert_eq!((r.num_experts, r.top_k, r.tokens), (128, 8, 512));
    let cpu = r.backends.iter().find(|b| b.backend == BackendKind::Cpu).unwrap();
    assert!(cpu.skipped.is_none());
    assert!(cpu.tokens_per_s > 0.0 && cpu.gb_per_s > 0.0 && cpu.copy_gb_per_s > 0.0);
    assert!(!cpu.device.is_empty());
    for kind in [BackendKind::Cuda, BackendKind::Wgpu] {
        let row = r.backends.iter().find(|b| b.backend == kind).unwrap();
        if !kind.compiled_in() {
            assert!(row.skipped.as_deref().unwrap().contains("--features"), "{row:?}");
        }
    }
    assert_eq!(
        run([
            "moe-router",
            "bench",
            "--tokens",
            "64",
            "--seconds",
            "0.01",
            "--backend",
            "cpu",
            "--json"
        ]),
        0
    );
    assert_eq!(run(["moe-router", "bench", "--tokens", "0"]), 2);
}

#[test]
fn plots_are_written_as_png_and_svg_and_bad_names_are_errors() {
    let out = scratch("plots");
    let layers = [1u32, 3, 5];
    let series = [
        LayerSeries {
            label: "a".into(),
            values: vec![0.1, 0.2, 0.05],
        },
        LayerSeries {
            label: "b".into(),
            values: vec![0.0, 0.0, 0.0],
        },
    ];
    let png = out.join("m.png");
    let svg = out.join("sub/m.svg");
    plot_mismatch_per_layer(&png, "t", &layers, &series).unwrap();
    plot_mismatch_per_layer(&svg, "t", &layers, &series).unwrap();
    assert!(is_png(&png));
    assert!(is_svg(&svg));
    assert!(plot_mismatch_per_layer(&out.join("m.jpg"), "t", &layers, &series).is_err());
    assert!(plot_mismatch_per_layer(&png, "t", &[1, 2], &series).is_err());

    let panel = |scale, a: Vec<f64>, b: Vec<f64>| StepPanel {
        title: "metric".into(),
        scale,
        series: vec![
            StepSeries {
                label: "a".into(),
                values: a,
            },
            StepSeries {
                label: "b".into(),
                values: b,
            },
        ],
    };
    let panels = [
        panel(StepScale::Log, vec![1e-4, 1e-2, 0.0], vec![1e-5, 2e-5, 3e-5]),
        panel(StepScale::Percent, vec![0.0, 0.2, 0.5], vec![0.0; 3]),
        panel(StepScale::Linear, vec![0.1, 0.4, 0.3], vec![0.1, 0.1, 0.1]),
    ];
    plot_training_curves(&out.join("t.png"), "t", &panels).unwrap();
    plot_training_curves(&out.join("t.svg"), "t", &panels).unwrap();
    assert!(is_png(&out.join("t.png")));
    assert!(is_svg(&out.join("t.svg")));
    assert!(plot_training_curves(&out.join("t.png"), "t", &[]).is_err());
    assert!(plot_training_curves(&out.join("t.png"), "t", &[panel(StepScale::Log, vec![], vec![1.0])]).is_err());
    assert!(plot_training_curves(&out.join("t.gif"), "t", &panels).is_err());

    let loads = vec![vec![5u64, 0, 10, 1], vec![4, 4, 4, 4], vec![0, 0, 16, 0]];
    let heat = out.join("load.png");
    plot_expert_load_heatmap(&heat, "load", &layers, &loads).unwrap();
    assert!(is_png(&heat));
    assert!(plot_expert_load_heatmap(&heat, "load", &layers, &loads[..2]).is_err());
    let _ = std::fs::remove_dir_all(&out);
}
