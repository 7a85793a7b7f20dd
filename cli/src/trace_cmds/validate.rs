//! `moe-router validate`.

use super::{FormatArg, LayerArgs, detect, file_json, import_options, positive, read_bytes, select_seq, trace_err};
use crate::{CliError, EXIT_INVALID, EXIT_OK};
use moe_router::interop::{self, Format, InteropError};
use moe_router::metrics::explain;
use moe_router::trace::{IndexState, OpenOptions, Trace, TraceError, TraceFile, ValidationIssue, Verify};
use serde_json::{Value, json};
use std::path::PathBuf;

/// Arguments of `validate`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  moe-router validate rollout.mrt --num-experts 128\n  \
moe-router validate routes.npy --num-experts 128 --layers-from config.json --json\n  \
moe-router validate capture.b64 --from sglang --num-layers 48 --top-k 8 --num-experts 128\n  \
moe-router validate meta_info.json --from sglang --num-layers 48 --top-k 8   (applies routed_experts_start_len)\n  \
moe-router validate rollout.mrt --explain --layers-from config.json --mtp-layers --weight-version 12\n  \
moe-router validate rollout.mrt --explain --against trainer.mrt\n\n\
--explain looks for the silent failures that pass the row checks, each named with its evidence\n\
(JSON key `explain`: list of {class, message, evidence}): orphaned_layer (a layer never replayed),\n\
mtp_collision (MTP rows that would land on a decoder layer), row_shift (a constant row offset\n\
against --against: padding or THD misalignment; the best-aligning shift), garbage_rows (one constant\n\
row over many positions: placeholder prompt rows), weight_version (differs from --weight-version or\n\
from --against). Each finding is an error (exit 3).\n\n\
Exit codes: 0 valid; 3 invalid (checksum failures, truncated or damaged data, ids >= E,\n\
duplicate ids in a row, rows missing in some slots only, all-zero layers, MoE layers without\n\
routes, no routes at all (an empty capture), E different from --num-experts, a layer map\n\
different from --layers / --layers-from); 1 the input could not be read; 2 usage error.\n\
Coverage (rows present / missing per layer, sequences whose layers cover different rows) is\n\
reported as well. The text output lists the first 20 errors and says how many more there are;\n\
--json lists up to 1000 (errors_not_listed counts the rest).")]
pub struct ValidateArgs {
    /// Input (any importable format).
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// E expected by the model: ids must be below it (and an .mrt header must say it).
    #[arg(long, value_name = "E", value_parser = positive())]
    pub num_experts: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// L, for an SGLang input (r3v1: L or K).
    #[arg(long, value_name = "L", value_parser = positive())]
    pub num_layers: Option<usize>,
    /// K, for an SGLang input (r3v1: L or K).
    #[arg(long, value_name = "K", value_parser = positive())]
    pub top_k: Option<usize>,
    /// Input format (default: from the extension, else the content).
    #[arg(long, value_enum, value_name = "FMT")]
    pub from: Option<FormatArg>,
    /// The model's MoE layer ids: the L axis of an array input, and what an .mrt header's layer
    /// map must say.
    #[command(flatten)]
    pub layer: LayerArgs,
    /// Validate only this sequence (file-level checks still cover the whole file; an array
    /// input, which is one sequence, is taken as it).
    #[arg(long, value_name = "ID")]
    pub seq: Option<u64>,
    /// Position of the first row of an array input (routes after a cached prefix, e.g. SGLang's
    /// routed_experts_start_len).
    #[arg(long, value_name = "POS")]
    pub start: Option<u64>,
    /// Look for the silent-failure classes (see below) against --layers-from, --against and
    /// --weight-version.
    #[arg(long)]
    pub explain: bool,
    /// A second trace to explain against (the trainer's own routes, another capture).
    #[arg(long, value_name = "B", requires = "explain")]
    pub against: Option<PathBuf>,
    /// The weight version the routes must have been recorded with.
    #[arg(long, value_name = "N", requires = "explain")]
    pub weight_version: Option<u64>,
}

/// Errors listed in the JSON output (the rest are counted in `errors_not_listed`).
const MAX_LISTED: usize = 1000;
/// Errors listed in the text output before "and N more".
const TEXT_LISTED: usize = 20;

/// Findings of `validate`.
#[derive(Default)]
struct Findings {
    errors: Vec<Value>,
    /// Errors found but not listed in `errors`.
    unlisted: u64,
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
        if self.errors.len() < MAX_LISTED {
            self.errors.push(json!({ "kind": kind, "message": message }));
        } else {
            self.unlisted += 1;
        }
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
            InteropError::Empty { .. } => "empty",
            _ => "malformed",
        };
        self.error(kind, e.to_string());
    }
}

/// `moe-router validate`.
pub fn validate(a: &ValidateArgs) -> Result<u8, CliError> {
    let path = &a.input;
    let resolved = a.layer.resolve_full()?;
    let layers = resolved.layers.clone();
    let size = std::fs::metadata(path).map_err(|e| CliError::io(path, &e))?.len();
    let mut f = Findings::default();
    if size == 0 {
        let mut out = json!({ "input": path.display().to_string(), "format": a.from.map(|x| Format::from(x).name()) });
        f.error(
            "empty",
            "the file is empty (0 bytes): the engine captured nothing, or the capture was not written".into(),
        );
        return Ok(report(a, &mut out, f));
    }
    let (format, bytes) = detect(path, a.from)?;
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
                if let Some(l) = &layers
                    && *l != h.layer_ids()
                {
                    f.error(
                        "layer_map",
                        format!(
                            "the header's layer map is {:?}, the model's MoE layers (--layers / --layers-from) are {l:?}",
                            h.layer_ids()
                        ),
                    );
                }
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
        let mut opts = import_options(a.num_experts, a.num_layers, a.top_k, layers, a.seq);
        opts.start = a.start;
        opts.layer_kinds = resolved.kinds.clone();
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
                match dense.to_trace_lossy(format, &opts, 100) {
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
                        f.unlisted += total.saturating_sub(shown);
                        out["num_experts"] = json!(check.num_experts);
                        trace = Some(t);
                    }
                }
            }
        }
    }
    if let Some(seq) = a.seq
        && let Some(t) = trace.take()
    {
        match select_seq(t, seq, path) {
            Ok(t) => trace = Some(t),
            Err(e) => f.error("no_such_sequence", e.to_string()),
        }
    }
    if let Some(t) = &trace {
        out["num_experts"] = json!(t.header().num_experts());
        let nonempty = t.summary().rows > 0;
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
            f.error(
                "empty",
                "the input holds no routes (no recorded row): the engine captured nothing, or the capture was not written"
                    .into(),
            );
        }
        let s = t.summary();
        let stored = s.rows + s.missing_rows;
        if a.explain {
            let other = match &a.against {
                Some(p) => {
                    let (fmt, bytes) = detect(p, None)?;
                    let mut o = import_options(a.num_experts, a.num_layers, a.top_k, resolved.layers.clone(), None);
                    o.layer_kinds = resolved.kinds.clone();
                    if fmt == Format::Mrt {
                        o.layers = None;
                    }
                    Some(super::load(p, fmt, bytes, &o, &super::Progress(None))?.trace)
                }
                None => None,
            };
            let findings = explain::explain(
                t,
                &explain::Against {
                    model: resolved.model.clone(),
                    other: other.as_ref(),
                    weight_version: a.weight_version,
                    max_shift: 0,
                },
            );
            for fd in &findings {
                f.error(fd.class.name(), fd.message.clone());
            }
            out["explain"] = serde_json::to_value(&findings).unwrap_or(Value::Null);
        }
        out["coverage"] = json!({
            "sequences": s.sequences,
            "tokens": s.tokens,
            "rows_present": s.rows,
            "rows_missing": s.missing_rows,
            "fraction_present": if stored == 0 { 0.0 } else { s.rows as f64 / stored as f64 },
            "per_layer": s.layers,
        });
    }
    Ok(report(a, &mut out, f))
}

/// Fills the summary keys of `out`, prints it (JSON or text) and returns the exit code.
fn report(a: &ValidateArgs, out: &mut Value, f: Findings) -> u8 {
    let path = &a.input;
    let valid = f.errors.is_empty() && f.unlisted == 0;
    out["valid"] = json!(valid);
    out["checksum_failures"] = json!(f.checksum_failures);
    out["out_of_range"] = json!(f.out_of_range);
    out["duplicates"] = json!(f.duplicates);
    out["partial_missing"] = json!(f.partial_missing);
    out["all_zero_layers"] = json!(f.all_zero_layers);
    out["empty_layers"] = json!(f.empty_layers);
    out["errors"] = json!(f.errors);
    out["errors_not_listed"] = json!(f.unlisted);
    out["warnings"] = json!(f.warnings);
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        outln!("{}: {}", path.display(), if valid { "valid" } else { "INVALID" });
        for e in f.errors.iter().take(TEXT_LISTED) {
            outln!(
                "  error [{}]: {}",
                e["kind"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            );
        }
        let more = f.errors.len().saturating_sub(TEXT_LISTED) as u64 + f.unlisted;
        if more > 0 {
            outln!("  and {more} more error(s) (counted above; --json lists up to {MAX_LISTED})");
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
    if valid { EXIT_OK } else { EXIT_INVALID }
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
                    if shown >= 100 {
                        f.unlisted += 1;
                    } else {
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
