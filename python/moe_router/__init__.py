"""moe_router: Mixture-of-Experts top-k routing with router replay.

A Rust core (the ``moe-router`` crate) behind a small Python API:

* :func:`preset`, :class:`RouterConfig` (``from_hf_config``, ``from_megatron``): routing rules;
* :class:`Router`: ``route``, ``weights_for`` (replay), ``stats``, ``backward`` on the CPU, CUDA or
  wgpu backend. NumPy in, NumPy out; torch in, torch out on the same device (CUDA tensors stay on
  the GPU: the kernels run on torch's current stream on torch's memory);
* :class:`TraceWriter`, :class:`Trace`, :func:`convert`, :func:`validate`, :func:`diff` and the
  importers of the engines' formats (vLLM ``.npy``, SGLang, NeMo ``nrlre1``, Fireworks ``r3v1``,
  prime-rl, safetensors);
* :mod:`moe_router.torch`: the autograd Function; :mod:`moe_router.megatron`: a drop-in
  ``RouterReplay`` for Megatron-Core.

Errors are :class:`ConfigError`, :class:`RouteError` (both ``ValueError``) and
:class:`TraceError` (a ``RuntimeError``), carrying the Rust message.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from ._native import (
    ConfigError,
    MAX_EXPERTS,
    RouteError,
    RouterConfig,
    TraceError,
    compiled_backends,
    hf_moe_layers,
    release_output_cache,
    preset,
    preset_names,
)

__all__ = [
    "ConfigError",
    "RouteError",
    "TraceError",
    "RouterConfig",
    "Router",
    "preset",
    "preset_names",
    "hf_moe_layers",
    "compiled_backends",
    "release_output_cache",
    "MAX_EXPERTS",
    "TraceWriter",
    "Trace",
    "convert",
    "validate",
    "diff",
    "import_vllm_npy",
    "import_safetensors",
    "import_sglang",
    "import_nrlre1",
    "import_r3v1",
    "import_prime_rl",
    "parse_layers",
]

__version__ = "0.1.0"

_NUMERICS = ("portable", "native")
_BACKENDS = ("cpu", "cuda", "wgpu", "auto")


def _torch():
    """The torch module if it is already imported (never imports it)."""
    return sys.modules.get("torch")


def _is_torch(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def _host_array(x: Any, what: str) -> np.ndarray:
    """A NumPy view of ``x`` (NumPy, the buffer protocol, a CPU ``__dlpack__`` producer)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError) as e:
            raise RouteError(f"{what}: cannot take {type(x).__name__} through DLPack on the host: {e}") from e
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - any conversion failure is the caller's input
        raise RouteError(f"{what}: expected an array, got {type(x).__name__}") from e


def _np_logits(a: np.ndarray) -> Tuple[np.ndarray, bool]:
    """Logits for the native call: bfloat16 (ml_dtypes) as its uint16 bits."""
    # dtype.kind is a C attribute (dtype.name is computed in Python, microseconds): bfloat16 from
    # ml_dtypes is the only void-kind dtype taken.
    if a.dtype.kind == "V" and a.dtype.name == "bfloat16":
        return a.view(np.uint16), True
    return a, False


def _np_ids(x: Any) -> np.ndarray:
    if _is_torch(x):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        return x.numpy()
    return _host_array(x, "ids")


def _np_bias(bias: Any) -> Optional[np.ndarray]:
    if bias is None:
        return None
    if _is_torch(bias):
        bias = bias.detach().float().cpu().numpy()
    return np.ascontiguousarray(bias, dtype=np.float32)


def _torch_to_np_logits(x: Any) -> Tuple[np.ndarray, bool]:
    """A CPU torch tensor as NumPy (zero-copy; bf16 as int16 bits)."""
    torch = _torch()
    x = x.detach()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy(), True
    return x.numpy(), False


class Router:
    """A top-k router for ``config`` on a backend.

    ``backend`` is ``"cpu"``, ``"cuda"``, ``"wgpu"`` or ``"auto"`` (CUDA, then wgpu, then the
    CPU); a backend that is not compiled in or has no device raises :class:`RouteError` with the
    reason. ``numerics`` is ``"portable"`` (bit-identical ids and weights on every backend, the
    default) or ``"native"``.

    Every method takes logits ``[T, E]`` as NumPy (float32, float16, float64, ml_dtypes
    bfloat16), any object with ``__dlpack__`` or the buffer protocol, or a torch tensor (float32,
    bfloat16, float16, float64). NumPy in gives NumPy out (ids int32, weights float32); a torch
    tensor in gives torch tensors on the same device. On the CUDA backend, CUDA tensors are
    routed in place on torch's current stream, without a copy or a synchronisation: errors in the
    data (NaN or +inf logits, invalid replay ids) are latched on the device and raised by
    :meth:`check` (or at once with ``check=True``). The GIL is released while routing; a router
    may be used from several threads at once.

    The ids and weights of a CUDA ``route`` share one allocation from torch's caching allocator
    (made on the current stream, handed over through DLPack). When both tensors are gone, a
    decode-sized block (up to 1 MiB) is kept for the next ``route`` of the same size on the same
    device and stream, as torch's allocator would reuse it, which saves the allocation in a
    decode loop (at most 16 blocks; never while the stream is captured into a CUDA graph);
    :func:`release_output_cache` hands them back to torch (call it before
    ``torch.cuda.empty_cache()``) and can turn the cache off.
    ``Tensor.record_stream`` does not track storage imported through DLPack: to use the outputs
    on another stream, make that stream wait for the current one (``s.wait_stream(...)``) and
    keep the tensors alive until it has passed them, or ``clone()`` them there;
    ``moe_router._native.torch_path("attributes")`` switches to outputs made by
    ``Tensor.new_empty`` (a few microseconds more per call), which ``record_stream`` tracks.
    """

    def __init__(self, config: RouterConfig, backend: str = "auto", numerics: str = "portable") -> None:
        if not isinstance(config, RouterConfig):
            raise TypeError(f"config must be a moe_router.RouterConfig, got {type(config).__name__}")
        if backend not in _BACKENDS:
            raise RouteError(f"unknown backend {backend!r}; backends: cpu, cuda, wgpu (or auto)")
        if numerics not in _NUMERICS:
            raise ConfigError(f"unknown numerics {numerics!r}; use 'portable' or 'native'")
        self._r = _native.Router(config, backend, numerics)
        self._config = self._r.config
        self._k = self._config.top_k
        self._cuda = None  # moe_router._cuda.CudaState, created on the first CUDA tensor

    # -- properties -------------------------------------------------------------------------

    @property
    def config(self) -> RouterConfig:
        """The routing rule (with the numerics chosen here)."""
        return self._config

    @property
    def backend(self) -> str:
        """The backend in use: ``"cpu"``, ``"cuda"`` or ``"wgpu"``."""
        return self._r.backend

    @property
    def device(self) -> str:
        """The backend and its device, e.g. ``"cpu: AMD EPYC 7B13 (2 threads)"``."""
        return self._r.device

    @property
    def num_experts(self) -> int:
        """E."""
        return self._config.num_experts

    @property
    def top_k(self) -> int:
        """K."""
        return self._config.top_k

    def __repr__(self) -> str:
        return f"moe_router.Router(backend={self.backend!r}, num_experts={self.num_experts}, top_k={self.top_k})"

    # -- routing ----------------------------------------------------------------------------

    def route(self, logits: Any, bias: Any = None, *, check: bool = False):
        """Selects and weighs K experts per row: returns ``(ids, weights)``, each ``[T, K]``.

        ``bias`` is a selection-only bias of E floats (e.g. DeepSeek-V3's
        ``e_score_correction_bias``; sigmoid and sqrt-softplus rules): it changes which experts
        are selected, never the weights. ``check=True`` waits for a CUDA launch and raises its
        errors at once (host inputs always raise at once).
        """
        if type(logits) is np.ndarray:
            if logits.dtype.kind == "f":  # the fast path: float32 / float16 / float64
                return self._r.route(logits, None if bias is None else _np_bias(bias), False)
            a, bf = _np_logits(logits)
            return self._r.route(a, None if bias is None else _np_bias(bias), bf)
        # torch tensors: read and made in Rust (None when that path does not take the tensor).
        if bias is None:
            out = self._r.route_tensor(logits, None, check)
            if out is not None:
                return out
        elif _is_torch(logits) and not logits.is_cuda:
            out = self._r.route_tensor(logits, _np_bias(bias), check)
            if out is not None:
                return out
        if _is_torch(logits):
            return self._route_torch(logits, bias, check)
        a, bf = _np_logits(_host_array(logits, "logits"))
        return self._r.route(a, _np_bias(bias), bf)

    def _route_torch(self, logits: Any, bias: Any, check: bool):
        torch = _torch()
        dev = logits.device
        if dev.type == "cuda":
            if self.backend == "cuda":
                from . import _cuda

                return _cuda.route(self, logits, bias, check)
            ids, w = self._route_torch(logits.detach().cpu(), bias, check)
            return ids.to(dev), w.to(dev)
        if dev.type != "cpu":
            raise RouteError(f"logits on device {dev} are not supported (use cpu or cuda tensors)")
        a, bf = _torch_to_np_logits(logits)
        ids, w = self._r.route(a, _np_bias(bias), bf)
        return torch.from_numpy(ids), torch.from_numpy(w)

    def weights_for(self, logits: Any, ids: Any, *, check: bool = False):
        """Replay: the weights ``[T, K]`` of the given ids (slot order kept) on the live logits.
        Ids must be ``[T, K]``, each ``< E``, no duplicate in a row; otherwise
        :class:`RouteError` names the row and slot."""
        if type(logits) is np.ndarray:
            a, bf = _np_logits(logits)
            return self._r.weights_for(a, _np_ids(ids), bf)
        if _is_torch(logits):
            torch = _torch()
            dev = logits.device
            if dev.type == "cuda":
                if self.backend == "cuda":
                    from . import _cuda

                    return _cuda.weights_for(self, logits, ids, check)
                return self.weights_for(logits.detach().cpu(), _np_ids(ids)).to(dev)
            a, bf = _torch_to_np_logits(logits)
            return torch.from_numpy(self._r.weights_for(a, _np_ids(ids), bf))
        a, bf = _np_logits(_host_array(logits, "logits"))
        return self._r.weights_for(a, _np_ids(ids), bf)

    def stats(self, logits: Any, ids: Any) -> Dict[str, Any]:
        """Routing statistics of ``ids`` on ``logits``, as ``moe-router route`` writes them to
        ``stats.json``: ``tokens_per_expert`` (after capacity dropping when the rule has
        capacity; then also ``tokens_per_expert_before_drop``, ``capacity``, ``dropped``),
        ``aux_loss`` (the sum of the rule's load-balancing losses; ``None`` without a
        coefficient) and ``z_loss`` (``None`` without a coefficient). Computed on the host."""
        a, bf = self._host_logits(logits)
        d = json.loads(self._r.stats_json(a, _np_ids(ids), bf))
        d.setdefault("aux_loss", None)
        d.setdefault("z_loss", None)
        return d

    def backward(
        self,
        logits: Any,
        ids: Any,
        grad_weights: Any,
        grad_aux_loss: float = 0.0,
        grad_z_loss: float = 0.0,
        *,
        seq_lens: Optional[Sequence[int]] = None,
    ):
        """The gradient on the logits ``[T, E]`` of ``Σ grad_weights∘w + grad_aux_loss·aux_loss
        + grad_z_loss·z_loss``, ``w`` being the weights of ``ids`` on ``logits`` (DESIGN §2b):
        selection passes no gradient, the weights do. NumPy in gives float32 NumPy out; torch in
        gives a float32 tensor on the logits' device. On the CUDA backend, CUDA tensors are
        differentiated on the GPU on torch's stream without a copy (errors latched as for
        :meth:`route`); with an aux-loss term (``grad_aux_loss != 0``) or ``seq_lens`` the
        gradient is computed through the host (the aux term needs token counts there), the same
        bits in portable mode."""
        torch_dev = logits.device if _is_torch(logits) else None
        if (
            torch_dev is not None
            and torch_dev.type == "cuda"
            and self.backend == "cuda"
            and float(grad_aux_loss) == 0.0
            and seq_lens is None
        ):
            # On the GPU, on torch's stream, no copy (the aux term needs host counts: below).
            from . import _cuda

            return _cuda.backward(self, logits, ids, grad_weights, float(grad_z_loss))
        a, bf = self._host_logits(logits)
        g = grad_weights
        if _is_torch(g):
            g = g.detach().float().cpu().numpy()
        g = np.asarray(g)
        if g.dtype not in (np.float32, np.float64):
            g = g.astype(np.float32)
        dz = self._r.backward(
            a,
            _np_ids(ids),
            g,
            float(grad_aux_loss),
            float(grad_z_loss),
            bf,
            None if seq_lens is None else [int(x) for x in seq_lens],
        )
        if torch_dev is not None:
            torch = _torch()
            return torch.from_numpy(dz).to(torch_dev)
        return dz

    def check(self) -> None:
        """Waits for this router's CUDA launches and raises the first error they latched (NaN
        or +inf logits, an all-masked row, invalid replay ids) since the last check. A no-op for
        host inputs, whose errors are raised at once."""
        if self._cuda is not None:
            self._cuda.check()

    def _host_logits(self, logits: Any) -> Tuple[np.ndarray, bool]:
        if type(logits) is np.ndarray:
            return _np_logits(logits)
        if _is_torch(logits):
            x = logits.detach()
            if x.device.type != "cpu":
                x = x.cpu()
            return _torch_to_np_logits(x)
        return _np_logits(_host_array(logits, "logits"))


# -- traces -----------------------------------------------------------------------------------

from ._native import Trace  # noqa: E402


def parse_layers(layers: Union[None, int, str, Iterable[int]]) -> Optional[List[int]]:
    """Layer ids from ``None``, an int L (``0..L``), a list, or a string like ``"0-47"`` or
    ``"1,3,5-7"`` (as the CLI's ``--layers``)."""
    if layers is None:
        return None
    if isinstance(layers, (int, np.integer)):
        return list(range(int(layers)))
    if isinstance(layers, str):
        out: List[int] = []
        for part in (p.strip() for p in layers.split(",")):
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        return out
    return [int(x) for x in layers]


class TraceWriter:
    """Records routes into an ``.mrt`` trace file as they are produced.

    ``layers`` are the model's MoE layer ids (an int L means ``0..L``): dense, MTP or
    hash-routed layers never shift the others. Use as a context manager, or call :meth:`close`
    (which writes the index; a file that was never closed is still readable up to the last
    complete chunk)::

        with moe_router.TraceWriter("rollout.mrt", cfg, layers=48) as w:
            w.record(layer, ids)                      # [T, K], sequence 0, next positions
            w.record(layer, ids, seq_ids=s, positions=p)
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        config: RouterConfig,
        layers: Union[int, Sequence[int], str],
        *,
        producer: Optional[str] = None,
        compression: bool = True,
    ) -> None:
        if isinstance(config, str):
            config = preset(config)
        ids = parse_layers(layers)
        assert ids is not None
        self._w = _native.TraceWriter(os.fspath(path), config, ids, producer, compression)

    @property
    def layers(self) -> list:
        """Model layer ids of the header."""
        return self._w.layers

    @property
    def path(self) -> str:
        """The file path."""
        return str(self._w.path)

    def record(self, layer: int, ids: Any, seq_ids: Any = None, positions: Any = None) -> None:
        """Records ids ``[T, K]`` (int; ``-1`` rows are missing) of model layer ``layer``. Row
        ``t`` is sequence ``seq_ids[t]`` (an int for all rows; default 0) at position
        ``positions[t]`` (default: after the rows recorded so far for that sequence and layer).
        Invalid ids (``>= E``, duplicates in a row) raise :class:`TraceError` and write
        nothing."""
        a = _np_ids(ids)
        if a.ndim != 2:
            raise TraceError(f"ids must be [T, K], got shape {a.shape}")
        t = a.shape[0]
        s = None if seq_ids is None else _index_vector(seq_ids, t, "seq_ids")
        p = None if positions is None else _index_vector(positions, t, "positions")
        self._w.record(int(layer), a, s, p)

    def flush(self) -> None:
        """Writes buffered rows to the file."""
        self._w.flush()

    def close(self) -> None:
        """Finishes the file (index and footer). Closing twice is a no-op."""
        self._w.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _index_vector(x: Any, t: int, what: str) -> np.ndarray:
    if isinstance(x, (int, np.integer)):
        return np.full(t, int(x), dtype=np.int64)
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(x, dtype=np.int64).reshape(-1)
    if a.shape[0] != t:
        raise TraceError(f"{what} has {a.shape[0]} entries, ids have {t} rows")
    return a


def _fmt_opts(fmt: Dict[str, Any]) -> Dict[str, Any]:
    """Keyword options of convert/validate/diff/importers, named as the CLI's flags."""
    known = {"from", "from_", "to", "format", "num_experts", "num_layers", "top_k", "layers", "seq"}
    bad = set(fmt) - known
    if bad:
        raise TypeError(f"unknown option(s) {sorted(bad)}; options: {sorted(known - {'from_'})}")
    out = dict(fmt)
    if "from" in out:
        out["from_"] = out.pop("from")
    if "format" in out:
        out["from_"] = out.pop("format")
    if "layers" in out:
        out["layers"] = parse_layers(out["layers"])
    return out


def convert(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], **fmt: Any) -> str:
    """Converts a trace between formats, as ``moe-router convert``: formats from the extensions
    (``.mrt``, ``.npy``, ``.safetensors``, ``.msgpack``) or ``from=``/``to=`` (``mrt``, ``npy``,
    ``safetensors``, ``sglang``, ``nrlre1``, ``r3v1``, ``prime-rl``); ``num_experts``,
    ``num_layers``, ``top_k``, ``layers`` (list or ``"0-47"``) and ``seq`` as the CLI's flags.
    Returns the one-line summary the CLI prints."""
    o = _fmt_opts(fmt)
    return _native.convert(os.fspath(src), os.fspath(dst), **o)


def validate(path: Union[str, os.PathLike], **opts: Any) -> Dict[str, Any]:
    """Validates a trace of any format, as ``moe-router validate --json``: returns the same
    dict (``valid``, ``errors``, ``warnings``, ``checksum_failures``, ``out_of_range``,
    ``duplicates``, ``partial_missing``, ``all_zero_layers``, ``empty_layers``, ``coverage``,
    ...). Options as :func:`convert`'s (``from``, ``num_experts``, ``num_layers``, ``top_k``,
    ``layers``, ``seq``)."""
    o = _fmt_opts(opts)
    o.pop("to", None)
    return json.loads(_native.validate(os.fspath(path), **o))


def diff(a: Union[str, os.PathLike, Trace], b: Union[str, os.PathLike, Trace], **opts: Any) -> Dict[str, Any]:
    """Compares two routings, as ``moe-router diff --json``: returns the same dict
    (``router_mismatch_fraction``, ``token_any_layer_mismatch_fraction``,
    ``mean_mismatched_layers_per_token``, ``per_layer``, ``mean_overlap``,
    ``routers_compared``, ``tokens_compared``, ``rows_only_in_a``, ``rows_only_in_b``,
    ``layers_only_in_a``, ``layers_only_in_b``). ``a`` and ``b`` are paths (any format) or
    :class:`Trace` objects."""
    if isinstance(a, Trace) or isinstance(b, Trace):
        ta = a if isinstance(a, Trace) else Trace.open(os.fspath(a), **_open_opts(opts))
        tb = b if isinstance(b, Trace) else Trace.open(os.fspath(b), **_open_opts(opts))
        return json.loads(_native.diff_traces_json(ta, tb))
    o = _fmt_opts(opts)
    o.pop("from_", None)
    o.pop("to", None)
    return json.loads(_native.diff(os.fspath(a), os.fspath(b), **o))


def _open_opts(opts: Dict[str, Any]) -> Dict[str, Any]:
    o = _fmt_opts(opts)
    o.pop("to", None)
    if "from_" in o:
        o["format"] = o.pop("from_")
    return o


# -- importers ------------------------------------------------------------------------------


def _payload(data: Union[bytes, bytearray, memoryview, str, os.PathLike]) -> bytes:
    """Bytes of a capture: bytes as given, a path's content, or text (base64 formats)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, os.PathLike):
        with open(data, "rb") as f:
            return f.read()
    if isinstance(data, str):
        if len(data) < 4096 and os.path.isfile(data):
            with open(data, "rb") as f:
                return f.read()
        return data.encode("ascii")
    raise TypeError(f"expected bytes, text or a path, got {type(data).__name__}")


def _import(fmt: str, data: Any, **opts: Any) -> Trace:
    o = _fmt_opts(opts)
    o.pop("from_", None)
    o.pop("to", None)
    return Trace.from_bytes(_payload(data), fmt, **o)


def import_vllm_npy(data: Any, *, num_experts: Optional[int] = None, layers: Any = None, seq: int = 0) -> Trace:
    """A vLLM routed-experts capture: an ``.npy`` ``[T, L, K]`` of any integer dtype (path or
    bytes). ``-1`` rows are missing; ids ``>= E``, duplicates and zero-padding rows are refused
    with their element index. ``layers``: the model layer ids of the L axis (default 0..L)."""
    return _import("npy", data, num_experts=num_experts, layers=layers, seq=seq)


def import_safetensors(data: Any, *, num_experts: Optional[int] = None, layers: Any = None, seq: int = 0) -> Trace:
    """A safetensors file with tensor ``routed_experts`` ``[T, L, K]`` (path or bytes)."""
    return _import("safetensors", data, num_experts=num_experts, layers=layers, seq=seq)


def import_sglang(
    data: Any, *, num_layers: int, top_k: int, num_experts: Optional[int] = None, layers: Any = None, seq: int = 0
) -> Trace:
    """An SGLang capture: base64 of little-endian int32, flat ``[T, L, K]`` (text, bytes or a
    path); L and K are not recorded, so they are required."""
    return _import(
        "sglang", data, num_layers=num_layers, top_k=top_k, num_experts=num_experts, layers=layers, seq=seq
    )


def import_nrlre1(data: Any, *, num_experts: Optional[int] = None, layers: Any = None, seq: int = 0) -> Trace:
    """A NeMo Gym envelope ``nrlre1:<dtype>:<T>x<L>x<K>:<base64>`` (text, bytes or a path)."""
    return _import("nrlre1", data, num_experts=num_experts, layers=layers, seq=seq)


def import_r3v1(
    data: Any,
    *,
    num_layers: Optional[int] = None,
    top_k: Optional[int] = None,
    num_experts: Optional[int] = None,
    layers: Any = None,
    seq: int = 0,
) -> Trace:
    """A Fireworks R3/v1 capture: base64 of a zstd frame (text, bytes or a path); needs L or K."""
    return _import(
        "r3v1", data, num_layers=num_layers, top_k=top_k, num_experts=num_experts, layers=layers, seq=seq
    )


def import_prime_rl(data: Any, *, num_experts: Optional[int] = None, layers: Any = None, seq: int = 0) -> Trace:
    """A prime-rl msgpack ``{data, shape: [T, L, K], dtype, start}`` (bytes or a path)."""
    return _import("prime-rl", data, num_experts=num_experts, layers=layers, seq=seq)
