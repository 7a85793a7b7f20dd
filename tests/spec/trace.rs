//! Trace model and `.mrt` files: append rules, id widths, round trips, chunk limits, recovery
//! from truncation, bit-flip detection, concurrent recording, shards, size.

use moe_router::metrics::{compare, load_stats};
use moe_router::trace::synthetic::SyntheticRoutes;
use moe_router::trace::{
    Compression, IdWidth, IndexState, MISSING_ID, Manifest, ManifestShard, OpenOptions, RouteSource, RowConvention,
    Trace, TraceError, TraceFile, TraceHeader, TraceWriter, Verify, WriterOptions,
};
use moe_router::{LayerId, RouterConfig, SeqId};
use ndarray::{Array2, array};
use proptest::prelude::*;

pub(crate) struct TempDir(pub std::path::PathBuf);
impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("moe-router-spec-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub(crate) fn file(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn header(e: usize, k: usize, layers: &[u32]) -> TraceHeader {
    TraceHeader::new(e, k, layers).unwrap()
}

/// A small synthetic trace (reference-routed correlated logits).
pub(crate) fn synthetic(e: usize, k: usize, layers: &[u32], seqs: u64, tokens: usize) -> Trace {
    let cfg = RouterConfig::builder(e, k).build().unwrap();
    SyntheticRoutes::new(cfg, layers.to_vec(), seqs, tokens)
        .generate()
        .unwrap()
}

fn small_chunks() -> WriterOptions {
    WriterOptions::default().with_chunk_id_bytes(256)
}

#[test]
fn appending_the_same_rows_again_is_a_no_op_and_different_rows_conflict() {
    let mut t = Trace::new(header(8, 2, &[0]));
    let a = array![[1u32, 2], [3, 4], [5, 6]];
    let st = t.append(SeqId(1), LayerId(0), 0, a.view()).unwrap();
    assert_eq!(st.appended, 3);
    // A resumed rollout resends its prefix plus one new row: old rows are not duplicated.
    let b = array![[3u32, 4], [5, 6], [7, 0]];
    let st = t.append(SeqId(1), LayerId(0), 1, b.view()).unwrap();
    assert_eq!((st.appended, st.identical), (1, 2));
    assert_eq!(t.summary().rows, 4);
    // Different ids at a recorded position: typed conflict, nothing changes.
    let before = t.clone();
    let err = t.append(SeqId(1), LayerId(0), 2, array![[6u32, 5]].view()).unwrap_err();
    assert_eq!(
        err,
        TraceError::Conflict {
            seq: 1,
            layer: 0,
            position: 2
        }
    );
    assert_eq!(t, before);
    // The keep-existing variant keeps the first recording and counts the conflict.
    let st = t
        .append_keep_existing(SeqId(1), LayerId(0), 2, array![[6u32, 5]].view())
        .unwrap();
    assert_eq!(st.conflicts, 1);
    assert_eq!(t.row(SeqId(1), LayerId(0), 2), Some(vec![5, 6]));
}

#[test]
fn missing_rows_are_filled_later_but_never_overwrite_recorded_rows() {
    let mut t = Trace::new(header(8, 2, &[4]).with_row_convention(RowConvention::TokensMinusOne));
    let m = MISSING_ID;
    t.append(SeqId(0), LayerId(4), 0, array![[1u32, 2], [m, m]].view())
        .unwrap();
    assert_eq!(t.row(SeqId(0), LayerId(4), 1), None);
    // The next turn routes the position that was missing: it fills it.
    let st = t.append(SeqId(0), LayerId(4), 1, array![[3u32, 4]].view()).unwrap();
    assert_eq!(st.filled, 1);
    // A missing row never erases a recorded one.
    let st = t.append(SeqId(0), LayerId(4), 0, array![[m, m]].view()).unwrap();
    assert_eq!(st.identical, 1);
    assert_eq!(t.row(SeqId(0), LayerId(4), 0), Some(vec![1, 2]));
}

#[test]
fn appends_validate_range_duplicates_partial_rows_and_layers() {
    let mut t = Trace::new(header(8, 2, &[1, 3]));
    let e = t.append(SeqId(0), LayerId(1), 5, array![[1u32, 8]].view()).unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::IdOutOfRange {
                seq: 0,
                layer: 1,
                position: 5,
                slot: 1,
                id: 8,
                ..
            }
        ),
        "{e}"
    );
    let e = t.append(SeqId(0), LayerId(1), 0, array![[0u32, 0]].view()).unwrap_err();
    assert!(matches!(e, TraceError::DuplicateId { id: 0, .. }), "{e}");
    assert!(e.to_string().contains("zero padding"), "{e}");
    let e = t
        .append(SeqId(0), LayerId(1), 0, array![[1u32, MISSING_ID]].view())
        .unwrap_err();
    assert!(matches!(e, TraceError::PartialMissing { .. }), "{e}");
    let e = t.append(SeqId(0), LayerId(2), 0, array![[1u32, 2]].view()).unwrap_err();
    assert!(matches!(e, TraceError::UnknownLayer { layer: 2, .. }), "{e}");
    let e = t
        .append(SeqId(0), LayerId(1), 0, array![[1u32, 2, 3]].view())
        .unwrap_err();
    assert!(matches!(e, TraceError::Shape { top_k: 2, got: 3 }), "{e}");
    assert!(t.is_empty());
}

#[test]
fn id_width_is_one_byte_up_to_256_experts_and_two_bytes_above() {
    assert_eq!(header(128, 8, &[0]).id_width(), IdWidth::U8);
    assert_eq!(header(256, 8, &[0]).id_width(), IdWidth::U8); // DeepSeek-V3: still 1 byte/id
    assert_eq!(header(255, 1, &[0]).id_width(), IdWidth::U8);
    assert_eq!(header(256, 1, &[0]).id_width(), IdWidth::U16); // 0xFF alone would be ambiguous
    assert_eq!(header(384, 8, &[0]).id_width(), IdWidth::U16);
    assert!(TraceHeader::new(65_536, 8, &[0]).is_err());
    assert!(TraceHeader::new(8, 9, &[0]).is_err());
    assert!(TraceHeader::new(8, 2, &[3, 1]).is_err(), "layer ids must be ascending");
}

#[test]
fn more_than_256_experts_round_trip_in_memory_and_through_files() {
    let d = TempDir::new("u16");
    let mut t = Trace::new(header(384, 8, &[0, 2]));
    let ids = Array2::from_shape_fn((40, 8), |(r, j)| ((r * 37 + j * 47) % 384) as u32);
    t.append(SeqId(9), LayerId(2), 100, ids.view()).unwrap();
    t.append(
        SeqId(9),
        LayerId(0),
        0,
        array![[383u32, 382, 381, 380, 379, 378, 377, 376]].view(),
    )
    .unwrap();
    for opts in [WriterOptions::default(), WriterOptions::zstd(3), small_chunks()] {
        let p = d.file("u16.mrt");
        t.write_file(&p, opts).unwrap();
        let f = TraceFile::open(&p).unwrap();
        assert_eq!(f.header().id_width(), IdWidth::U16);
        assert_eq!(f.to_trace().unwrap(), t);
    }
    assert_eq!(t.row(SeqId(9), LayerId(0), 0).unwrap()[0], 383);
}

#[test]
fn to_dense_and_append_dense_round_trip_with_missing_rows() {
    let t = synthetic(16, 2, &[1, 5, 7], 1, 10);
    let dense = t.to_dense(SeqId(0));
    assert_eq!(dense.dim(), (10, 3, 2));
    let mut back = Trace::new(t.header().clone());
    back.append_dense(SeqId(0), 0, dense.view()).unwrap();
    assert_eq!(back, t);
}

fn trace_strategy() -> impl Strategy<Value = Trace> {
    // Random lanes of random ids (distinct per row), with holes and missing rows.
    (
        2usize..=4,
        prop::collection::vec(
            (0u64..4, 0usize..3, 0u64..40, 1usize..30, any::<u64>(), any::<bool>()),
            1..12,
        ),
    )
        .prop_map(|(k, runs)| {
            let mut t = Trace::new(header(300.min(16 * k), k, &[2, 5, 9]));
            let e = t.header().num_experts() as u64;
            for (seq, li, start, len, seed, with_missing) in runs {
                let ids = Array2::from_shape_fn((len, k), |(r, j)| {
                    if with_missing && r % 7 == 3 {
                        MISSING_ID
                    } else {
                        ((seed.wrapping_add(r as u64 * 31) % (e - k as u64)) + j as u64) as u32
                    }
                });
                let layer = t.header().layers()[li];
                t.append_keep_existing(SeqId(seq), layer, start, ids.view()).unwrap();
            }
            t
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn file_round_trip_reproduces_the_trace_for_every_codec_and_chunk_size(
        t in trace_strategy(),
        chunk in prop::sample::select(vec![4usize, 64, 1000, 1 << 20]),
        compression in prop::sample::select(vec![Compression::None, Compression::Zstd(1), Compression::ZstdRanked(3)]),
        lazy in any::<bool>(),
    ) {
        let d = TempDir::new("prop");
        let p = d.file("t.mrt");
        t.write_file(&p, WriterOptions { compression, ..WriterOptions::default() }.with_chunk_id_bytes(chunk)).unwrap();
        let opts = OpenOptions { verify: if lazy { Verify::Lazy } else { Verify::Eager }, salvage: false };
        let f = TraceFile::open_with(&p, opts).unwrap();
        prop_assert!(f.report().is_clean());
        prop_assert_eq!(f.to_trace().unwrap(), t.clone());
        // Random access agrees with the in-memory model.
        for lane in t.lanes() {
            let end = lane.runs.last().map(|r| r.start + r.rows as u64).unwrap_or(0) + 2;
            let mut a = Array2::zeros((end as usize, t.header().top_k()));
            let mut b = a.clone();
            t.read_rows(lane.seq, lane.layer, 0, a.view_mut()).unwrap();
            f.read_rows(lane.seq, lane.layer, 0, b.view_mut()).unwrap();
            prop_assert_eq!(a, b);
        }
    }
}

#[test]
fn chunks_hold_at_most_one_mib_of_ids_by_default() {
    let d = TempDir::new("chunks");
    let t = synthetic(64, 8, &[0, 1, 2, 3], 4, 20_000); // 2.56 MB of ids
    let p = d.file("t.mrt");
    t.write_file(&p, WriterOptions::default()).unwrap();
    let f = TraceFile::open(&p).unwrap();
    let infos = f.chunk_infos();
    assert!(infos.len() >= 3, "{} chunks", infos.len());
    for c in &infos {
        // Payload = ids + a few bytes of block header per block.
        assert!(c.raw_bytes <= (1 << 20) + 64 * u64::from(c.blocks), "{c:?}");
    }
    assert_eq!(f.to_trace().unwrap(), t);
}

fn write_bytes(t: &Trace, opts: WriterOptions) -> Vec<u8> {
    let d = TempDir::new("bytes");
    let p = d.file("t.mrt");
    t.write_file(&p, opts).unwrap();
    std::fs::read(p).unwrap()
}

/// The rows of `t` stored in chunks `0..n` of a file written with `opts` (recomputed by
/// writing only the lanes that fit): here we compare against what the reader recovers, which
/// must be a subset of `t` holding every row of every complete chunk.
fn assert_subset(rec: &Trace, t: &Trace) {
    for lane in rec.lanes() {
        for r in lane.runs {
            for i in 0..r.rows {
                let p = r.start + i as u64;
                assert_eq!(rec.row(lane.seq, lane.layer, p), t.row(lane.seq, lane.layer, p));
            }
        }
    }
}

#[test]
fn truncation_at_every_byte_offset_of_the_last_chunks_recovers_every_complete_chunk() {
    let t = synthetic(32, 4, &[0, 3], 3, 40);
    let opts = WriterOptions::default().with_chunk_id_bytes(128);
    let bytes = write_bytes(&t, opts);
    let full = TraceFile::from_bytes(bytes.clone(), OpenOptions::default()).unwrap();
    let infos = full.chunk_infos();
    assert!(infos.len() >= 6);
    let last3 = infos[infos.len() - 3].offset as usize;
    for cut in last3..bytes.len() {
        let f = TraceFile::from_bytes(bytes[..cut].to_vec(), OpenOptions::default())
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let complete = infos
            .iter()
            .filter(|c| (c.offset + c.frame_bytes) as usize <= cut)
            .count();
        assert_eq!(f.report().chunks as usize, complete, "cut at {cut}");
        assert_ne!(f.report().index, IndexState::Present, "cut at {cut}");
        let end = infos[..complete]
            .last()
            .map_or(infos[0].offset, |c| c.offset + c.frame_bytes);
        assert_eq!(f.data_end(), end, "cut at {cut}");
        let rec = f.to_trace().unwrap();
        assert_subset(&rec, &t);
        // Exactly the rows of the complete chunks: the same as a clean cut at their end.
        let clean = TraceFile::from_bytes(bytes[..end as usize].to_vec(), OpenOptions::default()).unwrap();
        assert_eq!(rec, clean.to_trace().unwrap(), "cut at {cut}");
        assert_eq!(f.report().truncated(), cut as u64 != end, "cut at {cut}");
    }
    let all = infos.last().map(|c| (c.offset + c.frame_bytes) as usize).unwrap();
    assert_eq!(
        TraceFile::from_bytes(bytes[..all].to_vec(), OpenOptions::default())
            .unwrap()
            .to_trace()
            .unwrap(),
        t
    );
    // Before the first chunk: the header alone is an empty trace; inside the header: typed error.
    let first = infos[0].offset as usize;
    assert!(
        TraceFile::from_bytes(bytes[..first].to_vec(), OpenOptions::default())
            .unwrap()
            .to_trace()
            .unwrap()
            .is_empty()
    );
    for cut in 0..first {
        let e = TraceFile::from_bytes(bytes[..cut].to_vec(), OpenOptions::default()).unwrap_err();
        assert!(matches!(e, TraceError::Truncated { .. }), "cut at {cut}: {e}");
    }
}

#[test]
fn a_single_bit_flip_anywhere_is_detected_never_returned_as_data() {
    let t = synthetic(16, 2, &[0, 1], 2, 24);
    for opts in [
        WriterOptions::default().with_chunk_id_bytes(64),
        WriterOptions {
            compression: Compression::ZstdRanked(3),
            ..WriterOptions::default()
        },
    ] {
        let bytes = write_bytes(&t, opts);
        for lazy in [false, true] {
            let o = OpenOptions {
                verify: if lazy { Verify::Lazy } else { Verify::Eager },
                salvage: false,
            };
            for pos in 0..bytes.len() {
                for bit in [0u8, 3, 7] {
                    let mut b = bytes.clone();
                    b[pos] ^= 1 << bit;
                    let Ok(f) = TraceFile::from_bytes(b, o) else { continue };
                    // Opened: the flip must show in the report or in the first use of the data,
                    // and whatever is returned is the original data.
                    let data = f.verify_all().and_then(|_| f.to_trace());
                    match data {
                        Err(_) => {}
                        Ok(rec) => {
                            assert!(!f.report().is_clean(), "flip at byte {pos} bit {bit} went unnoticed");
                            assert_subset(&rec, &t);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn salvage_mode_skips_a_damaged_middle_chunk_and_reports_it() {
    let t = synthetic(16, 2, &[0], 1, 64);
    let mut b = write_bytes(&t, WriterOptions::default().with_chunk_id_bytes(32));
    let f = TraceFile::from_bytes(b.clone(), OpenOptions::default()).unwrap();
    let c = f.chunk_infos()[2].clone();
    b[(c.offset + 30) as usize] ^= 0x10;
    let n = b.len();
    b.truncate(n - 10); // and the footer is gone: forces a scan
    assert!(TraceFile::from_bytes(b.clone(), OpenOptions::default()).is_err());
    let f = TraceFile::from_bytes(
        b,
        OpenOptions {
            salvage: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(f.report().damaged.len(), 1);
    assert_eq!(f.report().damaged[0].offset, c.offset);
    assert_subset(&f.to_trace().unwrap(), &t);
}

#[test]
fn a_missing_or_damaged_index_is_rebuilt_by_scanning() {
    let t = synthetic(16, 2, &[0, 1], 2, 50);
    let b = write_bytes(&t, small_chunks());
    let f = TraceFile::from_bytes(b.clone(), OpenOptions::default()).unwrap();
    assert!(f.report().is_clean());
    // Damaged index entry.
    let mut d = b.clone();
    let n = d.len();
    d[n - 40] ^= 1;
    let f = TraceFile::from_bytes(d, OpenOptions::default()).unwrap();
    assert!(
        matches!(f.report().index, IndexState::Rebuilt { .. }),
        "{:?}",
        f.report()
    );
    assert_eq!(f.to_trace().unwrap(), t);
    // No footer at all.
    let f = TraceFile::from_bytes(b[..n - 24].to_vec(), OpenOptions::default()).unwrap();
    assert_ne!(f.report().index, IndexState::Present);
    assert_eq!(f.to_trace().unwrap(), t);
}

#[test]
fn header_damage_and_unknown_versions_are_typed_errors() {
    let t = synthetic(16, 2, &[0], 1, 4);
    let b = write_bytes(&t, WriterOptions::default());
    let mut x = b.clone();
    x[0] = b'X';
    assert!(matches!(
        TraceFile::from_bytes(x, OpenOptions::default()),
        Err(TraceError::BadMagic { .. })
    ));
    let mut x = b.clone();
    x[20] ^= 4;
    assert!(matches!(
        TraceFile::from_bytes(x, OpenOptions::default()),
        Err(TraceError::Checksum { offset: 0, .. })
    ));
    // Files are written in format 2.0.
    assert_eq!((b[8], b[9], b[10], b[11]), (2, 0, 0, 0));
    // Version 3 with a valid checksum: refused by version, not by checksum.
    let mut x = b.clone();
    x[8] = 3;
    let hl = 16 + u32::from_le_bytes([x[12], x[13], x[14], x[15]]) as usize;
    let c = crc32c_of(&x[..hl]);
    x[hl..hl + 4].copy_from_slice(&c.to_le_bytes());
    let e = TraceFile::from_bytes(x, OpenOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::UnsupportedVersion {
                major: 3,
                supported: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("reads 1.x to 2.x"), "{e}");
    assert!(matches!(
        TraceFile::from_bytes(b"hello".to_vec(), OpenOptions::default()),
        Err(TraceError::BadMagic { .. })
    ));
}

/// CRC32C (Castagnoli), bitwise: the test's own implementation of the documented checksum.
fn crc32c_of(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn every_frame_checksum_is_crc32c_as_documented() {
    let t = synthetic(16, 2, &[0], 1, 30);
    let b = write_bytes(&t, small_chunks());
    let f = TraceFile::from_bytes(b.clone(), OpenOptions::default()).unwrap();
    for c in f.chunk_infos() {
        let (o, l) = (c.offset as usize, c.frame_bytes as usize);
        let stored = u32::from_le_bytes(b[o + l - 4..o + l].try_into().unwrap());
        assert_eq!(stored, crc32c_of(&b[o..o + l - 4]));
    }
}

#[test]
fn threads_recording_different_layers_into_one_file_lose_nothing() {
    let d = TempDir::new("threads");
    let p = d.file("t.mrt");
    let layers: Vec<u32> = (0..8).map(|i| i * 2 + 1).collect();
    let reference = synthetic(64, 4, &layers, 6, 300);
    let w = TraceWriter::create(
        &p,
        reference.header().clone(),
        WriterOptions::default().with_chunk_id_bytes(4096),
    )
    .unwrap();
    std::thread::scope(|s| {
        for &layer in &layers {
            let (w, reference) = (&w, &reference);
            s.spawn(move || {
                for seq in 0..6u64 {
                    // Decode-like appends of 10 rows at a time.
                    let all = reference.to_dense(SeqId(seq));
                    let li = reference.header().layer_index(LayerId(layer)).unwrap();
                    for start in (0..300).step_by(10) {
                        let rows = all.slice(ndarray::s![start..start + 10, li, ..]);
                        w.append(SeqId(seq), LayerId(layer), start as u64, rows).unwrap();
                    }
                }
            });
        }
    });
    let st = w.finish().unwrap();
    assert_eq!(st.rows, 8 * 6 * 300);
    let f = TraceFile::open(&p).unwrap();
    assert!(f.report().is_clean());
    assert_eq!(f.to_trace().unwrap(), reference);
}

#[test]
fn the_writer_never_duplicates_rows_and_append_to_resumes_a_crashed_file() {
    let d = TempDir::new("resume");
    let p = d.file("t.mrt");
    let t = synthetic(16, 2, &[0, 1], 2, 40);
    let dense0 = t.to_dense(SeqId(0));
    let w = TraceWriter::create(&p, t.header().clone(), small_chunks()).unwrap();
    w.append(SeqId(0), LayerId(0), 0, dense0.slice(ndarray::s![0..20, 0, ..]))
        .unwrap();
    // Resent prefix: dropped, never duplicated.
    let st = w
        .append(SeqId(0), LayerId(0), 0, dense0.slice(ndarray::s![0..25, 0, ..]))
        .unwrap();
    assert_eq!(st.overlap_rows_dropped, 20);
    w.flush().unwrap();
    drop(w); // finishes
    // Simulate a crash: cut the footer/index and half of the last chunk.
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 60).unwrap();
    drop(f);
    let w = TraceWriter::append_to(&p, t.header(), small_chunks()).unwrap();
    for layer in [0u32, 1] {
        for seq in [0u64, 1] {
            let dense = t.to_dense(SeqId(seq));
            w.append(
                SeqId(seq),
                LayerId(layer),
                0,
                dense.slice(ndarray::s![.., layer as usize, ..]),
            )
            .unwrap();
        }
    }
    w.finish().unwrap();
    let f = TraceFile::open(&p).unwrap();
    assert!(f.report().is_clean(), "{:?}", f.report());
    assert_eq!(f.to_trace().unwrap(), t);
}

#[test]
fn a_manifest_merges_rank_shards() {
    let d = TempDir::new("manifest");
    let t = synthetic(16, 2, &[0, 1], 4, 20);
    let mut shards = Vec::new();
    for rank in 0..2u32 {
        let mut part = Trace::new(t.header().clone().with_producer(format!("rank {rank}")));
        for lane in t.lanes().filter(|l| l.seq.0 % 2 == u64::from(rank)) {
            for r in lane.runs {
                part.append_stored(lane.seq, lane.layer, r.start, r.bytes, true)
                    .unwrap();
            }
        }
        let name = format!("rank-{rank}.mrt");
        part.write_file(d.file(&name), WriterOptions::default()).unwrap();
        shards.push(ManifestShard { path: name, rank });
    }
    Manifest::new(t.header(), shards).write(d.file("trace.json")).unwrap();
    let sh = Manifest::open(d.file("trace.json"), OpenOptions::default()).unwrap();
    let mut merged = sh.to_trace().unwrap();
    merged.set_header(t.header().clone()).unwrap(); // producers differ per rank
    assert_eq!(merged, t);
    let mut out = Array2::zeros((20, 2));
    sh.read_rows(SeqId(3), LayerId(1), 0, out.view_mut()).unwrap();
    let mut want = out.clone();
    t.read_rows(SeqId(3), LayerId(1), 0, want.view_mut()).unwrap();
    assert_eq!(out, want);
    // A shard from another model is refused.
    let other = synthetic(16, 2, &[0, 2], 1, 2);
    other
        .write_file(d.file("rank-1.mrt"), WriterOptions::default())
        .unwrap();
    assert!(matches!(
        Manifest::open(d.file("trace.json"), OpenOptions::default()),
        Err(TraceError::HeaderMismatch(_))
    ));
}

#[test]
fn header_fields_round_trip_through_the_file() {
    let d = TempDir::new("hdr");
    let h = header(200, 6, &[3, 7, 11])
        .with_row_convention(RowConvention::TokensMinusOne)
        .with_fingerprint(0xDEAD_BEEF_0123)
        .with_weight_version(Some(42))
        .with_producer("vllm 0.21 / rank 3 ✓");
    let t = Trace::new(h.clone());
    t.write_file(d.file("h.mrt"), WriterOptions::default()).unwrap();
    assert_eq!(TraceFile::open(d.file("h.mrt")).unwrap().header(), &h);
}

#[test]
fn raw_files_take_about_one_byte_per_id_and_ranked_zstd_under_0_6_on_correlated_routes() {
    let cfg = RouterConfig::builder(128, 8).build().unwrap();
    let mut g = SyntheticRoutes::new(cfg, (0..8).collect(), 4, 2048);
    g.rho = 0.9;
    let t = g.generate().unwrap();
    let ids = t.summary().ids as f64;
    let d = TempDir::new("size");
    let size = |o: WriterOptions| {
        let p = d.file("s.mrt");
        t.write_file(&p, o).unwrap();
        assert_eq!(TraceFile::open(&p).unwrap().to_trace().unwrap(), t);
        std::fs::metadata(&p).unwrap().len() as f64 / ids
    };
    let raw = size(WriterOptions::uncompressed());
    let ranked = size(WriterOptions {
        compression: Compression::ZstdRanked(19),
        ..WriterOptions::default()
    });
    println!("bytes per id: raw {raw:.4}, rank+zstd(19) {ranked:.4}");
    assert!(raw <= 1.005, "raw {raw}");
    assert!(ranked <= 0.6, "ranked {ranked}");
}

#[test]
fn comparing_a_trace_with_itself_finds_no_mismatch() {
    let t = synthetic(32, 4, &[0, 1, 2], 2, 30);
    let c = compare(&t, &t).unwrap();
    assert_eq!(c.router_mismatch_fraction, 0.0);
    assert_eq!(c.token_any_layer_mismatch_fraction, 0.0);
    assert_eq!(c.mean_overlap, 1.0);
    assert_eq!(c.routers_compared, 2 * 30 * 3);
    assert_eq!(c.tokens_compared, 60);
}

#[test]
fn comparison_counts_set_differences_not_slot_order_and_uses_the_contract_keys() {
    let h = header(8, 2, &[0, 1]);
    let mut a = Trace::new(h.clone());
    let mut b = Trace::new(h);
    a.append(SeqId(0), LayerId(0), 0, array![[1u32, 2], [3, 4]].view())
        .unwrap();
    a.append(SeqId(0), LayerId(1), 0, array![[1u32, 2], [3, 4]].view())
        .unwrap();
    b.append(SeqId(0), LayerId(0), 0, array![[2u32, 1], [3, 5]].view())
        .unwrap(); // order only; one differs
    b.append(SeqId(0), LayerId(1), 0, array![[1u32, 2], [6, 7]].view())
        .unwrap();
    b.append(SeqId(1), LayerId(1), 0, array![[1u32, 2]].view()).unwrap(); // only in b
    let c = compare(&a, &b).unwrap();
    assert_eq!(c.router_mismatch_fraction, 0.5);
    assert_eq!(c.token_any_layer_mismatch_fraction, 0.5);
    assert_eq!(c.mean_mismatched_layers_per_token, 1.0);
    assert_eq!(c.per_layer[0].mismatch_fraction, 0.5);
    assert_eq!(c.per_layer[0].mean_overlap, 0.75);
    assert_eq!(c.per_layer[1].mean_overlap, 0.5);
    assert_eq!(c.rows_only_in_b, 1);
    let v = serde_json::to_value(&c).unwrap();
    for key in [
        "router_mismatch_fraction",
        "token_any_layer_mismatch_fraction",
        "mean_mismatched_layers_per_token",
        "per_layer",
    ] {
        assert!(v.get(key).is_some(), "{key}");
    }
    let l = &v["per_layer"][0];
    let mut keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["layer", "mean_overlap", "mismatch_fraction"]);
}

#[test]
fn load_statistics_count_tokens_per_expert_per_layer() {
    let mut t = Trace::new(header(4, 2, &[0, 1]));
    t.append(
        SeqId(0),
        LayerId(0),
        0,
        array![[0u32, 1], [0, 2], [MISSING_ID, MISSING_ID]].view(),
    )
    .unwrap();
    let l = load_stats(&t);
    assert_eq!(l[0].tokens, 2);
    assert_eq!(l[0].tokens_per_expert, vec![2, 1, 1, 0]);
    assert_eq!(l[0].max, 2);
    assert_eq!(l[0].max_over_mean, 2.0);
    assert_eq!(l[1].tokens, 0);
}

#[test]
fn summary_counts_sequences_tokens_rows_and_layers() {
    let t = synthetic(16, 2, &[0, 4], 3, 10);
    let s = t.summary();
    assert_eq!((s.sequences, s.tokens, s.rows, s.ids), (3, 30, 60, 120));
    assert_eq!(s.layers.len(), 2);
    assert!(t.validation_issues().is_empty());
}

/// Fills the ids of (sequence, layer index, position).
type RowFn<'a> = dyn Fn(u64, usize, u64, &mut [u32]) + 'a;

/// Records like an inference engine through the [`Record`] policy: a packed prefill of every
/// sequence (prompt lengths differ), then decode steps of one token per sequence, each step a
/// call per MoE layer with the batch padded to a multiple of 8 rows. `row(seq, layer index,
/// position)` gives the ids. Returns (file bytes, ids recorded).
fn record_engine_style(
    path: &std::path::Path,
    header: &TraceHeader,
    opts: WriterOptions,
    seqs: u64,
    prompt: usize,
    decode: usize,
    row: &RowFn<'_>,
) -> (u64, u64) {
    use moe_router::policy::Record;
    use moe_router::{BatchLayout, CallSite, ReplayPolicy, RouteShape, Segment};
    let k = header.top_k();
    let layers = header.layer_ids();
    let rec = Record::create_file(path, header.clone(), opts).unwrap();
    let call = |layout: &BatchLayout, li: usize| {
        let mut ids = Array2::<u32>::zeros((layout.rows(), k));
        for (r, addr) in layout.iter_rows().enumerate() {
            if let moe_router::RowAddr::Token(seq, pos) = addr {
                row(seq.0, li, pos, ids.row_mut(r).as_slice_mut().unwrap());
            }
        }
        let site = CallSite::layer(layers[li]).with_layout(layout);
        let shape = RouteShape {
            rows: layout.rows(),
            num_experts: header.num_experts(),
            top_k: k,
        };
        rec.recorder(&site, shape).unwrap().unwrap()(ids.view());
    };
    let lens: Vec<(SeqId, usize)> = (0..seqs).map(|s| (SeqId(s), prompt + (s as usize * 37) % 64)).collect();
    let prefill = BatchLayout::packed(&lens).unwrap();
    for li in 0..layers.len() {
        call(&prefill, li);
    }
    let mut ids = lens.iter().map(|&(_, l)| l as u64).sum::<u64>() * layers.len() as u64;
    for step in 0..decode {
        let mut segs: Vec<Segment> = lens
            .iter()
            .map(|&(seq, l)| Segment::Tokens {
                seq,
                start: (l + step) as u64,
                len: 1,
            })
            .collect();
        segs.push(Segment::Padding {
            len: (8 - lens.len() % 8) % 8,
        });
        let layout = BatchLayout::new(segs).unwrap();
        for li in 0..layers.len() {
            call(&layout, li);
        }
        ids += seqs * layers.len() as u64;
    }
    rec.finish().unwrap();
    (std::fs::metadata(path).unwrap().len(), ids * k as u64)
}

#[test]
fn engine_style_recording_stores_at_most_1_02_bytes_per_id_raw() {
    let d = TempDir::new("engine-raw");
    let header = header(128, 8, &(0..48).collect::<Vec<_>>());
    // No time budget: chunks close on the 1 MiB row budget only, so sizes are deterministic.
    let raw = WriterOptions::uncompressed().with_chunk_max_age(None);
    // Ids do not change a raw file's size: a cheap pattern of distinct ids.
    let row = |s: u64, li: usize, p: u64, out: &mut [u32]| {
        for (j, o) in out.iter_mut().enumerate() {
            *o = ((s * 7 + li as u64 * 3 + p / 5) as u32 + 15 * j as u32) % 128;
        }
    };
    for (seqs, prompt, decode) in [(16u64, 256usize, 512usize), (64, 128, 256), (256, 64, 64)] {
        let p = d.file(&format!("e-{seqs}.mrt"));
        let (bytes, ids) = record_engine_style(&p, &header, raw, seqs, prompt, decode, &row);
        let per_id = bytes as f64 / ids as f64;
        println!("{seqs} sequences × 48 layers, prompt {prompt}, {decode} decode steps: raw {per_id:.4} B/id");
        assert!(per_id <= 1.02, "{seqs} sequences: {per_id:.4} bytes per id");
        let f = TraceFile::open(&p).unwrap();
        let mut got = Array2::<u32>::zeros((1, 8));
        let mut want = [0u32; 8];
        f.read_rows(SeqId(seqs - 1), LayerId(47), prompt as u64 + 1, got.view_mut())
            .unwrap();
        row(seqs - 1, 47, prompt as u64 + 1, &mut want);
        assert_eq!(got.as_slice().unwrap(), &want[..]);
    }
}

#[test]
fn record_and_the_default_writer_options_compress_with_zstd_where_it_is_smaller() {
    let defaults = WriterOptions::default();
    assert_eq!(defaults.compression, Compression::Zstd(3));
    let cfg = RouterConfig::builder(128, 8).build().unwrap();
    let layers: Vec<u32> = (0..8).collect();
    let t = SyntheticRoutes::new(cfg, layers, 16, 64 + 64 + 192).generate().unwrap();
    let row = |s: u64, li: usize, p: u64, out: &mut [u32]| {
        let mut a = Array2::<u32>::zeros((1, 8));
        t.read_rows(SeqId(s), LayerId(li as u32), p, a.view_mut()).unwrap();
        out.copy_from_slice(a.as_slice().unwrap());
    };
    let d = TempDir::new("engine-zstd");
    let mut per_id = Vec::new();
    for (name, opts) in [
        ("raw", WriterOptions::uncompressed()),
        ("default", WriterOptions::default()),
    ] {
        let p = d.file(&format!("{name}.mrt"));
        let (bytes, ids) = record_engine_style(&p, t.header(), opts.with_chunk_max_age(None), 16, 64, 192, &row);
        per_id.push(bytes as f64 / ids as f64);
        let f = TraceFile::open(&p).unwrap();
        let codecs: Vec<String> = f.chunk_infos().into_iter().map(|c| c.codec).collect();
        let want = if name == "raw" { "none" } else { "zstd" };
        assert!(codecs.iter().all(|c| c == want), "{name}: {codecs:?}");
        assert!(t.summary().rows > 0);
        for lane in f.to_trace().unwrap().lanes() {
            let mut a = Array2::<u32>::zeros((1, 8));
            t.read_rows(lane.seq, lane.layer, lane.runs[0].start, a.view_mut())
                .unwrap();
            let mut b = Array2::<u32>::zeros((1, 8));
            f.read_rows(lane.seq, lane.layer, lane.runs[0].start, b.view_mut())
                .unwrap();
            assert_eq!(a, b);
        }
    }
    println!(
        "engine-style routes: raw {:.4} B/id, default (zstd 3) {:.4} B/id",
        per_id[0], per_id[1]
    );
    assert!(per_id[0] <= 1.02, "raw {}", per_id[0]);
    assert!(per_id[1] <= 0.9, "zstd {}", per_id[1]);
}

/// The row of (sequence, layer, position) in the format 1.0 fixtures (`tests/fixtures/format-1.0.md`).
fn format_1_0_fixture_row(e: u32, k: usize, s: u64, l: u32, p: u64) -> Vec<u32> {
    if s == 1 && l == 3 && p == 5 {
        // Written missing, then filled by a later block.
        return (0..k as u32).map(|j| (3 * j + 1) % e).collect();
    }
    if p % 13 == 5 {
        return vec![MISSING_ID; k];
    }
    let base = (s * 17 + u64::from(l) * 5 + p / 3) as u32;
    let step = e / k as u32 - 1;
    (0..k as u32).map(|j| (base + j * step) % e).collect()
}

/// Checks that `f` holds the fixture rows at positions `0..end` of every (sequence, layer) and
/// nothing after.
fn assert_fixture_rows(f: &TraceFile, e: u32, k: usize, end: u64) {
    for s in 0..3u64 {
        for l in [1u32, 3, 5] {
            let mut got = Array2::<u32>::zeros((end as usize + 4, k));
            f.read_rows(SeqId(s), LayerId(l), 0, got.view_mut()).unwrap();
            for p in 0..end + 4 {
                let want = if p < end {
                    format_1_0_fixture_row(e, k, s, l, p)
                } else {
                    vec![MISSING_ID; k]
                };
                assert_eq!(got.row(p as usize).to_vec(), want, "seq {s} layer {l} position {p}");
            }
        }
    }
}

#[test]
fn format_1_0_files_still_open_read_and_append() {
    let d = TempDir::new("v1");
    for (name, e, k, codec) in [
        ("format-1.0-raw.mrt", 128u32, 4usize, "none"),
        ("format-1.0-rank-zstd.mrt", 256, 8, "zstd"),
        ("format-1.0-zstd-u16.mrt", 384, 4, "zstd"),
    ] {
        let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap();
        for verify in [Verify::Eager, Verify::Lazy] {
            let f = TraceFile::from_bytes(
                bytes.clone(),
                OpenOptions {
                    verify,
                    ..OpenOptions::default()
                },
            )
            .unwrap();
            assert_eq!(f.format_version(), (1, 0), "{name}");
            assert!(f.report().is_clean(), "{name}: {:?}", f.report());
            assert_eq!(f.report().major_version, 1);
            let h = f.header();
            assert_eq!(
                (h.num_experts(), h.top_k(), h.layer_ids()),
                (e as usize, k, vec![1, 3, 5])
            );
            assert_eq!(h.row_convention(), RowConvention::TokensMinusOne);
            assert_eq!((h.fingerprint(), h.weight_version()), (0x1122_3344_5566_7788, Some(7)));
            assert_eq!(h.producer(), "moe-router format 1.0 fixture");
            assert!(f.chunk_infos().len() >= 3 && f.chunk_infos().iter().all(|c| c.codec == codec));
            assert_fixture_rows(&f, e, k, 40);
        }
        // Without its index (an unclosed 1.0 file) it is scanned, with the same rows.
        let f = TraceFile::from_bytes(bytes.clone(), OpenOptions::default()).unwrap();
        let cut = bytes[..f.data_end() as usize].to_vec();
        let f = TraceFile::from_bytes(cut, OpenOptions::default()).unwrap();
        assert_eq!(f.report().index, IndexState::Absent);
        assert_fixture_rows(&f, e, k, 40);
        // Appending keeps the file in format 1.0 (readable by 1.x readers) and every old row.
        let p = d.file(name);
        std::fs::write(&p, &bytes).unwrap();
        let header = f.header().clone();
        let w = TraceWriter::append_to(&p, &header, WriterOptions::default()).unwrap();
        for s in 0..3u64 {
            for l in [1u32, 3, 5] {
                let rows: Vec<u32> = (40..48u64)
                    .flat_map(|pos| format_1_0_fixture_row(e, k, s, l, pos))
                    .collect();
                let a = Array2::from_shape_vec((8, k), rows).unwrap();
                w.append(SeqId(s), LayerId(l), 40, a.view()).unwrap();
            }
        }
        w.finish().unwrap();
        let f = TraceFile::open(&p).unwrap();
        assert_eq!(f.format_version(), (1, 0), "{name}");
        assert!(f.report().is_clean());
        assert_fixture_rows(&f, e, k, 48);
        assert_eq!(
            &std::fs::read(&p).unwrap()[..f.report().recovered_bytes as usize][..bytes.len().min(64)],
            &bytes[..bytes.len().min(64)]
        );
    }
}

#[test]
fn new_files_are_format_2_0_and_group_the_layers_of_a_decode_step_into_one_block() {
    let h = header(64, 4, &[1, 3, 5, 7]);
    let d = TempDir::new("v2");
    let p = d.file("t.mrt");
    let w = TraceWriter::create(&p, h, WriterOptions::uncompressed()).unwrap();
    // Two sequences, four layers, eight decode steps: one row per (sequence, layer) per call.
    for pos in 0..8u64 {
        for l in [1u32, 3, 5, 7] {
            for s in 0..2u64 {
                let a = Array2::from_shape_fn((1, 4), |(_, j)| {
                    ((s * 3 + u64::from(l) + pos + 16 * j as u64) % 64) as u32
                });
                w.append(SeqId(s), LayerId(l), pos, a.view()).unwrap();
            }
        }
    }
    w.finish().unwrap();
    let f = TraceFile::open(&p).unwrap();
    assert_eq!(f.format_version(), (2, 0));
    // One chunk: per sequence one block for the four layers' eight rows.
    assert_eq!(f.chunk_infos().len(), 1);
    assert_eq!(f.chunk_infos()[0].blocks, 2);
    for s in 0..2u64 {
        for l in [1u32, 3, 5, 7] {
            let mut a = Array2::<u32>::zeros((8, 4));
            f.read_rows(SeqId(s), LayerId(l), 0, a.view_mut()).unwrap();
            for pos in 0..8u64 {
                for j in 0..4 {
                    assert_eq!(
                        u64::from(a[[pos as usize, j]]),
                        (s * 3 + u64::from(l) + pos + 16 * j as u64) % 64
                    );
                }
            }
        }
    }
    let b = std::fs::read(&p).unwrap();
    for verify in [Verify::Eager, Verify::Lazy] {
        let g = TraceFile::from_bytes(
            b.clone(),
            OpenOptions {
                verify,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(g.to_trace().unwrap(), f.to_trace().unwrap());
    }
}

/// Bytes of a file written so far, read as a crash would leave them (the writer still open).
fn open_as_after_a_crash(p: &std::path::Path) -> TraceFile {
    TraceFile::from_bytes(std::fs::read(p).unwrap(), OpenOptions::default()).unwrap()
}

#[test]
fn a_chunk_closes_on_its_time_budget_so_a_crash_loses_at_most_that_much_time_of_rows() {
    let defaults = WriterOptions::default();
    assert_eq!(defaults.chunk_max_age, Some(std::time::Duration::from_secs(1)));
    assert_eq!(defaults.chunk_id_bytes, 1 << 20);
    let d = TempDir::new("age");
    let h = header(64, 4, &[0, 1]);
    let row = array![[1u32, 2, 3, 4]];
    // A small rollout: far below the 1 MiB row budget.
    let budget = std::time::Duration::from_millis(50);
    let p = d.file("aged.mrt");
    let w = TraceWriter::create(&p, h.clone(), WriterOptions::default().with_chunk_max_age(Some(budget))).unwrap();
    w.append(SeqId(0), LayerId(0), 0, row.view()).unwrap();
    // No further append: the background thread closes the chunk once it is older than the
    // budget (a quarter of the budget late at most; the wait allows for a loaded machine).
    let t0 = std::time::Instant::now();
    let mut f = open_as_after_a_crash(&p);
    while f.chunk_infos().is_empty() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
        f = open_as_after_a_crash(&p);
    }
    assert!(t0.elapsed() >= budget * 3 / 4, "closed before its budget");
    assert_eq!(
        f.chunk_infos().len(),
        1,
        "the aged chunk is on disk without flush or finish"
    );
    let mut a = Array2::<u32>::zeros((1, 4));
    f.read_rows(SeqId(0), LayerId(0), 0, a.view_mut()).unwrap();
    assert_eq!(a, row);
    // The next append after the budget closes its chunk itself.
    w.append(SeqId(0), LayerId(1), 0, row.view()).unwrap();
    std::thread::sleep(budget * 2);
    w.append(SeqId(0), LayerId(1), 1, row.view()).unwrap();
    let t0 = std::time::Instant::now();
    while open_as_after_a_crash(&p).chunk_infos().len() < 2 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let f = open_as_after_a_crash(&p);
    assert!(f.chunk_infos().len() >= 2);
    f.read_rows(SeqId(0), LayerId(1), 0, a.view_mut()).unwrap();
    assert_eq!(a, row);
    drop(w);
    // Without a time budget the rows wait for the row budget, flush or finish: a crash before
    // then loses them.
    let p = d.file("unaged.mrt");
    let w = TraceWriter::create(&p, h, WriterOptions::default().with_chunk_max_age(None)).unwrap();
    w.append(SeqId(0), LayerId(0), 0, row.view()).unwrap();
    std::thread::sleep(budget * 4);
    assert!(open_as_after_a_crash(&p).chunk_infos().is_empty());
    w.flush().unwrap();
    let t0 = std::time::Instant::now();
    while open_as_after_a_crash(&p).chunk_infos().is_empty() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        open_as_after_a_crash(&p).chunk_infos().len(),
        1,
        "flush writes the chunk at once"
    );
}

#[test]
fn rows_partly_holding_the_sentinel_value_are_present_rows_valid_only_for_256_experts() {
    // E = 256, K = 8: one byte per id, and 0xFF is expert 255. A row holding 0xFF in some slots
    // but not all is a present row with expert 255; only the all-0xFF row is missing.
    let d = TempDir::new("sentinel");
    let h = header(256, 8, &[0]);
    assert_eq!(h.id_width(), IdWidth::U8);
    let p = d.file("e256.mrt");
    let w = TraceWriter::create(&p, h, WriterOptions::uncompressed()).unwrap();
    w.append_stored(
        SeqId(0),
        LayerId(0),
        0,
        &[255, 0, 1, 2, 3, 4, 5, 6, 255, 255, 255, 255, 255, 255, 255, 255],
    )
    .unwrap();
    // In the u32 API the marker is MISSING_ID, never 255: expert 255 is an id like any other.
    w.append(SeqId(0), LayerId(0), 2, array![[7u32, 255, 1, 2, 3, 4, 5, 6]].view())
        .unwrap();
    w.finish().unwrap();
    let f = TraceFile::open(&p).unwrap();
    let mut a = Array2::<u32>::zeros((3, 8));
    f.read_rows(SeqId(0), LayerId(0), 0, a.view_mut()).unwrap();
    assert_eq!(a.row(0).to_vec(), vec![255, 0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(a.row(1).to_vec(), vec![MISSING_ID; 8]);
    assert_eq!(a.row(2).to_vec(), vec![7, 255, 1, 2, 3, 4, 5, 6]);
    // Two 0xFF slots in a present row are a duplicate of expert 255.
    let w = TraceWriter::create(d.file("dup.mrt"), header(256, 8, &[0]), WriterOptions::uncompressed()).unwrap();
    let e = w
        .append_stored(SeqId(0), LayerId(0), 4, &[255, 255, 1, 2, 3, 4, 5, 6])
        .unwrap_err();
    assert!(
        matches!(
            e,
            TraceError::DuplicateId {
                id: 255,
                position: 4,
                ..
            }
        ),
        "{e}"
    );
    // Below 256 experts (and with two-byte ids) the sentinel is not an expert: such a row is out
    // of range, naming the slot.
    for (e_, k) in [(128usize, 2usize), (384, 2)] {
        let h = header(e_, k, &[0]);
        let sentinel = h.id_width().sentinel();
        let w = TraceWriter::create(d.file("low.mrt"), h.clone(), WriterOptions::uncompressed()).unwrap();
        let stored: Vec<u8> = match h.id_width() {
            IdWidth::U8 => vec![3, 0xFF],
            IdWidth::U16 => vec![3, 0, 0xFF, 0xFF],
        };
        let err = w.append_stored(SeqId(0), LayerId(0), 9, &stored).unwrap_err();
        assert!(
            matches!(err, TraceError::IdOutOfRange { slot: 1, id, position: 9, .. } if id == sentinel),
            "E = {e_}: {err}"
        );
    }
    // The u32 API refuses a row that is partly MISSING_ID, for every E.
    let w = TraceWriter::create(
        d.file("partial.mrt"),
        header(256, 8, &[0]),
        WriterOptions::uncompressed(),
    )
    .unwrap();
    let e = w
        .append(
            SeqId(0),
            LayerId(0),
            0,
            array![[MISSING_ID, 0, 1, 2, 3, 4, 5, 6]].view(),
        )
        .unwrap_err();
    assert!(matches!(e, TraceError::PartialMissing { position: 0, .. }), "{e}");
}

/// Decodes standard base64 (test helper).
fn base64_decode(text: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()) {
        acc = (acc << 6) | u32::from(val(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn r3v1_export_writes_zstd_frames_with_the_content_checksum() {
    use moe_router::interop::{self, ExportOptions, Format, ImportOptions};
    let t = synthetic(16, 2, &[0, 1], 1, 12);
    let text = interop::export(Format::R3v1, &t, &ExportOptions::default()).unwrap();
    let frame = base64_decode(std::str::from_utf8(&text).unwrap());
    // A zstd frame: magic 28 B5 2F FD, then the frame header descriptor whose bit 2 is the
    // Content_Checksum_flag (RFC 8878, 3.1.1.1.1): the frame then ends with the low 32 bits of
    // the content's XXH64, which every decoder checks.
    assert_eq!(&frame[..4], &[0x28, 0xB5, 0x2F, 0xFD]);
    assert_ne!(frame[4] & 0b100, 0, "content checksum flag not set: {:08b}", frame[4]);
    // The export still imports back to the same routes.
    let opts = ImportOptions::default().with_shape(2, 2).with_num_experts(16);
    let back = interop::import(Format::R3v1, &text, &opts).unwrap();
    let got = back.to_dense(SeqId(0));
    assert_eq!(got.slice(ndarray::s![..12, .., ..]), t.to_dense(SeqId(0)));
}

#[test]
fn the_annotated_example_of_the_format_doc_is_what_the_writer_writes() {
    // The bytes listed in docs/trace-format.md, "Annotated example": `OFFSET: BYTES  comment`.
    let doc = include_str!("../../docs/trace-format.md");
    let example = doc.split("## Annotated example").nth(1).unwrap();
    let block = example.split("```").nth(1).unwrap();
    let mut listed: Vec<u8> = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (off, rest) = line.split_once(": ").unwrap();
        assert_eq!(
            usize::from_str_radix(off, 16).unwrap(),
            listed.len(),
            "offset of {line:?}"
        );
        for tok in rest.split_whitespace() {
            if tok.len() != 2 || !tok.bytes().all(|c| c.is_ascii_hexdigit()) {
                break;
            }
            listed.push(u8::from_str_radix(tok, 16).unwrap());
        }
    }
    let h = TraceHeader::new(8, 2, &[1, 3])
        .unwrap()
        .with_fingerprint(0x1122_3344_5566_7788)
        .with_producer("ex");
    let d = TempDir::new("example");
    let p = d.file("ex.mrt");
    let w = TraceWriter::create(&p, h, WriterOptions::uncompressed().with_chunk_max_age(None)).unwrap();
    w.append(SeqId(5), LayerId(1), 2, array![[4u32, 1], [0, 2]].view())
        .unwrap();
    w.append(
        SeqId(5),
        LayerId(3),
        2,
        array![[3u32, 7], [MISSING_ID, MISSING_ID]].view(),
    )
    .unwrap();
    w.append(SeqId(2), LayerId(3), 0, array![[6u32, 5]].view()).unwrap();
    w.finish().unwrap();
    let written = std::fs::read(&p).unwrap();
    assert_eq!(listed, written);
    // Every CRC32C in it is the documented checksum.
    assert_eq!(crc32c_of(b"123456789"), 0xE306_9283);
    for (from, to) in [(0x00, 0x42), (0x46, 0x72), (0x76, 0xb4), (0xb8, 0xc8)] {
        assert_eq!(
            u32::from_le_bytes(written[to..to + 4].try_into().unwrap()),
            crc32c_of(&written[from..to])
        );
    }
}
