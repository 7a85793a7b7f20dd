// Routing kernels: route (select + weigh) and replay (weigh given ids), in two shapes.
//
// - row_*  : one block per token. Keys of the row live in shared memory; selection is by rank
//            (the number of keys that beat a key), so every step is exact and parallel. Used for
//            small batches and for configs the tile kernels do not take.
// - tile_* : one thread per token. Each warp streams the rows of its 32 tokens through a private,
//            swizzled shared-memory tile (cp.async, NSTAGE chunks of 32 rows x 128 bytes in
//            flight), and every lane keeps its token's top-KMAX in registers. Used for large T.
//
// Ordering: every selection compares packed keys (ordered key bits << 32 | ~id), so "key
// descending, ties to the lower id" is one unsigned comparison; -0 and +0 compare equal.
// Errors: the lowest error key of the launch wins (atomicMax of its complement), which gives
// the reference router's precedence (replay id errors first, then rows in order).

// Replay ids of a row the router selects itself (a fallback row); never a valid expert id.
#define ROUTER_SELECTS 0xffffffffu

#define SM_BEFORE 0
#define SM_AFTER 1
#define SIGMOID 2
#define SQRT_SOFTPLUS 3

#if LOGIT_KIND == 0
typedef float logit_t;
#define LOGIT_BYTES 4
#else
typedef unsigned short logit_t;
#define LOGIT_BYTES 2
#endif

// Kernel parameters (mirrored by `Params` in src/kernels.rs).
struct Params {
    u64 logits;   // logit_t [T, ld]
    u64 bias;     // f32 [E] or 0
    u64 ids;      // u32 [T, K]: output of route, input of replay
    u64 weights;  // f32 [T, K]
    u64 tap;      // u32 record tap (row stride tap_ld) or 0
    u64 status;   // u64 error word
    long long T;
    long long ld;
    long long tap_ld;
    int E;
    int K;
    int G;     // groups (0: no group limit)
    int gsel;  // groups kept
    int gn;    // keys summed per group (1 for the max rule)
    int per;   // experts per group
    int norm;  // 0 none, 1 sum + eps, 2 sum clamped below
    float norm_param;
    float scale;
    int warp_w;       // warp kernels: lanes per token (a power of two, K <= W <= 32)
    int warp_ncap;    // warp kernels: candidates a token group's shared memory holds
    int warp_gbytes;  // warp kernels: bytes of shared memory per token group
    int warp_flags;   // warp kernels: WF_VEC | WF_PRUNE
    int lpg;          // warp kernels: lanes (chunks) per expert group
    float delta;      // warp kernels: bound on |cheap key - exact key| (portable sigmoid)
    int pad_;
};

// ---------------------------------------------------------------------------------------------
// Widening (exact), packing and errors

__device__ __forceinline__ float f16_bits_to_f32(u32 h) {
    u32 sign = (h & 0x8000u) << 16;
    u32 ex = (h >> 10) & 0x1fu;
    u32 man = h & 0x3ffu;
    if (ex == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    if (ex == 0u) {
        // man * 2^-24: exact (man < 2^10, power-of-two scale).
        float v = (float)man * __uint_as_float(0x33800000u);
        return __uint_as_float(__float_as_uint(v) | sign);
    }
    return __uint_as_float(sign | ((ex + 112u) << 23) | (man << 13));
}

// Widens one stored logit to f32 (exactly), then applies the mode's subnormal rule.
__device__ __forceinline__ float widen_bits(u32 raw) {
#if LOGIT_KIND == 0
    return M_FTZ(__uint_as_float(raw));
#elif LOGIT_KIND == 1
    return M_FTZ(__uint_as_float(raw << 16));
#else
    return M_FTZ(f16_bits_to_f32(raw));
#endif
}

__device__ __forceinline__ float load_logit(const logit_t* row, long long e) {
#if LOGIT_KIND == 0
    return widen_bits(__float_as_uint(row[e]));
#else
    return widen_bits((u32)row[e]);
#endif
}

// NaN and +inf are errors; -inf is a masked expert.
__device__ __forceinline__ bool bad_logit(float x) {
    u32 b = __float_as_uint(x);
    return b == 0x7f800000u || (b & 0x7fffffffu) > 0x7f800000u;
}

__device__ __forceinline__ u64 pack_key(float key, int id) {
    u32 b = __float_as_uint(key);
    if ((b & 0x7fffffffu) == 0u) b = 0u;
    u32 o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((u64)o << 32) | (u64)(0xffffffffu - (u32)id);
}
__device__ __forceinline__ float unpack_key(u64 p) {
    u32 o = (u32)(p >> 32);
    u32 b = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
    return __uint_as_float(b);
}
__device__ __forceinline__ int unpack_id(u64 p) { return (int)(0xffffffffu - (u32)p); }
// The high word of pack_key(-inf, id): packed keys above it hold a finite key (0 is empty).
#define NEG_INF_ORDERED 0x007fffffull

// Error keys: class (0 replay ids, 1 logits) | row | phase (0 non-finite, 1 all masked) |
// expert | 1 for +inf.
__device__ __forceinline__ u64 err_nonfinite(long long row, int code) {
    return (1ull << 62) | ((u64)row << 22) | (u64)code;
}
__device__ __forceinline__ u64 err_all_masked(long long row) { return (1ull << 62) | ((u64)row << 22) | (1ull << 20); }
__device__ __forceinline__ u64 err_ids(long long row) { return ((u64)row << 22); }
__device__ __forceinline__ void report(const Params& p, u64 key) {
    atomicMax((unsigned long long*)p.status, (unsigned long long)(~key));
}
// code for a bad logit at expert e: e * 2 + (1 for +inf)
__device__ __forceinline__ int bad_code(int e, float x) { return e * 2 + (__float_as_uint(x) == 0x7f800000u ? 1 : 0); }

// Selection key of a widened logit (steps 2-3), given the row max and sum for softmax-before.
__device__ __forceinline__ float key_of(const Params& p, int e, float x, float m, float S) {
    float k;
#if SCORE == SM_BEFORE
    k = M_DIV(M_EXP(x - m), S);
#elif SCORE == SM_AFTER
    k = x;
#elif SCORE == SIGMOID
    k = M_SIGMOID(x);
#else
    k = M_SQRT_SOFTPLUS(x);
#endif
    if (p.bias != 0ull) k = M_FTZ(k + M_FTZ(((const float*)p.bias)[e]));
    (void)m;
    (void)S;
    return k;
}

// Weights of K selected logits zs (slot order), steps 5-7. Returns false when every selected
// logit is -inf under softmax-after (the reference's AllMasked).
template <int KCAP>
__device__ __forceinline__ bool weights_of(const Params& p, const float (&zs)[KCAP], float m, float S, float (&w)[KCAP]) {
    const int K = p.K;
#if SCORE == SM_BEFORE
#pragma unroll (KCAP > 16 ? 1 : KCAP)
    for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
        if (j < K) w[j] = M_DIV(M_EXP(zs[j] - m), S);
#elif SCORE == SM_AFTER
    float mx = F32_NEG_INF;
#pragma unroll (KCAP > 16 ? 1 : KCAP)
    for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
        if (j < K && zs[j] > mx) mx = zs[j];
    if (mx == F32_NEG_INF) return false;
    float s = 0.0f;
#pragma unroll (KCAP > 16 ? 1 : KCAP)
    for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
        if (j < K) {
            w[j] = M_EXP(zs[j] - mx);
            s = s + w[j];
        }
#pragma unroll (KCAP > 16 ? 1 : KCAP)
    for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
        if (j < K) w[j] = M_DIV(w[j], s);
#elif SCORE == SIGMOID
#pragma unroll (KCAP > 16 ? 1 : KCAP)
    for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
        if (j < K) w[j] = M_SIGMOID(zs[j]);
#else
#pragma unroll (KCAP > 16 ? 1 : KCAP)
    for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
        if (j < K) w[j] = M_SQRT_SOFTPLUS(zs[j]);
#endif
    if (p.norm != 0) {
        float s = 0.0f;
#pragma unroll (KCAP > 16 ? 1 : KCAP)
        for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
            if (j < K) s = s + w[j];
        float d;
        if (p.norm == 1) {
            d = s + M_FTZ(p.norm_param);
        } else {
            float mn = M_FTZ(p.norm_param);
            d = s > mn ? s : mn;
        }
#pragma unroll (KCAP > 16 ? 1 : KCAP)
        for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
            if (j < K) w[j] = M_DIV(w[j], d);
    }
    float sc = M_FTZ(p.scale);
#pragma unroll (KCAP > 16 ? 1 : KCAP)
    for (int j = 0; j < (KCAP > 16 ? K : KCAP); j++)
        if (j < K) w[j] = M_FTZ(w[j] * sc);
    (void)m;
    (void)S;
    return true;
}

// One rule for every score function: a row whose logits are all -inf has no expert to score
// (softmax finds it on its own; sigmoid and sqrt-softplus would route on the bias alone). The row
// is only scanned (`load(e)`: its widened logit e) when the K chosen logits are -inf.
template <int KCAP, class Load>
__device__ __forceinline__ bool all_masked_row(const Params& p, const float (&zs)[KCAP], Load load) {
#if SCORE == SIGMOID || SCORE == SQRT_SOFTPLUS
    bool chosen = true;
#pragma unroll (KCAP > 16 ? 1 : KCAP)
    for (int j = 0; j < (KCAP > 16 ? p.K : KCAP); j++)
        if (j < p.K && zs[j] != F32_NEG_INF) chosen = false;
    if (!chosen) return false;
    for (int e = 0; e < p.E; e++)
        if (load(e) != F32_NEG_INF) return false;
    return true;
#else
    (void)p;
    (void)zs;
    (void)load;
    return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Row kernels: one block per token.
#ifdef ROW_KERNELS

// Dynamic shared memory: float z[E] | float kf[E] | u64 pk[E] | float gtop[G*gn] | float gs[G]
// | int keep[G] | int sel[K] | float red[blockDim]
__device__ __forceinline__ float block_max(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = F32_NEG_INF;
        for (int i = 0; i < (int)blockDim.x; i++)
            if (red[i] > m) m = red[i];
        red[0] = m;
    }
    __syncthreads();
    float m = red[0];
    __syncthreads();
    return m;
}

#define ROW_KCAP 64

struct RowSmem {
    float* z;
    float* kf;
    u64* pk;
    float* gtop;
    float* gs;
    int* keep;
    int* sel;
    float* red;
};

__device__ __forceinline__ RowSmem row_smem(const Params& p, char* base) {
    RowSmem s;
    int E = p.E;
    int G = p.G > 0 ? p.G : 1;
    int gn = p.gn > 0 ? p.gn : 1;
    s.pk = (u64*)base;
    s.z = (float*)(s.pk + E);
    s.kf = s.z + E;
    s.gtop = s.kf + E;
    s.gs = s.gtop + G * gn;
    s.keep = (int*)(s.gs + G);
    s.sel = s.keep + G;
    s.red = (float*)(s.sel + (p.K > 0 ? p.K : 1));
    return s;
}

// Loads and checks the row into z; softmax-before also gets max and sum. Returns false (after
// reporting) when the row is in error. Every thread returns the same value.
__device__ bool row_load(const Params& p, long long row, RowSmem& s, float& m, float& S, int* s_bad) {
    const int E = p.E;
    const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
    if (threadIdx.x == 0) *s_bad = 0x7fffffff;
    __syncthreads();
    float lm = F32_NEG_INF;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float x = load_logit(lr, e);
        s.z[e] = x;
        if (bad_logit(x)) atomicMin(s_bad, bad_code(e, x));
        if (x > lm) lm = x;
    }
    __syncthreads();
    int bad = *s_bad;
    if (bad != 0x7fffffff) {
        if (threadIdx.x == 0) report(p, err_nonfinite(row, bad));
        return false;
    }
    m = 0.0f;
    S = 0.0f;
#if SCORE == SM_BEFORE
    m = block_max(lm, s.red);
    if (m == F32_NEG_INF) {
        if (threadIdx.x == 0) report(p, err_all_masked(row));
        return false;
    }
    for (int e = threadIdx.x; e < E; e += blockDim.x) s.kf[e] = M_EXP(s.z[e] - m);
    __syncthreads();
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int e = 0; e < E; e++) acc = acc + s.kf[e];
        s.red[0] = acc;
    }
    __syncthreads();
    S = s.red[0];
    __syncthreads();
#else
    (void)lm;
#endif
    return true;
}

// Selects and weighs one row; the whole block takes part and is synchronised on return.
__device__ void row_route_one(const Params& p, long long row, RowSmem& s, int* s_bad) {
    const int E = p.E, K = p.K;
    float m, S;
    if (!row_load(p, row, s, m, S, s_bad)) {
        __syncthreads();
        return;
    }
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float k;
#if SCORE == SM_BEFORE
        k = M_DIV(s.kf[e], S);
        if (p.bias != 0ull) k = M_FTZ(k + M_FTZ(((const float*)p.bias)[e]));
#else
        k = key_of(p, e, s.z[e], m, S);
#endif
        s.kf[e] = k;
        s.pk[e] = pack_key(k, e);
    }
    __syncthreads();
    if (p.G > 0) {
        const int per = p.per, gn = p.gn;
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            int g = e / per;
            u64 me = s.pk[e];
            int r = 0;
            for (int j = g * per; j < (g + 1) * per; j++) r += s.pk[j] > me ? 1 : 0;
            if (r < gn) s.gtop[g * gn + r] = s.kf[e];
        }
        __syncthreads();
        for (int g = threadIdx.x; g < p.G; g += blockDim.x) {
            float acc = s.gtop[g * gn];
            for (int r = 1; r < gn; r++) acc = M_FTZ(acc + s.gtop[g * gn + r]);
            s.gs[g] = acc;
        }
        __syncthreads();
        for (int g = threadIdx.x; g < p.G; g += blockDim.x) {
            float me = s.gs[g];
            int r = 0;
            for (int h = 0; h < p.G; h++) r += (s.gs[h] > me || (s.gs[h] == me && h < g)) ? 1 : 0;
            s.keep[g] = r < p.gsel ? 1 : 0;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            if (!s.keep[e / per]) s.pk[e] = pack_key(F32_NEG_INF, e);
        __syncthreads();
    }
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        u64 me = s.pk[e];
        int r = 0;
        for (int j = 0; j < E; j++) r += s.pk[j] > me ? 1 : 0;
        if (r < K) s.sel[r] = e;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float zs[ROW_KCAP], w[ROW_KCAP];
        for (int j = 0; j < K; j++) zs[j] = s.z[s.sel[j]];
        if (!weights_of<ROW_KCAP>(p, zs, m, S, w) ||
            all_masked_row<ROW_KCAP>(p, zs, [&](int e) { return s.z[e]; })) {
            report(p, err_all_masked(row));
        } else {
            u32* ids = (u32*)p.ids + row * K;
            float* wo = (float*)p.weights + row * K;
            for (int j = 0; j < K; j++) {
                ids[j] = (u32)s.sel[j];
                wo[j] = w[j];
            }
            if (p.tap != 0ull) {
                u32* t = (u32*)p.tap + row * p.tap_ld;
                for (int j = 0; j < K; j++) t[j] = (u32)s.sel[j];
            }
        }
    }
    __syncthreads();
}

extern "C" __global__ void row_route(Params p) {
    DYN_SMEM(smem_raw);
    __shared__ int s_bad;
    RowSmem s = row_smem(p, smem_raw);
    for (long long row = blockIdx.x; row < p.T; row += gridDim.x) row_route_one(p, row, s, &s_bad);
}

extern "C" __global__ void row_replay(Params p) {
    DYN_SMEM(smem_raw);
    __shared__ int s_bad;
    __shared__ int s_idbad;
    RowSmem s = row_smem(p, smem_raw);
    const int E = p.E, K = p.K;
    for (long long row = blockIdx.x; row < p.T; row += gridDim.x) {
        const u32* ids = (const u32*)p.ids + row * K;
        if (ids[0] == ROUTER_SELECTS) {
            // A fallback row of a replay: the router selects it (ids written in place).
            row_route_one(p, row, s, &s_bad);
            continue;
        }
        if (threadIdx.x == 0) s_idbad = 0;
        __syncthreads();
        for (int j = threadIdx.x; j < K; j += blockDim.x) {
            u32 id = ids[j];
            bool bad = id >= (u32)E;
            for (int jj = 0; jj < j; jj++) bad = bad || ids[jj] == id;
            if (bad) s_idbad = 1;
        }
        __syncthreads();
        if (s_idbad) {
            if (threadIdx.x == 0) report(p, err_ids(row));
            __syncthreads();
            continue;
        }
        float m, S;
        if (!row_load(p, row, s, m, S, &s_bad)) {
            __syncthreads();
            continue;
        }
        if (threadIdx.x == 0) {
            float zs[ROW_KCAP], w[ROW_KCAP];
            for (int j = 0; j < K; j++) zs[j] = s.z[ids[j]];
            if (!weights_of<ROW_KCAP>(p, zs, m, S, w) ||
                all_masked_row<ROW_KCAP>(p, zs, [&](int e) { return s.z[e]; })) {
                report(p, err_all_masked(row));
            } else {
                float* wo = (float*)p.weights + row * K;
                for (int j = 0; j < K; j++) wo[j] = w[j];
            }
        }
        __syncthreads();
    }
}

#endif  // ROW_KERNELS

// ---------------------------------------------------------------------------------------------
// Tile kernels: one thread per token, warp-private shared-memory tiles.
#ifdef TILE_KMAX_N

#define TILE_WARPS 4
#define NSTAGE 3
#define CHUNK 128                       // bytes of one row per chunk
#define TILE_BYTES (32 * CHUNK)         // one chunk of the warp's 32 rows
#define EPC (CHUNK / LOGIT_BYTES)       // elements per chunk
#define GS_MAX 8                        // most groups kept by the tile kernels

__device__ __forceinline__ u32 smem_addr(const void* p) {
#ifdef __CUDA_ARCH__
    u32 a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
#else
    return 0;
#endif
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef __CUDA_ARCH__
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
#else
    if (valid) {
        for (int i = 0; i < 16; i++) ((char*)dst)[i] = ((const char*)src)[i];
    } else {
        for (int i = 0; i < 16; i++) ((char*)dst)[i] = 0;
    }
#endif
}
__device__ __forceinline__ void cp_commit() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Warp-cooperative load of chunk c of rows row0..row0+31 into a tile: row r's 16-byte piece q
// goes to r*128 + ((q ^ (r & 7)) * 16), so that lane l reading row l is conflict-free.
__device__ __forceinline__ void load_chunk(char* tile, const Params& p, long long row0, int c, int lane) {
    const char* base = (const char*)p.logits;
    const long long row_bytes = p.ld * LOGIT_BYTES;
    const int valid = p.E * LOGIT_BYTES;
    const int q = lane & 7;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int r = i * 4 + (lane >> 3);
        long long row = row0 + r;
        int off = c * CHUNK + q * 16;
        bool v = row < p.T && off < valid;
        const char* src = v ? base + row * row_bytes + off : base;
        cp_async16(tile + r * CHUNK + ((q ^ (r & 7)) << 4), src, v);
    }
}

// Streams the lane's row through the warp's tiles, calling f(e, x) for every expert in order.
template <class F>
__device__ __forceinline__ void stream_row(char* tiles, const Params& p, long long row0, int lane, F&& f) {
    const int nch = (p.E * LOGIT_BYTES + CHUNK - 1) / CHUNK;
#pragma unroll
    for (int s = 0; s < NSTAGE - 1; s++) {
        if (s < nch) load_chunk(tiles + s * TILE_BYTES, p, row0, s, lane);
        cp_commit();
    }
    for (int c = 0; c < nch; c++) {
        int nc = c + NSTAGE - 1;
        if (nc < nch) load_chunk(tiles + (nc % NSTAGE) * TILE_BYTES, p, row0, nc, lane);
        cp_commit();
        cp_wait<NSTAGE - 1>();
        __syncwarp();
        const char* t = tiles + (c % NSTAGE) * TILE_BYTES + lane * CHUNK;
        const int e0 = c * EPC;
#pragma unroll 1
        for (int q = 0; q < 8; q++) {
            uint4 v = *(const uint4*)(t + ((q ^ (lane & 7)) << 4));
            u32 w4[4] = {v.x, v.y, v.z, v.w};
#if LOGIT_BYTES == 4
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int e = e0 + q * 4 + j;
                if (e < p.E) f(e, widen_bits(w4[j]));
            }
#else
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int e = e0 + q * 8 + j;
                u32 raw = (j & 1) ? (w4[j >> 1] >> 16) : (w4[j >> 1] & 0xffffu);
                if (e < p.E) f(e, widen_bits(raw));
            }
#endif
        }
        __syncwarp();
    }
    cp_wait<0>();
    __syncwarp();
}

// Inserts v into the descending list t (packed keys; 0 is the empty sentinel).
template <int N>
__device__ __forceinline__ void insert_top(u64 (&t)[N], u64 v) {
    if (v > t[N - 1]) {
#pragma unroll
        for (int i = N - 1; i > 0; i--) t[i] = (v > t[i - 1]) ? t[i - 1] : (v > t[i] ? v : t[i]);
        t[0] = v > t[0] ? v : t[0];
    }
}

template <int KMAX>
__device__ void tile_weigh_given(const Params& p, long long row, int bad, float m, float S);

// Route (FB = false), or the routing half of a replay with fallback rows (FB = true): every lane
// selects, then a lane whose row has replay ids weighs those instead (tile_weigh_given).
template <int KMAX, bool FB>
__device__ void tile_route_impl(const Params& p) {
    DYN_SMEM(smem_raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    char* tiles = smem_raw + warp * (NSTAGE * TILE_BYTES);
    const long long row0 = ((long long)blockIdx.x * TILE_WARPS + warp) * 32;
    const long long row = row0 + lane;
    const int E = p.E;
    int bad = 0x7fffffff;
    float m = 0.0f, S = 0.0f;
#if SCORE == SM_BEFORE
    m = F32_NEG_INF;
    stream_row(tiles, p, row0, lane, [&](int e, float x) {
        if (bad_logit(x) && bad == 0x7fffffff) bad = bad_code(e, x);
        if (x > m) m = x;
    });
    stream_row(tiles, p, row0, lane, [&](int e, float x) {
        (void)e;
        S = S + M_EXP(x - m);
    });
#endif
    u64 top[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; j++) top[j] = 0ull;
    if (p.G == 0) {
        stream_row(tiles, p, row0, lane, [&](int e, float x) {
#if SCORE != SM_BEFORE
            if (bad_logit(x) && bad == 0x7fffffff) bad = bad_code(e, x);
#endif
            insert_top<KMAX>(top, pack_key(key_of(p, e, x, m, S), e));
        });
    } else {
        // Per group: the group's top-KMAX in registers; at the group's end its score (sum of
        // the top gn keys, in order) enters the top-GS_MAX groups and its list goes to shared
        // memory. The kept groups' lists are merged afterwards.
        u64* glist = (u64*)(smem_raw + TILE_WARPS * NSTAGE * TILE_BYTES) + (long long)warp * p.G * KMAX * 32;
        u64 cur[KMAX];
        u64 gbest[GS_MAX];
#pragma unroll
        for (int j = 0; j < KMAX; j++) cur[j] = 0ull;
#pragma unroll
        for (int j = 0; j < GS_MAX; j++) gbest[j] = 0ull;
        int cnt = 0, g = 0;
        const int per = p.per, gn = p.gn;
        stream_row(tiles, p, row0, lane, [&](int e, float x) {
#if SCORE != SM_BEFORE
            if (bad_logit(x) && bad == 0x7fffffff) bad = bad_code(e, x);
#endif
            insert_top<KMAX>(cur, pack_key(key_of(p, e, x, m, S), e));
            if (++cnt == per) {
                float acc = unpack_key(cur[0]);
#pragma unroll
                for (int j = 1; j < KMAX; j++)
                    if (j < gn) acc = M_FTZ(acc + unpack_key(cur[j]));
                insert_top<GS_MAX>(gbest, pack_key(acc, g));
#pragma unroll
                for (int j = 0; j < KMAX; j++) {
                    glist[(g * KMAX + j) * 32 + lane] = cur[j];
                    cur[j] = 0ull;
                }
                cnt = 0;
                g++;
            }
        });
#pragma unroll
        for (int i = 0; i < GS_MAX; i++) {
            if (i < p.gsel) {
                int gk = unpack_id(gbest[i]);
#pragma unroll
                for (int j = 0; j < KMAX; j++) insert_top<KMAX>(top, glist[(gk * KMAX + j) * 32 + lane]);
            }
        }
        // Fewer than K finite keys in the kept groups: the reference fills the remaining slots
        // with the lowest ids among every expert whose key is -inf, the dropped groups' experts
        // included (DESIGN §2 steps 3-4), not only the kept groups' -inf experts. Rare; the
        // lane walks the ids once. (Registers are indexed by unrolled loops only.)
        int finite = 0;
#pragma unroll
        for (int j = 0; j < KMAX; j++)
            if (j < p.K && (top[j] >> 32) > NEG_INF_ORDERED) finite++;
        if (finite < p.K) {
            int slot = finite;
            for (int e = 0; e < E && slot < p.K; e++) {
                bool taken = false;
#pragma unroll
                for (int j = 0; j < KMAX; j++) taken = taken || (j < finite && unpack_id(top[j]) == e);
                if (taken) continue;
#pragma unroll
                for (int j = 0; j < KMAX; j++)
                    if (j == slot) top[j] = pack_key(F32_NEG_INF, e);
                slot++;
            }
        }
    }
    if (row >= p.T) return;
    if (FB && ((const u32*)p.ids)[row * p.K] != ROUTER_SELECTS) {
        tile_weigh_given<KMAX>(p, row, bad, m, S);
        return;
    }
    if (bad != 0x7fffffff) {
        report(p, err_nonfinite(row, bad));
        return;
    }
#if SCORE == SM_BEFORE
    if (m == F32_NEG_INF) {
        report(p, err_all_masked(row));
        return;
    }
#endif
    const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
    float zs[KMAX], w[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; j++) zs[j] = (j < p.K) ? load_logit(lr, unpack_id(top[j])) : 0.0f;
    if (!weights_of<KMAX>(p, zs, m, S, w) || all_masked_row<KMAX>(p, zs, [&](int e) { return load_logit(lr, e); })) {
        report(p, err_all_masked(row));
        return;
    }
    u32* ids = (u32*)p.ids + row * p.K;
    float* wo = (float*)p.weights + row * p.K;
#pragma unroll
    for (int j = 0; j < KMAX; j++)
        if (j < p.K) {
            ids[j] = (u32)unpack_id(top[j]);
            wo[j] = w[j];
        }
    if (p.tap != 0ull) {
        u32* t = (u32*)p.tap + row * p.tap_ld;
#pragma unroll
        for (int j = 0; j < KMAX; j++)
            if (j < p.K) t[j] = (u32)unpack_id(top[j]);
    }
    (void)E;
}

template <int KMAX>
__device__ void tile_replay_impl(const Params& p) {
    DYN_SMEM(smem_raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    char* tiles = smem_raw + warp * (NSTAGE * TILE_BYTES);
    const long long row0 = ((long long)blockIdx.x * TILE_WARPS + warp) * 32;
    const long long row = row0 + lane;
    const bool active = row < p.T;
    int bad = 0x7fffffff;
    float m = F32_NEG_INF, S = 0.0f;
    stream_row(tiles, p, row0, lane, [&](int e, float x) {
        if (bad_logit(x) && bad == 0x7fffffff) bad = bad_code(e, x);
        if (x > m) m = x;
    });
#if SCORE == SM_BEFORE
    stream_row(tiles, p, row0, lane, [&](int e, float x) {
        (void)e;
        S = S + M_EXP(x - m);
    });
#endif
    if (!active) return;
#if SCORE != SM_BEFORE
    m = 0.0f;
#endif
    tile_weigh_given<KMAX>(p, row, bad, m, S);
}

// Weighs the replay ids of `row` (validated here) from the row's statistics: `bad` (first
// non-finite logit, or 0x7fffffff), and for softmax before top-K the row maximum m and the sum S.
template <int KMAX>
__device__ void tile_weigh_given(const Params& p, long long row, int bad, float m, float S) {
    const u32* ids = (const u32*)p.ids + row * p.K;
    u32 id[KMAX];
    bool idbad = false;
#pragma unroll
    for (int j = 0; j < KMAX; j++) {
        id[j] = (j < p.K) ? ids[j] : 0u;
        if (j < p.K) {
            idbad = idbad || id[j] >= (u32)p.E;
#pragma unroll
            for (int jj = 0; jj < j; jj++) idbad = idbad || id[jj] == id[j];
        }
    }
    if (idbad) {
        report(p, err_ids(row));
        return;
    }
    if (bad != 0x7fffffff) {
        report(p, err_nonfinite(row, bad));
        return;
    }
#if SCORE == SM_BEFORE
    if (m == F32_NEG_INF) {
        report(p, err_all_masked(row));
        return;
    }
#endif
    const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
    float zs[KMAX], w[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; j++) zs[j] = (j < p.K) ? load_logit(lr, id[j]) : 0.0f;
    if (!weights_of<KMAX>(p, zs, m, S, w) || all_masked_row<KMAX>(p, zs, [&](int e) { return load_logit(lr, e); })) {
        report(p, err_all_masked(row));
        return;
    }
    float* wo = (float*)p.weights + row * p.K;
#pragma unroll
    for (int j = 0; j < KMAX; j++)
        if (j < p.K) wo[j] = w[j];
}

// Replay with fallback rows (replay ids ROUTER_SELECTS): a warp with a fallback row selects
// every row and weighs the replayed rows from the same pass; other warps only replay.
template <int KMAX>
__device__ void tile_replay_fb_impl(const Params& p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long row = ((long long)blockIdx.x * TILE_WARPS + warp) * 32 + lane;
    const bool fb = row < p.T && ((const u32*)p.ids)[row * p.K] == ROUTER_SELECTS;
    if (__any_sync(0xffffffffu, fb)) {
        tile_route_impl<KMAX, true>(p);
    } else {
        tile_replay_impl<KMAX>(p);
    }
}

#define TILE_KERNELS(KM)                                                                          \
    extern "C" __global__ void __launch_bounds__(TILE_WARPS * 32) tile_route_k##KM(Params p) {   \
        tile_route_impl<KM, false>(p);                                                            \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(TILE_WARPS * 32) tile_replay_k##KM(Params p) {  \
        tile_replay_impl<KM>(p);                                                                  \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(TILE_WARPS * 32) tile_replay_fb_k##KM(Params p) { \
        tile_replay_fb_impl<KM>(p);                                                               \
    }

// Indirection so that TILE_KMAX_N expands before ## pastes it.
#define TILE_KERNELS_(KM) TILE_KERNELS(KM)
TILE_KERNELS_(TILE_KMAX_N)
#endif  // TILE_KMAX_N

// ---------------------------------------------------------------------------------------------
// Warp kernels: a group of W lanes per token (W a power of two, K <= W <= 32; 32 / W tokens per
// warp, one launch per call, no block barriers). Lane l of a group owns chunks l, l + W, l + 2W,
// ... of WARP_VEC consecutive experts (one 16-byte load per chunk, at most WARP_NE experts per
// lane), so a warp's loads of a row are coalesced and the keys stay in registers.
//
// Selection without a sort: tau = the K-th largest of the group's lane maxima (a bitonic sort of
// W values by shuffles) is a lower bound of the K-th largest key, so the keys >= tau are at least
// K candidates and hold the top K (about K + 2 of them on random logits). The candidates are
// compacted into the group's shared memory and ranked exactly by their packed keys (key
// descending, ties to the lower id), one candidate per lane. Group limits: a group's top-n keys
// are merged by shuffles over the group's lanes, the group scores ranked in shared memory.
//
// Portable sigmoid (WARP_PRUNE): the keys are first computed cheaply (hardware exp and division),
// within delta (Params.delta, set by the host from the bias) of the exact keys. Then the kept
// groups are exact when the gap between the last kept and the first dropped cheap group score
// exceeds the score's error bound, and the exact top K is among the experts whose cheap key is
// >= tau - 2 delta (tau: the K-th largest cheap key or less): only those get the exact (software)
// key. When a group gap is too small the warp computes every exact key.
//
// Rare cases take an exact slow path: more candidates than the group's shared memory holds
// (heavy ties, masked rows) select by K rounds of a group arg-max over the packed keys.
//
// Collectives (shuffles, votes, __syncwarp) are executed by all 32 lanes with the full mask:
// every branch around them is warp-uniform; per-group decisions only select values.
#ifdef WARP_NE

#define WARP_VEC ((16 / LOGIT_BYTES) < WARP_NE ? (16 / LOGIT_BYTES) : WARP_NE)  // experts per chunk
#define WARP_CPL (WARP_NE / WARP_VEC)                                           // chunks per lane
#define WARP_WORDS ((WARP_VEC * LOGIT_BYTES) / 4)                              // u32 words per chunk
#define WARP_GN_MAX 4                                                            // top-n of a group score
#define WARP_FULL 0xffffffffu
#define WF_VEC 1    // Params.warp_flags: rows are read with vector loads
#define WF_PRUNE 2  // Params.warp_flags: select on cheap keys first (portable sigmoid)
#define WARP_PRUNE (PORTABLE && SCORE == SIGMOID)

#define WOP_ROUTE 0
#define WOP_REPLAY 1
#define WOP_REPLAY_FB 2

struct WarpRaw {
    u32 w[WARP_CPL][WARP_WORDS];
};

// Programmatic dependent launch (sm_90+): let the next kernel of the stream start its launch now,
// and wait for the previous one (its memory) before touching global memory. No-ops without the
// launch attribute.
__device__ __forceinline__ void warp_pdl() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Element v of chunk row i, widened exactly (no subnormal flush).
__device__ __forceinline__ float warp_x(const WarpRaw& r, int i, int v) {
#if LOGIT_KIND == 0
    return __uint_as_float(r.w[i][v]);
#else
    u32 w = r.w[i][v >> 1];
#if LOGIT_KIND == 1
    return __uint_as_float((v & 1) ? (w & 0xffff0000u) : (w << 16));
#else
    return f16_bits_to_f32((v & 1) ? (w >> 16) : (w & 0xffffu));
#endif
#endif
}

// Loads this lane's chunks of `row` (zeros past E or T).
__device__ __forceinline__ void warp_load(const Params& p, long long row, int gl, int W, WarpRaw& r) {
    const bool act = row < p.T;
    const logit_t* lr = (const logit_t*)p.logits + (act ? row : 0) * p.ld;
    const bool vec = (p.warp_flags & WF_VEC) != 0;
#pragma unroll
    for (int i = 0; i < WARP_CPL; i++) {
        const int e0 = (gl + W * i) * WARP_VEC;
        if (act && vec && e0 + WARP_VEC <= p.E) {
#if WARP_WORDS == 4
            uint4 q = __ldg((const uint4*)(lr + e0));
            r.w[i][0] = q.x;
            r.w[i][1] = q.y;
            r.w[i][2] = q.z;
            r.w[i][3] = q.w;
#else
            uint2 q = __ldg((const uint2*)(lr + e0));
            r.w[i][0] = q.x;
            r.w[i][1] = q.y;
#endif
        } else {
#pragma unroll
            for (int j = 0; j < WARP_WORDS; j++) r.w[i][j] = 0u;
#pragma unroll
            for (int v = 0; v < WARP_VEC; v++) {
                const int e = e0 + v;
                if (act && e < p.E) {
#if LOGIT_KIND == 0
                    r.w[i][v] = __float_as_uint(lr[e]);
#else
                    r.w[i][v >> 1] |= ((u32)lr[e]) << (16 * (v & 1));
#endif
                }
            }
        }
    }
}

// The score function at a flushed logit (sigmoid and sqrt-softplus; 0 for softmax).
__device__ __forceinline__ float warp_score(float z) {
#if SCORE == SIGMOID
    return M_SIGMOID(z);
#elif SCORE == SQRT_SOFTPLUS
    return M_SQRT_SOFTPLUS(z);
#else
    (void)z;
    return 0.0f;
#endif
}

// Exact selection key of the widened logit x: key_of on the flushed logit, with the flushed bias
// b of the expert (hb: the config has a bias).
__device__ __forceinline__ float warp_key_exact(float x, float b, bool hb, float m, float S) {
    const float z = M_FTZ(x);
    float k;
#if SCORE == SM_BEFORE
    k = M_DIV(M_EXP(z - m), S);
#elif SCORE == SM_AFTER
    k = z;
#else
    k = warp_score(z);
#endif
    if (hb) k = M_FTZ(k + b);
    (void)m;
    (void)S;
    return k;
}

// Cheap key (portable sigmoid): hardware exp and division, within Params.delta of the exact key.
__device__ __forceinline__ float warp_key_cheap(float x, float b, bool hb) {
    float c = __fdividef(1.0f, 1.0f + __expf(-x));
    if (hb) c = c + b;
    return c;
}

// The flushed selection bias of this lane's experts (0 without a bias).
__device__ __forceinline__ void warp_bias(const Params& p, int gl, int W, float (&b)[WARP_NE]) {
#pragma unroll
    for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
        for (int v = 0; v < WARP_VEC; v++) {
            const int e = (gl + W * i) * WARP_VEC + v;
            b[i * WARP_VEC + v] = (p.bias != 0ull && e < p.E) ? M_FTZ(((const float*)p.bias)[e]) : 0.0f;
        }
}

// Inserts v into the descending list t[0..n) (values only).
__device__ __forceinline__ void warp_topn(float (&t)[WARP_GN_MAX], float v, int n) {
#pragma unroll
    for (int j = 0; j < WARP_GN_MAX; j++) {
        if (j < n) {
            float hi = fmaxf(t[j], v);
            v = fminf(t[j], v);
            t[j] = hi;
        }
    }
}

// Group limit on the keys k (chunk rows all valid: E = G * per, per a multiple of WARP_VEC):
// group scores, the kept groups, and the dropped groups' keys set to -inf. Returns whether the
// gap between the last kept and the first dropped group score exceeds `margin` (always true for
// margin < 0).
__device__ __forceinline__ bool warp_groups(const Params& p, float (&k)[WARP_NE], int gl, int W, float* gsc, int* gkeep,
                                            float* gap, float margin) {
    const int nch = p.E / WARP_VEC;
    const int lpg = p.lpg, gn = p.gn, G = p.G;
    float t[WARP_CPL][WARP_GN_MAX];
#pragma unroll
    for (int i = 0; i < WARP_CPL; i++) {
#pragma unroll
        for (int j = 0; j < WARP_GN_MAX; j++) t[i][j] = F32_NEG_INF;
        if (gl + W * i < nch) {
#pragma unroll
            for (int v = 0; v < WARP_VEC; v++) warp_topn(t[i], k[i * WARP_VEC + v], gn);
        }
    }
    for (int d = 1; d < lpg; d <<= 1) {
#pragma unroll
        for (int i = 0; i < WARP_CPL; i++) {
            float o[WARP_GN_MAX];
#pragma unroll
            for (int j = 0; j < WARP_GN_MAX; j++) o[j] = __shfl_xor_sync(WARP_FULL, t[i][j], d);
#pragma unroll
            for (int j = 0; j < WARP_GN_MAX; j++)
                if (j < gn) warp_topn(t[i], o[j], gn);
        }
    }
#pragma unroll
    for (int i = 0; i < WARP_CPL; i++) {
        const int c = gl + W * i;
        if (c < nch && (c % lpg) == 0) {
            float acc = t[i][0];
#pragma unroll
            for (int j = 1; j < WARP_GN_MAX; j++)
                if (j < gn) acc = M_FTZ(acc + t[i][j]);
            gsc[c / lpg] = acc;
        }
    }
    __syncwarp();
    for (int g = gl; g < G; g += W) {
        const float me = gsc[g];
        int r = 0;
        for (int h = 0; h < G; h++) {
            const float o = gsc[h];
            r += (o > me || (o == me && h < g)) ? 1 : 0;
        }
        gkeep[g] = r < p.gsel ? 1 : 0;
        if (r == p.gsel - 1) gap[0] = me;
        if (r == p.gsel) gap[1] = me;
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < WARP_CPL; i++) {
        const int c = gl + W * i;
        if (c < nch && !gkeep[c / lpg]) {
#pragma unroll
            for (int v = 0; v < WARP_VEC; v++) k[i * WARP_VEC + v] = F32_NEG_INF;
        }
    }
    const bool ok = margin < 0.0f || (gap[0] - gap[1]) > margin;
    __syncwarp();
    return ok;
}

// One token per group of W lanes (row >= T: an idle group that still takes part in the
// collectives). `myid`: replay id of this lane's slot (lanes gl < K).
template <int OP>
__device__ __forceinline__ void warp_token(const Params& p, char* gsm, long long row, const WarpRaw& raw, u32 myid,
                                           const float (&bsel)[WARP_NE], int gl, int gbase, u32 gmask, int W) {
    const int E = p.E, K = p.K;
    const bool hb = p.bias != 0ull;
    const bool act = row < p.T;
    const int nch = (E + WARP_VEC - 1) / WARP_VEC;
    uint4* ent = (uint4*)gsm;
    uint4* slotd = ent + p.warp_ncap;
    float* gsc = (float*)(slotd + K);
    int* gkeep = (int*)(gsc + p.G);
    float* gap = (float*)(gkeep + p.G);

    // 1. NaN and +inf are errors (the lowest such expert is named).
    bool lbad = false;
#pragma unroll
    for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
        for (int v = 0; v < WARP_VEC; v++) lbad = lbad || !(warp_x(raw, i, v) < F32_POS_INF);
    const bool gbad = (__ballot_sync(WARP_FULL, lbad) & gmask) != 0u;
    int badcode = 0x7fffffff;
    if (__any_sync(WARP_FULL, lbad)) {
#pragma unroll
        for (int i = WARP_CPL - 1; i >= 0; i--)
#pragma unroll
            for (int v = WARP_VEC - 1; v >= 0; v--) {
                const int e = (gl + W * i) * WARP_VEC + v;
                const float x = warp_x(raw, i, v);
                if (e < E && bad_logit(x)) badcode = bad_code(e, x);
            }
        for (int d = 1; d < W; d <<= 1) {
            const int o = __shfl_xor_sync(WARP_FULL, badcode, d);
            badcode = o < badcode ? o : badcode;
        }
    }

    // 2. Replay: the slot ids, fallback rows (slot 0 holds ROUTER_SELECTS), invalid ids.
    bool fbrow = false, idbad = false;
    if (OP != WOP_ROUTE) {
        const u32 id0 = __shfl_sync(WARP_FULL, myid, gbase);
        fbrow = OP == WOP_REPLAY_FB && id0 == ROUTER_SELECTS;
        bool lb = gl < K && myid >= (u32)E;
#pragma unroll 8
        for (int r = 0; r < K; r++) {
            const u32 o = __shfl_sync(WARP_FULL, myid, gbase + r);
            lb = lb || (r < gl && gl < K && o == myid);
        }
        idbad = (__ballot_sync(WARP_FULL, lb) & gmask) != 0u && !fbrow;
    }
    const bool sel = OP == WOP_ROUTE || (OP == WOP_REPLAY_FB && __any_sync(WARP_FULL, act && fbrow));

    // 3. Softmax before top-K: the row maximum and sum (portable: summed in expert order).
    float m = 0.0f, S = 0.0f;
#if SCORE == SM_BEFORE
    {
        float lm = F32_NEG_INF;
#pragma unroll
        for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
            for (int v = 0; v < WARP_VEC; v++)
                if ((gl + W * i) * WARP_VEC + v < E) lm = fmaxf(lm, M_FTZ(warp_x(raw, i, v)));
        for (int d = 1; d < W; d <<= 1) lm = fmaxf(lm, __shfl_xor_sync(WARP_FULL, lm, d));
        m = lm;
        float ex[WARP_NE];
#pragma unroll
        for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
            for (int v = 0; v < WARP_VEC; v++)
                ex[i * WARP_VEC + v] =
                    (gl + W * i) * WARP_VEC + v < E ? M_EXP(M_FTZ(warp_x(raw, i, v)) - m) : 0.0f;
#if PORTABLE
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < WARP_CPL; i++) {
            for (int l = 0; l < W; l++) {
                if (gl == l) {
#pragma unroll
                    for (int v = 0; v < WARP_VEC; v++)
                        if ((l + W * i) * WARP_VEC + v < E) acc = acc + ex[i * WARP_VEC + v];
                }
                acc = __shfl_sync(WARP_FULL, acc, gbase + l);
            }
        }
        S = acc;
#else
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < WARP_NE; j++) acc = acc + ex[j];
        for (int d = 1; d < W; d <<= 1) acc = acc + __shfl_xor_sync(WARP_FULL, acc, d);
        S = acc;
#endif
    }
#endif

    // 4. Selection: every slot lane (gl < K) ends with its expert se, score ss and flushed
    //    logit sz.
    u32 se = 0u;
    float ss = 0.0f, sz = 0.0f;
    if (sel) {
        float k[WARP_NE];
        bool exact = !(WARP_PRUNE && (p.warp_flags & WF_PRUNE) != 0);
        // Keys (NaN past E; zeros for a row in error), group limit. Returns whether the kept
        // groups are certain.
        auto prepare = [&](bool ex_keys) -> bool {
#pragma unroll
            for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
                for (int v = 0; v < WARP_VEC; v++) {
                    const int e = (gl + W * i) * WARP_VEC + v;
                    const int j = i * WARP_VEC + v;
                    const float x = warp_x(raw, i, v);
                    float key;
#if WARP_PRUNE
                    key = ex_keys ? warp_key_exact(x, bsel[j], hb, m, S) : warp_key_cheap(x, bsel[j], hb);
#else
                    key = warp_key_exact(x, bsel[j], hb, m, S);
#endif
                    k[i * WARP_VEC + v] = e < E ? (gbad ? 0.0f : key) : F32_NAN;
                }
            if (p.G > 0) {
                const float margin = ex_keys ? -1.0f : p.delta * (float)(4 * p.gn + 4);
                return warp_groups(p, k, gl, W, gsc, gkeep, gap, margin) || !act || gbad;
            }
            return true;
        };
        const bool gok = prepare(exact);
        if (!exact && __any_sync(WARP_FULL, !gok)) {
            exact = true;
            prepare(true);
        }
        // tau: the K-th largest lane maximum of the group (bitonic sort, descending).
        float lm = F32_NEG_INF;
#pragma unroll
        for (int j = 0; j < WARP_NE; j++) lm = fmaxf(lm, k[j]);
        for (int kk = 2; kk <= W; kk <<= 1) {
            for (int j = kk >> 1; j > 0; j >>= 1) {
                const float o = __shfl_xor_sync(WARP_FULL, lm, j);
                const bool up = (gl & kk) == 0, lower = (gl & j) == 0;
                lm = (up == lower) ? fmaxf(lm, o) : fminf(lm, o);
            }
        }
        const float tau = __shfl_sync(WARP_FULL, lm, gbase + K - 1);
        float thr = exact ? tau : tau - 2.0f * p.delta;
        int nl = 0;
#pragma unroll
        for (int j = 0; j < WARP_NE; j++) nl += k[j] >= thr ? 1 : 0;
        int inc = nl;
        for (int d = 1; d < W; d <<= 1) {
            const int o = __shfl_up_sync(WARP_FULL, inc, d, W);
            if (gl >= d) inc += o;
        }
        int n = __shfl_sync(WARP_FULL, inc, gbase + W - 1);
        if (__any_sync(WARP_FULL, n > p.warp_ncap)) {
            // Slow path: exact keys, K rounds of a group arg-max over the packed keys.
            if (!exact) {
                exact = true;
                prepare(true);
            }
            u32 taken = 0u;
            for (int r = 0; r < K; r++) {
                u64 best = 0ull;
#pragma unroll
                for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
                    for (int v = 0; v < WARP_VEC; v++) {
                        const int j = i * WARP_VEC + v;
                        const u64 pk = pack_key(k[j], (gl + W * i) * WARP_VEC + v);
                        if (k[j] == k[j] && !((taken >> j) & 1u) && pk > best) best = pk;
                    }
                u64 g = best;
                for (int d = 1; d < W; d <<= 1) {
                    const u64 o = __shfl_xor_sync(WARP_FULL, g, d);
                    g = o > g ? o : g;
                }
#pragma unroll
                for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
                    for (int v = 0; v < WARP_VEC; v++) {
                        const int j = i * WARP_VEC + v;
                        if (k[j] == k[j] && pack_key(k[j], (gl + W * i) * WARP_VEC + v) == g) taken |= 1u << j;
                    }
                if (gl == r) se = (u32)unpack_id(g);
            }
            if (gl < K && act) {
                sz = load_logit((const logit_t*)p.logits + row * p.ld, se < (u32)E ? se : 0);
                ss = warp_score(sz);
            }
        } else {
            // Candidates -> shared memory: {key, expert | dropped, widened logit, flushed bias}.
            int wi = inc - nl;
#pragma unroll
            for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
                for (int v = 0; v < WARP_VEC; v++) {
                    const int j = i * WARP_VEC + v;
                    if (k[j] >= thr) {
                        const u32 e = (u32)((gl + W * i) * WARP_VEC + v);
                        const u32 dropped = (k[j] == F32_NEG_INF && p.G > 0) ? 0x80000000u : 0u;
                        ent[wi] = make_uint4(__float_as_uint(k[j]), e | dropped, __float_as_uint(warp_x(raw, i, v)),
                                             __float_as_uint(bsel[j]));
                        wi++;
                    }
                }
            __syncwarp();
            // Exact packed key and score of each candidate.
            for (int c = gl; c < n; c += W) {
                const uint4 q = ent[c];
                const int e = (int)(q.y & 0x7fffffffu);
                const float z = M_FTZ(__uint_as_float(q.z));
                const float s = warp_score(z);
                float key = __uint_as_float(q.x);
#if WARP_PRUNE
                if (!exact) {
                    key = s;
                    if (hb) key = M_FTZ(key + __uint_as_float(q.w));
                    if (q.y & 0x80000000u) key = F32_NEG_INF;
                }
#endif
                const u64 pk = pack_key(key, e);
                ent[c] = make_uint4((u32)pk, (u32)(pk >> 32), __float_as_uint(s), __float_as_uint(z));
            }
            __syncwarp();
            // Rank (exact: the number of candidates that beat it); the top K fill the slots.
            for (int c = gl; c < n; c += W) {
                const uint4 q = ent[c];
                const u64 pk = ((u64)q.y << 32) | q.x;
                int r = 0;
#pragma unroll 4
                for (int j = 0; j < n; j++) {
                    const uint2 o = *(const uint2*)&ent[j];
                    r += (((u64)o.y << 32) | o.x) > pk ? 1 : 0;
                }
                if (r < K) slotd[r] = make_uint4((u32)unpack_id(pk), q.z, q.w, 0u);
            }
            __syncwarp();
            if (gl < K) {
                const uint4 q = slotd[gl];
                se = q.x;
                ss = __uint_as_float(q.y);
                sz = __uint_as_float(q.z);
            }
            __syncwarp();
        }
    }
    // Replayed rows: the given ids.
    const bool given = OP != WOP_ROUTE && !fbrow;
    if (given && gl < K && act) {
        se = idbad ? 0u : myid;
        sz = load_logit((const logit_t*)p.logits + row * p.ld, se);
        ss = warp_score(sz);
    }

    // 5. Weights of the K slots (slot order), as weights_of.
    const bool slot = gl < K;
    float w;
    bool masked = false;
#if SCORE == SM_BEFORE
    w = M_DIV(M_EXP(sz - m), S);
    masked = m == F32_NEG_INF;
#elif SCORE == SM_AFTER
    {
        float mx = F32_NEG_INF;
#pragma unroll 8
        for (int r = 0; r < K; r++) {
            const float o = __shfl_sync(WARP_FULL, sz, gbase + r);
            mx = o > mx ? o : mx;
        }
        masked = mx == F32_NEG_INF;
        w = M_EXP(sz - mx);
        float s = 0.0f;
#pragma unroll 8
        for (int r = 0; r < K; r++) s = s + __shfl_sync(WARP_FULL, w, gbase + r);
        w = M_DIV(w, s);
    }
#else
    w = ss;
    {
        // One rule for every score function: the K chosen logits all -inf and the whole row
        // -inf is AllMasked.
        const bool kinf = (__ballot_sync(WARP_FULL, slot && sz != F32_NEG_INF) & gmask) == 0u;
        if (__any_sync(WARP_FULL, kinf && act)) {
            bool fin = false;
#pragma unroll
            for (int i = 0; i < WARP_CPL; i++)
#pragma unroll
                for (int v = 0; v < WARP_VEC; v++)
                    fin = fin || ((gl + W * i) * WARP_VEC + v < E && warp_x(raw, i, v) != F32_NEG_INF);
            const u32 finite = __ballot_sync(WARP_FULL, fin) & gmask;
            masked = kinf && finite == 0u;
        }
    }
#endif
    if (p.norm != 0) {
        float s = 0.0f;
#pragma unroll 8
        for (int r = 0; r < K; r++) s = s + __shfl_sync(WARP_FULL, w, gbase + r);
        float d;
        if (p.norm == 1) {
            d = s + M_FTZ(p.norm_param);
        } else {
            const float mn = M_FTZ(p.norm_param);
            d = s > mn ? s : mn;
        }
        w = M_DIV(w, d);
    }
    w = M_FTZ(w * M_FTZ(p.scale));

    // 6. Errors (the reference's order) or outputs.
    if (!act) return;
    u64 err = 0ull;
    if (given && idbad) {
        err = ~err_ids(row);
    } else if (gbad) {
        err = ~err_nonfinite(row, badcode);
    } else if (masked) {
        err = ~err_all_masked(row);
    }
    if (err != 0ull) {
        if (gl == 0) report(p, ~err);
        return;
    }
    if (slot) {
        if (!given) {
            ((u32*)p.ids)[row * K + gl] = se;
            if (OP == WOP_ROUTE && p.tap != 0ull) ((u32*)p.tap)[row * p.tap_ld + gl] = se;
        }
        ((float*)p.weights)[row * K + gl] = w;
    }
}

template <int OP>
__device__ __forceinline__ void warp_kernel(const Params& p) {
    DYN_SMEM(smem_raw);
    warp_pdl();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int W = p.warp_w;
    const int gl = lane & (W - 1), gbase = lane & ~(W - 1), gi = lane / W;
    const u32 gmask = W == 32 ? WARP_FULL : (((1u << W) - 1u) << gbase);
    const int gpw = 32 / W;
    const long long wid = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    const long long step = (long long)gridDim.x * (blockDim.x >> 5) * gpw;
    char* gsm = smem_raw + (long long)(warp * gpw + gi) * p.warp_gbytes;
    long long row = wid * gpw + gi;
    float bsel[WARP_NE];
    if (OP == WOP_REPLAY) {
#pragma unroll
        for (int j = 0; j < WARP_NE; j++) bsel[j] = 0.0f;
    } else {
        warp_bias(p, gl, W, bsel);
    }
    WarpRaw cur;
    u32 cid = 0u;
    warp_load(p, row, gl, W, cur);
    if (OP != WOP_ROUTE && row < p.T && gl < p.K) cid = ((const u32*)p.ids)[row * p.K + gl];
    for (long long r0 = wid * gpw; r0 < p.T; r0 += step) {
        const long long nrow = row + step;
        if (OP == WOP_REPLAY) {
            // Replay reads WARP_NE experts per lane at once: no prefetch of the next row.
            warp_token<OP>(p, gsm, row, cur, cid, bsel, gl, gbase, gmask, W);
            warp_load(p, nrow, gl, W, cur);
            cid = (nrow < p.T && gl < p.K) ? ((const u32*)p.ids)[nrow * p.K + gl] : 0u;
        } else {
            WarpRaw nxt;
            warp_load(p, nrow, gl, W, nxt);
            const u32 nid = (OP != WOP_ROUTE && nrow < p.T && gl < p.K) ? ((const u32*)p.ids)[nrow * p.K + gl] : 0u;
            warp_token<OP>(p, gsm, row, cur, cid, bsel, gl, gbase, gmask, W);
            cur = nxt;
            cid = nid;
        }
        row = nrow;
    }
}

#define WARP_KERNELS(N)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) warp_route_n##N(Params p) {                 \
        warp_kernel<WOP_ROUTE>(p);                                                                \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) warp_replay_n##N(Params p) {                \
        warp_kernel<WOP_REPLAY>(p);                                                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) warp_replay_fb_n##N(Params p) {             \
        warp_kernel<WOP_REPLAY_FB>(p);                                                            \
    }
#define WARP_KERNELS_(N) WARP_KERNELS(N)
WARP_KERNELS_(WARP_NE)
#endif  // WARP_NE
