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
