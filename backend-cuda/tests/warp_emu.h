// Host emulation of the warp-level CUDA features the warp kernels (kernels/router.cu, WARP_NE)
// use, on top of kernel_emu.h (one std::thread per CUDA thread): width-limited and indexed
// shuffles, ballots, vector types. Every lane of a warp must take part in each collective, as
// the kernels guarantee. __expf and __fdividef get a deterministic relative error (2^-17 and
// 2^-22 at most, the size of the hardware's) so that the pruning bounds are exercised.
#include "kernel_emu.h"
#include <algorithm>
#include <cstdint>
struct alignas(8) uint2 {
    unsigned x, y;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return uint2{a, b}; }
template <class T>
inline T emu_xchg(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    const unsigned w = threadIdx.x / 32;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_warp_xchg[threadIdx.x] = bits;
    __syncwarp();
    unsigned long long o = g_warp_xchg[w * 32 + (src_lane & 31u)];
    __syncwarp();
    T r;
    std::memcpy(&r, &o, sizeof(T));
    return r;
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned base = lane & ~(unsigned)(width - 1);
    return emu_xchg(v, base + ((unsigned)src & (unsigned)(width - 1)));
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned in = lane & (unsigned)(width - 1);
    T o = emu_xchg(v, in >= delta ? lane - delta : lane);
    return in >= delta ? o : v;
}
inline unsigned __ballot_sync(unsigned, bool pred) {
    const unsigned w = threadIdx.x / 32;
    g_warp_votes[threadIdx.x] = pred ? 1 : 0;
    __syncwarp();
    unsigned b = 0;
    for (unsigned l = 0; l < 32; l++)
        if (g_warp_votes[w * 32 + l]) b |= 1u << l;
    __syncwarp();
    return b;
}
static inline float emu_noise(float x, float scale) {
    unsigned u = __float_as_uint(x) * 2654435761u;
    u ^= u >> 15;
    u *= 2246822519u;
    u ^= u >> 13;
    return 1.0f + scale * ((float)(int)(u % 2001u) - 1000.0f) * 1e-3f;
}
#undef __expf
#undef __fdividef
static inline float emu_expf(float x) { return (float)std::exp((double)x) * emu_noise(x, 0x1p-17f); }
static inline float emu_fdividef(float a, float b) {
    if (std::fabs(b) > 0x1p126f) return 0.0f;
    return (a / b) * emu_noise(b, 0x1p-22f);
}
#define __expf(x) emu_expf(x)
#define __fdividef(a, b) emu_fdividef((a), (b))
