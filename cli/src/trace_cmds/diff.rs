//! `moe-router diff`.

use super::{Loaded, Progress, detect, import_options, load};
use crate::{CliError, EXIT_OK};
use moe_router::interop::ImportOptions;
use moe_router::metrics::compare;
use std::path::{Path, PathBuf};

/// Arguments of `diff`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  moe-router diff rollout.mrt training.mrt\n  \
moe-router diff inference.npy training.npy --num-experts 128 --json\n\n\
Compares the routers (token, layer) recorded in both inputs: a router mismatches when its id\n\
sets differ (slot order ignored). JSON keys: router_mismatch_fraction,\n\
token_any_layer_mismatch_fraction, mean_mismatched_layers_per_token, per_layer (list of\n\
{layer, mismatch_fraction, mean_overlap}), plus mean_overlap, routers_compared,\n\
tokens_compared, rows_only_in_a, rows_only_in_b. Layers are matched by layer id.")]
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
    #[arg(long, value_name = "E")]
    pub num_experts: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// L, for SGLang inputs (r3v1: L or K).
    #[arg(long, value_name = "L")]
    pub num_layers: Option<usize>,
    /// K, for SGLang inputs (r3v1: L or K).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
}

/// `moe-router diff`.
pub fn diff(a: &DiffArgs) -> Result<u8, CliError> {
    let opts = import_options(a.num_experts, a.num_layers, a.top_k, None);
    let ta = load_any(&a.a, &opts)?.trace;
    let tb = load_any(&a.b, &opts)?.trace;
    let c = compare(&ta, &tb).map_err(|e| CliError::Input(format!("{} vs {}: {e}", a.a.display(), a.b.display())))?;
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

/// Reads an input whose format comes from the extension or the content.
fn load_any(path: &Path, opts: &ImportOptions) -> Result<Loaded, CliError> {
    let (format, bytes) = detect(path)?;
    load(path, format, bytes, opts, &Progress(None))
}
