// pm_burn: a GPU workload of known character, for checking pm_sampler on a new machine.
//
//   pm_sampler --out burn.csv -- ./pm_burn [SECONDS_PER_PHASE] > phases.txt
//   python3 bench/pm-sampler/summarize.py burn.csv --phases phases.txt
//
// It runs, one after the other, phases whose counter signatures are known in advance:
//
//   idle     nothing on the GPU                        SM active ~0, DRAM ~0
//   fma      FMA chains, every warp slot occupied      SM active ~100, issue high, DRAM ~0
//   lowocc   the same chains, one warp per SM          SM active ~100, warp slots ~1.6%, issue low
//   dram     copy between two 1 GiB buffers            DRAM read and write high
//   l2       copy between two 8 MiB buffers (in L2)    L2 high, DRAM low
//
// Being a separate process with its own CUDA context, it also shows whether PM sampling sees work
// that is not the sampler's own (the wgpu benches are separate processes, too). For each phase it
// prints one line to stdout:
//
//   pm_phase name=fma realtime_ns=A,B monotonic_ns=C,D globaltimer_ns=E,F
//
// with the host clocks and the GPU's %globaltimer at the phase's start and end, which
// summarize.py uses to cut the sample series into phases.

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>

#define CUDA_CHECK(call)                                                                 \
  do {                                                                                   \
    const cudaError_t err_ = (call);                                                     \
    if (err_ != cudaSuccess) {                                                           \
      fprintf(stderr, "pm_burn: %s failed: %s (%s)\n", #call, cudaGetErrorName(err_),    \
              cudaGetErrorString(err_));                                                 \
      exit(2);                                                                           \
    }                                                                                    \
  } while (0)

static uint64_t clock_ns(clockid_t id) {
  timespec ts{};
  clock_gettime(id, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

__global__ void read_globaltimer(unsigned long long* out) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  *out = t;
}

// Four independent FMA chains per thread; the store is conditional on a value the compiler
// cannot know, so the chains are not removed.
__global__ void fma_chains(float* sink, int iters) {
  float x0 = threadIdx.x * 1e-3f, x1 = x0 + 1.f, x2 = x0 + 2.f, x3 = x0 + 3.f;
  const float a = 0.9999f, b = 1e-4f;
#pragma unroll 16
  for (int i = 0; i < iters; ++i) {
    x0 = fmaf(x0, a, b);
    x1 = fmaf(x1, a, b);
    x2 = fmaf(x2, a, b);
    x3 = fmaf(x3, a, b);
  }
  const float s = x0 + x1 + x2 + x3;
  if (s == 1234.5f) sink[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

__global__ void copy4(const float4* __restrict__ in, float4* __restrict__ out, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = in[i];
}

struct Gpu {
  int sms = 0;
  int max_threads_per_sm = 0;
  unsigned long long* timer = nullptr;  // device word for %globaltimer
  float* sink = nullptr;
};

static unsigned long long globaltimer(const Gpu& g) {
  read_globaltimer<<<1, 1>>>(g.timer);
  CUDA_CHECK(cudaGetLastError());
  unsigned long long t = 0;
  CUDA_CHECK(cudaMemcpy(&t, g.timer, sizeof t, cudaMemcpyDeviceToHost));
  return t;
}

// Runs `launch` (one batch of work, synchronised) until `seconds` have passed and prints the
// phase line. An idle phase passes a null launch and sleeps instead.
template <typename Launch>
static void phase(const Gpu& g, const char* name, double seconds, Launch launch) {
  CUDA_CHECK(cudaDeviceSynchronize());
  const unsigned long long gpu0 = globaltimer(g);
  const uint64_t real0 = clock_ns(CLOCK_REALTIME), mono0 = clock_ns(CLOCK_MONOTONIC);
  const uint64_t until = mono0 + static_cast<uint64_t>(seconds * 1e9);
  uint64_t batches = 0;
  while (clock_ns(CLOCK_MONOTONIC) < until) {
    if (launch(g)) {
      CUDA_CHECK(cudaGetLastError());
      CUDA_CHECK(cudaDeviceSynchronize());
      ++batches;
    } else {
      timespec ts{0, 1000000};
      nanosleep(&ts, nullptr);
    }
  }
  const uint64_t real1 = clock_ns(CLOCK_REALTIME), mono1 = clock_ns(CLOCK_MONOTONIC);
  const unsigned long long gpu1 = globaltimer(g);
  printf("pm_phase name=%s realtime_ns=%llu,%llu monotonic_ns=%llu,%llu globaltimer_ns=%llu,%llu "
         "batches=%llu\n",
         name, (unsigned long long)real0, (unsigned long long)real1, (unsigned long long)mono0,
         (unsigned long long)mono1, gpu0, gpu1, (unsigned long long)batches);
  fflush(stdout);
}

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? atof(argv[1]) : 1.0;
  if (!(seconds > 0)) {
    fprintf(stderr, "usage: pm_burn [SECONDS_PER_PHASE]   (default 1)\n");
    return 2;
  }
  Gpu g;
  CUDA_CHECK(cudaSetDevice(0));
  CUDA_CHECK(cudaDeviceGetAttribute(&g.sms, cudaDevAttrMultiProcessorCount, 0));
  CUDA_CHECK(cudaDeviceGetAttribute(&g.max_threads_per_sm,
                                    cudaDevAttrMaxThreadsPerMultiProcessor, 0));
  CUDA_CHECK(cudaMalloc(&g.timer, sizeof(unsigned long long)));
  CUDA_CHECK(cudaMalloc(&g.sink, size_t(g.sms) * g.max_threads_per_sm * sizeof(float)));

  const size_t big = size_t(1) << 30, small = size_t(8) << 20;  // bytes per buffer
  float4 *big_in, *big_out, *small_in, *small_out;
  CUDA_CHECK(cudaMalloc(&big_in, big));
  CUDA_CHECK(cudaMalloc(&big_out, big));
  CUDA_CHECK(cudaMalloc(&small_in, small));
  CUDA_CHECK(cudaMalloc(&small_out, small));
  CUDA_CHECK(cudaMemset(big_in, 0, big));
  CUDA_CHECK(cudaMemset(small_in, 0, small));
  CUDA_CHECK(cudaDeviceSynchronize());

  const int full_blocks = g.sms * (g.max_threads_per_sm / 256);  // 256-thread blocks, all slots
  fprintf(stderr, "pm_burn: %d SMs, %d threads per SM, %.2f s per phase\n", g.sms,
          g.max_threads_per_sm, seconds);

  phase(g, "idle", seconds, [](const Gpu&) { return false; });
  phase(g, "fma", seconds, [&](const Gpu& gg) {
    fma_chains<<<full_blocks, 256>>>(gg.sink, 1 << 16);
    return true;
  });
  phase(g, "lowocc", seconds, [&](const Gpu& gg) {
    fma_chains<<<gg.sms, 32>>>(gg.sink, 1 << 18);
    return true;
  });
  phase(g, "dram", seconds, [&](const Gpu& gg) {
    for (int i = 0; i < 8; ++i)
      copy4<<<gg.sms * 8, 256>>>(big_in, big_out, big / sizeof(float4));
    return true;
  });
  phase(g, "l2", seconds, [&](const Gpu& gg) {
    for (int i = 0; i < 64; ++i)
      copy4<<<gg.sms * 8, 256>>>(small_in, small_out, small / sizeof(float4));
    return true;
  });
  phase(g, "idle_end", seconds / 2, [](const Gpu&) { return false; });

  CUDA_CHECK(cudaFree(big_in));
  CUDA_CHECK(cudaFree(big_out));
  CUDA_CHECK(cudaFree(small_in));
  CUDA_CHECK(cudaFree(small_out));
  CUDA_CHECK(cudaFree(g.sink));
  CUDA_CHECK(cudaFree(g.timer));
  return 0;
}
