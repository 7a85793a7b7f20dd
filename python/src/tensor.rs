//! torch tensors read and made from Rust, without the Python-level torch calls that dominate a
//! small `route` call (`tensor.numpy()`, `torch.from_numpy`, `torch.empty`, each microseconds).
//!
//! Two readers of a `torch.Tensor` (exactly that type: subclasses such as fake or wrapper
//! tensors take the Python path, which keeps their behaviour):
//!
//! - the DLPack C exchange API (`torch.Tensor.__dlpack_c_exchange_api__`, DLPack 1.2+, torch ≥
//!   2.10): a non-owning `DLTensor` of the tensor (address, device, dtype, shape, strides) in one
//!   C call, the current stream of a CUDA device in another, and host outputs handed to torch as
//!   `DLManagedTensorVersioned`s that own their Rust buffers (no copy, no NumPy);
//! - otherwise the tensor's attributes (`dtype`, `shape`, `stride()`, `data_ptr()`, the device),
//!   with host outputs through `torch.from_numpy`.
//!
//! Anything these readers cannot take (another dtype or rank, a device other than the CPU or
//! CUDA, an unaligned address, an error raised by torch) is reported as `None`, and the caller
//! falls back to the Python path, which raises the same errors as before.
#![allow(unsafe_code)]

use numpy::PyArray2;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};
use pyo3::{ffi, intern};
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// `DLPackVersion`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DlVersion {
    major: u32,
    minor: u32,
}

/// `DLDevice`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DlDevice {
    device_type: c_int,
    device_id: i32,
}

/// `DLDataType`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

/// `DLTensor`.
#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

/// `DLManagedTensorVersioned`.
#[repr(C)]
#[allow(dead_code)] // every field is part of the C layout; `version` and `flags` are torch's to read
struct DlManagedTensorVersioned {
    version: DlVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DlTensor,
}

/// `DLPackExchangeAPIHeader`.
#[repr(C)]
#[allow(dead_code)] // `prev_api` is part of the C layout
struct DlExchangeHeader {
    version: DlVersion,
    prev_api: *mut DlExchangeHeader,
}

type ManagedAllocator = unsafe extern "C" fn(
    *mut DlTensor,
    *mut *mut DlManagedTensorVersioned,
    *mut c_void,
    Option<unsafe extern "C" fn(*mut c_void, *const std::ffi::c_char, *const std::ffi::c_char)>,
) -> c_int;
type ManagedFromPy = unsafe extern "C" fn(*mut c_void, *mut *mut DlManagedTensorVersioned) -> c_int;
type ManagedToPy = unsafe extern "C" fn(*mut DlManagedTensorVersioned, *mut *mut c_void) -> c_int;
type DlTensorFromPy = unsafe extern "C" fn(*mut c_void, *mut DlTensor) -> c_int;
type CurrentStream = unsafe extern "C" fn(c_int, i32, *mut *mut c_void) -> c_int;

/// `DLPackExchangeAPI` (DLPack 1.2+).
#[repr(C)]
#[allow(dead_code)] // the owning export is part of the C layout, unused here
struct DlExchangeApi {
    header: DlExchangeHeader,
    managed_tensor_allocator: Option<ManagedAllocator>,
    managed_tensor_from_py_object_no_sync: Option<ManagedFromPy>,
    managed_tensor_to_py_object_no_sync: Option<ManagedToPy>,
    dltensor_from_py_object_no_sync: Option<DlTensorFromPy>,
    current_work_stream: Option<CurrentStream>,
}

const KDL_CPU: c_int = 1;
const KDL_CUDA: c_int = 2;
const KDL_FLOAT: u8 = 2;
const KDL_INT: u8 = 0;
const KDL_BFLOAT: u8 = 4;

/// The functions of the exchange API the fast path uses (the first three checked present; the
/// allocator is used when torch offers it).
#[derive(Clone, Copy)]
struct Exchange {
    to_py: ManagedToPy,
    view: DlTensorFromPy,
    stream: CurrentStream,
    alloc: Option<ManagedAllocator>,
}

/// Element type of logits taken by the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dt {
    F32,
    F16,
    Bf16,
    F64,
}

impl Dt {
    fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::F16 | Dt::Bf16 => 2,
            Dt::F64 => 8,
        }
    }

    fn of_dlpack(d: DlDataType) -> Option<Dt> {
        match (d.code, d.bits, d.lanes) {
            (KDL_FLOAT, 32, 1) => Some(Dt::F32),
            (KDL_FLOAT, 16, 1) => Some(Dt::F16),
            (KDL_BFLOAT, 16, 1) => Some(Dt::Bf16),
            (KDL_FLOAT, 64, 1) => Some(Dt::F64),
            _ => None,
        }
    }
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    Cpu,
    Cuda(i32),
}

/// A 2-D strided tensor as read from torch (strides in elements, never negative in torch).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tensor2 {
    /// Address of element `[0, 0]`.
    pub ptr: u64,
    pub place: Place,
    pub dtype: Dt,
    pub rows: usize,
    pub cols: usize,
    pub s0: usize,
    pub s1: usize,
}

/// What torch offers this process, found once on the first `torch.Tensor` seen.
pub(crate) struct Torch {
    tensor_type: Py<PyType>,
    exchange: Option<Exchange>,
    from_numpy: Py<PyAny>,
    raw_stream: Option<Py<PyAny>>,
    dtypes: [(Py<PyAny>, Dt); 4],
    /// `{"dtype": torch.int32}` and `{"dtype": torch.float32}` (keyword arguments of `new_empty`).
    kw_i32: Py<PyDict>,
    kw_f32: Py<PyDict>,
}

static TORCH: PyOnceLock<Option<Torch>> = PyOnceLock::new();

/// 0: the exchange API when torch has it; 1: attributes only; 2: no native path.
static MODE: AtomicU8 = AtomicU8::new(0);

impl Torch {
    /// torch's description, if `obj` is exactly a `torch.Tensor` (`None` for anything else).
    pub(crate) fn of<'a>(py: Python<'a>, obj: &Bound<'a, PyAny>) -> Option<&'a Torch> {
        if MODE.load(Ordering::Relaxed) == 2 {
            return None;
        }
        let t = match TORCH.get(py) {
            Some(t) => t.as_ref()?,
            None => {
                // Only a torch.Tensor can initialise the cache (torch is imported by then).
                let ty = obj.get_type();
                if ty.name().ok()?.to_cow().ok()? != "Tensor" {
                    return None;
                }
                let torch = py.import("sys").ok()?.getattr("modules").ok()?.get_item("torch").ok()?;
                if !ty.is(&torch.getattr("Tensor").ok()?) {
                    return None;
                }
                TORCH.get_or_init(py, || Torch::new(&torch).ok()).as_ref()?
            }
        };
        if obj.get_type().is(t.tensor_type.bind(py)) {
            Some(t)
        } else {
            None
        }
    }

    fn new(torch: &Bound<'_, PyAny>) -> PyResult<Torch> {
        let py = torch.py();
        let tensor_type = torch.getattr("Tensor")?.cast_into::<PyType>()?;
        let exchange = tensor_type
            .getattr("__dlpack_c_exchange_api__")
            .ok()
            .and_then(|cap| exchange_of(&cap));
        let raw_stream = torch
            .getattr("_C")
            .and_then(|c| c.getattr("_cuda_getCurrentRawStream"))
            .ok()
            .map(Bound::unbind);
        let dt = |n: &str| torch.getattr(n).map(Bound::unbind);
        let kw = |n: &str| -> PyResult<Py<PyDict>> {
            let d = PyDict::new(py);
            d.set_item("dtype", torch.getattr(n)?)?;
            Ok(d.unbind())
        };
        Ok(Torch {
            tensor_type: tensor_type.unbind(),
            exchange,
            from_numpy: torch.getattr("from_numpy")?.unbind(),
            raw_stream,
            dtypes: [
                (dt("float32")?, Dt::F32),
                (dt("bfloat16")?, Dt::Bf16),
                (dt("float16")?, Dt::F16),
                (dt("float64")?, Dt::F64),
            ],
            kw_i32: kw("int32")?,
            kw_f32: kw("float32")?,
        })
    }

    /// The exchange API unless the attribute path is forced.
    fn exchange(&self) -> Option<Exchange> {
        if MODE.load(Ordering::Relaxed) == 0 {
            self.exchange
        } else {
            None
        }
    }

    /// `obj` (a `torch.Tensor`) as a 2-D tensor of a float dtype on the CPU or a CUDA device;
    /// `None` (and no Python error pending) otherwise.
    pub(crate) fn read(&self, obj: &Bound<'_, PyAny>) -> Option<Tensor2> {
        let r = match self.exchange() {
            Some(x) => read_exchange(x, obj),
            None => self.read_attrs(obj).ok().flatten(),
        };
        if r.is_none() {
            // A torch error on the way (a tensor without storage, a sparse layout): the Python
            // path raises it again, with its usual message.
            drop(PyErr::take(obj.py()));
        }
        let t = r?;
        if !t.ptr.is_multiple_of(t.dtype.size() as u64) {
            return None;
        }
        Some(t)
    }

    fn read_attrs(&self, obj: &Bound<'_, PyAny>) -> PyResult<Option<Tensor2>> {
        let py = obj.py();
        let d = obj.getattr(intern!(py, "dtype"))?;
        let Some(dtype) = self.dtypes.iter().find(|(o, _)| d.is(o.bind(py))).map(|(_, t)| *t) else {
            return Ok(None);
        };
        let Ok((rows, cols)) = obj.getattr(intern!(py, "shape"))?.extract::<(usize, usize)>() else {
            return Ok(None);
        };
        let (s0, s1) = obj.call_method0(intern!(py, "stride"))?.extract::<(isize, isize)>()?;
        if s0 < 0 || s1 < 0 {
            return Ok(None);
        }
        let place = if obj.getattr(intern!(py, "is_cuda"))?.is_truthy()? {
            Place::Cuda(obj.call_method0(intern!(py, "get_device"))?.extract()?)
        } else if obj.getattr(intern!(py, "is_cpu"))?.is_truthy()? {
            Place::Cpu
        } else {
            return Ok(None);
        };
        let ptr: u64 = obj.call_method0(intern!(py, "data_ptr"))?.extract()?;
        Ok(Some(Tensor2 {
            ptr,
            place,
            dtype,
            rows,
            cols,
            s0: s0 as usize,
            s1: s1 as usize,
        }))
    }

    /// The address of a tensor this crate just made (`new_empty`), of any dtype.
    pub(crate) fn address(&self, obj: &Bound<'_, PyAny>) -> PyResult<u64> {
        if let Some(x) = self.exchange() {
            let mut t = empty_dltensor();
            // SAFETY: `obj` is a live torch.Tensor (made by torch for us) of the type the API
            // was found on; the GIL is held; `t` is a valid out-pointer.
            if unsafe { (x.view)(obj.as_ptr().cast(), &mut t) } == 0 {
                return Ok(t.data as u64 + t.byte_offset);
            }
            return Err(PyErr::fetch(obj.py()));
        }
        obj.call_method0(intern!(obj.py(), "data_ptr"))?.extract()
    }

    /// torch's current stream (raw `cudaStream_t`) of CUDA device `index`.
    pub(crate) fn stream(&self, py: Python<'_>, index: i32) -> PyResult<u64> {
        if let Some(x) = self.exchange() {
            let mut s: *mut c_void = std::ptr::null_mut();
            // SAFETY: a function of torch's exchange API with a valid out-pointer; GIL held.
            if unsafe { (x.stream)(KDL_CUDA, index, &mut s) } == 0 {
                return Ok(s as u64);
            }
            return Err(PyErr::fetch(py));
        }
        match &self.raw_stream {
            Some(f) => f.bind(py).call1((index,))?.extract(),
            None => py
                .import("torch.cuda")?
                .call_method1("current_stream", (index,))?
                .getattr("cuda_stream")?
                .extract(),
        }
    }

    /// A fresh `[rows, cols]` tensor of int32 (`int = true`) or float32 on `like`'s device,
    /// from torch's allocator (on a CUDA device: the caching allocator, on the current stream).
    pub(crate) fn new_empty<'py>(
        &self,
        like: &Bound<'py, PyAny>,
        rows: usize,
        cols: usize,
        int: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = like.py();
        let kw = if int { &self.kw_i32 } else { &self.kw_f32 };
        like.call_method(intern!(py, "new_empty"), ((rows, cols),), Some(kw.bind(py)))
    }

    /// A fresh `[rows, cols]` tensor of int32 (`int = true`) or float32 on CUDA device `index`
    /// and its address: through the exchange API's allocator when torch offers it (torch's
    /// `at::empty`: the caching allocator, on the device's current stream, with no Python call),
    /// else `like.new_empty` (`like`: a tensor of that device).
    pub(crate) fn cuda_empty<'py>(
        &self,
        like: &Bound<'py, PyAny>,
        index: i32,
        rows: usize,
        cols: usize,
        int: bool,
    ) -> PyResult<(Bound<'py, PyAny>, u64)> {
        let py = like.py();
        if let Some(alloc) = self.exchange().and_then(|x| x.alloc.map(|a| (x, a))) {
            return exchange_empty(py, alloc, KDL_CUDA, index, rows, cols, int);
        }
        let t = self.new_empty(like, rows, cols, int)?;
        let ptr = self.address(&t)?;
        Ok((t, ptr))
    }

    /// The outputs of a route on CUDA device `index`: ids (int32) and weights (float32), each
    /// `[rows, k]`, with their addresses. With the exchange API's allocator both live in one
    /// allocation from torch (one `at::empty`, the caching allocator on the current stream),
    /// handed out as two tensors that keep it alive together; else two `cuda_empty` calls.
    ///
    /// `reuse` is the current stream of `index` when the call may take a block of the output
    /// cache ([`OutputCache`]) and give it back there when its tensors die; `None` while the
    /// stream is captured into a CUDA graph (the graph owns what it writes).
    pub(crate) fn cuda_route_outputs<'py>(
        &self,
        like: &Bound<'py, PyAny>,
        index: i32,
        rows: usize,
        k: usize,
        reuse: Option<u64>,
    ) -> PyResult<RouteOutputs<'py>> {
        let py = like.py();
        let Some(api) = self.exchange().and_then(|x| x.alloc.map(|a| (x, a))) else {
            return Ok((
                self.cuda_empty(like, index, rows, k, true)?,
                self.cuda_empty(like, index, rows, k, false)?,
            ));
        };
        // Weights start on a 256-byte boundary after the ids (what a separate allocation gets).
        let n = rows * k;
        let w_off = (n * 4).div_ceil(256) * 256;
        let words = (w_off + n * 4).max(4) / 4;
        let (x, alloc) = api;
        let key = reuse.map(|stream| BlockKey {
            device: index,
            stream,
            words,
        });
        let torch_managed = match key.and_then(|k| OUTPUTS.take(k)) {
            Some(m) => m,
            None => exchange_alloc(py, alloc, KDL_CUDA, index, &[words as i64], true)?,
        };
        // SAFETY: a valid managed tensor torch made, ours until its deleter runs.
        let base = unsafe { (*torch_managed).dl_tensor.data as u64 + (*torch_managed).dl_tensor.byte_offset };
        let shared = Arc::new(TorchBlock {
            managed: torch_managed,
            key,
        });
        let ids = view_to_torch(py, x, &shared, base, rows, k, (KDL_INT, 32), index)?;
        let w = view_to_torch(py, x, &shared, base + w_off as u64, rows, k, (KDL_FLOAT, 32), index)?;
        Ok(((ids, base), (w, base + w_off as u64)))
    }

    /// A CPU tensor owning `a` (no copy with the exchange API; through NumPy otherwise).
    pub(crate) fn host_tensor<'py, T: HostElem>(
        &self,
        py: Python<'py>,
        a: ndarray::Array2<T>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Some(x) = self.exchange() {
            return owned_to_torch(py, x, a);
        }
        let arr = PyArray2::from_owned_array(py, a);
        self.from_numpy.bind(py).call1((arr,))
    }
}

/// The exchange API in the capsule `cap`, if it is a DLPack 1.x one with the functions used here.
fn exchange_of(cap: &Bound<'_, PyAny>) -> Option<Exchange> {
    // SAFETY: PyCapsule_GetPointer checks the object is a capsule of that name (else NULL with
    // an error set, cleared below); the API struct is static in libtorch for the process.
    let p = unsafe { ffi::PyCapsule_GetPointer(cap.as_ptr(), c"dlpack_exchange_api".as_ptr()) };
    if p.is_null() {
        drop(PyErr::take(cap.py()));
        return None;
    }
    // SAFETY: a non-null pointer to torch's static DLPackExchangeAPI.
    let api = unsafe { &*(p as *const DlExchangeApi) };
    if api.header.version.major != 1 || api.header.version.minor < 2 {
        return None;
    }
    Some(Exchange {
        to_py: api.managed_tensor_to_py_object_no_sync?,
        view: api.dltensor_from_py_object_no_sync?,
        stream: api.current_work_stream?,
        alloc: api.managed_tensor_allocator,
    })
}

/// Where the exchange allocator's `SetError` puts torch's message (`ctx`: a `*mut String`).
unsafe extern "C" fn set_error(ctx: *mut c_void, kind: *const std::ffi::c_char, message: *const std::ffi::c_char) {
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: torch passes NUL-terminated strings valid for the call.
            unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    if !ctx.is_null() {
        // SAFETY: `ctx` is the `String` `exchange_empty` passes, alive for the allocator call.
        unsafe { *(ctx as *mut String) = format!("{}: {}", text(kind), text(message)) };
    }
}

/// A fresh managed tensor of `shape` (int32 when `int`, else float32) on (`device_type`,
/// `index`) from torch's allocator through the exchange API (owned by the caller: hand it to
/// torch or call its deleter).
fn exchange_alloc(
    py: Python<'_>,
    alloc: ManagedAllocator,
    device_type: c_int,
    index: i32,
    shape: &[i64],
    int: bool,
) -> PyResult<*mut DlManagedTensorVersioned> {
    let mut dims = shape.to_vec();
    let mut proto = empty_dltensor();
    proto.device = DlDevice {
        device_type,
        device_id: index,
    };
    proto.ndim = dims.len() as i32;
    proto.dtype = DlDataType {
        code: if int { KDL_INT } else { KDL_FLOAT },
        bits: 32,
        lanes: 1,
    };
    proto.shape = dims.as_mut_ptr();
    let mut managed: *mut DlManagedTensorVersioned = std::ptr::null_mut();
    let mut err = String::new();
    // SAFETY: torch's allocator reads the prototype's dtype, ndim, shape and device (all valid
    // for the call) and writes an owning managed tensor to `managed`, or calls `set_error` with
    // `err` (a live String) and fails; the GIL is held.
    let rc = unsafe {
        alloc(
            &mut proto,
            &mut managed,
            (&mut err as *mut String).cast(),
            Some(set_error),
        )
    };
    if rc != 0 || managed.is_null() {
        if let Some(e) = PyErr::take(py) {
            return Err(e);
        }
        return Err(crate::Error::Route(format!("torch could not allocate a {shape:?} output: {err}")).into());
    }
    Ok(managed)
}

/// A fresh `[rows, cols]` int32 / float32 tensor on (`device_type`, `index`) from torch's
/// allocator through the exchange API, and its address.
fn exchange_empty(
    py: Python<'_>,
    (x, alloc): (Exchange, ManagedAllocator),
    device_type: c_int,
    index: i32,
    rows: usize,
    cols: usize,
    int: bool,
) -> PyResult<(Bound<'_, PyAny>, u64)> {
    let managed = exchange_alloc(py, alloc, device_type, index, &[rows as i64, cols as i64], int)?;
    // SAFETY: `managed` is the valid managed tensor torch just made (ours until handed back).
    let ptr = unsafe { (*managed).dl_tensor.data as u64 + (*managed).dl_tensor.byte_offset };
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: hands the managed tensor back to torch as a torch.Tensor (torch takes ownership,
    // as in `owned_to_torch`); `out` is a valid out-pointer; the GIL is held.
    let rc = unsafe { (x.to_py)(managed, &mut out) };
    if rc != 0 || out.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference to the tensor torch made.
    Ok((unsafe { Bound::from_owned_ptr(py, out.cast()) }, ptr))
}

/// Ids and weights tensors with their addresses (`Torch::cuda_route_outputs`).
pub(crate) type RouteOutputs<'py> = ((Bound<'py, PyAny>, u64), (Bound<'py, PyAny>, u64));

/// Where a route output block may be reused: the same device, the same stream (torch's
/// caching-allocator rule: a block freed on a stream is reused by work ordered after it on that
/// stream), the same size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockKey {
    device: i32,
    stream: u64,
    /// Size in 4-byte words.
    words: usize,
}

/// A managed tensor made by torch, released (its deleter called) when the last view of it dies,
/// or kept in the [`OutputCache`] for the next route of the same size on the same stream.
struct TorchBlock {
    managed: *mut DlManagedTensorVersioned,
    /// `Some` when the block may go back to the cache (not made under stream capture).
    key: Option<BlockKey>,
}

// SAFETY: the pointer is only used to call torch's deleter once, from whichever thread drops the
// last view (or empties the cache); torch's DLPack deleters may run on any thread (the DLPack
// contract).
unsafe impl Send for TorchBlock {}
// SAFETY: no access through a shared reference (only `Drop` uses the pointer).
unsafe impl Sync for TorchBlock {}

impl Drop for TorchBlock {
    fn drop(&mut self) {
        if let Some(key) = self.key
            && OUTPUTS.put(key, self.managed)
        {
            return;
        }
        release_block(self.managed);
    }
}

/// Gives a managed tensor back to torch (its deleter frees the `at::Tensor` it holds).
fn release_block(m: *mut DlManagedTensorVersioned) {
    // SAFETY: a managed tensor torch made, not yet released (the cache and `TorchBlock` each
    // own theirs exclusively); its deleter frees it.
    unsafe {
        if let Some(d) = (*m).deleter {
            d(m);
        }
    }
}

/// The largest route output block the cache keeps (bytes): decode-sized routes, where torch's
/// allocation is a large part of the call (T·K up to 131072).
const CACHE_MAX_BLOCK_BYTES: usize = 1 << 20;
/// Blocks the cache keeps at most (all devices and streams together).
const CACHE_MAX_BLOCKS: usize = 16;

/// Route output blocks whose tensors have died, kept (still allocated from torch's caching
/// allocator) for the next route of the same size on the same device and stream: a decode
/// loop then skips torch's allocator (~2.7 µs per call measured on an H200 host) after its
/// first call. At most [`CACHE_MAX_BLOCKS`] blocks of at most [`CACHE_MAX_BLOCK_BYTES`] each;
/// `release_output_cache` (Python) hands them all back to torch.
struct OutputCache {
    enabled: std::sync::atomic::AtomicBool,
    blocks: std::sync::Mutex<Vec<(BlockKey, TorchBlockPtr)>>,
}

/// A cached managed tensor (owned by the cache).
struct TorchBlockPtr(*mut DlManagedTensorVersioned);
// SAFETY: as for `TorchBlock`: only handed back to a `TorchBlock` or to torch's deleter.
unsafe impl Send for TorchBlockPtr {}

static OUTPUTS: OutputCache = OutputCache {
    enabled: std::sync::atomic::AtomicBool::new(true),
    blocks: std::sync::Mutex::new(Vec::new()),
};

impl OutputCache {
    /// A cached block for `key`, if any.
    fn take(&self, key: BlockKey) -> Option<*mut DlManagedTensorVersioned> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let mut b = self.blocks.lock().ok()?;
        let i = b.iter().rposition(|(k, _)| *k == key)?;
        Some(b.swap_remove(i).1.0)
    }

    /// Keeps `m` for `key` if the cache is on and has room; `false` (the caller releases it)
    /// otherwise.
    fn put(&self, key: BlockKey, m: *mut DlManagedTensorVersioned) -> bool {
        if !self.enabled.load(Ordering::Relaxed) || key.words * 4 > CACHE_MAX_BLOCK_BYTES {
            return false;
        }
        match self.blocks.lock() {
            Ok(mut b) if b.len() < CACHE_MAX_BLOCKS => {
                b.push((key, TorchBlockPtr(m)));
                true
            }
            _ => false,
        }
    }

    /// Hands every cached block back to torch; returns their total size in bytes.
    fn release(&self) -> usize {
        let taken = match self.blocks.lock() {
            Ok(mut b) => std::mem::take(&mut *b),
            Err(_) => return 0,
        };
        let bytes = taken.iter().map(|(k, _)| k.words * 4).sum();
        for (_, m) in taken {
            release_block(m.0);
        }
        bytes
    }
}

/// Hands the CUDA route outputs ``moe_router`` keeps for reuse back to torch's allocator and
/// returns their size in bytes (call it before ``torch.cuda.empty_cache()`` to return every
/// byte to the driver). With ``enabled`` given, also turns the cache on or off (on by
/// default); off, every route allocates its outputs from torch.
#[pyfunction]
#[pyo3(signature = (enabled = None))]
pub(crate) fn release_output_cache(enabled: Option<bool>) -> usize {
    if let Some(e) = enabled {
        OUTPUTS.enabled.store(e, Ordering::Relaxed);
    }
    OUTPUTS.release()
}

/// A torch tensor viewing `[rows, cols]` elements of `dtype` at `addr` inside `block` on CUDA
/// device `index` (the view keeps the block alive).
#[allow(clippy::too_many_arguments)]
fn view_to_torch<'py>(
    py: Python<'py>,
    x: Exchange,
    block: &Arc<TorchBlock>,
    addr: u64,
    rows: usize,
    cols: usize,
    dtype: (u8, u8),
    index: i32,
) -> PyResult<Bound<'py, PyAny>> {
    let device = DlDevice {
        device_type: KDL_CUDA,
        device_id: index,
    };
    managed_to_torch(py, x, addr as *mut c_void, device, dtype, rows, cols, block.clone())
}

/// A DLPack managed tensor `[rows, cols]` (row-major) that owns `keep` (what keeps its memory
/// alive), its first field the managed tensor.
#[repr(C)]
struct Managed<K> {
    managed: DlManagedTensorVersioned,
    shape: [i64; 2],
    strides: [i64; 2],
    _keep: K,
}

unsafe extern "C" fn drop_managed<K>(p: *mut DlManagedTensorVersioned) {
    if !p.is_null() {
        // SAFETY: `p` is the `managed` field (first, repr(C)) of a `Managed<K>` leaked from a Box
        // in `managed_to_torch`; torch calls the deleter once, from any thread.
        drop(unsafe { Box::from_raw((*p).manager_ctx as *mut Managed<K>) });
    }
}

/// Hands `[rows, cols]` elements of `dtype` at `data` on `device` to torch as a tensor that owns
/// `keep` (dropped, from any thread, when the tensor dies).
#[allow(clippy::too_many_arguments)]
fn managed_to_torch<'py, K: Send + 'static>(
    py: Python<'py>,
    x: Exchange,
    data: *mut c_void,
    device: DlDevice,
    dtype: (u8, u8),
    rows: usize,
    cols: usize,
    keep: K,
) -> PyResult<Bound<'py, PyAny>> {
    let raw = Box::into_raw(Box::new(Managed {
        managed: DlManagedTensorVersioned {
            version: DlVersion { major: 1, minor: 2 },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(drop_managed::<K>),
            flags: 0,
            dl_tensor: DlTensor {
                data,
                device,
                ndim: 2,
                dtype: DlDataType {
                    code: dtype.0,
                    bits: dtype.1,
                    lanes: 1,
                },
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
        },
        shape: [rows as i64, cols as i64],
        strides: [cols as i64, 1],
        _keep: keep,
    }));
    // SAFETY: `raw` is a valid, uniquely owned Box; the pointers set here point into it (its
    // heap address is stable until the deleter frees it).
    unsafe {
        (*raw).managed.manager_ctx = raw.cast();
        (*raw).managed.dl_tensor.shape = (*raw).shape.as_mut_ptr();
        (*raw).managed.dl_tensor.strides = (*raw).strides.as_mut_ptr();
    }
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: torch takes ownership of the managed tensor (its deleter frees the box, and with
    // it `keep`, when the tensor dies); `out` is a valid out-pointer; the GIL is held.
    let rc = unsafe { (x.to_py)(raw.cast(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference to the tensor torch made.
    Ok(unsafe { Bound::from_owned_ptr(py, out.cast()) })
}

fn empty_dltensor() -> DlTensor {
    DlTensor {
        data: std::ptr::null_mut(),
        device: DlDevice {
            device_type: KDL_CPU,
            device_id: 0,
        },
        ndim: 0,
        dtype: DlDataType {
            code: KDL_INT,
            bits: 0,
            lanes: 0,
        },
        shape: std::ptr::null_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    }
}

fn read_exchange(x: Exchange, obj: &Bound<'_, PyAny>) -> Option<Tensor2> {
    let mut t = empty_dltensor();
    // SAFETY: `obj` is exactly a torch.Tensor (checked by `Torch::of`), the type the API was
    // found on; the GIL is held; `t` is a valid out-pointer. The shape and strides it points to
    // are read before control returns to Python.
    if unsafe { (x.view)(obj.as_ptr().cast(), &mut t) } != 0 {
        return None;
    }
    if t.ndim != 2 || t.shape.is_null() {
        return None;
    }
    let dtype = Dt::of_dlpack(t.dtype)?;
    // SAFETY: ndim = 2, so shape has two entries; strides too when not NULL (NULL, allowed
    // before DLPack 1.2, means row-major).
    let (rows, cols, s0, s1) = unsafe {
        let (r, c) = (*t.shape, *t.shape.add(1));
        let (s0, s1) = if t.strides.is_null() {
            (c, 1)
        } else {
            (*t.strides, *t.strides.add(1))
        };
        (r, c, s0, s1)
    };
    if rows < 0 || cols < 0 || s0 < 0 || s1 < 0 {
        return None;
    }
    let place = match t.device.device_type {
        KDL_CPU => Place::Cpu,
        KDL_CUDA => Place::Cuda(t.device.device_id),
        _ => return None,
    };
    Some(Tensor2 {
        ptr: t.data as u64 + t.byte_offset,
        place,
        dtype,
        rows: rows as usize,
        cols: cols as usize,
        s0: s0 as usize,
        s1: s1 as usize,
    })
}

/// Element types of host outputs handed to torch.
pub(crate) trait HostElem: numpy::Element + Copy + Send + 'static {
    /// The DLPack dtype.
    const DL: (u8, u8);
}

impl HostElem for i32 {
    const DL: (u8, u8) = (KDL_INT, 32);
}

impl HostElem for f32 {
    const DL: (u8, u8) = (KDL_FLOAT, 32);
}

/// The elements of `a` in row-major order (no copy for an owned standard-layout array).
fn row_major<T: Copy>(a: ndarray::Array2<T>) -> Vec<T> {
    if a.is_standard_layout() {
        let n = a.len();
        let (v, off) = a.into_raw_vec_and_offset();
        let off = off.unwrap_or(0);
        if off == 0 && v.len() == n {
            return v;
        }
        return v[off..off + n].to_vec();
    }
    a.iter().copied().collect()
}

fn owned_to_torch<'py, T: HostElem>(
    py: Python<'py>,
    x: Exchange,
    a: ndarray::Array2<T>,
) -> PyResult<Bound<'py, PyAny>> {
    let (rows, cols) = a.dim();
    let mut data = row_major(a);
    let ptr = if data.is_empty() {
        std::ptr::NonNull::<T>::dangling().as_ptr()
    } else {
        data.as_mut_ptr()
    };
    let device = DlDevice {
        device_type: KDL_CPU,
        device_id: 0,
    };
    // The Vec's heap buffer does not move when the Vec moves into the managed tensor.
    managed_to_torch(py, x, ptr.cast(), device, T::DL, rows, cols, data)
}

/// Which path `Router.route` takes for torch tensors, or (with `set`) forces one: ``"auto"``
/// (the DLPack C exchange API when torch has it, else the tensor's attributes),
/// ``"attributes"`` or ``"python"`` (the Python path, as before this fast path). Returns the
/// path in effect: ``"exchange"``, ``"attributes"`` or ``"python"`` (for tests and benchmarks).
#[pyfunction]
#[pyo3(signature = (set = None))]
pub(crate) fn torch_path(py: Python<'_>, set: Option<&str>) -> PyResult<&'static str> {
    if let Some(s) = set {
        let m = match s {
            "auto" => 0,
            "attributes" => 1,
            "python" => 2,
            other => {
                return Err(crate::Error::Value(format!(
                    "unknown torch path {other:?}; use 'auto', 'attributes' or 'python'"
                ))
                .into());
            }
        };
        MODE.store(m, Ordering::Relaxed);
    }
    let exchange = match TORCH.get(py) {
        Some(Some(t)) => t.exchange.is_some(),
        Some(None) => false,
        None => {
            // Not initialised yet: look at torch if it is imported.
            let torch = py.import("sys")?.getattr("modules")?.get_item("torch").ok();
            match torch {
                Some(t) => {
                    let t = TORCH.get_or_init(py, || Torch::new(&t).ok());
                    t.as_ref().is_some_and(|t| t.exchange.is_some())
                }
                None => false,
            }
        }
    };
    Ok(match MODE.load(Ordering::Relaxed) {
        2 => "python",
        0 if exchange => "exchange",
        _ => "attributes",
    })
}

/// Benchmark helper (python/benches): nanoseconds per call of one step of the torch fast path on
/// `tensor` (a 2-D `torch.Tensor`), `iters` calls timed in Rust with the GIL held: ``"read"``
/// (its address, dtype, shape and strides), ``"empty"`` (a fresh `[rows, 8]` float32 output on
/// its device, made and dropped), ``"stream"`` (the current stream of its CUDA device) or
/// ``"outputs"`` (a route's ids and weights tensors `[rows, 8]`, through the output cache, made
/// and dropped) or ``"capturing"`` (the stream's capture status, with the current stream).
#[pyfunction]
pub(crate) fn _torch_step_ns(tensor: &Bound<'_, PyAny>, step: &str, iters: usize) -> PyResult<f64> {
    let py = tensor.py();
    let unsupported = || crate::Error::Value("not a 2-D float torch.Tensor on the CPU or a CUDA device".into());
    let torch = Torch::of(py, tensor).ok_or_else(unsupported)?;
    let t = torch.read(tensor).ok_or_else(unsupported)?;
    let index = match t.place {
        Place::Cuda(i) => i,
        Place::Cpu => -1,
    };
    let n = iters.max(1);
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        match step {
            "read" => drop(std::hint::black_box(torch.read(tensor))),
            "empty" if index >= 0 => drop(torch.cuda_empty(tensor, index, t.rows, 8, false)?),
            "empty" => drop(torch.host_tensor(py, ndarray::Array2::<f32>::zeros((t.rows, 8)))?),
            "stream" if index >= 0 => drop(std::hint::black_box(torch.stream(py, index)?)),
            #[cfg(feature = "cuda")]
            "capturing" if index >= 0 => {
                use moe_router::cuda::cudarc::driver::sys;
                let s = torch.stream(py, index)?;
                let mut st = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
                // SAFETY: torch's current stream of a device whose primary context torch made
                // current on this thread; `st` is a valid out-pointer.
                std::hint::black_box(unsafe { sys::cuStreamIsCapturing(s as sys::CUstream, &mut st) });
            }
            "outputs" if index >= 0 => {
                let s = torch.stream(py, index)?;
                drop(torch.cuda_route_outputs(tensor, index, t.rows, 8, Some(s))?)
            }
            other => return Err(crate::Error::Value(format!("unknown step {other:?} for this tensor")).into()),
        }
    }
    Ok(t0.elapsed().as_nanos() as f64 / n as f64)
}
