//! Issue 12, items 2–6: hash-routed layers, layer kinds (MTP never aliased to decoder ids),
//! threshold replay and the per-slot sentinel, prefix offsets (route starts), and
//! `validate --explain`'s silent-failure classes.

use moe_router::interop::{self, DenseRoutes, ExportOptions, Format, ImportOptions};
use moe_router::metrics::explain::{self, Against, FindingClass, ModelLayers};
use moe_router::policy::{MissingRoutes, Record, Replay};
use moe_router::replay_slots::{self, ReplayThreshold};
use moe_router::trace::{MISSING_ID, Trace, TraceFile, TraceHeader, WriterOptions};
use moe_router::{
    BatchLayout, CallSite, HashLayers, HashTable, LayerId, LayerKind, LogitsRef, ReferenceRouter, Replayed, RouteError,
    Router, RouterConfig, SeqId,
};
use moe_router_cli::trace_cmds::capture_output;
use ndarray::{Array2, Array3, array};
use proptest::prelude::*;
use serde_json::Value;
use std::path::PathBuf;

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("moe-router-replay-features-{}-{tag}-{n}", std::process::id()));
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

fn run_json(args: &[&str]) -> (u8, Value) {
    let mut v = vec!["moe-router"];
    v.extend_from_slice(args);
    let (code, out, err) = capture_output(|| moe_router_cli::run(v));
    let j = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}\n{err}"));
    (code, j)
}

fn cfg(e: usize, k: usize) -> RouterConfig {
    RouterConfig::builder(e, k).build().unwrap()
}

/// Deterministic pseudo-random logits `[t, e]`.
fn logits(t: usize, e: usize, seed: u64) -> Array2<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    Array2::from_shape_fn((t, e), |_| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
    })
}

fn own_ids(c: &RouterConfig, z: &Array2<f32>) -> Array2<u32> {
    ReferenceRouter::new(c.clone())
        .route_host(&LogitsRef::F32(z.view()))
        .unwrap()
        .0
}

// ---------------------------------------------------------------- slot sentinel

#[test]
fn a_minus_one_slot_takes_the_routers_top_k_in_order_skipping_ids_already_in_the_row() {
    let c = cfg(8, 3);
    let z = logits(3, 8, 1);
    let own = own_ids(&c, &z);
    let r = ReferenceRouter::new(c.clone());
    // Row 0: slot 1 is the router's; row 1: every slot (a whole-row fallback); row 2: none.
    let forced0 = (0..8u32).find(|x| !own.row(0).to_vec().contains(x)).unwrap();
    let ids = array![
        [i64::from(forced0), -1, i64::from(own[[0, 0]])],
        [-1, -1, -1],
        [0, 1, 2]
    ];
    let out = replay_slots::replay_i64_host(&r, &LogitsRef::F32(z.view()), ids.view(), None).unwrap();
    // Slot 1 of row 0: the router's first id not already in the row (own[0][0] is in slot 2).
    assert_eq!(out.ids.row(0).to_vec(), vec![forced0, own[[0, 1]], own[[0, 0]]]);
    assert_eq!(out.ids.row(1), own.row(1));
    assert_eq!(out.ids.row(2).to_vec(), vec![0, 1, 2]);
    assert_eq!(out.counts.sentinel_slots, 1);
    assert_eq!(out.counts.router_rows, 1);
    assert_eq!(out.counts.replayed_slots, 2 + 3);
    let w = r.weights_host(&LogitsRef::F32(z.view()), out.ids.view()).unwrap();
    assert_eq!(out.weights, w, "weights are those of the final ids on the live logits");
    let mut st = moe_router::stats::RoutingStats::default();
    out.counts.fill_stats(&mut st, false);
    let j = serde_json::to_value(&st).unwrap();
    assert_eq!(j["sentinel_slots"], 1);
    assert!(j.get("replace_rate").is_none(), "no threshold: no replace_rate");
}

#[test]
fn replay_ids_below_minus_one_or_at_least_e_are_errors_naming_row_and_slot() {
    let c = cfg(8, 2);
    let z = logits(2, 8, 2);
    let r = ReferenceRouter::new(c);
    let e =
        replay_slots::replay_i64_host(&r, &LogitsRef::F32(z.view()), array![[0, 1], [3, -2]].view(), None).unwrap_err();
    assert_eq!(
        e,
        RouteError::IdOutOfRange {
            row: 1,
            slot: 1,
            id: -2,
            num_experts: 8
        }
    );
    let e =
        replay_slots::replay_i64_host(&r, &LogitsRef::F32(z.view()), array![[8, 1], [3, 2]].view(), None).unwrap_err();
    assert!(
        matches!(
            e,
            RouteError::IdOutOfRange {
                row: 0,
                slot: 0,
                id: 8,
                ..
            }
        ),
        "{e:?}"
    );
    let e =
        replay_slots::replay_i64_host(&r, &LogitsRef::F32(z.view()), array![[1, 1], [3, 2]].view(), None).unwrap_err();
    assert!(matches!(e, RouteError::DuplicateId { row: 0, id: 1, .. }), "{e:?}");
}

// ---------------------------------------------------------------- threshold replay

#[test]
fn threshold_replay_keeps_an_id_only_at_ratio_times_the_weakest_own_score_and_refills_from_the_routers_top_k() {
    // Softmax before top-K, E = 4, K = 2: scores ∝ exp(z).
    let c = cfg(4, 2);
    let z = array![[2.0f32, 1.0, 0.0, -3.0]];
    let s: Vec<f64> = {
        let e: Vec<f64> = z.row(0).iter().map(|&x| f64::from(x).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|x| x / sum).collect()
    };
    // Own top-2 = [0, 1]; weakest own score = s[1]. Replay [3, 2]: s[3]/s[1] = e^-4, s[2]/s[1] = e^-1.
    let r = ReferenceRouter::new(c);
    let ids = array![[3i64, 2]];
    let th = |x: f64| Some(ReplayThreshold::new(x).unwrap());
    let out = replay_slots::replay_i64_host(&r, &LogitsRef::F32(z.view()), ids.view(), th(0.3)).unwrap();
    assert!(s[2] >= 0.3 * s[1] && s[3] < 0.3 * s[1]);
    assert_eq!(
        out.ids.row(0).to_vec(),
        vec![0, 2],
        "expert 3 dropped, refilled by the router's best id"
    );
    assert_eq!((out.counts.replaced_slots, out.counts.replayed_slots), (1, 2));
    assert_eq!(out.counts.replace_rate(), 0.5);
    let out = replay_slots::replay_i64_host(&r, &LogitsRef::F32(z.view()), ids.view(), th(0.0)).unwrap();
    assert_eq!(out.ids.row(0).to_vec(), vec![3, 2], "ratio 0 keeps every replayed id");
    let out = replay_slots::replay_i64_host(&r, &LogitsRef::F32(z.view()), ids.view(), th(0.5)).unwrap();
    assert_eq!(
        out.ids.row(0).to_vec(),
        vec![0, 1],
        "both dropped: the router's own top-K in order"
    );
    let mut st = moe_router::stats::RoutingStats::default();
    out.counts.fill_stats(&mut st, true);
    let j = serde_json::to_value(&st).unwrap();
    assert_eq!(j["replace_rate"], 1.0);
    assert_eq!(j["replaced_slots"], 2);
    assert!(ReplayThreshold::new(-0.1).is_err() && ReplayThreshold::new(f64::NAN).is_err());
}

fn distinct_row(e: usize, k: usize, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..e as u32).collect();
    let mut s = seed | 1;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v.truncate(k);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Threshold replay: every final row is K distinct ids < E; a kept replayed id clears
    /// ratio × the weakest own score, a replaced one does not; the refill comes from the
    /// router's top-K; ratio ≤ 1 never drops an id of the router's own top-K; the result is
    /// deterministic and its weights are those of the final ids.
    #[test]
    fn threshold_replay_keeps_exactly_the_ids_that_clear_the_bar(
        e in 4usize..24, kk in 1usize..4, t in 1usize..6, seed in any::<u64>(),
        ratio in 0.0f64..2.0, sigmoid in any::<bool>(), sentinel_mask in any::<u8>(),
    ) {
        let k = kk.min(e);
        let mut b = RouterConfig::builder(e, k);
        if sigmoid {
            b = b.score(moe_router::ScoreFunction::Sigmoid);
        }
        let c = b.build().unwrap();
        let z = logits(t, e, seed);
        let own = own_ids(&c, &z);
        let mut ids = Array2::<i64>::zeros((t, k));
        for r in 0..t {
            for (j, x) in distinct_row(e, k, seed ^ (r as u64 + 1)).into_iter().enumerate() {
                ids[[r, j]] = if (sentinel_mask >> ((r * k + j) % 8)) & 1 == 1 && r % 2 == 1 { -1 } else { i64::from(x) };
            }
        }
        let router = ReferenceRouter::new(c.clone());
        let lv = LogitsRef::F32(z.view());
        let th = ReplayThreshold::new(ratio).unwrap();
        let out = replay_slots::replay_i64_host(&router, &lv, ids.view(), Some(th)).unwrap();
        let again = replay_slots::replay_i64_host(&router, &lv, ids.view(), Some(th)).unwrap();
        prop_assert_eq!(&out, &again);
        let mut replaced = 0u64;
        let mut judged = 0u64;
        for r in 0..t {
            let s = replay_slots::live_scores(&c, &lv, r).unwrap();
            let own_r: Vec<u32> = own.row(r).to_vec();
            let weakest = own_r.iter().map(|&i| s[i as usize]).fold(f64::INFINITY, f64::min);
            let fin: Vec<u32> = out.ids.row(r).to_vec();
            for (j, &x) in fin.iter().enumerate() {
                prop_assert!((x as usize) < e);
                prop_assert!(!fin[..j].contains(&x), "duplicate in row {}", r);
            }
            for j in 0..k {
                let v = ids[[r, j]];
                if v < 0 {
                    prop_assert!(own_r.contains(&fin[j]), "a sentinel slot holds one of the router's ids");
                    continue;
                }
                judged += 1;
                let keep = s[v as usize] >= ratio * weakest;
                if keep {
                    prop_assert_eq!(fin[j], v as u32);
                } else {
                    replaced += 1;
                    prop_assert!(own_r.contains(&fin[j]), "refilled from the router's top-K");
                }
                if ratio <= 1.0 && own_r.contains(&(v as u32)) {
                    prop_assert_eq!(fin[j], v as u32, "own ids are kept at ratio <= 1");
                }
            }
        }
        prop_assert_eq!(out.counts.replaced_slots, replaced);
        prop_assert_eq!(out.counts.replayed_slots, judged);
        prop_assert_eq!(&out.weights, &router.weights_host(&lv, out.ids.view()).unwrap());
    }
}

#[test]
fn threshold_replay_through_the_replay_policy_counts_the_replace_rate_per_layer() {
    let c = cfg(8, 2);
    let z = logits(6, 8, 9);
    let own = own_ids(&c, &z);
    // Record the router's complement at layer 3 (mostly weak ids) and its own ids at layer 5.
    let mut trace = Trace::new(TraceHeader::for_config(&c, &[3, 5]).unwrap());
    let mut weak = Array2::<u32>::zeros((6, 2));
    for r in 0..6 {
        let w: Vec<u32> = (0..8u32).filter(|x| !own.row(r).to_vec().contains(x)).take(2).collect();
        weak.row_mut(r).assign(&ndarray::ArrayView1::from(&w[..]));
    }
    trace.append(SeqId(0), LayerId(3), 0, weak.view()).unwrap();
    trace.append(SeqId(0), LayerId(5), 0, own.view()).unwrap();
    let policy = Replay::new(trace, &[3, 5])
        .unwrap()
        .with_threshold(ReplayThreshold::new(1.0).unwrap());
    let router = Replayed::new(ReferenceRouter::new(c.clone()), &policy);
    let layout = BatchLayout::single(SeqId(0), 6);
    let lv = LogitsRef::F32(z.view());
    for layer in [3, 5] {
        let site = CallSite::layer(layer).with_layout(&layout);
        let (ids, _) = router.route_host_at(&lv, &site).unwrap();
        assert_eq!(
            ids, own,
            "ratio 1: every id weaker than the weakest own one is replaced by the router's"
        );
    }
    let counts = policy.counts();
    let l3 = counts.per_layer.iter().find(|l| l.layer == 3).unwrap();
    let l5 = counts.per_layer.iter().find(|l| l.layer == 5).unwrap();
    assert_eq!((l3.replaced_slots, l3.replayed_slots), (12, 12));
    assert_eq!(l3.replace_rate(), 1.0);
    assert_eq!((l5.replaced_slots, l5.replayed_slots), (0, 12));
    assert_eq!(counts.replace_rate(), 0.5);
    // Device-style routing without host logits cannot see the scores: a clear error.
    let site = CallSite::layer(3).with_layout(&layout);
    let e = router.route(&lv, &site).unwrap_err();
    assert!(matches!(e, RouteError::Unsupported { .. }), "{e:?}");
}

// ---------------------------------------------------------------- slot sentinels in traces

#[test]
fn a_trace_with_slot_sentinels_round_trips_through_format_2_1_and_replays_per_slot() {
    let d = Dir::new("slots");
    let c = cfg(16, 3);
    let h = TraceHeader::for_config(&c, &[0])
        .unwrap()
        .with_slot_sentinels(true)
        .unwrap();
    let mut t = Trace::new(h);
    let rows = array![[1u32, MISSING_ID, 2], [MISSING_ID, MISSING_ID, MISSING_ID], [4, 5, 6]];
    t.append(SeqId(0), LayerId(0), 0, rows.view()).unwrap();
    let p = d.path("slots.mrt");
    t.write_file(&p, WriterOptions::default()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[8..12], &[2, 0, 1, 0], "version 2.1");
    assert_eq!(bytes[16 + 16] & 2, 2, "flag bit 1: slot sentinels");
    let f = TraceFile::open(&p).unwrap();
    let back = f.to_trace().unwrap();
    assert_eq!(back.row(SeqId(0), LayerId(0), 0), Some(vec![1, MISSING_ID, 2]));
    assert_eq!(back.row(SeqId(0), LayerId(0), 1), None, "a missing row stays missing");
    // Replay: the partial row fills slot 1 from the router, the missing row falls back.
    let z = logits(3, 16, 4);
    let own = own_ids(&c, &z);
    let policy = Replay::new(f, &[0]).unwrap().with_missing(MissingRoutes::Fallback);
    let router = Replayed::new(ReferenceRouter::new(c.clone()), &policy);
    let layout = BatchLayout::single(SeqId(0), 3);
    let (ids, _) = router
        .route_host_at(&LogitsRef::F32(z.view()), &CallSite::layer(0).with_layout(&layout))
        .unwrap();
    let first_free = own.row(0).iter().copied().find(|x| *x != 1 && *x != 2).unwrap();
    assert_eq!(ids.row(0).to_vec(), vec![1, first_free, 2]);
    assert_eq!(ids.row(1), own.row(1));
    assert_eq!(ids.row(2).to_vec(), vec![4, 5, 6]);
    let counts = policy.counts();
    assert_eq!(counts.sentinel_slots(), 1);
    assert_eq!(counts.per_layer[0].fallbacks, 1);
    // Without the flag a partly missing row is still refused.
    let mut plain = Trace::new(TraceHeader::for_config(&c, &[0]).unwrap());
    assert!(plain.append(SeqId(0), LayerId(0), 0, rows.view()).is_err());
}

#[test]
fn slot_sentinels_need_an_id_width_whose_maximum_is_not_an_expert() {
    let h = TraceHeader::new(256, 8, &[0]).unwrap();
    assert!(
        h.clone().with_slot_sentinels(true).is_err(),
        "E = 256 in one byte: 0xFF is expert 255"
    );
    let h = h.with_id_width(moe_router::trace::IdWidth::U16).unwrap();
    assert!(h.with_slot_sentinels(true).is_ok());
    assert!(
        TraceHeader::new(255, 8, &[0])
            .unwrap()
            .with_slot_sentinels(true)
            .is_ok()
    );
}

// ---------------------------------------------------------------- layer kinds

#[test]
fn layer_kinds_are_a_2_1_header_record_and_plain_traces_stay_format_2_0() {
    let d = Dir::new("kinds");
    let h = TraceHeader::new(8, 2, &[0, 1, 2, 3, 9])
        .unwrap()
        .with_layers_of_kind(&[0, 1], LayerKind::Hash)
        .unwrap()
        .with_layer_kind(9, LayerKind::Mtp)
        .unwrap();
    let mut t = Trace::new(h.clone());
    t.append(SeqId(0), LayerId(9), 0, array![[1u32, 2]].view()).unwrap();
    let p = d.path("k.mrt");
    t.write_file(&p, WriterOptions::default()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[8..12], &[2, 0, 1, 0], "version 2.1");
    // Body: 36 fixed + 4·5 layers + 4 + producer (empty), then the record: tag 1, u32 length 5, codes.
    let rec = 16 + 36 + 20 + 4;
    assert_eq!(&bytes[rec..rec + 10], &[1, 5, 0, 0, 0, 2, 2, 0, 0, 1]);
    let back = TraceFile::open(&p).unwrap();
    assert_eq!(back.header(), &h);
    assert_eq!(back.header().layers_of_kind(LayerKind::Mtp), vec![9]);
    assert_eq!(back.header().layer_kind(LayerId(0)), Some(LayerKind::Hash));
    // No kinds: the bytes a 2.0 writer wrote.
    let p2 = d.path("plain.mrt");
    let mut t2 = Trace::new(TraceHeader::new(8, 2, &[0, 1]).unwrap());
    t2.append(SeqId(0), LayerId(0), 0, array![[1u32, 2]].view()).unwrap();
    t2.write_file(&p2, WriterOptions::default()).unwrap();
    assert_eq!(&std::fs::read(&p2).unwrap()[8..12], &[2, 0, 0, 0]);
    // Committed 1.0 fixtures still open.
    let fx = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/format-1.0-raw.mrt");
    assert!(
        TraceFile::open(fx)
            .unwrap()
            .header()
            .layer_kinds()
            .iter()
            .all(|k| *k == LayerKind::Decoder)
    );
}

#[test]
fn an_mtp_layer_numbered_below_a_decoder_layer_is_refused_as_an_alias() {
    let h = TraceHeader::new(8, 2, &[1, 2, 3]).unwrap();
    let e = h.clone().with_layer_kind(1, LayerKind::Mtp).unwrap_err();
    assert!(e.to_string().contains("MTP layer 1 comes before"), "{e}");
    assert!(h.clone().with_layer_kind(3, LayerKind::Mtp).is_ok());
    assert!(
        h.with_layer_kind(7, LayerKind::Mtp).is_err(),
        "a layer outside the map has no kind"
    );
}

// ---------------------------------------------------------------- hash-routed layers

#[test]
fn hash_layers_take_ids_from_the_table_weights_from_the_live_scores_and_are_recorded_and_replayed() {
    let c = cfg(8, 2);
    let table = HashTable::new(array![[0u32, 1], [2, 3], [4, 5], [6, 7], [7, 0]], 8).unwrap();
    assert!(HashTable::new(array![[0u32, 0]], 8).is_err());
    assert!(HashTable::from_i64(array![[0i64, 9]].view(), 8).is_err());
    let tokens: Vec<u64> = vec![4, 1, 3, 0];
    let z = logits(4, 8, 5);
    let lv = LogitsRef::F32(z.view());
    let plain = ReferenceRouter::new(c.clone());
    let (ids, w) = table.route_host(&plain, &lv, &tokens, &CallSite::layer(0)).unwrap();
    assert_eq!(ids, array![[7u32, 0], [2, 3], [6, 7], [0, 1]]);
    assert_eq!(w, plain.weights_host(&lv, ids.view()).unwrap());
    // Recorded through the decorator, the header marking layer 0 as a hash layer.
    let header = TraceHeader::for_config(&c, &[0, 1])
        .unwrap()
        .with_layer_kind(0, LayerKind::Hash)
        .unwrap();
    let rec = HashLayers::new(Record::in_memory(header)).with_table(0, table.clone());
    rec.set_tokens(SeqId(3), tokens.clone());
    let layout = BatchLayout::single(SeqId(3), 4);
    let router = Replayed::new(ReferenceRouter::new(c.clone()), &rec);
    let (rids, rw) = router
        .route_host_at(&lv, &CallSite::layer(0).with_layout(&layout))
        .unwrap();
    assert_eq!((rids.clone(), rw), (ids.clone(), w.clone()));
    router
        .route_host_at(&lv, &CallSite::layer(1).with_layout(&layout))
        .unwrap();
    let trace = rec.inner().snapshot().unwrap();
    assert_eq!(trace.row(SeqId(3), LayerId(0), 0), Some(vec![7, 0]));
    assert_eq!(trace.header().layers_of_kind(LayerKind::Hash), vec![0]);
    // Replayed from the trace without tokens: the recorded ids come back.
    let rep = HashLayers::new(Replay::new(trace, &[0, 1]).unwrap()).with_table(0, table);
    let router = Replayed::new(ReferenceRouter::new(c), &rep);
    let (pids, _) = router
        .route_host_at(&lv, &CallSite::layer(0).with_layout(&layout))
        .unwrap();
    assert_eq!(pids, ids);
    // A fresh sequence without token ids is a clear error.
    let other = BatchLayout::single(SeqId(9), 4);
    let e = router
        .route_host_at(&lv, &CallSite::layer(0).with_layout(&other))
        .unwrap_err();
    assert!(
        e.to_string().contains("no recorded route") || e.to_string().contains("no token id"),
        "{e}"
    );
}

// ---------------------------------------------------------------- prefix offsets

#[test]
fn sglang_json_applies_routed_experts_start_len_to_the_imported_positions() {
    // T = 3, L = 1, K = 2: rows [1, 2], [3, 4], [5, 6] as SGLang base64.
    let d = DenseRoutes::new(Array3::from_shape_fn((3, 1, 2), |(t, _, j)| (t * 2 + j + 1) as u32));
    let t0 = d
        .to_trace(Format::Sglang, &ImportOptions::default().with_num_experts(8))
        .unwrap();
    let b64 = String::from_utf8(interop::export(Format::Sglang, &t0, &ExportOptions::default()).unwrap()).unwrap();
    let json =
        format!(r#"{{"text": "hi", "meta_info": {{"routed_experts": "{b64}", "routed_experts_start_len": 7}}}}"#);
    let opts = ImportOptions::default().with_shape(1, 2).with_num_experts(8);
    assert_eq!(Format::sniff(json.as_bytes()), Some(Format::Sglang));
    let t = interop::import(Format::Sglang, json.as_bytes(), &opts).unwrap();
    assert_eq!(t.row(SeqId(0), LayerId(0), 7), Some(vec![1, 2]));
    assert_eq!(t.row(SeqId(0), LayerId(0), 9), Some(vec![5, 6]));
    assert_eq!(t.row(SeqId(0), LayerId(0), 0), None);
    // The base64 text with an explicit start lands at the same positions; a different start
    // than the JSON's is a conflict.
    let t2 = interop::import(Format::Sglang, b64.as_bytes(), &opts.clone().with_start(7)).unwrap();
    assert_eq!(t2.row(SeqId(0), LayerId(0), 8), Some(vec![3, 4]));
    assert!(interop::import(Format::Sglang, json.as_bytes(), &opts.with_start(6)).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Routes that begin after a cached prefix of P tokens: imported with start P, replayed
    /// strictly into any micro-batching of the whole sequence with route start P, the rows
    /// before P are the router's own (counted as uncovered, not errors), the rows from P are the
    /// recorded ids.
    #[test]
    fn replay_fills_only_the_rows_after_the_route_start(
        n in 2usize..40, p_frac in 0.0f64..1.0, mb in 1usize..16, seed in any::<u64>(),
    ) {
        let e = 8;
        let k = 2;
        let p = ((n as f64) * p_frac) as usize;
        let c = cfg(e, k);
        let z = logits(n, e, seed);
        let own = own_ids(&c, &z);
        let recorded = Array3::from_shape_fn((n - p, 1, k), |(t, _, j)| ((t + (seed % 8) as usize + j * 3) % e) as u32);
        let d = DenseRoutes::new(recorded.clone());
        let trace = d
            .to_trace(Format::Npy, &ImportOptions::default().with_num_experts(e).with_start(p as u64))
            .unwrap();
        let policy = Replay::new(trace, &[0]).unwrap();
        let router = Replayed::new(ReferenceRouter::new(c.clone()), &policy);
        let layout = BatchLayout::single(SeqId(0), n).with_route_start(SeqId(0), p as u64);
        let mut got = Array2::<u32>::zeros((n, k));
        let mut row = 0;
        for m in layout.micro_batches(mb) {
            prop_assert_eq!(m.route_start(SeqId(0)), p as u64);
            let zz = z.slice(ndarray::s![row..row + m.rows(), ..]).to_owned();
            let (ids, _) = router
                .route_host_at(&LogitsRef::F32(zz.view()), &CallSite::layer(0).with_layout(&m))
                .unwrap();
            got.slice_mut(ndarray::s![row..row + m.rows(), ..]).assign(&ids);
            row += m.rows();
        }
        for t in 0..n {
            if t < p {
                prop_assert_eq!(got.row(t), own.row(t));
            } else {
                prop_assert_eq!(got.row(t).to_vec(), recorded.slice(ndarray::s![t - p, 0, ..]).to_vec());
            }
        }
        let cnt = policy.counts();
        prop_assert_eq!(cnt.per_layer[0].uncovered_rows, p as u64);
        prop_assert_eq!(cnt.per_layer[0].fallbacks, 0);
        prop_assert_eq!(cnt.per_layer[0].replayed_rows, (n - p) as u64);
    }
}

#[test]
fn without_the_route_start_a_prefix_row_is_a_missing_route_in_strict_mode() {
    let c = cfg(8, 2);
    let d = DenseRoutes::new(Array3::from_shape_fn((3, 1, 2), |(t, _, j)| (t + j * 4) as u32));
    let trace = d
        .to_trace(Format::Npy, &ImportOptions::default().with_num_experts(8).with_start(2))
        .unwrap();
    let policy = Replay::new(trace, &[0]).unwrap();
    let router = Replayed::new(ReferenceRouter::new(c), &policy);
    let z = logits(5, 8, 3);
    let layout = BatchLayout::single(SeqId(0), 5);
    let e = router
        .route_host_at(&LogitsRef::F32(z.view()), &CallSite::layer(0).with_layout(&layout))
        .unwrap_err();
    assert!(e.to_string().contains("position 0"), "{e}");
}

// ---------------------------------------------------------------- validate --explain

fn clean_trace(layers: &[u32], seqs: u64, n: usize) -> Trace {
    let mut t = Trace::new(TraceHeader::new(16, 2, layers).unwrap());
    for s in 0..seqs {
        for &l in layers {
            let a = Array2::from_shape_fn((n, 2), |(p, j)| {
                let base = (p * 7 + l as usize * 3 + s as usize * 5) % 16;
                ((base + j * 5) % 16) as u32
            });
            t.append(SeqId(s), LayerId(l), 0, a.view()).unwrap();
        }
    }
    t
}

fn classes(f: &[explain::Finding]) -> Vec<FindingClass> {
    let mut v: Vec<_> = f.iter().map(|x| x.class).collect();
    v.dedup();
    v
}

#[test]
fn explain_finds_nothing_in_a_clean_trace_against_its_model() {
    let t = clean_trace(&[1, 2, 3], 2, 40);
    let model = ModelLayers {
        num_hidden_layers: Some(4),
        moe_layers: vec![1, 2, 3],
        mtp_layers: vec![],
    };
    let other = t.clone();
    let f = explain::explain(
        &t,
        &Against {
            model: Some(model),
            other: Some(&other),
            ..Against::default()
        },
    );
    assert!(f.is_empty(), "{f:?}");
}

#[test]
fn explain_names_orphaned_layers_with_their_side() {
    let t = clean_trace(&[0, 1, 2], 1, 20);
    let model = ModelLayers {
        num_hidden_layers: Some(4),
        moe_layers: vec![1, 2, 3],
        mtp_layers: vec![],
    };
    let f = explain::explain(
        &t,
        &Against {
            model: Some(model),
            ..Against::default()
        },
    );
    assert_eq!(classes(&f), vec![FindingClass::OrphanedLayer]);
    assert!(
        f.iter()
            .any(|x| x.evidence["layer"] == 0 && x.evidence["side"] == "trace"),
        "{f:?}"
    );
    assert!(
        f.iter()
            .any(|x| x.evidence["layer"] == 3 && x.evidence["side"] == "model"),
        "{f:?}"
    );
}

#[test]
fn explain_names_mtp_rows_that_would_land_on_a_decoder_layer() {
    let mut t = clean_trace(&[1, 2, 3, 5], 1, 20);
    t.set_header(t.header().clone().with_layer_kind(5, LayerKind::Mtp).unwrap())
        .unwrap();
    // The model has 8 decoder layers: MTP layer 5 is decoder layer 5.
    let model = ModelLayers {
        num_hidden_layers: Some(8),
        moe_layers: vec![1, 2, 3, 4, 5, 6, 7],
        mtp_layers: vec![8],
    };
    let f = explain::explain(
        &t,
        &Against {
            model: Some(model),
            ..Against::default()
        },
    );
    let c: Vec<_> = f.iter().filter(|x| x.class == FindingClass::MtpCollision).collect();
    assert_eq!(c.len(), 1, "{f:?}");
    assert_eq!(c[0].evidence["layer"], 5);
    // Against a second trace that has layer 5 as a decoder layer.
    let other = clean_trace(&[1, 2, 3, 5], 1, 20);
    let f = explain::explain(
        &t,
        &Against {
            other: Some(&other),
            ..Against::default()
        },
    );
    assert!(
        f.iter()
            .any(|x| x.class == FindingClass::MtpCollision && x.evidence["layer"] == 5),
        "{f:?}"
    );
    let cmp = moe_router::metrics::compare(&t, &other).unwrap();
    assert_eq!(cmp.mtp_collisions.len(), 1);
    assert!(
        cmp.per_layer.iter().all(|l| l.layer != 5),
        "a colliding layer is not compared"
    );
}

#[test]
fn explain_finds_a_constant_row_shift_and_the_shift_that_aligns_the_traces() {
    let a = clean_trace(&[0, 1], 2, 60);
    // B: every row moved one position later (left padding by one).
    let mut b = Trace::new(a.header().clone());
    for s in 0..2u64 {
        for l in [0u32, 1] {
            let mut rows = Array2::from_elem((60, 2), MISSING_ID);
            a.read_rows(SeqId(s), LayerId(l), 0, rows.view_mut()).unwrap();
            b.append(SeqId(s), LayerId(l), 1, rows.view()).unwrap();
        }
    }
    let f = explain::explain(
        &a,
        &Against {
            other: Some(&b),
            ..Against::default()
        },
    );
    let s: Vec<_> = f.iter().filter(|x| x.class == FindingClass::RowShift).collect();
    assert_eq!(s.len(), 1, "{f:?}");
    assert_eq!(s[0].evidence["shift"], 1);
    assert_eq!(s[0].evidence["agreement_at_shift"], 1.0);
}

#[test]
fn explain_finds_constant_garbage_prompt_rows_and_a_weight_version_mismatch() {
    let header = TraceHeader::new(16, 2, &[0, 1]).unwrap().with_weight_version(Some(3));
    let mut bad = Trace::new(header.clone());
    for l in [0u32, 1] {
        // Positions 0..32: the placeholder row [0, 1] (a disaggregated prefill's prompt rows).
        let garbage = Array2::from_shape_fn((32, 2), |(_, j)| j as u32);
        bad.append(SeqId(0), LayerId(l), 0, garbage.view()).unwrap();
        let real = Array2::from_shape_fn((48, 2), |(p, j)| (((p * 7 + l as usize * 3) % 16 + j * 5) % 16) as u32);
        bad.append(SeqId(0), LayerId(l), 32, real.view()).unwrap();
    }
    let f = explain::explain(
        &bad,
        &Against {
            weight_version: Some(4),
            ..Against::default()
        },
    );
    assert_eq!(
        classes(&f),
        vec![FindingClass::GarbageRows, FindingClass::WeightVersion],
        "{f:?}"
    );
    let g = &f[0];
    assert_eq!(
        (g.evidence["start"].clone(), g.evidence["end"].clone()),
        (0.into(), 32.into())
    );
    assert_eq!(g.evidence["layers"], serde_json::json!([0, 1]));
    assert_eq!(f[1].evidence["trace"], 3);
    let mut t = clean_trace(&[0, 1], 1, 80);
    t.set_header(t.header().clone().with_weight_version(Some(4))).unwrap();
    assert!(
        explain::explain(
            &t,
            &Against {
                weight_version: Some(4),
                ..Against::default()
            }
        )
        .is_empty()
    );
}

#[test]
fn validate_explain_reports_each_class_by_name_and_exits_3() {
    let d = Dir::new("explain-cli");
    let a = clean_trace(&[1, 2, 3, 5], 1, 60);
    let mut mtp = a.clone();
    mtp.set_header(
        mtp.header()
            .clone()
            .with_layer_kind(5, LayerKind::Mtp)
            .unwrap()
            .with_weight_version(Some(2)),
    )
    .unwrap();
    let pa = d.path("a.mrt");
    mtp.write_file(&pa, WriterOptions::default()).unwrap();
    let cfgp = d.path("config.json");
    std::fs::write(
        &cfgp,
        r#"{"model_type": "deepseek_v3", "num_hidden_layers": 8, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1}"#,
    )
    .unwrap();
    let (code, j) = run_json(&[
        "validate",
        &pa,
        "--explain",
        "--layers-from",
        &cfgp,
        "--weight-version",
        "3",
        "--json",
    ]);
    assert_eq!(code, 3, "{j}");
    let cl: Vec<&str> = j["explain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["class"].as_str().unwrap())
        .collect();
    for want in ["orphaned_layer", "mtp_collision", "weight_version"] {
        assert!(cl.contains(&want), "{want} not in {cl:?}");
    }
    assert!(
        j["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "mtp_collision")
    );
    // A shifted copy against it: row_shift.
    let mut b = Trace::new(a.header().clone());
    for l in [1u32, 2, 3, 5] {
        let mut rows = Array2::from_elem((60, 2), MISSING_ID);
        a.read_rows(SeqId(0), LayerId(l), 0, rows.view_mut()).unwrap();
        b.append(SeqId(0), LayerId(l), 2, rows.view()).unwrap();
    }
    let pb = d.path("b.mrt");
    b.write_file(&pb, WriterOptions::default()).unwrap();
    let pc = d.path("c.mrt");
    a.write_file(&pc, WriterOptions::default()).unwrap();
    let (code, j) = run_json(&["validate", &pc, "--explain", "--against", &pb, "--json"]);
    assert_eq!(code, 3, "{j}");
    let shift: Vec<&Value> = j["explain"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["class"] == "row_shift")
        .collect();
    assert_eq!(shift.len(), 1, "{j}");
    assert_eq!(shift[0]["evidence"]["shift"], 2);
    // The clean trace against itself: valid.
    let (code, j) = run_json(&["validate", &pc, "--explain", "--against", &pc, "--json"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["explain"], serde_json::json!([]));
    // diff lists the MTP collision and leaves the layer out of the comparison.
    let (code, j) = run_json(&["diff", &pa, &pc, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(j["mtp_collisions"][0]["layer"], 5);
    assert_eq!(j["mtp_collisions"][0]["kind_a"], "mtp");
}
