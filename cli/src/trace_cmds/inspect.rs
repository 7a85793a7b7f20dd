//! `moe-router inspect`.

use super::{FormatArg, Progress, detect, file_json, import_options, load, positive, trace_err};
use crate::{CliError, EXIT_OK};
use moe_router::interop::Format;
use moe_router::metrics::load_stats;
use moe_router::trace::{OpenOptions, Trace, TraceFile, Verify};
use serde_json::{Value, json};
use std::path::PathBuf;

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  moe-router inspect rollout.mrt\n  moe-router inspect rollout.mrt --json | jq .load\n\n\
Prints the header (E, K, id width, layer map, row convention, fingerprint, producer), the\n\
sequences, tokens and rows, the chunks, whether the tail was truncated and how much was\n\
recovered, and the load per layer. Works on truncated and damaged files (damaged chunks are\n\
skipped and listed). Other formats are recognised by extension or content."
)]
pub struct InspectArgs {
    /// Trace file (.mrt, or any importable format).
    #[arg(value_name = "TRACE")]
    pub trace: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also draw the expert load per layer as a heatmap (.png or .svg).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// L, for an SGLang input (r3v1: L or K).
    #[arg(long, value_name = "L", value_parser = positive())]
    pub num_layers: Option<usize>,
    /// K, for an SGLang input (r3v1: L or K).
    #[arg(long, value_name = "K", value_parser = positive())]
    pub top_k: Option<usize>,
    /// Input format (default: from the extension, else the content).
    #[arg(long, value_enum, value_name = "FMT")]
    pub from: Option<FormatArg>,
}

fn header_json(trace_header: &moe_router::trace::TraceHeader) -> Value {
    let h = trace_header;
    json!({
        "num_experts": h.num_experts(),
        "top_k": h.top_k(),
        "id_width": match h.id_width() { moe_router::trace::IdWidth::U8 => "u8", moe_router::trace::IdWidth::U16 => "u16" },
        "layers": h.layer_ids(),
        "row_convention": h.row_convention(),
        "fingerprint": format!("{:016x}", h.fingerprint()),
        "weight_version": h.weight_version(),
        "producer": h.producer(),
    })
}

fn load_json(trace: &Trace) -> Value {
    let loads = load_stats(trace);
    let worst = loads
        .iter()
        .filter(|l| l.tokens > 0)
        .max_by(|a, b| a.max_over_mean.total_cmp(&b.max_over_mean));
    let mean_imb = {
        let v: Vec<f64> = loads.iter().filter(|l| l.tokens > 0).map(|l| l.max_over_mean).collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    json!({
        "mean_max_over_mean": mean_imb,
        "worst_layer": worst.map(|l| l.layer),
        "worst_max_over_mean": worst.map_or(0.0, |l| l.max_over_mean),
        "per_layer": loads.iter().map(|l| json!({
            "layer": l.layer,
            "tokens": l.tokens,
            "max": l.max,
            "mean": l.mean,
            "max_over_mean": l.max_over_mean,
        })).collect::<Vec<_>>(),
    })
}

fn summary_json(trace: &Trace) -> Value {
    let s = trace.summary();
    json!({
        "sequences": s.sequences,
        "tokens": s.tokens,
        "rows": s.rows,
        "missing_rows": s.missing_rows,
        "ids": s.ids,
        "layers": s.layers,
    })
}

/// `moe-router inspect`.
pub fn inspect(a: &InspectArgs) -> Result<u8, CliError> {
    let path = &a.trace;
    let (format, bytes) = detect(path, a.from)?;
    let mut out = json!({ "path": path.display().to_string(), "format": format.name() });
    let trace = if format == Format::Mrt {
        let tf = TraceFile::open_with(
            path,
            OpenOptions {
                verify: Verify::Eager,
                salvage: true,
            },
        )
        .map_err(|e| trace_err(path, e))?;
        let r = tf.report().clone();
        out["header"] = header_json(tf.header());
        out["format_version"] = json!(format!("{}.{}", r.major_version, r.minor_version));
        file_json(&mut out, &r);
        out["chunk_table"] = serde_json::to_value(tf.chunk_infos()).unwrap_or(Value::Null);
        tf.to_trace().map_err(|e| trace_err(path, e))?
    } else {
        let opts = import_options(None, a.num_layers, a.top_k, None, None);
        let t = load(path, format, bytes, &opts, &Progress(None))?.trace;
        out["header"] = header_json(t.header());
        out["file_bytes"] = json!(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
        out["chunks"] = json!(0);
        out["truncated"] = json!(false);
        t
    };
    let s = summary_json(&trace);
    for key in ["sequences", "tokens", "rows", "missing_rows", "ids", "layers"] {
        out[key] = s[key].clone();
    }
    out["load"] = load_json(&trace);
    if let Some(p) = &a.plot {
        let name = path
            .file_name()
            .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        crate::plot::plot_trace_load(p, &trace, &name)?;
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        print_inspect(&out);
    }
    Ok(EXIT_OK)
}

fn print_inspect(o: &Value) {
    let h = &o["header"];
    outln!(
        "{} ({})",
        o["path"].as_str().unwrap_or(""),
        o["format"].as_str().unwrap_or("")
    );
    outln!(
        "  E = {}, K = {}, id width {}, row convention {}, fingerprint {}, weight version {}, producer {:?}",
        h["num_experts"],
        h["top_k"],
        h["id_width"].as_str().unwrap_or(""),
        h["row_convention"].as_str().unwrap_or(""),
        h["fingerprint"].as_str().unwrap_or(""),
        h["weight_version"]
            .as_u64()
            .map_or("none".to_string(), |v| v.to_string()),
        h["producer"].as_str().unwrap_or("")
    );
    let layers: Vec<u64> = h["layers"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    outln!("  layer map: {} MoE layers {}", layers.len(), compact_ids(&layers));
    outln!(
        "  {} sequence(s), {} tokens, {} rows ({} missing), {} ids",
        o["sequences"],
        o["tokens"],
        o["rows"],
        o["missing_rows"],
        o["ids"]
    );
    outln!(
        "  {} bytes, {} chunk(s), index {}",
        o["file_bytes"],
        o["chunks"],
        o["index"]["state"].as_str().unwrap_or("n/a")
    );
    if o["truncated"].as_bool() == Some(true) {
        let t = &o["tail"];
        outln!(
            "  TRUNCATED: {} bytes lost from offset {} ({}); recovered {} chunk(s), {} bytes",
            t["bytes"],
            t["offset"],
            t["reason"].as_str().unwrap_or(""),
            o["recovered_chunks"],
            o["recovered_bytes"]
        );
    } else {
        outln!("  tail intact");
    }
    if let Some(d) = o["damaged"].as_array().filter(|d| !d.is_empty()) {
        outln!("  {} damaged region(s) skipped:", d.len());
        for x in d {
            outln!(
                "    offset {} ({} bytes): {}",
                x["offset"],
                x["bytes"],
                x["reason"].as_str().unwrap_or("")
            );
        }
    }
    let l = &o["load"];
    outln!(
        "  load: mean max/mean {:.3}, worst layer {} at {:.3}",
        l["mean_max_over_mean"].as_f64().unwrap_or(0.0),
        l["worst_layer"],
        l["worst_max_over_mean"].as_f64().unwrap_or(0.0)
    );
    outln!("  {:>6} {:>10} {:>10} {:>10}", "layer", "rows", "missing", "max/mean");
    let loads = l["per_layer"].as_array().cloned().unwrap_or_default();
    for (s, ld) in o["layers"].as_array().cloned().unwrap_or_default().iter().zip(loads) {
        outln!(
            "  {:>6} {:>10} {:>10} {:>10.3}",
            s["layer"].as_u64().unwrap_or(0),
            s["rows"].as_u64().unwrap_or(0),
            s["missing_rows"].as_u64().unwrap_or(0),
            ld["max_over_mean"].as_f64().unwrap_or(0.0)
        );
    }
}

/// `0-3,5,7-9` for a sorted id list.
fn compact_ids(v: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", v[i], v[j])
        } else {
            v[i].to_string()
        });
        i = j + 1;
    }
    format!("[{}]", parts.join(","))
}
