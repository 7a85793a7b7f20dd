//! `moe-router diff`.

use super::{LayerArgs, Loaded, Progress, detect, import_options, load, positive, select_seq};
use crate::{CliError, EXIT_OK};
use moe_router::interop::{Format, ImportOptions};
use moe_router::metrics::{LayerRows, compare};
use std::path::{Path, PathBuf};

/// Arguments of `diff`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  moe-router diff rollout.mrt training.mrt\n  \
moe-router diff inference.npy training.npy --num-experts 128 --json\n  \
moe-router diff vllm.npy rollout.mrt --layers-from config.json --seq 17\n\n\
Compares the routers (token, layer) recorded in both inputs: a router mismatches when its id\n\
sets differ (slot order ignored). Layers are matched by model layer id: an array input's L axis\n\
is layers 0..L unless --layers / --layers-from says otherwise (an .mrt records its own), and\n\
layers of one input only are listed with their rows, never silently dropped. JSON keys:\n\
router_mismatch_fraction, token_any_layer_mismatch_fraction, mean_mismatched_layers_per_token,\n\
per_layer (list of {layer, mismatch_fraction, mean_overlap}), mean_overlap, routers_compared,\n\
tokens_compared, rows_only_in_a, rows_only_in_b, layers_only_in_a, layers_only_in_b (lists of\n\
{layer, rows}), mtp_collisions (list of {layer, kind_a, kind_b, rows_a, rows_b}: a layer id that is\n\
an MTP layer in one input and a decoder layer in the other, so MTP rows would land on a decoder\n\
layer; not compared).\n\n\
  moe-router diff rollout.mrt trainer.mrt   # MTP layer 61 vs decoder layer 61: reported, not compared")]
pub struct DiffArgs {
    /// First input (any importable format).
    #[arg(value_name = "A")]
    pub a: PathBuf,
    /// Second input (any importable format).
    #[arg(value_name = "B")]
    pub b: PathBuf,
    /// Also draw the mismatch fraction per layer (.png or .svg).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// E, for inputs that do not record it.
    #[arg(long, value_name = "E", value_parser = positive())]
    pub num_experts: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// L, for SGLang inputs (r3v1: L or K).
    #[arg(long, value_name = "L", value_parser = positive())]
    pub num_layers: Option<usize>,
    /// K, for SGLang inputs (r3v1: L or K).
    #[arg(long, value_name = "K", value_parser = positive())]
    pub top_k: Option<usize>,
    /// Layer ids of the L axis of array inputs.
    #[command(flatten)]
    pub layer: LayerArgs,
    /// Compare only this sequence (an array input, which is one sequence, is taken as it).
    #[arg(long, value_name = "ID")]
    pub seq: Option<u64>,
}

fn layer_list(v: &[LayerRows]) -> String {
    let shown: Vec<String> = v
        .iter()
        .take(12)
        .map(|l| format!("{} ({} rows)", l.layer, l.rows))
        .collect();
    format!("{}{}", shown.join(", "), if v.len() > 12 { ", …" } else { "" })
}

/// `moe-router diff`.
pub fn diff(a: &DiffArgs) -> Result<u8, CliError> {
    let resolved = a.layer.resolve_full()?;
    let mut opts = import_options(a.num_experts, a.num_layers, a.top_k, resolved.layers, a.seq);
    opts.layer_kinds = resolved.kinds;
    let mut ta = load_any(&a.a, &opts)?.trace;
    let mut tb = load_any(&a.b, &opts)?.trace;
    if let Some(seq) = a.seq {
        ta = select_seq(ta, seq, &a.a)?;
        tb = select_seq(tb, seq, &a.b)?;
    }
    let c = compare(&ta, &tb).map_err(|e| {
        CliError::Input(format!(
            "{} vs {}: {e}; give the model layer ids of an array input with --layers or --layers-from",
            a.a.display(),
            a.b.display()
        ))
    })?;
    if let Some(p) = &a.plot {
        let name = |p: &std::path::Path| {
            p.file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
        };
        crate::plot::plot_comparison(p, &c, &name(&a.a), &name(&a.b))?;
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
    } else {
        outln!("{} vs {}", a.a.display(), a.b.display());
        outln!(
            "  routers compared: {} ({} tokens); only in A: {}, only in B: {}",
            c.routers_compared,
            c.tokens_compared,
            c.rows_only_in_a,
            c.rows_only_in_b
        );
        outln!(
            "  layers only in A: {}; only in B: {}",
            c.layers_only_in_a.len(),
            c.layers_only_in_b.len()
        );
        for (side, v) in [("A", &c.layers_only_in_a), ("B", &c.layers_only_in_b)] {
            if !v.is_empty() {
                outln!("    only in {side}, not compared: layer {}", layer_list(v));
            }
        }
        for m in &c.mtp_collisions {
            outln!(
                "  MTP collision: layer {} is {} in A ({} rows) and {} in B ({} rows): MTP rows would land on a decoder layer; not compared",
                m.layer,
                m.kind_a,
                m.rows_a,
                m.kind_b,
                m.rows_b
            );
        }
        if !(c.layers_only_in_a.is_empty() && c.layers_only_in_b.is_empty()) {
            outln!(
                "  warning: the layer maps differ; an array input's layers are 0..L unless --layers / --layers-from gives them"
            );
        }
        outln!("  router mismatch fraction:          {:.6}", c.router_mismatch_fraction);
        outln!(
            "  token any-layer mismatch fraction: {:.6}",
            c.token_any_layer_mismatch_fraction
        );
        outln!(
            "  mean mismatched layers per token:  {:.6}",
            c.mean_mismatched_layers_per_token
        );
        outln!("  mean overlap:                      {:.6}", c.mean_overlap);
        outln!("  {:>6} {:>10} {:>10}", "layer", "mismatch", "overlap");
        for l in &c.per_layer {
            outln!(
                "  {:>6} {:>10.6} {:>10.6}",
                l.layer,
                l.mismatch_fraction,
                l.mean_overlap
            );
        }
    }
    Ok(EXIT_OK)
}

/// Reads an input whose format comes from the extension or the content. The layer ids of
/// `opts` are for array inputs: an `.mrt` input keeps its own layer map (a difference shows as
/// layers of one input only).
fn load_any(path: &Path, opts: &ImportOptions) -> Result<Loaded, CliError> {
    let (format, bytes) = detect(path, None)?;
    let mut o = opts.clone();
    if format == Format::Mrt {
        o.layers = None;
    }
    load(path, format, bytes, &o, &Progress(None))
}
