//! `moe-router merge`.

use super::convert::write_mrt;
use super::{FormatArg, LayerArgs, Progress, detect, import_options, load, positive};
use crate::{CliError, EXIT_OK};
use moe_router::interop::Format;
use moe_router::trace::{Trace, TraceHeader};
use std::path::{Path, PathBuf};

/// Arguments of `merge`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
moe-router merge sample-*.npy --out rollout.mrt --num-experts 128 --layers-from config.json\n  \
moe-router merge a.npy b.npy c.npy --seq-ids 40,41,42 --out rollout.mrt --num-experts 128\n  \
moe-router merge rank0.mrt rank1.mrt rank2.mrt rank3.mrt --out rollout.mrt\n\n\
Joins per-sample or per-rank captures into one .mrt trace. An .mrt input keeps its sequences;\n\
an input of another format is one sequence, whose id is the next of --seq-ids (one per such\n\
input, in order: ids or ranges, e.g. 0-63), else its position among those inputs (0, 1, 2, ...;\n\
each assignment is printed). Every input must describe the same routing: E, K and layer map\n\
(give --num-experts and --layers / --layers-from for array inputs), row convention, config\n\
fingerprint and weight version. A position recorded twice with different ids is an error\n\
naming the sequence, layer and position (the same ids twice are kept once), as in\n\
Trace::append; nothing is written then.")]
pub struct MergeArgs {
    /// Inputs (any importable format).
    #[arg(value_name = "IN", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Output trace (.mrt).
    #[arg(long, short = 'o', value_name = "OUT.mrt")]
    pub out: PathBuf,
    /// Sequence ids of the non-.mrt inputs, in order (e.g. `0-63` or `7,3,12`).
    #[arg(long, value_name = "IDS")]
    pub seq_ids: Option<String>,
    /// Format of the inputs (default: each input's extension, else its content).
    #[arg(long, value_enum, value_name = "FMT")]
    pub from: Option<FormatArg>,
    /// E, for inputs that do not record it.
    #[arg(long, value_name = "E", value_parser = positive())]
    pub num_experts: Option<usize>,
    /// L, for SGLang inputs (r3v1: L or K).
    #[arg(long, value_name = "L", value_parser = positive())]
    pub num_layers: Option<usize>,
    /// K, for SGLang inputs (r3v1: L or K).
    #[arg(long, value_name = "K", value_parser = positive())]
    pub top_k: Option<usize>,
    /// Layer ids of the L axis of array inputs.
    #[command(flatten)]
    pub layer: LayerArgs,
}

/// Parses `--seq-ids`: comma-separated ids or inclusive ranges `a-b`, in any order.
fn parse_seq_ids(s: &str) -> Result<Vec<u64>, CliError> {
    let bad = |p: &str| {
        CliError::Usage(format!(
            "--seq-ids {s:?}: {p:?} is not a sequence id or an ascending range; use e.g. `0-63` or `7,3,12`"
        ))
    };
    let mut v = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = p.split_once('-') {
            let a: u64 = a.trim().parse().map_err(|_| bad(p))?;
            let b: u64 = b.trim().parse().map_err(|_| bad(p))?;
            if b < a || b - a >= 1 << 24 {
                return Err(bad(p));
            }
            v.extend(a..=b);
        } else {
            v.push(p.parse().map_err(|_| bad(p))?);
        }
    }
    if v.is_empty() {
        return Err(bad(s));
    }
    Ok(v)
}

/// Why `h` (of `path`) cannot be merged with `first` (of `first_path`), if it cannot.
fn header_conflict(first: &TraceHeader, first_path: &Path, h: &TraceHeader, path: &Path) -> Option<String> {
    let (fp, p) = (first_path.display(), path.display());
    if h.num_experts() != first.num_experts() {
        return Some(format!(
            "{p}: E = {} but {fp} has E = {}; give --num-experts E (formats without E take max id + 1)",
            h.num_experts(),
            first.num_experts()
        ));
    }
    if h.top_k() != first.top_k() {
        return Some(format!("{p}: K = {} but {fp} has K = {}", h.top_k(), first.top_k()));
    }
    if h.layer_ids() != first.layer_ids() {
        return Some(format!(
            "{p}: layer map {:?} but {fp} has {:?}; give array inputs their model layer ids with --layers or --layers-from",
            h.layer_ids(),
            first.layer_ids()
        ));
    }
    if h.row_convention() != first.row_convention() {
        return Some(format!(
            "{p}: row convention {:?} but {fp} has {:?}",
            h.row_convention(),
            first.row_convention()
        ));
    }
    if h.fingerprint() != first.fingerprint() {
        return Some(format!(
            "{p}: routing-config fingerprint {:016x} but {fp} has {:016x} (recorded with another rule?)",
            h.fingerprint(),
            first.fingerprint()
        ));
    }
    if h.weight_version() != first.weight_version() {
        return Some(format!(
            "{p}: weight version {:?} but {fp} has {:?}",
            h.weight_version(),
            first.weight_version()
        ));
    }
    None
}

/// `moe-router merge`.
pub fn merge(a: &MergeArgs) -> Result<u8, CliError> {
    if Format::from_path(&a.out) != Some(Format::Mrt) {
        return Err(CliError::Usage(format!(
            "--out {}: merge writes an .mrt trace (several sequences); convert it afterwards",
            a.out.display()
        )));
    }
    let layers = a.layer.resolve()?;
    let mut formats = Vec::with_capacity(a.inputs.len());
    for p in &a.inputs {
        formats.push(detect(p, a.from)?);
    }
    let arrays = formats.iter().filter(|(f, _)| *f != Format::Mrt).count();
    let seq_ids: Vec<u64> = match &a.seq_ids {
        Some(s) => {
            let v = parse_seq_ids(s)?;
            if v.len() != arrays {
                return Err(CliError::Usage(format!(
                    "--seq-ids gives {} id(s) for {arrays} non-.mrt input(s); give one per input, in order",
                    v.len()
                )));
            }
            v
        }
        None => (0..arrays as u64).collect(),
    };
    let mut next_seq = seq_ids.into_iter();
    let mut merged: Option<(Trace, &Path)> = None;
    for (path, (format, bytes)) in a.inputs.iter().zip(formats) {
        let seq = if format == Format::Mrt { None } else { next_seq.next() };
        let opts = import_options(a.num_experts, a.num_layers, a.top_k, layers.clone(), seq);
        let t = load(path, format, bytes, &opts, &Progress(None))?.trace;
        if let Some(s) = seq {
            errln!("{} ({format}) -> sequence {s}", path.display());
        }
        match &mut merged {
            None => merged = Some((t, path.as_path())),
            Some((m, first)) => {
                if let Some(why) = header_conflict(m.header(), first, t.header(), path) {
                    return Err(CliError::Input(why));
                }
                m.merge(&t).map_err(|e| {
                    CliError::Input(format!(
                        "{}: {e} (a position recorded with other ids by an earlier input; nothing was written)",
                        path.display()
                    ))
                })?;
            }
        }
    }
    let Some((trace, _)) = merged else {
        return Err(CliError::Usage("merge needs at least one input".into()));
    };
    write_mrt(&trace, &a.out, &Progress(None))?;
    let s = trace.summary();
    errln!(
        "merged {} input(s) -> {}: {} sequence(s), {} tokens, {} layers, K = {}, E = {}",
        a.inputs.len(),
        a.out.display(),
        s.sequences,
        s.tokens,
        trace.header().layers().len(),
        trace.header().top_k(),
        trace.header().num_experts()
    );
    Ok(EXIT_OK)
}
