//! Trace commands: `convert`, `inspect`, `validate`, `diff` and `merge`.
//!
//! Inputs are any format of [`moe_router::interop`] (`mrt`, `npy`, `safetensors`, `sglang`,
//! `nrlre1`, `r3v1`, `prime-rl`). The format is taken from `--from` / `--to`, else from the
//! extension where it is unambiguous (`.mrt`, `.npy`, `.safetensors`, `.msgpack` → prime-rl);
//! `inspect`, `validate`, `diff` and `merge` also recognise the content.

use crate::CliError;
use crate::error::at_path;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_router::SeqId;
use moe_router::interop::{self, Format, ImportOptions, IntDtype, InteropError};
use moe_router::trace::{RecoveryReport, Trace, TraceError, TraceFile};
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<(String, String)>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with what the trace commands print to standard output and standard error captured
/// (for tests and embedding): returns `f`'s result, the output and the error text. The error
/// messages and usage errors (and `--help`) that [`crate::run`] prints are captured too; the
/// tables of `route`, `bench` and `demo` are not.
pub fn capture_output<R>(f: impl FnOnce() -> R) -> (R, String, String) {
    let prev = CAPTURE.with(|c| c.replace(Some((String::new(), String::new()))));
    let r = f();
    let (out, err) = CAPTURE.with(|c| c.replace(prev)).unwrap_or_default();
    (r, out, err)
}

/// Whether [`capture_output`] is capturing on this thread.
pub(crate) fn capturing() -> bool {
    CAPTURE.with(|c| c.borrow().is_some())
}

/// Prints one line to standard output or (`to_err`) standard error, or appends it to the
/// capture of [`capture_output`].
pub(crate) fn emit(line: String, to_err: bool) {
    let captured = CAPTURE.with(|c| {
        let mut c = c.borrow_mut();
        match c.as_mut() {
            Some((o, e)) => {
                let buf = if to_err { e } else { o };
                buf.push_str(&line);
                buf.push('\n');
                true
            }
            None => false,
        }
    });
    if !captured {
        use std::io::Write as _;
        // A closed pipe (`| head`) ends the output quietly instead of panicking.
        let _ = if to_err {
            writeln!(std::io::stderr().lock(), "{line}")
        } else {
            writeln!(std::io::stdout().lock(), "{line}")
        };
    }
}

macro_rules! outln {
    ($($t:tt)*) => { $crate::trace_cmds::emit(format!($($t)*), false) };
}
macro_rules! errln {
    ($($t:tt)*) => { $crate::trace_cmds::emit(format!($($t)*), true) };
}

// One module per command. They come after `outln!` / `errln!` above, which they use; what they
// share stays in this module.
mod convert;
mod diff;
mod inspect;
mod merge;
mod validate;

pub use convert::{ConvertArgs, convert};
pub use diff::{DiffArgs, diff};
pub use inspect::{InspectArgs, inspect};
pub use merge::{MergeArgs, merge};
pub use validate::{ValidateArgs, validate};

/// A format name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// The moe-router trace file (.mrt).
    Mrt,
    /// NumPy .npy [T, L, K].
    Npy,
    /// safetensors with tensor routed_experts [T, L, K].
    Safetensors,
    /// SGLang: base64 of little-endian int32, flat [T, L, K] (needs --num-layers and --top-k).
    Sglang,
    /// NeMo Gym envelope nrlre1:DTYPE:TxLxK:BASE64 (DTYPE int8, int16 or int32).
    Nrlre1,
    /// Fireworks R3/v1: base64 of a zstd frame (needs --num-layers or --top-k).
    R3v1,
    /// prime-rl msgpack {data, shape, dtype, start}.
    PrimeRl,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Mrt => Format::Mrt,
            FormatArg::Npy => Format::Npy,
            FormatArg::Safetensors => Format::Safetensors,
            FormatArg::Sglang => Format::Sglang,
            FormatArg::Nrlre1 => Format::Nrlre1,
            FormatArg::R3v1 => Format::R3v1,
            FormatArg::PrimeRl => Format::PrimeRl,
        }
    }
}

const FORMATS: &str = "mrt, npy, safetensors, sglang, nrlre1, r3v1, prime-rl";

/// The value parser of counts that must be at least 1 (`--num-experts`, `--num-layers`,
/// `--top-k`): 0 is a usage error (exit 2).
pub fn positive() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// The model layer ids of the L axis of array inputs: `--layers IDS`, or `--layers-from
/// config.json` (the MoE layers of a Hugging Face config, see
/// [`moe_router::import::hf::hf_moe_layers`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LayerArgs {
    /// Model layer ids of the L axis of array inputs, e.g. `0-47` or `1,3,5` (default 0..L).
    #[arg(long, value_name = "IDS", conflicts_with = "layers_from")]
    pub layers: Option<String>,
    /// Take the layer ids from a Hugging Face config.json: its MoE layers (dense layers, e.g.
    /// DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers, are left out).
    #[arg(long, value_name = "C.json")]
    pub layers_from: Option<PathBuf>,
    /// With --layers-from: append the multi-token-prediction layers (num_nextn_predict_layers).
    #[arg(long, requires = "layers_from")]
    pub mtp_layers: bool,
}

impl LayerArgs {
    /// The layer ids given, if any.
    pub fn resolve(&self) -> Result<Option<Vec<u32>>, CliError> {
        if let Some(s) = &self.layers {
            return parse_layers(s).map(Some);
        }
        let Some(p) = &self.layers_from else { return Ok(None) };
        let text = std::fs::read_to_string(p).map_err(|e| CliError::io(p, &e))?;
        let m = moe_router::import::hf::hf_moe_layers(&text).map_err(|e| CliError::Config {
            context: format!("--layers-from {}", p.display()),
            source: e,
        })?;
        Ok(Some(if self.mtp_layers { m.with_mtp() } else { m.layers }))
    }
}

/// What `--layers` / `--layers-from [--mtp-layers]` say about the model.
#[derive(Debug, Clone, Default)]
pub struct ResolvedLayers {
    /// The layer ids of the L axis, if given.
    pub layers: Option<Vec<u32>>,
    /// Layers of those that are MTP blocks (from `--layers-from` with `--mtp-layers`).
    pub kinds: Vec<(u32, moe_router::LayerKind)>,
    /// The model's layers (from `--layers-from`).
    pub model: Option<moe_router::metrics::explain::ModelLayers>,
}

impl LayerArgs {
    /// [`LayerArgs::resolve`] with the MTP kinds and the model's layers.
    pub fn resolve_full(&self) -> Result<ResolvedLayers, CliError> {
        if let Some(s) = &self.layers {
            return Ok(ResolvedLayers {
                layers: Some(parse_layers(s)?),
                ..ResolvedLayers::default()
            });
        }
        let Some(p) = &self.layers_from else {
            return Ok(ResolvedLayers::default());
        };
        let text = std::fs::read_to_string(p).map_err(|e| CliError::io(p, &e))?;
        let m = moe_router::import::hf::hf_moe_layers(&text).map_err(|e| CliError::Config {
            context: format!("--layers-from {}", p.display()),
            source: e,
        })?;
        let model = moe_router::metrics::explain::ModelLayers {
            num_hidden_layers: Some(m.num_hidden_layers),
            moe_layers: m.layers.clone(),
            mtp_layers: m.mtp_layers.clone(),
        };
        Ok(if self.mtp_layers {
            ResolvedLayers {
                layers: Some(m.with_mtp()),
                kinds: m.mtp_layers.iter().map(|&l| (l, moe_router::LayerKind::Mtp)).collect(),
                model: Some(model),
            }
        } else {
            ResolvedLayers {
                layers: Some(m.layers),
                kinds: Vec::new(),
                model: Some(model),
            }
        })
    }
}

/// Parses a layer list: comma-separated ids or inclusive ranges `a-b`. A malformed list is a
/// usage error (exit 2).
pub fn parse_layers(s: &str) -> Result<Vec<u32>, CliError> {
    parse_ids("--layers", s)
}

/// Parses a list of ids (`--layers`, `--seq-ids`): comma-separated ids or inclusive ranges
/// `a-b`, strictly ascending. A malformed list is a usage error (exit 2).
fn parse_ids(flag: &str, s: &str) -> Result<Vec<u32>, CliError> {
    let bad = |p: &str| {
        CliError::Usage(format!(
            "{flag} {s:?}: {p:?} is not an id or an ascending range; use e.g. `0,1,3` or `0-47`"
        ))
    };
    let mut v = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = p.split_once('-') {
            let a: u32 = a.trim().parse().map_err(|_| bad(p))?;
            let b: u32 = b.trim().parse().map_err(|_| bad(p))?;
            if b < a || (b - a) as usize >= moe_router::trace::MAX_LAYERS {
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
    if let Some(w) = v.windows(2).find(|w| w[0] >= w[1]) {
        return Err(CliError::Usage(format!(
            "{flag} {s:?}: ids must be strictly ascending ({} then {})",
            w[0], w[1]
        )));
    }
    Ok(v)
}

fn interop_err(path: &Path, e: InteropError) -> CliError {
    CliError::Input(at_path(path, e))
}

fn trace_err(path: &Path, e: TraceError) -> CliError {
    CliError::Input(at_path(path, e))
}

fn read_bytes(p: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError::io(p, &e))
}

/// The format of an input: `--from`, the extension, or (when `sniff`) the content.
fn input_format(path: &Path, given: Option<FormatArg>, bytes: Option<&[u8]>) -> Result<Format, String> {
    if let Some(f) = given {
        return Ok(f.into());
    }
    if let Some(f) = Format::from_path(path) {
        return Ok(f);
    }
    match bytes {
        Some([]) => Err(format!(
            "{}: the file is empty (0 bytes): the engine captured nothing, or the capture was not written",
            path.display()
        )),
        Some(b) => Format::sniff(b).ok_or_else(|| {
            format!(
                "{}: cannot tell the format from the extension or the content; pass --from FMT (FMT: {FORMATS})",
                path.display(),
            )
        }),
        None => Err(format!(
            "{}: cannot tell the input format from the extension; pass --from FMT (one of {FORMATS})",
            path.display()
        )),
    }
}

/// A progress bar on stderr when it is a terminal (hidden otherwise, e.g. when piped).
struct Progress(Option<ProgressBar>);

impl Progress {
    /// Shown only on a terminal and for inputs of at least `MIN_BYTES`.
    fn new(input_bytes: u64) -> Self {
        const MIN_BYTES: u64 = 1 << 20;
        if !std::io::stderr().is_terminal() || input_bytes < MIN_BYTES {
            return Progress(None);
        }
        let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}") {
            pb.set_style(style.progress_chars("=> "));
        }
        Progress(Some(pb))
    }
    fn stage(&self, msg: &'static str, len: u64) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg);
            pb.set_length(len);
            pb.set_position(0);
        }
    }
    fn set(&self, pos: u64) {
        if let Some(pb) = &self.0 {
            pb.set_position(pos);
        }
    }
    fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

/// A loaded input.
struct Loaded {
    trace: Trace,
    format: Format,
    /// The element type of an `.npy` input.
    npy_dtype: Option<IntDtype>,
}

fn import_options(
    num_experts: Option<usize>,
    l: Option<usize>,
    k: Option<usize>,
    layers: Option<Vec<u32>>,
    seq: Option<u64>,
) -> ImportOptions {
    ImportOptions {
        num_experts,
        num_layers: l,
        top_k: k,
        layers,
        seq: SeqId(seq.unwrap_or(0)),
        ..ImportOptions::default()
    }
}

/// The routes of sequence `seq` only (an error naming the sequences there are when `seq` is not
/// one of them).
fn select_seq(trace: Trace, seq: u64, path: &Path) -> Result<Trace, CliError> {
    let seqs = trace.sequences();
    if seqs.len() == 1 && seqs[0] == SeqId(seq) {
        return Ok(trace);
    }
    if !seqs.contains(&SeqId(seq)) {
        let shown: Vec<String> = seqs.iter().take(16).map(|s| s.0.to_string()).collect();
        return Err(CliError::Input(format!(
            "{}: --seq {seq}: no such sequence (the input holds {}: {}{})",
            path.display(),
            seqs.len(),
            shown.join(", "),
            if seqs.len() > 16 { ", …" } else { "" }
        )));
    }
    let mut out = Trace::new(trace.header().clone());
    for lane in trace.lanes().filter(|l| l.seq == SeqId(seq)) {
        for r in &lane.runs {
            out.append_stored(lane.seq, lane.layer, r.start, r.bytes, true)
                .map_err(|e| trace_err(path, e))?;
        }
    }
    Ok(out)
}

/// Loads any input into a trace (strict).
fn load(
    path: &Path,
    format: Format,
    bytes: Option<Vec<u8>>,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Loaded, CliError> {
    if format == Format::Mrt {
        drop(bytes);
        let tf = TraceFile::open(path).map_err(|e| trace_err(path, e))?;
        let h = tf.header();
        if let Some(e) = opts.num_experts
            && e != h.num_experts()
        {
            return Err(CliError::Input(format!(
                "{}: --num-experts {e} but the trace header says E = {}; drop the flag or check the file",
                path.display(),
                h.num_experts()
            )));
        }
        if let Some(l) = &opts.layers
            && *l != h.layer_ids()
        {
            return Err(CliError::Input(format!(
                "{}: --layers {l:?} but the trace's layer map is {:?}; drop the flag or check the file",
                path.display(),
                h.layer_ids()
            )));
        }
        progress.stage("reading", 1);
        let trace = tf.to_trace().map_err(|e| trace_err(path, e))?;
        if trace.summary().rows == 0 {
            return Err(CliError::Input(format!(
                "{}: the trace holds no routes (nothing was recorded)",
                path.display()
            )));
        }
        return Ok(Loaded {
            trace,
            format,
            npy_dtype: None,
        });
    }
    progress.stage("decoding", 1);
    let bytes = match bytes {
        Some(b) => b,
        None => read_bytes(path)?,
    };
    let dense = interop::decode(format, &bytes, opts).map_err(|e| interop_err(path, e))?;
    drop(bytes);
    let npy_dtype = dense.source_dtype.filter(|_| format == Format::Npy);
    progress.stage("importing", dense.dim().1 as u64);
    let trace = dense
        .to_trace_with_progress(format, opts, |done, _| progress.set(done as u64))
        .map_err(|e| interop_err(path, e))?;
    Ok(Loaded {
        trace,
        format,
        npy_dtype,
    })
}

/// The format of an input from `--from`, its extension, else its content (then returned too, so
/// it is read once; an `.mrt` file is memory-mapped instead).
fn detect(path: &Path, given: Option<FormatArg>) -> Result<(Format, Option<Vec<u8>>), CliError> {
    if let Some(f) = given.map(Format::from).or_else(|| Format::from_path(path)) {
        return Ok((f, None));
    }
    let bytes = read_bytes(path)?;
    let f = input_format(path, None, Some(&bytes)).map_err(CliError::Input)?;
    Ok((f, Some(bytes).filter(|_| f != Format::Mrt)))
}

fn file_json(out: &mut Value, r: &RecoveryReport) {
    out["file_bytes"] = json!(r.file_bytes);
    out["index"] = serde_json::to_value(&r.index).unwrap_or(Value::Null);
    out["chunks"] = json!(r.chunks);
    out["truncated"] = json!(r.truncated());
    out["tail"] = serde_json::to_value(&r.tail).unwrap_or(Value::Null);
    out["recovered_bytes"] = json!(r.recovered_bytes);
    out["recovered_chunks"] = json!(r.chunks);
    out["damaged"] = serde_json::to_value(&r.damaged).unwrap_or(Value::Null);
}

/// The long `--help` text of a trace subcommand (`convert`, `inspect`, `validate`, `diff`,
/// `merge`).
pub fn long_help(subcommand: &str) -> Option<String> {
    use clap::Args as _;
    let mut c = match subcommand {
        "convert" => ConvertArgs::augment_args(clap::Command::new("convert")),
        "inspect" => InspectArgs::augment_args(clap::Command::new("inspect")),
        "validate" => ValidateArgs::augment_args(clap::Command::new("validate")),
        "diff" => DiffArgs::augment_args(clap::Command::new("diff")),
        "merge" => MergeArgs::augment_args(clap::Command::new("merge")),
        _ => return None,
    };
    Some(c.render_long_help().to_string())
}
