// Routing statistics (DESIGN §2 step 9), matching core/src/stats.rs: tokens per expert (exact),
// Megatron's aux-loss statistics and the z-loss (f64, within 1e-6 relative of the host).
//
// The prelude defines LOGIT_KIND (0 f32, 1 bf16, 2 f16). Logits are widened exactly to f32 and
// then to f64, without flushing subnormals (the host computes these in f64 from the same f32s).

typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef DYN_SMEM
#define DYN_SMEM(name) extern __shared__ __align__(16) char name[]
#endif

#if LOGIT_KIND == 0
typedef float logit_t;
#else
typedef unsigned short logit_t;
#endif

__device__ __forceinline__ float s_f16_to_f32(u32 h) {
    u32 sign = (h & 0x8000u) << 16;
    u32 ex = (h >> 10) & 0x1fu;
    u32 man = h & 0x3ffu;
    if (ex == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    if (ex == 0u) {
        float v = (float)man * __uint_as_float(0x33800000u);
        return __uint_as_float(__float_as_uint(v) | sign);
    }
    return __uint_as_float(sign | ((ex + 112u) << 23) | (man << 13));
}

__device__ __forceinline__ float s_load(const logit_t* row, int e) {
#if LOGIT_KIND == 0
    return row[e];
#elif LOGIT_KIND == 1
    return __uint_as_float(((u32)row[e]) << 16);
#else
    return s_f16_to_f32((u32)row[e]);
#endif
}

struct StatParams {
    u64 logits;    // logit_t [T, ld]
    u64 seq_of;    // int [T] sequence index of each row, or 0 (one sequence)
    u64 prob_sums; // f64 [nseq, E]
    u64 counts;    // u32 [nseq, E]
    u64 zacc;      // f64 [1]
    u64 status;    // u64 error word (same encoding as the router kernels)
    long long T;
    long long ld;
    int E;
    int K;
    int score;     // 0 softmax, 1 sigmoid, 2 sqrt-softplus
    int mode;      // 0 aux statistics, 1 z-loss
};

__device__ __forceinline__ void s_report(const StatParams& p, u64 key) {
    atomicMax((unsigned long long*)p.status, (unsigned long long)(~key));
}

__device__ __forceinline__ double block_reduce(double v, double* red, bool is_max) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) {
            double a = red[threadIdx.x], b = red[threadIdx.x + s];
            red[threadIdx.x] = is_max ? (b > a ? b : a) : a + b;
        }
        __syncthreads();
    }
    double r = red[0];
    __syncthreads();
    return r;
}

// One block per row (grid-stride). Dynamic shared memory: double s[E] | double red[blockDim].
// blockDim must be a power of two.
extern "C" __global__ void aux_stats(StatParams p) {
    DYN_SMEM(smem_raw);
    __shared__ int s_bad;
    double* s = (double*)smem_raw;
    double* red = s + p.E;
    const int E = p.E;
    for (long long row = blockIdx.x; row < p.T; row += gridDim.x) {
        const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
        if (threadIdx.x == 0) s_bad = 0x7fffffff;
        __syncthreads();
        double lm = -__longlong_as_double(0x7ff0000000000000ll);
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            float x = s_load(lr, e);
            u32 b = __float_as_uint(x);
            if (b == 0x7f800000u || (b & 0x7fffffffu) > 0x7f800000u) atomicMin(&s_bad, e * 2 + (b == 0x7f800000u ? 1 : 0));
            s[e] = (double)x;
            if ((double)x > lm) lm = (double)x;
        }
        __syncthreads();
        if (s_bad != 0x7fffffff) {
            if (threadIdx.x == 0) s_report(p, (1ull << 62) | ((u64)row << 22) | (u64)s_bad);
            __syncthreads();
            continue;
        }
        const double NEG_INF = -__longlong_as_double(0x7ff0000000000000ll);
        if (p.mode == 1 || p.score == 0) {
            double m = block_reduce(lm, red, true);
            if (m == NEG_INF) {
                if (threadIdx.x == 0) s_report(p, (1ull << 62) | ((u64)row << 22) | (1ull << 20));
                __syncthreads();
                continue;
            }
            double part = 0.0;
            for (int e = threadIdx.x; e < E; e += blockDim.x) {
                double ex = exp(s[e] - m);
                s[e] = ex;
                part += ex;
            }
            double sum = block_reduce(part, red, false);
            if (p.mode == 1) {
                if (threadIdx.x == 0) {
                    double lse = m + log(sum);
                    atomicAdd((double*)p.zacc, lse * lse);
                }
                __syncthreads();
                continue;
            }
            for (int e = threadIdx.x; e < E; e += blockDim.x) s[e] = s[e] / sum;
        } else {
            double part = 0.0;
            for (int e = threadIdx.x; e < E; e += blockDim.x) {
                double x = s[e];
                double v = p.score == 1 ? 1.0 / (1.0 + exp(-x)) : sqrt(fmax(x, 0.0) + log1p(exp(-fabs(x))));
                s[e] = v;
                part += v;
            }
            double sum = block_reduce(part, red, false);
            for (int e = threadIdx.x; e < E; e += blockDim.x) s[e] = s[e] / (sum + 1e-20);
        }
        __syncthreads();
        int seq = p.seq_of ? ((const int*)p.seq_of)[row] : 0;
        double* ps = (double*)p.prob_sums + (long long)seq * E;
        u32* cs = (u32*)p.counts + (long long)seq * E;
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            double me = s[e];
            atomicAdd(ps + e, me);
            int r = 0;
            for (int j = 0; j < E && r < p.K; j++) r += (s[j] > me || (s[j] == me && j < e)) ? 1 : 0;
            if (r < p.K) atomicAdd(cs + e, 1u);
        }
        __syncthreads();
    }
}

// Tokens per expert of ids [n] (ids >= E are ignored, as on the host).
extern "C" __global__ void tokens_per_expert(const u32* ids, long long n, int E, unsigned long long* counts) {
    DYN_SMEM(smem_raw);
    u32* local = (u32*)smem_raw;
    for (int e = threadIdx.x; e < E; e += blockDim.x) local[e] = 0u;
    __syncthreads();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        u32 id = ids[i];
        if (id < (u32)E) atomicAdd(local + id, 1u);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (local[e]) atomicAdd(counts + e, (unsigned long long)local[e]);
}
