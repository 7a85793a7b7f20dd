#!/usr/bin/env bash
# On the GPU machine (no Rust toolchain, no network): installs the abi3 wheel built here and
# carried in .device/python (with pytest's wheels), then runs the Python tests (the CUDA ones
# included), the bench and the example, with their output in $OUT. Build and carry, from the
# project root here:
#   (cd python && maturin build --release -o ../.device/python)
#   pip download pytest --only-binary=:all: -d .device/python
#   run: carry [".device"], command: bash python/gpu-run.sh
set -uo pipefail
W=${1:-.device/python}
OUT=${OUT:-/tmp/moe-router-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --force-reinstall "$W"/moe_router-*.whl
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --find-links "$W" pytest
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, moe_router; print('torch', torch.__version__, 'moe_router', moe_router.__version__, moe_router.compiled_backends())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -rs python/tests 2>&1 | tee "$OUT/pytest.txt"
rc=${PIPESTATUS[0]}
python3 python/benches/bench_route.py 2>&1 | tee "$OUT/bench.txt"
python3 python/examples/r3.py --out /tmp/r3-python 2>&1 | tee "$OUT/r3.txt"
exit "$rc"
