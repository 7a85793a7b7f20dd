// Host emulation of the CUDA features the routing kernels use, so that kernels/router.cu runs as
// plain C++ (one std::thread per CUDA thread, blocks one after another, barriers for
// __syncthreads/__syncwarp, static variables for __shared__). Compile with -ffp-contract=off.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x) alignas(x)
#define __shared__ static
struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;
inline char* g_dyn_smem;
#define DYN_SMEM(name) char* name = g_dyn_smem
inline std::barrier<>* g_block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_bars;
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline void __syncwarp() { g_warp_bars[threadIdx.x / 32]->arrive_and_wait(); }
inline std::vector<int> g_warp_votes;
// Every lane of the warp must call it (as the kernels do: warp-uniform control flow).
inline bool __any_sync(unsigned, bool pred) {
    const unsigned w = threadIdx.x / 32;
    g_warp_votes[threadIdx.x] = pred ? 1 : 0;
    __syncwarp();
    bool any = false;
    for (unsigned l = 0; l < 32 && w * 32 + l < g_warp_votes.size(); l++) any = any || g_warp_votes[w * 32 + l];
    __syncwarp();
    return any;
}
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
template <class T>
inline T __ldg(const T* p) { return *p; }
// Warp shuffles: every lane of the warp must call them (warp-uniform control flow).
inline std::vector<unsigned long long> g_warp_xchg;
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_warp_xchg[threadIdx.x] = bits;
    __syncwarp();
    unsigned long long o = g_warp_xchg[w * 32 + (lane ^ (unsigned)mask)];
    __syncwarp();
    T r;
    std::memcpy(&r, &o, sizeof(T));
    return r;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline double __longlong_as_double(long long u) { double f; std::memcpy(&f, &u, 8); return f; }
#define __expf(x) std::exp(x)
#define __fdividef(a, b) ((a) / (b))
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
inline int atomicMin(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
template <class P>
void emu_launch(void (*k)(P), P p, unsigned grid, unsigned block, size_t smem) {
    std::vector<char> dyn(smem + 64);
    g_dyn_smem = (char*)(((uintptr_t)dyn.data() + 63) & ~(uintptr_t)63);
    blockDim.x = block;
    gridDim.x = grid;
    for (unsigned b = 0; b < grid; b++) {
        std::barrier<> bar(block);
        g_block_bar = &bar;
        g_warp_bars.clear();
        for (unsigned w = 0; w < (block + 31) / 32; w++) g_warp_bars.emplace_back(new std::barrier<>(32));
        g_warp_votes.assign(((block + 31) / 32) * 32, 0);
        g_warp_xchg.assign(((block + 31) / 32) * 32, 0);
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; t++)
            ts.emplace_back([=] {
                threadIdx.x = t;
                blockIdx.x = b;
                k(p);
            });
        for (auto& t : ts) t.join();
    }
}
