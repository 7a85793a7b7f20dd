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

// ---- backward: --grad-weights / --grad-aux-loss / --grad-z-loss -------------------------------

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn stats_of(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap()
}

/// Logits `[4, 8]` whose per-row values are ≥ 0.3 apart: a ±1e-3 step never changes a selection.
fn spaced_logits() -> Vec<f64> {
    let base = [1.3, 0.9, 0.5, 0.2, -0.1, -0.4, -0.8, -1.2];
    (0..4)
        .flat_map(|t| (0..8).map(move |e| base[(e * 3 + t) % 8] + 0.01 * (t as f64)))
        .collect()
}

/// The scalar the contract differentiates, read back from what one `route` call wrote:
/// Σ G∘weights + A·aux_loss + Z·z_loss.
fn route_objective(tag: &str, cfg: &Path, logits: &[f64], g: &[f32], a: f64, z: f64) -> (f64, Vec<i128>) {
    let dir = out_dir(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let lp = dir.join("l.npy");
    npy::write(&lp, &[4, 8], NpyDtype::F64, &f64_bytes(logits)).unwrap();
    let out = dir.join("out");
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        lp.to_str().unwrap(),
        "--megatron-config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let w = read(&out.join("weights.npy")).to_f32("w").unwrap();
    let ids = read(&out.join("ids.npy")).to_ints("ids").unwrap();
    let st = stats_of(&out);
    let aux = st.get("aux_loss").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let zl = st.get("z_loss").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let dot: f64 = w.iter().zip(g).map(|(&w, &g)| f64::from(w) * f64::from(g)).sum();
    (dot + a * aux + z * zl, ids)
}

/// `grad_logits.npy` against central finite differences of the call's own outputs.
fn grad_logits_match_finite_differences(tag: &str, megatron: &str, a: f64, z: f64) {
    let dir = out_dir(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("m.json");
    std::fs::write(&cfg, megatron).unwrap();
    let logits = spaced_logits();
    let g: Vec<f32> = (0..8).map(|i| 0.5 - 0.27 * i as f32).collect();
    let gp = dir.join("g.npy");
    npy::write(&gp, &[4, 2], NpyDtype::F32, &npy::f32_bytes(&g)).unwrap();
    let lp = dir.join("l.npy");
    npy::write(&lp, &[4, 8], NpyDtype::F64, &f64_bytes(&logits)).unwrap();
    let out = dir.join("out");
    let (a_s, z_s) = (a.to_string(), z.to_string());
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        lp.to_str().unwrap(),
        "--megatron-config",
        cfg.to_str().unwrap(),
        "--grad-weights",
        gp.to_str().unwrap(),
        "--grad-aux-loss",
        &a_s,
        "--grad-z-loss",
        &z_s,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let dz = read(&out.join("grad_logits.npy"));
    assert_eq!((dz.dtype, dz.shape.clone()), (NpyDtype::F32, vec![4, 8]));
    let dz = dz.to_f32("dz").unwrap();
    let (_, ids0) = route_objective(&format!("{tag}-0"), &cfg, &logits, &g, a, z);
    let h = 1e-3;
    let mut worst = 0.0f64;
    for i in 0..32 {
        let mut up = logits.clone();
        up[i] += h;
        let mut dn = logits.clone();
        dn[i] -= h;
        let (fu, iu) = route_objective(&format!("{tag}-u"), &cfg, &up, &g, a, z);
        let (fd, id) = route_objective(&format!("{tag}-d"), &cfg, &dn, &g, a, z);
        assert!(iu == ids0 && id == ids0, "a step changed the selection at {i}");
        let fdiff = (fu - fd) / (2.0 * h);
        let err = (fdiff - f64::from(dz[i])).abs();
        worst = worst.max(err);
        assert!(
            err < 2e-3,
            "logit {i}: grad_logits {} vs finite difference {fdiff}",
            dz[i]
        );
    }
    assert!(
        dz.iter().any(|&v| v.abs() > 1e-2),
        "a gradient that is all ~0 checks nothing"
    );
    eprintln!("{tag}: worst |grad - fd| = {worst:.2e}");
}

#[test]
fn grad_logits_is_the_derivative_of_the_weights_and_losses_the_same_call_writes_softmax_aux_z() {
    grad_logits_match_finite_differences(
        "grad-softmax",
        r#"{"num_moe_experts": 8, "moe_router_topk": 2, "moe_router_score_function": "softmax",
            "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.05, "moe_z_loss_coeff": 0.01}"#,
        0.7,
        1.3,
    );
}

#[test]
fn grad_logits_is_the_derivative_for_normalised_sigmoid_with_scaling_and_per_sequence_aux() {
    grad_logits_match_finite_differences(
        "grad-sigmoid",
        r#"{"num_moe_experts": 8, "moe_router_topk": 2, "moe_router_score_function": "sigmoid",
            "moe_router_topk_scaling_factor": 2.5, "moe_router_load_balancing_type": "seq_aux_loss",
            "moe_aux_loss_coeff": 0.05}"#,
        1.0,
        0.0,
    );
}

#[test]
fn grad_logits_of_replayed_ids_is_the_route_backward_of_those_ids() {
    let out = out_dir("grad-replay");
    let tmp = out_dir("grad-replay-in");
    std::fs::create_dir_all(&tmp).unwrap();
    // Replay ids that differ from the router's own choice in every row.
    let ids: Vec<i32> = (0..64 * 8).map(|i| (i / 8 * 5 + (i % 8) * 16) % 128).collect();
    let ip = tmp.join("ids.npy");
    npy::write(&ip, &[64, 8], NpyDtype::I32, &npy::i32_bytes(&ids)).unwrap();
    let g: Vec<f32> = (0..64 * 8).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
    let gp = tmp.join("g.npy");
    npy::write(&gp, &[64, 8], NpyDtype::F32, &npy::f32_bytes(&g)).unwrap();
    let o = out.to_str().unwrap();
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        &data("logits_e128.npy"),
        "--preset",
        "qwen3-moe",
        "--replay-ids",
        ip.to_str().unwrap(),
        "--grad-weights",
        gp.to_str().unwrap(),
        "--out",
        o,
    ]);
    assert_eq!(code, 0, "{err}");
    let dz = read(&out.join("grad_logits.npy")).to_f32("dz").unwrap();
    // The library's backward of the same ids, through the reference router.
    use moe_router::{CallSite, HostMatrix, LossGrads, Router};
    let logits = read(Path::new(&data("logits_e128.npy"))).to_f32_2d("l").unwrap();
    let cfg = moe_router::preset("qwen3-moe").unwrap();
    let r = moe_router::ReferenceRouter::new(cfg);
    let idv = ndarray::Array2::from_shape_vec((64, 8), ids.iter().map(|&i| i as u32).collect()).unwrap();
    let gv = ndarray::Array2::from_shape_vec((64, 8), g).unwrap();
    let want = r
        .weights_vjp_host_at(
            &moe_router::LogitsRef::F32(logits.view()),
            idv.view(),
            &HostMatrix::F32(gv),
            &LossGrads::default(),
            &CallSite::default(),
        )
        .unwrap()
        .to_f32();
    assert_eq!(dz.len(), 64 * 128);
    for (i, (&a, &b)) in dz.iter().zip(want.iter()).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "element {i}");
    }
    // Experts outside a row's replayed ids get no gradient from the weights alone.
    for t in 0..64 {
        for e in 0..128 {
            if !ids[t * 8..t * 8 + 8].contains(&(e as i32)) {
                assert_eq!(dz[t * 128 + e], 0.0, "row {t} expert {e}");
            }
        }
    }
}

#[test]
fn grad_weights_of_the_wrong_shape_or_dtype_is_refused_naming_both() {
    let tmp = out_dir("grad-bad");
    std::fs::create_dir_all(&tmp).unwrap();
    let o = out_dir("grad-bad-out");
    let gp = tmp.join("g.npy");
    for (shape, dtype, bytes, want) in [
        (vec![64usize, 4], NpyDtype::F32, npy::f32_bytes(&[0.0; 256]), "[64, 4]"),
        (vec![32, 8], NpyDtype::F32, npy::f32_bytes(&[0.0; 256]), "[32, 8]"),
        (vec![512], NpyDtype::F32, npy::f32_bytes(&[0.0; 512]), "[512]"),
        (vec![64, 8], NpyDtype::F64, f64_bytes(&[0.0; 512]), "<f8"),
        (vec![64, 8], NpyDtype::I32, npy::i32_bytes(&[0; 512]), "<i4"),
    ] {
        npy::write(&gp, &shape, dtype, &bytes).unwrap();
        let (code, _, err) = run_captured(&[
            "route",
            "--logits",
            &data("logits_e128.npy"),
            "--preset",
            "qwen3-moe",
            "--grad-weights",
            gp.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{shape:?} {dtype:?}: {err}");
        assert!(
            err.contains(want) && err.contains("64, 8"),
            "{shape:?} {dtype:?}: {err}"
        );
        assert!(
            !o.join("ids.npy").exists(),
            "checked before any output is written: {err}"
        );
    }
    // The loss factors need --grad-weights: a usage error.
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        &data("logits_e128.npy"),
        "--preset",
        "qwen3-moe",
        "--grad-z-loss",
        "1",
        "--out",
        o.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
}

// ---- replay features: threshold and the -1 slot sentinel ----------------------------------------

#[test]
fn replay_threshold_reports_the_replace_rate_in_stats_json() {
    let tmp = out_dir("thr-in");
    std::fs::create_dir_all(&tmp).unwrap();
    let own = out_dir("thr-own");
    let logits = data("logits_e128.npy");
    assert_eq!(
        run(&[
            "route",
            "--logits",
            &logits,
            "--preset",
            "qwen3-moe",
            "--out",
            own.to_str().unwrap()
        ]),
        0
    );
    let mut ids: Vec<i128> = read(&own.join("ids.npy")).to_ints("ids").unwrap();
    // Rows 0..16: slot 7 replaced by an expert outside the router's top-K (a weak score).
    for t in 0..16 {
        let row = &ids[t * 8..t * 8 + 8];
        let weak = (0..128).rev().find(|e| !row.contains(e)).unwrap();
        ids[t * 8 + 7] = weak;
    }
    let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let ip = tmp.join("ids.npy");
    npy::write(&ip, &[64, 8], NpyDtype::I32, &npy::i32_bytes(&v)).unwrap();
    let out = out_dir("thr-out");
    let args = |r: &'static str| {
        vec![
            "route".to_string(),
            "--logits".into(),
            logits.clone(),
            "--preset".into(),
            "qwen3-moe".into(),
            "--replay-ids".into(),
            ip.to_str().unwrap().into(),
            "--replay-threshold".into(),
            r.into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    // Ratio 0: every replayed id is kept.
    let a0 = args("0");
    assert_eq!(run(&a0.iter().map(String::as_str).collect::<Vec<_>>()), 0);
    let st = stats_of(&out);
    assert_eq!(st["replayed_slots"].as_u64(), Some(512));
    assert_eq!(st["replace_rate"].as_f64(), Some(0.0));
    assert_eq!(read(&out.join("ids.npy")).to_ints("ids").unwrap(), ids);
    // Ratio 1: an id below the router's weakest top-K score is replaced; the router's own are kept.
    let a1 = args("1");
    assert_eq!(run(&a1.iter().map(String::as_str).collect::<Vec<_>>()), 0);
    let st = stats_of(&out);
    assert_eq!(st["replaced_slots"].as_u64(), Some(16), "{st}");
    assert_eq!(st["replace_rate"].as_f64(), Some(16.0 / 512.0));
    let got = read(&out.join("ids.npy")).to_ints("ids").unwrap();
    let mine = read(&own.join("ids.npy")).to_ints("ids").unwrap();
    for t in 0..64 {
        let mut a = got[t * 8..t * 8 + 8].to_vec();
        let mut b = mine[t * 8..t * 8 + 8].to_vec();
        a.sort();
        b.sort();
        assert_eq!(a, b, "row {t}: the refill is the router's own choice");
    }
    // A negative ratio is a usage error, before any output.
    let bad = out_dir("thr-bad");
    let mut an = args("-0.5");
    an[10] = bad.to_str().unwrap().into();
    let (code, _, err) = run_captured(&an.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(code, 0, "{err}");
    assert!(!bad.join("ids.npy").exists());
}

#[test]
fn minus_one_in_replay_ids_takes_the_routers_choice_for_that_slot_and_is_counted() {
    let tmp = out_dir("sent-in");
    std::fs::create_dir_all(&tmp).unwrap();
    let own = out_dir("sent-own");
    let logits = data("logits_e128.npy");
    assert_eq!(
        run(&[
            "route",
            "--logits",
            &logits,
            "--preset",
            "qwen3-moe",
            "--out",
            own.to_str().unwrap()
        ]),
        0
    );
    let mine: Vec<i128> = read(&own.join("ids.npy")).to_ints("ids").unwrap();
    // Every row: all slots -1 (the router's selection); row 3 keeps slots 0..4 forced.
    let mut v = vec![-1i32; 512];
    for s in 0..4 {
        v[3 * 8 + s] = mine[3 * 8 + s] as i32;
    }
    let ip = tmp.join("ids.npy");
    npy::write(&ip, &[64, 8], NpyDtype::I32, &npy::i32_bytes(&v)).unwrap();
    let out = out_dir("sent-out");
    let code = run(&[
        "route",
        "--logits",
        &logits,
        "--preset",
        "qwen3-moe",
        "--replay-ids",
        ip.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert_eq!(read(&out.join("ids.npy")).to_ints("ids").unwrap(), mine);
    let st = stats_of(&out);
    assert_eq!(st["sentinel_slots"].as_u64(), Some(4), "row 3's four -1 slots: {st}");
    assert_eq!(st["router_rows"].as_u64(), Some(63), "the all -1 rows: {st}");
    assert_eq!(st["replayed_slots"].as_u64(), Some(4), "{st}");
    assert!(st.get("replace_rate").is_none(), "no threshold, no replace rate: {st}");
    // -2 is not the sentinel: refused with the row and slot.
    v[5 * 8 + 2] = -2;
    npy::write(&ip, &[64, 8], NpyDtype::I32, &npy::i32_bytes(&v)).unwrap();
    let (code, _, err) = run_captured(&[
        "route",
        "--logits",
        &logits,
        "--preset",
        "qwen3-moe",
        "--replay-ids",
        ip.to_str().unwrap(),
        "--out",
        out_dir("sent-bad").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("row 5") && err.contains("-2"), "{err}");
}
