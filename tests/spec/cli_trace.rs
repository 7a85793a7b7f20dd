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
    for cmd in ["convert", "inspect", "validate", "diff"] {
        let (code, _, _) = run(&[cmd, "--help"]);
        assert_eq!(code, 0, "{cmd} --help");
    }
    for cmd in ["convert", "inspect", "validate", "diff"] {
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
        1,
        "not ascending"
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
