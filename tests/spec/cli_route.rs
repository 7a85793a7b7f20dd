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
        2,
        "an unknown preset is a malformed argument"
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

/// Runs the CLI with its messages captured: (exit code, stdout of the trace commands, stderr).
fn run_captured(args: &[&str]) -> (u8, String, String) {
    let mut v = vec!["moe-router"];
    v.extend_from_slice(args);
    moe_router_cli::trace_cmds::capture_output(|| moe_router_cli::run(v))
}

#[test]
fn bias_update_rate_must_be_finite_and_non_negative_like_the_builder_and_megatron_say() {
    let out = out_dir("rate");
    let o = out.to_str().unwrap();
    for rate in ["NaN", "inf", "-inf", "-0.001", "-1e30"] {
        let arg = format!("--bias-update-rate={rate}");
        let (code, _, err) = run_captured(&[
            "route",
            "--logits",
            &data("logits_e256.npy"),
            "--preset",
            "deepseek-v3",
            "--bias",
            &data("bias_e256.npy"),
            &arg,
            "--out",
            o,
        ]);
        assert_eq!(code, 2, "{rate}: {err}");
        assert!(
            err.contains("--bias-update-rate") && err.contains("finite and >= 0"),
            "{rate}: {err}"
        );
        assert!(!out.join("stats.json").exists(), "{rate}: nothing is written");
    }
    // Without the bias it updates, the rate is a usage error too.
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        &data("logits_e128.npy"),
        "--preset",
        "qwen3-moe",
        "--bias-update-rate",
        "0.001",
        "--out",
        o,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--bias"), "{err}");
}

#[test]
fn malformed_arguments_of_route_and_bench_exit_2() {
    let out = out_dir("usage");
    let o = out.to_str().unwrap();
    for args in [
        vec![
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--preset",
            "nosuch",
            "--out",
            o,
        ],
        vec!["bench", "--tokens", "0"],
        vec!["bench", "--preset", "nosuch", "--tokens", "8", "--seconds", "0.01"],
        vec!["bench", "--tokens", "8", "--seconds", "0"],
    ] {
        let (code, _, err) = run_captured(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?}: the message says why");
    }
}

/// Without the `cuda` feature, asking the bench for CUDA by name cannot succeed.
#[cfg(not(feature = "cuda"))]
#[test]
fn bench_of_a_backend_named_but_not_compiled_in_exits_non_zero() {
    let (code, _, err) = run_captured(&["bench", "--backend", "cuda", "--tokens", "8", "--seconds", "0.01"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cuda") && err.contains("--features cuda"), "{err}");
}

#[test]
fn replay_ids_of_the_wrong_rank_report_the_shape_they_have() {
    let tmp = out_dir("rank");
    std::fs::create_dir_all(&tmp).unwrap();
    let o = out_dir("rank-out");
    for (shape, shown) in [
        (vec![8usize], "[8]"),
        (vec![8, 8, 8], "[8, 8, 8]"),
        (vec![64, 4], "[64, 4]"),
    ] {
        let n: usize = shape.iter().product();
        let p = tmp.join("ids.npy");
        let v: Vec<i32> = (0..n).map(|i| (i % 8) as i32).collect();
        npy::write(&p, &shape, NpyDtype::I32, &npy::i32_bytes(&v)).unwrap();
        let (code, _, err) = run_captured(&[
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--preset",
            "qwen3-moe",
            "--replay-ids",
            p.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!("found {shown}")) && err.contains("[64, 8]"),
            "{shape:?}: {err}"
        );
        assert!(!err.contains("[8, 0]"), "{err}");
    }
}

#[test]
fn route_error_messages_name_a_path_once() {
    let tmp = out_dir("path-once");
    std::fs::create_dir_all(&tmp).unwrap();
    let missing = tmp.join("missing.npy");
    let m = missing.to_str().unwrap();
    let o = tmp.join("out");
    for args in [
        vec![
            "route",
            "--logits",
            m,
            "--preset",
            "qwen3-moe",
            "--out",
            o.to_str().unwrap(),
        ],
        vec![
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--preset",
            "qwen3-moe",
            "--replay-ids",
            m,
            "--out",
            o.to_str().unwrap(),
        ],
        vec![
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--hf-config",
            m,
            "--out",
            o.to_str().unwrap(),
        ],
    ] {
        let (code, _, err) = run_captured(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.matches(m).count(), 1, "{err}");
    }
}

/// Logits of `logits_e128.npy` rounded to bfloat16, as f32 values (exact in every dtype below).
fn bf16_logits() -> (Vec<f32>, Vec<u16>) {
    let v = read(Path::new(&data("logits_e128.npy"))).to_f32("logits").unwrap();
    let bits: Vec<u16> = v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
    let vals: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
    (vals, bits)
}

/// A safetensors file holding one tensor (`name`, `dtype`, `shape`, little-endian `data`).
fn safetensors_bytes(name: &str, dtype: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let mut header = format!(
        r#"{{"{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[0,{}]}}}}"#,
        data.len()
    );
    while !(8 + header.len()).is_multiple_of(8) {
        header.push(' ');
    }
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

/// Routes `logits` (plus `extra` flags) with qwen3-moe; returns (ids, weight bits).
fn route_ok(tag: &str, logits: &Path, extra: &[&str]) -> (Vec<i128>, Vec<u32>) {
    let out = out_dir(tag);
    let mut args = vec![
        "route",
        "--logits",
        logits.to_str().unwrap(),
        "--preset",
        "qwen3-moe",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = run_captured(&args);
    assert_eq!(code, 0, "{tag}: {err}");
    let ids = read(&out.join("ids.npy")).to_ints("ids").unwrap();
    let w = read(&out.join("weights.npy")).to_f32("w").unwrap();
    (ids, w.iter().map(|x| x.to_bits()).collect())
}

#[test]
fn route_reads_bf16_and_f64_logits_from_npy_and_safetensors_as_their_f32_values() {
    let tmp = out_dir("dtypes");
    std::fs::create_dir_all(&tmp).unwrap();
    let (vals, bits) = bf16_logits();
    let shape = [64usize, 128];
    let bits_le: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let f32_path = tmp.join("f32.npy");
    npy::write(&f32_path, &shape, NpyDtype::F32, &npy::f32_bytes(&vals)).unwrap();
    let reference = route_ok("dt-f32", &f32_path, &[]);
    // bf16 as np.save writes an ml_dtypes.bfloat16 array: descr |V2.
    let v2 = tmp.join("bf16.npy");
    npy::write(&v2, &shape, NpyDtype::Bf16, &bits_le).unwrap();
    assert!(String::from_utf8_lossy(&std::fs::read(&v2).unwrap()[..80]).contains("'|V2'"));
    assert_eq!(route_ok("dt-v2", &v2, &[]), reference, "|V2");
    // bf16 bits saved through `t.view(torch.int16)`: int16 on disk, bf16 with the flag.
    let i2 = tmp.join("bits.npy");
    npy::write(&i2, &shape, NpyDtype::I16, &bits_le).unwrap();
    assert_eq!(
        route_ok("dt-i2", &i2, &["--logits-dtype", "bf16"]),
        reference,
        "<i2 as bf16"
    );
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        i2.to_str().unwrap(),
        "--preset",
        "qwen3-moe",
        "--out",
        tmp.join("o").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "int16 without the flag is refused: {err}");
    assert!(err.contains("--logits-dtype bf16"), "{err}");
    // f64.
    let f64_path = tmp.join("f64.npy");
    let f64_le: Vec<u8> = vals.iter().flat_map(|&x| f64::from(x).to_le_bytes()).collect();
    npy::write(&f64_path, &shape, NpyDtype::F64, &f64_le).unwrap();
    assert_eq!(route_ok("dt-f64", &f64_path, &[]), reference, "f64");
    // safetensors BF16 (the only tensor, or named).
    let st = tmp.join("logits.safetensors");
    std::fs::write(&st, safetensors_bytes("router_logits", "BF16", &shape, &bits_le)).unwrap();
    assert_eq!(route_ok("dt-st", &st, &[]), reference, "safetensors BF16");
    assert_eq!(
        route_ok("dt-st-named", &st, &["--logits-tensor", "router_logits"]),
        reference
    );
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        st.to_str().unwrap(),
        "--logits-tensor",
        "nope",
        "--preset",
        "qwen3-moe",
        "--out",
        tmp.join("o").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("router_logits"), "the error lists the tensors: {err}");
}

#[test]
fn logits_of_another_dtype_are_refused_with_how_to_convert() {
    let tmp = out_dir("int-logits");
    std::fs::create_dir_all(&tmp).unwrap();
    let p = tmp.join("i32.npy");
    npy::write(&p, &[2, 128], NpyDtype::I32, &npy::i32_bytes(&[1; 256])).unwrap();
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        p.to_str().unwrap(),
        "--preset",
        "qwen3-moe",
        "--out",
        tmp.join("o").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("int32") && err.contains("astype(np.float32)") && err.contains("t.float()"),
        "{err}"
    );
    // The flag reads 2-byte integers only.
    let f = tmp.join("f32.npy");
    npy::write(&f, &[1, 128], NpyDtype::F32, &npy::f32_bytes(&[0.5; 128])).unwrap();
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        f.to_str().unwrap(),
        "--logits-dtype",
        "bf16",
        "--preset",
        "qwen3-moe",
        "--out",
        tmp.join("o").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("float32"), "{err}");
}
