//! # moe-router-python
//!
//! The Python extension module `moe_router._native` behind the `moe_router` package: PyO3
//! bindings (abi3, CPython ≥ 3.9) of the facade crate `moe-router`. The Python package
//! (`python/moe_router/`) wraps these classes with the public API (array dispatch for NumPy and
//! torch, the autograd Function, the Megatron shim); this crate does the work with the GIL
//! released and turns every Rust error, and any panic, into a Python exception:
//!
//! - [`ConfigError`] (a `ValueError`): invalid or unsupported routing rules, unknown presets;
//! - [`RouteError`] (a `ValueError`): bad logits or replay ids, unavailable backends, device
//!   errors;
//! - [`TraceError`] (a `RuntimeError`): trace files and interop formats.
//!
//! Nothing here links a Python interpreter at build time (abi3): `cargo clippy` and `cargo doc`
//! build the crate as an rlib; maturin builds the cdylib.

mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod router;
mod tensor;
mod trace;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::panic::{AssertUnwindSafe, catch_unwind};

pyo3::create_exception!(
    moe_router,
    ConfigError,
    PyValueError,
    "An invalid or unsupported routing rule (config field, Hugging Face or Megatron import, preset name)."
);
pyo3::create_exception!(
    moe_router,
    RouteError,
    PyValueError,
    "A routing error: logits or replay ids of the wrong shape or with invalid values, a backend that is unavailable (with the reason), a device error."
);
pyo3::create_exception!(
    moe_router,
    TraceError,
    PyRuntimeError,
    "A trace error: an .mrt file or an engine capture that cannot be read, written or converted."
);

/// A Rust error turned into the Python exception of its kind.
pub(crate) enum Error {
    /// [`ConfigError`].
    Config(String),
    /// [`RouteError`].
    Route(String),
    /// [`TraceError`].
    Trace(String),
    /// `ValueError` (bad arguments of the binding itself).
    Value(String),
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Config(m) => ConfigError::new_err(m),
            Error::Route(m) => RouteError::new_err(m),
            Error::Trace(m) => TraceError::new_err(m),
            Error::Value(m) => PyValueError::new_err(m),
        }
    }
}

impl From<moe_router::ConfigError> for Error {
    fn from(e: moe_router::ConfigError) -> Self {
        Error::Config(e.to_string())
    }
}
impl From<moe_router::RouteError> for Error {
    fn from(e: moe_router::RouteError) -> Self {
        Error::Route(e.to_string())
    }
}
impl From<moe_router::trace::TraceError> for Error {
    fn from(e: moe_router::trace::TraceError) -> Self {
        Error::Trace(e.to_string())
    }
}
impl From<moe_router::interop::InteropError> for Error {
    fn from(e: moe_router::interop::InteropError) -> Self {
        Error::Trace(e.to_string())
    }
}

/// Runs `f` with the GIL released, turning a panic into a `RuntimeError` (it never unwinds
/// into Python).
pub(crate) fn detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Error> + Send,
    T: Send,
{
    py.detach(|| guarded(f))
}

/// Runs `f`, turning a panic into a `RuntimeError` and an [`Error`] into its exception.
pub(crate) fn guarded<T, F>(f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Error>,
{
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(PyErr::from),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "internal error in moe-router (a Rust panic, please report it): {msg}"
            )))
        }
    }
}

/// The backends compiled into this build (`cpu` always; `cuda`, `wgpu` by cargo feature).
#[pyfunction]
fn compiled_backends() -> Vec<&'static str> {
    moe_router::BackendKind::ALL
        .into_iter()
        .filter(|k| k.compiled_in())
        .map(|k| k.name())
        .collect()
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("RouteError", py.get_type::<RouteError>())?;
    m.add("TraceError", py.get_type::<TraceError>())?;
    m.add("MAX_EXPERTS", moe_router::MAX_EXPERTS)?;
    m.add_function(wrap_pyfunction!(compiled_backends, m)?)?;
    m.add_function(wrap_pyfunction!(tensor::torch_path, m)?)?;
    m.add_function(wrap_pyfunction!(tensor::_torch_step_ns, m)?)?;
    m.add_function(wrap_pyfunction!(tensor::release_output_cache, m)?)?;
    config::register(m)?;
    router::register(m)?;
    trace::register(m)?;
    #[cfg(feature = "cuda")]
    cuda::register(m)?;
    Ok(())
}
