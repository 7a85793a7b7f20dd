"""RouterConfig: presets, Hugging Face and Megatron import, dict round trip, errors."""

import json
import pickle

import pytest

import moe_router as m


def test_preset_properties():
    cfg = m.preset("qwen3-moe")
    assert (cfg.num_experts, cfg.top_k) == (128, 8)
    assert cfg.numerics == "portable"
    assert "qwen3-moe" in m.preset_names()


def test_unknown_preset_lists_names():
    with pytest.raises(m.ConfigError, match="unknown preset") as e:
        m.preset("no-such-model")
    assert isinstance(e.value, ValueError)
    assert "deepseek-v3" in str(e.value)


def test_to_dict_round_trip_and_pickle():
    cfg = m.preset("deepseek-v3").with_expert_bias([0.0] * 256)
    d = cfg.to_dict()
    assert d["num_experts"] == 256 and d["top_k"] == 8
    assert m.RouterConfig.from_dict(d) == cfg
    assert m.RouterConfig.from_dict(json.dumps(d)) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_from_hf_config_path_dict_and_text(tmp_path):
    hf = {
        "model_type": "qwen3_moe",
        "num_experts": 64,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
    }
    p = tmp_path / "config.json"
    p.write_text(json.dumps(hf))
    a = m.RouterConfig.from_hf_config(str(p))
    b = m.RouterConfig.from_hf_config(hf)
    c = m.RouterConfig.from_hf_config(p)
    assert a == b == c
    assert (a.num_experts, a.top_k) == (64, 4)


def test_from_hf_config_unknown_model_type():
    with pytest.raises(m.ConfigError, match="unsupported model_type"):
        m.RouterConfig.from_hf_config({"model_type": "llama-but-not"})


def test_from_megatron():
    cfg = m.RouterConfig.from_megatron(
        {"num_moe_experts": 32, "moe_router_topk": 2, "moe_router_score_function": "sigmoid"}
    )
    assert (cfg.num_experts, cfg.top_k, cfg.score) == (32, 2, "sigmoid")
    with pytest.raises(m.ConfigError, match="moe_router_topk"):
        m.RouterConfig.from_megatron({"num_moe_experts": 32, "moe_router_topc": 2})


def test_with_numerics_and_bias_errors():
    cfg = m.preset("mixtral")
    assert cfg.with_numerics("native").numerics == "native"
    with pytest.raises(m.ConfigError):
        cfg.with_numerics("fast")
    with pytest.raises(m.ConfigError, match="sigmoid"):
        cfg.with_expert_bias([0.0] * cfg.num_experts)


def test_hf_moe_layers():
    hf = {"model_type": "deepseek_v3", "num_hidden_layers": 5, "first_k_dense_replace": 2,
          "n_routed_experts": 16, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
          "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
          "topk_method": "noaux_tc", "moe_layer_freq": 1}
    assert m.hf_moe_layers(hf) == [2, 3, 4]
