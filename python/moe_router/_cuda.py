"""CUDA tensors in and out without a copy.

The router's kernels run on torch's memory and on torch's current stream of the tensor's
device: the outputs are allocated by torch (its caching allocator, on that stream), the
addresses and the stream handle go to the native launcher, and the launch is ordered after the
work torch queued before it and before the work queued after it. Nothing is copied and nothing
waits for the GPU. Errors in the data are latched in a per-device status word (int64) and raised
by :meth:`moe_router.Router.check` (or at once with ``check=True``).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from . import _native
from ._native import RouteError

_DTYPES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}

_raw_stream: Optional[Callable[[int], int]]
try:  # the raw handle without building a torch.cuda.Stream object (fast path)
    _raw_stream = torch._C._cuda_getCurrentRawStream  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - older torch
    _raw_stream = None


def _stream(index: int) -> int:
    if _raw_stream is not None:
        return int(_raw_stream(index))
    return int(torch.cuda.current_stream(index).cuda_stream)


class _Device:
    """A launcher of one (router, device, selection bias) and the device's status word."""

    __slots__ = ("launch", "status", "index")

    def __init__(self, config: Any, index: int, bias: Optional[list], status: "torch.Tensor") -> None:
        self.launch = _native.CudaLaunch(config, index, bias)
        self.index = index
        self.status = status


class CudaState:
    """Per-router CUDA state: per device one status word (int64, where every launch latches its
    first error), the launcher without a bias and the launcher of the latest per-call bias (a
    bias that changes every step, e.g. after expert-bias updates, replaces it)."""

    def __init__(self, config: Any, native: Any = None) -> None:
        self.config = config
        self.native = native  # the router's _native.Router: plain launchers are registered there
        self.status: Dict[int, "torch.Tensor"] = {}
        self.plain: Dict[int, _Device] = {}
        self.biased: Dict[int, Tuple[bytes, _Device]] = {}
        self.lock = threading.Lock()

    def _status(self, index: int) -> "torch.Tensor":
        st = self.status.get(index)
        if st is None:
            with torch.cuda.device(index):
                st = torch.zeros(1, dtype=torch.int64, device=f"cuda:{index}")
            self.status[index] = st
        return st

    def get(self, index: int, bias: Optional[np.ndarray]) -> _Device:
        if bias is None:
            d = self.plain.get(index)  # the lock-free hit of the common case
            if d is not None:
                return d
        with self.lock:
            return self._get(index, bias)

    def _get(self, index: int, bias: Optional[np.ndarray]) -> _Device:
        if bias is None:
            d = self.plain.get(index)
            if d is None:
                d = self.plain[index] = _Device(self.config, index, None, self._status(index))
                if self.native is not None:
                    # Later calls without a bias launch from Rust (Router.route_tensor).
                    self.native.set_cuda_device(index, d.launch, d.status, d.status.data_ptr())
            return d
        key = bias.tobytes()
        hit = self.biased.get(index)
        if hit is not None and hit[0] == key:
            return hit[1]
        d = _Device(self.config, index, bias.tolist(), self._status(index))
        self.biased[index] = (key, d)
        return d

    def check(self) -> None:
        for index, st in list(self.status.items()):
            d = self.plain.get(index) or self.biased[index][1]
            d.launch.read_status(st.data_ptr(), _stream(index))


_STATE_LOCK = threading.Lock()


def _state(router: Any) -> CudaState:
    st = router._cuda
    if st is None:
        with _STATE_LOCK:
            st = router._cuda
            if st is None:
                st = router._cuda = CudaState(router.config, router._r)
    return st


def _prepare(logits: "torch.Tensor") -> Tuple["torch.Tensor", str, int, int, int]:
    x = logits.detach()
    if x.dim() != 2:
        raise RouteError(f"logits must be [T, E], got shape {tuple(x.shape)}")
    dt = _DTYPES.get(x.dtype)
    if dt is None:
        if x.dtype == torch.float64:
            x, dt = x.float(), "float32"
        else:
            raise RouteError(f"CUDA logits must be float32, bfloat16, float16 or float64, got {x.dtype}")
    t, e = x.shape
    if x.stride(1) != 1 or (t > 1 and x.stride(0) < e):
        x = x.contiguous()
    ld = x.stride(0) if t > 1 else e
    return x, dt, t, e, ld


def _bias(bias: Any) -> Optional[np.ndarray]:
    if bias is None:
        return None
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().float().cpu().numpy()
    return np.ascontiguousarray(bias, dtype=np.float32)


def route(router: Any, logits: "torch.Tensor", bias: Any, check: bool):
    """``(ids int32, weights float32)`` on the logits' device, enqueued on torch's stream."""
    x, dt, t, e, ld = _prepare(logits)
    index = x.get_device()
    d = _state(router).get(index, _bias(bias))
    k = router._k
    # new_empty: the logits' device without parsing a device argument (microseconds cheaper).
    ids = x.new_empty((t, k), dtype=torch.int32)
    w = x.new_empty((t, k), dtype=torch.float32)
    s = _stream(index)
    d.launch.enqueue("route", x.data_ptr(), dt, t, e, ld, ids.data_ptr(), w.data_ptr(), d.status.data_ptr(), s)
    if check:
        d.launch.read_status(d.status.data_ptr(), s)
    return ids, w


def _ids_i32(ids: Any, device: Any, t: int, k: int) -> "torch.Tensor":
    """Ids ``[t, k]`` as contiguous int32 on ``device`` (what the kernels read as u32)."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(np.asarray(ids))
    if ids.dim() != 2 or ids.shape[0] != t or ids.shape[1] != k:
        raise RouteError(f"replay ids shape mismatch: expected [{t}, {k}] but got {list(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise RouteError(f"ids must be integers, got {ids.dtype}")
    if ids.dtype == torch.int64:
        # Values outside int32 would wrap: they become -1, which the kernels refuse as out of
        # range (read as u32 0xffffffff >= E).
        ids = torch.where((ids < 0) | (ids > 0x7FFFFFFF), torch.full_like(ids, -1), ids)
    return ids.to(device=device, dtype=torch.int32).contiguous()


def backward(router: Any, logits: "torch.Tensor", ids: Any, grad: Any, grad_z_loss: float, check: bool = False):
    """The gradient float32 ``[T, E]`` on the logits' device (no aux-loss term), enqueued on
    torch's stream like the forward."""
    x, dt, t, e, ld = _prepare(logits)
    k = router._k
    ids = _ids_i32(ids, x.device, t, k)
    if not isinstance(grad, torch.Tensor):
        grad = torch.as_tensor(np.asarray(grad))
    if grad.dim() != 2 or grad.shape[0] != t or grad.shape[1] != k:
        raise RouteError(f"grad_weights shape mismatch: expected [{t}, {k}] but got {list(grad.shape)}")
    g = grad.detach().to(device=x.device, dtype=torch.float32).contiguous()
    index = x.get_device()
    d = _state(router).get(index, None)
    dz = torch.empty((t, e), dtype=torch.float32, device=x.device)
    s = _stream(index)
    d.launch.enqueue_backward(
        x.data_ptr(), dt, t, e, ld, ids.data_ptr(), g.data_ptr(), dz.data_ptr(), d.status.data_ptr(), float(grad_z_loss), s
    )
    if check:
        d.launch.read_status(d.status.data_ptr(), s, ids.data_ptr())
    return dz


def weights_for(router: Any, logits: "torch.Tensor", ids: Any, check: bool):
    """Replay: weights float32 ``[T, K]`` of ``ids`` on the logits' device."""
    x, dt, t, e, ld = _prepare(logits)
    k = router._k
    ids = _ids_i32(ids, x.device, t, k)
    index = x.get_device()
    d = _state(router).get(index, None)
    w = torch.empty((t, k), dtype=torch.float32, device=x.device)
    s = _stream(index)
    d.launch.enqueue("replay", x.data_ptr(), dt, t, e, ld, ids.data_ptr(), w.data_ptr(), d.status.data_ptr(), s)
    if check:
        d.launch.read_status(d.status.data_ptr(), s, ids.data_ptr())
    return w
