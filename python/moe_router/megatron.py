"""A drop-in for Megatron-Core's ``RouterReplay`` (``megatron/core/transformer/moe/router_replay.py``).

Same class, enum, attribute and method names, same global registry and the same FIFO semantics
for ``REPLAY_BACKWARD`` (research/megatron.md §2), so that a training script swaps it in with one
import (``docs/rl-integration.md``). What it adds:

* validation: replay indices must be 2-D integers, every id ``< E`` (when E is known: the
  ``num_experts`` given to the constructor, or the width of the scores at replay time), no expert
  twice in a row, and at replay time exactly one row per token and ``topk`` columns. Megatron
  checks none of this (a short tensor silently routes the remaining tokens nowhere, duplicates
  collapse in the scatter); here each is a :class:`moe_router.RouteError` (a ``ValueError``)
  naming the layer, row and slot;
* an empty replay (``REPLAY_FORWARD`` without targets, ``REPLAY_BACKWARD`` with an empty FIFO)
  is a :class:`moe_router.RouteError` saying which, not an ``AttributeError`` / ``IndexError``;
* ``set_replay_data`` refuses a layer-count mismatch (``ValueError``, as Megatron) and says both
  counts;
* persistence: :meth:`RouterReplay.save_recorded_data` writes every layer's recorded indices to an
  ``.mrt`` trace, :meth:`RouterReplay.load_replay_data` reads one back (refusing a trace whose
  layer count differs from the registry's) and :meth:`RouterReplay.set_replay_data_from_trace`
  installs it as the replay targets.

Tensors may be torch tensors (any device) or NumPy arrays; ``get_replay_topk`` needs torch.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np

from . import RouteError, Trace, TraceWriter, _is_torch, parse_layers

__all__ = ["RouterReplay", "RouterReplayAction"]


class RouterReplayAction(Enum):
    """What a layer's router does with its top-k indices."""

    RECORD = "record"
    """Record the top-k indices the router computes."""
    REPLAY_FORWARD = "replay_forward"
    """Use the indices set by ``set_target_indices`` / ``set_replay_data`` in the forward pass."""
    REPLAY_BACKWARD = "replay_backward"
    """Use the oldest queued indices (FIFO) in the recompute of the backward pass."""


def _host(idx: Any) -> np.ndarray:
    if _is_torch(idx):
        return idx.detach().cpu().numpy()
    return np.asarray(idx)


def _validate(idx: Any, where: str, num_experts: Optional[int], rows: Optional[int] = None, topk: Optional[int] = None) -> None:
    """Raises RouteError unless ``idx`` is a valid ``[rows, topk]`` selection of ``num_experts``."""
    shape = tuple(idx.shape)
    if len(shape) != 2:
        raise RouteError(f"{where}: top-k indices must be [num_tokens, topk], got shape {list(shape)}")
    if rows is not None and shape[0] != rows:
        raise RouteError(
            f"{where}: replay indices have {shape[0]} rows but the router sees {rows} tokens "
            f"(Megatron would route the remaining tokens nowhere)"
        )
    if topk is not None and shape[1] != topk:
        raise RouteError(f"{where}: replay indices have {shape[1]} columns but topk = {topk}")
    a = _host(idx)
    if a.dtype.kind not in "iu":
        raise RouteError(f"{where}: top-k indices must be integers, got dtype {a.dtype}")
    if a.size == 0:
        return
    neg = a < 0
    big = a >= num_experts if num_experts is not None else np.zeros_like(neg)
    bad = neg | big
    if bad.any():
        r, s = map(int, np.argwhere(bad)[0])
        lim = f" (num_experts = {num_experts})" if num_experts is not None else ""
        raise RouteError(f"{where}: index {int(a[r, s])} at row {r}, slot {s} is out of range{lim}")
    srt = np.sort(a, axis=1)
    dup = srt[:, 1:] == srt[:, :-1]
    if dup.any():
        r, j = map(int, np.argwhere(dup)[0])
        e = int(srt[r, j])
        slots = [int(x) for x in np.flatnonzero(a[r] == e)[:2]]
        raise RouteError(f"{where}: row {r} names expert {e} twice (slots {slots[0]} and {slots[1]})")


class RouterReplay:
    """Per-layer router replay state, with Megatron-Core's API (see the module docs).

    Each instance appends itself to ``RouterReplay.global_router_replay_instances`` (construction
    order = MoE-layer order on this process). ``num_experts`` (optional) enables range checks
    before replay time; ``layer_number`` is the model layer id used when persisting to ``.mrt``.
    """

    global_router_replay_instances: List["RouterReplay"] = []

    def __init__(self, num_experts: Optional[int] = None, layer_number: Optional[int] = None) -> None:
        self.target_topk_idx: Any = None
        self.recorded_topk_idx: Any = None
        self.router_replay_action: Optional[RouterReplayAction] = None
        self.replay_backward_list: List[Any] = []
        self.static_buffer: Any = None
        self.layer_number: Optional[int] = layer_number
        self.num_experts: Optional[int] = num_experts
        RouterReplay.global_router_replay_instances.append(self)

    def _where(self) -> str:
        try:
            i = RouterReplay.global_router_replay_instances.index(self)
        except ValueError:
            i = -1
        ln = f", layer_number {self.layer_number}" if self.layer_number is not None else ""
        return f"RouterReplay[{i}{ln}]"

    # -- instance API (Megatron names) ---------------------------------------------------------

    def set_target_indices(self, topk_indices: Any) -> None:
        """Sets the indices ``[num_tokens, topk]`` replayed by ``REPLAY_FORWARD`` and appends
        them to the FIFO that ``REPLAY_BACKWARD`` pops. Validated (integers, range when E is
        known, no duplicate in a row)."""
        _validate(topk_indices, self._where(), self.num_experts)
        self.target_topk_idx = topk_indices
        self.replay_backward_list.append(topk_indices)

    def get_recorded_indices(self) -> Any:
        """The indices of the last routed forward in ``RECORD`` mode (or None)."""
        return self.recorded_topk_idx

    def record_indices(self, topk_indices: Any) -> None:
        """Records ``topk_indices`` (into the static buffer, when one is set: its first
        ``num_tokens`` rows, and the record is a view of them)."""
        if len(tuple(topk_indices.shape)) != 2:
            raise RouteError(f"{self._where()}: top-k indices must be [num_tokens, topk], got shape {list(topk_indices.shape)}")
        if self.static_buffer is not None:
            n = topk_indices.shape[0]
            if n > self.static_buffer.shape[0]:
                raise RouteError(
                    f"{self._where()}: {n} tokens do not fit the static buffer of {self.static_buffer.shape[0]} rows"
                )
            dst = self.static_buffer[:n]
            if _is_torch(dst):
                dst.copy_(topk_indices)
            else:
                dst[...] = _host(topk_indices)
            self.recorded_topk_idx = dst
        else:
            self.recorded_topk_idx = topk_indices

    def clear_indices(self) -> None:
        """Forgets the recorded indices, the target and the FIFO."""
        self.recorded_topk_idx = None
        self.target_topk_idx = None
        self.replay_backward_list = []

    def set_router_replay_action(self, router_replay_action: Optional[RouterReplayAction]) -> None:
        """Sets this layer's action (None: route normally)."""
        if router_replay_action is not None and not isinstance(router_replay_action, RouterReplayAction):
            raise TypeError(f"expected a RouterReplayAction or None, got {router_replay_action!r}")
        self.router_replay_action = router_replay_action

    def clear_router_replay_action(self) -> None:
        """Clears this layer's action."""
        self.router_replay_action = None

    def set_static_buffer(self, buffer: Any) -> None:
        """Records into ``buffer`` ``[max_tokens, topk]`` (CUDA-graph friendly)."""
        self.static_buffer = buffer

    def clear_static_buffer(self) -> None:
        """Stops recording into a static buffer."""
        self.static_buffer = None

    def get_replay_topk(
        self,
        scores: Any,
        topk: int,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        default_compute_topk: Optional[Callable[..., Any]] = None,
    ):
        """Megatron's hook: ``(probs, indices)`` for ``scores`` ``[num_tokens, E]``.

        ``RECORD``: computes with ``default_compute_topk`` and records the indices.
        ``REPLAY_FORWARD`` / ``REPLAY_BACKWARD``: the target / the oldest FIFO entry, validated
        against the scores (one row per token, ``topk`` columns, ids ``< E``, no duplicates),
        gathered from ``scores``. Otherwise ``default_compute_topk``.
        """
        action = self.router_replay_action
        if action == RouterReplayAction.RECORD:
            probs, idx = self._default(default_compute_topk, scores, topk, num_groups, group_topk)
            self.record_indices(idx)
            return probs, idx
        if action in (RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD):
            if action == RouterReplayAction.REPLAY_FORWARD:
                if self.target_topk_idx is None:
                    raise RouteError(
                        f"{self._where()}: REPLAY_FORWARD without target indices (call set_target_indices "
                        f"or RouterReplay.set_replay_data first)"
                    )
                idx = self.target_topk_idx
            else:
                if not self.replay_backward_list:
                    raise RouteError(
                        f"{self._where()}: REPLAY_BACKWARD with no queued indices (each set_target_indices "
                        f"queues one; the recompute pops the oldest)"
                    )
                idx = self.replay_backward_list.pop(0)
            rows, e = int(scores.shape[0]), int(scores.shape[1])
            _validate(idx, self._where(), min(e, self.num_experts or e), rows=rows, topk=topk)
            import torch

            t = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(np.asarray(idx))
            t = t.to(device=scores.device, dtype=torch.int64)
            return scores.gather(1, t), t
        return self._default(default_compute_topk, scores, topk, num_groups, group_topk)

    @staticmethod
    def _default(fn: Optional[Callable[..., Any]], scores: Any, topk: int, num_groups: Any, group_topk: Any):
        if fn is None:
            import torch

            return torch.topk(scores, topk, dim=1)
        return fn(scores, topk, num_groups=num_groups, group_topk=group_topk)

    # -- global API (Megatron names) -----------------------------------------------------------

    @staticmethod
    def set_replay_data(all_layers_topk_indices: Sequence[Any]) -> None:
        """``set_target_indices`` on every registered layer, in registry order. A list whose
        length is not the number of registered layers raises ``ValueError``."""
        inst = RouterReplay.global_router_replay_instances
        if len(all_layers_topk_indices) != len(inst):
            raise ValueError(
                f"layer-count mismatch: {len(all_layers_topk_indices)} replay tensors for "
                f"{len(inst)} registered RouterReplay instances (MoE layers of this pipeline stage)"
            )
        for r, idx in zip(inst, all_layers_topk_indices):
            r.set_target_indices(idx)

    @staticmethod
    def get_recorded_data() -> List[Any]:
        """The recorded indices of every registered layer (entries may be None)."""
        return [r.get_recorded_indices() for r in RouterReplay.global_router_replay_instances]

    @staticmethod
    def clear_global_indices() -> None:
        """``clear_indices`` on every registered layer."""
        for r in RouterReplay.global_router_replay_instances:
            r.clear_indices()

    @staticmethod
    def set_global_router_replay_action(router_replay_action: RouterReplayAction) -> None:
        """Sets the action of every registered layer."""
        for r in RouterReplay.global_router_replay_instances:
            r.set_router_replay_action(router_replay_action)

    @staticmethod
    def clear_global_router_replay_action() -> None:
        """Clears the action of every registered layer."""
        for r in RouterReplay.global_router_replay_instances:
            r.clear_router_replay_action()

    @staticmethod
    def clear_global_router_replay_instances() -> None:
        """Empties the registry (at model teardown)."""
        RouterReplay.global_router_replay_instances.clear()

    @staticmethod
    def set_global_static_buffers(static_buffer: Any) -> None:
        """Layer ``i`` records into ``static_buffer[:, i, :]`` (``[max_tokens, L, topk]``)."""
        inst = RouterReplay.global_router_replay_instances
        if static_buffer.shape[1] != len(inst):
            raise ValueError(
                f"layer-count mismatch: static buffer has {static_buffer.shape[1]} layers, "
                f"{len(inst)} RouterReplay instances are registered"
            )
        for i, r in enumerate(inst):
            r.set_static_buffer(static_buffer[:, i, :])

    @staticmethod
    def clear_global_static_buffers() -> None:
        """``clear_static_buffer`` on every registered layer."""
        for r in RouterReplay.global_router_replay_instances:
            r.clear_static_buffer()

    # -- persistence (.mrt) ------------------------------------------------------------------

    @staticmethod
    def _layer_ids(layers: Any) -> List[int]:
        inst = RouterReplay.global_router_replay_instances
        ids = parse_layers(layers)
        if ids is None:
            numbers = [r.layer_number for r in inst]
            if all(n is not None for n in numbers):
                ids = [int(n) for n in numbers if n is not None]
            else:
                ids = list(range(len(inst)))
        if len(ids) != len(inst):
            raise ValueError(
                f"layer-count mismatch: {len(ids)} layer ids for {len(inst)} registered RouterReplay instances"
            )
        return ids

    @staticmethod
    def save_recorded_data(
        path: Union[str, os.PathLike],
        config: Any,
        layers: Any = None,
        seq_ids: Any = None,
        positions: Any = None,
    ) -> None:
        """Writes every registered layer's recorded indices to the ``.mrt`` trace ``path``.

        ``config`` is the :class:`moe_router.RouterConfig` (E, K, fingerprint) or a preset name;
        ``layers`` the model layer ids of the registry (default: each instance's
        ``layer_number``, else ``0..L``). ``seq_ids`` / ``positions`` address the token rows as in
        :meth:`moe_router.TraceWriter.record`. A layer without a record raises ``ValueError``."""
        inst = RouterReplay.global_router_replay_instances
        ids = RouterReplay._layer_ids(layers)
        missing = [i for i, r in enumerate(inst) if r.recorded_topk_idx is None]
        if missing:
            raise ValueError(f"RouterReplay instances {missing} have no recorded indices (set RECORD and run a forward)")
        with TraceWriter(path, config, ids) as w:
            for lid, r in zip(ids, inst):
                w.record(lid, r.recorded_topk_idx, seq_ids=seq_ids, positions=positions)

    @staticmethod
    def load_replay_data(
        path: Union[str, os.PathLike],
        seq: Optional[int] = None,
        start: int = 0,
        num_tokens: Optional[int] = None,
        device: Any = None,
        seq_ids: Any = None,
        positions: Any = None,
        **import_options: Any,
    ) -> List[Any]:
        """Reads per-layer indices ``[num_tokens, K]`` from a trace (``.mrt`` or any importable
        format), one per registered layer in registry order: positions ``start..`` of sequence
        ``seq`` (which may be left out when the trace holds one), or, for a packed batch, row
        ``t`` = sequence ``seq_ids[t]`` at position ``positions[t]`` (as
        :meth:`save_recorded_data` takes them). A trace whose layer count differs from the
        registry's raises ``ValueError``; a missing row raises :class:`moe_router.RouteError`
        naming it. Returns torch int64 tensors (on ``device``) when torch is importable, else
        NumPy arrays."""
        if seq_ids is not None or positions is not None:
            return RouterReplay._load_rows(path, seq_ids, positions, device, import_options)
        inst = RouterReplay.global_router_replay_instances
        tr = path if isinstance(path, Trace) else Trace.open(os.fspath(path), **import_options)
        if len(tr.layers) != len(inst):
            raise ValueError(
                f"layer-count mismatch: the trace has {len(tr.layers)} MoE layers {tr.layers}, "
                f"{len(inst)} RouterReplay instances are registered"
            )
        seqs = tr.sequences
        if seq is None:
            if len(seqs) != 1:
                raise ValueError(f"the trace holds {len(seqs)} sequences; pass seq=")
            seq = seqs[0]
        assert seq is not None
        out = []
        for lid, r in zip(tr.layers, inst):
            full = tr.ids(lid, seq)
            n = (full.shape[0] - start) if num_tokens is None else num_tokens
            a = tr.read_rows(int(seq), int(lid), int(start), int(n))
            miss = np.flatnonzero((a < 0).all(axis=1))
            if miss.size:
                raise RouteError(
                    f"layer {lid}: no recorded route for sequence {seq}, position {start + int(miss[0])} "
                    f"({miss.size} missing row(s) in positions {start}..{start + n})"
                )
            out.append(a)
        return RouterReplay._tensors(out, device)

    @staticmethod
    def _tensors(out: List[np.ndarray], device: Any) -> List[Any]:
        try:
            import torch
        except ImportError:  # pragma: no cover - the shim is for torch trainers
            return out
        ts = [torch.from_numpy(a.astype(np.int64)) for a in out]
        return [t.to(device) for t in ts] if device is not None else ts

    @staticmethod
    def _load_rows(path: Any, seq_ids: Any, positions: Any, device: Any, import_options: Any) -> List[Any]:
        inst = RouterReplay.global_router_replay_instances
        tr = path if isinstance(path, Trace) else Trace.open(os.fspath(path), **import_options)
        if len(tr.layers) != len(inst):
            raise ValueError(
                f"layer-count mismatch: the trace has {len(tr.layers)} MoE layers {tr.layers}, "
                f"{len(inst)} RouterReplay instances are registered"
            )
        if seq_ids is None or positions is None:
            raise ValueError("seq_ids and positions go together (one entry per token row)")
        s = np.asarray(_host(seq_ids), dtype=np.int64).reshape(-1)
        p = np.asarray(_host(positions), dtype=np.int64).reshape(-1)
        if s.shape != p.shape:
            raise ValueError(f"seq_ids has {s.size} entries, positions {p.size}")
        # Runs of rows with one sequence and consecutive positions, read at once.
        brk = np.flatnonzero((s[1:] != s[:-1]) | (p[1:] != p[:-1] + 1)) + 1
        starts = np.concatenate([[0], brk]).astype(np.int64)
        ends = np.concatenate([brk, [s.size]]).astype(np.int64)
        out = []
        for lid in tr.layers:
            a = np.empty((s.size, tr.top_k), dtype=np.int32)
            for r0, r1 in zip(starts, ends):
                a[r0:r1] = tr.read_rows(int(s[r0]), int(lid), int(p[r0]), int(r1 - r0))
            miss = np.flatnonzero((a < 0).all(axis=1))
            if miss.size:
                t = int(miss[0])
                raise RouteError(
                    f"layer {lid}: no recorded route for sequence {int(s[t])}, position {int(p[t])} "
                    f"(row {t}; {miss.size} missing row(s))"
                )
            out.append(a)
        return RouterReplay._tensors(out, device)

    @staticmethod
    def set_replay_data_from_trace(path: Union[str, os.PathLike], **kw: Any) -> None:
        """``set_replay_data(load_replay_data(path, **kw))``."""
        RouterReplay.set_replay_data(RouterReplay.load_replay_data(path, **kw))
