//! `moe-router demo`, `bench` and the plots: the R3 demo at a tiny size finishes, writes its
//! files, shows routers that differ without replay and none with replay; the bench measures the
//! CPU; plots are written as PNG and SVG.

use moe_router_cli::bench::{BenchArgs, BenchDtype, run_bench};
use moe_router_cli::demo::{DemoArgs, run_demo};
use moe_router_cli::plot::{LayerSeries, plot_expert_load_heatmap, plot_mismatch_per_layer};
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
    let s1 = run_demo(&a).unwrap();
    a.out = o2.clone();
    let s2 = run_demo(&a).unwrap();
    assert_eq!(s1.tokens, s2.tokens);
    assert_eq!(
        s1.without_replay.comparison.router_mismatch_fraction,
        s2.without_replay.comparison.router_mismatch_fraction
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
    let mut args = vec!["moe-router", "demo", "--out", &o, "--json"];
    args.extend(small);
    assert_eq!(run(args.clone()), 0);
    assert!(out.join("summary.json").is_file());
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

    let loads = vec![vec![5u64, 0, 10, 1], vec![4, 4, 4, 4], vec![0, 0, 16, 0]];
    let heat = out.join("load.png");
    plot_expert_load_heatmap(&heat, "load", &layers, &loads).unwrap();
    assert!(is_png(&heat));
    assert!(plot_expert_load_heatmap(&heat, "load", &layers, &loads[..2]).is_err());
    let _ = std::fs::remove_dir_all(&out);
}
