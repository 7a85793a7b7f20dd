#!/usr/bin/env bash
# Compiles every CUDA kernel variant (routing, backward, statistics) through NVRTC (to sm_90 CUBIN, so ptxas runs too) without a
# GPU: the NVRTC shared library comes from PyPI's nvidia-cuda-nvrtc wheel (CUDA 13.0, the version
# of the GPU machine's driver). A kernel that fails to compile fails this script.
# Usage: .ci/nvrtc-check.sh [ARCH...]   (default sm_90; compute_XX stops at PTX)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
whl_dir=${NVRTC_WHEEL_DIR:-"$root/target/nvrtc-wheel"}
lib="$whl_dir/nvidia/cu13/lib"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
  mkdir -p "$whl_dir"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_17_x86_64 \
    --python-version 3.12 --dest "$whl_dir" "nvidia-cuda-nvrtc==13.0.*"
  (cd "$whl_dir" && python3 -m zipfile -e nvidia_cuda_nvrtc-*.whl .)
fi
[ -e "$lib/libnvrtc.so.13" ] || { echo "nvrtc-check: libnvrtc.so.13 not found in $lib" >&2; exit 1; }
cargo build --release -p moe-router-cuda --bin nvrtc-check
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" target/release/nvrtc-check "$@"
