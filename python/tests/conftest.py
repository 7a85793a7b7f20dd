"""Shared fixtures of the moe_router tests."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def cli_path():
    """The moe-router CLI binary: $MOE_ROUTER_CLI, the workspace's target/{release,debug}, or PATH."""
    env = os.environ.get("MOE_ROUTER_CLI")
    if env and os.path.isfile(env):
        return env
    for p in (REPO / "target" / "release" / "moe-router", REPO / "target" / "debug" / "moe-router"):
        if p.is_file():
            return str(p)
    return shutil.which("moe-router")


@pytest.fixture
def cli():
    p = cli_path()
    if p is None:
        pytest.skip("the moe-router CLI is not built (cargo build -p moe-router-cli, or set MOE_ROUTER_CLI)")

    def run(*args):
        r = subprocess.run([p, *map(str, args)], capture_output=True, text=True)
        return r

    return run


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def spread_logits(rng, t, e, dtype=np.float32):
    """Logits without near ties: a permutation of a spaced grid plus small noise per row."""
    base = np.stack([rng.permutation(e) for _ in range(t)]).astype(np.float64) * 0.05
    return (base + rng.uniform(-0.004, 0.004, size=(t, e))).astype(dtype)
