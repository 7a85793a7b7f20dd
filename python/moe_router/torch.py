"""PyTorch integration: routing as a ``torch.autograd.Function``.

:func:`route` returns ``(ids, weights)`` for logits ``[T, E]``: ``ids`` (int32) carry no
gradient; ``weights`` (float32) are differentiable with respect to the logits through the
router's backward (DESIGN §2b: selection is piecewise constant, the weights of the live logits
pass the gradient). With ``replay_ids`` the ids are forced (R2/R3 replay) and only the weights
are computed, so the gradient reaches the router through the replayed experts' weights.

It works under activation recompute (``torch.utils.checkpoint``): the recompute routes the same
logits again and gets the same ids (routing is deterministic, ties broken by the lower expert
id), or replays the same ``replay_ids``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import Router

__all__ = ["route", "RouteFunction"]


class RouteFunction(torch.autograd.Function):
    """The autograd Function behind :func:`route` (``apply(logits, router, bias, replay_ids)``)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, router: Router, bias: Any, replay_ids: Optional[torch.Tensor]):
        if replay_ids is None:
            ids, w = router.route(logits, bias)
        else:
            ids = replay_ids
            if not isinstance(ids, torch.Tensor):
                ids = torch.as_tensor(ids)
            ids = ids.to(device=logits.device)
            w = router.weights_for(logits, ids)
            ids = ids.to(torch.int32)
        ctx.router = router
        ctx.save_for_backward(logits, ids)
        ctx.mark_non_differentiable(ids)
        return ids, w

    @staticmethod
    def backward(ctx: Any, grad_ids: Any, grad_w: Optional[torch.Tensor]):
        logits, ids = ctx.saved_tensors
        if grad_w is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        dz = ctx.router.backward(logits, ids, grad_w)
        return dz.to(dtype=logits.dtype), None, None, None


def route(
    router: Router,
    logits: torch.Tensor,
    bias: Any = None,
    replay_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Routes (or, with ``replay_ids`` ``[T, K]``, replays) ``logits`` ``[T, E]`` with
    ``router``; returns ``(ids int32, weights float32)`` on the logits' device, ``weights``
    differentiable with respect to ``logits``.

    ``bias`` is the selection-only bias (no gradient: it changes the selection, never the
    weights). Replay ids are validated (shape, range, no duplicate in a row) and raise
    :class:`moe_router.RouteError` naming the row.
    """
    if not isinstance(router, Router):
        raise TypeError(f"router must be a moe_router.Router, got {type(router).__name__}")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    return RouteFunction.apply(logits, router, bias, replay_ids)
