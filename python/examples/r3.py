"""Rollout routing replay (R3) end to end, in Python.

1. Rollout: an "inference engine" computes router logits in bfloat16 and records every routing
   decision (sequence id, position, layer) to rollout.mrt.
2. Training: the "trainer" recomputes the logits in float32. Routed on its own it picks other
   experts for some (token, layer) routers (recorded to training.mrt); with replay it uses the
   rollout's ids and recomputes only their weights, differentiably (moe_router.torch.route), so
   the gradient of the training loss reaches the router's weights through the rollout's experts.
3. The two runs are compared (moe_router.diff: the R3 paper's metrics).

    python python/examples/r3.py [--out DIR]
"""

import argparse
import os

import numpy as np

import moe_router

try:
    import torch
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs torch (pip install torch)")
import moe_router.torch as mrt

E, K, HIDDEN, LAYERS, SEQS, TOKENS = 64, 6, 32, 4, 8, 48


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/r3-python")
    ap.add_argument("--backend", default="auto")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cfg = moe_router.RouterConfig.from_megatron(
        {"num_moe_experts": E, "moe_router_topk": K, "moe_router_score_function": "softmax"}
    )
    router = moe_router.Router(cfg, backend=a.backend)
    dev = torch.device("cuda") if router.backend == "cuda" else torch.device("cpu")
    print(f"router: {router.device}")

    g = torch.Generator().manual_seed(0)
    gates = [torch.randn(HIDDEN, E, generator=g) * 0.3 for _ in range(LAYERS)]  # router weights
    hidden = [torch.randn(TOKENS, HIDDEN, generator=g) for _ in range(SEQS)]       # per sequence
    layer_ids = list(range(1, 2 * LAYERS, 2))  # MoE layers 1, 3, 5, 7 (dense layers between)

    # 1. Rollout: bf16 logits, routes recorded per sequence, layer and position.
    rollout = os.path.join(a.out, "rollout.mrt")
    with moe_router.TraceWriter(rollout, cfg, layer_ids, producer="r3.py rollout") as w:
        for s, h in enumerate(hidden):
            for lid, gw in zip(layer_ids, gates):
                logits = (h.bfloat16() @ gw.bfloat16()).to(dev)
                ids, _ = router.route(logits)
                w.record(lid, ids, seq_ids=s, positions=torch.arange(TOKENS))

    # 2a. Training without replay: the trainer's own routes (f32 logits), recorded to compare.
    training = os.path.join(a.out, "training.mrt")
    with moe_router.TraceWriter(training, cfg, layer_ids, producer="r3.py trainer") as w:
        for s, h in enumerate(hidden):
            for lid, gw in zip(layer_ids, gates):
                ids, _ = router.route((h @ gw).to(dev))
                w.record(lid, ids, seq_ids=s)

    # 2b. One training step with replay: packed batch of all sequences, rollout ids forced,
    # weights differentiable with respect to the logits and so to the gate weights.
    trace = moe_router.Trace.open(rollout)
    params = [gw.clone().to(dev).requires_grad_() for gw in gates]
    x = torch.cat(hidden).to(dev)                                  # [SEQS * TOKENS, HIDDEN]
    expert_scale = torch.randn(E, generator=g).to(dev)              # stands in for expert outputs
    loss = torch.zeros((), device=dev)
    for lid, gw in zip(layer_ids, params):
        replay = torch.cat([torch.from_numpy(trace.ids(lid, seq=s)) for s in range(SEQS)]).to(dev)
        ids, weights = mrt.route(router, x @ gw, replay_ids=replay)
        assert torch.equal(ids.long(), replay.long())
        loss = loss + (weights * expert_scale[ids.long()]).sum()
    loss.backward()
    router.check()
    norms = [float(p.grad.norm()) for p in params]
    print(f"training step with replay: loss {float(loss.detach()):.4f}, gate grad norms " + ", ".join(f"{n:.4f}" for n in norms))
    with torch.no_grad():
        for p in params:
            p -= 0.01 * p.grad

    # 3. Compare: rollout vs the trainer's own routes, and rollout vs itself (what replay uses).
    d = moe_router.diff(rollout, training)
    print(
        f"rollout vs training (no replay): {d['router_mismatch_fraction']:.2%} of (token, layer) routers "
        f"differ, {d['token_any_layer_mismatch_fraction']:.2%} of tokens differ in at least one layer, "
        f"mean overlap {d['mean_overlap']:.4f}"
    )
    for row in d["per_layer"]:
        print(f"  layer {row['layer']}: mismatch {row['mismatch_fraction']:.2%}")
    same = moe_router.diff(rollout, rollout)
    print(f"with replay the trainer uses the rollout's ids: mismatch {same['router_mismatch_fraction']:.2%}")
    v = moe_router.validate(rollout)
    print(f"{rollout}: valid={v['valid']}, {v['coverage']['tokens']} tokens x {len(layer_ids)} layers")


if __name__ == "__main__":
    main()
