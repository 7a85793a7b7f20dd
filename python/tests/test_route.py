"""Router on NumPy (and DLPack / buffer) inputs: route, replay, stats, errors, threads, and
bit-for-bit equality with the CLI."""

import json
import threading

import numpy as np
import pytest

import moe_router as m
from conftest import spread_logits


@pytest.fixture
def router():
    return m.Router(m.preset("qwen3-moe"), backend="cpu")


def test_route_numpy_types_and_shapes(router, rng):
    x = rng.standard_normal((16, 128), dtype=np.float32)
    ids, w = router.route(x)
    assert isinstance(ids, np.ndarray) and isinstance(w, np.ndarray)
    assert ids.dtype == np.int32 and w.dtype == np.float32
    assert ids.shape == w.shape == (16, 8)
    # K distinct ids per row, slot order = key descending (softmax after top-k: weights descending).
    assert all(len(set(r)) == 8 for r in ids.tolist())
    assert np.all(np.diff(w, axis=1) <= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)


def test_replay_reproduces_weights_bitwise(router, rng):
    x = rng.standard_normal((32, 128), dtype=np.float32)
    ids, w = router.route(x)
    w2 = router.weights_for(x, ids)
    assert w2.tobytes() == w.tobytes()
    w3 = router.weights_for(x, ids.astype(np.int64))
    assert w3.tobytes() == w.tobytes()


def test_dtypes_f16_f64_and_noncontiguous(router, rng):
    x = rng.standard_normal((8, 128))
    ids64, _ = router.route(x)
    ids32, _ = router.route(x.astype(np.float32))
    assert (ids64 == ids32).all()
    h = x.astype(np.float16)
    ids16, w16 = router.route(h)
    assert (router.route(h.astype(np.float32))[0] == ids16).all()
    # A transposed (non-contiguous) view routes like its contiguous copy.
    xt = np.ascontiguousarray(x.astype(np.float32).T).T
    assert (router.route(xt)[0] == ids32).all()


def test_dlpack_and_buffer_protocol_inputs(router, rng):
    x = rng.standard_normal((4, 128), dtype=np.float32)

    class Producer:
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    ids, w = router.route(Producer(x))
    assert (ids == router.route(x)[0]).all()
    ids2, _ = router.route(memoryview(x))
    assert (ids2 == ids).all()
    ids3, _ = router.route(x.tolist())
    assert ids3.shape == (4, 8)


def test_bias_changes_selection_not_weights(rng):
    cfg = m.preset("deepseek-v3")
    r = m.Router(cfg, backend="cpu")
    x = rng.standard_normal((8, 256), dtype=np.float32)
    with pytest.raises(m.RouteError, match="selection bias"):
        r.route(x)
    zero = np.zeros(256, np.float32)
    ids0, w0 = r.route(x, bias=zero)
    bias = np.zeros(256, np.float32)
    bias[ids0[:, 0]] = -10.0
    ids1, w1 = r.route(x, bias=bias)
    assert not (ids1 == ids0).all()
    # Weights are those of the unbiased scores at the selected ids: the same as with a zero
    # bias for the same ids.
    rz = m.Router(cfg.with_expert_bias([0.0] * 256), backend="cpu")
    assert rz.weights_for(x, ids1).tobytes() == w1.tobytes()
    ids2, _ = r.route(x, bias=zero)
    assert (ids2 == ids0).all()


def test_route_errors_name_row_and_slot(router, rng):
    x = rng.standard_normal((4, 128), dtype=np.float32)
    x[2, 5] = np.nan
    with pytest.raises(m.RouteError, match="row 2, expert 5") as e:
        router.route(x)
    assert isinstance(e.value, ValueError)
    with pytest.raises(m.RouteError, match=r"expected \[T, 128\]"):
        router.route(np.zeros((4, 64), np.float32))
    with pytest.raises(m.RouteError, match="2-D"):
        router.route(np.zeros((4, 8, 16), np.float32))
    with pytest.raises(m.RouteError, match="int32"):
        router.route(np.zeros((4, 128), np.int32))
    y = rng.standard_normal((3, 128), dtype=np.float32)
    ids = np.tile(np.arange(8, dtype=np.int32), (3, 1))
    bad = ids.copy()
    bad[1, 3] = 200
    with pytest.raises(m.RouteError, match="row 1, slot 3"):
        router.weights_for(y, bad)
    bad = ids.copy()
    bad[2, 4] = bad[2, 1]
    with pytest.raises(m.RouteError, match="row 2 names expert 1 twice"):
        router.weights_for(y, bad)
    bad = ids.copy()
    bad[0, 0] = -1
    with pytest.raises(m.RouteError, match="out of range"):
        router.weights_for(y, bad)
    with pytest.raises(m.RouteError, match="shape"):
        router.weights_for(y, ids[:2])


def test_unavailable_backend_says_why():
    cfg = m.preset("mixtral")
    if "cuda" in m.compiled_backends():
        try:
            m.Router(cfg, backend="cuda")
        except m.RouteError as e:
            assert "cuda" in str(e)
        else:
            pytest.skip("a CUDA device is present")
    else:
        with pytest.raises(m.RouteError, match="cuda"):
            m.Router(cfg, backend="cuda")
    if "wgpu" not in m.compiled_backends():
        with pytest.raises(m.RouteError, match="rebuild with the cargo feature `wgpu`"):
            m.Router(cfg, backend="wgpu")
    with pytest.raises(m.RouteError, match="unknown backend"):
        m.Router(cfg, backend="tpu")
    assert m.Router(cfg, backend="auto").backend in m.compiled_backends()


def test_stats_keys_and_values(rng):
    cfg = m.RouterConfig.from_megatron(
        {
            "num_moe_experts": 16,
            "moe_router_topk": 2,
            "moe_aux_loss_coeff": 0.01,
            "moe_router_load_balancing_type": "aux_loss",
            "moe_z_loss_coeff": 0.001,
        }
    )
    r = m.Router(cfg, backend="cpu")
    x = rng.standard_normal((64, 16), dtype=np.float32)
    ids, _ = r.route(x)
    s = r.stats(x, ids)
    assert sum(s["tokens_per_expert"]) == 64 * 2
    assert s["aux_loss"] > 0 and s["z_loss"] > 0
    plain = m.Router(m.preset("mixtral"), backend="cpu")
    y = rng.standard_normal((4, 8), dtype=np.float32)
    s2 = plain.stats(y, plain.route(y)[0])
    assert s2["aux_loss"] is None and s2["z_loss"] is None


def test_threads_share_one_router(router, rng):
    xs = [rng.standard_normal((256, 128), dtype=np.float32) for _ in range(8)]
    want = [router.route(x)[0] for x in xs]
    got = [None] * 8
    errs = []

    def work(i):
        try:
            for _ in range(5):
                got[i] = router.route(xs[i])[0]
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    th = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in th]
    [t.join() for t in th]
    assert not errs
    assert all((g == w).all() for g, w in zip(got, want))


def test_backward_numpy_shapes(router, rng):
    x = spread_logits(rng, 6, 128)
    ids, w = router.route(x)
    dz = router.backward(x, ids, np.ones_like(w))
    assert dz.shape == (6, 128) and dz.dtype == np.float32
    # Only the selected experts get a gradient (softmax after top-k).
    mask = np.zeros_like(dz, dtype=bool)
    np.put_along_axis(mask, ids.astype(np.int64), True, axis=1)
    assert np.all(dz[~mask] == 0)


@pytest.mark.parametrize("preset", ["qwen3-moe", "deepseek-v3", "mixtral"])
def test_equals_cli_bit_for_bit(cli, tmp_path, rng, preset):
    cfg = m.preset(preset)
    e = cfg.num_experts
    x = rng.standard_normal((64, e), dtype=np.float32)
    lp = tmp_path / "logits.npy"
    np.save(lp, x)
    args = ["route", "--logits", lp, "--preset", preset, "--out", tmp_path / "out", "--backend", "cpu"]
    bias = None
    if cfg.expects_expert_bias:
        bias = rng.standard_normal(e).astype(np.float32) * 0.1
        np.save(tmp_path / "bias.npy", bias)
        args += ["--bias", tmp_path / "bias.npy"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    ids_cli = np.load(tmp_path / "out" / "ids.npy")
    w_cli = np.load(tmp_path / "out" / "weights.npy")
    router = m.Router(cfg, backend="cpu")
    ids, w = router.route(x, bias=bias)
    assert ids.dtype == ids_cli.dtype and ids.tobytes() == ids_cli.tobytes()
    assert w.tobytes() == w_cli.tobytes()
    st = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert router.stats(x, ids)["tokens_per_expert"] == st["tokens_per_expert"]
