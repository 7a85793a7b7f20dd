"""moe_router.megatron.RouterReplay: Megatron-Core's unit tests (research/megatron.md §2.11)
ported, plus validation, the layer-count check and .mrt persistence."""

import numpy as np
import pytest

import moe_router as m

torch = pytest.importorskip("torch", reason="the Megatron shim's replay path gathers with torch")

from moe_router.megatron import RouterReplay, RouterReplayAction  # noqa: E402


@pytest.fixture(autouse=True)
def clean_registry():
    RouterReplay.clear_global_router_replay_instances()
    yield
    RouterReplay.clear_global_router_replay_instances()


def topk_routing(logits, topk, rr, pre_softmax):
    """A minimal Megatron ``topk_routing_with_score_function`` (softmax) driving the hook."""

    def compute_topk(scores, k, num_groups=None, group_topk=None):
        return torch.topk(scores, k, dim=1)

    if pre_softmax:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        probs, idx = rr.get_replay_topk(scores, topk, default_compute_topk=compute_topk)
    else:
        scores, idx = rr.get_replay_topk(logits, topk, default_compute_topk=compute_topk)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    routing_probs = torch.zeros_like(logits).scatter(1, idx, probs)
    routing_map = torch.zeros_like(logits).int().scatter(1, idx, 1).bool()
    return routing_probs, routing_map


def test_record_mode_softmax_post():
    rr = RouterReplay()
    rr.set_router_replay_action(RouterReplayAction.RECORD)
    logits = torch.randn(4, 6)
    probs, routing_map = topk_routing(logits, 2, rr, pre_softmax=False)
    rec = rr.get_recorded_indices()
    assert rec is not None
    assert torch.equal(rec, torch.topk(logits, 2, dim=1).indices)
    assert probs.shape == routing_map.shape == (4, 6)
    assert (routing_map.sum(dim=1) == 2).all()


def test_replay_forward_softmax_pre():
    rr = RouterReplay()
    logits = torch.randn(3, 5)
    target = torch.tensor([[1, 2], [0, 3], [2, 4]], dtype=torch.int64)
    rr.set_target_indices(target)
    rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    probs, routing_map = topk_routing(logits, 2, rr, pre_softmax=True)
    assert (routing_map.sum(dim=1) == 2).all()
    assert torch.equal(probs.gather(1, target), torch.softmax(logits, dim=-1).gather(1, target))


def test_replay_forward_softmax_post():
    rr = RouterReplay()
    logits = torch.randn(3, 6)
    target = torch.tensor([[1, 2], [0, 5], [3, 4]], dtype=torch.int64)
    rr.set_target_indices(target)
    rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    probs, routing_map = topk_routing(logits, 2, rr, pre_softmax=False)
    assert torch.equal(probs.gather(1, target), torch.softmax(logits.gather(1, target), dim=-1))
    assert (routing_map.sum(dim=1) == 2).all()


def test_global_set_get_clear_indices():
    r1, r2 = RouterReplay(), RouterReplay()
    t1 = torch.tensor([[0, 1], [2, 3]])
    t2 = torch.tensor([[4, 5], [6, 7]])
    RouterReplay.set_replay_data([t1, t2])
    assert torch.equal(r1.target_topk_idx, t1) and torch.equal(r2.target_topk_idx, t2)
    r1.record_indices(t1)
    r2.record_indices(t2)
    got = RouterReplay.get_recorded_data()
    assert torch.equal(got[0], t1) and torch.equal(got[1], t2)
    RouterReplay.clear_global_indices()
    assert r1.target_topk_idx is None and r2.recorded_topk_idx is None


def test_global_action_set_and_clear():
    r1, r2 = RouterReplay(), RouterReplay()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    assert r1.router_replay_action == r2.router_replay_action == RouterReplayAction.REPLAY_FORWARD
    RouterReplay.clear_global_router_replay_action()
    assert r1.router_replay_action is None and r2.router_replay_action is None


def test_set_replay_data_length_mismatch():
    RouterReplay()
    with pytest.raises(ValueError, match="layer-count mismatch"):
        RouterReplay.set_replay_data([torch.tensor([[0, 1]]), torch.tensor([[0, 1]])])


def test_replay_backward_is_fifo():
    rr = RouterReplay()
    a = torch.tensor([[0, 1], [1, 2]])
    b = torch.tensor([[2, 3], [3, 4]])
    rr.set_target_indices(a)
    rr.set_target_indices(b)
    rr.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
    scores = torch.randn(2, 6)
    assert torch.equal(rr.get_replay_topk(scores, 2)[1], a)
    assert torch.equal(rr.get_replay_topk(scores, 2)[1], b)
    with pytest.raises(m.RouteError, match="REPLAY_BACKWARD with no queued indices"):
        rr.get_replay_topk(scores, 2)


def test_validation_shapes_ranges_duplicates():
    rr = RouterReplay(num_experts=8)
    with pytest.raises(m.RouteError, match="out of range"):
        rr.set_target_indices(torch.tensor([[0, 8]]))
    with pytest.raises(m.RouteError, match="row 1 names expert 3 twice"):
        rr.set_target_indices(torch.tensor([[0, 1], [3, 3]]))
    with pytest.raises(m.RouteError, match="integers"):
        rr.set_target_indices(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(m.RouteError, match=r"\[num_tokens, topk\]"):
        rr.set_target_indices(torch.tensor([0, 1]))
    with pytest.raises(m.RouteError, match="out of range"):
        rr.set_target_indices(torch.tensor([[-1, 1]]))
    rr2 = RouterReplay()
    rr2.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    with pytest.raises(m.RouteError, match="without target indices"):
        rr2.get_replay_topk(torch.randn(2, 6), 2)
    rr2.set_target_indices(torch.tensor([[0, 1]]))  # one row for two tokens
    with pytest.raises(m.RouteError, match="1 rows but the router sees 2 tokens"):
        rr2.get_replay_topk(torch.randn(2, 6), 2)
    rr2.set_target_indices(torch.tensor([[0, 6], [1, 2]]))  # E taken from the scores: 6
    with pytest.raises(m.RouteError, match="out of range"):
        rr2.get_replay_topk(torch.randn(2, 6), 2)
    rr2.set_target_indices(torch.tensor([[0, 1, 2], [1, 2, 3]]))
    with pytest.raises(m.RouteError, match="topk = 2"):
        rr2.get_replay_topk(torch.randn(2, 6), 2)


def test_static_buffers():
    r1, r2 = RouterReplay(), RouterReplay()
    buf = torch.zeros(8, 2, 2, dtype=torch.int32)
    RouterReplay.set_global_static_buffers(buf)
    r1.record_indices(torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(buf[:2, 0], torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))
    assert r1.get_recorded_indices().shape == (2, 2)
    with pytest.raises(ValueError, match="layer-count mismatch"):
        RouterReplay.set_global_static_buffers(torch.zeros(8, 3, 2))
    RouterReplay.clear_global_static_buffers()
    assert r2.static_buffer is None


def test_persist_and_load_mrt(tmp_path):
    cfg = m.RouterConfig.from_megatron({"num_moe_experts": 8, "moe_router_topk": 2})
    layers = [RouterReplay(num_experts=8, layer_number=n) for n in (1, 3, 5)]
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    recorded = []
    for rr in layers:
        logits = torch.randn(5, 8)
        _, idx = rr.get_replay_topk(logits, 2)
        recorded.append(idx)
    p = tmp_path / "r2.mrt"
    RouterReplay.save_recorded_data(p, cfg)
    tr = m.Trace.open(p)
    assert tr.layers == [1, 3, 5]
    loaded = RouterReplay.load_replay_data(p)
    assert all(torch.equal(a, b) for a, b in zip(loaded, recorded))
    RouterReplay.clear_global_indices()
    RouterReplay.set_replay_data_from_trace(p)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    scores = torch.randn(5, 8)
    for rr, want in zip(layers, recorded):
        assert torch.equal(rr.get_replay_topk(scores, 2)[1], want)
    # A model with a different number of MoE layers is refused.
    RouterReplay()
    with pytest.raises(ValueError, match="layer-count mismatch: the trace has 3 MoE layers"):
        RouterReplay.load_replay_data(p)


def test_load_refuses_missing_rows(tmp_path):
    cfg = m.RouterConfig.from_megatron({"num_moe_experts": 8, "moe_router_topk": 2})
    RouterReplay()
    p = tmp_path / "gap.mrt"
    with m.TraceWriter(p, cfg, [0]) as w:
        w.record(0, np.array([[0, 1], [-1, -1], [2, 3]], np.int32))
    with pytest.raises(m.RouteError, match="position 1"):
        RouterReplay.load_replay_data(p)
    got = RouterReplay.load_replay_data(p, start=2, num_tokens=1)
    assert got[0].tolist() == [[2, 3]]


def test_packed_rows_round_trip(tmp_path):
    cfg = m.RouterConfig.from_megatron({"num_moe_experts": 8, "moe_router_topk": 2})
    layers = [RouterReplay(num_experts=8) for _ in range(2)]
    seq = torch.tensor([4, 4, 4, 9, 9])
    pos = torch.tensor([0, 1, 2, 5, 6])
    recs = [torch.topk(torch.randn(5, 8), 2).indices for _ in layers]
    for rr, rec in zip(layers, recs):
        rr.record_indices(rec)
    p = tmp_path / "packed.mrt"
    RouterReplay.save_recorded_data(p, cfg, seq_ids=seq, positions=pos)
    got = RouterReplay.load_replay_data(p, seq_ids=seq, positions=pos)
    assert all(torch.equal(a, b) for a, b in zip(got, recs))
    # Another packing of the same tokens reads the same rows.
    got2 = RouterReplay.load_replay_data(p, seq_ids=seq.flip(0), positions=pos.flip(0))
    assert all(torch.equal(a, b.flip(0)) for a, b in zip(got2, recs))
    with pytest.raises(m.RouteError, match="sequence 9, position 7"):
        RouterReplay.load_replay_data(p, seq_ids=[9], positions=[7])
