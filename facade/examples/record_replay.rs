//! R3 in miniature: record the routes of an inference loop per sequence, then replay them in a
//! training step that lays the same tokens out differently (packed, padding removed, split
//! zigzag over two context-parallel ranks), including the activation-recompute pass.
//!
//! ```sh
//! cargo run --release -p moe-router --example record_replay
//! ```

use moe_router::cpu::CpuRouter;
use moe_router::policy::{Record, Replay};
use moe_router::trace::{RowConvention, TraceHeader};
use moe_router::{
    BatchLayout, CallSite, LogitsRef, Pass, Replayed, Router, RouterConfig, RowAddr, Segment, SeqId, preset,
};
use ndarray::Array2;

/// The model's MoE layers: layer 0 is dense, so the layer-id map is not `0..L`.
const MOE_LAYERS: [u32; 3] = [1, 2, 3];

/// Stand-in for a model's router logits at (layer, sequence, position): deterministic, so the
/// trainer sees the same logits as the engine up to `noise` (different numerics).
fn logit(layer: u32, seq: u64, pos: u64, expert: usize, noise: f32) -> f32 {
    let mut z = (layer as u64) << 48 ^ seq << 32 ^ pos << 16 ^ expert as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let u = (z >> 40) as f32 / (1u64 << 24) as f32; // uniform in [0, 1)
    let wobble = ((z & 0xFF) as f32 / 255.0 - 0.5) * 2.0; // the trainer's numerics
    (u - 0.5) * 4.0 + noise * wobble
}

fn logits_for(layout: &BatchLayout, layer: u32, e: usize, noise: f32) -> Array2<f32> {
    let mut l = Array2::zeros((layout.rows(), e));
    for (r, addr) in layout.iter_rows().enumerate() {
        if let RowAddr::Token(seq, pos) = addr {
            for x in 0..e {
                l[[r, x]] = logit(layer, seq.0, pos, x, noise);
            }
        }
    }
    l
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg: RouterConfig = preset("qwen3-moe")?; // softmax, top-8 of 128
    let e = cfg.num_experts();
    let lens = [(SeqId(10), 12usize), (SeqId(11), 9), (SeqId(12), 16)];

    // ---- Inference: decode one token per live sequence per step, recording per sequence ----
    // Engines do not route the last generated token: rows = tokens - 1.
    let header = TraceHeader::for_config(&cfg, &MOE_LAYERS)?.with_row_convention(RowConvention::TokensMinusOne);
    let record = Record::in_memory(header);
    let engine = Replayed::new(CpuRouter::new(cfg.clone()), record.clone());
    let max_len = lens.iter().map(|l| l.1).max().unwrap_or(0);
    for pos in 0..max_len as u64 - 1 {
        // A static decode batch: finished sequences become padding rows (never recorded).
        let segs: Vec<Segment> = lens
            .iter()
            .map(|&(seq, len)| {
                if pos + 1 < len as u64 {
                    Segment::Tokens {
                        seq,
                        start: pos,
                        len: 1,
                    }
                } else {
                    Segment::Padding { len: 1 }
                }
            })
            .collect();
        let layout = BatchLayout::new(segs)?;
        for &layer in &MOE_LAYERS {
            let l = logits_for(&layout, layer, e, 0.0);
            engine.route(&LogitsRef::F32(l.view()), &CallSite::layer(layer).with_layout(&layout))?;
        }
    }
    let trace = record.snapshot().ok_or("in-memory recording")?;
    println!(
        "recorded {} sequences, {:?} MoE layers",
        trace.sequences().len(),
        trace.header().layer_ids()
    );

    // ---- Training: packed, zigzag over 2 CP ranks, forward + recompute, replaying ----------
    let policy = Replay::new(trace, &MOE_LAYERS)?.fallback().expect_each_key(2);
    let trainer = Replayed::new(CpuRouter::new(cfg.clone()), &policy);
    let plain = CpuRouter::new(cfg);
    let (mut differ_without, mut rows) = (0usize, 0usize);
    for rank in 0..2 {
        let layout = BatchLayout::zigzag_rank(&lens, 2, rank)?;
        for &layer in &MOE_LAYERS {
            // The trainer's numerics differ a little from the engine's.
            let l = logits_for(&layout, layer, e, 0.002);
            let lr = LogitsRef::F32(l.view());
            let site = CallSite::layer(layer).with_layout(&layout);
            let fwd = trainer.route(&lr, &site)?;
            let again = trainer.route(&lr, &site.with_pass(Pass::Recompute))?;
            assert_eq!(fwd.ids, again.ids, "recompute sees the same experts");
            let own = plain.route(&lr, &site)?;
            differ_without += fwd
                .ids
                .outer_iter()
                .zip(own.ids.outer_iter())
                .filter(|(a, b)| a != b)
                .count();
            rows += layout.rows();
        }
    }
    let summary = policy.finish()?; // errors unless every key was asked exactly twice
    println!(
        "training: {rows} routed rows; without replay {differ_without} rows would pick other experts; \
         replayed {} rows, {} fell back (the never-routed last token of each sequence, per layer and pass)",
        summary.counts.total_replayed_rows, summary.counts.total_fallbacks
    );
    Ok(())
}
