"""Python overhead of moe_router.Router.route against the same routing called inside Rust
(issue 11, item 5).

For each case: the Rust time per call (a loop inside the extension, no Python in it), the
Python time per call (``router.route(x)`` from Python) and their difference (the binding's
overhead) or ratio, with the target. Rust and Python batches alternate and the medians are
compared, so that drift in the machine's load hits both alike.

CUDA tensors are timed three ways, for Rust (``CudaLaunch.bench_ns``: the same launches from a
loop in Rust) and for Python alike:

* ``launch``: a loop of N asynchronous calls, timed until the loop returns, divided by N: what
  the caller's thread pays per call (N = 200 stays below the driver's launch queue, so the GPU
  never throttles the loop);
* ``wall``: the same N calls then one wait for the stream, divided by N: the throughput of
  back-to-back calls (the larger of the host's and the GPU's time per call);
* ``latency``: each call followed by a wait for the stream (Rust: ``cuStreamSynchronize``;
  Python: ``torch.cuda.Stream.synchronize``, whose own Python cost is included), per call.

At T = 1 the exchange path is timed with the output cache (the default: a finished route's
block is reused by the next) and without it (every call allocates from torch).

Targets: CPU T = 1 overhead <= 3 us; CUDA T = 1 <= 6 us wall; T = 65536 within 1.1x of Rust.

    python python/benches/bench_route.py            # CPU (and CUDA when torch sees a GPU)
    python python/benches/bench_route.py --preset deepseek-v3 --iters 20000
"""

import argparse
import statistics
import time

import numpy as np

import moe_router as m


def per_call(fn, iters):
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        fn()
    return (time.perf_counter_ns() - t0) / iters


def paired(rust_fn, py_fn, repeats):
    """Medians of alternating Rust and Python batches (each returns a number or a tuple)."""
    rs, ps = [], []
    for _ in range(repeats):
        rs.append(rust_fn())
        ps.append(py_fn())

    def med(v):
        if isinstance(v[0], tuple):
            return tuple(statistics.median(x[i] for x in v) for i in range(len(v[0])))
        return statistics.median(v)

    return med(rs), med(ps)


def row(case, rust, py, kind, target=None, unit=1e3, u="us"):
    """One line: ``kind`` "over" (target on py - rust), "abs" (target on py), "ratio" (on
    py / rust) or "info" (no target)."""
    if kind == "ratio":
        d = f"{py / rust:.3f}x"
        ok = py / rust <= target
        t = f"<= {target}x"
    else:
        d = f"{(py - rust) / unit:.2f}{u}"
        ok = {"over": (py - rust) / unit, "abs": py / unit}.get(kind, 0) <= (target or 0)
        t = {"over": f"<= {target} {u} over", "abs": f"<= {target} {u}"}.get(kind, "")
    verdict = "" if kind == "info" else ("met" if ok else "MISSED")
    print(f"{case:<34} {rust / unit:>9.2f}{u} {py / unit:>9.2f}{u} {d:>12} {t:>14} {verdict:>7}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-moe")
    ap.add_argument("--iters", type=int, default=20000, help="calls per timed batch at T = 1 (CPU)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--big", type=int, default=65536, help="T of the large case")
    ap.add_argument("--no-cuda", action="store_true")
    a = ap.parse_args()
    cfg = m.preset(a.preset)
    e, k = cfg.num_experts, cfg.top_k
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(e).astype(np.float32) * 0.1 if cfg.expects_expert_bias else None
    if bias is not None:
        cfg = cfg.with_expert_bias(bias.tolist())
    r = m.Router(cfg, backend="cpu")
    try:
        import torch
    except ImportError:
        torch = None
    print(f"preset {a.preset} (E = {e}, K = {k}), {r.device}")
    if torch is not None:
        print(f"torch {torch.__version__}, torch tensors through: {m._native.torch_path()}")
    print(f"{'case':<34} {'rust/call':>11} {'python/call':>11} {'difference':>12} {'target':>14} {'':>7}")
    x1 = rng.standard_normal((1, e), dtype=np.float32)

    def rust1():
        return r._r.bench_route_ns(x1, a.iters, 1)

    rust, py = paired(rust1, lambda: per_call(lambda: r.route(x1), a.iters), a.repeats)
    row("cpu numpy T=1", rust, py, "over", 3)
    if torch is not None:
        t1 = torch.from_numpy(x1)
        for path in ("auto", "attributes"):
            m._native.torch_path(path)
            name = m._native.torch_path()
            rust, py = paired(rust1, lambda: per_call(lambda: r.route(t1), a.iters), a.repeats)
            row(f"cpu torch T=1 ({name})", rust, py, "over", 3)
        m._native.torch_path("auto")
    xb = rng.standard_normal((a.big, e), dtype=np.float32)
    it = 3

    def rustb():
        return r._r.bench_route_ns(xb, it, 1)

    rust, py = paired(rustb, lambda: per_call(lambda: r.route(xb), it), max(3, a.repeats // 2))
    row(f"cpu numpy T={a.big}", rust, py, "ratio", 1.1, unit=1e6, u="ms")
    if torch is not None:
        tb = torch.from_numpy(xb)
        rust, py = paired(rustb, lambda: per_call(lambda: r.route(tb), it), max(3, a.repeats // 2))
        row(f"cpu torch T={a.big}", rust, py, "ratio", 1.1, unit=1e6, u="ms")

    if torch is None or a.no_cuda or not torch.cuda.is_available() or "cuda" not in m.compiled_backends():
        print("cuda: skipped (no torch, no CUDA device, or no CUDA backend in this build)")
        return
    from moe_router import _cuda

    g = m.Router(cfg, backend="cuda")
    dev = torch.device("cuda", 0)
    stream = torch.cuda.current_stream(dev)
    print(f"cuda device: {torch.cuda.get_device_name(0)}")
    for t, n, reps in ((1, 200, 4 * a.repeats), (a.big, 20, a.repeats)):
        x = torch.from_numpy(rng.standard_normal((t, e), dtype=np.float32)).to(dev)
        g.route(x)  # compiles the kernels, creates and registers the device's launcher
        torch.cuda.synchronize()
        d = _cuda._state(g).get(0, None)
        ids = torch.empty((t, k), dtype=torch.int32, device=dev)
        w = torch.empty((t, k), dtype=torch.float32, device=dev)
        s = _cuda._stream(0)

        def rust_batch(sync_each=False):
            return d.launch.bench_ns(
                "route", x.data_ptr(), "float32", t, e, e, ids.data_ptr(), w.data_ptr(), d.status.data_ptr(), s,
                n, sync_each,
            )

        def py_batch():
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            for _ in range(n):
                g.route(x)
            t1 = time.perf_counter_ns()
            stream.synchronize()
            return (t1 - t0) / n, (time.perf_counter_ns() - t0) / n

        def py_latency():
            t0 = time.perf_counter_ns()
            for _ in range(n):
                g.route(x)
                stream.synchronize()
            return (time.perf_counter_ns() - t0) / n

        variants = (("auto", True), ("auto", False), ("attributes", True)) if t == 1 else (("auto", True),)
        for path, cache in variants:
            m._native.torch_path(path)
            m.release_output_cache(enabled=cache)
            name = m._native.torch_path() + ("" if cache else ", no output cache")
            (rl, rw), (pl, pw) = paired(rust_batch, py_batch, reps)
            if t == 1:
                row(f"cuda T=1 launch ({name})", rl, pl, "info")
                row(f"cuda T=1 wall ({name})", rw, pw, "abs", 6)
                rs, ps = paired(lambda: rust_batch(True)[1], py_latency, a.repeats)
                row(f"cuda T=1 latency ({name})", rs, ps, "info")
            else:
                row(f"cuda T={t} wall ({name})", rw, pw, "ratio", 1.1)
        m._native.torch_path("auto")
        m.release_output_cache(enabled=True)
    g.check()


if __name__ == "__main__":
    main()
