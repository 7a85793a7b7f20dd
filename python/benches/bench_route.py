"""Python overhead of moe_router.Router.route against the same routing called inside Rust.

Prints, for each case: the Rust time per call (a loop inside the extension, no Python in it),
the Python time per call (``router.route(x)`` from Python, median of repeats) and the
difference (the binding's overhead) or the ratio. Targets (issue 11): T = 1 overhead <= 3 us on
the CPU; a CUDA tensor at T = 1 <= 6 us wall per call; T = 65536 within 1.1x of the Rust loop.

    python python/benches/bench_route.py            # CPU (and CUDA when torch sees a GPU)
    python python/benches/bench_route.py --preset deepseek-v3 --iters 20000
"""

import argparse
import statistics
import time

import numpy as np

import moe_router as m


def per_call(fn, iters, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter_ns() - t0) / iters)
    return statistics.median(out)


def paired(rust_fn, py_fn, repeats):
    """Medians of alternating Rust and Python batches (so that load drift hits both alike)."""
    rs, ps = [], []
    for _ in range(repeats):
        rs.append(rust_fn())
        ps.append(py_fn())
    return statistics.median(rs), statistics.median(ps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-moe")
    ap.add_argument("--iters", type=int, default=20000, help="calls per timed batch at T = 1")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--big", type=int, default=65536, help="T of the large case")
    ap.add_argument("--no-cuda", action="store_true")
    a = ap.parse_args()
    cfg = m.preset(a.preset)
    e = cfg.num_experts
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(e).astype(np.float32) * 0.1 if cfg.expects_expert_bias else None
    if bias is not None:
        cfg = cfg.with_expert_bias(bias.tolist())
    r = m.Router(cfg, backend="cpu")
    print(f"preset {a.preset} (E = {e}, K = {cfg.top_k}), {r.device}")
    print(f"{'case':<28} {'rust/call':>12} {'python/call':>12} {'overhead':>12}")
    x1 = rng.standard_normal((1, e), dtype=np.float32)
    rust, py = paired(lambda: r._r.bench_route_ns(x1, a.iters, 1), lambda: per_call(lambda: r.route(x1), a.iters, 1), a.repeats)
    print(f"{'cpu numpy T=1':<28} {rust / 1e3:>10.2f}us {py / 1e3:>10.2f}us {(py - rust) / 1e3:>10.2f}us")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        t1 = torch.from_numpy(x1)
        rust, pyt = paired(lambda: r._r.bench_route_ns(x1, a.iters, 1), lambda: per_call(lambda: r.route(t1), a.iters, 1), a.repeats)
        print(f"{'cpu torch T=1':<28} {rust / 1e3:>10.2f}us {pyt / 1e3:>10.2f}us {(pyt - rust) / 1e3:>10.2f}us")
    xb = rng.standard_normal((a.big, e), dtype=np.float32)
    it = 5
    rust, py = paired(lambda: r._r.bench_route_ns(xb, it, 1), lambda: per_call(lambda: r.route(xb), it, 1), a.repeats)
    print(f"{'cpu numpy T=' + str(a.big):<28} {rust / 1e6:>10.2f}ms {py / 1e6:>10.2f}ms {py / rust:>11.3f}x")

    if torch is None or a.no_cuda or not torch.cuda.is_available() or "cuda" not in m.compiled_backends():
        print("cuda: skipped (no torch, no CUDA device, or no CUDA backend in this build)")
        return
    from moe_router import _cuda

    g = m.Router(cfg, backend="cuda")
    dev = torch.device("cuda", 0)
    print(f"cuda device: {torch.cuda.get_device_name(0)}")
    for t, iters in ((1, a.iters), (a.big, 200)):
        x = torch.from_numpy(rng.standard_normal((t, e), dtype=np.float32)).to(dev)
        g.route(x)
        torch.cuda.synchronize()
        # Rust: the same launches enqueued from a loop inside the extension.
        d = _cuda._state(g).get(0, None)
        ids = torch.empty((t, cfg.top_k), dtype=torch.int32, device=dev)
        w = torch.empty((t, cfg.top_k), dtype=torch.float32, device=dev)
        s = _cuda._stream(0)
        def rust_batch():
            return d.launch.bench_ns("route", x.data_ptr(), "float32", t, e, e, ids.data_ptr(), w.data_ptr(),
                                     d.status.data_ptr(), s, iters)

        def py_batch():
            t0 = time.perf_counter_ns()
            for _ in range(iters):
                g.route(x)
            torch.cuda.synchronize()
            return (time.perf_counter_ns() - t0) / iters

        rust, py = paired(rust_batch, py_batch, a.repeats)
        print(
            f"{'cuda torch T=' + str(t) + ' (wall)':<28} {rust / 1e3:>10.2f}us {py / 1e3:>10.2f}us "
            f"{(py - rust) / 1e3:>10.2f}us ({py / rust:.3f}x)"
        )
    g.check()


if __name__ == "__main__":
    main()
