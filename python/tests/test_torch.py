"""torch (CPU) tensors: torch in, torch out; moe_router.torch.route's autograd against finite
differences and against torch's own autograd of the same formulas; activation recompute."""

import numpy as np
import pytest

import moe_router as m
from conftest import spread_logits

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
import moe_router.torch as mt  # noqa: E402


def fd_grad(f, x, eps):
    """Central finite differences of the scalar f at x (float64)."""
    g = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        xp = x.copy()
        xm = x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


CONFIGS = {
    "softmax_after": {"num_moe_experts": 8, "moe_router_topk": 3},
    "softmax_before": {"num_moe_experts": 8, "moe_router_topk": 3, "moe_router_pre_softmax": True},
    "sigmoid_norm": {"num_moe_experts": 8, "moe_router_topk": 3, "moe_router_score_function": "sigmoid",
                     "moe_router_topk_scaling_factor": 2.5},
}


def test_torch_in_torch_out(rng):
    r = m.Router(m.preset("qwen3-moe"), backend="cpu")
    x = torch.from_numpy(rng.standard_normal((5, 128), dtype=np.float32))
    ids, w = r.route(x)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int32 and w.dtype == torch.float32
    nids, nw = r.route(x.numpy())
    assert (ids.numpy() == nids).all() and w.numpy().tobytes() == nw.tobytes()
    assert r.weights_for(x, ids).numpy().tobytes() == nw.tobytes()
    # bf16 and f64 tensors route like their NumPy widenings.
    xb = x.to(torch.bfloat16)
    ids_b, _ = r.route(xb)
    assert (ids_b.numpy() == r.route(xb.float().numpy())[0]).all()
    assert (r.route(x.double())[0] == ids).all()
    assert r.stats(x, ids)["tokens_per_expert"] == r.stats(x.numpy(), nids)["tokens_per_expert"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_autograd_against_finite_differences(name, rng):
    cfg = m.RouterConfig.from_megatron(CONFIGS[name])
    r = m.Router(cfg, backend="cpu")
    x0 = spread_logits(rng, 4, 8).astype(np.float64) * 4
    g = rng.standard_normal((4, 3))
    x = torch.tensor(x0, dtype=torch.float32, requires_grad=True)
    ids, w = mt.route(r, x)
    (w.double() * torch.from_numpy(g)).sum().backward()
    fixed = ids.numpy()

    def f(xv):
        # The weights of the same ids (the selection is piecewise constant).
        return float((r.weights_for(xv.astype(np.float32), fixed).astype(np.float64) * g).sum())

    want = fd_grad(f, x0, 1e-2)
    np.testing.assert_allclose(x.grad.numpy(), want, atol=2e-3, rtol=2e-3)


def test_autograd_matches_torch_reference(rng):
    """Softmax after top-k (Megatron's default) written in torch, differentiated by torch."""
    cfg = m.RouterConfig.from_megatron({"num_moe_experts": 16, "moe_router_topk": 4})
    r = m.Router(cfg, backend="cpu")
    x0 = torch.from_numpy(spread_logits(rng, 32, 16))
    g = torch.randn(32, 4, dtype=torch.float32)
    x = x0.clone().requires_grad_()
    ids, w = mt.route(r, x)
    (w * g).sum().backward()
    y = x0.clone().requires_grad_()
    ref_w = torch.softmax(y.gather(1, ids.long()), dim=-1)
    (ref_w * g).sum().backward()
    torch.testing.assert_close(w, ref_w.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


def test_replay_ids_gradient_through_replayed_experts(rng):
    cfg = m.RouterConfig.from_megatron({"num_moe_experts": 8, "moe_router_topk": 2})
    r = m.Router(cfg, backend="cpu")
    x = torch.from_numpy(spread_logits(rng, 6, 8)).requires_grad_()
    forced = torch.tensor([[7, 0]] * 6)
    ids, w = mt.route(r, x, replay_ids=forced)
    assert (ids == forced.int()).all() and not ids.requires_grad
    w[:, 0].sum().backward()
    nz = (x.grad != 0).nonzero()[:, 1].unique().tolist()
    assert set(nz) <= {0, 7}
    with pytest.raises(m.RouteError, match="twice"):
        mt.route(r, x, replay_ids=torch.tensor([[1, 1]] * 6))


def test_activation_recompute_gives_same_ids_and_grads(rng):
    from torch.utils.checkpoint import checkpoint

    cfg = m.RouterConfig.from_megatron({"num_moe_experts": 16, "moe_router_topk": 4})
    r = m.Router(cfg, backend="cpu")
    x0 = torch.from_numpy(spread_logits(rng, 8, 16))
    seen = []

    def block(x):
        ids, w = mt.route(r, x * 1.0)
        seen.append(ids.clone())
        return (w * torch.arange(4.0)).sum()

    a = x0.clone().requires_grad_()
    block(a).backward()
    b = x0.clone().requires_grad_()
    checkpoint(block, b, use_reentrant=False).backward()
    assert len(seen) == 3  # plain forward, checkpointed forward, recompute
    assert all(torch.equal(s, seen[0]) for s in seen)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_backward_aux_and_z_loss_against_finite_differences(rng):
    cfg = m.RouterConfig.from_megatron(
        {"num_moe_experts": 8, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.1,
         "moe_router_load_balancing_type": "aux_loss", "moe_z_loss_coeff": 0.01}
    )
    r = m.Router(cfg, backend="cpu")
    x0 = spread_logits(rng, 6, 8).astype(np.float64) * 3
    ids, _ = r.route(x0.astype(np.float32))
    dz = r.backward(x0.astype(np.float32), ids, np.zeros((6, 2), np.float32), grad_aux_loss=1.0, grad_z_loss=1.0)

    def f(xv):
        s = r.stats(xv.astype(np.float32), ids)
        return s["aux_loss"] + s["z_loss"]

    np.testing.assert_allclose(dz, fd_grad(f, x0, 1e-3), atol=1e-4, rtol=2e-3)


def test_torch_backward_method_returns_tensor(rng):
    r = m.Router(m.preset("mixtral"), backend="cpu")
    x = torch.from_numpy(spread_logits(rng, 3, 8))
    ids, w = r.route(x)
    dz = r.backward(x, ids, torch.ones_like(w))
    assert isinstance(dz, torch.Tensor) and dz.shape == (3, 8) and dz.dtype == torch.float32


# -- the native torch path (Router.route reads and makes tensors in Rust) ---------------------

PATHS = ["auto", "attributes", "python"]


@pytest.fixture(params=PATHS)
def torch_path(request):
    """Each way Router.route can take a torch tensor; restored to "auto" afterwards."""
    m._native.torch_path(request.param)
    yield m._native.torch_path()
    m._native.torch_path("auto")


def test_torch_path_names():
    assert m._native.torch_path() in ("exchange", "attributes")
    with pytest.raises(ValueError, match="unknown torch path"):
        m._native.torch_path("fast")
    assert m._native.torch_path("python") == "python"
    assert m._native.torch_path("attributes") == "attributes"
    m._native.torch_path("auto")


def layouts(rng, t, e):
    """CPU tensors [t, e] of several layouts and dtypes, with the NumPy array each equals."""
    base = rng.standard_normal((t, e), dtype=np.float32)
    wide = torch.from_numpy(rng.standard_normal((t, e + 24), dtype=np.float32))
    tall = torch.from_numpy(rng.standard_normal((2 * t, e), dtype=np.float32))
    x = torch.from_numpy(base)
    out = {
        "contiguous": x,
        "float16": x.half(),
        "bfloat16": x.bfloat16(),
        "float64": x.double(),
        "transposed": torch.from_numpy(np.ascontiguousarray(base.T)).t(),
        "column_slice": wide[:, 8 : 8 + e],
        "every_other_row": tall[::2],
        "broadcast_row": x[:1].expand(t, e),
        "requires_grad": x.clone().requires_grad_(),
        "parameter": torch.nn.Parameter(x.clone()),
    }
    ref = {}
    for k, v in out.items():
        d = v.detach()
        ref[k] = d.float().numpy() if d.dtype == torch.bfloat16 else d.numpy()
    return out, ref


@pytest.mark.parametrize("t", [1, 5, 300])
def test_native_torch_path_matches_numpy(torch_path, t, rng):
    r = m.Router(m.preset("qwen3-moe"), backend="cpu")
    xs, ref = layouts(rng, t, 128)
    for name, x in xs.items():
        ids, w = r.route(x)
        assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int32 and w.dtype == torch.float32, name
        assert ids.shape == (t, 8) and w.shape == (t, 8) and ids.is_contiguous() and w.is_contiguous(), name
        if name == "bfloat16":
            want_ids, want_w = r.route(x.float().numpy())  # bf16 widens exactly to f32
        else:
            want_ids, want_w = r.route(ref[name])
        assert (ids.numpy() == want_ids).all(), name
        assert w.numpy().tobytes() == want_w.tobytes(), name


def test_native_torch_path_outputs_are_fresh_and_owned(torch_path, rng):
    r = m.Router(m.preset("mixtral"), backend="cpu")
    x = torch.from_numpy(spread_logits(rng, 4, 8))
    ids, w = r.route(x)
    ids2, w2 = r.route(x)
    assert ids.data_ptr() != ids2.data_ptr() and w.data_ptr() != w2.data_ptr()
    want = ids.clone(), w.clone()
    ids2.fill_(-1)
    w2.zero_()
    del r, x, ids2, w2
    import gc

    gc.collect()
    junk = [torch.full((4, 2), 7.0) for _ in range(64)]  # reuse freed memory if any was
    assert torch.equal(ids, want[0]) and torch.equal(w, want[1]) and len(junk) == 64
    e = m.Router(m.preset("mixtral"), backend="cpu").route(torch.empty((0, 8)))
    assert e[0].shape == (0, 2) and e[1].shape == (0, 2) and e[0].dtype == torch.int32


def test_native_torch_path_bias_and_errors(torch_path, rng):
    cfg = m.preset("deepseek-v3")
    r = m.Router(cfg, backend="cpu")
    x = torch.from_numpy(rng.standard_normal((6, cfg.num_experts), dtype=np.float32))
    bias = rng.standard_normal(cfg.num_experts).astype(np.float32) * 0.1
    ids, w = r.route(x, bias=bias)
    nids, nw = r.route(x.numpy(), bias=bias)
    assert (ids.numpy() == nids).all() and w.numpy().tobytes() == nw.tobytes()
    tids, tw = r.route(x, bias=torch.from_numpy(bias))
    assert torch.equal(tids, ids) and torch.equal(tw, w)
    q = m.Router(m.preset("qwen3-moe"), backend="cpu")
    for bad in (torch.zeros((3, 64)), torch.zeros(128), torch.zeros((3, 128), dtype=torch.int64)):
        with pytest.raises(m.RouteError) as got:
            q.route(bad)
        with pytest.raises(m.RouteError) as want:
            q.route(bad.numpy())
        assert str(got.value) == str(want.value)
    nan = torch.zeros((3, 128))
    nan[1, 5] = float("nan")
    with pytest.raises(m.RouteError, match="row 1"):
        q.route(nan)
