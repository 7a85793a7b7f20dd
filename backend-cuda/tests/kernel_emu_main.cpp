// Runs one compiled variant of kernels/router.cu on the host. Requests on stdin, one after
// another: i64 header[16] = {replay, grid, block, smem, T, ld, E, K, G, gsel, gn, per, norm,
// has_bias, 0, 0}, f32 norm_param, f32 scale, [f32 bias[E]], logits (T*ld elements), [u32 ids
// [T*K] when replaying]. Reply: u64 status, u32 ids[T*K], f32 weights[T*K].
#include "kernel_emu.h"
#include <cstdio>
#include "../kernels/math.cu"
#include "../kernels/router.cu"
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#ifdef ROW_KERNELS
#define K_ROUTE row_route
#define K_REPLAY row_replay
#else
#define K_ROUTE CAT(tile_route_k, TILE_KMAX_N)
#define K_REPLAY CAT(tile_replay_k, TILE_KMAX_N)
#endif
template <class T>
static bool rd(T* p, size_t n) { return std::fread(p, sizeof(T), n, stdin) == n; }
int main() {
    long long h[16];
    while (rd(h, 16)) {
        float np[2];
        if (!rd(np, 2)) return 1;
        long long T = h[4], ld = h[5];
        int E = (int)h[6], K = (int)h[7];
        std::vector<float> bias(E);
        if (h[13] && !rd(bias.data(), E)) return 1;
        std::vector<logit_t> logits(T * ld + 8);
        if (T * ld > 0 && !rd(logits.data(), T * ld)) return 1;
        std::vector<u32> ids(T * K + 1, 0xdeadbeefu);
        if (h[0] && T * K > 0 && !rd(ids.data(), T * K)) return 1;
        std::vector<float> w(T * K + 1, -12345.0f);
        unsigned long long status = 0;
        Params p{};
        p.logits = (u64)(uintptr_t)logits.data();
        p.bias = h[13] ? (u64)(uintptr_t)bias.data() : 0;
        p.ids = (u64)(uintptr_t)ids.data();
        p.weights = (u64)(uintptr_t)w.data();
        p.status = (u64)(uintptr_t)&status;
        p.T = T;
        p.ld = ld;
        p.E = E;
        p.K = K;
        p.G = (int)h[8];
        p.gsel = (int)h[9];
        p.gn = (int)h[10];
        p.per = (int)h[11];
        p.norm = (int)h[12];
        p.norm_param = np[0];
        p.scale = np[1];
        if (T > 0) emu_launch(h[0] ? K_REPLAY : K_ROUTE, p, (unsigned)h[1], (unsigned)h[2], (size_t)h[3]);
        std::fwrite(&status, 8, 1, stdout);
        std::fwrite(ids.data(), 4, T * K, stdout);
        std::fwrite(w.data(), 4, T * K, stdout);
        std::fflush(stdout);
    }
    return 0;
}
