// Runs one compiled variant of kernels/backward.cu on the host (kernel_emu.h). Requests on stdin,
// one after another: i64 header[20] = {kernel (0 bwd_aux_counts, 1 bwd_grad_sparse,
// 2 bwd_grad_dense, 3 bwd_grad_rows8, 4 bwd_grad_rows16), grid, block, smem, T, E, K, norm, has_aux, has_seq, nseq, vec, warp_floats,
// off_pr, off_sc, off_tm, off_d, off_slot, rows8 variant (kernel 3: 0 default,
// 1 staged, 2 early, 3 late), 0}, f32 {norm_param, scale, zf, 0}, logits (T*E
// elements), u32 ids[T*K], f32 grad[T*K], [f32 aux[nseq*E]], [u32 row_seq[T]]. Reply: u64
// status, then u32 counts[nseq*E] (kernel 0) or f32 dz[T*E].
#include "kernel_emu.h"
#include <cstdio>
// Conversion toward zero (bwd_grad_rows' row division).
static inline int __float2int_rz(float x) { return (int)x; }
#include "../kernels/math.cu"
#include "../kernels/router.cu"
#include "../kernels/backward.cu"
template <class T>
static bool rd(T* p, size_t n) { return n == 0 || std::fread(p, sizeof(T), n, stdin) == n; }
int main() {
    long long h[20];
    while (rd(h, 20)) {
        float fp[4];
        if (!rd(fp, 4)) return 1;
        const long long T = h[4], E = h[5], K = h[6], nseq = h[10];
        std::vector<logit_t> logits(T * E + 16);
        // 16-byte aligned start for the vector path.
        logit_t* lp = (logit_t*)(((uintptr_t)logits.data() + 15) & ~(uintptr_t)15);
        if (!rd(lp, T * E)) return 1;
        std::vector<u32> ids(T * K + 1);
        if (!rd(ids.data(), T * K)) return 1;
        std::vector<float> grad(T * K + 1);
        if (!rd(grad.data(), T * K)) return 1;
        std::vector<float> aux(nseq * E + 1);
        if (h[8] && !rd(aux.data(), nseq * E)) return 1;
        std::vector<u32> seq(T + 1);
        if (h[9] && !rd(seq.data(), T)) return 1;
        std::vector<u32> counts(nseq * E + 1, 0);
        std::vector<float> dz(T * E + 4, -12345.0f);
        float* dzp = (float*)(((uintptr_t)dz.data() + 15) & ~(uintptr_t)15);
        for (long long i = 0; i < T * E; i++) dzp[i] = -12345.0f;
        unsigned long long status = 0;
        BwdParams p{};
        p.logits = (u64)(uintptr_t)lp;
        p.ids = (u64)(uintptr_t)ids.data();
        p.grad = (u64)(uintptr_t)grad.data();
        p.aux = h[8] ? (u64)(uintptr_t)aux.data() : 0;
        p.row_seq = h[9] ? (u64)(uintptr_t)seq.data() : 0;
        p.dz = (u64)(uintptr_t)dzp;
        p.counts = (u64)(uintptr_t)counts.data();
        p.status = (u64)(uintptr_t)&status;
        p.T = T;
        p.ld = E;
        p.E = (int)E;
        p.K = (int)K;
        p.norm = (int)h[7];
        p.norm_param = fp[0];
        p.scale = fp[1];
        p.zf = fp[2];
        p.vec = (int)h[11];
        p.warp_floats = (int)h[12];
        p.off_pr = (int)h[13];
        p.off_sc = (int)h[14];
        p.off_tm = (int)h[15];
        p.off_d = (int)h[16];
        p.off_slot = (int)h[17];
        void (*k)(BwdParams) = h[0] == 0   ? bwd_aux_counts
                               : h[0] == 1 ? bwd_grad_sparse
                               : h[0] == 2 ? bwd_grad_dense
                               : h[0] == 4 ? bwd_grad_rows16
                               : h[18] == 1 ? bwd_grad_rows8_staged
                               : h[18] == 2 ? bwd_grad_rows8_early
                               : h[18] == 3 ? bwd_grad_rows8_late
                                            : bwd_grad_rows8;
        if (T > 0) emu_launch(k, p, (unsigned)h[1], (unsigned)h[2], (size_t)h[3]);
        std::fwrite(&status, 8, 1, stdout);
        if (h[0] == 0) {
            std::fwrite(counts.data(), 4, nseq * E, stdout);
        } else {
            std::fwrite(dzp, 4, T * E, stdout);
        }
        std::fflush(stdout);
    }
    return 0;
}
