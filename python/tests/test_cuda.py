"""CUDA tensors (GPU machine): in and out on the same device without a copy, bit-identical to
the CPU backend in portable mode, ordered on torch's current stream, capturable in a CUDA graph
(so no host synchronisation), autograd, latched errors. Skipped, with the reason, without torch,
without a CUDA device or without the CUDA backend in this build."""

import threading

import numpy as np
import pytest

import moe_router as m
from conftest import spread_logits

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible to torch (GPU tests run on the GPU machine)", allow_module_level=True)
if "cuda" not in m.compiled_backends():
    pytest.skip("this moe_router build has no CUDA backend (cargo feature `cuda`)", allow_module_level=True)

import moe_router.torch as mt  # noqa: E402

DEV = torch.device("cuda", 0)


def routers(name, **kw):
    cfg = m.preset(name)
    return m.Router(cfg, backend="cuda"), m.Router(cfg, backend="cpu")


def bias_for(cfg, rng):
    return rng.standard_normal(cfg.num_experts).astype(np.float32) * 0.1 if cfg.expects_expert_bias else None


@pytest.mark.parametrize("preset", ["qwen3-moe", "deepseek-v3", "mixtral", "gpt-oss-20b"])
@pytest.mark.parametrize("t", [1, 7, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_in_cuda_out_bit_identical_to_cpu(preset, t, dtype):
    rng = np.random.default_rng(t)
    gpu, cpu = routers(preset)
    cfg = gpu.config
    bias = bias_for(cfg, rng)
    x = torch.from_numpy(rng.standard_normal((t, cfg.num_experts), dtype=np.float32)).to(dtype)
    xd = x.to(DEV)
    ids, w = gpu.route(xd, bias=bias)
    assert ids.device == DEV and w.device == DEV
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == (t, cfg.top_k)
    gpu.check()
    cids, cw = cpu.route(x, bias=bias)
    assert torch.equal(ids.cpu(), cids)
    assert w.cpu().numpy().tobytes() == cw.numpy().tobytes()
    if bias is None:
        w2 = gpu.weights_for(xd, ids)
        gpu.check()
        assert w2.cpu().numpy().tobytes() == cw.numpy().tobytes()


def test_strided_rows_and_other_device_index():
    rng = np.random.default_rng(3)
    gpu, cpu = routers("qwen3-moe")
    big = torch.from_numpy(rng.standard_normal((64, 160), dtype=np.float32)).to(DEV)
    x = big[:, 16:144]  # row stride 160, not contiguous as a whole
    ids, w = gpu.route(x)
    cids, cw = cpu.route(x.cpu())
    assert torch.equal(ids.cpu(), cids) and torch.equal(w.cpu(), cw)


def test_stream_order_work_queued_before_the_call():
    """Logits written by kernels still queued (behind a long sleep) when route is called."""
    rng = np.random.default_rng(4)
    gpu, cpu = routers("qwen3-moe")
    new = torch.from_numpy(rng.standard_normal((2048, 128), dtype=np.float32)).to(DEV)
    x = torch.zeros_like(new)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time queued before the copy
        x.copy_(new)
        ids, w = gpu.route(x)
        ids2 = ids.clone()
    side.synchronize()
    cids, cw = cpu.route(new.cpu())
    assert torch.equal(ids2.cpu(), cids) and torch.equal(w.cpu(), cw)
    # And on the default stream, after a matmul that produces the logits.
    a = torch.from_numpy(rng.standard_normal((2048, 512), dtype=np.float32)).to(DEV)
    b = torch.from_numpy(rng.standard_normal((512, 128), dtype=np.float32)).to(DEV) * 0.05
    torch.cuda._sleep(20_000_000)
    logits = a @ b
    ids, w = gpu.route(logits)
    cids, cw = cpu.route(logits.cpu())
    assert torch.equal(ids.cpu(), cids) and torch.equal(w.cpu(), cw)


def test_no_host_sync_cuda_graph_capture():
    """A route call can be captured into a CUDA graph: it neither copies to the host nor waits."""
    rng = np.random.default_rng(5)
    gpu, cpu = routers("qwen3-moe")
    x = torch.from_numpy(rng.standard_normal((256, 128), dtype=np.float32)).to(DEV)
    gpu.route(x)  # warm up: compile kernels, create the status word
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            ids, w = gpu.route(x)
    torch.cuda.current_stream().wait_stream(s)
    new = torch.from_numpy(rng.standard_normal((256, 128), dtype=np.float32)).to(DEV)
    x.copy_(new)
    g.replay()
    torch.cuda.synchronize()
    cids, cw = cpu.route(new.cpu())
    assert torch.equal(ids.cpu(), cids) and torch.equal(w.cpu(), cw)


def test_autograd_on_cuda_equals_cpu():
    rng = np.random.default_rng(6)
    cfg = m.RouterConfig.from_megatron({"num_moe_experts": 64, "moe_router_topk": 6})
    gpu, cpu = m.Router(cfg, backend="cuda"), m.Router(cfg, backend="cpu")
    x0 = torch.from_numpy(spread_logits(rng, 128, 64))
    g = torch.randn(128, 6)
    xd = x0.to(DEV).requires_grad_()
    ids, w = mt.route(gpu, xd)
    (w * g.to(DEV)).sum().backward()
    xc = x0.clone().requires_grad_()
    cids, cw = mt.route(cpu, xc)
    (cw * g).sum().backward()
    assert xd.grad.device == DEV
    assert torch.equal(ids.cpu(), cids)
    assert xd.grad.cpu().numpy().tobytes() == xc.grad.numpy().tobytes()
    # Replay through the Function on CUDA.
    x2 = x0.to(DEV).requires_grad_()
    rids, rw = mt.route(gpu, x2, replay_ids=ids.long())
    (rw * g.to(DEV)).sum().backward()
    assert torch.equal(x2.grad, xd.grad)


def test_errors_are_latched_and_raised_by_check():
    gpu, _ = routers("qwen3-moe")
    x = torch.randn(16, 128, device=DEV)
    x[5, 9] = float("nan")
    gpu.route(x)  # asynchronous: no error yet
    with pytest.raises(m.RouteError, match="row 5, expert 9"):
        gpu.check()
    gpu.check()  # cleared
    with pytest.raises(m.RouteError, match="row 5"):
        gpu.route(x, check=True)
    y = torch.randn(4, 128, device=DEV)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]] * 4, device=DEV)
    ids[2, 3] = 1
    with pytest.raises(m.RouteError, match="row 2"):
        gpu.weights_for(y, ids, check=True)
    with pytest.raises(m.RouteError, match="shape"):
        gpu.weights_for(y, ids[:2])


def test_threads_on_one_cuda_router():
    gpu, cpu = routers("qwen3-moe")
    xs = [torch.randn(512, 128, device=DEV) for _ in range(4)]
    want = [cpu.route(x.cpu())[0] for x in xs]
    out = [None] * 4

    def work(i):
        for _ in range(10):
            out[i] = gpu.route(xs[i])[0]
        torch.cuda.current_stream().synchronize()

    th = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in th]
    [t.join() for t in th]
    gpu.check()
    assert all(torch.equal(o.cpu(), w) for o, w in zip(out, want))


def test_numpy_on_cuda_router_and_cuda_tensor_on_cpu_router():
    gpu, cpu = routers("mixtral")
    x = np.random.default_rng(7).standard_normal((32, 8), dtype=np.float32)
    ids, w = gpu.route(x)
    assert isinstance(ids, np.ndarray)
    assert (ids == cpu.route(x)[0]).all()
    ids2, w2 = cpu.route(torch.from_numpy(x).to(DEV))
    assert ids2.device == DEV and torch.equal(ids2.cpu(), torch.from_numpy(ids))


def test_megatron_shim_on_cuda():
    from moe_router.megatron import RouterReplay, RouterReplayAction

    RouterReplay.clear_global_router_replay_instances()
    rr = RouterReplay(num_experts=8)
    rr.set_target_indices(torch.tensor([[0, 1], [2, 3]]))
    rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    scores = torch.randn(2, 8, device=DEV)
    probs, idx = rr.get_replay_topk(scores, 2)
    assert idx.device == DEV and torch.equal(probs, scores.gather(1, idx))
    RouterReplay.clear_global_router_replay_instances()


@pytest.mark.parametrize(
    "opts",
    [
        {"num_moe_experts": 64, "moe_router_topk": 6},
        {"num_moe_experts": 64, "moe_router_topk": 6, "moe_router_pre_softmax": True},
        {"num_moe_experts": 64, "moe_router_topk": 6, "moe_router_score_function": "sigmoid",
         "moe_router_topk_scaling_factor": 2.5, "moe_z_loss_coeff": 0.01},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_on_the_gpu_bit_identical_to_cpu(opts, dtype):
    """Router.backward on CUDA tensors (the zero-copy kernel launch) against the CPU backend."""
    rng = np.random.default_rng(8)
    cfg = m.RouterConfig.from_megatron(opts)
    gpu, cpu = m.Router(cfg, backend="cuda"), m.Router(cfg, backend="cpu")
    x = torch.from_numpy(spread_logits(rng, 300, 64)).to(dtype)
    ids, _ = cpu.route(x)
    g = torch.from_numpy(rng.standard_normal((300, 6)).astype(np.float32))
    zc = 0.5 if "moe_z_loss_coeff" in opts else 0.0
    dz_gpu = gpu.backward(x.to(DEV), ids.to(DEV), g.to(DEV), grad_z_loss=zc)
    gpu.check()
    assert dz_gpu.device == DEV and dz_gpu.dtype == torch.float32
    dz_cpu = cpu.backward(x, ids, g, grad_z_loss=zc)
    assert dz_gpu.cpu().numpy().tobytes() == dz_cpu.numpy().tobytes()


def test_backward_on_the_gpu_with_aux_term_goes_through_the_host():
    rng = np.random.default_rng(9)
    cfg = m.RouterConfig.from_megatron({"num_moe_experts": 16, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.01,
                                        "moe_router_load_balancing_type": "aux_loss"})
    gpu, cpu = m.Router(cfg, backend="cuda"), m.Router(cfg, backend="cpu")
    x = torch.from_numpy(spread_logits(rng, 64, 16))
    ids, w = cpu.route(x)
    a = gpu.backward(x.to(DEV), ids.to(DEV), torch.ones_like(w).to(DEV), grad_aux_loss=1.0)
    b = cpu.backward(x, ids, torch.ones_like(w), grad_aux_loss=1.0)
    assert a.device == DEV and a.cpu().numpy().tobytes() == b.numpy().tobytes()


def test_backward_on_the_gpu_latches_bad_ids():
    gpu, _ = routers("qwen3-moe")
    x = torch.randn(4, 128, device=DEV)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]] * 4, device=DEV)
    ids[3, 2] = 500
    gpu.backward(x, ids, torch.ones(4, 8, device=DEV))
    with pytest.raises(m.RouteError, match="row 3"):
        gpu.check()


@pytest.mark.parametrize("path", ["auto", "attributes", "python"])
def test_each_torch_path_on_cuda(path):
    """Router.route on CUDA tensors launched from Rust (DLPack exchange API or the tensor's
    attributes; the first call per device registers the launcher through the Python path) and
    through the Python path: same bits as the CPU backend, on torch's current stream."""
    m._native.torch_path(path)
    try:
        rng = np.random.default_rng(11)
        gpu, cpu = routers("qwen3-moe")
        for t in (1, 3, 2500):
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                x = torch.from_numpy(rng.standard_normal((t, 128), dtype=np.float32)).to(dtype)
                cids, cw = cpu.route(x)
                for _ in range(2):
                    ids, w = gpu.route(x.to(DEV))
                    assert ids.device == DEV and ids.dtype == torch.int32 and w.dtype == torch.float32
                    assert torch.equal(ids.cpu(), cids) and w.cpu().numpy().tobytes() == cw.numpy().tobytes()
        wide = torch.from_numpy(rng.standard_normal((40, 160), dtype=np.float32)).to(DEV)
        for x in (wide[:, 16:144], wide[:, :128].t().contiguous().t(), wide[:1, :128].expand(5, 128)):
            ids, w = gpu.route(x)
            cids, cw = cpu.route(x.cpu())
            assert torch.equal(ids.cpu(), cids) and torch.equal(w.cpu(), cw)
        e = gpu.route(torch.empty((0, 128), device=DEV))
        assert e[0].shape == (0, 8) and e[0].device == DEV
        # Work queued before the call on a side stream: the launch is ordered after it.
        new = torch.from_numpy(rng.standard_normal((2048, 128), dtype=np.float32)).to(DEV)
        x = torch.zeros_like(new)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)
            x.copy_(new)
            ids, w = gpu.route(x)
            ids2, w2 = ids.clone(), w.clone()
        side.synchronize()
        cids, cw = cpu.route(new.cpu())
        assert torch.equal(ids2.cpu(), cids) and torch.equal(w2.cpu(), cw)
        bad = torch.zeros((3, 128), device=DEV)
        bad[2, 7] = float("nan")
        gpu.route(bad)
        with pytest.raises(m.RouteError, match="row 2"):
            gpu.check()
        with pytest.raises(m.RouteError, match="row 2"):
            gpu.route(bad, check=True)
        with pytest.raises(m.RouteError):
            gpu.route(torch.zeros((3, 64), device=DEV))
    finally:
        m._native.torch_path("auto")


def test_route_outputs_share_one_allocation_and_free_it_with_the_last_one():
    """ids and weights come from one torch allocation: each keeps it alive alone, and it goes
    back to torch's caching allocator when both are gone (no leak over many calls)."""
    rng = np.random.default_rng(11)
    gpu, cpu = routers("qwen3-moe")
    x = torch.from_numpy(rng.standard_normal((333, 128), dtype=np.float32)).to(DEV)
    cids, cw = cpu.route(x.cpu())
    ids, w = gpu.route(x)
    del ids
    junk = [torch.full((333, 16), -7, dtype=torch.int32, device=DEV) for _ in range(8)]
    assert torch.equal(w.cpu(), cw), "weights intact after the ids tensor died"
    ids, w = gpu.route(x)
    del w
    junk += [torch.full((333, 16), -7.0, device=DEV) for _ in range(8)]
    assert torch.equal(ids.cpu(), cids), "ids intact after the weights tensor died"
    assert ids.data_ptr() % 16 == 0
    del ids, junk
    torch.cuda.synchronize()
    m.release_output_cache()
    base = torch.cuda.memory_allocated(DEV)
    for _ in range(200):
        ids, w = gpu.route(x)
        assert w.data_ptr() % 256 == 0 and w.data_ptr() > ids.data_ptr()
    del ids, w
    torch.cuda.synchronize()
    assert m.release_output_cache() > 0, "the last blocks were kept for reuse"
    assert torch.cuda.memory_allocated(DEV) == base, "every output allocation returned to torch"


def test_a_finished_route_block_is_reused_on_its_stream_and_never_while_alive():
    """A decode loop reuses the block of a route whose tensors are gone (same size, device and
    stream), never one still held, never on another stream; results stay right."""
    rng = np.random.default_rng(12)
    gpu, cpu = routers("qwen3-moe")
    xs = [torch.from_numpy(spread_logits(rng, 4, 128)).to(DEV) for _ in range(3)]
    gpu.route(xs[0])  # the first CUDA call of a router registers its launcher (Python path)
    m.release_output_cache()
    want = [cpu.route(x.cpu()) for x in xs]
    ids, w = gpu.route(xs[0])
    first = ids.data_ptr()
    held = gpu.route(xs[1])
    assert held[0].data_ptr() != first, "a live block is never handed out again"
    del ids, w
    ids, w = gpu.route(xs[2])
    assert ids.data_ptr() == first, "the finished block came back for the same size and stream"
    for (i, ww), (ci, cw) in zip([held, (ids, w)], want[1:]):
        assert torch.equal(i.cpu(), ci) and torch.equal(ww.cpu(), cw)
    del ids, w
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ids, w = gpu.route(xs[0])
        assert ids.data_ptr() != first, "a block freed on one stream is not reused on another"
        got = (ids.clone(), w.clone())
    side.synchronize()
    assert torch.equal(got[0].cpu(), want[0][0]) and torch.equal(got[1].cpu(), want[0][1])
    # Off: every route allocates from torch.
    m.release_output_cache(enabled=False)
    try:
        ids, w = gpu.route(xs[0])
        p = ids.data_ptr()
        del ids, w
        assert m.release_output_cache() == 0, "nothing kept while the cache is off"
    finally:
        m.release_output_cache(enabled=True)
    assert p % 256 == 0


def test_routes_captured_in_a_cuda_graph_neither_take_nor_give_cached_blocks():
    """The graph owns what a captured route writes: no cached block is used inside the capture
    and the captured outputs never go back to the cache."""
    rng = np.random.default_rng(13)
    gpu, cpu = routers("qwen3-moe")
    x = torch.from_numpy(spread_logits(rng, 8, 128)).to(DEV)
    gpu.route(x)  # the first CUDA call of a router registers its launcher (Python path)
    m.release_output_cache()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ids, w = gpu.route(x)  # warm up on s, then its block is cached for s
        cached = ids.data_ptr()
        del ids, w
    s.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            ids, w = gpu.route(x)
    assert ids.data_ptr() != cached, "capture took a block from the cache"
    new = torch.from_numpy(spread_logits(rng, 8, 128)).to(DEV)
    x.copy_(new)
    g.replay()
    torch.cuda.synchronize()
    cids, cw = cpu.route(new.cpu())
    assert torch.equal(ids.cpu(), cids) and torch.equal(w.cpu(), cw)
    kept = m.release_output_cache()
    del ids, w
    assert m.release_output_cache() == 0, "the captured outputs were not cached"
    assert kept > 0, "the block from before the capture was still cached"
