#!/usr/bin/env bash
# What the wgpu backend's tests need on a fresh CI machine (no GPU): a software adapter.
# Source it from .ci/run before `cargo test` (`. .ci/wgpu-env.sh`).
#
# - Mesa's llvmpipe through GL (EGL) is on the image already; wgpu enumerates it as
#   "llvmpipe (LLVM 15.0.6, 256 bits)" (backend Gl, type Cpu).
# - Mesa's lavapipe through Vulkan needs `mesa-vulkan-drivers libvulkan1`; installed here so the
#   tests run on the Vulkan path (SPIR-V, as on GPUs). The router prefers Vulkan over GL among
#   adapters of the same type, and MOE_ROUTER_WGPU_BACKEND=gl (or =vulkan) forces one.
# The install is best-effort: without it the tests run on llvmpipe (GL); with neither they print
# "skipped: <reason>" (they never pass silently).
lvp_icd=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json
if [ ! -e "$lvp_icd" ] || ! ldconfig -p | grep 'libvulkan.so.1 ' >/dev/null; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      mesa-vulkan-drivers libvulkan1) >/dev/null 2>&1 \
      || echo "wgpu-env: could not install lavapipe (mesa-vulkan-drivers libvulkan1); using GL llvmpipe"
  fi
fi
if [ -e "$lvp_icd" ]; then
  # Only lavapipe: keeps the loader from probing the Intel/Radeon ICDs on a machine without them.
  export VK_DRIVER_FILES="$lvp_icd"
  export VK_ICD_FILENAMES="$lvp_icd"
fi
# Headless GL: pick Mesa's software rasteriser without a display.
export LIBGL_ALWAYS_SOFTWARE=1
export EGL_PLATFORM=surfaceless
