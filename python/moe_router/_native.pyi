"""Type stubs of the extension module ``moe_router._native`` (Rust, PyO3).

The public names are re-exported by :mod:`moe_router`; :class:`Router`, :class:`CudaLaunch` and
the functions taking raw arguments are the native halves of the Python API and are not meant to
be called directly.
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, os.PathLike]

MAX_EXPERTS: int

class ConfigError(ValueError):
    """An invalid or unsupported routing rule (config field, Hugging Face or Megatron import,
    preset name)."""

class RouteError(ValueError):
    """A routing error: logits or replay ids of the wrong shape or with invalid values, a backend
    that is unavailable (with the reason), a device error."""

class TraceError(RuntimeError):
    """A trace error: an .mrt file or an engine capture that cannot be read, written or
    converted."""

def compiled_backends() -> List[str]:
    """The backends compiled into this build (``"cpu"`` always; ``"cuda"``, ``"wgpu"`` by
    cargo feature)."""

def release_output_cache(enabled: Optional[bool] = None) -> int:
    """Hands the CUDA route outputs kept for reuse (decode-sized blocks of finished ``route``
    calls, kept per device and stream) back to torch's allocator and returns their size in
    bytes; call it before ``torch.cuda.empty_cache()``. ``enabled`` turns the cache on or off
    (on by default)."""

def torch_path(set: Optional[str] = None) -> str:
    """The path ``Router.route`` takes for torch tensors (``"exchange"``: the DLPack C exchange
    API, ``"attributes"``, ``"python"``); ``set`` (``"auto"``, ``"attributes"``, ``"python"``)
    forces one, for tests and benchmarks."""

def _torch_step_ns(tensor: Any, step: str, iters: int) -> float:
    """Benchmark helper: nanoseconds per call of one step of the torch fast path on ``tensor``
    (``"read"``, ``"empty"``: a fresh ``[rows, 8]`` float32 output on its device, ``"stream"``,
    ``"outputs"``: a route's two output tensors through the output cache)."""

def preset(name: str) -> RouterConfig:
    """The rule of a published model by name (``"deepseek-v3"``, ``"qwen3-moe"``, ...)."""

def preset_names() -> List[str]:
    """The names :func:`preset` accepts."""

def hf_moe_layers(path_or_dict: Union[_Path, Dict[str, Any]], mtp: bool = False) -> List[int]:
    """The MoE layer ids of a Hugging Face ``config.json``."""

class RouterConfig:
    """A complete, validated routing rule (immutable, hashable, picklable)."""

    @staticmethod
    def from_hf_config(path_or_dict: Union[_Path, Dict[str, Any]]) -> RouterConfig:
        """The rule of a Hugging Face ``config.json`` (path, JSON text or dict)."""
    @staticmethod
    def from_megatron(options: Union[_Path, Dict[str, Any]]) -> RouterConfig:
        """The rule of Megatron-Core ``TransformerConfig`` options (dict, JSON text or path)."""
    @staticmethod
    def from_dict(d: Union[Dict[str, Any], str]) -> RouterConfig:
        """A config from the dict :meth:`to_dict` returns (validated again)."""
    def to_dict(self) -> Dict[str, Any]:
        """The canonical dict form."""
    def to_json(self) -> str:
        """The canonical JSON text."""
    @property
    def num_experts(self) -> int:
        """E."""
    @property
    def top_k(self) -> int:
        """K."""
    @property
    def numerics(self) -> str:
        """``"portable"`` or ``"native"``."""
    @property
    def score(self) -> str:
        """``"softmax"``, ``"sigmoid"`` or ``"sqrt_softplus"``."""
    @property
    def expert_bias(self) -> Optional[List[float]]:
        """The installed selection bias, if any."""
    @property
    def expects_expert_bias(self) -> bool:
        """Whether routing needs a selection bias from the checkpoint."""
    @property
    def fingerprint(self) -> int:
        """A stable 64-bit fingerprint of the rule (bias values excluded)."""
    def with_numerics(self, numerics: str) -> RouterConfig:
        """A copy with ``"portable"`` or ``"native"`` numerics."""
    def with_expert_bias(self, bias: Sequence[float]) -> RouterConfig:
        """A copy with the selection-only bias installed."""
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

class Router:
    """The native router (use :class:`moe_router.Router`)."""

    def __init__(self, config: RouterConfig, backend: str = "auto", numerics: Optional[str] = None) -> None: ...
    @property
    def backend(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def config(self) -> RouterConfig: ...
    def route(
        self, logits: np.ndarray, bias: Optional[npt.NDArray[np.float32]] = None, bf16: bool = False
    ) -> Tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]: ...
    def weights_for(self, logits: np.ndarray, ids: np.ndarray, bf16: bool = False) -> npt.NDArray[np.float32]: ...
    def stats_json(self, logits: np.ndarray, ids: np.ndarray, bf16: bool = False) -> str: ...
    def backward(
        self,
        logits: np.ndarray,
        ids: np.ndarray,
        grad_weights: np.ndarray,
        grad_aux_loss: float = 0.0,
        grad_z_loss: float = 0.0,
        bf16: bool = False,
        seq_lens: Optional[List[int]] = None,
    ) -> np.ndarray: ...
    def route_tensor(
        self, logits: Any, bias: Optional[npt.NDArray[np.float32]] = None, check: bool = False
    ) -> Optional[Tuple[Any, Any]]:
        """Routes a ``torch.Tensor`` (CPU, or CUDA on a device registered with
        :meth:`set_cuda_device`) from Rust: ``(ids, weights)`` tensors, or ``None`` when the
        Python path must take it."""
    def set_cuda_device(self, index: int, launch: CudaLaunch, status: Any, status_ptr: int) -> None:
        """Registers the plain launcher and status word of CUDA device ``index`` (CUDA builds)."""
    def bench_route_ns(self, logits: np.ndarray, iters: int, repeats: int = 5, bf16: bool = False) -> float: ...

class CudaLaunch:
    """Kernel launches on caller-owned CUDA memory and streams (used by ``moe_router._cuda``)."""

    def __init__(self, config: RouterConfig, ordinal: int, bias: Optional[List[float]] = None) -> None: ...
    @property
    def ordinal(self) -> int: ...
    def warm_up(self, dtype: str) -> None: ...
    def enqueue(
        self,
        op: str,
        logits: int,
        dtype: str,
        rows: int,
        cols: int,
        ld: int,
        ids: int,
        weights: int,
        status: int,
        stream: int,
    ) -> None: ...
    def enqueue_backward(
        self,
        logits: int,
        dtype: str,
        rows: int,
        cols: int,
        ld: int,
        ids: int,
        grad: int,
        dz: int,
        status: int,
        grad_z_loss: float,
        stream: int,
    ) -> None: ...
    def bench_ns(
        self,
        op: str,
        logits: int,
        dtype: str,
        rows: int,
        cols: int,
        ld: int,
        ids: int,
        weights: int,
        status: int,
        stream: int,
        iters: int,
        sync_each: bool = False,
    ) -> Tuple[float, float]:
        """``(host_ns, wall_ns)`` per launch of ``iters`` launches from Rust (benchmarks)."""
    def read_status(self, status: int, stream: int, ids: Optional[int] = None) -> None: ...

class Trace:
    """A routing trace in memory: (sequence, model layer, position) -> K expert ids."""

    @staticmethod
    def open(
        path: _Path,
        format: Optional[str] = None,
        num_experts: Optional[int] = None,
        num_layers: Optional[int] = None,
        top_k: Optional[int] = None,
        layers: Optional[List[int]] = None,
        seq: Optional[int] = None,
    ) -> Trace:
        """Opens a trace of any format (``.mrt``, ``npy``, ``safetensors``, ``sglang``,
        ``nrlre1``, ``r3v1``, ``prime-rl``)."""
    @staticmethod
    def from_bytes(
        data: bytes,
        format: str,
        num_experts: Optional[int] = None,
        num_layers: Optional[int] = None,
        top_k: Optional[int] = None,
        layers: Optional[List[int]] = None,
        seq: Optional[int] = None,
    ) -> Trace:
        """Imports the bytes of an engine capture."""
    @staticmethod
    def from_numpy(
        ids: npt.NDArray[np.int64], num_experts: int, layers: Optional[List[int]] = None, seq: int = 0, start: int = 0
    ) -> Trace:
        """A trace from a ``[T, L, K]`` array of one sequence (``-1`` rows missing)."""
    @property
    def layers(self) -> List[int]:
        """Model layer ids of the MoE layers."""
    @property
    def num_experts(self) -> int:
        """E."""
    @property
    def top_k(self) -> int:
        """K."""
    @property
    def fingerprint(self) -> int:
        """The routing-config fingerprint of the header."""
    @property
    def sequences(self) -> List[int]:
        """Sequence ids, ascending."""
    def summary_json(self) -> str:
        """Counts as JSON text."""
    def ids(self, layer: int, seq: Optional[int] = None) -> npt.NDArray[np.int32]:
        """Ids ``[T, K]`` of one layer of one sequence (``-1`` missing)."""
    def to_numpy(self, seq: Optional[int] = None) -> npt.NDArray[np.int32]:
        """Ids ``[T, L, K]`` of one sequence (``-1`` missing)."""
    def read_rows(self, seq: int, layer: int, start: int, len: int) -> npt.NDArray[np.int32]:
        """Rows ``start..start+len`` of ``seq`` at ``layer`` (``-1`` missing)."""
    def save(self, path: _Path, format: Optional[str] = None, seq: Optional[int] = None, dtype: Optional[str] = None) -> None:
        """Writes the trace (``.mrt`` or an export format)."""
    def export(self, format: str, seq: Optional[int] = None, dtype: Optional[str] = None) -> bytes:
        """One sequence in an export format, as bytes."""

class TraceWriter:
    """The native streaming ``.mrt`` writer (use :class:`moe_router.TraceWriter`)."""

    def __init__(
        self, path: _Path, config: RouterConfig, layers: Union[int, List[int]], producer: Optional[str] = None, compression: bool = True
    ) -> None: ...
    @property
    def layers(self) -> List[int]: ...
    @property
    def path(self) -> str: ...
    def record(
        self,
        layer: int,
        ids: np.ndarray,
        seq_ids: Optional[npt.NDArray[np.int64]] = None,
        positions: Optional[npt.NDArray[np.int64]] = None,
    ) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> Optional[str]: ...

def convert(
    src: _Path,
    dst: _Path,
    from_: Optional[str] = None,
    to: Optional[str] = None,
    num_experts: Optional[int] = None,
    num_layers: Optional[int] = None,
    top_k: Optional[int] = None,
    layers: Optional[List[int]] = None,
    seq: Optional[int] = None,
) -> str: ...
def diff(
    a: _Path,
    b: _Path,
    num_experts: Optional[int] = None,
    num_layers: Optional[int] = None,
    top_k: Optional[int] = None,
    layers: Optional[List[int]] = None,
    seq: Optional[int] = None,
) -> str: ...
def diff_traces_json(a: Trace, b: Trace) -> str: ...
def validate(
    path: _Path,
    from_: Optional[str] = None,
    num_experts: Optional[int] = None,
    num_layers: Optional[int] = None,
    top_k: Optional[int] = None,
    layers: Optional[List[int]] = None,
    seq: Optional[int] = None,
) -> str: ...
