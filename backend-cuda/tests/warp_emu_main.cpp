// Runs one compiled variant of the warp kernels of kernels/router.cu on the host. Requests on
// stdin: i64 header[20] = {op (0 route, 1 replay, 2 replay with fallback rows), grid, block,
// smem, T, ld, E, K, G, gsel, gn, per, norm, has_bias, warp_w, warp_ncap, warp_gbytes,
// warp_flags, lpg, 0}, f32 norm_param, f32 scale, f32 delta, [f32 bias[E]], logits (T*ld
// elements), [u32 ids[T*K] for ops 1 and 2]. Reply: u64 status, u32 ids[T*K], f32 weights[T*K].
#include "warp_emu.h"
#include <cstdio>
#include "../kernels/math.cu"
#include "../kernels/router.cu"
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
template <class T>
static bool rd(T* p, size_t n) { return std::fread(p, sizeof(T), n, stdin) == n; }
int main() {
    long long h[20];
    while (rd(h, 20)) {
        float np[3];
        if (!rd(np, 3)) return 1;
        long long T = h[4], ld = h[5];
        int E = (int)h[6], K = (int)h[7];
        std::vector<float> bias(E);
        if (h[13] && !rd(bias.data(), E)) return 1;
        // 16-byte aligned logits, as device allocations are.
        std::vector<uint4> store((T * ld * sizeof(logit_t)) / 16 + 2);
        logit_t* logits = (logit_t*)store.data();
        if (T * ld > 0 && !rd(logits, T * ld)) return 1;
        std::vector<u32> ids(T * K + 1, 0xdeadbeefu);
        if (h[0] && T * K > 0 && !rd(ids.data(), T * K)) return 1;
        std::vector<float> w(T * K + 1, -12345.0f);
        unsigned long long status = 0;
        Params p{};
        p.logits = (u64)(uintptr_t)logits;
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
        p.delta = np[2];
        p.warp_w = (int)h[14];
        p.warp_ncap = (int)h[15];
        p.warp_gbytes = (int)h[16];
        p.warp_flags = (int)h[17];
        p.lpg = (int)h[18];
        void (*k)(Params) = h[0] == 0 ? CAT(warp_route_n, WARP_NE) : h[0] == 1 ? CAT(warp_replay_n, WARP_NE) : CAT(warp_replay_fb_n, WARP_NE);
        if (T > 0) emu_launch(k, p, (unsigned)h[1], (unsigned)h[2], (size_t)h[3]);
        std::fwrite(&status, 8, 1, stdout);
        std::fwrite(ids.data(), 4, T * K, stdout);
        std::fwrite(w.data(), 4, T * K, stdout);
        std::fflush(stdout);
    }
    return 0;
}
