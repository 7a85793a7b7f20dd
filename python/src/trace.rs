//! Traces: `TraceWriter`, `Trace`, the importers and exporters of the engines' formats, and
//! `convert`, `validate` and `diff` with the CLI's semantics and `--json` keys.

use crate::config::PyRouterConfig;
use crate::{Error, detached, guarded};
use moe_router::interop::{self, ExportOptions, Format, ImportOptions, IntDtype, InteropError};
use moe_router::metrics::compare;
use moe_router::trace::{
    IndexState, OpenOptions, RecoveryReport, Trace, TraceError, TraceFile, TraceHeader, TraceWriter, ValidationIssue,
    Verify, WriterOptions,
};
use moe_router::{LayerId, SeqId};
use ndarray::{Array2, Array3, s};
use numpy::{PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray3};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const FORMATS: &str = "mrt, npy, safetensors, sglang, nrlre1, r3v1, prime-rl";

fn format_named(name: &str) -> Result<Format, Error> {
    Format::from_name(name).ok_or_else(|| Error::Value(format!("unknown format {name:?}; formats: {FORMATS}")))
}

fn io_err(path: &Path, e: &std::io::Error) -> Error {
    Error::Trace(format!("{}: {e}", path.display()))
}

fn at(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Trace(format!("{}: {e}", path.display()))
}

/// Import options as the CLI builds them.
fn import_options(
    num_experts: Option<usize>,
    num_layers: Option<usize>,
    top_k: Option<usize>,
    layers: Option<Vec<u32>>,
    seq: Option<u64>,
) -> ImportOptions {
    ImportOptions {
        num_experts,
        num_layers,
        top_k,
        layers,
        seq: SeqId(seq.unwrap_or(0)),
        ..ImportOptions::default()
    }
}

/// The format of `path`: given, from the extension, else from the content (returned too).
fn detect(path: &Path, given: Option<&str>) -> Result<(Format, Option<Vec<u8>>), Error> {
    if let Some(g) = given {
        return Ok((format_named(g)?, None));
    }
    if let Some(f) = Format::from_path(path) {
        return Ok((f, None));
    }
    let bytes = std::fs::read(path).map_err(|e| io_err(path, &e))?;
    if bytes.is_empty() {
        return Err(at(
            path,
            "the file is empty (0 bytes): the engine captured nothing, or the capture was not written",
        ));
    }
    let f = Format::sniff(&bytes).ok_or_else(|| {
        at(
            path,
            format!("cannot tell the format from the extension or the content; pass format= (one of {FORMATS})"),
        )
    })?;
    Ok((f, Some(bytes).filter(|_| f != Format::Mrt)))
}

/// Loads any input into a trace (strict), as the CLI's `load`; `keep_mrt_layers` drops the
/// layer ids of `opts` for an `.mrt` input (as `diff` does).
fn load(
    path: &Path,
    given: Option<&str>,
    opts: &ImportOptions,
    keep_mrt_layers: bool,
) -> Result<(Trace, Format), Error> {
    let (format, bytes) = detect(path, given)?;
    if format == Format::Mrt {
        let tf = TraceFile::open(path).map_err(|e| at(path, e))?;
        let h = tf.header();
        if let Some(e) = opts.num_experts
            && e != h.num_experts()
        {
            return Err(at(
                path,
                format!(
                    "num_experts={e} but the trace header says E = {}; drop the argument or check the file",
                    h.num_experts()
                ),
            ));
        }
        if !keep_mrt_layers
            && let Some(l) = &opts.layers
            && *l != h.layer_ids()
        {
            return Err(at(
                path,
                format!(
                    "layers={l:?} but the trace's layer map is {:?}; drop the argument or check the file",
                    h.layer_ids()
                ),
            ));
        }
        let trace = tf.to_trace().map_err(|e| at(path, e))?;
        return Ok((trace, format));
    }
    let bytes = match bytes {
        Some(b) => b,
        None => std::fs::read(path).map_err(|e| io_err(path, &e))?,
    };
    let trace = interop::import(format, &bytes, opts).map_err(|e| at(path, e))?;
    Ok((trace, format))
}

/// The routes of sequence `seq` only.
fn select_seq(trace: Trace, seq: u64, what: &str) -> Result<Trace, Error> {
    let seqs = trace.sequences();
    if seqs.len() == 1 && seqs[0] == SeqId(seq) {
        return Ok(trace);
    }
    if !seqs.contains(&SeqId(seq)) {
        let shown: Vec<String> = seqs.iter().take(16).map(|s| s.0.to_string()).collect();
        return Err(Error::Trace(format!(
            "{what}: seq={seq}: no such sequence (the input holds {}: {}{})",
            seqs.len(),
            shown.join(", "),
            if seqs.len() > 16 { ", …" } else { "" }
        )));
    }
    let mut out = Trace::new(trace.header().clone());
    for lane in trace.lanes().filter(|l| l.seq == SeqId(seq)) {
        for r in &lane.runs {
            out.append_stored(lane.seq, lane.layer, r.start, r.bytes, true)?;
        }
    }
    Ok(out)
}

/// The default sequence of a trace for one-sequence views: `seq`, else its only sequence.
fn one_seq(trace: &Trace, seq: Option<u64>) -> Result<SeqId, Error> {
    if let Some(s) = seq {
        return Ok(SeqId(s));
    }
    let seqs = trace.sequences();
    match seqs.as_slice() {
        [] => Ok(SeqId(0)),
        [one] => Ok(*one),
        many => Err(Error::Value(format!(
            "the trace holds {} sequences ({}{}); pass seq=",
            many.len(),
            many.iter()
                .take(8)
                .map(|s| s.0.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if many.len() > 8 { ", …" } else { "" }
        ))),
    }
}

fn ids_to_i32_2(a: Array2<u32>) -> Array2<i32> {
    a.mapv(|x| x as i32)
}

fn ids_to_i32_3(a: Array3<u32>) -> Array3<i32> {
    a.mapv(|x| x as i32)
}

/// A routing trace in memory: (sequence, model layer, position) → K expert ids.
///
/// Open one with :meth:`Trace.open` (any format: ``.mrt``, vLLM ``.npy``, safetensors,
/// SGLang, NeMo ``nrlre1``, Fireworks ``r3v1``, prime-rl), build one from a ``[T, L, K]`` array
/// with :meth:`Trace.from_numpy`. Missing rows read as ``-1``.
#[pyclass(name = "Trace", module = "moe_router", frozen)]
pub struct PyTrace {
    pub(crate) trace: Trace,
}

#[pymethods]
impl PyTrace {
    /// Opens a trace of any format (from the extension, else the content, or ``format=``).
    /// ``num_experts``, ``num_layers``, ``top_k``, ``layers`` and ``seq`` are the facts formats
    /// without a header need (as the CLI's flags).
    #[staticmethod]
    #[pyo3(signature = (path, format = None, num_experts = None, num_layers = None, top_k = None, layers = None, seq = None))]
    #[allow(clippy::too_many_arguments)]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        format: Option<String>,
        num_experts: Option<usize>,
        num_layers: Option<usize>,
        top_k: Option<usize>,
        layers: Option<Vec<u32>>,
        seq: Option<u64>,
    ) -> PyResult<Self> {
        detached(py, move || {
            let opts = import_options(num_experts, num_layers, top_k, layers, seq);
            let (t, _) = load(&path, format.as_deref(), &opts, false)?;
            Ok(PyTrace { trace: t })
        })
    }

    /// Imports the bytes (or text) of an engine capture in ``format`` (``"npy"``,
    /// ``"safetensors"``, ``"sglang"``, ``"nrlre1"``, ``"r3v1"``, ``"prime-rl"``, ``"mrt"``).
    #[staticmethod]
    #[pyo3(signature = (data, format, num_experts = None, num_layers = None, top_k = None, layers = None, seq = None))]
    #[allow(clippy::too_many_arguments)]
    fn from_bytes(
        py: Python<'_>,
        data: Vec<u8>,
        format: &str,
        num_experts: Option<usize>,
        num_layers: Option<usize>,
        top_k: Option<usize>,
        layers: Option<Vec<u32>>,
        seq: Option<u64>,
    ) -> PyResult<Self> {
        let f = format_named(format)?;
        detached(py, move || {
            let opts = import_options(num_experts, num_layers, top_k, layers, seq);
            Ok(PyTrace {
                trace: interop::import(f, &data, &opts)?,
            })
        })
    }

    /// A trace from a ``[T, L, K]`` integer array of one sequence (``-1`` rows are missing):
    /// positions ``start..start+T``, layers ``layers`` (default ``0..L``).
    #[staticmethod]
    #[pyo3(signature = (ids, num_experts, layers = None, seq = 0, start = 0))]
    fn from_numpy(
        ids: PyReadonlyArray3<'_, i64>,
        num_experts: usize,
        layers: Option<Vec<u32>>,
        seq: u64,
        start: u64,
    ) -> PyResult<Self> {
        let a = ids.as_array();
        let (_, l, k) = a.dim();
        let layers = layers.unwrap_or_else(|| (0..l as u32).collect());
        guarded(|| {
            let mut bad = None;
            let u = a.mapv(|x| {
                if x == -1 {
                    moe_router::trace::MISSING_ID
                } else if x < 0 || x > u32::MAX as i64 {
                    bad = Some(x);
                    0
                } else {
                    x as u32
                }
            });
            if let Some(x) = bad {
                return Err(Error::Trace(format!(
                    "id {x} is neither -1 (missing) nor a valid expert id"
                )));
            }
            let h = TraceHeader::new(num_experts, k, &layers)?;
            let mut t = Trace::new(h);
            t.append_dense(SeqId(seq), start, u.view())?;
            Ok(PyTrace { trace: t })
        })
    }

    /// Model layer ids of the MoE layers (the layer map).
    #[getter]
    fn layers(&self) -> Vec<u32> {
        self.trace.header().layer_ids()
    }

    /// E.
    #[getter]
    fn num_experts(&self) -> usize {
        self.trace.header().num_experts()
    }

    /// K.
    #[getter]
    fn top_k(&self) -> usize {
        self.trace.header().top_k()
    }

    /// The routing-config fingerprint of the header (0 when unknown).
    #[getter]
    fn fingerprint(&self) -> u64 {
        self.trace.header().fingerprint()
    }

    /// Sequence ids, ascending.
    #[getter]
    fn sequences(&self) -> Vec<u64> {
        self.trace.sequences().into_iter().map(|s| s.0).collect()
    }

    /// Counts as JSON text (sequences, tokens, rows, missing_rows, ids, layers).
    fn summary_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.trace.summary()).map_err(|e| Error::Trace(e.to_string()).into())
    }

    /// Ids ``[T, K]`` (int32, ``-1`` for missing rows) of one layer of one sequence (``seq``
    /// may be left out when the trace holds one), positions ``0..T``.
    #[pyo3(signature = (layer, seq = None))]
    fn ids<'py>(&self, py: Python<'py>, layer: u32, seq: Option<u64>) -> PyResult<Bound<'py, PyArray2<i32>>> {
        let a = guarded(|| {
            let s = one_seq(&self.trace, seq)?;
            let t = self.trace.sequence_end(s) as usize;
            let mut out = Array2::<u32>::zeros((t, self.trace.header().top_k()));
            self.trace.read_rows(s, LayerId(layer), 0, out.view_mut())?;
            Ok(ids_to_i32_2(out))
        })?;
        Ok(PyArray2::from_owned_array(py, a))
    }

    /// Ids ``[T, L, K]`` (int32, ``-1`` for missing rows) of one sequence over the layer map.
    #[pyo3(signature = (seq = None))]
    fn to_numpy<'py>(&self, py: Python<'py>, seq: Option<u64>) -> PyResult<Bound<'py, PyArray3<i32>>> {
        let a = guarded(|| {
            let s = one_seq(&self.trace, seq)?;
            Ok(ids_to_i32_3(self.trace.to_dense(s)))
        })?;
        Ok(PyArray3::from_owned_array(py, a))
    }

    /// Rows ``start..start+len`` of ``seq`` at ``layer`` as int32 ``[len, K]`` (``-1`` missing).
    fn read_rows<'py>(
        &self,
        py: Python<'py>,
        seq: u64,
        layer: u32,
        start: u64,
        len: usize,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        let a = guarded(|| {
            let mut out = Array2::<u32>::zeros((len, self.trace.header().top_k()));
            self.trace
                .read_rows(SeqId(seq), LayerId(layer), start, out.view_mut())?;
            Ok(ids_to_i32_2(out))
        })?;
        Ok(PyArray2::from_owned_array(py, a))
    }

    /// Writes the trace: ``.mrt`` (or ``format="mrt"``), else exported to the format of the
    /// extension or ``format`` (one sequence: ``seq``, or the trace's only one).
    #[pyo3(signature = (path, format = None, seq = None, dtype = None))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        format: Option<String>,
        seq: Option<u64>,
        dtype: Option<String>,
    ) -> PyResult<()> {
        detached(py, move || {
            let f = match format {
                Some(f) => format_named(&f)?,
                None => Format::from_path(&path).ok_or_else(|| {
                    Error::Value(format!(
                        "{}: cannot tell the output format from the extension; pass format= (one of {FORMATS})",
                        path.display()
                    ))
                })?,
            };
            write_any(&self.trace, &path, f, seq, dtype.as_deref())
        })
    }

    /// The trace (one sequence: ``seq``, or the only one) in ``format`` as bytes (text formats
    /// as their ASCII text).
    #[pyo3(signature = (format, seq = None, dtype = None))]
    fn export<'py>(
        &self,
        py: Python<'py>,
        format: &str,
        seq: Option<u64>,
        dtype: Option<String>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let f = format_named(format)?;
        let bytes = detached(py, || {
            let eo = export_options(seq, dtype.as_deref(), f)?;
            Ok(interop::export(f, &self.trace, &eo)?)
        })?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn __repr__(&self) -> String {
        let s = self.trace.summary();
        format!(
            "Trace(num_experts={}, top_k={}, layers={}, sequences={}, tokens={})",
            self.num_experts(),
            self.top_k(),
            self.trace.header().layers().len(),
            s.sequences,
            s.tokens
        )
    }
}

fn export_options(seq: Option<u64>, dtype: Option<&str>, f: Format) -> Result<ExportOptions, Error> {
    let dtype = match dtype {
        Some(d) => Some(IntDtype::from_name(d).ok_or_else(|| Error::Value(format!("unknown integer dtype {d:?}")))?),
        None if f == Format::Npy => Some(IntDtype::I32),
        None => None,
    };
    Ok(ExportOptions {
        dtype,
        seq: seq.map(SeqId),
        ..ExportOptions::default()
    })
}

fn write_mrt(trace: &Trace, path: &Path) -> Result<(), Error> {
    let w = TraceWriter::create(path, trace.header().clone(), WriterOptions::default()).map_err(|e| at(path, e))?;
    for lane in trace.lanes() {
        for r in &lane.runs {
            w.append_stored(lane.seq, lane.layer, r.start, r.bytes)
                .map_err(|e| at(path, e))?;
        }
    }
    w.finish().map_err(|e| at(path, e))?;
    Ok(())
}

fn write_any(trace: &Trace, path: &Path, f: Format, seq: Option<u64>, dtype: Option<&str>) -> Result<(), Error> {
    if f == Format::Mrt {
        return write_mrt(trace, path);
    }
    let eo = export_options(seq, dtype, f)?;
    let mut out = interop::export(f, trace, &eo).map_err(|e| at(path, e))?;
    if matches!(f, Format::Sglang | Format::Nrlre1 | Format::R3v1) {
        out.push(b'\n');
    }
    std::fs::write(path, out).map_err(|e| io_err(path, &e))
}

/// Streaming `.mrt` writer state guarded for concurrent `record` calls.
struct WriterState {
    writer: Option<TraceWriter>,
    /// Next position per (sequence, layer) for rows recorded without positions.
    next: HashMap<(u64, u32), u64>,
}

/// A streaming ``.mrt`` writer: append-only checksummed chunks written in the background, so a
/// crash loses at most the chunk being written.
#[pyclass(name = "TraceWriter", module = "moe_router", frozen)]
pub struct PyTraceWriter {
    state: Mutex<WriterState>,
    header: TraceHeader,
    path: PathBuf,
}

impl PyTraceWriter {
    fn with<R>(&self, f: impl FnOnce(&mut WriterState) -> Result<R, Error>) -> Result<R, Error> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::Trace("trace writer poisoned by an earlier panic".into()))?;
        f(&mut st)
    }
}

#[pymethods]
impl PyTraceWriter {
    /// Creates ``path`` for routes of ``config`` (E, K and its fingerprint go into the header)
    /// at the model's MoE layer ids ``layers`` (an int L means layers ``0..L``).
    #[new]
    #[pyo3(signature = (path, config, layers, producer = None, compression = true))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        config: &PyRouterConfig,
        layers: &Bound<'_, PyAny>,
        producer: Option<String>,
        compression: bool,
    ) -> PyResult<Self> {
        let layers: Vec<u32> = match layers.extract::<u32>() {
            Ok(n) => (0..n).collect(),
            Err(_) => layers.extract()?,
        };
        let cfg = config.cfg.clone();
        detached(py, move || {
            let mut h = TraceHeader::for_config(&cfg, &layers)?;
            h = h.with_producer(producer.unwrap_or_else(|| format!("moe-router-python {}", env!("CARGO_PKG_VERSION"))));
            let opts = if compression {
                WriterOptions::default()
            } else {
                WriterOptions::uncompressed()
            };
            let w = TraceWriter::create(&path, h.clone(), opts).map_err(|e| at(&path, e))?;
            Ok(PyTraceWriter {
                state: Mutex::new(WriterState {
                    writer: Some(w),
                    next: HashMap::new(),
                }),
                header: h,
                path,
            })
        })
    }

    /// Model layer ids of the header.
    #[getter]
    fn layers(&self) -> Vec<u32> {
        self.header.layer_ids()
    }

    /// The file path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Records ids ``[T, K]`` of ``layer``. Row ``t`` belongs to sequence ``seq_ids[t]`` (default
    /// 0) at position ``positions[t]`` (default: after the rows recorded so far for that
    /// sequence and layer). Every row is validated (ids < E, distinct; ``-1`` rows are missing).
    #[pyo3(signature = (layer, ids, seq_ids = None, positions = None))]
    fn record(
        &self,
        py: Python<'_>,
        layer: u32,
        ids: &Bound<'_, PyAny>,
        seq_ids: Option<PyReadonlyArray1<'_, i64>>,
        positions: Option<PyReadonlyArray1<'_, i64>>,
    ) -> PyResult<()> {
        let ids = extract_trace_ids(ids)?;
        let (t, _) = ids.dim();
        let seqs: Option<Vec<i64>> = seq_ids.map(|s| s.as_array().to_vec());
        let pos: Option<Vec<i64>> = positions.map(|s| s.as_array().to_vec());
        for (what, v) in [("seq_ids", &seqs), ("positions", &pos)] {
            if let Some(v) = v {
                if v.len() != t {
                    return Err(Error::Value(format!("{what} has {} entries, ids have {t} rows", v.len())).into());
                }
                if let Some(x) = v.iter().find(|&&x| x < 0) {
                    return Err(Error::Value(format!("{what} holds a negative value {x}")).into());
                }
            }
        }
        detached(py, move || {
            self.with(|st| {
                let Some(w) = st.writer.as_ref() else {
                    return Err(Error::Trace("the trace writer is closed".into()));
                };
                // Runs of rows with the same sequence and consecutive positions.
                let mut r0 = 0;
                while r0 < t {
                    let seq = seqs.as_ref().map_or(0, |v| v[r0] as u64);
                    let start = match &pos {
                        Some(p) => p[r0] as u64,
                        None => *st.next.get(&(seq, layer)).unwrap_or(&0),
                    };
                    let mut r1 = r0 + 1;
                    while r1 < t
                        && seqs.as_ref().is_none_or(|v| v[r1] as u64 == seq)
                        && pos.as_ref().is_none_or(|p| p[r1] as u64 == start + (r1 - r0) as u64)
                    {
                        r1 += 1;
                    }
                    w.append(SeqId(seq), LayerId(layer), start, ids.slice(s![r0..r1, ..]))?;
                    let end = start + (r1 - r0) as u64;
                    let e = st.next.entry((seq, layer)).or_insert(0);
                    *e = (*e).max(end);
                    r0 = r1;
                }
                Ok(())
            })
        })
    }

    /// Flushes buffered rows to the file (rows written so far survive a crash).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, || {
            self.with(|st| match &st.writer {
                Some(w) => Ok(w.flush()?),
                None => Ok(()),
            })
        })
    }

    /// Writes the index and footer and closes the file; returns the writer's statistics as
    /// JSON text. Closing twice is a no-op (``None``).
    fn close(&self, py: Python<'_>) -> PyResult<Option<String>> {
        detached(py, || {
            self.with(|st| match st.writer.take() {
                Some(w) => {
                    let s = w.finish().map_err(|e| at(&self.path, e))?;
                    Ok(Some(format!("{s:?}")))
                }
                None => Ok(None),
            })
        })
    }
}

/// Ids `[T, K]` for recording: int32/int64/uint32 arrays, `-1` rows missing.
fn extract_trace_ids(obj: &Bound<'_, PyAny>) -> PyResult<Array2<u32>> {
    fn conv<T: Copy + Into<i64> + numpy::Element>(a: &Bound<'_, PyArray2<T>>) -> Result<Array2<u32>, Error> {
        let r = a.readonly();
        let v = r.as_array();
        let mut bad = None;
        let out = v.mapv(|x| {
            let x: i64 = x.into();
            if x == -1 {
                moe_router::trace::MISSING_ID
            } else if x < 0 || x > i64::from(u32::MAX - 1) {
                bad.get_or_insert(x);
                0
            } else {
                x as u32
            }
        });
        match bad {
            Some(x) => Err(Error::Trace(format!(
                "id {x} is neither -1 (missing) nor a valid expert id"
            ))),
            None => Ok(out),
        }
    }
    if let Ok(a) = obj.cast::<PyArray2<i32>>() {
        Ok(guarded(|| conv(a))?)
    } else if let Ok(a) = obj.cast::<PyArray2<i64>>() {
        Ok(guarded(|| conv(a))?)
    } else if let Ok(a) = obj.cast::<PyArray2<u32>>() {
        Ok(guarded(|| conv(a))?)
    } else if let Ok(a) = obj.cast::<PyArray2<i16>>() {
        Ok(guarded(|| conv(a))?)
    } else if let Ok(a) = obj.cast::<PyArray2<u16>>() {
        Ok(guarded(|| conv(a))?)
    } else if let Ok(a) = obj.cast::<PyArray2<u8>>() {
        Ok(guarded(|| conv(a))?)
    } else {
        Err(Error::Value("ids must be a 2-D [T, K] integer array".into()).into())
    }
}

/// Converts ``src`` to ``dst`` (formats from the extensions or ``from_`` / ``to``), as
/// ``moe-router convert``. Returns a one-line description.
#[pyfunction]
#[pyo3(signature = (src, dst, from_ = None, to = None, num_experts = None, num_layers = None, top_k = None, layers = None, seq = None))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    from_: Option<String>,
    to: Option<String>,
    num_experts: Option<usize>,
    num_layers: Option<usize>,
    top_k: Option<usize>,
    layers: Option<Vec<u32>>,
    seq: Option<u64>,
) -> PyResult<String> {
    detached(py, move || {
        let from = match from_.as_deref() {
            Some(f) => format_named(f)?,
            None => Format::from_path(&src).ok_or_else(|| {
                Error::Value(format!(
                    "{}: cannot tell the input format from the extension; pass from_= (one of {FORMATS})",
                    src.display()
                ))
            })?,
        };
        let to = match to.as_deref() {
            Some(f) => format_named(f)?,
            None => Format::from_path(&dst).ok_or_else(|| {
                Error::Value(format!(
                    "{}: cannot tell the output format from the extension; pass to= (one of {FORMATS})",
                    dst.display()
                ))
            })?,
        };
        let opts = import_options(num_experts, num_layers, top_k, layers, seq);
        // The .npy element type of an .npy input is kept when signed (as the CLI does).
        let mut npy_dtype = None;
        let mut trace = if from == Format::Mrt {
            load(&src, Some("mrt"), &opts, false)?.0
        } else {
            let bytes = std::fs::read(&src).map_err(|e| io_err(&src, &e))?;
            let dense = interop::decode(from, &bytes, &opts).map_err(|e| at(&src, e))?;
            npy_dtype = dense.source_dtype.filter(|_| from == Format::Npy);
            dense.to_trace(from, &opts).map_err(|e| at(&src, e))?
        };
        if trace.summary().rows == 0 {
            return Err(at(&src, "the input holds no routes (nothing was recorded)"));
        }
        if let Some(s) = seq {
            trace = select_seq(trace, s, &src.display().to_string())?;
        }
        let dtype = match to {
            Format::Npy => Some(npy_dtype.filter(|d| d.is_signed()).unwrap_or(IntDtype::I32).name()),
            _ => None,
        };
        write_any(&trace, &dst, to, seq, dtype)?;
        let s = trace.summary();
        Ok(format!(
            "converted {} ({}) -> {} ({}): {} sequence(s), {} tokens, {} layers, K = {}, E = {}",
            src.display(),
            from,
            dst.display(),
            to,
            s.sequences,
            s.tokens,
            trace.header().layers().len(),
            trace.header().top_k(),
            trace.header().num_experts()
        ))
    })
}

/// Compares two inputs (any format) as ``moe-router diff --json``; returns the JSON text.
#[pyfunction]
#[pyo3(signature = (a, b, num_experts = None, num_layers = None, top_k = None, layers = None, seq = None))]
#[allow(clippy::too_many_arguments)]
fn diff(
    py: Python<'_>,
    a: PathBuf,
    b: PathBuf,
    num_experts: Option<usize>,
    num_layers: Option<usize>,
    top_k: Option<usize>,
    layers: Option<Vec<u32>>,
    seq: Option<u64>,
) -> PyResult<String> {
    detached(py, move || {
        let opts = import_options(num_experts, num_layers, top_k, layers, seq);
        let mut ta = load(&a, None, &opts, true)?.0;
        let mut tb = load(&b, None, &opts, true)?.0;
        for (t, p) in [(&ta, &a), (&tb, &b)] {
            if t.summary().rows == 0 {
                return Err(at(p, "the input holds no routes (nothing was recorded)"));
            }
        }
        if let Some(s) = seq {
            ta = select_seq(ta, s, &a.display().to_string())?;
            tb = select_seq(tb, s, &b.display().to_string())?;
        }
        diff_traces(&ta, &tb, &format!("{} vs {}", a.display(), b.display()))
    })
}

fn diff_traces(a: &Trace, b: &Trace, what: &str) -> Result<String, Error> {
    let c = compare(a, b).map_err(|e| {
        Error::Trace(format!(
            "{what}: {e}; give the model layer ids of an array input with layers="
        ))
    })?;
    serde_json::to_string(&c).map_err(|e| Error::Trace(e.to_string()))
}

/// Compares two in-memory traces as ``moe-router diff --json``; returns the JSON text.
#[pyfunction]
fn diff_traces_json(py: Python<'_>, a: &PyTrace, b: &PyTrace) -> PyResult<String> {
    detached(py, || diff_traces(&a.trace, &b.trace, "a vs b"))
}

/// Errors listed in the report (the rest are counted in `errors_not_listed`).
const MAX_LISTED: usize = 1000;

#[derive(Default)]
struct Findings {
    errors: Vec<Value>,
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
    fn trace_error(&mut self, e: &TraceError) {
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
        self.error(kind, e.to_string());
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
                                "sequence {}, layer {}, position {}, slot {slot}: id {id} is out of range (num_experts={e})",
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

/// The checks of ``moe-router validate --json``; returns the JSON text.
#[allow(clippy::too_many_arguments)]
fn validate_path(
    path: &Path,
    from: Option<&str>,
    num_experts: Option<usize>,
    num_layers: Option<usize>,
    top_k: Option<usize>,
    layers: Option<Vec<u32>>,
    seq: Option<u64>,
) -> Result<Value, Error> {
    let size = std::fs::metadata(path).map_err(|e| io_err(path, &e))?.len();
    let mut f = Findings::default();
    if size == 0 {
        let mut out = json!({ "input": path.display().to_string(), "format": from });
        f.error(
            "empty",
            "the file is empty (0 bytes): the engine captured nothing, or the capture was not written".into(),
        );
        report(&mut out, f);
        return Ok(out);
    }
    let (format, bytes) = detect(path, from)?;
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
            Err(e @ TraceError::Io { .. }) => return Err(at(path, e)),
            Err(e) => f.trace_error(&e),
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
                            "the header's layer map is {:?}, the model's MoE layers (layers=) are {l:?}",
                            h.layer_ids()
                        ),
                    );
                }
                if let Some(e) = num_experts
                    && e != h.num_experts()
                {
                    f.error(
                        "num_experts",
                        format!("the header says E = {}, the model has num_experts={e}", h.num_experts()),
                    );
                }
                match tf.to_trace() {
                    Ok(t) => {
                        if let Some(e) = num_experts.filter(|&e| e < h.num_experts()) {
                            check_range(&t, e, &mut f);
                        }
                        trace = Some(t);
                    }
                    Err(e) => f.trace_error(&e),
                }
            }
        }
    } else {
        let opts = import_options(num_experts, num_layers, top_k, layers, seq);
        let bytes = match bytes {
            Some(b) => b,
            None => std::fs::read(path).map_err(|e| io_err(path, &e))?,
        };
        match interop::decode(format, &bytes, &opts) {
            Err(e @ InteropError::MissingOption { .. }) => return Err(at(path, e)),
            Err(e) => f.interop_error(&e),
            Ok(dense) => {
                if num_experts.is_none() && dense.num_experts.is_none() {
                    f.warning(
                        "num_experts",
                        format!(
                            "{format} does not record E; ids were checked only against the largest id (pass num_experts=E)"
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
    if let Some(s) = seq
        && let Some(t) = trace.take()
    {
        match select_seq(t, s, &path.display().to_string()) {
            Ok(t) => trace = Some(t),
            Err(Error::Trace(m)) | Err(Error::Value(m)) | Err(Error::Config(m)) | Err(Error::Route(m)) => {
                f.error("no_such_sequence", m)
            }
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
        out["coverage"] = json!({
            "sequences": s.sequences,
            "tokens": s.tokens,
            "rows_present": s.rows,
            "rows_missing": s.missing_rows,
            "fraction_present": if stored == 0 { 0.0 } else { s.rows as f64 / stored as f64 },
            "per_layer": s.layers,
        });
    }
    report(&mut out, f);
    Ok(out)
}

fn report(out: &mut Value, f: Findings) {
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
}

/// Validates any input as ``moe-router validate --json``; returns the JSON text.
#[pyfunction]
#[pyo3(signature = (path, from_ = None, num_experts = None, num_layers = None, top_k = None, layers = None, seq = None))]
#[allow(clippy::too_many_arguments)]
fn validate(
    py: Python<'_>,
    path: PathBuf,
    from_: Option<String>,
    num_experts: Option<usize>,
    num_layers: Option<usize>,
    top_k: Option<usize>,
    layers: Option<Vec<u32>>,
    seq: Option<u64>,
) -> PyResult<String> {
    detached(py, move || {
        let v = validate_path(&path, from_.as_deref(), num_experts, num_layers, top_k, layers, seq)?;
        serde_json::to_string(&v).map_err(|e| Error::Trace(e.to_string()))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTrace>()?;
    m.add_class::<PyTraceWriter>()?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(diff, m)?)?;
    m.add_function(wrap_pyfunction!(diff_traces_json, m)?)?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    Ok(())
}
