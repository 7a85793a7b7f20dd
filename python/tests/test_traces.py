"""Traces: TraceWriter / Trace, convert, validate, diff and the engine importers."""

import base64

import numpy as np
import pytest

import moe_router as m


def dense(rng, t=12, l=3, k=4, e=16):
    return np.stack([np.stack([rng.permutation(e)[:k] for _ in range(l)]) for _ in range(t)]).astype(np.int32)


def write(path, cfg, arr, layers=None):
    t, l, k = arr.shape
    layers = list(range(l)) if layers is None else layers
    with m.TraceWriter(path, cfg, layers) as w:
        for li, lid in enumerate(layers):
            w.record(lid, arr[:, li, :])
    return layers


@pytest.fixture
def cfg():
    return m.RouterConfig.from_megatron({"num_moe_experts": 16, "moe_router_topk": 4})


def test_writer_and_trace_round_trip(tmp_path, rng, cfg):
    arr = dense(rng)
    p = tmp_path / "a.mrt"
    write(p, cfg, arr, layers=[1, 3, 5])
    tr = m.Trace.open(p)
    assert tr.layers == [1, 3, 5]
    assert (tr.num_experts, tr.top_k) == (16, 4)
    assert tr.fingerprint == cfg.fingerprint
    assert tr.sequences == [0]
    assert tr.ids(3).dtype == np.int32
    assert (tr.ids(3) == arr[:, 1, :]).all()
    assert (tr.to_numpy() == arr).all()


def test_record_in_pieces_sequences_and_positions(tmp_path, rng, cfg):
    arr = dense(rng, t=10, l=2)
    p = tmp_path / "b.mrt"
    w = m.TraceWriter(p, cfg, 2)
    # Two calls continue the positions of sequence 0.
    w.record(0, arr[:4, 0])
    w.record(0, arr[4:, 0])
    # Packed batch: rows of sequences 7 and 9, explicit positions.
    seq = np.array([7, 7, 9, 9, 9])
    pos = np.array([0, 1, 0, 1, 2])
    w.record(1, arr[:5, 1], seq_ids=seq, positions=pos)
    w.record(1, torch_or_numpy(arr[5:, 1]))
    w.close()
    w.close()  # no-op
    tr = m.Trace.open(p)
    assert tr.sequences == [0, 7, 9]
    assert (tr.ids(0, seq=0) == arr[:, 0]).all()
    assert (tr.ids(1, seq=9) == arr[2:5, 1]).all()
    with pytest.raises(ValueError, match="sequences"):
        tr.to_numpy()
    assert tr.to_numpy(seq=7).shape == (2, 2, 4)


def torch_or_numpy(a):
    try:
        import torch
    except ImportError:
        return a
    return torch.from_numpy(a)


def test_writer_rejects_invalid_rows(tmp_path, cfg):
    w = m.TraceWriter(tmp_path / "c.mrt", cfg, [0])
    bad = np.array([[0, 1, 2, 2]], np.int32)
    with pytest.raises(m.TraceError) as e:
        w.record(0, bad)
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(m.TraceError, match="16"):
        w.record(0, np.array([[0, 1, 2, 16]], np.int32))
    with pytest.raises(m.TraceError, match="layer 4"):
        w.record(4, np.array([[0, 1, 2, 3]], np.int32))
    w.close()
    with pytest.raises(m.TraceError, match="closed"):
        w.record(0, np.array([[0, 1, 2, 3]], np.int32))


def test_missing_rows_read_as_minus_one(tmp_path, cfg):
    p = tmp_path / "d.mrt"
    with m.TraceWriter(p, cfg, [0]) as w:
        w.record(0, np.array([[0, 1, 2, 3], [-1, -1, -1, -1], [4, 5, 6, 7]], np.int32))
    ids = m.Trace.open(p).ids(0)
    assert (ids[1] == -1).all() and (ids[2] == [4, 5, 6, 7]).all()


def test_convert_validate_diff(tmp_path, rng, cfg):
    arr = dense(rng)
    a = tmp_path / "a.mrt"
    write(a, cfg, arr)
    npy = tmp_path / "a.npy"
    msg = m.convert(a, npy)
    assert "converted" in msg
    assert (np.load(npy) == arr).all()
    back = tmp_path / "back.mrt"
    m.convert(npy, back, num_experts=16)
    v = m.validate(back)
    assert v["valid"] is True and v["format"] == "mrt"
    for key in ["checksum_failures", "out_of_range", "duplicates", "partial_missing", "all_zero_layers",
                "empty_layers", "errors", "errors_not_listed", "warnings", "coverage", "num_experts"]:
        assert key in v
    assert v["coverage"]["tokens"] == 12
    d = m.diff(a, back)
    assert d["router_mismatch_fraction"] == 0.0
    assert d["routers_compared"] == 12 * 3
    for key in ["token_any_layer_mismatch_fraction", "mean_mismatched_layers_per_token", "per_layer",
                "mean_overlap", "tokens_compared", "rows_only_in_a", "rows_only_in_b", "layers_only_in_a",
                "layers_only_in_b"]:
        assert key in d
    arr2 = arr.copy()
    arr2[0, 0] = arr2[0, 0][::-1]  # same set: not a mismatch
    arr2[1, 2, 0] = [e for e in range(16) if e not in arr2[1, 2]][0]
    np.save(tmp_path / "b.npy", arr2)
    d2 = m.diff(npy, tmp_path / "b.npy", num_experts=16)
    assert d2["router_mismatch_fraction"] == pytest.approx(1 / 36)
    assert m.diff(m.Trace.open(a), m.Trace.open(tmp_path / "b.npy", num_experts=16))["routers_compared"] == 36


def test_validate_reports_problems(tmp_path, rng):
    arr = dense(rng)
    arr[3, 1, 2] = arr[3, 1, 0]
    p = tmp_path / "dup.npy"
    np.save(p, arr)
    v = m.validate(p, num_experts=16)
    assert v["valid"] is False and v["duplicates"] == 1
    (tmp_path / "empty.npy").write_bytes(b"")
    assert m.validate(tmp_path / "empty.npy")["errors"][0]["kind"] == "empty"
    with pytest.raises(m.TraceError):
        m.validate(tmp_path / "nope.mrt")


def test_importers(tmp_path, rng):
    arr = dense(rng, t=6, l=2, k=2, e=8)
    # vLLM .npy
    np.save(tmp_path / "v.npy", arr)
    tr = m.import_vllm_npy(tmp_path / "v.npy", num_experts=8, layers=[3, 4])
    assert tr.layers == [3, 4] and (tr.to_numpy() == arr).all()
    tr2 = m.import_vllm_npy((tmp_path / "v.npy").read_bytes(), num_experts=8)
    assert (tr2.to_numpy() == arr).all()
    # SGLang: base64 of little-endian int32, flat [T, L, K]
    b64 = base64.b64encode(arr.astype("<i4").tobytes()).decode()
    tr = m.import_sglang(b64, num_layers=2, top_k=2, num_experts=8)
    assert (tr.to_numpy() == arr).all()
    # NeMo Gym nrlre1
    env = f"nrlre1:int16:6x2x2:{base64.b64encode(arr.astype('<i2').tobytes()).decode()}"
    assert (m.import_nrlre1(env, num_experts=8).to_numpy() == arr).all()
    # Fireworks R3/v1, prime-rl and safetensors, written by the exporters.
    r3 = tr.export("r3v1")
    assert (m.import_r3v1(r3, num_layers=2, num_experts=8).to_numpy() == arr).all()
    prl = tr.export("prime-rl")
    (tmp_path / "p.msgpack").write_bytes(prl)
    assert (m.import_prime_rl(tmp_path / "p.msgpack", num_experts=8).to_numpy() == arr).all()
    st = tr.export("safetensors")
    assert (m.import_safetensors(st).to_numpy() == arr).all()
    assert tr.export("nrlre1").startswith(b"nrlre1:")
    # Sanity: the same trace saved as .mrt and opened again.
    tr.save(tmp_path / "x.mrt")
    assert (m.Trace.open(tmp_path / "x.mrt").to_numpy() == arr).all()


def test_importer_errors(tmp_path, rng):
    arr = dense(rng, t=4, l=1, k=2, e=8)
    arr[2, 0] = [0, 0]
    np.save(tmp_path / "z.npy", arr)
    with pytest.raises(m.TraceError, match="twice|duplicate"):
        m.import_vllm_npy(tmp_path / "z.npy", num_experts=8)
    with pytest.raises(m.TraceError):
        m.import_sglang("not base64!!", num_layers=1, top_k=2)
    with pytest.raises(m.TraceError):
        m.Trace.open(tmp_path / "missing.mrt")
    with pytest.raises(ValueError, match="unknown format"):
        m.Trace.from_bytes(b"", "parquet")


def test_from_numpy_and_layers_strings(rng):
    arr = dense(rng, t=5, l=3, k=2, e=8)
    tr = m.Trace.from_numpy(arr.astype(np.int64), 8, layers=m.parse_layers("2-4"), seq=3, start=1)
    assert tr.layers == [2, 3, 4] and tr.sequences == [3]
    assert (tr.to_numpy()[1:] == arr).all() and (tr.to_numpy()[0] == -1).all()
    assert m.parse_layers("0,2,5-6") == [0, 2, 5, 6]
    assert m.parse_layers(3) == [0, 1, 2]


def test_validate_and_diff_equal_the_cli_json(cli, tmp_path, rng, cfg):
    import json

    arr = dense(rng)
    arr[3, 1, 2] = arr[3, 1, 0]
    np.save(tmp_path / "dup.npy", arr)
    good = dense(rng)
    write(tmp_path / "g.mrt", cfg, good)
    np.save(tmp_path / "g2.npy", dense(rng))
    for p in [tmp_path / "dup.npy", tmp_path / "g.mrt"]:
        r = cli("validate", p, "--num-experts", 16, "--json")
        assert json.loads(r.stdout) == m.validate(p, num_experts=16)
    r = cli("diff", tmp_path / "g.mrt", tmp_path / "g2.npy", "--num-experts", 16, "--json")
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)
    got = m.diff(tmp_path / "g.mrt", tmp_path / "g2.npy", num_experts=16)
    # Every key of the CLI's output, with the same value (a CLI binary older than the package
    # may lack keys added since).
    assert {k: got.get(k) for k in want} == want
