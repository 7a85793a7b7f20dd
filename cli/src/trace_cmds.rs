//! Trace commands: `convert`, `inspect`, `validate` and `diff`.
//!
//! Inputs are any format of [`moe_router_core::interop`] (`mrt`, `npy`, `safetensors`, `sglang`,
//! `nrlre1`, `r3v1`, `prime-rl`). The format is taken from `--from` / `--to`, else from the
//! extension where it is unambiguous (`.mrt`, `.npy`, `.safetensors`, `.msgpack` → prime-rl);
//! `inspect`, `validate` and `diff` (which have no `--from`) also recognise the content.

use crate::{CliError, EXIT_INVALID, EXIT_OK, EXIT_USAGE};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_router_core::interop::{self, ExportOptions, Format, ImportOptions, IntDtype, InteropError};
use moe_router_core::metrics::{compare, load_stats};
use moe_router_core::trace::{
    IndexState, OpenOptions, RecoveryReport, Trace, TraceError, TraceFile, TraceWriter, ValidationIssue, Verify,
    WriterOptions,
};
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<(String, String)>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with what the trace commands print to standard output and standard error captured
/// (for tests and embedding): returns `f`'s result, the output and the error text. Errors that
/// [`crate::run`] itself prints are not captured.
pub fn capture_output<R>(f: impl FnOnce() -> R) -> (R, String, String) {
    let prev = CAPTURE.with(|c| c.replace(Some((String::new(), String::new()))));
    let r = f();
    let (out, err) = CAPTURE.with(|c| c.replace(prev)).unwrap_or_default();
    (r, out, err)
}

fn emit(line: String, to_err: bool) {
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
    ($($t:tt)*) => { emit(format!($($t)*), false) };
}
macro_rules! errln {
    ($($t:tt)*) => { emit(format!($($t)*), true) };
}

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
    #[arg(long, value_name = "L")]
    pub num_layers: Option<usize>,
    /// K, for an SGLang input (r3v1: L or K).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
}

/// Arguments of `validate`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  moe-router validate rollout.mrt --num-experts 128\n  \
moe-router validate routes.npy --num-experts 128 --json\n\n\
Exit codes: 0 valid; 3 invalid (checksum failures, truncated or damaged data, ids >= E,\n\
duplicate ids in a row, rows missing in some slots only, all-zero layers, MoE layers without\n\
routes, E different from --num-experts); 1 the input could not be read; 2 usage error.\n\
Coverage (rows present / missing per layer, sequences whose layers cover different rows) is\n\
reported as well.")]
pub struct ValidateArgs {
    /// Input (any importable format).
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// E expected by the model: ids must be below it (and an .mrt header must say it).
    #[arg(long, value_name = "E")]
    pub num_experts: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// L, for an SGLang input (r3v1: L or K).
    #[arg(long, value_name = "L")]
    pub num_layers: Option<usize>,
    /// K, for an SGLang input (r3v1: L or K).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
}

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

/// Parses a layer list: comma-separated ids or inclusive ranges `a-b`.
pub fn parse_layers(s: &str) -> Result<Vec<u32>, CliError> {
    let bad = |p: &str| {
        CliError::Input(format!(
            "--layers {s:?}: {p:?} is not a layer id or range; use e.g. `0,1,3` or `1-47`"
        ))
    };
    let mut v = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = p.split_once('-') {
            let a: u32 = a.trim().parse().map_err(|_| bad(p))?;
            let b: u32 = b.trim().parse().map_err(|_| bad(p))?;
            if b < a || (b - a) as usize >= moe_router_core::trace::MAX_LAYERS {
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
        return Err(CliError::Input(format!(
            "--layers {s:?}: layer ids must be strictly ascending ({} then {})",
            w[0], w[1]
        )));
    }
    Ok(v)
}

fn interop_err(path: &Path, e: InteropError) -> CliError {
    CliError::Input(format!("{}: {e}", path.display()))
}

fn trace_err(path: &Path, e: TraceError) -> CliError {
    CliError::Input(format!("{}: {e}", path.display()))
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
        Some(b) => Format::sniff(b).ok_or_else(|| {
            format!(
                "{}: cannot tell the format from the extension or the content; convert it first with \
                 `moe-router convert {} OUT.mrt --from FMT` (FMT: {FORMATS})",
                path.display(),
                path.display()
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
) -> ImportOptions {
    ImportOptions {
        num_experts,
        num_layers: l,
        top_k: k,
        layers,
        ..ImportOptions::default()
    }
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

/// The format of an input from its extension, else its content (then returned too, so it is
/// read once; an `.mrt` file is memory-mapped instead).
fn detect(path: &Path) -> Result<(Format, Option<Vec<u8>>), CliError> {
    if let Some(f) = Format::from_path(path) {
        return Ok((f, None));
    }
    let bytes = read_bytes(path)?;
    let f = input_format(path, None, Some(&bytes)).map_err(CliError::Input)?;
    Ok((f, Some(bytes).filter(|_| f != Format::Mrt)))
}

/// Reads an input whose format comes from the extension or the content.
fn load_any(path: &Path, opts: &ImportOptions) -> Result<Loaded, CliError> {
    let (format, bytes) = detect(path)?;
    load(path, format, bytes, opts, &Progress(None))
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

fn header_json(trace_header: &moe_router_core::trace::TraceHeader) -> Value {
    let h = trace_header;
    json!({
        "num_experts": h.num_experts(),
        "top_k": h.top_k(),
        "id_width": match h.id_width() { moe_router_core::trace::IdWidth::U8 => "u8", moe_router_core::trace::IdWidth::U16 => "u16" },
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
    let (format, bytes) = detect(path)?;
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
        out["format_version"] = json!(format!("1.{}", r.minor_version));
        file_json(&mut out, &r);
        out["chunk_table"] = serde_json::to_value(tf.chunk_infos()).unwrap_or(Value::Null);
        tf.to_trace().map_err(|e| trace_err(path, e))?
    } else {
        let opts = import_options(None, a.num_layers, a.top_k, None);
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

/// Findings of `validate`.
#[derive(Default)]
struct Findings {
    errors: Vec<Value>,
    warnings: Vec<Value>,
    checksum_failures: u64,
    out_of_range: u64,
    duplicates: u64,
    partial_missing: u64,
    all_zero_layers: Vec<u32>,
    empty_layers: Vec<u32>,
}

impl Findings {
    fn error(&mut self, kind: &str, message: String) {
        self.errors.push(json!({ "kind": kind, "message": message }));
    }
    fn warning(&mut self, kind: &str, message: String) {
        self.warnings.push(json!({ "kind": kind, "message": message }));
    }
    /// Classifies a trace error found in a chunk or on open.
    fn trace_error(&mut self, e: &TraceError, context: String) {
        let root = match e {
            TraceError::InChunk { source, .. } => source.as_ref(),
            other => other,
        };
        let kind = match root {
            TraceError::Checksum { .. } => {
                self.checksum_failures += 1;
                "checksum"
            }
            TraceError::IdOutOfRange { .. } => {
                self.out_of_range += 1;
                "out_of_range"
            }
            TraceError::DuplicateId { .. } => {
                self.duplicates += 1;
                "duplicate"
            }
            TraceError::PartialMissing { .. } => {
                self.partial_missing += 1;
                "partial_missing"
            }
            TraceError::Truncated { .. } => "truncated",
            _ => "malformed",
        };
        self.error(kind, format!("{context}{e}"));
    }
    fn interop_error(&mut self, e: &InteropError) {
        let kind = match e {
            InteropError::IdOutOfRange { .. } => {
                self.out_of_range += 1;
                "out_of_range"
            }
            InteropError::DuplicateId { .. } => {
                self.duplicates += 1;
                "duplicate"
            }
            InteropError::PartialMissing { .. } => {
                self.partial_missing += 1;
                "partial_missing"
            }
            InteropError::Negative { .. } => "negative",
            InteropError::Truncated { .. } => "truncated",
            _ => "malformed",
        };
        self.error(kind, e.to_string());
    }
}

/// `moe-router validate`.
pub fn validate(a: &ValidateArgs) -> Result<u8, CliError> {
    let path = &a.input;
    let (format, bytes) = detect(path)?;
    let mut f = Findings::default();
    let mut out = json!({ "input": path.display().to_string(), "format": format.name() });
    let mut trace: Option<Trace> = None;
    if format == Format::Mrt {
        match TraceFile::open_with(
            path,
            OpenOptions {
                verify: Verify::Eager,
                salvage: true,
            },
        ) {
            Err(e @ TraceError::Io { .. }) => return Err(trace_err(path, e)),
            Err(e) => f.trace_error(&e, String::new()),
            Ok(tf) => {
                let r = tf.report().clone();
                file_json(&mut out, &r);
                if let Some(t) = &r.tail {
                    f.error(
                        "truncated",
                        format!(
                            "tail truncated: {} bytes lost from offset {} ({}); {} complete chunk(s) recovered",
                            t.bytes, t.offset, t.reason, r.chunks
                        ),
                    );
                }
                for d in &r.damaged {
                    let kind = if d.reason.contains("checksum") {
                        f.checksum_failures += 1;
                        "checksum"
                    } else if d.reason.contains("out of range") {
                        f.out_of_range += 1;
                        "out_of_range"
                    } else if d.reason.contains("appears twice") {
                        f.duplicates += 1;
                        "duplicate"
                    } else if d.reason.contains("partly missing") {
                        f.partial_missing += 1;
                        "partial_missing"
                    } else {
                        "malformed"
                    };
                    f.error(
                        kind,
                        format!("damaged chunk at offset {} ({} bytes): {}", d.offset, d.bytes, d.reason),
                    );
                }
                match &r.index {
                    IndexState::Present => {}
                    IndexState::Absent => f.warning("index", "no index (file not closed); rebuilt by scanning".into()),
                    IndexState::Rebuilt { reason } => {
                        f.warning("index", format!("index ignored and rebuilt by scanning: {reason}"))
                    }
                }
                let h = tf.header();
                if let Some(e) = a.num_experts
                    && e != h.num_experts()
                {
                    f.error(
                        "num_experts",
                        format!(
                            "the header says E = {}, the model has --num-experts {e}",
                            h.num_experts()
                        ),
                    );
                }
                match tf.to_trace() {
                    Ok(t) => {
                        if let Some(e) = a.num_experts.filter(|&e| e < h.num_experts()) {
                            check_range(&t, e, &mut f);
                        }
                        trace = Some(t);
                    }
                    Err(e) => f.trace_error(&e, String::new()),
                }
            }
        }
    } else {
        let opts = import_options(a.num_experts, a.num_layers, a.top_k, None);
        let bytes = match bytes {
            Some(b) => b,
            None => read_bytes(path)?,
        };
        match interop::decode(format, &bytes, &opts) {
            Err(e @ InteropError::MissingOption { .. }) => {
                return Err(CliError::Input(format!("{}: {e}", path.display())));
            }
            Err(e) => f.interop_error(&e),
            Ok(dense) => {
                if a.num_experts.is_none() && dense.num_experts.is_none() {
                    f.warning(
                        "num_experts",
                        format!(
                            "{format} does not record E; ids were checked only against the largest id (pass --num-experts E)"
                        ),
                    );
                }
                match dense.to_trace_lossy(format, &opts, 20) {
                    Err(e) => f.interop_error(&e),
                    Ok((t, check)) => {
                        f.out_of_range += check.out_of_range_rows;
                        f.duplicates += check.duplicate_rows;
                        f.partial_missing += check.partial_missing_rows;
                        for e in &check.examples {
                            let kind = match e {
                                InteropError::IdOutOfRange { .. } => "out_of_range",
                                InteropError::DuplicateId { .. } => "duplicate",
                                _ => "partial_missing",
                            };
                            f.error(kind, e.to_string());
                        }
                        let shown = check.examples.len() as u64;
                        let total = check.out_of_range_rows + check.duplicate_rows + check.partial_missing_rows;
                        if total > shown {
                            f.error("more", format!("{} more invalid row(s) not listed", total - shown));
                        }
                        out["num_experts"] = json!(check.num_experts);
                        trace = Some(t);
                    }
                }
            }
        }
    }
    if let Some(t) = &trace {
        out["num_experts"] = json!(t.header().num_experts());
        let nonempty = !t.is_empty();
        for issue in t.validation_issues() {
            match issue {
                ValidationIssue::AllZeroLayer { layer, rows } => {
                    f.all_zero_layers.push(layer);
                    f.error(
                        "all_zero_layer",
                        format!(
                            "layer {layer}: all {rows} rows route only to expert 0 (capture bypassed or zero-filled?)"
                        ),
                    );
                }
                ValidationIssue::EmptyLayer { layer } => {
                    f.empty_layers.push(layer);
                    if nonempty {
                        f.error("empty_layer", format!("layer {layer} of the layer map has no routes"));
                    }
                }
                ValidationIssue::UnevenCoverage {
                    seq,
                    layer,
                    rows,
                    max_rows,
                } => f.warning(
                    "uneven_coverage",
                    format!("sequence {seq}: layer {layer} has {rows} rows, another layer {max_rows}"),
                ),
            }
        }
        if !nonempty {
            f.warning("empty", "the input holds no routes".into());
        }
        let s = t.summary();
        let stored = s.rows + s.missing_rows;
        out["coverage"] = json!({
            "sequences": s.sequences,
            "tokens": s.tokens,
            "rows_present": s.rows,
            "rows_missing": s.missing_rows,
            "fraction_present": if stored == 0 { 0.0 } else { s.rows as f64 / stored as f64 },
            "per_layer": s.layers,
        });
    }
    let valid = f.errors.is_empty();
    out["valid"] = json!(valid);
    out["checksum_failures"] = json!(f.checksum_failures);
    out["out_of_range"] = json!(f.out_of_range);
    out["duplicates"] = json!(f.duplicates);
    out["partial_missing"] = json!(f.partial_missing);
    out["all_zero_layers"] = json!(f.all_zero_layers);
    out["empty_layers"] = json!(f.empty_layers);
    out["errors"] = json!(f.errors);
    out["warnings"] = json!(f.warnings);
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        outln!("{}: {}", path.display(), if valid { "valid" } else { "INVALID" });
        for e in &f.errors {
            outln!(
                "  error [{}]: {}",
                e["kind"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            );
        }
        for w in &f.warnings {
            outln!(
                "  warning [{}]: {}",
                w["kind"].as_str().unwrap_or(""),
                w["message"].as_str().unwrap_or("")
            );
        }
        let c = &out["coverage"];
        if !c.is_null() {
            outln!(
                "  coverage: {} sequence(s), {} tokens, {} rows present, {} missing ({:.1}% present)",
                c["sequences"],
                c["tokens"],
                c["rows_present"],
                c["rows_missing"],
                100.0 * c["fraction_present"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(if valid { EXIT_OK } else { EXIT_INVALID })
}

/// Reports rows of `t` with ids `≥ e` (when the model's E is below the header's).
fn check_range(t: &Trace, e: usize, f: &mut Findings) {
    let k = t.header().top_k();
    let mut row = vec![0u32; k];
    let codec = *t.codec();
    let mut shown = 0;
    for lane in t.lanes() {
        for r in &lane.runs {
            for (i, b) in r.bytes.chunks_exact(codec.row_bytes()).enumerate() {
                if codec.is_missing(b) {
                    continue;
                }
                codec.decode_into(b, &mut row);
                if let Some((slot, id)) = row.iter().enumerate().find(|(_, x)| **x as usize >= e) {
                    f.out_of_range += 1;
                    if shown < 20 {
                        shown += 1;
                        f.error(
                            "out_of_range",
                            format!(
                                "sequence {}, layer {}, position {}, slot {slot}: id {id} is out of range (--num-experts {e})",
                                lane.seq,
                                lane.layer,
                                r.start + i as u64
                            ),
                        );
                    }
                }
            }
        }
    }
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

/// The long `--help` text of a trace subcommand (`convert`, `inspect`, `validate`, `diff`).
pub fn long_help(subcommand: &str) -> Option<String> {
    use clap::Args as _;
    let mut c = match subcommand {
        "convert" => ConvertArgs::augment_args(clap::Command::new("convert")),
        "inspect" => InspectArgs::augment_args(clap::Command::new("inspect")),
        "validate" => ValidateArgs::augment_args(clap::Command::new("validate")),
        "diff" => DiffArgs::augment_args(clap::Command::new("diff")),
        _ => return None,
    };
    Some(c.render_long_help().to_string())
}
