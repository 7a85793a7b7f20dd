//! `moe-router convert`.

use super::{FORMATS, FormatArg, Progress, import_options, input_format, load, parse_layers, trace_err};
use crate::{CliError, EXIT_OK, EXIT_USAGE};
use moe_router::interop::{self, ExportOptions, Format, IntDtype};
use moe_router::trace::{Trace, TraceWriter, WriterOptions};
use std::path::{Path, PathBuf};

/// Arguments of `convert`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
moe-router convert rollout.npy rollout.mrt --num-experts 128 --layers 1-47\n  \
moe-router convert rollout.mrt routes.npy\n  \
moe-router convert routes.b64 routes.mrt --from sglang --num-experts 128 --num-layers 48 --top-k 8\n  \
moe-router convert routes.mrt routes.txt --to nrlre1\n\n\
Formats: mrt, npy, safetensors, sglang, nrlre1, r3v1, prime-rl. The extensions .mrt, .npy,\n\
.safetensors and .msgpack (prime-rl) name their format; anything else needs --from / --to.\n\
A [T, L, K] array is one sequence (id 0) at positions 0..T (prime-rl and R3/v1 carry their own\n\
start), layers 0..L unless --layers gives the model layer ids. Exporting to a one-sequence\n\
format needs a one-sequence trace; .npy output is int32 [T, L, K] with -1 for missing rows\n\
(an .npy input keeps its signed dtype). Ids >= E, duplicate ids in a row and values that do\n\
not fit the output dtype are refused with their element index.")]
pub struct ConvertArgs {
    /// Input file.
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// Output file.
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// Input format (default: from the extension of IN).
    #[arg(long, value_enum, value_name = "FMT")]
    pub from: Option<FormatArg>,
    /// Output format (default: from the extension of OUT).
    #[arg(long, value_enum, value_name = "FMT")]
    pub to: Option<FormatArg>,
    /// E, the number of experts (formats that do not record it: default max id + 1).
    #[arg(long, value_name = "E")]
    pub num_experts: Option<usize>,
    /// L, the number of MoE layers (sglang; r3v1 needs L or K).
    #[arg(long, value_name = "L")]
    pub num_layers: Option<usize>,
    /// K, the ids per token and layer (sglang; r3v1 needs L or K).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Model layer ids of the L axis, e.g. `0,1,3` or `1-47` (default 0..L).
    #[arg(long, value_name = "IDS")]
    pub layers: Option<String>,
}

/// `moe-router convert`.
pub fn convert(a: &ConvertArgs) -> Result<u8, CliError> {
    let from = match input_format(&a.input, a.from, None) {
        Ok(f) => f,
        Err(msg) => {
            errln!("error: {msg}");
            return Ok(EXIT_USAGE);
        }
    };
    let to: Format = match a.to.map(Format::from).or_else(|| Format::from_path(&a.output)) {
        Some(f) => f,
        None => {
            errln!(
                "error: {}: cannot tell the output format from the extension; pass --to FMT (one of {FORMATS})",
                a.output.display()
            );
            return Ok(EXIT_USAGE);
        }
    };
    let layers = a.layers.as_deref().map(parse_layers).transpose()?;
    let opts = import_options(a.num_experts, a.num_layers, a.top_k, layers);
    let size = std::fs::metadata(&a.input)
        .map_err(|e| CliError::io(&a.input, &e))?
        .len();
    let progress = Progress::new(size);
    let loaded = load(&a.input, from, None, &opts, &progress)?;
    let trace = &loaded.trace;
    if to == Format::Mrt {
        write_mrt(trace, &a.output, &progress)?;
    } else {
        progress.stage("exporting", 1);
        let dtype = match to {
            Format::Npy => Some(loaded.npy_dtype.filter(|d| d.is_signed()).unwrap_or(IntDtype::I32)),
            _ => None,
        };
        let eo = ExportOptions {
            dtype,
            ..ExportOptions::default()
        };
        let mut out =
            interop::export(to, trace, &eo).map_err(|e| CliError::Input(format!("{}: {e}", a.output.display())))?;
        if matches!(to, Format::Sglang | Format::Nrlre1 | Format::R3v1) {
            out.push(b'\n');
        }
        std::fs::write(&a.output, out).map_err(|e| CliError::io(&a.output, &e))?;
    }
    progress.finish();
    let s = trace.summary();
    errln!(
        "converted {} ({}) -> {} ({}): {} sequence(s), {} tokens, {} layers, K = {}, E = {}",
        a.input.display(),
        loaded.format,
        a.output.display(),
        to,
        s.sequences,
        s.tokens,
        trace.header().layers().len(),
        trace.header().top_k(),
        trace.header().num_experts()
    );
    Ok(EXIT_OK)
}

fn write_mrt(trace: &Trace, path: &Path, progress: &Progress) -> Result<(), CliError> {
    let lanes: Vec<_> = trace.lanes().collect();
    progress.stage("writing", lanes.len() as u64);
    let w =
        TraceWriter::create(path, trace.header().clone(), WriterOptions::default()).map_err(|e| trace_err(path, e))?;
    for (i, lane) in lanes.iter().enumerate() {
        for r in &lane.runs {
            w.append_stored(lane.seq, lane.layer, r.start, r.bytes)
                .map_err(|e| trace_err(path, e))?;
        }
        progress.set(i as u64 + 1);
    }
    w.finish().map_err(|e| trace_err(path, e))?;
    Ok(())
}
