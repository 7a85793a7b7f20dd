//! Compare two routings of the same tokens: the R3 paper's metrics (fraction of (token, layer)
//! routers whose expert set differs, fraction of tokens with any differing layer, mean differing
//! layers per token) and per-layer load.
//!
//! ```sh
//! cargo run --release -p moe-router --example compare_traces
//! ```
//!
//! Here the two traces come from routing the same synthetic logits with bf16 and f32 inputs; in
//! practice they are an inference engine's trace and a trainer's (`moe-router diff A B` does
//! the same from the command line, for any supported format).

use half::bf16;
use moe_router::cpu::CpuRouter;
use moe_router::metrics::{compare, load_stats};
use moe_router::trace::synthetic::SyntheticRoutes;
use moe_router::trace::{Trace, TraceHeader};
use moe_router::{LayerId, LogitsRef, Router, SeqId, preset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = preset("qwen3-moe")?;
    let layers = vec![1u32, 3, 5, 7];
    let synth = SyntheticRoutes::new(cfg.clone(), layers.clone(), 8, 256);
    let router = CpuRouter::new(cfg.clone());
    let mut f32_trace = Trace::new(TraceHeader::for_config(&cfg, &layers)?);
    let mut bf16_trace = Trace::new(TraceHeader::for_config(&cfg, &layers)?);
    for seq in 0..8u64 {
        for (li, &layer) in layers.iter().enumerate() {
            let logits = synth.logits(seq, li);
            let (a, _) = router.route_host(&LogitsRef::F32(logits.view()))?;
            let rounded = logits.mapv(bf16::from_f32);
            let (b, _) = router.route_host(&LogitsRef::Bf16(rounded.view()))?;
            f32_trace.append(SeqId(seq), LayerId(layer), 0, a.view())?;
            bf16_trace.append(SeqId(seq), LayerId(layer), 0, b.view())?;
        }
    }
    let c = compare(&f32_trace, &bf16_trace)?;
    println!(
        "routers that differ: {:.2}%, tokens with a differing layer: {:.2}%, differing layers per token: {:.3}",
        c.router_mismatch_fraction * 100.0,
        c.token_any_layer_mismatch_fraction * 100.0,
        c.mean_mismatched_layers_per_token
    );
    for l in &c.per_layer {
        println!(
            "  layer {:>2}: {:.2}% differ, overlap {:.4}",
            l.layer,
            l.mismatch_fraction * 100.0,
            l.mean_overlap
        );
    }
    for l in load_stats(&f32_trace) {
        println!(
            "  layer {:>2}: busiest expert {:.2}× the mean load",
            l.layer, l.max_over_mean
        );
    }
    Ok(())
}
