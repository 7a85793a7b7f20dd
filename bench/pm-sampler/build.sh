#!/usr/bin/env bash
# Builds pm_sampler (and pm_burn, the check workload, where nvcc exists) into the current
# directory, or into $OUT_DIR.
#
#   bash bench/pm-sampler/build.sh            # on the GPU machine: CUDA=/usr/local/cuda
#   CUDA=/path/to/toolkit bash bench/pm-sampler/build.sh
#   bash bench/pm-sampler/build.sh --check    # same, plus -Werror (compile check without a GPU)
#
# The toolkit layout is searched, not assumed: the CUPTI headers and libcupti live under
# extras/CUPTI/ in the runfile toolkit and under include/ and lib/ in NVIDIA's pip wheels. Without
# a libcuda to link against (no driver, no toolkit stub), the link uses a stub generated from the
# symbols pm_sampler needs; its soname is libcuda.so.1, so the binary still binds to the driver's
# library where one is installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CUDA="${CUDA:-/usr/local/cuda}"
OUT_DIR="${OUT_DIR:-$PWD}"
CXX="${CXX:-g++}"
werror=()
case "${1:-}" in
  "") ;;
  --check) werror=(-Werror) ;;
  *) echo "usage: [CUDA=DIR] [OUT_DIR=DIR] bash build.sh [--check]" >&2; exit 2 ;;
esac

[ -d "$CUDA" ] || { echo "build.sh: no CUDA toolkit at CUDA=$CUDA" >&2; exit 1; }
CUDA="$(cd "$CUDA" && pwd -P)"
echo "build.sh: CUDA toolkit: $CUDA"

# First directory among the arguments that holds file $1.
first_dir_with() {
  local file="$1"; shift
  local d
  for d in "$@"; do
    if [ -e "$d/$file" ]; then echo "$d"; return 0; fi
  done
  return 1
}

# The directory holding $1 anywhere under $CUDA (fallback when the usual places lack it).
search_dir_of() {
  find -L "$CUDA" -maxdepth 7 -name "$1" -print -quit 2>/dev/null | xargs -r dirname
}

cupti_inc="$(first_dir_with cupti_pmsampling.h "$CUDA/extras/CUPTI/include" "$CUDA/include" \
              "$CUDA"/targets/*/include || search_dir_of cupti_pmsampling.h)"
[ -n "$cupti_inc" ] || { echo "build.sh: cupti_pmsampling.h not found under $CUDA (CUPTI of CUDA 12.6+ needed)" >&2; exit 1; }
cuda_inc="$(first_dir_with cuda.h "$CUDA/include" "$CUDA"/targets/*/include || search_dir_of cuda.h)"
[ -n "$cuda_inc" ] || { echo "build.sh: cuda.h not found under $CUDA" >&2; exit 1; }
cupti_version="$(sed -n 's/^#define CUPTI_API_VERSION[[:space:]]*\([0-9]*\).*/\1/p' "$cupti_inc/cupti_version.h")"
echo "build.sh: cupti_pmsampling.h in $cupti_inc (CUPTI_API_VERSION $cupti_version)"
echo "build.sh: cuda.h in $cuda_inc"

# libcupti: the unversioned development link, else the versioned library itself.
find_cupti_lib() {
  local d f
  for d in "$@"; do
    [ -n "$d" ] && [ -d "$d" ] || continue
    for f in "$d/libcupti.so" "$d"/libcupti.so.[0-9]*; do
      if [ -e "$f" ]; then echo "$f"; return 0; fi
    done
  done
  return 1
}
cupti_lib="$(find_cupti_lib "$CUDA/extras/CUPTI/lib64" "$CUDA"/targets/*/lib "$CUDA/lib64" "$CUDA/lib" \
             || find_cupti_lib "$(search_dir_of 'libcupti.so*')" || true)"
[ -n "$cupti_lib" ] || { echo "build.sh: libcupti.so not found under $CUDA" >&2; exit 1; }
cupti_dir="$(dirname "$cupti_lib")"
echo "build.sh: libcupti: $cupti_lib"
if [ -e "$cupti_dir/libnvperf_host.so" ] && [ -e "$cupti_dir/libnvperf_target.so" ]; then
  echo "build.sh: libnvperf_host.so and libnvperf_target.so beside it (CUPTI loads them at run time)"
else
  echo "build.sh: warning: libnvperf_host.so / libnvperf_target.so not in $cupti_dir;" \
       "CUPTI's profiler calls will fail unless LD_LIBRARY_PATH finds them" >&2
fi

mkdir -p "$OUT_DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

flags=(-O2 -std=c++17 -Wall -Wextra "${werror[@]}" -I"$cuda_inc" -I"$cupti_inc")
echo "build.sh: $CXX ${flags[*]} -c pm_sampler.cpp"
"$CXX" "${flags[@]}" -c "$here/pm_sampler.cpp" -o "$tmp/pm_sampler.o"

# libcuda: the toolkit's link stub, a system libcuda.so, or a generated stub.
cuda_link=()
stub_dir="$(first_dir_with libcuda.so "$CUDA/lib64/stubs" "$CUDA"/targets/*/lib/stubs "$CUDA/lib/stubs" || true)"
if [ -n "$stub_dir" ]; then
  echo "build.sh: libcuda: toolkit stub in $stub_dir"
  cuda_link=(-L"$stub_dir" -lcuda)
elif sys_cuda="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? /{print $NF; exit}')" && [ -n "$sys_cuda" ]; then
  echo "build.sh: libcuda: $sys_cuda (system)"
  cuda_link=("$sys_cuda")
else
  echo "build.sh: libcuda: none found; linking against a generated stub (soname libcuda.so.1)"
  nm -u "$tmp/pm_sampler.o" | awk '$2 ~ /^cu[A-Z]/ {print "void " $2 "(void) {}"}' > "$tmp/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tmp/libcuda.so" "$tmp/libcuda_stub.c"
  cuda_link=(-L"$tmp" -lcuda)
fi

# DT_RPATH (not RUNPATH) to CUPTI's directory, so that the libraries CUPTI opens are found too.
"$CXX" -o "$OUT_DIR/pm_sampler" "$tmp/pm_sampler.o" "$cupti_lib" "${cuda_link[@]}" -ldl -lpthread \
  -Wl,--disable-new-dtags -Wl,-rpath,"$cupti_dir"
echo "build.sh: built $OUT_DIR/pm_sampler"

nvcc="$CUDA/bin/nvcc"
if [ -x "$nvcc" ]; then
  libdirs=()
  for d in "$CUDA/lib64" "$CUDA/lib" "$CUDA"/targets/*/lib; do [ -d "$d" ] && libdirs+=(-L"$d"); done
  "$nvcc" -O2 -std=c++17 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
    -Xcompiler "-Wall,-Wextra${werror:+,-Werror}" "${libdirs[@]}" -o "$OUT_DIR/pm_burn" "$here/pm_burn.cu"
  echo "build.sh: built $OUT_DIR/pm_burn (sm_90 + PTX)"
else
  echo "build.sh: no nvcc at $nvcc; pm_burn not built"
fi
