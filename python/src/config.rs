//! `moe_router.RouterConfig`: a validated routing rule.

use crate::{Error, guarded};
use moe_router::{Numerics, RouterConfig};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

/// A complete, validated routing rule (DESIGN §2): E experts, top-k, score function, group
/// limit, bias, normalisation, scaling, capacity, aux losses, numerics.
///
/// Build one with :func:`moe_router.preset`, :meth:`RouterConfig.from_hf_config`,
/// :meth:`RouterConfig.from_megatron` or :meth:`RouterConfig.from_dict` (the form
/// :meth:`to_dict` returns). Configs are immutable; the ``with_*`` methods return new ones.
#[pyclass(name = "RouterConfig", module = "moe_router", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyRouterConfig {
    pub(crate) cfg: RouterConfig,
}

/// JSON text of `obj`: a `str` holding JSON or a path to a JSON file, an `os.PathLike`, or a
/// `dict` (serialised with Python's `json`).
fn json_text(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = obj.py();
    if obj.is_instance_of::<PyDict>() {
        let json = py.import("json")?;
        return json.call_method1("dumps", (obj,))?.extract();
    }
    let text: Option<String> = if obj.is_instance_of::<PyString>() {
        let s: String = obj.extract()?;
        if s.trim_start().starts_with('{') { Some(s) } else { None }
    } else {
        None
    };
    if let Some(t) = text {
        return Ok(t);
    }
    let os = py.import("os")?;
    let path: String = os.call_method1("fspath", (obj,))?.extract()?;
    std::fs::read_to_string(&path).map_err(|e| Error::Config(format!("{path}: {e}")).into())
}

impl PyRouterConfig {
    pub(crate) fn new(cfg: RouterConfig) -> Self {
        PyRouterConfig { cfg }
    }
}

#[pymethods]
impl PyRouterConfig {
    /// The rule of a Hugging Face ``config.json``: a path, the JSON text or a ``dict``.
    /// Raises :class:`ConfigError` for an unsupported ``model_type`` (listing the supported
    /// ones), a missing or bad key.
    #[staticmethod]
    fn from_hf_config(path_or_dict: &Bound<'_, PyAny>) -> PyResult<Self> {
        let text = json_text(path_or_dict)?;
        guarded(|| Ok(Self::new(RouterConfig::from_hf_config(&text)?)))
    }

    /// The rule of Megatron-Core ``TransformerConfig`` options (``num_moe_experts``,
    /// ``moe_router_topk``, ``moe_router_score_function``, ...): a ``dict``, its JSON text or a
    /// path. An unknown ``moe_*`` key is refused, naming the nearest known key.
    #[staticmethod]
    fn from_megatron(options: &Bound<'_, PyAny>) -> PyResult<Self> {
        let text = json_text(options)?;
        guarded(|| Ok(Self::new(RouterConfig::from_megatron(&text)?)))
    }

    /// A config from the ``dict`` (or JSON text) that :meth:`to_dict` returns, validated again.
    #[staticmethod]
    fn from_dict(d: &Bound<'_, PyAny>) -> PyResult<Self> {
        let text = json_text(d)?;
        guarded(|| {
            let cfg: RouterConfig =
                serde_json::from_str(&text).map_err(|e| Error::Config(format!("not a RouterConfig dict: {e}")))?;
            Ok(Self::new(cfg.to_builder().build()?))
        })
    }

    /// The config as a ``dict`` (the canonical JSON form: ``num_experts``, ``top_k``,
    /// ``score``, ``softmax_position``, ``group_limit``, ``normalization``, ...).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = py.import("json")?;
        json.call_method1("loads", (self.to_json()?,))
    }

    /// The config as canonical JSON text.
    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.cfg).map_err(|e| Error::Config(e.to_string()).into())
    }

    /// E, the number of routed experts.
    #[getter]
    fn num_experts(&self) -> usize {
        self.cfg.num_experts()
    }

    /// K, experts per token.
    #[getter]
    fn top_k(&self) -> usize {
        self.cfg.top_k()
    }

    /// ``"portable"`` (bit-identical on every backend) or ``"native"``.
    #[getter]
    fn numerics(&self) -> &'static str {
        match self.cfg.numerics() {
            Numerics::Portable => "portable",
            Numerics::Native => "native",
        }
    }

    /// The score function: ``"softmax"``, ``"sigmoid"`` or ``"sqrt_softplus"``.
    #[getter]
    fn score(&self) -> String {
        serde_json::to_value(self.cfg.score())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The selection-only expert bias, if installed (a list of E floats).
    #[getter]
    fn expert_bias(&self) -> Option<Vec<f32>> {
        self.cfg.expert_bias().map(<[f32]>::to_vec)
    }

    /// Whether the rule needs a selection bias from the checkpoint (e.g. DeepSeek-V3's
    /// ``e_score_correction_bias``); routing raises until it is installed with
    /// :meth:`with_expert_bias` or passed as ``bias=`` to :meth:`Router.route`.
    #[getter]
    fn expects_expert_bias(&self) -> bool {
        self.cfg.expects_expert_bias()
    }

    /// A stable 64-bit fingerprint of the rule (bias values excluded), as trace headers store it.
    #[getter]
    fn fingerprint(&self) -> u64 {
        self.cfg.fingerprint()
    }

    /// A copy with numerics ``"portable"`` or ``"native"``.
    fn with_numerics(&self, numerics: &str) -> PyResult<Self> {
        let n = parse_numerics(numerics)?;
        guarded(|| Ok(Self::new(self.cfg.to_builder().numerics(n).build()?)))
    }

    /// A copy with the selection-only bias ``bias`` (E finite floats; sigmoid or sqrt-softplus
    /// rules only).
    fn with_expert_bias(&self, bias: Vec<f32>) -> PyResult<Self> {
        guarded(|| {
            let mut c = self.cfg.clone();
            c.set_expert_bias(bias)?;
            Ok(Self::new(c))
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "RouterConfig(num_experts={}, top_k={}, score={:?}, numerics={:?})",
            self.cfg.num_experts(),
            self.cfg.top_k(),
            self.score(),
            self.numerics()
        )
    }

    fn __hash__(&self) -> u64 {
        self.cfg.fingerprint()
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let from = slf.get_type().getattr("from_dict")?;
        Ok((from, (slf.get().to_json()?,)))
    }
}

/// `"portable"` or `"native"`.
pub(crate) fn parse_numerics(s: &str) -> PyResult<Numerics> {
    match s {
        "portable" => Ok(Numerics::Portable),
        "native" => Ok(Numerics::Native),
        other => Err(Error::Config(format!(
            "unknown numerics {other:?}; use \"portable\" (bit-identical on every backend) or \"native\""
        ))
        .into()),
    }
}

/// The rule of a published model by name (``"deepseek-v3"``, ``"qwen3-moe"``, ``"mixtral"``,
/// ...). Raises :class:`ConfigError` listing the presets for an unknown name.
#[pyfunction]
fn preset(name: &str) -> PyResult<PyRouterConfig> {
    guarded(|| Ok(PyRouterConfig::new(moe_router::preset(name)?)))
}

/// The names :func:`preset` accepts.
#[pyfunction]
fn preset_names() -> Vec<&'static str> {
    moe_router::preset_names().to_vec()
}

/// The MoE layer ids of a Hugging Face ``config.json`` (path, JSON text or dict): dense layers
/// (DeepSeek's ``first_k_dense_replace``, Qwen's ``mlp_only_layers``) are left out; with
/// ``mtp=True`` the multi-token-prediction layers are appended.
#[pyfunction]
#[pyo3(signature = (path_or_dict, mtp = false))]
fn hf_moe_layers(path_or_dict: &Bound<'_, PyAny>, mtp: bool) -> PyResult<Vec<u32>> {
    let text = json_text(path_or_dict)?;
    guarded(|| {
        let m = moe_router::import::hf::hf_moe_layers(&text)?;
        Ok(if mtp { m.with_mtp() } else { m.layers })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRouterConfig>()?;
    m.add_function(wrap_pyfunction!(preset, m)?)?;
    m.add_function(wrap_pyfunction!(preset_names, m)?)?;
    m.add_function(wrap_pyfunction!(hf_moe_layers, m)?)?;
    Ok(())
}
