//! The trace CLI contract: `convert`, `inspect`, `validate` and `diff` — formats by extension or
//! flag, exit codes (0 ok, 1 failed, 2 usage, 3 invalid), JSON keys, truncated files.

use moe_router::SeqId;
use moe_router::interop::{self, ExportOptions, Format};
use moe_router::npy::{self, NpyDtype};
use moe_router::trace::{MISSING_ID, Trace, TraceHeader, WriterOptions};
use moe_router_cli::trace_cmds::capture_output;
use ndarray::Array3;
use serde_json::Value;
use std::path::{Path, PathBuf};

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("moe-router-cli-trace-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the CLI, returning (exit code, captured stdout, captured stderr).
fn run(args: &[&str]) -> (u8, String, String) {
    let mut v = vec!["moe-router"];
    v.extend_from_slice(args);
    capture_output(|| moe_router_cli::run(v))
}

fn run_json(args: &[&str]) -> (u8, Value) {
    let (code, out, err) = run(args);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}\n{err}"));
    (code, v)
}

/// `[T, L, K]` ids: row (t, l) = distinct ids; the last token missing (tokens − 1).
fn ids(t: usize, l: usize, k: usize, e: usize, shift: usize) -> Array3<u32> {
    let step = (e / k).max(1);
    let mut a = Array3::from_shape_fn((t, l, k), |(ti, li, j)| {
        ((ti * 5 + li * 3 + shift + j * step) % e) as u32
    });
    a.slice_mut(ndarray::s![t - 1, .., ..]).fill(MISSING_ID);
    a
}

fn write_npy(p: &str, a: &Array3<u32>, dtype: NpyDtype) {
    let (t, l, k) = a.dim();
    let v: Vec<i64> = a
        .iter()
        .map(|&x| if x == MISSING_ID { -1 } else { i64::from(x) })
        .collect();
    let size = match dtype {
        NpyDtype::I16 => 2,
        NpyDtype::I32 => 4,
        NpyDtype::I64 => 8,
        _ => panic!("test dtype"),
    };
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()[..size].to_vec()).collect();
    npy::write(Path::new(p), &[t, l, k], dtype, &data).unwrap();
}

fn multi_chunk_mrt(p: &str) -> Trace {
    let mut t = Trace::new(TraceHeader::new(64, 4, &[1, 3, 5]).unwrap());
    for s in 0..3u64 {
        t.append_dense(SeqId(s), 0, ids(40, 3, 4, 64, s as usize).view())
            .unwrap();
    }
    t.write_file(p, WriterOptions::default().with_chunk_id_bytes(256))
        .unwrap();
    t
}

#[test]
fn every_trace_subcommand_has_help_with_an_example() {
    for cmd in ["convert", "inspect", "validate", "diff", "merge"] {
        let (code, _, _) = run(&[cmd, "--help"]);
        assert_eq!(code, 0, "{cmd} --help");
    }
    for cmd in ["convert", "inspect", "validate", "diff", "merge"] {
        let help = moe_router_cli::trace_cmds::long_help(cmd).unwrap();
        assert!(
            help.contains("moe-router ") && help.contains("Example"),
            "{cmd}: {help}"
        );
    }
}

#[test]
fn npy_to_mrt_to_npy_writes_int32_and_int16_int32_inputs_round_trip_exactly() {
    let d = Dir::new("npy-rt");
    let a = ids(9, 3, 4, 200, 0);
    for (name, dtype) in [("i16", NpyDtype::I16), ("i32", NpyDtype::I32)] {
        let input = d.path(&format!("{name}.npy"));
        write_npy(&input, &a, dtype);
        let mrt = d.path(&format!("{name}.mrt"));
        let (code, _, err) = run(&["convert", &input, &mrt, "--num-experts", "200"]);
        assert_eq!(code, 0, "{err}");
        let back = d.path(&format!("{name}.back.npy"));
        assert_eq!(run(&["convert", &mrt, &back]).0, 0);
        let arr = npy::read(Path::new(&back)).unwrap();
        assert_eq!((arr.dtype, arr.shape.clone()), (NpyDtype::I32, vec![9, 3, 4]));
        let orig = npy::read(Path::new(&input)).unwrap();
        assert_eq!(
            arr.to_ints("a").unwrap(),
            orig.to_ints("a").unwrap(),
            "{name}: same values, -1 for missing"
        );
        // npy → npy keeps the signed dtype byte for byte.
        let same = d.path(&format!("{name}.same.npy"));
        assert_eq!(run(&["convert", &input, &same]).0, 0);
        assert_eq!(std::fs::read(&same).unwrap(), std::fs::read(&input).unwrap());
    }
}

#[test]
fn convert_goes_through_every_format_and_back() {
    let d = Dir::new("all");
    let a = ids(6, 2, 8, 384, 1);
    let src = d.path("src.npy");
    write_npy(&src, &a, NpyDtype::I32);
    let mrt = d.path("src.mrt");
    assert_eq!(
        run(&["convert", &src, &mrt, "--num-experts", "384", "--layers", "3,7"]).0,
        0
    );
    for (fmt, name) in [
        ("npy", "x.npy"),
        ("safetensors", "x.safetensors"),
        ("prime-rl", "x.msgpack"),
        ("sglang", "x.sglang"),
        ("nrlre1", "x.nrlre1"),
        ("r3v1", "x.r3"),
    ] {
        let out = d.path(name);
        let (code, _, err) = run(&["convert", &mrt, &out, "--to", fmt]);
        assert_eq!(code, 0, "{fmt}: {err}");
        let back = d.path(&format!("{name}.back.mrt"));
        let args = [
            "convert",
            &out,
            &back,
            "--from",
            fmt,
            "--num-experts",
            "384",
            "--layers",
            "3,7",
            "--num-layers",
            "2",
            "--top-k",
            "8",
        ];
        let (code, _, err) = run(&args);
        assert_eq!(code, 0, "{fmt} back: {err}");
        let t = moe_router::trace::TraceFile::open(&back).unwrap().to_trace().unwrap();
        assert_eq!(t.header().layer_ids(), vec![3, 7], "{fmt}");
        assert_eq!(t.header().num_experts(), 384, "{fmt}");
        let mut got = t.to_dense(SeqId(0));
        if got.dim().0 < 6 {
            let mut p = Array3::from_elem((6, 2, 8), MISSING_ID);
            p.slice_mut(ndarray::s![..got.dim().0, .., ..]).assign(&got);
            got = p;
        }
        assert_eq!(got, a, "{fmt}");
    }
}

#[test]
fn a_format_that_the_extension_does_not_name_needs_from_or_to_usage_exit_2() {
    let d = Dir::new("ext");
    let src = d.path("a.npy");
    write_npy(&src, &ids(3, 1, 2, 8, 0), NpyDtype::I32);
    let (code, _, err) = run(&["convert", &src, &d.path("a.txt")]);
    assert_eq!(code, 2);
    assert!(err.contains("--to"), "{err}");
    std::fs::copy(&src, d.path("a.bin")).unwrap();
    let (code, _, err) = run(&["convert", &d.path("a.bin"), &d.path("b.mrt")]);
    assert_eq!(code, 2);
    assert!(err.contains("--from"), "{err}");
    assert_eq!(
        run(&["convert", &d.path("a.bin"), &d.path("b.mrt"), "--from", "npy"]).0,
        0
    );
    // Unknown format names and flags are usage errors too.
    assert_eq!(run(&["convert", &src, &d.path("b.mrt"), "--from", "nope"]).0, 2);
    assert_eq!(run(&["convert", &src]).0, 2);
}

#[test]
fn convert_refuses_bad_ids_and_missing_shape_facts_with_exit_1() {
    let d = Dir::new("bad");
    let src = d.path("a.npy");
    write_npy(&src, &ids(3, 1, 2, 64, 0), NpyDtype::I32);
    assert_eq!(
        run(&["convert", &src, &d.path("a.mrt"), "--num-experts", "8"]).0,
        1,
        "ids ≥ E"
    );
    assert_eq!(
        run(&["convert", &src, &d.path("a.mrt"), "--layers", "0,1"]).0,
        1,
        "wrong layer count"
    );
    assert_eq!(
        run(&["convert", &src, &d.path("a.mrt"), "--layers", "3,1"]).0,
        2,
        "not ascending: a malformed argument"
    );
    let text = d.path("a.sglang");
    std::fs::write(&text, "AAAAAAEAAAA=\n").unwrap();
    assert_eq!(
        run(&["convert", &text, &d.path("b.mrt"), "--from", "sglang"]).0,
        1,
        "sglang needs L and K"
    );
    assert_eq!(
        run(&[
            "convert",
            &text,
            &d.path("b.mrt"),
            "--from",
            "sglang",
            "--num-layers",
            "1",
            "--top-k",
            "2"
        ])
        .0,
        0
    );
    assert_eq!(run(&["convert", &d.path("missing.npy"), &d.path("b.mrt")]).0, 1);
    // A multi-sequence trace cannot become one [T, L, K] array.
    let multi = d.path("m.mrt");
    multi_chunk_mrt(&multi);
    assert_eq!(run(&["convert", &multi, &d.path("m.npy")]).0, 1);
    assert_eq!(
        run(&["convert", &multi, &d.path("m2.mrt")]).0,
        0,
        "mrt → mrt keeps every sequence"
    );
}

#[test]
fn inspect_reports_header_counts_chunks_and_load_and_works_on_truncated_files() {
    let d = Dir::new("inspect");
    let p = d.path("t.mrt");
    multi_chunk_mrt(&p);
    let (code, j) = run_json(&["inspect", &p, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(j["header"]["num_experts"], 64);
    assert_eq!(j["header"]["top_k"], 4);
    assert_eq!(j["header"]["layers"], serde_json::json!([1, 3, 5]));
    assert_eq!(j["sequences"], 3);
    assert_eq!(j["tokens"], 3 * 39);
    assert_eq!(j["truncated"], false);
    let chunks = j["chunks"].as_u64().unwrap();
    assert!(chunks > 4, "{chunks}");
    assert_eq!(j["chunk_table"].as_array().unwrap().len() as u64, chunks);
    assert_eq!(j["load"]["per_layer"].as_array().unwrap().len(), 3);
    for key in [
        "file_bytes",
        "recovered_bytes",
        "recovered_chunks",
        "index",
        "rows",
        "missing_rows",
        "layers",
    ] {
        assert!(j.get(key).is_some(), "{key}");
    }
    // Truncate in the middle of the data: inspect still works and says what it recovered.
    let bytes = std::fs::read(&p).unwrap();
    let cut = d.path("cut.mrt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, j) = run_json(&["inspect", &cut, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(j["truncated"], true);
    assert!(j["tail"]["bytes"].as_u64().unwrap() > 0);
    let rc = j["recovered_chunks"].as_u64().unwrap();
    assert!(rc > 0 && rc < chunks, "{rc} of {chunks}");
    assert!(j["recovered_bytes"].as_u64().unwrap() <= (bytes.len() / 2) as u64);
    // Text output.
    let (code, out, _) = run(&["inspect", &cut]);
    assert_eq!(code, 0);
    assert!(out.contains("TRUNCATED") && out.contains("E = 64"), "{out}");
    // Other formats are inspected by content.
    let n = d.path("n.npy");
    write_npy(&n, &ids(4, 2, 2, 8, 0), NpyDtype::I32);
    let (code, j) = run_json(&["inspect", &n, "--json"]);
    assert_eq!(code, 0);
    assert_eq!((j["format"].as_str(), j["tokens"].as_u64()), (Some("npy"), Some(3)));
}

#[test]
fn validate_exits_0_when_valid_and_3_with_each_problem_reported() {
    let d = Dir::new("validate");
    let p = d.path("t.mrt");
    multi_chunk_mrt(&p);
    let (code, j) = run_json(&["validate", &p, "--num-experts", "64", "--json"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["valid"], true);
    for key in [
        "checksum_failures",
        "out_of_range",
        "duplicates",
        "partial_missing",
        "all_zero_layers",
        "empty_layers",
        "coverage",
        "errors",
        "warnings",
    ] {
        assert!(j.get(key).is_some(), "{key}");
    }
    assert_eq!(
        j["coverage"]["rows_missing"], 9,
        "tokens − 1: one missing row per sequence and layer"
    );
    // The model's E differs from the header's.
    let (code, j) = run_json(&["validate", &p, "--num-experts", "32", "--json"]);
    assert_eq!(code, 3);
    assert!(j["out_of_range"].as_u64().unwrap() > 0);
    // A bit flip in a chunk: a checksum failure, exit 3.
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x10;
    let flipped = d.path("flip.mrt");
    std::fs::write(&flipped, &bytes).unwrap();
    let (code, j) = run_json(&["validate", &flipped, "--json"]);
    assert_eq!(code, 3);
    assert!(j["checksum_failures"].as_u64().unwrap() >= 1, "{j}");
    // Truncated: invalid (data was lost).
    let bytes = std::fs::read(&p).unwrap();
    let cut = d.path("cut.mrt");
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    assert_eq!(run(&["validate", &cut]).0, 3);
    // Duplicates, out-of-range and partly missing rows in an array.
    let n = d.path("dup.npy");
    let bad: Vec<i32> = vec![0, 1, 2, 2, 9, 1, -1, 3, 4, 5, 6, 7];
    npy::write(Path::new(&n), &[3, 2, 2], NpyDtype::I32, &npy::i32_bytes(&bad)).unwrap();
    let (code, j) = run_json(&["validate", &n, "--num-experts", "8", "--json"]);
    assert_eq!(code, 3);
    assert_eq!(
        (
            j["duplicates"].as_u64(),
            j["out_of_range"].as_u64(),
            j["partial_missing"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{j}"
    );
    // An all-zero layer (K = 1: a zero-filled capture).
    let z = d.path("zero.npy");
    let mut zeros = vec![0i32; 32 * 2];
    for (i, x) in zeros.iter_mut().enumerate() {
        if i % 2 == 1 {
            *x = (i % 7) as i32 + 1;
        }
    }
    npy::write(Path::new(&z), &[32, 2, 1], NpyDtype::I32, &npy::i32_bytes(&zeros)).unwrap();
    let (code, j) = run_json(&["validate", &z, "--num-experts", "8", "--json"]);
    assert_eq!(code, 3);
    assert_eq!(j["all_zero_layers"], serde_json::json!([0]));
    // Not a trace at all (bad magic) and a corrupted header: invalid, not a crash.
    let junk = d.path("junk.mrt");
    std::fs::write(&junk, b"definitely not a trace file").unwrap();
    let (code, j) = run_json(&["validate", &junk, "--json"]);
    assert_eq!((code, j["valid"].as_bool()), (3, Some(false)));
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[12] ^= 0x01;
    let hdr = d.path("hdr.mrt");
    std::fs::write(&hdr, &bytes).unwrap();
    assert_eq!(run(&["validate", &hdr]).0, 3);
    // Text output and an unreadable input.
    let (code, out, _) = run(&["validate", &p]);
    assert_eq!(code, 0);
    assert!(out.contains("valid"), "{out}");
    assert_eq!(run(&["validate", &d.path("nope.mrt")]).0, 1);
}

#[test]
fn diff_reports_the_contract_keys_over_any_importable_formats() {
    let d = Dir::new("diff");
    let a = ids(5, 2, 2, 8, 0);
    let mut b = a.clone();
    // Token 0 layer 1: one slot differs (overlap 1/2); token 2 layer 0: same set, other order.
    b[[0, 1, 1]] = (a[[0, 1, 1]] + 1) % 8;
    if b[[0, 1, 1]] == b[[0, 1, 0]] {
        b[[0, 1, 1]] = (b[[0, 1, 1]] + 1) % 8;
    }
    b[[2, 0, 0]] = a[[2, 0, 1]];
    b[[2, 0, 1]] = a[[2, 0, 0]];
    let pa = d.path("a.npy");
    write_npy(&pa, &a, NpyDtype::I32);
    let mut tb = Trace::new(TraceHeader::new(8, 2, &[0, 1]).unwrap());
    tb.append_dense(SeqId(0), 0, b.view()).unwrap();
    let pb = d.path("b.msgpack");
    std::fs::write(
        &pb,
        interop::export(Format::PrimeRl, &tb, &ExportOptions::default()).unwrap(),
    )
    .unwrap();
    let (code, j) = run_json(&["diff", &pa, &pb, "--num-experts", "8", "--json"]);
    assert_eq!(code, 0, "{j}");
    // 4 tokens × 2 layers compared (the last token is missing in both).
    assert_eq!(j["router_mismatch_fraction"].as_f64().unwrap(), 1.0 / 8.0);
    assert_eq!(j["token_any_layer_mismatch_fraction"].as_f64().unwrap(), 1.0 / 4.0);
    assert_eq!(j["mean_mismatched_layers_per_token"].as_f64().unwrap(), 1.0 / 4.0);
    let per = j["per_layer"].as_array().unwrap();
    assert_eq!(per.len(), 2);
    for l in per {
        for key in ["layer", "mismatch_fraction", "mean_overlap"] {
            assert!(l.get(key).is_some(), "{key}");
        }
    }
    assert_eq!(per[1]["layer"], 1);
    assert_eq!(per[1]["mismatch_fraction"].as_f64().unwrap(), 0.25);
    assert_eq!(per[1]["mean_overlap"].as_f64().unwrap(), 1.0 - 0.5 / 4.0);
    assert_eq!(
        per[0]["mismatch_fraction"].as_f64().unwrap(),
        0.0,
        "slot order is ignored"
    );
    // Identical inputs; an nrlre1 text found by content.
    let pn = d.path("a.txt");
    let mut ta = Trace::new(TraceHeader::new(8, 2, &[0, 1]).unwrap());
    ta.append_dense(SeqId(0), 0, a.view()).unwrap();
    std::fs::write(
        &pn,
        interop::export(Format::Nrlre1, &ta, &ExportOptions::default()).unwrap(),
    )
    .unwrap();
    let (code, j) = run_json(&["diff", &pa, &pn, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(j["router_mismatch_fraction"].as_f64().unwrap(), 0.0);
    let (code, out, _) = run(&["diff", &pa, &pb]);
    assert_eq!(code, 0);
    assert!(out.contains("router mismatch fraction"), "{out}");
    assert_eq!(run(&["diff", &pa]).0, 2);
    assert_eq!(run(&["diff", &pa, &d.path("none.npy")]).0, 1);
}

/// A one-sequence `.mrt` with `ids` `[T, L, K]` at model layers `layers`, E = `e`.
fn mrt_of(p: &str, a: &Array3<u32>, e: usize, layers: &[u32], seq: u64) -> Trace {
    let mut t = Trace::new(TraceHeader::new(e, a.dim().2, layers).unwrap());
    t.append_dense(SeqId(seq), 0, a.view()).unwrap();
    t.write_file(p, WriterOptions::default()).unwrap();
    t
}

fn read_mrt(p: &str) -> Trace {
    moe_router::trace::TraceFile::open(p).unwrap().to_trace().unwrap()
}

/// A minimal DeepSeek-V3 `config.json`: `n` decoder layers, the first `dense` dense, `mtp` MTP
/// blocks.
fn dsv3_config(d: &Dir, n: usize, dense: usize, mtp: usize) -> String {
    let p = d.path("config.json");
    std::fs::write(
        &p,
        format!(
            r#"{{"model_type": "deepseek_v3", "num_hidden_layers": {n}, "first_k_dense_replace": {dense},
                "num_nextn_predict_layers": {mtp}, "n_routed_experts": 64, "num_experts_per_tok": 4}}"#
        ),
    )
    .unwrap();
    p
}

#[test]
fn diff_of_an_npy_against_its_own_mrt_export_matches_once_the_layer_ids_are_given() {
    let d = Dir::new("diff-layers");
    let a = ids(9, 3, 4, 64, 0);
    let mrt = d.path("r.mrt");
    mrt_of(&mrt, &a, 64, &[1, 2, 3], 0);
    let npy_path = d.path("r.npy");
    assert_eq!(run(&["convert", &mrt, &npy_path]).0, 0);
    // Without the layer ids the npy is layers 0..3: layer 0 and layer 3 are in one input only,
    // listed with their rows, never silently dropped.
    let (code, j) = run_json(&["diff", &npy_path, &mrt, "--json"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["layers_only_in_a"], serde_json::json!([{"layer": 0, "rows": 8}]));
    assert_eq!(j["layers_only_in_b"], serde_json::json!([{"layer": 3, "rows": 8}]));
    let (_, out, _) = run(&["diff", &npy_path, &mrt]);
    assert!(
        out.contains("layers only in A: 1; only in B: 1")
            && out.contains("only in A, not compared: layer 0 (8 rows)")
            && out.contains("only in B, not compared: layer 3 (8 rows)")
            && out.contains("--layers"),
        "{out}"
    );
    // With the model's layer ids (given, or derived from the config) it is the same routing.
    let cfg = dsv3_config(&d, 4, 1, 0);
    for flags in [vec!["--layers", "1-3"], vec!["--layers-from", cfg.as_str()]] {
        let mut args = vec!["diff", npy_path.as_str(), mrt.as_str(), "--json"];
        args.extend(&flags);
        let (code, j) = run_json(&args);
        assert_eq!(code, 0, "{flags:?}: {j}");
        assert_eq!(j["router_mismatch_fraction"].as_f64(), Some(0.0), "{flags:?}");
        assert_eq!(j["routers_compared"].as_u64(), Some(8 * 3), "{flags:?}");
        assert_eq!(j["layers_only_in_a"], serde_json::json!([]), "{flags:?}");
        assert_eq!(j["layers_only_in_b"], serde_json::json!([]), "{flags:?}");
    }
}

#[test]
fn diff_and_validate_select_one_sequence_with_seq() {
    let d = Dir::new("seq-select");
    let multi = d.path("m.mrt");
    let t = multi_chunk_mrt(&multi);
    // Sequence 1 as a one-sequence array, compared with sequence 1 of the trace only.
    let one = d.path("one.npy");
    write_npy(&one, &t.to_dense(SeqId(1)), NpyDtype::I32);
    let (code, j) = run_json(&["diff", &one, &multi, "--layers", "1,3,5", "--seq", "1", "--json"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["router_mismatch_fraction"].as_f64(), Some(0.0));
    assert_eq!(
        (j["tokens_compared"].as_u64(), j["rows_only_in_b"].as_u64()),
        (Some(39), Some(0))
    );
    // Without --seq, the other sequences of the trace are rows only in B.
    let (_, j) = run_json(&["diff", &one, &multi, "--layers", "1,3,5", "--json"]);
    assert!(j["rows_only_in_b"].as_u64().unwrap() > 0, "{j}");
    // validate --seq: coverage of that sequence only; an unknown sequence is invalid.
    let (code, j) = run_json(&["validate", &multi, "--seq", "2", "--json"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["coverage"]["sequences"], 1);
    let (code, j) = run_json(&["validate", &multi, "--seq", "9", "--json"]);
    assert_eq!(code, 3, "{j}");
    assert!(j["errors"].to_string().contains("no such sequence"), "{j}");
}

#[test]
fn validate_checks_the_layer_map_against_the_models_layers() {
    let d = Dir::new("validate-layers");
    let mrt = d.path("r.mrt");
    mrt_of(&mrt, &ids(5, 4, 4, 64, 0), 64, &[2, 3, 4, 5], 0);
    let good = dsv3_config(&d, 6, 2, 1);
    assert_eq!(run(&["validate", &mrt, "--layers-from", &good]).0, 0);
    assert_eq!(run(&["validate", &mrt, "--layers", "2-5"]).0, 0);
    // With the MTP block the model has 5 MoE layers: the trace's map is not the model's.
    let (code, j) = run_json(&["validate", &mrt, "--layers-from", &good, "--mtp-layers", "--json"]);
    assert_eq!(code, 3, "{j}");
    assert_eq!(j["errors"][0]["kind"], "layer_map", "{j}");
    let (code, _, _) = run(&["validate", &mrt, "--layers", "1-4"]);
    assert_eq!(code, 3);
    // An array input takes the ids for its L axis.
    let n = d.path("a.npy");
    write_npy(&n, &ids(5, 4, 4, 64, 0), NpyDtype::I32);
    let (code, j) = run_json(&["validate", &n, "--layers-from", &good, "--json"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["coverage"]["per_layer"][0]["layer"], 2);
}

#[test]
fn layers_from_derives_the_moe_layers_wherever_layers_is_accepted() {
    let d = Dir::new("layers-from");
    // Qwen3-30B-A3B: every one of its 48 layers is MoE, ids 0-47.
    let qwen = format!("{}/fixtures/hf/qwen3_moe.json", env!("CARGO_MANIFEST_DIR"));
    let src = d.path("q.npy");
    write_npy(&src, &ids(3, 48, 8, 128, 0), NpyDtype::I32);
    let out = d.path("q.mrt");
    let (code, _, err) = run(&["convert", &src, &out, "--num-experts", "128", "--layers-from", &qwen]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_mrt(&out).header().layer_ids(), (0..48).collect::<Vec<u32>>());
    // DeepSeek-style: 2 dense layers, then MoE; --mtp-layers appends the MTP block.
    let cfg = dsv3_config(&d, 6, 2, 1);
    let src = d.path("d.npy");
    write_npy(&src, &ids(3, 5, 4, 64, 0), NpyDtype::I32);
    let out = d.path("d.mrt");
    assert_eq!(
        run(&["convert", &src, &out, "--layers-from", &cfg, "--mtp-layers"]).0,
        0
    );
    assert_eq!(read_mrt(&out).header().layer_ids(), vec![2, 3, 4, 5, 6]);
    // Four layers without the MTP block: the array's five do not fit (exit 1, the shapes differ).
    assert_eq!(run(&["convert", &src, &d.path("x.mrt"), "--layers-from", &cfg]).0, 1);
    let merged = d.path("m.mrt");
    assert_eq!(
        run(&["merge", &src, "--out", &merged, "--layers-from", &cfg, "--mtp-layers"]).0,
        0
    );
    assert_eq!(read_mrt(&merged).header().layer_ids(), vec![2, 3, 4, 5, 6]);
    // A config the importer cannot read is an error naming the file and the key.
    let bad = d.path("bad.json");
    std::fs::write(&bad, r#"{"model_type": "mixtral"}"#).unwrap();
    let (code, _, err) = run(&["convert", &src, &d.path("y.mrt"), "--layers-from", &bad]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.json") && err.contains("num_hidden_layers"), "{err}");
}

#[test]
fn an_empty_capture_neither_converts_nor_validates() {
    let d = Dir::new("empty");
    // A 0-byte SGLang response, a zero-length nrlre1 payload, an empty [0, L, K] .npy.
    let sg = d.path("empty.b64");
    std::fs::write(&sg, b"").unwrap();
    let nr = d.path("empty.txt");
    std::fs::write(&nr, b"nrlre1:int32:0x2x2:\n").unwrap();
    let np = d.path("empty.npy");
    npy::write(Path::new(&np), &[0, 2, 2], NpyDtype::I32, &[]).unwrap();
    // Every row missing: nothing was captured either.
    let missing = d.path("missing.npy");
    npy::write(
        Path::new(&missing),
        &[3, 2, 2],
        NpyDtype::I32,
        &npy::i32_bytes(&[-1; 12]),
    )
    .unwrap();
    let shape = ["--num-layers", "2", "--top-k", "2"];
    for (p, from) in [(&sg, "sglang"), (&nr, "nrlre1"), (&np, "npy"), (&missing, "npy")] {
        let mut args = vec!["convert", p.as_str(), "/nonexistent-dir/never.mrt", "--from", from];
        args.extend(shape);
        let (code, _, err) = run(&args);
        assert_eq!(code, 1, "{p}: {err}");
        assert!(err.contains("no routes") || err.contains("empty"), "{p}: {err}");
        let mut args = vec!["validate", p.as_str(), "--from", from, "--json"];
        args.extend(shape);
        let (code, j) = run_json(&args);
        assert_eq!((code, j["valid"].as_bool()), (3, Some(false)), "{p}: {j}");
        assert!(
            j["errors"].as_array().unwrap().iter().any(|e| e["kind"] == "empty"),
            "{p}: {j}"
        );
    }
    // A 0-byte file is invalid without --from too, and an .mrt with no routes is invalid.
    let (code, j) = run_json(&["validate", &sg, "--json"]);
    assert_eq!((code, j["errors"][0]["kind"].as_str()), (3, Some("empty")), "{j}");
    let mrt = d.path("empty.mrt");
    Trace::new(TraceHeader::new(8, 2, &[0, 1]).unwrap())
        .write_file(&mrt, WriterOptions::default())
        .unwrap();
    let (code, j) = run_json(&["validate", &mrt, "--json"]);
    assert_eq!(code, 3, "{j}");
    assert_eq!(run(&["convert", &mrt, &d.path("e.npy")]).0, 1);
}

#[test]
fn validate_takes_from_like_convert() {
    let d = Dir::new("validate-from");
    let b = d.path("capture.bin");
    write_npy(&b, &ids(4, 2, 2, 8, 0), NpyDtype::I32);
    let (code, j) = run_json(&["validate", &b, "--from", "npy", "--num-experts", "8", "--json"]);
    assert_eq!((code, j["format"].as_str()), (0, Some("npy")), "{j}");
    // --from names the format even against the content: an npy read as SGLang text is invalid.
    let (code, _, _) = run(&["validate", &b, "--from", "sglang", "--num-layers", "2", "--top-k", "2"]);
    assert_ne!(code, 0);
}

#[test]
fn malformed_arguments_of_the_trace_commands_exit_2() {
    let d = Dir::new("usage2");
    let src = d.path("a.npy");
    write_npy(&src, &ids(3, 2, 2, 8, 0), NpyDtype::I32);
    let out = d.path("a.mrt");
    for args in [
        vec!["convert", &src, &out, "--layers", "3-1"],
        vec!["convert", &src, &out, "--layers", "0,x"],
        vec!["convert", &src, &out, "--num-experts", "0"],
        vec!["convert", &src, &out, "--layers", "0-1", "--layers-from", "c.json"],
        vec!["convert", &src, &out, "--mtp-layers"],
        vec!["validate", &src, "--num-experts", "0"],
        vec!["validate", &src, "--top-k", "0"],
        vec!["diff", &src, &src, "--num-layers", "0"],
        vec!["merge", &src, "--out", &d.path("m.npy")],
        vec!["merge", &src, "--out", &out, "--seq-ids", "1,2"],
        vec!["merge", &src, "--out", &out, "--seq-ids", "5-2"],
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    assert!(!Path::new(&out).exists(), "nothing is written on a usage error");
}

#[test]
fn validate_text_lists_the_first_20_errors_and_says_how_many_more() {
    let d = Dir::new("validate-more");
    // 30 rows with a duplicate id each, then 5 good rows.
    let n = d.path("dup.npy");
    let v: Vec<i32> = (0..35)
        .flat_map(|i| if i < 30 { [i % 8, i % 8] } else { [i % 8, (i + 1) % 8] })
        .collect();
    npy::write(Path::new(&n), &[35, 1, 2], NpyDtype::I32, &npy::i32_bytes(&v)).unwrap();
    let (code, out, _) = run(&["validate", &n, "--num-experts", "8"]);
    assert_eq!(code, 3);
    assert_eq!(out.matches("  error [").count(), 20, "{out}");
    assert!(out.contains("and 10 more error(s)"), "{out}");
    let (_, j) = run_json(&["validate", &n, "--num-experts", "8", "--json"]);
    assert_eq!(j["duplicates"], 30);
    assert_eq!(
        j["errors"].as_array().unwrap().len() as u64 + j["errors_not_listed"].as_u64().unwrap(),
        30,
        "every duplicate row, listed or counted: {j}"
    );
}

#[test]
fn convert_picks_one_sequence_of_many_with_seq_and_names_imported_ones() {
    let d = Dir::new("convert-seq");
    let multi = d.path("m.mrt");
    let t = multi_chunk_mrt(&multi);
    // The multi-sequence trace cannot be exported whole; the error names --seq.
    let (code, _, err) = run(&["convert", &multi, &d.path("all.npy")]);
    assert_eq!(code, 1);
    assert!(err.contains("--seq"), "{err}");
    let one = d.path("s2.npy");
    let (code, _, err) = run(&["convert", &multi, &one, "--seq", "2"]);
    assert_eq!(code, 0, "{err}");
    let arr = npy::read(Path::new(&one)).unwrap();
    let expect: Vec<i128> = t
        .to_dense(SeqId(2))
        .iter()
        .map(|&x| if x == MISSING_ID { -1 } else { i128::from(x) })
        .collect();
    assert_eq!(arr.to_ints("ids").unwrap(), expect);
    // mrt → mrt keeps only the sequence asked for; an unknown one is an error listing them.
    let kept = d.path("s1.mrt");
    assert_eq!(run(&["convert", &multi, &kept, "--seq", "1"]).0, 0);
    assert_eq!(read_mrt(&kept).sequences(), vec![SeqId(1)]);
    let (code, _, err) = run(&["convert", &multi, &d.path("s9.npy"), "--seq", "9"]);
    assert_eq!(code, 1);
    assert!(err.contains("0, 1, 2"), "{err}");
    // On import, an array's rows get the sequence id given.
    let back = d.path("back.mrt");
    assert_eq!(
        run(&[
            "convert",
            &one,
            &back,
            "--num-experts",
            "64",
            "--layers",
            "1,3,5",
            "--seq",
            "17"
        ])
        .0,
        0
    );
    assert_eq!(read_mrt(&back).sequences(), vec![SeqId(17)]);
}

#[test]
fn merge_joins_per_sample_and_per_rank_captures_and_refuses_conflicts() {
    let d = Dir::new("merge");
    let samples: Vec<Array3<u32>> = (0..3).map(|s| ids(6, 2, 2, 16, s)).collect();
    let paths: Vec<String> = (0..3)
        .map(|s| {
            let p = d.path(&format!("s{s}.npy"));
            write_npy(&p, &samples[s], NpyDtype::I32);
            p
        })
        .collect();
    // Per-sample arrays: sequence ids from --seq-ids (or their order).
    let out = d.path("all.mrt");
    let mut args = vec!["merge"];
    args.extend(paths.iter().map(String::as_str));
    args.extend([
        "--out",
        &out,
        "--num-experts",
        "16",
        "--layers",
        "1,3",
        "--seq-ids",
        "40-42",
    ]);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("-> sequence 41"), "each assignment is said: {err}");
    let t = read_mrt(&out);
    assert_eq!(t.sequences(), vec![SeqId(40), SeqId(41), SeqId(42)]);
    assert_eq!(t.header().layer_ids(), vec![1, 3]);
    for (s, a) in samples.iter().enumerate() {
        assert_eq!(t.to_dense(SeqId(40 + s as u64)), *a);
    }
    // Per-rank traces: sequences are kept; the same routes twice are kept once.
    let r0 = d.path("r0.mrt");
    let r1 = d.path("r1.mrt");
    mrt_of(&r0, &samples[0], 16, &[1, 3], 0);
    mrt_of(&r1, &samples[1], 16, &[1, 3], 1);
    let ranks = d.path("ranks.mrt");
    assert_eq!(run(&["merge", &r0, &r1, &r0, "--out", &ranks]).0, 0);
    assert_eq!(read_mrt(&ranks).sequences(), vec![SeqId(0), SeqId(1)]);
    // A position recorded with other ids is a conflict, and nothing is written.
    let clash = d.path("clash.mrt");
    mrt_of(&clash, &samples[2], 16, &[1, 3], 0);
    let bad = d.path("bad.mrt");
    let (code, _, err) = run(&["merge", &r0, &clash, "--out", &bad]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("clash.mrt") && err.contains("sequence 0"), "{err}");
    assert!(!Path::new(&bad).exists());
    // Arrays without E take max id + 1 each: different E is an error saying what to pass.
    let small = d.path("small.npy");
    write_npy(&small, &ids(3, 2, 2, 4, 0), NpyDtype::I32);
    let (code, _, err) = run(&["merge", &paths[0], &small, "--out", &bad, "--layers", "1,3"]);
    assert_eq!(code, 1);
    assert!(err.contains("--num-experts"), "{err}");
    // Different layer maps are an error naming both inputs.
    let other = d.path("other.mrt");
    mrt_of(&other, &samples[1], 16, &[2, 3], 5);
    let (code, _, err) = run(&["merge", &r0, &other, "--out", &bad]);
    assert_eq!(code, 1);
    assert!(
        err.contains("other.mrt") && err.contains("r0.mrt") && err.contains("layer map"),
        "{err}"
    );
}

#[test]
fn trace_command_messages_name_a_path_once() {
    let d = Dir::new("path-once");
    let missing = d.path("missing.mrt");
    let junk = d.path("junk.mrt");
    std::fs::write(&junk, b"definitely not a trace file").unwrap();
    let missing_npy = d.path("missing.npy");
    let good = d.path("g.npy");
    write_npy(&good, &ids(3, 1, 2, 8, 0), NpyDtype::I32);
    for (args, path) in [
        (vec!["convert", &missing, &d.path("x.npy")], &missing),
        (vec!["convert", &junk, &d.path("x.npy")], &junk),
        (vec!["convert", &missing_npy, &d.path("x.mrt")], &missing_npy),
        (vec!["inspect", &missing], &missing),
        (vec!["inspect", &junk], &junk),
        (vec!["validate", &missing], &missing),
        (vec!["diff", &good, &missing], &missing),
        (vec!["merge", &good, &missing, "--out", &d.path("m.mrt")], &missing),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.matches(path.as_str()).count(), 1, "{args:?}: {err}");
    }
}
