//! `moe-router convert`.

use super::{
    FORMATS, FormatArg, LayerArgs, Progress, import_options, input_format, load, positive, select_seq, trace_err,
};
use crate::{CliError, EXIT_OK, EXIT_USAGE};
use moe_router::SeqId;
use moe_router::interop::{self, ExportOptions, Format, IntDtype};
use moe_router::trace::{Trace, TraceWriter, WriterOptions};
use std::path::{Path, PathBuf};

/// Arguments of `convert`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
moe-router convert rollout.npy rollout.mrt --num-experts 128 --layers-from Qwen3-30B-A3B/config.json\n  \
moe-router convert rollout.npy rollout.mrt --num-experts 256 --layers 3-60 --seq 17\n  \
moe-router convert rollout.mrt seq17.npy --seq 17\n  \
moe-router convert routes.b64 routes.mrt --from sglang --num-experts 128 --num-layers 48 --top-k 8\n  \
moe-router convert routes.mrt routes.txt --to nrlre1\n  \
moe-router convert turn2.b64 turn2.mrt --from sglang --num-layers 48 --top-k 8 --start 512\n  \
moe-router convert meta_info.json turn2.mrt --from sglang --num-layers 48 --top-k 8   (start_len applied)\n  \
moe-router convert routes.npy routes.mrt --layers-from config.json --mtp-layers   (MTP layers marked as such)\n\n\
Formats: mrt, npy, safetensors, sglang, nrlre1, r3v1, prime-rl. The extensions .mrt, .npy,\n\
.safetensors and .msgpack (prime-rl) name their format; anything else needs --from / --to.\n\
A [T, L, K] array is one sequence (id 0, or --seq) at positions 0..T (prime-rl and R3/v1 carry\n\
their own start), layers 0..L unless --layers or --layers-from gives the model layer ids.\n\
Exporting to a one-sequence format takes the trace's only sequence, or --seq ID; .npy output\n\
is int32 [T, L, K] with -1 for missing rows (an .npy input keeps its signed dtype). Ids >= E,\n\
duplicate ids in a row and values that do not fit the output dtype are refused with their\n\
element index; an input without any recorded row (the engine captured nothing) is refused.")]
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
    #[arg(long, value_name = "E", value_parser = positive())]
    pub num_experts: Option<usize>,
    /// L, the number of MoE layers (sglang; r3v1 needs L or K).
    #[arg(long, value_name = "L", value_parser = positive())]
    pub num_layers: Option<usize>,
    /// K, the ids per token and layer (sglang; r3v1 needs L or K).
    #[arg(long, value_name = "K", value_parser = positive())]
    pub top_k: Option<usize>,
    /// Layer ids of the L axis.
    #[command(flatten)]
    pub layer: LayerArgs,
    /// The sequence: an array input's rows get this id (default 0); from a trace of several
    /// sequences only this one is kept (so that it can be exported to a one-sequence format).
    #[arg(long, value_name = "ID")]
    pub seq: Option<u64>,
    /// Position of the first row of an array input: routes that begin after a cached prefix
    /// (SGLang's routed_experts_start_len; a JSON meta_info input carries it itself).
    #[arg(long, value_name = "POS")]
    pub start: Option<u64>,
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
    let resolved = a.layer.resolve_full()?;
    let mut opts = import_options(a.num_experts, a.num_layers, a.top_k, resolved.layers, a.seq);
    opts.layer_kinds = resolved.kinds;
    opts.start = a.start;
    let size = std::fs::metadata(&a.input)
        .map_err(|e| CliError::io(&a.input, &e))?
        .len();
    let progress = Progress::new(size);
    let mut loaded = load(&a.input, from, None, &opts, &progress)?;
    if let Some(seq) = a.seq {
        loaded.trace = select_seq(loaded.trace, seq, &a.input)?;
    }
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
            seq: a.seq.map(SeqId),
            ..ExportOptions::default()
        };
        let mut out =
            interop::export(to, trace, &eo).map_err(|e| CliError::Input(crate::error::at_path(&a.output, e)))?;
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

/// Writes `trace` as an `.mrt` file.
pub(super) fn write_mrt(trace: &Trace, path: &Path, progress: &Progress) -> Result<(), CliError> {
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
