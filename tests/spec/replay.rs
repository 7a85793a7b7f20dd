//! Record and replay policies: keyed replay across batch layouts, recompute, missing routes
//! (strict / fallback), padding, validation, layer maps, count checks.

use crate::trace::TempDir;
use moe_router::policy::{MissingRoutes, Record, RecordOutput, Replay, ReplayFromFile};
use moe_router::trace::synthetic::SyntheticRoutes;
use moe_router::trace::{MISSING_ID, RowConvention, Trace, TraceHeader, WriterOptions};
use moe_router::{
    BatchLayout, CallSite, LayerId, LogitsRef, Pass, ReferenceRouter, ReplayError, ReplayPolicy, Replayed, RouteError,
    Router, RouterConfig, Segment, SeqId,
};
use ndarray::{Array2, array, s};
use proptest::prelude::*;

const LAYERS: [u32; 3] = [1, 2, 4];

fn cfg() -> RouterConfig {
    RouterConfig::builder(16, 4).build().unwrap()
}

/// Per (sequence, layer) logits of a synthetic generator.
fn routes(seqs: u64, tokens: usize) -> SyntheticRoutes {
    let mut g = SyntheticRoutes::new(cfg(), LAYERS.to_vec(), seqs, tokens);
    g.rho = 0.5;
    g
}

/// Batch logits for `layout` at layer index `li` (padding rows get arbitrary logits).
fn batch_logits(g: &SyntheticRoutes, layout: &BatchLayout, li: usize) -> Array2<f32> {
    let e = g.config.num_experts();
    let mut out = Array2::<f32>::zeros((layout.rows(), e));
    let mut row = 0;
    for seg in layout.segments() {
        match *seg {
            Segment::Tokens { seq, start, len } => {
                let l = g.logits(seq.0, li);
                out.slice_mut(s![row..row + len, ..])
                    .assign(&l.slice(s![start as usize..start as usize + len, ..]));
                row += len;
            }
            Segment::Padding { len } => {
                for r in row..row + len {
                    out.row_mut(r)
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, x)| *x = (j * r % 5) as f32);
                }
                row += len;
            }
        }
    }
    out
}

/// Records every sequence with a per-sequence layout through `Replayed<ReferenceRouter, Record>`.
fn record(g: &SyntheticRoutes, lens: &[(SeqId, usize)]) -> Trace {
    let rec = Record::in_memory(TraceHeader::for_config(&g.config, &LAYERS).unwrap());
    let router = Replayed::new(ReferenceRouter::new(g.config.clone()), rec.clone());
    for &(seq, len) in lens {
        let layout = BatchLayout::single(seq, len);
        for (li, &layer) in LAYERS.iter().enumerate() {
            let l = batch_logits(g, &layout, li);
            router
                .route(&LogitsRef::F32(l.view()), &CallSite::layer(layer).with_layout(&layout))
                .unwrap();
        }
    }
    match rec.finish().unwrap() {
        RecordOutput::Memory(t) => t,
        RecordOutput::File(_) => unreachable!(),
    }
}

fn layouts(lens: &[(SeqId, usize)]) -> Vec<(String, Vec<BatchLayout>)> {
    let max = lens.iter().map(|l| l.1).max().unwrap_or(1);
    let packed = BatchLayout::packed(lens).unwrap();
    let even: Vec<(SeqId, usize)> = lens.iter().map(|&(s, l)| (s, l - l % 4)).collect();
    vec![
        ("packed".into(), vec![packed.clone()]),
        (
            "right_padded".into(),
            vec![BatchLayout::right_padded(lens, max + 3).unwrap()],
        ),
        ("micro_batches".into(), packed.micro_batches(7)),
        (
            "zigzag_cp2".into(),
            (0..2).map(|r| BatchLayout::zigzag_rank(&even, 2, r).unwrap()).collect(),
        ),
    ]
}

fn replay_matches<P: ReplayPolicy>(
    g: &SyntheticRoutes,
    policy: P,
    lens: &[(SeqId, usize)],
) -> Result<(), TestCaseError> {
    let plain = ReferenceRouter::new(g.config.clone());
    let router = Replayed::new(ReferenceRouter::new(g.config.clone()), policy);
    for (name, batches) in layouts(lens) {
        for layout in &batches {
            for (li, &layer) in LAYERS.iter().enumerate() {
                let l = batch_logits(g, layout, li);
                let lr = LogitsRef::F32(l.view());
                let site = CallSite::layer(layer).with_layout(layout);
                let got = router.route(&lr, &site).unwrap();
                let want = plain.route(&lr, &site).unwrap();
                // Same logits as at record time: ids and weights reproduce exactly (padding rows
                // are routed by the router, so they match too).
                prop_assert_eq!(&got.ids, &want.ids, "{}", name);
                prop_assert_eq!(&got.weights, &want.weights, "{}", name);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_recorded_trace_replays_exact_ids_and_weights_in_any_batch_layout(
        lens in prop::collection::vec(4usize..24, 1..4),
        from_file in any::<bool>(),
    ) {
        let lens: Vec<(SeqId, usize)> = lens.into_iter().enumerate().map(|(i, l)| (SeqId(10 + i as u64), l)).collect();
        let g = routes(14, 24);
        let trace = record(&g, &lens);
        if from_file {
            let d = TempDir::new("replay");
            let p = d.file("r.mrt");
            trace.write_file(&p, WriterOptions::zstd(3).with_chunk_id_bytes(64)).unwrap();
            replay_matches(&g, ReplayFromFile::open(&p, &LAYERS).unwrap(), &lens)?;
        } else {
            replay_matches(&g, Replay::new(trace, &LAYERS).unwrap(), &lens)?;
        }
    }
}

#[test]
fn replayed_ids_are_forced_even_when_the_live_logits_differ_and_weights_come_from_live_logits() {
    let g = routes(1, 8);
    let trace = record(&g, &[(SeqId(0), 8)]);
    let policy = Replay::new(trace.clone(), &LAYERS).unwrap();
    let router = Replayed::new(ReferenceRouter::new(cfg()), policy);
    let layout = BatchLayout::single(SeqId(0), 8);
    let live = batch_logits(&g, &layout, 0).mapv(|x| -x); // training disagrees with inference
    let out = router
        .route(&LogitsRef::F32(live.view()), &CallSite::layer(1).with_layout(&layout))
        .unwrap();
    let mut want = Array2::zeros((8, 4));
    trace.read_rows(SeqId(0), LayerId(1), 0, want.view_mut()).unwrap();
    assert_eq!(out.ids, want);
    let w = ReferenceRouter::new(cfg())
        .weights_host(&LogitsRef::F32(live.view()), want.view())
        .unwrap();
    assert_eq!(out.weights, w);
}

#[test]
fn recompute_asks_for_the_same_key_again_and_gets_the_same_ids() {
    let g = routes(2, 16);
    let trace = record(&g, &[(SeqId(0), 16), (SeqId(1), 16)]);
    let policy = Replay::new(trace, &LAYERS).unwrap().expect_each_key(2);
    let router = Replayed::new(ReferenceRouter::new(cfg()), &policy);
    let layout = BatchLayout::packed(&[(SeqId(1), 16), (SeqId(0), 16)]).unwrap();
    let l = batch_logits(&g, &layout, 2);
    let site = CallSite::layer(4).with_layout(&layout);
    let fwd = router.route(&LogitsRef::F32(l.view()), &site).unwrap();
    let noise = l.mapv(|x| x * 0.5 + 0.01);
    let rec = router
        .route(&LogitsRef::F32(noise.view()), &site.with_pass(Pass::Recompute))
        .unwrap();
    assert_eq!(fwd.ids, rec.ids);
    policy.finish().unwrap();
}

#[test]
fn expect_each_key_reports_keys_replayed_more_or_fewer_times() {
    let g = routes(1, 8);
    let trace = record(&g, &[(SeqId(0), 8)]);
    let policy = Replay::new(trace, &LAYERS).unwrap().expect_each_key(2);
    let router = Replayed::new(ReferenceRouter::new(cfg()), &policy);
    let a = BatchLayout::single(SeqId(0), 8);
    let b = BatchLayout::new(vec![Segment::Tokens {
        seq: SeqId(0),
        start: 2,
        len: 4,
    }])
    .unwrap();
    let la = batch_logits(&g, &a, 0);
    let lb = batch_logits(&g, &b, 0);
    router
        .route(&LogitsRef::F32(la.view()), &CallSite::layer(1).with_layout(&a))
        .unwrap();
    router
        .route(&LogitsRef::F32(la.view()), &CallSite::layer(1).with_layout(&a))
        .unwrap();
    router
        .route(&LogitsRef::F32(lb.view()), &CallSite::layer(1).with_layout(&b))
        .unwrap(); // once only
    let e = policy.finish().unwrap_err();
    assert!(
        matches!(&e, ReplayError::CountMismatch(m) if m.contains("1 key(s)") && m.contains("4 rows")),
        "{e}"
    );
    // finish() cleared the counts: a fresh step starts from zero.
    let s = policy.finish().unwrap();
    assert_eq!((s.keys, s.calls), (0, 0));
}

/// Routes `layout` at every layer, forward then recompute, through `router`.
fn forward_and_recompute<P: ReplayPolicy>(
    router: &Replayed<ReferenceRouter, P>,
    g: &SyntheticRoutes,
    layout: &BatchLayout,
) {
    for (li, &layer) in LAYERS.iter().enumerate() {
        let l = batch_logits(g, layout, li);
        let site = CallSite::layer(layer).with_layout(layout);
        router.route(&LogitsRef::F32(l.view()), &site).unwrap();
        router
            .route(&LogitsRef::F32(l.view()), &site.with_pass(Pass::Recompute))
            .unwrap();
    }
}

#[test]
fn padding_only_micro_batches_are_not_replay_keys_and_pass_the_forward_plus_recompute_count() {
    let g = routes(1, 8);
    let trace = record(&g, &[(SeqId(0), 8)]);
    let policy = Replay::new(trace, &LAYERS).unwrap().expect_each_key(2);
    let router = Replayed::new(ReferenceRouter::new(cfg()), &policy);
    let tokens = BatchLayout::single(SeqId(0), 8);
    let padding = BatchLayout::new(vec![Segment::Padding { len: 8 }]).unwrap();
    forward_and_recompute(&router, &g, &tokens);
    // Two micro-batches of padding only (a padded tail of a step), each forward + recompute:
    // their rows carry no route, so they are no key (they used to share one key, counted 4 times).
    forward_and_recompute(&router, &g, &padding);
    forward_and_recompute(&router, &g, &padding);
    let s = policy.finish().unwrap();
    assert_eq!(
        s.keys,
        LAYERS.len() as u64,
        "only the token layout is a key, once per layer"
    );
    assert_eq!(s.calls, 6 * LAYERS.len() as u64, "every call is answered and counted");
    assert!(s.layers_never_replayed.is_empty());
    // The check still applies to token layouts next to padding-only ones.
    forward_and_recompute(&router, &g, &padding);
    let l = batch_logits(&g, &tokens, 0);
    router
        .route(&LogitsRef::F32(l.view()), &CallSite::layer(1).with_layout(&tokens))
        .unwrap();
    let e = policy.finish().unwrap_err();
    assert!(
        matches!(&e, ReplayError::CountMismatch(m) if m.starts_with("1 key(s)") && m.contains("8 rows")),
        "{e}"
    );
}

#[test]
fn an_empty_context_parallel_rank_is_not_a_replay_key() {
    let g = routes(2, 8);
    let trace = record(&g, &[(SeqId(0), 8), (SeqId(1), 8)]);
    let policy = Replay::new(trace, &LAYERS).unwrap().expect_each_key(2);
    let router = Replayed::new(ReferenceRouter::new(cfg()), &policy);
    // Two sequences of 8 tokens split zigzag over 8 ranks: shorter than 2·cp, each is cut into
    // 15 empty chunks and a last one holding all 8 tokens, so rank 0 gets every token and ranks
    // 1..=7 none. Every rank routes its batch (empty or not), forward + recompute, in one step.
    let lens = [(SeqId(0), 8), (SeqId(1), 8)];
    let ranks: Vec<BatchLayout> = (0..8).map(|r| BatchLayout::zigzag_rank(&lens, 8, r).unwrap()).collect();
    let empty = ranks.iter().filter(|l| l.rows() == 0).count();
    assert!(
        empty >= 2,
        "the split leaves at least two ranks without tokens ({empty})"
    );
    for layout in &ranks {
        forward_and_recompute(&router, &g, layout);
    }
    let s = policy.finish().unwrap();
    assert_eq!(s.keys, (8 - empty as u64) * LAYERS.len() as u64);
    assert_eq!(s.calls, 2 * 8 * LAYERS.len() as u64);
}

#[test]
fn the_record_policy_replays_its_forward_ids_on_recompute() {
    let rec = Record::in_memory(TraceHeader::for_config(&cfg(), &LAYERS).unwrap());
    let router = Replayed::new(ReferenceRouter::new(cfg()), rec.clone());
    let g = routes(1, 6);
    let layout = BatchLayout::single(SeqId(0), 6);
    let l = batch_logits(&g, &layout, 0);
    let site = CallSite::layer(1).with_layout(&layout);
    let fwd = router.route(&LogitsRef::F32(l.view()), &site).unwrap();
    // Near-tie flips on recompute cannot change the experts: the recorded ids come back.
    let other = l.mapv(|x| -x);
    let r = router
        .route(&LogitsRef::F32(other.view()), &site.with_pass(Pass::Recompute))
        .unwrap();
    assert_eq!(fwd.ids, r.ids);
    assert_eq!(rec.stats().calls, 1, "recompute is not recorded again");
}

#[test]
fn strict_replay_of_a_missing_route_names_layer_sequence_and_position() {
    let g = routes(1, 8);
    let trace = record(&g, &[(SeqId(3), 8)]);
    let router = Replayed::new(ReferenceRouter::new(cfg()), Replay::new(trace, &LAYERS).unwrap());
    let layout = BatchLayout::single(SeqId(3), 10);
    let l = Array2::<f32>::zeros((10, 16));
    let e = router
        .route(&LogitsRef::F32(l.view()), &CallSite::layer(2).with_layout(&layout))
        .unwrap_err();
    assert_eq!(
        e,
        RouteError::Replay(ReplayError::MissingRoute {
            layer: 2,
            sequence: 3,
            position: 8
        })
    );
}

#[test]
fn under_tokens_minus_one_the_last_position_is_missing_never_expert_zero() {
    let h = TraceHeader::new(8, 2, &[0])
        .unwrap()
        .with_row_convention(RowConvention::TokensMinusOne);
    let mut t = Trace::new(h);
    // An engine returned tokens − 1 = 3 rows for a 4-token sequence.
    t.append(SeqId(0), LayerId(0), 0, array![[1u32, 2], [3, 4], [5, 6]].view())
        .unwrap();
    let c = RouterConfig::builder(8, 2).build().unwrap();
    let layout = BatchLayout::single(SeqId(0), 4);
    let l = Array2::from_shape_fn((4, 8), |(r, e)| ((r + 1) * (e + 3) % 7) as f32);
    let strict = Replayed::new(ReferenceRouter::new(c.clone()), Replay::new(t.clone(), &[0]).unwrap());
    let e = strict
        .route(&LogitsRef::F32(l.view()), &CallSite::layer(0).with_layout(&layout))
        .unwrap_err();
    assert_eq!(
        e,
        RouteError::Replay(ReplayError::MissingRoute {
            layer: 0,
            sequence: 0,
            position: 3
        })
    );
    let policy = Replay::new(t, &[0]).unwrap().fallback();
    let fb = Replayed::new(ReferenceRouter::new(c.clone()), &policy);
    let out = fb
        .route(&LogitsRef::F32(l.view()), &CallSite::layer(0).with_layout(&layout))
        .unwrap();
    let own = ReferenceRouter::new(c).route_host(&LogitsRef::F32(l.view())).unwrap().0;
    assert_eq!(out.ids.row(3), own.row(3));
    assert_eq!(out.ids.slice(s![..3, ..]), array![[1u32, 2], [3, 4], [5, 6]]);
    assert_eq!(policy.fallbacks(LayerId(0)), 1);
}

#[test]
fn fallback_routes_missing_rows_with_the_router_and_counts_them_per_layer_but_not_padding() {
    let g = routes(2, 12);
    let mut trace = record(&g, &[(SeqId(0), 8)]);
    // Mark position 5 of layer 4 missing in a second sequence-less way: a new sequence with holes.
    trace
        .append(
            SeqId(1),
            LayerId(4),
            0,
            array![[1u32, 2, 3, 4], [MISSING_ID, MISSING_ID, MISSING_ID, MISSING_ID]].view(),
        )
        .unwrap();
    let policy = Replay::new(trace, &LAYERS)
        .unwrap()
        .with_missing(MissingRoutes::Fallback);
    let router = Replayed::new(ReferenceRouter::new(cfg()), &policy);
    let layout = BatchLayout::new(vec![
        Segment::Tokens {
            seq: SeqId(0),
            start: 6,
            len: 4,
        }, // positions 8, 9 never recorded
        Segment::Padding { len: 3 },
        Segment::Tokens {
            seq: SeqId(1),
            start: 0,
            len: 3,
        }, // 1 stored missing, 2 not recorded
    ])
    .unwrap();
    for (li, &layer) in LAYERS.iter().enumerate() {
        let l = batch_logits(&g, &layout, li);
        router
            .route(&LogitsRef::F32(l.view()), &CallSite::layer(layer).with_layout(&layout))
            .unwrap();
    }
    let c = policy.counts();
    let per: Vec<(u32, u64, u64)> = c
        .per_layer
        .iter()
        .map(|x| (x.layer, x.fallbacks, x.replayed_rows))
        .collect();
    assert_eq!(per, vec![(1, 5, 2), (2, 5, 2), (4, 4, 3)]);
    assert_eq!(c.total_fallbacks, 14);
}

#[test]
fn a_layer_whose_rows_all_route_to_expert_zero_is_rejected() {
    let mut t = Trace::new(TraceHeader::new(8, 1, &[0, 1]).unwrap());
    t.append(SeqId(0), LayerId(0), 0, Array2::zeros((32, 1)).view())
        .unwrap();
    t.append(
        SeqId(0),
        LayerId(1),
        0,
        Array2::from_shape_fn((32, 1), |(r, _)| (r % 8) as u32).view(),
    )
    .unwrap();
    let e = Replay::new(t.clone(), &[0, 1]).unwrap_err();
    assert!(
        matches!(&e, ReplayError::InvalidRoute(m) if m.contains("layer 0") && m.contains("expert 0")),
        "{e}"
    );
    let d = TempDir::new("zero");
    t.write_file(d.file("z.mrt"), WriterOptions::default()).unwrap();
    assert!(matches!(
        ReplayFromFile::open(d.file("z.mrt"), &[0, 1]),
        Err(ReplayError::InvalidRoute(_))
    ));
    // With K ≥ 2 a row of zeros is a duplicate id: rejected when appended.
    let mut t2 = Trace::new(TraceHeader::new(8, 2, &[0]).unwrap());
    assert!(
        t2.append(SeqId(0), LayerId(0), 0, Array2::zeros((1, 2)).view())
            .is_err()
    );
}

#[test]
fn a_layer_map_mismatch_is_loud_and_a_non_moe_layer_is_unknown() {
    let g = routes(1, 4);
    let trace = record(&g, &[(SeqId(0), 4)]);
    // The model has an extra dense layer 3 turned MoE, or an MTP layer: loud, never shifted.
    let e = Replay::new(trace.clone(), &[1, 2, 3, 4]).unwrap_err();
    assert_eq!(
        e,
        ReplayError::LayerMapMismatch {
            model: vec![1, 2, 3, 4],
            trace: vec![1, 2, 4]
        }
    );
    let rec = Record::in_memory(trace.header().clone());
    assert!(matches!(
        rec.check_model_layers(&[0, 1, 2]),
        Err(ReplayError::LayerMapMismatch { .. })
    ));
    let router = Replayed::new(ReferenceRouter::new(cfg()), Replay::new(trace, &LAYERS).unwrap());
    let layout = BatchLayout::single(SeqId(0), 4);
    let l = Array2::<f32>::zeros((4, 16));
    let e = router
        .route(&LogitsRef::F32(l.view()), &CallSite::layer(3).with_layout(&layout))
        .unwrap_err();
    assert!(
        matches!(e, RouteError::Replay(ReplayError::UnknownLayer { layer: 3, .. })),
        "{e}"
    );
    // No layout: replay cannot address tokens.
    let e = router
        .route(&LogitsRef::F32(l.view()), &CallSite::layer(1))
        .unwrap_err();
    assert_eq!(e, RouteError::Replay(ReplayError::NoLayout { layer: 1 }));
}

#[test]
fn a_router_with_other_e_or_k_than_the_trace_is_an_error() {
    let g = routes(1, 4);
    let trace = record(&g, &[(SeqId(0), 4)]);
    let other = RouterConfig::builder(16, 2).build().unwrap();
    let router = Replayed::new(ReferenceRouter::new(other), Replay::new(trace, &LAYERS).unwrap());
    let layout = BatchLayout::single(SeqId(0), 4);
    let l = Array2::<f32>::zeros((4, 16));
    let e = router
        .route(&LogitsRef::F32(l.view()), &CallSite::layer(1).with_layout(&layout))
        .unwrap_err();
    assert!(matches!(e, RouteError::Replay(ReplayError::Shape(_))), "{e}");
}

#[test]
fn recording_skips_padding_rows_and_streams_to_a_file() {
    let d = TempDir::new("rec");
    let p = d.file("r.mrt");
    let rec = Record::create_file(
        &p,
        TraceHeader::for_config(&cfg(), &LAYERS).unwrap(),
        WriterOptions::default(),
    )
    .unwrap();
    let router = Replayed::new(ReferenceRouter::new(cfg()), rec.clone());
    let g = routes(2, 8);
    let layout = BatchLayout::right_padded(&[(SeqId(0), 5), (SeqId(1), 8)], 8).unwrap();
    for (li, &layer) in LAYERS.iter().enumerate() {
        let l = batch_logits(&g, &layout, li);
        router
            .route(&LogitsRef::F32(l.view()), &CallSite::layer(layer).with_layout(&layout))
            .unwrap();
    }
    assert!(matches!(rec.finish().unwrap(), RecordOutput::File(st) if st.rows == 3 * 13));
    let f = moe_router::trace::TraceFile::open(&p).unwrap();
    let t = f.to_trace().unwrap();
    assert_eq!(t.sequence_end(SeqId(0)), 5);
    assert_eq!(t.summary().rows, 3 * 13);
    // Recording needs a layout too.
    let e = router
        .route(
            &LogitsRef::F32(Array2::<f32>::zeros((2, 16)).view()),
            &CallSite::layer(1),
        )
        .unwrap_err();
    assert!(matches!(e, RouteError::Replay(_)), "{e}");
}

#[test]
fn a_trace_with_other_routes_than_the_live_router_is_compared_live() {
    use moe_router::metrics::Comparator;
    let g = routes(1, 8);
    let trace = record(&g, &[(SeqId(0), 8)]);
    let mut cmp = Comparator::new(4);
    let layout = BatchLayout::single(SeqId(0), 8);
    for (li, &layer) in LAYERS.iter().enumerate() {
        let l = batch_logits(&g, &layout, li);
        let ids = ReferenceRouter::new(cfg())
            .route_host(&LogitsRef::F32(l.view()))
            .unwrap()
            .0;
        cmp.add_batch(&trace, LayerId(layer), &layout, ids.view()).unwrap();
    }
    let c = cmp.finish();
    assert_eq!(
        (c.router_mismatch_fraction, c.tokens_compared, c.routers_compared),
        (0.0, 8, 24)
    );
}
