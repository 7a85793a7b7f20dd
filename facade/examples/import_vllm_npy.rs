//! Load a vLLM-style routed-experts array (`.npy`, int32 `[T, L, K]`, one row per routed token)
//! and replay it in a training forward.
//!
//! ```sh
//! cargo run --release -p moe-router --example import_vllm_npy [-- routes.npy]
//! ```
//!
//! Without an argument, the example writes a small array itself first (as vLLM would return it
//! for one request: `T − 1` rows, since the last generated token is never routed) to a temporary
//! file, which it removes again, also when it fails.

use moe_router::cpu::CpuRouter;
use moe_router::interop::{self, Format, ImportOptions};
use moe_router::npy::{self, NpyDtype};
use moe_router::policy::Replay;
use moe_router::{BatchLayout, CallSite, LogitsRef, Router, SeqId, preset};
use ndarray::Array2;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = preset("qwen3-moe")?; // E = 128, K = 8
    let (e, k) = (cfg.num_experts(), cfg.top_k());
    // vLLM's layer axis here covers the MoE layers only; this model's are layers 1..=4.
    let moe_layers = vec![1u32, 2, 3, 4];
    // The example's own file is removed when `_own` drops, on success or error.
    let (path, _own) = match std::env::args().nth(1) {
        Some(p) => (PathBuf::from(p), None),
        None => {
            let p = write_example(e, k, moe_layers.len())?;
            (p.clone(), Some(RemoveOnDrop(p)))
        }
    };

    let bytes = std::fs::read(&path)?;
    let opts = ImportOptions::default()
        .with_num_experts(e)
        .with_layers(moe_layers.clone());
    let trace = interop::import(Format::Npy, &bytes, &opts)?; // validates every id
    trace.check_all_zero_layers()?; // zero padding would show up as an all-expert-0 layer
    let rows = trace.sequence_end(SeqId(0)) as usize;
    println!(
        "{}: {rows} routed tokens × {} layers × K = {k}",
        path.display(),
        moe_layers.len()
    );

    // Training sees all T = rows + 1 tokens; the last one has no route and falls back.
    let policy = Replay::new(trace, &moe_layers)?.fallback();
    let router = moe_router::Replayed::new(CpuRouter::new(cfg), &policy);
    let layout = BatchLayout::single(SeqId(0), rows + 1);
    for &layer in &moe_layers {
        let logits = Array2::from_shape_fn((rows + 1, e), |(t, x)| {
            ((t * 17 + x * 5 + layer as usize) % 23) as f32 * 0.1
        });
        let out = router.route(
            &LogitsRef::F32(logits.view()),
            &CallSite::layer(layer).with_layout(&layout),
        )?;
        assert_eq!(out.ids.nrows(), rows + 1);
    }
    let c = policy.counts();
    println!(
        "replayed {} rows, {} fallbacks (the last token, once per layer)",
        c.total_replayed_rows, c.total_fallbacks
    );
    Ok(())
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `[T, L, K]` int32 routes like vLLM returns them (distinct ids per row).
fn write_example(e: usize, k: usize, layers: usize) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let t = 31;
    let mut v = Vec::with_capacity(t * layers * k);
    for tok in 0..t {
        for l in 0..layers {
            for s in 0..k {
                v.push(((tok * 5 + l * 11 + s * 16) % e) as i32);
            }
        }
    }
    let p = std::env::temp_dir().join(format!("moe-router-example-{}.npy", std::process::id()));
    npy::write(&p, &[t, layers, k], NpyDtype::I32, &npy::i32_bytes(&v))?;
    Ok(p)
}
