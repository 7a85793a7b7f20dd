//! Interop: npy, safetensors, SGLang, NeMo Gym, Fireworks R3/v1 and prime-rl import/export —
//! round trips (> 256 experts where the format allows, property tests), refusal of out-of-range
//! and wrapping values, and malformed input of each format as a typed error.
//!
//! Reference encodings (msgpack maps, zstd frames, base64) are assembled by hand here, from the
//! published layouts, so the importers are checked against the formats and not only against our
//! own exporters.

use moe_router::interop::{self, DenseRoutes, Element, ExportOptions, Format, ImportOptions, IntDtype, InteropError};
use moe_router::npy::{self, NpyDtype, NpyError};
use moe_router::trace::{MISSING_ID, Trace, TraceHeader};
use moe_router::{LayerId, SeqId};
use ndarray::{Array3, array};
use proptest::prelude::*;

const M: u32 = MISSING_ID;

// ---------------------------------------------------------------------------------------------
// Independent reference encoders.

/// Standard base64 with padding.
pub(crate) fn b64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            s.push(if i <= c.len() {
                A[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    s
}

/// A zstd frame holding `content` in raw blocks (RFC 8878: single segment, 4-byte content size).
pub(crate) fn zstd_raw_frame(content: &[u8]) -> Vec<u8> {
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0xA0];
    f.extend_from_slice(&(content.len() as u32).to_le_bytes());
    let chunks: Vec<&[u8]> = if content.is_empty() {
        vec![&[][..]]
    } else {
        content.chunks(1 << 16).collect()
    };
    for (i, c) in chunks.iter().enumerate() {
        let last = u32::from(i + 1 == chunks.len());
        let h = last | ((c.len() as u32) << 3); // block type 0 = raw
        f.extend_from_slice(&h.to_le_bytes()[..3]);
        f.extend_from_slice(c);
    }
    f
}

/// The 32-byte R3/v1 header (`<4sBBBBIIIIQ`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn r3_header(mode: u8, dtype: u8, total: u32, replayed: u32, start: u32, sel: u32, mat: u64) -> Vec<u8> {
    let mut h = b"R3V1".to_vec();
    h.extend_from_slice(&[1, mode, dtype, 0]);
    for v in [total, replayed, start, sel] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&mat.to_le_bytes());
    assert_eq!(h.len(), 32);
    h
}

/// R3/v1 text of a header, selector and matrices.
pub(crate) fn r3_text(header: &[u8], selector: &[u8], matrices: &[u8]) -> String {
    let mut c = header.to_vec();
    c.extend_from_slice(selector);
    c.extend_from_slice(matrices);
    b64(&zstd_raw_frame(&c))
}

fn msgpack_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 32);
    out.push(0xa0 | s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn msgpack_uint(out: &mut Vec<u8>, v: u64) {
    if v < 128 {
        out.push(v as u8);
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// A prime-rl msgpack map `{data, shape, dtype, start}`.
pub(crate) fn prime_rl_map(data: &[u8], shape: [u64; 3], dtype: &str, start: u64) -> Vec<u8> {
    let mut m = vec![0x84];
    msgpack_str(&mut m, "data");
    m.push(0xc6);
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    msgpack_str(&mut m, "shape");
    m.push(0x93);
    for d in shape {
        msgpack_uint(&mut m, d);
    }
    msgpack_str(&mut m, "dtype");
    msgpack_str(&mut m, dtype);
    msgpack_str(&mut m, "start");
    msgpack_uint(&mut m, start);
    m
}

fn le_bytes(v: &[i64], dtype: IntDtype) -> Vec<u8> {
    v.iter()
        .flat_map(|x| x.to_le_bytes()[..dtype.size()].to_vec())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn opts() -> ImportOptions {
    ImportOptions::default()
}

/// A valid `[T, L, K]` block: row (t, l) holds ids (t + l + j·step) mod E, distinct.
fn block(t: usize, l: usize, k: usize, e: usize) -> Array3<u32> {
    let step = (e / k).max(1);
    Array3::from_shape_fn((t, l, k), |(ti, li, j)| ((ti * 7 + li * 3 + j * step) % e) as u32)
}

fn trace_of(ids: &Array3<u32>, e: usize, layers: &[u32]) -> Trace {
    let (_, _, k) = ids.dim();
    let mut t = Trace::new(TraceHeader::new(e, k, layers).unwrap());
    t.append_dense(SeqId(0), 0, ids.view()).unwrap();
    t
}

fn export(format: Format, t: &Trace) -> Vec<u8> {
    interop::export(format, t, &ExportOptions::default()).unwrap()
}

/// Import options that give every format the shape it needs.
fn shape_opts(l: usize, k: usize) -> ImportOptions {
    opts().with_shape(l, k)
}

fn dense0(t: &Trace) -> Array3<u32> {
    t.to_dense(SeqId(0))
}

/// `hay` with the first `from` replaced by `to` (same length).
fn replace_bytes(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let i = hay.windows(from.len()).position(|w| w == from).unwrap();
    let mut v = hay.to_vec();
    v[i..i + to.len()].copy_from_slice(to);
    v
}

fn element(index: u64, token: u64, layer_index: usize, slot: usize) -> Element {
    Element {
        index,
        token,
        layer_index,
        slot,
    }
}

// ---------------------------------------------------------------------------------------------
// Formats and defaults.

#[test]
fn formats_are_named_and_chosen_by_extension_only_where_unambiguous() {
    for f in Format::ALL {
        assert_eq!(Format::from_name(f.name()), Some(f));
    }
    assert_eq!(Format::from_name("prime_rl"), Some(Format::PrimeRl));
    assert_eq!(Format::from_extension("mrt"), Some(Format::Mrt));
    assert_eq!(Format::from_extension("npy"), Some(Format::Npy));
    assert_eq!(Format::from_extension("safetensors"), Some(Format::Safetensors));
    assert_eq!(Format::from_extension("msgpack"), Some(Format::PrimeRl));
    for ext in ["txt", "b64", "json", "bin", ""] {
        assert_eq!(Format::from_extension(ext), None, "{ext}");
    }
    let t = trace_of(&block(3, 2, 2, 8), 8, &[0, 1]);
    for f in [
        Format::Npy,
        Format::Safetensors,
        Format::Nrlre1,
        Format::R3v1,
        Format::PrimeRl,
        Format::Sglang,
    ] {
        assert_eq!(Format::sniff(&export(f, &t)), Some(f), "{f}");
    }
}

#[test]
fn a_dense_array_is_sequence_0_from_position_0_over_layers_0_to_l_unless_given() {
    let ids = block(5, 3, 2, 16);
    let bytes = npy::to_bytes(
        &[5, 3, 2],
        NpyDtype::I32,
        &npy::i32_bytes(&ids.iter().map(|&x| x as i32).collect::<Vec<_>>()),
    );
    let t = interop::import(Format::Npy, &bytes, &opts()).unwrap();
    assert_eq!(t.sequences(), vec![SeqId(0)]);
    assert_eq!(t.header().layer_ids(), vec![0, 1, 2]);
    assert_eq!(t.header().num_experts(), 16, "E defaults to max id + 1");
    assert_eq!(
        t.row(SeqId(0), LayerId(2), 4),
        Some(ids.slice(ndarray::s![4, 2, ..]).to_vec())
    );
    // Caller-given E, layer ids and sequence id.
    let o = ImportOptions {
        seq: SeqId(42),
        ..opts().with_num_experts(128).with_layers(vec![1, 5, 9])
    };
    let t = interop::import(Format::Npy, &bytes, &o).unwrap();
    assert_eq!(t.sequences(), vec![SeqId(42)]);
    assert_eq!(t.header().layer_ids(), vec![1, 5, 9]);
    assert_eq!(t.header().num_experts(), 128);
    assert_eq!(
        t.row(SeqId(42), LayerId(9), 4),
        Some(ids.slice(ndarray::s![4, 2, ..]).to_vec())
    );
    // A layer list of the wrong length is a typed error.
    let err = interop::import(Format::Npy, &bytes, &opts().with_layers(vec![0, 1])).unwrap_err();
    assert!(matches!(err, InteropError::Header { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// npy.

#[test]
fn npy_int16_and_int32_round_trip_exactly_with_missing_rows() {
    let mut ids = block(6, 3, 4, 64);
    ids.slice_mut(ndarray::s![5, .., ..]).fill(M); // tokens − 1: last row missing
    ids.slice_mut(ndarray::s![2, 1, ..]).fill(M);
    for dtype in [IntDtype::I16, IntDtype::I32] {
        let vals: Vec<i64> = ids.iter().map(|&x| if x == M { -1 } else { i64::from(x) }).collect();
        let bytes = npy::to_bytes(&[6, 3, 4], interop::npy::npy_dtype(dtype), &le_bytes(&vals, dtype));
        let t = interop::import(Format::Npy, &bytes, &opts().with_num_experts(64)).unwrap();
        assert_eq!(dense0(&t), ids);
        let out = interop::export(
            Format::Npy,
            &t,
            &ExportOptions {
                dtype: Some(dtype),
                ..ExportOptions::default()
            },
        )
        .unwrap();
        assert_eq!(out, bytes, "{dtype}: byte-identical round trip");
        // The default export is int32 with -1 for missing.
        let a = npy::parse(&export(Format::Npy, &t)).unwrap();
        assert_eq!((a.dtype, a.shape.clone()), (NpyDtype::I32, vec![6, 3, 4]));
        assert_eq!(
            a.to_ints("ids").unwrap(),
            vals.iter().map(|&v| i128::from(v)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn npy_imports_every_integer_dtype_and_refuses_floats() {
    let ids = block(4, 2, 2, 100);
    let vals: Vec<i64> = ids.iter().map(|&x| i64::from(x)).collect();
    for d in [
        IntDtype::I8,
        IntDtype::I16,
        IntDtype::I32,
        IntDtype::I64,
        IntDtype::U8,
        IntDtype::U16,
        IntDtype::U32,
        IntDtype::U64,
    ] {
        let bytes = npy::to_bytes(&[4, 2, 2], interop::npy::npy_dtype(d), &le_bytes(&vals, d));
        let t = interop::import(Format::Npy, &bytes, &opts().with_num_experts(100)).unwrap();
        assert_eq!(dense0(&t), ids, "{d}");
    }
    let f = npy::to_bytes(&[1, 1, 2], NpyDtype::F32, &npy::f32_bytes(&[0.0, 1.0]));
    assert!(matches!(
        interop::import(Format::Npy, &f, &opts()),
        Err(InteropError::Dtype { .. })
    ));
}

#[test]
fn npy_refuses_out_of_range_negative_duplicate_and_partly_missing_values_with_their_element() {
    let mk = |v: &[i32]| npy::to_bytes(&[2, 2, 2], NpyDtype::I32, &npy::i32_bytes(v));
    let o = opts().with_num_experts(8);
    // Element 5 = token 1, layer 0, slot 1.
    let err = interop::import(Format::Npy, &mk(&[0, 1, 2, 3, 4, 8, 6, 7]), &o).unwrap_err();
    assert_eq!(
        err,
        InteropError::IdOutOfRange {
            format: Format::Npy,
            at: element(5, 1, 0, 1),
            value: 8,
            num_experts: 8
        }
    );
    // A value that would wrap to a small id (65 539 = 3 mod 2^16) is refused, never wrapped.
    let err = interop::import(Format::Npy, &mk(&[0, 1, 2, 3, 4, 65_539, 6, 7]), &opts()).unwrap_err();
    assert!(matches!(err, InteropError::IdOutOfRange { value: 65_539, .. }), "{err}");
    let err = interop::import(Format::Npy, &mk(&[0, 1, 2, -2, 4, 5, 6, 7]), &o).unwrap_err();
    assert_eq!(
        err,
        InteropError::Negative {
            format: Format::Npy,
            at: element(3, 0, 1, 1),
            value: -2
        }
    );
    let err = interop::import(Format::Npy, &mk(&[0, 1, 2, 3, 0, 0, 6, 7]), &o).unwrap_err();
    assert!(
        matches!(&err, InteropError::DuplicateId { at, id: 0, hint, .. } if *at == element(5, 1, 0, 1) && hint.contains("zero")),
        "{err}"
    );
    let err = interop::import(Format::Npy, &mk(&[0, 1, 2, -1, 4, 5, 6, 7]), &o).unwrap_err();
    assert!(
        matches!(err, InteropError::PartialMissing { at, .. } if at == element(3, 0, 1, 1)),
        "{err}"
    );
    // Never silently routed: a whole row of -1 is missing, not expert 0.
    let t = interop::import(Format::Npy, &mk(&[0, 1, 2, 3, -1, -1, 6, 7]), &o).unwrap();
    assert_eq!(t.row(SeqId(0), LayerId(0), 1), None);
}

#[test]
fn npy_export_refuses_values_that_do_not_fit_the_dtype() {
    let mut ids = block(2, 1, 2, 300);
    ids[[1, 0, 1]] = 299;
    let t = trace_of(&ids, 300, &[0]);
    let err = interop::export(
        Format::Npy,
        &t,
        &ExportOptions {
            dtype: Some(IntDtype::I8),
            ..ExportOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, InteropError::DoesNotFit { value, .. } if value > 127),
        "{err}"
    );
    // Missing rows need a signed dtype.
    let mut m = block(2, 1, 2, 8);
    m.slice_mut(ndarray::s![1, .., ..]).fill(M);
    let t = trace_of(&m, 8, &[0]);
    let err = interop::export(
        Format::Npy,
        &t,
        &ExportOptions {
            dtype: Some(IntDtype::U8),
            ..ExportOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, InteropError::DoesNotFit { value: -1, at, .. } if at.token == 1),
        "{err}"
    );
}

#[test]
fn malformed_npy_is_a_typed_error_with_its_byte_offset() {
    let good = npy::to_bytes(&[2, 2, 2], NpyDtype::I32, &npy::i32_bytes(&[0, 1, 2, 3, 4, 5, 6, 7]));
    let err = interop::import(Format::Npy, &good[..good.len() - 3], &opts()).unwrap_err();
    let data_at = good.len() - 32;
    assert!(
        matches!(err, InteropError::Npy(NpyError::Truncated { offset, needed: 32, available: 29 }) if offset == data_at),
        "{err}"
    );
    assert!(matches!(
        interop::import(Format::Npy, b"NUMPY\x01\x00\x10\x00", &opts()),
        Err(InteropError::Npy(NpyError::BadMagic))
    ));
    let rank2 = npy::to_bytes(&[2, 4], NpyDtype::I32, &npy::i32_bytes(&[0, 1, 2, 3, 4, 5, 6, 7]));
    assert!(matches!(
        interop::import(Format::Npy, &rank2, &opts()),
        Err(InteropError::Shape { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// safetensors.

#[test]
fn safetensors_round_trips_e_and_the_layer_map_in_metadata() {
    let mut ids = block(7, 3, 6, 512);
    ids.slice_mut(ndarray::s![6, .., ..]).fill(M);
    let t = trace_of(&ids, 512, &[1, 4, 7]);
    let bytes = export(Format::Safetensors, &t);
    let back = interop::import(Format::Safetensors, &bytes, &opts()).unwrap();
    assert_eq!(back.header().num_experts(), 512);
    assert_eq!(back.header().layer_ids(), vec![1, 4, 7]);
    assert_eq!(dense0(&back), ids);
    // A caller E that disagrees with the metadata is refused, never silently picked.
    let err = interop::import(Format::Safetensors, &bytes, &opts().with_num_experts(256)).unwrap_err();
    assert!(
        matches!(
            err,
            InteropError::Conflict {
                what: "num_experts",
                ..
            }
        ),
        "{err}"
    );
    let err = interop::import(Format::Safetensors, &bytes, &opts().with_layers(vec![0, 1, 2])).unwrap_err();
    assert!(matches!(err, InteropError::Conflict { what: "layer ids", .. }), "{err}");
}

#[test]
fn malformed_safetensors_is_a_typed_error() {
    let t = trace_of(&block(2, 2, 2, 8), 8, &[0, 1]);
    let bytes = export(Format::Safetensors, &t);
    let err = interop::import(Format::Safetensors, &bytes[..4], &opts()).unwrap_err();
    assert!(matches!(err, InteropError::Malformed { offset: 0, .. }), "{err}");
    let err = interop::import(Format::Safetensors, &bytes[..bytes.len() - 1], &opts()).unwrap_err();
    assert!(matches!(err, InteropError::Malformed { .. }), "{err}");
    // Another tensor name.
    let renamed = replace_bytes(&bytes, b"\"routed_experts\"", b"\"routed_xperts!\"");
    let err = interop::import(Format::Safetensors, &renamed, &opts()).unwrap_err();
    assert!(err.to_string().contains("no tensor named \"routed_experts\""), "{err}");
    // A float tensor.
    let floated = replace_bytes(&bytes, b"\"I32\"", b"\"F32\"");
    assert!(matches!(
        interop::import(Format::Safetensors, &floated, &opts()),
        Err(InteropError::Dtype { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// SGLang.

#[test]
fn sglang_is_base64_of_little_endian_int32_with_l_and_k_from_the_caller() {
    let vals: Vec<i32> = vec![3, 1, 0, 2, 7, 6, 5, 4, -1, -1, 2, 3];
    let text = b64(&npy::i32_bytes(&vals));
    let d = interop::sglang::decode(text.as_bytes(), &shape_opts(2, 2)).unwrap();
    assert_eq!(d.dim(), (3, 2, 2));
    let t = d
        .to_trace(Format::Sglang, &shape_opts(2, 2).with_num_experts(8))
        .unwrap();
    assert_eq!(t.row(SeqId(0), LayerId(1), 1), Some(vec![5, 4]));
    assert_eq!(t.row(SeqId(0), LayerId(0), 2), None, "-1 row is missing");
    assert_eq!(String::from_utf8(export(Format::Sglang, &t)).unwrap(), text);
    // Without L and K: a typed error that says what to pass.
    let err = interop::sglang::decode(text.as_bytes(), &opts()).unwrap_err();
    assert!(
        matches!(err, InteropError::MissingOption { .. }) && err.to_string().contains("--num-layers"),
        "{err}"
    );
    // Unpadded base64 and surrounding whitespace are accepted.
    let unpadded = format!("  {}\n", text.trim_end_matches('='));
    assert_eq!(
        interop::sglang::decode(unpadded.as_bytes(), &shape_opts(2, 2)).unwrap(),
        d
    );
}

#[test]
fn malformed_sglang_is_a_typed_error_with_its_offset() {
    let err = interop::sglang::decode(b"AAAA*AAA", &shape_opts(1, 1)).unwrap_err();
    assert!(matches!(err, InteropError::Malformed { offset: 4, .. }), "{err}");
    // 6 bytes: not whole int32 values.
    let err = interop::sglang::decode(b64(&[0; 6]).as_bytes(), &shape_opts(1, 1)).unwrap_err();
    assert!(matches!(err, InteropError::Malformed { offset: 4, .. }), "{err}");
    // 3 ids for L × K = 2.
    let err = interop::sglang::decode(b64(&[0; 12]).as_bytes(), &shape_opts(1, 2)).unwrap_err();
    assert!(matches!(err, InteropError::Shape { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// NeMo Gym.

#[test]
fn nrlre1_envelopes_of_each_dtype_import_and_export_the_narrowest_dtype() {
    let vals: Vec<i64> = vec![0, 1, 2, 3, -1, -1, 5, 4];
    for (name, d) in [
        ("int8", IntDtype::I8),
        ("int16", IntDtype::I16),
        ("int32", IntDtype::I32),
    ] {
        let env = format!("nrlre1:{name}:2x2x2:{}", b64(&le_bytes(&vals, d)));
        let t = interop::import(Format::Nrlre1, env.as_bytes(), &opts().with_num_experts(8)).unwrap();
        assert_eq!(t.row(SeqId(0), LayerId(1), 0), Some(vec![2, 3]));
        assert_eq!(t.row(SeqId(0), LayerId(0), 1), None);
        let out = String::from_utf8(export(Format::Nrlre1, &t)).unwrap();
        assert_eq!(
            out,
            format!("nrlre1:int8:2x2x2:{}", b64(&le_bytes(&vals, IntDtype::I8)))
        );
    }
    // E > 128 needs int16; a forced int8 export refuses (never wraps) ids ≥ 128.
    let ids = block(3, 2, 4, 400);
    let t = trace_of(&ids, 400, &[0, 1]);
    let out = String::from_utf8(export(Format::Nrlre1, &t)).unwrap();
    assert!(out.starts_with("nrlre1:int16:3x2x4:"), "{out}");
    assert_eq!(
        dense0(&interop::import(Format::Nrlre1, out.as_bytes(), &opts()).unwrap()),
        ids
    );
    let err = interop::export(
        Format::Nrlre1,
        &t,
        &ExportOptions {
            dtype: Some(IntDtype::I8),
            ..ExportOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, InteropError::DoesNotFit { .. }), "{err}");
}

#[test]
fn malformed_nrlre1_is_a_typed_error_with_its_offset() {
    let p = b64(&[0, 1, 2, 3]);
    let cases: Vec<(String, &str)> = vec![
        (format!("nrlre2:int8:1x2x2:{p}"), "offset 0"),
        ("nrlre1:int8:1x2x2".to_string(), "field"),
        (format!("nrlre1:int8:1x2:{p}"), "K"),
        (format!("nrlre1:int8:1xQx2:{p}"), "offset 14"),
        (format!("nrlre1:int8:1x2x3:{p}"), "bytes"),
        (format!("nrlre1:int8:1x2x2:{}", &p[..1]), "base64"),
        (format!("nrlre1:int8:1x2x2:{}", &p[..3]), "needs 4 bytes"),
    ];
    for (env, needle) in cases {
        let err = interop::import(Format::Nrlre1, env.as_bytes(), &opts()).unwrap_err();
        assert!(err.to_string().contains(needle), "{env}: {err}");
    }
    let err = interop::import(Format::Nrlre1, format!("nrlre1:uint8:1x2x2:{p}").as_bytes(), &opts()).unwrap_err();
    assert!(matches!(err, InteropError::Dtype { .. }), "{err}");
    let err = interop::import(Format::Nrlre1, b"nrlre1:int8:99999999x99999x999:AAAA", &opts()).unwrap_err();
    assert!(matches!(err, InteropError::TooLarge { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Fireworks R3/v1.

#[test]
fn r3v1_bitmap_suffix_and_all_modes_read_as_published() {
    // 5 tokens, L = 2, K = 2, u8. Bitmap selects tokens 0, 2, 3 (0b01101).
    let m = |t: u8| [t, t + 1, t + 2, t + 3];
    let mats: Vec<u8> = [m(10), m(20), m(30)].concat();
    let text = r3_text(&r3_header(2, 1, 5, 3, 0, 1, 12), &[0b0000_1101], &mats);
    let t = interop::import(
        Format::R3v1,
        text.as_bytes(),
        &opts().with_shape(2, 2).with_num_experts(64),
    )
    .unwrap();
    let d = dense0(&t);
    assert_eq!(d.dim(), (5, 2, 2));
    assert_eq!(d.slice(ndarray::s![0, .., ..]), array![[10, 11], [12, 13]]);
    assert!(
        d.slice(ndarray::s![1, .., ..]).iter().all(|&x| x == M),
        "unselected token is missing"
    );
    assert_eq!(d.slice(ndarray::s![3, .., ..]), array![[30, 31], [32, 33]]);
    assert!(d.slice(ndarray::s![4, .., ..]).iter().all(|&x| x == M));
    // Only K given: L follows from the matrix size.
    let t2 = interop::import(
        Format::R3v1,
        text.as_bytes(),
        &opts().with_num_experts(64).with_layers(vec![0, 1]),
    )
    .map(|_| ());
    assert!(
        matches!(t2, Err(InteropError::MissingOption { .. })),
        "neither L nor K: {t2:?}"
    );
    let o = ImportOptions {
        top_k: Some(2),
        ..opts()
    };
    assert_eq!(interop::r3v1::decode(text.as_bytes(), &o).unwrap().dim(), (5, 2, 2));
    // Suffix: tokens 3.. of 5, u16.
    let mats16: Vec<u8> = [700u16, 1, 2, 3, 4, 5, 6, 7]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let text = r3_text(&r3_header(1, 2, 5, 2, 3, 0, 16), &[], &mats16);
    let t = interop::import(
        Format::R3v1,
        text.as_bytes(),
        &opts().with_shape(2, 2).with_num_experts(1000),
    )
    .unwrap();
    assert_eq!(t.row(SeqId(0), LayerId(0), 3), Some(vec![700, 1]));
    assert_eq!(t.row(SeqId(0), LayerId(1), 4), Some(vec![6, 7]));
    assert_eq!(t.row(SeqId(0), LayerId(0), 2), None);
    // All: every token.
    let text = r3_text(&r3_header(0, 1, 1, 1, 0, 0, 4), &[], &[1, 2, 3, 4]);
    let t = interop::import(Format::R3v1, text.as_bytes(), &opts().with_shape(2, 2)).unwrap();
    assert_eq!(t.row(SeqId(0), LayerId(1), 0), Some(vec![3, 4]));
}

#[test]
fn r3v1_export_picks_the_selector_mode_and_dtype_and_round_trips() {
    // All tokens present → mode 0; a present suffix → mode 1; gaps → bitmap.
    for (missing, mode) in [(vec![], 0u8), (vec![0usize, 1], 1), (vec![1, 3], 2)] {
        let mut ids = block(5, 2, 3, 300);
        for &t in &missing {
            ids.slice_mut(ndarray::s![t, .., ..]).fill(M);
        }
        let t = trace_of(&ids, 300, &[0, 1]);
        let text = export(Format::R3v1, &t);
        let back = interop::import(Format::R3v1, &text, &opts().with_shape(2, 3).with_num_experts(300)).unwrap();
        let mut got = back.to_dense(SeqId(0));
        if got.dim().0 < 5 {
            panic!("lost tokens: {:?}", got.dim());
        }
        got = got.slice(ndarray::s![..5, .., ..]).to_owned();
        assert_eq!(got, ids, "mode {mode}");
        // The header says which mode and dtype (u16 for E = 300).
        let frame = {
            let d = interop::r3v1::decode(&text, &opts().with_shape(2, 3)).unwrap();
            d.start
        };
        assert_eq!(frame, if mode == 1 { 2 } else { 0 });
    }
    // A token with routes in some layers only cannot be expressed.
    let mut ids = block(2, 2, 2, 8);
    ids.slice_mut(ndarray::s![1, 0, ..]).fill(M);
    let err = interop::export(Format::R3v1, &trace_of(&ids, 8, &[0, 1]), &ExportOptions::default()).unwrap_err();
    assert!(matches!(err, InteropError::Unrepresentable { .. }), "{err}");
}

#[test]
fn malformed_r3v1_is_a_typed_error_with_its_offset() {
    let o = opts().with_shape(1, 2);
    let ok_h = r3_header(0, 1, 2, 2, 0, 0, 4);
    let cases: Vec<(String, u64)> = vec![
        (
            r3_text(&[b"R3V2".as_slice(), &ok_h[4..]].concat(), &[], &[0, 1, 2, 3]),
            0,
        ),
        (
            r3_text(&[&ok_h[..4], &[2u8], &ok_h[5..]].concat(), &[], &[0, 1, 2, 3]),
            4,
        ),
        (r3_text(&r3_header(3, 1, 2, 2, 0, 0, 4), &[], &[0, 1, 2, 3]), 5),
        (r3_text(&r3_header(0, 3, 2, 2, 0, 0, 4), &[], &[0, 1, 2, 3]), 6),
        (r3_text(&r3_header(0, 1, 2, 2, 0, 0, 5), &[], &[0, 1, 2, 3, 4]), 24),
        (r3_text(&r3_header(2, 1, 9, 1, 0, 1, 2), &[1], &[0, 1]), 20),
        (r3_text(&r3_header(2, 1, 4, 2, 0, 1, 4), &[0b1], &[0, 1, 2, 3]), 32),
        (r3_text(&ok_h, &[], &[0, 1, 2, 3, 9]), 36),
    ];
    for (i, (text, offset)) in cases.iter().enumerate() {
        let err = interop::r3v1::decode(text.as_bytes(), &o).unwrap_err();
        assert!(
            matches!(err, InteropError::Malformed { offset: at, .. } if at == *offset),
            "case {i}: {err}"
        );
    }
    // Truncated content.
    let err = interop::r3v1::decode(r3_text(&ok_h, &[], &[0, 1]).as_bytes(), &o).unwrap_err();
    assert!(matches!(err, InteropError::Truncated { offset: 34, .. }), "{err}");
    // Not zstd.
    let err = interop::r3v1::decode(b64(b"not a zstd frame at all").as_bytes(), &o).unwrap_err();
    assert!(matches!(err, InteropError::Malformed { .. }), "{err}");
    // A frame claiming a huge matrix is bounded before reading it.
    let err = interop::r3v1::decode(
        r3_text(
            &r3_header(0, 1, u32::MAX, u32::MAX, 0, 0, 2 * u64::from(u32::MAX)),
            &[],
            &[],
        )
        .as_bytes(),
        &o,
    )
    .unwrap_err();
    assert!(matches!(err, InteropError::TooLarge { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// prime-rl.

#[test]
fn prime_rl_msgpack_maps_import_with_their_start_and_export_u8_or_u16() {
    let data: Vec<u8> = vec![1, 2, 3, 4, 5, 6, 7, 0];
    let m = prime_rl_map(&data, [2, 2, 2], "uint8", 10);
    let t = interop::import(Format::PrimeRl, &m, &opts().with_num_experts(8)).unwrap();
    assert_eq!(t.row(SeqId(0), LayerId(0), 10), Some(vec![1, 2]));
    assert_eq!(t.row(SeqId(0), LayerId(1), 11), Some(vec![7, 0]));
    assert_eq!(t.row(SeqId(0), LayerId(0), 9), None, "before start: missing");
    let back = interop::import(Format::PrimeRl, &export(Format::PrimeRl, &t), &opts()).unwrap();
    assert_eq!(back.row(SeqId(0), LayerId(1), 11), Some(vec![7, 0]));
    assert_eq!(back.lanes().next().unwrap().runs[0].start, 10);
    // uint16 for E > 256.
    let ids = block(4, 3, 22, 512);
    let t = trace_of(&ids, 512, &[0, 1, 2]);
    let out = export(Format::PrimeRl, &t);
    assert!(out.windows(7).any(|w| w == b"\xa6uint16"), "uint16 dtype");
    assert_eq!(dense0(&interop::import(Format::PrimeRl, &out, &opts()).unwrap()), ids);
    // A hole between recorded rows cannot be expressed.
    let mut holed = block(3, 1, 2, 8);
    holed.slice_mut(ndarray::s![1, .., ..]).fill(M);
    let err = interop::export(Format::PrimeRl, &trace_of(&holed, 8, &[0]), &ExportOptions::default()).unwrap_err();
    assert!(matches!(err, InteropError::Unrepresentable { .. }), "{err}");
}

#[test]
fn malformed_prime_rl_is_a_typed_error_with_its_offset() {
    let good = prime_rl_map(&[1, 2, 3, 4], [1, 2, 2], "uint8", 0);
    let err = interop::import(Format::PrimeRl, &good[..good.len() - 1], &opts()).unwrap_err();
    assert!(matches!(err, InteropError::Malformed { .. }), "{err}");
    let err = interop::import(Format::PrimeRl, &[good.clone(), vec![0xc0]].concat(), &opts()).unwrap_err();
    assert!(
        matches!(err, InteropError::Malformed { offset, .. } if offset == good.len() as u64),
        "{err}"
    );
    let err = interop::import(
        Format::PrimeRl,
        &prime_rl_map(&[1, 2, 3, 4], [1, 2, 2], "int8", 0),
        &opts(),
    )
    .unwrap_err();
    assert!(matches!(err, InteropError::Dtype { .. }), "{err}");
    let err = interop::import(
        Format::PrimeRl,
        &prime_rl_map(&[1, 2, 3], [1, 2, 2], "uint8", 0),
        &opts(),
    )
    .unwrap_err();
    assert!(matches!(err, InteropError::Shape { .. }), "{err}");
    let err = interop::import(
        Format::PrimeRl,
        &prime_rl_map(&[1, 1, 3, 4], [1, 2, 2], "uint8", 5),
        &opts(),
    )
    .unwrap_err();
    assert!(
        matches!(err, InteropError::DuplicateId { at, id: 1, .. } if at == element(1, 5, 0, 1)),
        "{err}"
    );
    let err = interop::import(Format::PrimeRl, b"\x92\x01\x02", &opts()).unwrap_err();
    assert!(matches!(err, InteropError::Malformed { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Across formats.

#[test]
fn more_than_256_experts_round_trip_through_every_format() {
    let mut ids = block(9, 4, 8, 384);
    ids[[0, 0, 0]] = 383;
    ids[[0, 0, 1]] = 256;
    let t = trace_of(&ids, 384, &[0, 1, 2, 3]);
    for f in [
        Format::Npy,
        Format::Safetensors,
        Format::Sglang,
        Format::Nrlre1,
        Format::R3v1,
        Format::PrimeRl,
    ] {
        let back = interop::import(f, &export(f, &t), &shape_opts(4, 8).with_num_experts(384)).unwrap();
        assert_eq!(dense0(&back), ids, "{f}");
        assert_eq!(back.header().num_experts(), 384, "{f}");
    }
}

#[test]
fn a_trace_of_several_sequences_needs_a_chosen_sequence_for_one_sequence_formats() {
    let mut t = trace_of(&block(2, 1, 2, 8), 8, &[0]);
    t.append_dense(SeqId(7), 0, block(3, 1, 2, 8).view()).unwrap();
    let err = interop::export(Format::Npy, &t, &ExportOptions::default()).unwrap_err();
    assert!(
        matches!(err, InteropError::Unrepresentable { .. }) && err.to_string().contains("2 sequences"),
        "{err}"
    );
    let out = interop::export(
        Format::Npy,
        &t,
        &ExportOptions {
            seq: Some(SeqId(7)),
            ..ExportOptions::default()
        },
    )
    .unwrap();
    assert_eq!(npy::parse(&out).unwrap().shape, vec![3, 1, 2]);
}

#[test]
fn validation_counts_every_bad_row_and_a_lossy_import_keeps_the_good_ones() {
    let ids = array![[[0u32, 1], [2, 2]], [[9, 1], [M, 3]], [[4, 5], [6, 7]]];
    let d = DenseRoutes::new(ids);
    let c = d.check(Format::Npy, 8, 10);
    assert_eq!(
        (
            c.present_rows,
            c.out_of_range_rows,
            c.duplicate_rows,
            c.partial_missing_rows
        ),
        (3, 1, 1, 1)
    );
    assert_eq!(c.examples.len(), 3);
    let (t, c2) = d.to_trace_lossy(Format::Npy, &opts().with_num_experts(8), 10).unwrap();
    assert_eq!(c2, c);
    assert_eq!(t.summary().rows, 3);
    assert_eq!(t.row(SeqId(0), LayerId(1), 0), None, "the duplicate row became missing");
}

// ---------------------------------------------------------------------------------------------
// Property tests.

/// Random valid `[T, L, K]` blocks with some missing rows (`allow_missing`) or whole missing
/// tokens only (`whole_tokens`).
fn routes(max_e: usize, allow_missing: bool, whole_tokens: bool) -> impl Strategy<Value = (Array3<u32>, usize)> {
    (1usize..6, 1usize..5, 1usize..=max_e, 0usize..12, any::<u64>()).prop_map(move |(l, k, e_raw, t, seed)| {
        let e = e_raw.max(k);
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut a = Array3::from_elem((t, l, k), M);
        for ti in 0..t {
            let token_missing = (allow_missing || whole_tokens) && next() % 5 == 0;
            for li in 0..l {
                if token_missing || (allow_missing && !whole_tokens && next() % 7 == 0) {
                    continue;
                }
                let mut row: Vec<u32> = Vec::new();
                while row.len() < k {
                    let id = (next() % e as u64) as u32;
                    if !row.contains(&id) {
                        row.push(id);
                    }
                }
                for (j, id) in row.into_iter().enumerate() {
                    a[[ti, li, j]] = id;
                }
            }
        }
        (a, e)
    })
}

fn prop_round_trip(format: Format, ids: &Array3<u32>, e: usize) -> Result<(), TestCaseError> {
    let (_, l, k) = ids.dim();
    let layers: Vec<u32> = (0..l as u32).map(|x| x * 2 + 1).collect();
    let t = trace_of(ids, e, &layers);
    let out = interop::export(format, &t, &ExportOptions::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let imported = interop::import(format, &out, &shape_opts(l, k).with_num_experts(e).with_layers(layers));
    if t.summary().rows == 0 {
        // Nothing recorded: the export is an empty capture, which import refuses.
        prop_assert!(
            matches!(imported, Err(InteropError::Empty { .. })),
            "{format}: {imported:?}"
        );
        return Ok(());
    }
    let back = imported.map_err(|e| TestCaseError::fail(e.to_string()))?;
    // Positions past the last recorded row are missing either way.
    let a = t.to_dense(SeqId(0));
    let b = back.to_dense(SeqId(0));
    let n = a.dim().0.max(b.dim().0);
    let pad = |x: Array3<u32>| {
        let mut p = Array3::from_elem((n, l, k), M);
        p.slice_mut(ndarray::s![..x.dim().0, .., ..]).assign(&x);
        p
    };
    prop_assert_eq!(pad(a), pad(b), "{}", format);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn npy_safetensors_sglang_nrlre1_round_trip((ids, e) in routes(1000, true, false)) {
        for f in [Format::Npy, Format::Safetensors, Format::Sglang, Format::Nrlre1] {
            prop_round_trip(f, &ids, e)?;
        }
    }

    #[test]
    fn r3v1_round_trips_whole_token_routes((ids, e) in routes(65_535, false, true)) {
        prop_round_trip(Format::R3v1, &ids, e)?;
    }

    #[test]
    fn prime_rl_round_trips_contiguous_routes((ids, e) in routes(600, false, false)) {
        prop_round_trip(Format::PrimeRl, &ids, e)?;
    }

    #[test]
    fn importers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let o = shape_opts(2, 2).with_max_elements(1 << 16);
        for f in Format::ALL {
            let _ = interop::decode(f, &bytes, &o);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzzing regressions (see fuzz/README.md).

/// An `.npy` header whose descr starts with a multi-byte UTF-8 character.
fn npy_with_non_ascii_descr() -> Vec<u8> {
    let mut h = "{'descr': 'ʖ2', 'fortran_order': False, 'shape': (1, 1, 1), }"
        .as_bytes()
        .to_vec();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(&h);
    b.extend_from_slice(&[0, 0, 0, 0]);
    b
}

#[test]
fn fuzz_regression_npy_non_ascii_header_is_a_typed_error() {
    let err = interop::import(Format::Npy, &npy_with_non_ascii_descr(), &opts()).unwrap_err();
    assert!(
        matches!(err, InteropError::Npy(NpyError::Header { offset: 21, .. })),
        "{err}"
    );
}

/// Reproducer for a panic in `moe_router::npy::parse` (core/src/npy.rs, not interop code):
/// `parse_descr` splits the descr at byte 1, which panics when the first character is multi-byte.
/// The interop importer guards against it; the fix belongs in `npy.rs`.
#[test]
fn npy_parse_does_not_panic_on_a_non_ascii_descr() {
    let b = npy_with_non_ascii_descr();
    let r = std::panic::catch_unwind(|| npy::parse(&b).map(|_| ()));
    assert!(matches!(r, Ok(Err(_))), "npy::parse panicked");
}

#[test]
fn fuzz_regression_an_empty_array_with_a_huge_dimension_is_refused_before_allocating() {
    let b = npy::to_bytes(&[0, 4, 5_555_555_555_555], NpyDtype::I32, &[]);
    let err = interop::import(Format::Npy, &b, &opts()).unwrap_err();
    assert!(matches!(err, InteropError::Shape { .. }), "{err}");
    let b = npy::to_bytes(&[0, 1 << 40, 2], NpyDtype::I32, &[]);
    assert!(matches!(
        interop::import(Format::Npy, &b, &opts()),
        Err(InteropError::Shape { .. })
    ));
}

#[test]
fn fuzz_regression_r3v1_suffix_far_from_token_0_exports_without_a_token_bitmap() {
    // 2 replayed tokens at the end of 4 billion: the export stays a suffix (no 4 GB bitmap).
    let text = r3_text(
        &r3_header(1, 1, u32::MAX, 2, u32::MAX - 2, 0, 8),
        &[],
        &[0, 1, 2, 3, 4, 5, 6, 7],
    );
    let t = interop::import(Format::R3v1, text.as_bytes(), &shape_opts(2, 2)).unwrap();
    let out = export(Format::R3v1, &t);
    let d = interop::r3v1::decode(&out, &shape_opts(2, 2)).unwrap();
    assert_eq!((d.start, d.dim()), (u64::from(u32::MAX) - 2, (2, 2, 2)));
}

/// CRC32C (Castagnoli), bitwise.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    !c
}

/// Reproducer of a `trace_reader` fuzz finding in the `.mrt` reader (core/src/trace/format.rs,
/// not interop code): `parse_blocks` reserves `Vec::with_capacity(expected)` from the chunk
/// header's block count, so a chunk whose header claims ~10⁹ blocks (with a matching CRC32C)
/// makes `TraceFile::from_bytes` / `open` allocate ~32 GB and abort the process. Ignored because it
/// aborts the test binary until the reader caps the reservation (e.g. by `raw.len() / 4`, the
/// smallest block).
#[test]
fn trace_reader_does_not_allocate_by_a_claimed_block_count() {
    let mut t = Trace::new(TraceHeader::new(8, 2, &[0]).unwrap());
    t.append(SeqId(0), LayerId(0), 0, array![[0u32, 1], [2, 3]].view())
        .unwrap();
    let dir = std::env::temp_dir().join(format!("moe-router-spec-blocks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("t.mrt");
    t.write_file(&p, moe_router::trace::WriterOptions::default()).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let o = b.windows(4).position(|w| w == b"MRTC").unwrap();
    b[o + 12..o + 16].copy_from_slice(&0x3b00_0001u32.to_le_bytes());
    let stored = u32::from_le_bytes(b[o + 20..o + 24].try_into().unwrap()) as usize;
    let end = o + 24 + stored;
    let c = crc32c(&b[o..end]);
    b[end..end + 4].copy_from_slice(&c.to_le_bytes());
    let r = moe_router::trace::TraceFile::from_bytes(b, moe_router::trace::OpenOptions::default());
    assert!(
        r.is_err(),
        "a chunk whose block count disagrees with its payload is an error"
    );
}

// ---------------------------------------------------------------------------------------------
// Empty captures, sequence choice, layers of one input only, float tensors.

#[test]
fn an_empty_capture_is_refused_by_every_importer() {
    let empty_npy = npy::to_bytes(&[0, 2, 2], NpyDtype::I32, &[]);
    let all_missing = npy::to_bytes(&[2, 2, 2], NpyDtype::I32, &npy::i32_bytes(&[-1; 8]));
    let empty_st = {
        let t = trace_of(&block(2, 2, 2, 8), 8, &[0, 1]);
        let d = DenseRoutes::from_trace(Format::Safetensors, &t, None, 1 << 20).unwrap();
        let none = DenseRoutes {
            ids: Array3::from_elem((0, 2, 2), M),
            ..d
        };
        interop::safetensors::encode(&none, IntDtype::I32).unwrap()
    };
    let cases: Vec<(Format, Vec<u8>)> = vec![
        (Format::Npy, empty_npy),
        (Format::Npy, all_missing),
        (Format::Safetensors, empty_st),
        (Format::Sglang, Vec::new()),
        (Format::Sglang, b"\n".to_vec()),
        (Format::Nrlre1, b"nrlre1:int32:0x2x2:".to_vec()),
        (
            Format::Nrlre1,
            format!("nrlre1:int8:2x1x2:{}", b64(&[0xff; 4])).into_bytes(),
        ),
    ];
    for (format, bytes) in cases {
        let err = interop::import(format, &bytes, &shape_opts(2, 2)).unwrap_err();
        assert!(matches!(err, InteropError::Empty { .. }), "{format}: {err}");
        assert!(err.to_string().contains("captured nothing"), "{err}");
        // The decoder alone still gives the (empty) array, for reports.
        let d = interop::decode(format, &bytes, &shape_opts(2, 2)).unwrap();
        let (t, check) = d.to_trace_lossy(format, &shape_opts(2, 2), 4).unwrap();
        assert_eq!((check.present_rows, t.summary().rows), (0, 0), "{format}");
    }
}

#[test]
fn exporting_one_of_several_sequences_needs_the_sequence_named() {
    let mut t = Trace::new(TraceHeader::new(8, 2, &[0, 1]).unwrap());
    t.append_dense(SeqId(3), 0, block(2, 2, 2, 8).view()).unwrap();
    t.append_dense(SeqId(5), 0, block(3, 2, 2, 8).view()).unwrap();
    let err = interop::export(Format::Npy, &t, &ExportOptions::default()).unwrap_err();
    assert!(
        matches!(err, InteropError::Unrepresentable { .. }) && err.to_string().contains("--seq"),
        "{err}"
    );
    let out = interop::export(
        Format::Npy,
        &t,
        &ExportOptions {
            seq: Some(SeqId(5)),
            ..ExportOptions::default()
        },
    )
    .unwrap();
    assert_eq!(npy::parse(&out).unwrap().shape, vec![3, 2, 2]);
}

#[test]
fn compare_lists_layers_of_one_layer_map_only_with_their_rows() {
    // An array imported with the default layers 0..L against the trace it came from (1..=L).
    let a = block(4, 3, 2, 8);
    let trace = trace_of(&a, 8, &[1, 2, 3]);
    let bytes = export(Format::Npy, &trace);
    let imported = interop::import(Format::Npy, &bytes, &opts().with_num_experts(8)).unwrap();
    let c = moe_router::metrics::compare(&imported, &trace).unwrap();
    let rows = |v: &[moe_router::metrics::LayerRows]| v.iter().map(|l| (l.layer, l.rows)).collect::<Vec<_>>();
    assert_eq!(rows(&c.layers_only_in_a), vec![(0, 4)]);
    assert_eq!(rows(&c.layers_only_in_b), vec![(3, 4)]);
    // With the right layer ids nothing is left over, and nothing differs.
    let right = interop::import(
        Format::Npy,
        &bytes,
        &opts().with_num_experts(8).with_layers(vec![1, 2, 3]),
    )
    .unwrap();
    let c = moe_router::metrics::compare(&right, &trace).unwrap();
    assert!(c.layers_only_in_a.is_empty() && c.layers_only_in_b.is_empty());
    assert_eq!((c.router_mismatch_fraction, c.routers_compared), (0.0, 12));
}

#[test]
fn npy_reads_v2_as_bfloat16_and_writes_it_back() {
    let vals = [1.0f32, -2.5, 0.15625, f32::NEG_INFINITY];
    let bits: Vec<u8> = vals
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    let b = npy::to_bytes(&[2, 2], NpyDtype::Bf16, &bits);
    assert!(String::from_utf8_lossy(&b).contains("'descr': '|V2'"));
    let arr = npy::parse(&b).unwrap();
    assert_eq!((arr.dtype, arr.shape.clone()), (NpyDtype::Bf16, vec![2, 2]));
    assert_eq!(arr.to_f32("x").unwrap(), vals.to_vec(), "widened exactly");
    // `<V2` (as some writers spell the void type) is the same type.
    let at = b.windows(4).position(|w| w == b"'|V2").unwrap();
    let mut lt = b.clone();
    lt[at + 1] = b'<';
    assert_eq!(npy::parse(&lt).unwrap().dtype, NpyDtype::Bf16);
    // Not an id dtype.
    let ids = npy::to_bytes(&[1, 1, 2], NpyDtype::Bf16, &bits[..4]);
    assert!(matches!(
        interop::import(Format::Npy, &ids, &opts()),
        Err(InteropError::Dtype { .. })
    ));
}

#[test]
fn safetensors_float_tensors_are_read_by_name_or_as_the_only_tensor() {
    let mut header = r#"{"logits":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]},"w":{"dtype":"F64","shape":[1],"data_offsets":[4,12]}}"#.to_string();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&half::bf16::from_f32(1.5).to_bits().to_le_bytes());
    b.extend_from_slice(&half::bf16::from_f32(-3.0).to_bits().to_le_bytes());
    b.extend_from_slice(&0.25f64.to_le_bytes());
    let l = interop::safetensors::read_tensor(&b, Some("logits")).unwrap();
    assert_eq!((l.dtype, l.shape.clone()), (NpyDtype::Bf16, vec![1, 2]));
    assert_eq!(l.to_f32("logits").unwrap(), vec![1.5, -3.0]);
    let w = interop::safetensors::read_tensor(&b, Some("w")).unwrap();
    assert_eq!(w.to_f64("w").unwrap(), vec![0.25]);
    // Two tensors and no name, or a wrong name: an error listing them.
    for name in [None, Some("nope")] {
        let err = interop::safetensors::read_tensor(&b, name).unwrap_err().to_string();
        assert!(err.contains("logits") && err.contains("\"w\""), "{err}");
    }
}
