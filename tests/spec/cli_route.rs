//! The `moe-router route` contract: inputs, outputs (names, dtypes, shapes), replay, exit codes.

use moe_router::npy::{self, NpyDtype};
use std::path::{Path, PathBuf};

fn data(name: &str) -> String {
    format!("{}/../examples/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moe-router-spec-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(args: &[&str]) -> u8 {
    let mut v = vec!["moe-router"];
    v.extend_from_slice(args);
    moe_router_cli::run(v)
}

fn read(p: &Path) -> npy::NpyArray {
    npy::read(p).unwrap()
}

#[test]
fn route_writes_int32_ids_float32_weights_and_stats() {
    let out = out_dir("basic");
    let o = out.to_str().unwrap();
    assert_eq!(
        run(&[
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--preset",
            "qwen3-moe",
            "--dense",
            "--out",
            o
        ]),
        0
    );
    let ids = read(&out.join("ids.npy"));
    assert_eq!((ids.dtype, ids.shape.clone()), (NpyDtype::I32, vec![64, 8]));
    let w = read(&out.join("weights.npy"));
    assert_eq!((w.dtype, w.shape.clone()), (NpyDtype::F32, vec![64, 8]));
    let map = read(&out.join("routing_map.npy"));
    assert_eq!((map.dtype, map.shape.clone()), (NpyDtype::U8, vec![64, 128]));
    let probs = read(&out.join("probs.npy"));
    assert_eq!((probs.dtype, probs.shape.clone()), (NpyDtype::F32, vec![64, 128]));
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    let tpe = stats["tokens_per_expert"].as_array().unwrap();
    assert_eq!(tpe.len(), 128);
    assert_eq!(tpe.iter().map(|v| v.as_u64().unwrap()).sum::<u64>(), 64 * 8);
    assert!(stats.get("aux_loss").is_none(), "no coefficient, no aux loss");
}

#[test]
fn replay_ids_are_written_back_in_the_given_order_with_recomputed_weights() {
    let a = out_dir("replay-a");
    let b = out_dir("replay-b");
    assert_eq!(
        run(&[
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--preset",
            "qwen3-moe",
            "--out",
            a.to_str().unwrap()
        ]),
        0
    );
    // Reverse the slot order of every row: replay must keep it.
    let ids = read(&a.join("ids.npy")).to_ints("ids").unwrap();
    let rev: Vec<i32> = ids.chunks(8).flat_map(|r| r.iter().rev().map(|&x| x as i32)).collect();
    let ip = a.join("rev.npy");
    npy::write(&ip, &[64, 8], NpyDtype::I32, &npy::i32_bytes(&rev)).unwrap();
    let code = run(&[
        "route",
        "--logits",
        &data("logits_e128.npy"),
        "--preset",
        "qwen3-moe",
        "--replay-ids",
        ip.to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let got = read(&b.join("ids.npy")).to_ints("ids").unwrap();
    assert_eq!(got, rev.iter().map(|&x| i128::from(x)).collect::<Vec<_>>());
    let wa = read(&a.join("weights.npy")).to_f32("w").unwrap();
    let wb = read(&b.join("weights.npy")).to_f32("w").unwrap();
    for (ra, rb) in wa.chunks(8).zip(wb.chunks(8)) {
        let mut x: Vec<u32> = ra.iter().map(|v| v.to_bits()).collect();
        let mut y: Vec<u32> = rb.iter().map(|v| v.to_bits()).collect();
        x.sort_unstable();
        y.sort_unstable();
        assert_ne!(x.len(), 0);
        // Softmax over the same K logits in another order: the same values up to summation order.
        for (p, q) in ra.iter().zip(rb.iter().rev()) {
            assert!((p - q).abs() <= 1e-6, "{p} vs {q}");
        }
    }
}

#[test]
fn deepseek_v3_needs_its_bias_and_updates_it_when_asked() {
    let out = out_dir("dsv3");
    let o = out.to_str().unwrap();
    assert_eq!(
        run(&[
            "route",
            "--logits",
            &data("logits_e256.npy"),
            "--preset",
            "deepseek-v3",
            "--out",
            o
        ]),
        1
    );
    let code = run(&[
        "route",
        "--logits",
        &data("logits_e256.npy"),
        "--preset",
        "deepseek-v3",
        "--bias",
        &data("bias_e256.npy"),
        "--bias-update-rate",
        "0.001",
        "--out",
        o,
    ]);
    assert_eq!(code, 0);
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["updated_bias"].as_array().unwrap().len(), 256);
}

#[test]
fn megatron_rule_with_aux_and_z_loss_and_capacity_reports_them() {
    let out = out_dir("megatron");
    let cfg = out_dir("megatron-cfg");
    std::fs::create_dir_all(&cfg).unwrap();
    let m = cfg.join("m.json");
    std::fs::write(
        &m,
        r#"{"num_moe_experts": 128, "moe_router_topk": 8, "moe_router_score_function": "softmax",
            "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 0.001,
            "moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": "probs"}"#,
    )
    .unwrap();
    let code = run(&[
        "route",
        "--logits",
        &data("logits_e128.npy"),
        "--megatron-config",
        m.to_str().unwrap(),
        "--dense",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert!(stats["aux_loss"].as_f64().unwrap() > 0.0);
    assert!(stats["z_loss"].as_f64().unwrap() > 0.0);
    assert_eq!(stats["capacity"].as_u64().unwrap(), 4, "ceil(64*8/128 * 1.0)");
    let tpe: Vec<u64> = stats["tokens_per_expert"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(tpe.iter().all(|&c| c <= 4));
    let map = read(&out.join("routing_map.npy"));
    assert_eq!(
        map.data.iter().map(|&b| u64::from(b)).sum::<u64>(),
        tpe.iter().sum::<u64>(),
        "dense map is after dropping"
    );
    let no_cap = out_dir("megatron-nocap");
    let code = run(&[
        "route",
        "--logits",
        &data("logits_e128.npy"),
        "--megatron-config",
        m.to_str().unwrap(),
        "--no-capacity",
        "--out",
        no_cap.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
}

#[test]
fn bad_inputs_exit_1_and_usage_errors_exit_2() {
    let out = out_dir("bad");
    let o = out.to_str().unwrap();
    let tmp = out_dir("bad-in");
    std::fs::create_dir_all(&tmp).unwrap();
    let trunc = tmp.join("t.npy");
    std::fs::write(&trunc, &std::fs::read(data("logits_e128.npy")).unwrap()[..500]).unwrap();
    assert_eq!(
        run(&[
            "route",
            "--logits",
            trunc.to_str().unwrap(),
            "--preset",
            "qwen3-moe",
            "--out",
            o
        ]),
        1
    );
    assert_eq!(
        run(&[
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--preset",
            "deepseek-v3",
            "--out",
            o
        ]),
        1,
        "E mismatch"
    );
    assert_eq!(
        run(&[
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--preset",
            "no-such",
            "--out",
            o
        ]),
        1
    );
    let bad_ids = tmp.join("ids.npy");
    let mut v = vec![0i32; 64 * 8];
    for (i, x) in v.iter_mut().enumerate() {
        *x = (i % 8) as i32;
    }
    v[5 * 8 + 3] = 128;
    npy::write(&bad_ids, &[64, 8], NpyDtype::I32, &npy::i32_bytes(&v)).unwrap();
    let args = [
        "route",
        "--logits",
        &data("logits_e128.npy"),
        "--preset",
        "qwen3-moe",
        "--replay-ids",
        bad_ids.to_str().unwrap(),
        "--out",
        o,
    ];
    assert_eq!(run(&args), 1, "out of range id");
    v[5 * 8 + 3] = 2;
    npy::write(&bad_ids, &[64, 8], NpyDtype::I32, &npy::i32_bytes(&v)).unwrap();
    assert_eq!(run(&args), 1, "duplicate id");
    npy::write(&bad_ids, &[64, 4], NpyDtype::I32, &npy::i32_bytes(&v[..256])).unwrap();
    assert_eq!(run(&args), 1, "wrong shape");
    let bad_json = tmp.join("c.json");
    std::fs::write(&bad_json, "{\"model_type\": ").unwrap();
    assert_eq!(
        run(&[
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--hf-config",
            bad_json.to_str().unwrap(),
            "--out",
            o
        ]),
        1
    );
    assert_eq!(
        run(&["route", "--logits", &data("logits_e128.npy"), "--out", o]),
        2,
        "no rule"
    );
    assert_eq!(run(&["route", "--bogus"]), 2);
}
