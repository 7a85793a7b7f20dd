//! One RL training step with rollout routing replay (R3), the router's backward included: the
//! inference engine records its routes; the trainer replays them in the forward and in the
//! activation recompute, takes the gradient of the routing weights (and of the aux loss) with
//! respect to the router logits through `Router::weights_vjp`, turns it into the gate weights'
//! gradient `dlogits^T · X`, and updates the selection bias outside autograd.
//!
//! ```sh
//! cargo run --release -p moe-router --example train_with_replay
//! ```
//!
//! The model is a stand-in: each MoE layer has a gate `W [E, H]` (trained) and linear experts
//! `A_e [H, H]`, and its input `X` is given (in a real model it is the previous layer's output,
//! and the gradient on it flows on to the layers below). docs/rl-integration.md ("The backward
//! in a training step") explains each call; `moe-router demo` trains a whole small model this
//! way, with and without replay.

use moe_router::cpu::CpuRouter;
use moe_router::policy::{MissingRoutes, Record, RecordOutput, Replay};
use moe_router::trace::{RowConvention, TraceHeader};
use moe_router::{
    AuxLossKind, BatchLayout, CallSite, Capacity, DropPolicy, HostMatrix, LogitsRef, LossGrads, Pass, Replayed, Router,
    RouterConfig, SeqId, preset, stats,
};
use ndarray::{Array2, Axis};

const MOE_LAYERS: [u32; 2] = [1, 2]; // layer 0 is dense: the layer-id map is not 0..L
const H: usize = 16;
const AUX_COEFF: f64 = 1e-4; // DeepSeek-V3's sequence-wise balance loss

/// A deterministic "random" value in [-1, 1).
fn noise(i: u64) -> f32 {
    let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
}

fn matrix(rows: usize, cols: usize, seed: u64, scale: f32) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(r, c)| {
        scale * noise(seed ^ (((r * cols + c) as u64) << 20))
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // DeepSeek-V3's rule (sigmoid scores, 8 groups keep 4, top-8 of 256, selection bias), with
    // its per-sequence aux loss and, to show dropped slots, a capacity factor of 1.
    let rule: RouterConfig = preset("deepseek-v3")?
        .to_builder()
        .aux_loss(AuxLossKind::PerSequence, AUX_COEFF)
        .capacity(Capacity {
            factor: 1.0,
            min_capacity: None,
            policy: DropPolicy::Probs,
            pad_to_capacity: false,
        })
        .build()?;
    let e = rule.num_experts();
    // One config per MoE layer: each carries its layer's bias (the checkpoint's
    // e_score_correction_bias; zeros here).
    let mut cfgs = vec![rule.clone(); MOE_LAYERS.len()];
    for cfg in &mut cfgs {
        cfg.set_expert_bias(vec![0.0; e])?;
    }

    let seqs = [(SeqId(10), 12usize), (SeqId(11), 9), (SeqId(12), 16)];
    let tokens: usize = seqs.iter().map(|s| s.1).sum();
    let seq_lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
    let layout = BatchLayout::packed(&seqs)?; // the trainer's batch: packed, padding removed
    let mut gates: Vec<Array2<f32>> = (0..MOE_LAYERS.len())
        .map(|l| matrix(e, H, 100 + l as u64, 0.25))
        .collect();
    let experts: Vec<Vec<Array2<f32>>> = (0..MOE_LAYERS.len())
        .map(|l| (0..e).map(|x| matrix(H, H, (200 + l * e + x) as u64, 0.3)).collect())
        .collect();
    let inputs: Vec<Array2<f32>> = (0..MOE_LAYERS.len())
        .map(|l| matrix(tokens, H, 300 + l as u64, 1.0))
        .collect();
    // The gradient arriving from the layers above, on each layer's output [T, H].
    let upstream: Vec<Array2<f32>> = (0..MOE_LAYERS.len())
        .map(|l| matrix(tokens, H, 400 + l as u64, 1.0))
        .collect();

    // ---- Rollout: the engine (bf16 activations) routes and records, per sequence -------------
    // Engines never route the last generated token: the trace's rows are tokens − 1.
    let header = TraceHeader::for_config(&cfgs[0], &MOE_LAYERS)?.with_row_convention(RowConvention::TokensMinusOne);
    let record = Record::in_memory(header);
    let engine_layout = BatchLayout::packed(&seqs.map(|(s, l)| (s, l - 1)))?;
    let engine_rows: Vec<usize> = (0..tokens).filter(|&t| !is_last(&seqs, t)).collect();
    for (l, &layer) in MOE_LAYERS.iter().enumerate() {
        let x = inputs[l]
            .select(Axis(0), &engine_rows)
            .mapv(|v| half::bf16::from_f32(v).to_f32());
        let logits = x.dot(&gates[l].t()).mapv(half::bf16::from_f32);
        let engine = Replayed::new(CpuRouter::new(cfgs[l].clone()), record.clone()).with_tape_depth(0);
        engine.route(
            &LogitsRef::Bf16(logits.view()),
            &CallSite::layer(layer).with_layout(&engine_layout),
        )?;
    }
    let RecordOutput::Memory(trace) = record.finish()? else {
        return Err("an in-memory recording returns its trace".into());
    };

    // ---- Training step: every router replays the rollout's ids --------------------------------
    // The last token of each sequence has no recorded route: it falls back to the trainer's
    // router (counted). Every (layer, batch) key must be asked exactly twice: forward + recompute.
    let policy = Replay::new(trace, &MOE_LAYERS)?
        .with_missing(MissingRoutes::Fallback)
        .expect_each_key(2);
    let routers: Vec<_> = cfgs
        .iter()
        .map(|c| Replayed::new(CpuRouter::new(c.clone()), &policy))
        .collect();
    let lr = 0.05f32;
    let mut step_counts: Vec<Vec<u64>> = Vec::new(); // per layer: tokens per expert after dropping
    for (l, &layer) in MOE_LAYERS.iter().enumerate() {
        let site = CallSite::layer(layer).with_layout(&layout);
        let x = &inputs[l];
        let logits = x.dot(&gates[l].t()); // the trainer's f32 router logits [T, E]
        let z = LogitsRef::F32(logits.view());

        // Forward: replayed ids, weights from the live logits (this is what carries the gradient).
        let fwd = routers[l].route(&z, &site)?;
        let aux = stats::aux_loss_per_sequence(&cfgs[l], &z, &seq_lens, AUX_COEFF)?; // added to the loss
        // Capacity drops slots after the selection (replayed or not); a dropped slot's expert
        // never runs. The counts after dropping feed the bias update.
        let cap = routers[l].apply_capacity(&fwd.ids, &fwd.weights)?;
        step_counts.push(match &cap {
            Some(c) => c.tokens_per_expert.clone(),
            None => routers[l].tokens_per_expert(&fwd.ids)?,
        });
        // ... the experts run here; the output is y_t = Σ_k w_tk · A_{i_tk} x_t for kept slots.

        // Backward (activation recompute): the same call with Pass::Recompute gives the same ids;
        // the decorator's tape refuses a backward whose ids differ from its forward.
        let again = routers[l].route(&z, &site.with_pass(Pass::Recompute))?;
        // Upstream gradient on the weights [T, K]: dL/dw_tk = dL/dy_t · A_{i_tk} x_t.
        let mut grad = Array2::<f32>::zeros((tokens, rule.top_k()));
        for ((t, k), g) in grad.indexed_iter_mut() {
            let expert_out = experts[l][again.ids[[t, k]] as usize].dot(&x.row(t));
            *g = upstream[l].row(t).dot(&expert_out);
        }
        // A dropped slot's expert never ran: it passes no gradient.
        let dropped = match &cap {
            Some(c) => {
                c.zero_dropped(&mut grad)?;
                c.dropped
            }
            None => 0,
        };
        // dlogits [T, E] of Σ grad∘w + 1·aux (the aux loss's upstream gradient is 1 here: it is
        // added to the loss unscaled; with `global_aux_loss`, pass the all-reduced running counts
        // with `.global_counts(..)`).
        let losses = LossGrads::default().aux_loss(1.0).seq_lens(&seq_lens);
        let dlogits = routers[l]
            .weights_vjp(&z, &again.ids, &HostMatrix::F32(grad), &losses, &site)?
            .to_f32();
        // The gate's gradient, and the gradient on X for the layer below (unused here).
        let dgate = dlogits.t().dot(x);
        let _dx = dlogits.dot(&gates[l]);
        gates[l].scaled_add(-lr, &dgate);

        println!(
            "layer {layer}: aux loss {aux:.3e}, {dropped} of {} slots dropped, |dgate| = {:.3e}",
            tokens * rule.top_k(),
            dgate.iter().map(|v| v * v).sum::<f32>().sqrt()
        );
    }
    let summary = policy.finish()?; // errors unless every key was asked forward + recompute
    println!(
        "replayed {} rows, {} fell back (the never-routed last token of each sequence, per layer and pass)",
        summary.counts.total_replayed_rows, summary.counts.total_fallbacks
    );

    // ---- After the optimiser step: the aux-loss-free bias update, outside autograd -------------
    // Per layer, bias += rate · sign(mean load − load), from the global batch's token counts
    // (summed over its micro-batches and all-reduced across TP × DP × CP ranks). The selection
    // bias gets no gradient; the next step's routers (and the engine, with the new weights,
    // before the next rollout) use the new bias.
    for ((cfg, counts), &layer) in cfgs.iter_mut().zip(&step_counts).zip(&MOE_LAYERS) {
        let old = cfg.expert_bias().unwrap_or(&[]).to_vec();
        let new = stats::updated_bias(&old, counts, 1e-3);
        let up = new.iter().zip(&old).filter(|(n, o)| n > o).count();
        cfg.set_expert_bias(new)?;
        println!("layer {layer} bias update: {up} under-loaded experts up, the others down (or unchanged at the mean)");
    }
    Ok(())
}

/// Whether batch row `t` of the packed sequences is a sequence's last token.
fn is_last(seqs: &[(SeqId, usize)], t: usize) -> bool {
    let mut end = 0;
    for &(_, len) in seqs {
        end += len;
        if t + 1 == end {
            return true;
        }
    }
    false
}
