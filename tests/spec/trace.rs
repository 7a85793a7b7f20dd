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
    // Version 2 with a valid checksum: refused by version, not by checksum.
    let mut x = b.clone();
    x[8] = 2;
    let hl = 16 + u32::from_le_bytes([x[12], x[13], x[14], x[15]]) as usize;
    let c = crc32c_of(&x[..hl]);
    x[hl..hl + 4].copy_from_slice(&c.to_le_bytes());
    assert!(matches!(
        TraceFile::from_bytes(x, OpenOptions::default()),
        Err(TraceError::UnsupportedVersion { major: 2, .. })
    ));
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
    let raw = size(WriterOptions::default());
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
