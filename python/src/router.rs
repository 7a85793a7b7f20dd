//! `moe_router._native.Router`: routing of host (NumPy) logits on any backend, with the GIL
//! released.

use crate::config::{PyRouterConfig, parse_numerics};
use crate::tensor::{Dt, Place, Tensor2, Torch};
use crate::{Error, detached, guarded};
use half::{bf16, f16};
use moe_router::capacity::apply_capacity;
use moe_router::stats::{self, GlobalAuxLoss, RoutingStats};
use moe_router::{
    AnyRouter, AuxLossKind, BackendKind, CallSite, HostMatrix, HostWeights, LogitsRef, LossGrads, RouteError, Router,
    RouterConfig, validate_ids,
};
use ndarray::{Array2, ArrayView2, ShapeBuilder};
use numpy::{PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::sync::{Arc, Mutex};

/// Host logits borrowed from a NumPy array (f32, f64, f16, or bf16 given as its u16 bits).
enum HostLogits<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
    F16(PyReadonlyArray2<'py, f16>),
    Bf16(PyReadonlyArray2<'py, u16>),
}

impl<'py> HostLogits<'py> {
    /// Borrows `obj`, a 2-D NumPy array of float32, float64, float16, or (with `bf16_bits`)
    /// uint16/int16 holding bfloat16 bits.
    fn extract(obj: &Bound<'py, PyAny>, bf16_bits: bool) -> PyResult<Self> {
        if bf16_bits {
            if let Ok(a) = obj.cast::<PyArray2<u16>>() {
                return Ok(HostLogits::Bf16(a.readonly()));
            }
            if let Ok(a) = obj.cast::<PyArray2<i16>>() {
                let u = a.call_method1("view", ("uint16",))?;
                let u = u.cast::<PyArray2<u16>>()?;
                return Ok(HostLogits::Bf16(u.readonly()));
            }
        } else if let Ok(a) = obj.cast::<PyArray2<f32>>() {
            return Ok(HostLogits::F32(a.readonly()));
        } else if let Ok(a) = obj.cast::<PyArray2<f64>>() {
            return Ok(HostLogits::F64(a.readonly()));
        } else if let Ok(a) = obj.cast::<PyArray2<f16>>() {
            return Ok(HostLogits::F16(a.readonly()));
        }
        let desc = describe(obj);
        Err(Error::Route(format!(
            "logits must be a 2-D [T, E] array of float32, float16, bfloat16 or float64; got {desc}"
        ))
        .into())
    }

    /// Calls `f` with the logits as a [`LogitsRef`] (bf16 bits are reinterpreted in place when
    /// contiguous, else copied).
    fn with_view<R>(&self, f: impl FnOnce(LogitsRef<'_>) -> R) -> R {
        match self {
            HostLogits::F32(a) => f(LogitsRef::F32(a.as_array())),
            HostLogits::F64(a) => f(LogitsRef::F64(a.as_array())),
            HostLogits::F16(a) => f(LogitsRef::F16(a.as_array())),
            HostLogits::Bf16(a) => {
                let v = a.as_array();
                let view = v.as_slice().and_then(|s| {
                    let b: &[bf16] = half::slice::HalfBitsSliceExt::reinterpret_cast(s);
                    ArrayView2::from_shape(v.dim(), b).ok()
                });
                match view {
                    Some(view) => f(LogitsRef::Bf16(view)),
                    None => {
                        let owned = v.mapv(bf16::from_bits);
                        f(LogitsRef::Bf16(owned.view()))
                    }
                }
            }
        }
    }
}

/// `ndarray(shape=(..), dtype=..)` or the type name.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    let shape = obj.getattr("shape").ok().map(|s| s.to_string());
    let dtype = obj.getattr("dtype").ok().map(|s| s.to_string());
    match (shape, dtype) {
        (Some(s), Some(d)) => format!("an array of shape {s} and dtype {d}"),
        _ => obj
            .get_type()
            .name()
            .map(|n| format!("a {n}"))
            .unwrap_or_else(|_| "an object".into()),
    }
}

/// Replay ids `[T, K]` from a NumPy int32, int64 or uint32 array: negative or too large ids are
/// [`RouteError::IdOutOfRange`], duplicates [`RouteError::DuplicateId`], a wrong shape
/// [`RouteError::IdsShape`], all naming the row and slot.
pub(crate) fn extract_ids(obj: &Bound<'_, PyAny>, rows: usize, cfg: &RouterConfig) -> PyResult<Array2<u32>> {
    let e = cfg.num_experts();
    let k = cfg.top_k();
    fn conv<T: Copy + Into<i64> + numpy::Element>(
        a: &Bound<'_, PyArray2<T>>,
        rows: usize,
        e: usize,
        k: usize,
    ) -> Result<Array2<u32>, Error> {
        let r = a.readonly();
        let v = r.as_array();
        let (t, c) = v.dim();
        if t != rows || c != k {
            return Err(RouteError::IdsShape {
                expected_rows: rows,
                expected_k: k,
                rows: t,
                cols: c,
            }
            .into());
        }
        let mut out = Array2::<u32>::zeros((t, c));
        for ((i, j), &x) in v.indexed_iter() {
            let x: i64 = x.into();
            if x < 0 || x >= e as i64 {
                return Err(RouteError::IdOutOfRange {
                    row: i,
                    slot: j,
                    id: x,
                    num_experts: e,
                }
                .into());
            }
            out[(i, j)] = x as u32;
        }
        Ok(out)
    }
    let ids = if let Ok(a) = obj.cast::<PyArray2<i32>>() {
        guarded(|| conv(a, rows, e, k))?
    } else if let Ok(a) = obj.cast::<PyArray2<i64>>() {
        guarded(|| conv(a, rows, e, k))?
    } else if let Ok(a) = obj.cast::<PyArray2<u32>>() {
        guarded(|| conv(a, rows, e, k))?
    } else {
        return Err(Error::Route(format!(
            "ids must be a 2-D [T, K] array of int32, int64 or uint32; got {}",
            describe(obj)
        ))
        .into());
    };
    guarded(|| Ok(validate_ids(ids.view(), rows, e, k, &[])?))?;
    Ok(ids)
}

fn ids_i32(ids: &Array2<u32>) -> Array2<i32> {
    ids.mapv(|x| x as i32)
}

fn weights_f32(w: HostWeights) -> Array2<f32> {
    match w {
        HostWeights::F32(a) => a,
        HostWeights::F64(a) => a.mapv(|x| x as f32),
    }
}

/// A strided view of host memory described by `t` (a CPU tensor read by [`Torch::read`]).
///
/// # Safety
///
/// `t` must describe live, aligned host memory of its dtype that stays valid (and unwritten)
/// for `'a` (the caller holds the tensor for the call).
#[allow(unsafe_code)]
unsafe fn host_view<'a>(t: &Tensor2) -> LogitsRef<'a> {
    /// # Safety
    ///
    /// As `host_view`, for elements of type `T`.
    unsafe fn view<'a, T>(t: &Tensor2) -> ArrayView2<'a, T> {
        let ptr = if t.rows == 0 || t.cols == 0 {
            std::ptr::NonNull::<T>::dangling().as_ptr().cast_const()
        } else {
            t.ptr as *const T
        };
        // SAFETY: the caller's contract: `ptr` with these non-negative strides addresses live,
        // aligned elements of the tensor (or nothing, when empty).
        unsafe { ArrayView2::from_shape_ptr((t.rows, t.cols).strides((t.s0, t.s1)), ptr) }
    }
    // SAFETY: forwarded from the caller, the element type matching `t.dtype`.
    unsafe {
        match t.dtype {
            Dt::F32 => LogitsRef::F32(view::<f32>(t)),
            Dt::F16 => LogitsRef::F16(view::<f16>(t)),
            Dt::Bf16 => LogitsRef::Bf16(view::<bf16>(t)),
            Dt::F64 => LogitsRef::F64(view::<f64>(t)),
        }
    }
}

/// The plain (no per-call bias) CUDA launcher of one device and its status word, registered by
/// `moe_router/_cuda.py` so that `route_tensor` launches on CUDA tensors of that device.
#[cfg(feature = "cuda")]
struct CudaEntry {
    index: i32,
    launch: Py<crate::cuda::PyCudaLaunch>,
    /// The int64 status tensor, held so that `status_ptr` stays valid.
    _status: Py<PyAny>,
    status_ptr: u64,
}

/// Routing statistics of `ids` on `logits`, as the CLI's `route` writes them to `stats.json`.
pub(crate) fn routing_stats(
    router: &AnyRouter,
    logits: &LogitsRef<'_>,
    ids: &Array2<u32>,
) -> Result<RoutingStats, Error> {
    let cfg = router.config();
    let (t, e) = logits.dim();
    let mut st = RoutingStats::default();
    let before = stats::tokens_per_expert(ids.view(), e);
    let outcome = match cfg.capacity() {
        Some(cap) => {
            let w = router.weights_host(logits, ids.view())?;
            Some(apply_capacity(&cap, ids.view(), w.to_f64().view(), e))
        }
        None => None,
    };
    if let Some(o) = &outcome {
        st.tokens_per_expert = o.tokens_per_expert.clone();
        st.tokens_per_expert_before_drop = Some(before);
        st.capacity = Some(o.capacity);
        st.dropped = Some(o.dropped);
    } else {
        st.tokens_per_expert = before;
    }
    let mut aux_total = 0.0;
    let mut any_aux = false;
    for al in cfg.aux_losses() {
        if al.coeff > 0.0 {
            any_aux = true;
            aux_total += match al.kind {
                AuxLossKind::MicroBatch => stats::aux_loss_micro_batch(cfg, logits, al.coeff)?,
                AuxLossKind::PerSequence => stats::aux_loss_per_sequence(cfg, logits, &[t], al.coeff)?,
                AuxLossKind::Global => GlobalAuxLoss::new().step(cfg, logits, al.coeff)?,
            };
        }
    }
    if any_aux {
        st.aux_loss = Some(aux_total);
    }
    if cfg.z_loss_coeff() > 0.0 {
        st.z_loss = Some(stats::z_loss(logits, cfg.z_loss_coeff())?);
    }
    Ok(st)
}

/// A router on one backend (the native half of :class:`moe_router.Router`).
#[pyclass(name = "Router", module = "moe_router._native", frozen)]
pub struct PyRouter {
    pub(crate) router: Arc<AnyRouter>,
    /// The router of the last per-call bias, reused while the bias is the same.
    biased: Mutex<Option<(Vec<f32>, Arc<AnyRouter>)>>,
    /// CUDA launchers per device for `route_tensor` (registered from Python).
    #[cfg(feature = "cuda")]
    cuda: Mutex<Vec<Arc<CudaEntry>>>,
}

impl PyRouter {
    /// The router for a per-call `bias` (this router when `None`).
    pub(crate) fn with_bias(&self, bias: Option<&[f32]>) -> Result<Arc<AnyRouter>, Error> {
        let Some(b) = bias else {
            return Ok(self.router.clone());
        };
        let mut cache = self
            .biased
            .lock()
            .map_err(|_| Error::Route("bias cache poisoned by an earlier panic".into()))?;
        if let Some((cb, r)) = cache.as_ref()
            && cb.as_slice() == b
        {
            return Ok(r.clone());
        }
        let mut cfg = self.router.config().clone();
        cfg.set_expert_bias(b.to_vec())?;
        let r = Arc::new(AnyRouter::new(self.router.kind(), cfg)?);
        *cache = Some((b.to_vec(), r.clone()));
        Ok(r)
    }
}

#[cfg(feature = "cuda")]
impl PyRouter {
    /// `route_tensor` on a CUDA tensor `t` of device `index`: outputs from torch's caching
    /// allocator (`new_empty`, on the current stream), the launch on torch's current stream.
    /// `None` when the Python path must take it (float64 logits, a layout that needs a copy, a
    /// device without a registered launcher).
    #[allow(unsafe_code)]
    fn route_cuda<'py>(
        &self,
        torch: &Torch,
        logits: &Bound<'py, PyAny>,
        t: Tensor2,
        index: i32,
        check: bool,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        use moe_router::cuda::LogitsDtype;
        use moe_router::cuda::external::{ExternalOp, RawLogits};
        let py = logits.py();
        let dtype = match t.dtype {
            Dt::F32 => LogitsDtype::F32,
            Dt::Bf16 => LogitsDtype::Bf16,
            Dt::F16 => LogitsDtype::F16,
            Dt::F64 => return Ok(None),
        };
        // The Python path's rule: unit column stride and rows at least E apart, else it routes
        // a contiguous copy.
        if (t.s1 != 1 && t.cols > 1) || (t.rows > 1 && t.s0 < t.cols) {
            return Ok(None);
        }
        let entry = {
            let v = self
                .cuda
                .lock()
                .map_err(|_| Error::Route("CUDA launcher table poisoned by an earlier panic".into()))?;
            match v.iter().find(|e| e.index == index) {
                Some(e) => e.clone(),
                None => return Ok(None),
            }
        };
        let k = self.router.config().top_k();
        let stream = torch.stream(py, index)?;
        let launch = &entry.launch.get().launch;
        // SAFETY: `stream` is torch's current stream of device `index`, the launcher's device.
        let capturing = crate::guarded(|| Ok(unsafe { launch.is_capturing(stream)? }))?;
        let reuse = (!capturing).then_some(stream);
        let ((ids, ids_ptr), (w, w_ptr)) = torch.cuda_route_outputs(logits, index, t.rows, k, reuse)?;
        let raw = RawLogits {
            ptr: t.ptr,
            dtype,
            rows: t.rows,
            cols: t.cols,
            ld: if t.rows > 1 { t.s0 } else { t.cols },
        };
        let status = entry.status_ptr;
        detached(py, || {
            // SAFETY: the logits, ids and weights are live torch tensors of device `index` held
            // by this call (the outputs just allocated by torch on the current stream, which is
            // `stream`), the status word is held by `entry`; `launch` is the launcher of that
            // device (registered for `index`).
            unsafe { launch.enqueue(ExternalOp::Route, raw, ids_ptr, w_ptr, status, stream)? };
            if check {
                // SAFETY: as above; waits for `stream`.
                unsafe { launch.read_status(status, None, stream)? };
            }
            Ok(())
        })?;
        Ok(Some(PyTuple::new(py, [ids, w])?))
    }
}

#[pymethods]
impl PyRouter {
    /// A router for `config` on `backend` (``"cpu"``, ``"cuda"``, ``"wgpu"`` or ``"auto"``) with
    /// `numerics` (``"portable"``, ``"native"``, or None for the config's).
    #[new]
    #[pyo3(signature = (config, backend = "auto", numerics = None))]
    fn new(py: Python<'_>, config: &PyRouterConfig, backend: &str, numerics: Option<&str>) -> PyResult<Self> {
        let mut cfg = config.cfg.clone();
        if let Some(n) = numerics {
            let n = parse_numerics(n)?;
            cfg = guarded(|| Ok(cfg.to_builder().numerics(n).build()?))?;
        }
        let backend = backend.to_string();
        let router = detached(py, move || Ok(AnyRouter::from_name(&backend, cfg)?))?;
        Ok(PyRouter {
            router: Arc::new(router),
            biased: Mutex::new(None),
            #[cfg(feature = "cuda")]
            cuda: Mutex::new(Vec::new()),
        })
    }

    /// The backend's name: ``"cpu"``, ``"cuda"`` or ``"wgpu"``.
    #[getter]
    fn backend(&self) -> &'static str {
        self.router.kind().name()
    }

    /// The backend and device, e.g. ``"cpu: AMD EPYC 7B13 (2 threads)"``.
    #[getter]
    fn device(&self) -> String {
        self.router.describe()
    }

    /// The routing rule.
    #[getter]
    fn config(&self) -> PyRouterConfig {
        PyRouterConfig::new(self.router.config().clone())
    }

    /// Routes NumPy logits ``[T, E]``: returns ``(ids int32 [T, K], weights float32 [T, K])``.
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (logits, bias = None, bf16 = false))]
    fn route<'py>(
        &self,
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        bias: Option<PyReadonlyArray1<'py, f32>>,
        bf16: bool,
    ) -> PyResult<(Bound<'py, PyArray2<i32>>, Bound<'py, PyArray2<f32>>)> {
        let h = HostLogits::extract(logits, bf16)?;
        let bias_v = bias.as_ref().map(|b| b.as_array().to_vec());
        let (ids, w) = h.with_view(|lv| {
            detached(py, || {
                let r = self.with_bias(bias_v.as_deref())?;
                let (ids, w) = r.route_host(&lv)?;
                Ok((ids_i32(&ids), weights_f32(w)))
            })
        })?;
        Ok((PyArray2::from_owned_array(py, ids), PyArray2::from_owned_array(py, w)))
    }

    /// Routes a ``torch.Tensor`` ``[T, E]`` without Python-level torch calls: returns ``(ids
    /// int32, weights float32)`` tensors on the logits' device, or ``None`` when this path does
    /// not take the tensor (then the Python path routes it, with its errors). CPU tensors of
    /// float32, float16, bfloat16 or float64 (any strides) are routed on the host with the GIL
    /// released, with `bias` (float32, E) as in `route`; CUDA tensors (float32, bfloat16,
    /// float16; unit column stride) are routed on the device registered with
    /// `set_cuda_device`, on torch's current stream, when `bias` is None. `check` waits for a
    /// CUDA launch and raises its errors.
    #[pyo3(signature = (logits, bias = None, check = false))]
    #[allow(unsafe_code)]
    fn route_tensor<'py>(
        &self,
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        bias: Option<PyReadonlyArray1<'py, f32>>,
        check: bool,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let Some(torch) = Torch::of(py, logits) else {
            return Ok(None);
        };
        let Some(t) = torch.read(logits) else {
            return Ok(None);
        };
        match t.place {
            Place::Cpu => {
                let bias_v = bias.as_ref().map(|b| b.as_array().to_vec());
                // SAFETY: `t` was just read from `logits`, a live CPU tensor held (borrowed from
                // the caller) for this whole call; its address is aligned (checked by `read`).
                let lv = unsafe { host_view(&t) };
                let (ids, w) = detached(py, || {
                    let r = self.with_bias(bias_v.as_deref())?;
                    let (ids, w) = r.route_host(&lv)?;
                    Ok((ids_i32(&ids), weights_f32(w)))
                })?;
                let ids = torch.host_tensor(py, ids)?;
                let w = torch.host_tensor(py, w)?;
                Ok(Some(PyTuple::new(py, [ids, w])?))
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(index) if bias.is_none() => self.route_cuda(torch, logits, t, index, check),
            Place::Cuda(_) => Ok(None),
        }
    }

    /// Registers the plain CUDA launcher of device `index` and its int64 status word (a torch
    /// tensor, held here; `status_ptr` its address) for `route_tensor` (CUDA builds only).
    #[cfg(feature = "cuda")]
    fn set_cuda_device(
        &self,
        index: i32,
        launch: Py<crate::cuda::PyCudaLaunch>,
        status: Py<PyAny>,
        status_ptr: u64,
    ) -> PyResult<()> {
        let mut v = self
            .cuda
            .lock()
            .map_err(|_| Error::Route("CUDA launcher table poisoned by an earlier panic".into()))?;
        v.retain(|e| e.index != index);
        v.push(Arc::new(CudaEntry {
            index,
            launch,
            _status: status,
            status_ptr,
        }));
        Ok(())
    }

    /// The weights of given ids (slot order kept) on NumPy logits: replay.
    #[pyo3(signature = (logits, ids, bf16 = false))]
    fn weights_for<'py>(
        &self,
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        ids: &Bound<'py, PyAny>,
        bf16: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let h = HostLogits::extract(logits, bf16)?;
        let w = h.with_view(|lv| {
            let ids = extract_ids(ids, lv.rows(), self.router.config())?;
            detached(py, || Ok(weights_f32(self.router.weights_host(&lv, ids.view())?)))
        })?;
        Ok(PyArray2::from_owned_array(py, w))
    }

    /// Routing statistics of ids on NumPy logits, as JSON text (the CLI's ``stats.json``).
    #[pyo3(signature = (logits, ids, bf16 = false))]
    fn stats_json(
        &self,
        py: Python<'_>,
        logits: &Bound<'_, PyAny>,
        ids: &Bound<'_, PyAny>,
        bf16: bool,
    ) -> PyResult<String> {
        let h = HostLogits::extract(logits, bf16)?;
        h.with_view(|lv| {
            let (t, e) = lv.dim();
            let cfg = self.router.config();
            if e != cfg.num_experts() {
                return Err(Error::from(RouteError::LogitsShape {
                    expected_experts: cfg.num_experts(),
                    rows: t,
                    cols: e,
                })
                .into());
            }
            let ids = extract_ids(ids, t, cfg)?;
            detached(py, || {
                let st = routing_stats(&self.router, &lv, &ids)?;
                serde_json::to_string(&st).map_err(|e| Error::Route(e.to_string()))
            })
        })
    }

    /// The gradient on NumPy logits ``[T, E]`` of ``Σ grad_weights∘w + grad_aux_loss·aux +
    /// grad_z_loss·zloss``, where ``w`` are the weights of ``ids`` (DESIGN §2b). Returns float32
    /// ``[T, E]`` (float64 when the rule computes in f64). A backend without a backward kernel
    /// (CUDA, wgpu, for now) computes it with the CPU backend, bit-identical in portable mode.
    #[pyo3(signature = (logits, ids, grad_weights, grad_aux_loss = 0.0, grad_z_loss = 0.0, bf16 = false, seq_lens = None))]
    #[allow(clippy::too_many_arguments)]
    fn backward<'py>(
        &self,
        py: Python<'py>,
        logits: &Bound<'py, PyAny>,
        ids: &Bound<'py, PyAny>,
        grad_weights: &Bound<'py, PyAny>,
        grad_aux_loss: f64,
        grad_z_loss: f64,
        bf16: bool,
        seq_lens: Option<Vec<usize>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let h = HostLogits::extract(logits, bf16)?;
        let grad = if let Ok(g) = grad_weights.cast::<PyArray2<f32>>() {
            HostMatrix::F32(g.readonly().as_array().to_owned())
        } else if let Ok(g) = grad_weights.cast::<PyArray2<f64>>() {
            HostMatrix::F64(g.readonly().as_array().to_owned())
        } else {
            return Err(Error::Route(format!(
                "grad_weights must be a 2-D [T, K] array of float32 or float64; got {}",
                describe(grad_weights)
            ))
            .into());
        };
        let dz = h.with_view(|lv| {
            let ids = extract_ids(ids, lv.rows(), self.router.config())?;
            detached(py, || {
                let mut losses = LossGrads::default().aux_loss(grad_aux_loss).z_loss(grad_z_loss);
                if let Some(l) = seq_lens.as_deref() {
                    losses = losses.seq_lens(l);
                }
                let site = CallSite::default();
                match self.router.weights_vjp_host_at(&lv, ids.view(), &grad, &losses, &site) {
                    Err(RouteError::Unsupported { .. }) if self.router.kind() != BackendKind::Cpu => {
                        let cpu = AnyRouter::new(BackendKind::Cpu, self.router.config().clone())?;
                        Ok(cpu.weights_vjp_host_at(&lv, ids.view(), &grad, &losses, &site)?)
                    }
                    r => Ok(r?),
                }
            })
        })?;
        Ok(match dz {
            HostMatrix::F32(a) => PyArray2::from_owned_array(py, a).into_any(),
            HostMatrix::F64(a) => PyArray2::from_owned_array(py, a).into_any(),
        })
    }

    /// Benchmark helper (python/benches): routes NumPy `logits` `iters` times inside Rust (no
    /// Python in the loop, results copied to the host as `route` does) and returns the median
    /// nanoseconds per call over `repeats` timed batches.
    #[pyo3(signature = (logits, iters, repeats = 5, bf16 = false))]
    fn bench_route_ns(
        &self,
        py: Python<'_>,
        logits: &Bound<'_, PyAny>,
        iters: usize,
        repeats: usize,
        bf16: bool,
    ) -> PyResult<f64> {
        let h = HostLogits::extract(logits, bf16)?;
        h.with_view(|lv| {
            detached(py, || {
                let mut v = Vec::with_capacity(repeats.max(1));
                for _ in 0..repeats.max(1) {
                    let t0 = std::time::Instant::now();
                    for _ in 0..iters.max(1) {
                        let (ids, w) = self.router.route_host(&lv)?;
                        std::hint::black_box((ids_i32(&ids), weights_f32(w)));
                    }
                    v.push(t0.elapsed().as_nanos() as f64 / iters.max(1) as f64);
                }
                v.sort_by(f64::total_cmp);
                Ok(v[v.len() / 2])
            })
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Router(backend={:?}, num_experts={}, top_k={}, device={:?})",
            self.router.kind().name(),
            self.router.config().num_experts(),
            self.router.config().top_k(),
            self.router.device_name()
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRouter>()?;
    Ok(())
}
