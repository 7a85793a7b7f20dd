// Backward kernels (DESIGN §2b): dz[T, E] = d(sum g*w + a*aux + c*zloss)/dz for the weights w
// of given ids, one warp per row, mirroring `vjp_row` of core/src/backward.rs operation for
// operation: every intermediate of the forward is recomputed with the forward's own operations,
// every new result is flushed by the subnormal rule (M_FTZ), every sum runs in slot order (over
// K) or expert order (over E). Elementwise values are computed by the lanes in parallel; an
// ordered sum is taken by every lane redundantly from the warp's shared-memory arrays (broadcast
// reads), in exactly the reference's order, so the result does not depend on the lane layout.
//
// Prepended by the Rust side: the prelude (LOGIT_KIND, PORTABLE, SCORE), math.cu, and router.cu
// compiled without its kernels (widening, the bad-logit test, packed keys, error keys).
//
// Kernels (one warp per row, grid-stride over rows):
// - bwd_aux_counts: the aux-loss token counts per sequence (`aux_topk_row`: the K largest logits
//   of the row, ties to the lower id, -inf allowed; compared exactly, as packed keys of the
//   unflushed logits), after the checks that precede them in the reference (ids, then NaN/+inf).
// - bwd_grad_sparse: no dense term (softmax after top-K, sigmoid or sqrt-softplus, without aux
//   and z-loss): dz is 0 except at the K ids.
// - bwd_grad_dense: every other case (softmax before top-K, an aux term, the z-loss).
// Errors are latched in the status word with the router kernels' keys (ids, then per row NaN /
// +inf before all -inf), so the lowest key is the reference's error.
//
// Shared memory per warp (floats; offsets in BwdParams; every array padded to a multiple of 4):
// z[E] (the widened row) | pr[E] (softmax) | sc[E] (aux scores) | tm[E] (terms of an ordered
// sum) | d[E] (the row of dz before the aux and z terms) | slots: id[K] u[K] g[K] x[K].
// The counting kernel keeps the row's packed keys (u64[E]) at offset 0 instead.

#define BW_FULL 0xffffffffu
#define BW_NO_BAD 0x7fffffff
// Elements of one 16-byte piece of a logits row, and pieces in flight per lane.
#define BW_PE (16 / LOGIT_BYTES)
#define BW_NB 4
// 1e-20 as f32 (the aux scores' normaliser, `M::from_f64(1e-20)`).
#define BW_C_1E20 __uint_as_float(0x1e3ce508u)

#if PORTABLE
#define BW_LN(x) p_ln(x)
#else
#define BW_LN(x) logf(x)
#endif

// Kernel parameters (mirrored by `BwdParams` in src/kernels.rs).
struct BwdParams {
    u64 logits;   // logit_t [T, ld]
    u64 ids;      // u32 [T, K], slot order
    u64 grad;     // f32 [T, K], the upstream gradient
    u64 aux;      // f32 [S, E] aux coefficients, or 0 (no aux term)
    u64 row_seq;  // u32 [T] sequence of every row, or 0 (every row in sequence 0)
    u64 dz;       // f32 [T, E] output
    u64 counts;   // u32 [S, E] aux counts (bwd_aux_counts)
    u64 status;   // u64 error word
    long long T;
    long long ld;
    int E;
    int K;
    int norm;  // 0 none, 1 sum + eps, 2 sum clamped below
    float norm_param;
    float scale;
    float zf;         // z-loss factor c*coeff*2/T (0: no z-loss term)
    int vec;          // 1: logits rows are 16-byte aligned and E*bytes % 16 == 0
    int warp_floats;  // shared memory per warp (floats)
    int off_pr;
    int off_sc;
    int off_tm;
    int off_d;
    int off_slot;
    int pad_;
};

__device__ __forceinline__ void bw_report(const BwdParams& p, u64 key) {
    atomicMax((unsigned long long*)p.status, (unsigned long long)(~key));
}

__device__ __forceinline__ float bw_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(BW_FULL, v, o);
        v = w > v ? w : v;
    }
    return v;
}

__device__ __forceinline__ int bw_warp_min(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        int w = __shfl_xor_sync(BW_FULL, v, o);
        v = w < v ? w : v;
    }
    return v;
}

__device__ __forceinline__ u64 bw_warp_max_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u32 hi = __shfl_xor_sync(BW_FULL, (u32)(v >> 32), o);
        u32 lo = __shfl_xor_sync(BW_FULL, (u32)v, o);
        u64 w = ((u64)hi << 32) | (u64)lo;
        v = w > v ? w : v;
    }
    return v;
}

// Widens one stored logit to f32 exactly, without the subnormal rule (the aux counts compare
// the logits as the host's f32s).
__device__ __forceinline__ float bw_widen_exact(u32 raw) {
#if LOGIT_KIND == 0
    return __uint_as_float(raw);
#elif LOGIT_KIND == 1
    return __uint_as_float(raw << 16);
#else
    return f16_bits_to_f32(raw);
#endif
}

// Raw element j of a 16-byte piece.
__device__ __forceinline__ u32 bw_piece_raw(const uint4& v, int j) {
    u32 w = (j / (BW_PE / 4)) == 0 ? v.x : ((j / (BW_PE / 4)) == 1 ? v.y : ((j / (BW_PE / 4)) == 2 ? v.z : v.w));
#if LOGIT_BYTES == 4
    return w;
#else
    return (j & 1) ? (w >> 16) : (w & 0xffffu);
#endif
}

// Calls f(e, raw) for every element of the row, each lane over its share in increasing e.
// Rows of 16-byte pieces are read BW_NB pieces per lane at a time, all loads first.
template <class F>
__device__ __forceinline__ void bw_for_row(const BwdParams& p, long long row, int lane, F&& f) {
    const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
    if (p.vec) {
        const uint4* src = (const uint4*)lr;
        const int n = p.E / BW_PE;
        for (int i0 = lane; i0 < n; i0 += 32 * BW_NB) {
            uint4 v[BW_NB];
#pragma unroll
            for (int b = 0; b < BW_NB; b++) {
                int i = i0 + 32 * b;
                if (i < n) v[b] = __ldg(src + i);
            }
#pragma unroll
            for (int b = 0; b < BW_NB; b++) {
                int i = i0 + 32 * b;
                if (i < n) {
#pragma unroll
                    for (int j = 0; j < BW_PE; j++) f(i * BW_PE + j, bw_piece_raw(v[b], j));
                }
            }
        }
    } else {
        for (int e = lane; e < p.E; e += 32) {
#if LOGIT_KIND == 0
            f(e, __float_as_uint(lr[e]));
#else
            f(e, (u32)lr[e]);
#endif
        }
    }
}

// Checks the row's ids (the reference validates them before anything else), given lane j's id
// of slot j (< 32) already loaded into id0; writes them into sid. True (warp-uniform, after
// reporting) when an id is out of range or repeated.
__device__ __forceinline__ bool bw_ids_bad(const BwdParams& p, long long row, int lane, int* sid, u32 id0) {
    const u32* ids = (const u32*)p.ids + row * p.K;
    bool bad = false;
    for (int j = lane; j < p.K; j += 32) {
        u32 id = j < 32 ? id0 : ids[j];
        sid[j] = (int)id;
        bad = bad || id >= (u32)p.E;
    }
    __syncwarp();
    for (int j = lane; j < p.K; j += 32)
        for (int jj = 0; jj < j; jj++) bad = bad || sid[jj] == sid[j];
    bool any = __any_sync(BW_FULL, bad);
    if (any && lane == 0) bw_report(p, err_ids(row));
    return any;
}

// Lane j's id of slot j (j < K, j < 32), or 0.
__device__ __forceinline__ u32 bw_slot_id(const BwdParams& p, long long row, int lane) {
    return lane < p.K ? ((const u32*)p.ids)[row * p.K + lane] : 0u;
}

// ---------------------------------------------------------------------------------------------
// Aux counts

extern "C" __global__ void __launch_bounds__(256) bwd_aux_counts(BwdParams p) {
    DYN_SMEM(smem_raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int W = blockDim.x >> 5;
    float* base = (float*)smem_raw + (long long)warp * p.warp_floats;
    u64* pk = (u64*)base;
    int* sid = (int*)(base + p.off_slot);
    const int E = p.E;
    for (long long row = (long long)blockIdx.x * W + warp; row < p.T; row += (long long)gridDim.x * W) {
        __syncwarp();
        if (bw_ids_bad(p, row, lane, sid, bw_slot_id(p, row, lane))) continue;
        int bad = BW_NO_BAD;
        bw_for_row(p, row, lane, [&](int e, u32 raw) {
            float x = bw_widen_exact(raw);
            if (bad_logit(x) && bad == BW_NO_BAD) bad = bad_code(e, x);
            pk[e] = pack_key(x, e);
        });
        bad = bw_warp_min(bad);
        if (bad != BW_NO_BAD) {
            if (lane == 0) bw_report(p, err_nonfinite(row, bad));
            continue;
        }
        __syncwarp();
        const long long s = p.row_seq != 0ull ? (long long)((const u32*)p.row_seq)[row] : 0ll;
        u32* cnt = (u32*)p.counts + s * E;
        for (int j = 0; j < p.K && j < E; j++) {
            u64 best = 0ull;
            for (int e = lane; e < E; e += 32) {
                u64 v = pk[e];
                best = v > best ? v : best;
            }
            best = bw_warp_max_u64(best);
            int id = unpack_id(best);
            if (lane == 0) {
                atomicAdd(cnt + id, 1u);
                pk[id] = 0ull;
            }
            __syncwarp();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient

// Loads the row into z (widened, the mode's subnormal rule) and zeroes d. Returns the row's
// lowest bad code (NaN / +inf, or BW_NO_BAD) and its maximum in mx, both warp-uniform.
__device__ __forceinline__ int bw_load_row(const BwdParams& p, long long row, int lane, float* z, float* d,
                                           float& mx) {
    int bad = BW_NO_BAD;
    float m = F32_NEG_INF;
    if (p.vec) {
        const uint4* src = (const uint4*)((const logit_t*)p.logits + row * p.ld);
        const int n = p.E / BW_PE;
        for (int i0 = lane; i0 < n; i0 += 32 * BW_NB) {
            uint4 v[BW_NB];
#pragma unroll
            for (int b = 0; b < BW_NB; b++) {
                int i = i0 + 32 * b;
                if (i < n) v[b] = __ldg(src + i);
            }
#pragma unroll
            for (int b = 0; b < BW_NB; b++) {
                int i = i0 + 32 * b;
                if (i < n) {
                    float x[BW_PE];
#pragma unroll
                    for (int j = 0; j < BW_PE; j++) {
                        x[j] = widen_bits(bw_piece_raw(v[b], j));
                        if (bad_logit(x[j]) && bad == BW_NO_BAD) bad = bad_code(i * BW_PE + j, x[j]);
                        if (x[j] > m) m = x[j];
                    }
#pragma unroll
                    for (int j = 0; j < BW_PE; j += 4) {
                        *(float4*)(z + i * BW_PE + j) = make_float4(x[j], x[j + 1], x[j + 2], x[j + 3]);
                        *(float4*)(d + i * BW_PE + j) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    }
                }
            }
        }
    } else {
        const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
        for (int e = lane; e < p.E; e += 32) {
            float x = load_logit(lr, e);
            if (bad_logit(x) && bad == BW_NO_BAD) bad = bad_code(e, x);
            if (x > m) m = x;
            z[e] = x;
            d[e] = 0.0f;
        }
    }
    mx = bw_warp_max(m);
    return bw_warp_min(bad);
}

// One row of vjp_row. DENSE compiles the terms over all E (softmax before top-K, aux, z-loss).
template <bool DENSE>
__device__ __forceinline__ void bw_grad_row(const BwdParams& p, long long row, int lane, float* base) {
    const int E = p.E, K = p.K;
    float* z = base;
    float* pr = base + p.off_pr;
    float* sc = base + p.off_sc;
    float* tm = base + p.off_tm;
    float* d = base + p.off_d;
    const int kp = (K + 3) & ~3;
    int* sid = (int*)(base + p.off_slot);
    float* su = (float*)(sid + kp);
    float* sg = su + kp;
    float* sx = sg + kp;
    (void)pr;
    (void)sc;
    (void)tm;

    // The row's global loads first, all in flight together: the slot's id and upstream
    // gradient (lane j < 32: slot j), then the logits.
    const u32 id0 = bw_slot_id(p, row, lane);
    const float g0 = lane < K ? ((const float*)p.grad)[row * K + lane] : 0.0f;
    __syncwarp();  // every lane is done with the previous row's arrays
    float mx;
    const int bad = bw_load_row(p, row, lane, z, d, mx);
    if (bw_ids_bad(p, row, lane, sid, id0)) return;
    if (bad != BW_NO_BAD) {
        if (lane == 0) bw_report(p, err_nonfinite(row, bad));
        return;
    }
    // An all -inf row is an error in every case (the softmax finds it; otherwise the scan).
    if (mx == F32_NEG_INF) {
        if (lane == 0) bw_report(p, err_all_masked(row));
        return;
    }
    __syncwarp();
    const bool has_aux = DENSE && p.aux != 0ull;
    const bool has_z = DENSE && p.zf != 0.0f;

    // The full softmax when some term needs it: exp(z - m) in parallel, the sum in expert order,
    // one division per expert.
    const float m = mx;
    float S = 0.0f;
    if (DENSE && (SCORE == SM_BEFORE || ((SCORE == SM_BEFORE || SCORE == SM_AFTER) && has_aux) || has_z)) {
        for (int e = lane; e < E; e += 32) pr[e] = M_EXP(z[e] - m);
        __syncwarp();
        for (int e = 0; e < E; e++) S = S + pr[e];
        __syncwarp();
        for (int e = lane; e < E; e += 32) pr[e] = M_DIV(pr[e], S);
        __syncwarp();
    }

    // Forward: unnormalised weights u (slot order); gs = g * scale.
    const float scale = M_FTZ(p.scale);
    for (int j = lane; j < K; j += 32) {
        const int id = sid[j];
        const float g = M_FTZ(j < 32 ? g0 : ((const float*)p.grad)[row * K + j]);
        sg[j] = M_FTZ(g * scale);
#if SCORE == SM_BEFORE
        su[j] = pr[id];
#elif SCORE == SM_AFTER
        sx[j] = z[id];
#elif SCORE == SIGMOID
        su[j] = M_SIGMOID(z[id]);
#else
        su[j] = M_SQRT_SOFTPLUS(z[id]);
#endif
    }
    __syncwarp();
#if SCORE == SM_AFTER
    {
        float ms = F32_NEG_INF;
        for (int j = 0; j < K; j++) {
            float v = sx[j];
            if (v > ms) ms = v;
        }
        if (ms == F32_NEG_INF) {
            if (lane == 0) bw_report(p, err_all_masked(row));
            return;
        }
        for (int j = lane; j < K; j += 32) su[j] = M_EXP(sx[j] - ms);
        __syncwarp();
        float s = 0.0f;
        for (int j = 0; j < K; j++) s = s + su[j];
        __syncwarp();
        for (int j = lane; j < K; j += 32) su[j] = M_DIV(su[j], s);
        __syncwarp();
    }
#endif

    // Normalisation: gu = (gs - sum gs*wn) / S.
    if (p.norm != 0) {
        float s = 0.0f;
        for (int j = 0; j < K; j++) s = s + su[j];
        float dd;
        bool varies = true;
        if (p.norm == 1) {
            dd = s + M_FTZ(p.norm_param);
        } else {
            const float mn = M_FTZ(p.norm_param);
            if (s > mn) {
                dd = s;
            } else {
                dd = mn;
                varies = false;
            }
        }
        float dot = 0.0f;
        if (varies) {
            for (int j = lane; j < K; j += 32) sx[j] = M_FTZ(sg[j] * M_DIV(su[j], dd));
            __syncwarp();
            for (int j = 0; j < K; j++) dot = M_FTZ(dot + sx[j]);
        }
        for (int j = lane; j < K; j += 32) sg[j] = M_DIV(M_FTZ(sg[j] - dot), dd);
        __syncwarp();
    }

    // Score function: the slots' values into d (zeroed by the load).
#if SCORE == SM_BEFORE
    {
        float t = 0.0f;
        for (int j = 0; j < K; j++) t = M_FTZ(t + M_FTZ(sg[j] * su[j]));
        const float nt = 0.0f - t;
        for (int e = lane; e < E; e += 32) d[e] = M_FTZ(pr[e] * nt);
        __syncwarp();
        for (int j = lane; j < K; j += 32) {
            const int id = sid[j];
            d[id] = M_FTZ(pr[id] * M_FTZ(sg[j] - t));
        }
    }
#elif SCORE == SM_AFTER
    {
        float r = 0.0f;
        for (int j = 0; j < K; j++) r = M_FTZ(r + M_FTZ(sg[j] * su[j]));
        for (int j = lane; j < K; j += 32) d[sid[j]] = M_FTZ(su[j] * M_FTZ(sg[j] - r));
    }
#elif SCORE == SIGMOID
    for (int j = lane; j < K; j += 32) {
        const float u = su[j];
        d[sid[j]] = M_FTZ(sg[j] * M_FTZ(u * M_FTZ(1.0f - u)));
    }
#else
    for (int j = lane; j < K; j += 32) {
        const float u = su[j];
        const int id = sid[j];
        d[id] = u == 0.0f ? 0.0f : M_FTZ(sg[j] * M_DIV(M_SIGMOID(z[id]), u + u));
    }
#endif
    __syncwarp();

    // Aux term: the row's ordered sum r first (and for sigmoid / sqrt-softplus the scores and
    // their normaliser ad); the elementwise part is added in the store pass.
    const float* q = (const float*)p.aux;
    float ar = 0.0f, ad = 0.0f;
    if (has_aux) {
        const long long s = p.row_seq != 0ull ? (long long)((const u32*)p.row_seq)[row] : 0ll;
        q += s * E;
#if SCORE == SM_BEFORE || SCORE == SM_AFTER
        for (int e = lane; e < E; e += 32) tm[e] = M_FTZ(pr[e] * q[e]);
        __syncwarp();
        for (int e = 0; e < E; e++) ar = M_FTZ(ar + tm[e]);
#else
        for (int e = lane; e < E; e += 32) {
#if SCORE == SIGMOID
            sc[e] = M_SIGMOID(z[e]);
#else
            sc[e] = M_SQRT_SOFTPLUS(z[e]);
#endif
        }
        __syncwarp();
        float s2 = 0.0f;
        for (int e = 0; e < E; e++) s2 = s2 + sc[e];
        ad = s2 + BW_C_1E20;
        for (int e = lane; e < E; e += 32) tm[e] = M_FTZ(M_DIV(sc[e], ad) * q[e]);
        __syncwarp();
        for (int e = 0; e < E; e++) ar = M_FTZ(ar + tm[e]);
#endif
    }
    // z-loss term: c*coeff*2/T * lse * softmax.
    float kz = 0.0f;
    if (has_z) {
        const float lse = M_FTZ(m + BW_LN(S));
        kz = M_FTZ(p.zf * lse);
    }

    // Store pass: + aux, + z-loss, 0 where the logit is -inf.
    auto fin = [&](int e, float v, float x) -> float {
        if (has_aux) {
#if SCORE == SM_BEFORE || SCORE == SM_AFTER
            const float pe = pr[e];
            v = M_FTZ(v + M_FTZ(pe * M_FTZ(q[e] - ar)));
#else
            const float sv = sc[e];
            const float ds = M_DIV(M_FTZ(q[e] - ar), ad);
#if SCORE == SIGMOID
            const float deriv = M_FTZ(sv * M_FTZ(1.0f - sv));
#else
            const float deriv = sv == 0.0f ? 0.0f : M_DIV(M_SIGMOID(x), sv + sv);
#endif
            v = M_FTZ(v + M_FTZ(ds * deriv));
#endif
        }
        if (has_z) v = M_FTZ(v + M_FTZ(kz * pr[e]));
        return x == F32_NEG_INF ? 0.0f : v;
    };
    float* out = (float*)p.dz + row * E;
    if ((E & 3) == 0) {
        for (int i = lane; i < (E >> 2); i += 32) {
            const float4 dv = *(const float4*)(d + 4 * i);
            const float4 zv = *(const float4*)(z + 4 * i);
            float4 o;
            o.x = fin(4 * i, dv.x, zv.x);
            o.y = fin(4 * i + 1, dv.y, zv.y);
            o.z = fin(4 * i + 2, dv.z, zv.z);
            o.w = fin(4 * i + 3, dv.w, zv.w);
            *(float4*)(out + 4 * i) = o;
        }
    } else {
        for (int e = lane; e < E; e += 32) out[e] = fin(e, d[e], z[e]);
    }
    (void)ad;
    (void)kz;
    (void)S;
}

template <bool DENSE>
__device__ __forceinline__ void bw_grad(const BwdParams& p) {
    DYN_SMEM(smem_raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int W = blockDim.x >> 5;
    float* base = (float*)smem_raw + (long long)warp * p.warp_floats;
    for (long long row = (long long)blockIdx.x * W + warp; row < p.T; row += (long long)gridDim.x * W)
        bw_grad_row<DENSE>(p, row, lane, base);
}

extern "C" __global__ void __launch_bounds__(256, 5) bwd_grad_sparse(BwdParams p) { bw_grad<false>(p); }
extern "C" __global__ void __launch_bounds__(256) bwd_grad_dense(BwdParams p) { bw_grad<true>(p); }

// ---------------------------------------------------------------------------------------------
// bwd_grad_rows: the sparse gradient (no dense term) with the work laid out for bandwidth.
// A warp owns a tile of 32 consecutive rows:
// 1. the tile's logits are read as one flat run of 16-byte pieces (every lane busy whatever E),
//    each lane noting per row whether it saw a NaN / +inf and whether it saw a logit above -inf
//    (bit r of two masks, OR-reduced over the warp once per tile), while the tile's rows of dz
//    are zeroed with 16-byte stores;
// 2. lane r then does row r's slot work alone: its ids and upstream gradient, the checks in the
//    reference's order (ids, NaN / +inf, all -inf), its K logits gathered (just read, so from
//    the cache), the same operations as bwd_grad_row in the same order, and its K stores.
// Needs the vector path (16-byte rows, E*bytes % 16 == 0), E % 4 == 0 and K <= RK (two
// instantiations, RK = 8 and 16: the slot arrays live in registers, sized by RK).

// Warps per block of the rows kernels (kernels.rs: BWD_WARPS).
#define BWD_ROWS_WARPS 8

// Bits of a stored logit: NaN or +inf (an error), and "above -inf".
__device__ __forceinline__ void bw_raw_class(u32 raw, bool& bad, bool& live) {
#if LOGIT_KIND == 2
    bad = (raw & 0x7fffu) >= 0x7c00u && raw != 0xfc00u;
    live = raw != 0xfc00u;
#else
#if LOGIT_KIND == 1
    const u32 u = raw << 16;
#else
    const u32 u = raw;
#endif
    bad = (u & 0x7fffffffu) >= 0x7f800000u && u != 0xff800000u;
    live = u != 0xff800000u;
#endif
}

__device__ __forceinline__ u32 bw_warp_or(u32 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(BW_FULL, v, o);
    return v;
}

// The first bad logit of a row (its code for err_nonfinite), by one thread.
__device__ __forceinline__ int bw_first_bad(const BwdParams& p, long long row) {
    const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
    for (int e = 0; e < p.E; e++) {
        const float x = load_logit(lr, e);
        if (bad_logit(x)) return bad_code(e, x);
    }
    return BW_NO_BAD;
}

// Lane `lane`'s slot ids and upstream gradient of row `row` (zeros past K; ids_bad: an id out of
// range or repeated).
// VEC: 16-byte loads where K % 4 == 0 and both arrays are 16-byte aligned (K = 8: two loads of
// ids and two of gradients rather than eight each).
template <int BW_RK, bool VEC = false>
__device__ __forceinline__ void bw_rows_slots(const BwdParams& p, long long row, int* id, float* g, bool& ids_bad) {
    const int K = p.K;
    const u32* idr = (const u32*)p.ids + row * K;
    const float* gr = (const float*)p.grad + row * K;
    ids_bad = false;
    if (VEC && (K & 3) == 0 && ((p.ids | p.grad) & 15u) == 0) {
#pragma unroll
        for (int q = 0; q < BW_RK / 4; q++) {
            if (4 * q < K) {
                const uint4 a = __ldg((const uint4*)idr + q);
                const float4 b = __ldg((const float4*)gr + q);
                id[4 * q] = (int)a.x;
                id[4 * q + 1] = (int)a.y;
                id[4 * q + 2] = (int)a.z;
                id[4 * q + 3] = (int)a.w;
                g[4 * q] = b.x;
                g[4 * q + 1] = b.y;
                g[4 * q + 2] = b.z;
                g[4 * q + 3] = b.w;
                ids_bad = ids_bad || a.x >= (u32)p.E || a.y >= (u32)p.E || a.z >= (u32)p.E || a.w >= (u32)p.E;
            } else {
#pragma unroll
                for (int j = 4 * q; j < 4 * q + 4; j++) {
                    id[j] = 0;
                    g[j] = 0.0f;
                }
            }
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < BW_RK; j++) {
        if (j < K) {
            const u32 x = idr[j];
            id[j] = (int)x;
            g[j] = gr[j];
            ids_bad = ids_bad || x >= (u32)p.E;
        } else {
            id[j] = 0;
            g[j] = 0.0f;
        }
    }
}

// Row `row`'s gradient at its K slots, v[j] (meaningful where x[j] != -inf), from its upstream
// gradient g and its logits x at the slot ids: the operations of bwd_grad_row in the same order.
// Returns false after reporting the row's error (softmax after top-K, every slot -inf; REPORT
// false: the caller reports it).
template <int BW_RK, bool REPORT = true>
__device__ __forceinline__ bool bw_rows_values(const BwdParams& p, long long row, const float* g, const float* x,
                                               float* v) {
    const int K = p.K;
    float u[BW_RK], sg[BW_RK];
    const float scale = M_FTZ(p.scale);
#pragma unroll
    for (int j = 0; j < BW_RK; j++) {
        if (j < K) {
            sg[j] = M_FTZ(M_FTZ(g[j]) * scale);
#if SCORE == SIGMOID
            u[j] = M_SIGMOID(x[j]);
#elif SCORE == SM_AFTER
            u[j] = 0.0f;
#else
            u[j] = M_SQRT_SOFTPLUS(x[j]);
#endif
        } else {
            sg[j] = 0.0f;
            u[j] = 0.0f;
        }
    }
#if SCORE == SM_AFTER
    {
        float ms = F32_NEG_INF;
#pragma unroll
        for (int j = 0; j < BW_RK; j++)
            if (j < K && x[j] > ms) ms = x[j];
        if (ms == F32_NEG_INF) {
            if (REPORT) bw_report(p, err_all_masked(row));
            return false;
        }
        // The row's checks passed (else these values are not used): no slot logit is NaN or
        // +inf and ms is finite, so x - ms is -inf or a number <= 0, each e_j is in [0, 1] and
        // their sum is at least 1 (the bounded forms give M_EXP's and M_DIV_BY's bits there).
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < BW_RK; j++)
            if (j < K) {
                u[j] = M_EXP_BOUNDED(x[j] - ms);
                s = s + u[j];
            }
        const mdiv_t sd = M_DIV_PRE(s);
#pragma unroll
        for (int j = 0; j < BW_RK; j++)
            if (j < K) u[j] = M_DIV_BY_POS(u[j], sd);
    }
#endif
    if (p.norm != 0) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < BW_RK; j++)
            if (j < K) s = s + u[j];
        float dd;
        bool varies = true;
        if (p.norm == 1) {
            dd = s + M_FTZ(p.norm_param);
        } else {
            const float mn = M_FTZ(p.norm_param);
            if (s > mn) {
                dd = s;
            } else {
                dd = mn;
                varies = false;
            }
        }
        float dot = 0.0f;
        const mdiv_t ddd = M_DIV_PRE(dd);
        if (varies) {
#pragma unroll
            for (int j = 0; j < BW_RK; j++)
                if (j < K) dot = M_FTZ(dot + M_FTZ(sg[j] * M_DIV_BY(u[j], ddd)));
        }
#pragma unroll
        for (int j = 0; j < BW_RK; j++)
            if (j < K) sg[j] = M_DIV_BY(M_FTZ(sg[j] - dot), ddd);
    }
#if SCORE == SM_AFTER
    float rsum = 0.0f;
#pragma unroll
    for (int j = 0; j < BW_RK; j++)
        if (j < K) rsum = M_FTZ(rsum + M_FTZ(sg[j] * u[j]));
#endif
#pragma unroll
    for (int j = 0; j < BW_RK; j++) {
        if (j < K && x[j] != F32_NEG_INF) {
#if SCORE == SM_AFTER
            const float val = M_FTZ(u[j] * M_FTZ(sg[j] - rsum));
#elif SCORE == SIGMOID
            const float val = M_FTZ(sg[j] * M_FTZ(u[j] * M_FTZ(1.0f - u[j])));
#else
            const float val = u[j] == 0.0f ? 0.0f : M_FTZ(sg[j] * M_DIV(M_SIGMOID(x[j]), u[j] + u[j]));
#endif
            v[j] = val;
        } else {
            v[j] = 0.0f;
        }
    }
    return true;
}


// The flat pass of a rows tile (rows r0 .. r0 + rows): its logits read as one run of 16-byte
// pieces, NB in flight per lane, noting per row whether a NaN / +inf was seen (bit r of badm)
// and whether a logit above -inf was (bit r of livem); this lane's bits only (OR them over the
// warp).
// `after_batch(i)` runs right after batch i's loads are issued (work placed there overlaps the
// batch's round trip), and `after_batch(-1)` once after the pass.
struct BwNothing {
    __device__ __forceinline__ void operator()(int) const {}
};

// A 16-byte piece of 16-bit logits classified two per word (PACK): bit 15 / 31 of `nan` set by
// a NaN half (|h| above +inf's bits: adding 0x8000 - inf - 1 carries into the half's top bit),
// `pinf` nonzero iff a half is +inf (the zero-half test on w ^ +inf, exact as a whole), `live`
// nonzero iff a half is not -inf. The same answers as bw_raw_class over the 8 elements.
__device__ __forceinline__ void bw_piece_class16(const uint4& v, bool& anyb, bool& anyl) {
#if LOGIT_KIND == 2
    const u32 inf2 = 0x7c007c00u, ninf2 = 0xfc00fc00u, nan_add = 0x03ff03ffu;
#else
    const u32 inf2 = 0x7f807f80u, ninf2 = 0xff80ff80u, nan_add = 0x007f007fu;
#endif
    const u32 w[4] = {v.x, v.y, v.z, v.w};
    u32 nan = 0u, pinf = 0u, live = 0u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        nan |= (w[i] & 0x7fff7fffu) + nan_add;
        const u32 xi = w[i] ^ inf2;
        pinf |= (xi - 0x00010001u) & ~xi;
        live |= w[i] ^ ninf2;
    }
    anyb = ((nan | pinf) & 0x80008000u) != 0u;
    anyl = live != 0u;
}

template <int NB, typename F = BwNothing, bool PACK = false>
__device__ __forceinline__ void bw_rows_scan(const BwdParams& p, long long r0, int rows, int lane, u32& badm,
                                             u32& livem, F after_batch = F()) {
    const int E = p.E;
    const int n = E / BW_PE;  // pieces per row
    const int total = rows * n;
    const float inv_n = 1.0f / (float)n;
    badm = 0u;
    livem = 0u;
    const char* lbase = (const char*)p.logits;
    // The batches are counted for the whole warp (after_batch(i) runs on every lane).
    for (int qb = 0; qb < total; qb += 32 * NB) {
        const int q0 = qb + lane;
        uint4 v[NB];
        int rr[NB];
#pragma unroll
        for (int b = 0; b < NB; b++) {
            const int q = q0 + 32 * b;
            // q / n, exact: (q + 0.5) / n is at least 0.5 / n away from an integer and the
            // float error is below 2^-21 * 32.
            const int r = __float2int_rz(((float)q + 0.5f) * inv_n);
            rr[b] = r;
            if (q < total) {
                const int i = q - r * n;
                v[b] = __ldg((const uint4*)(lbase + ((r0 + r) * p.ld) * LOGIT_BYTES) + i);
            }
        }
        after_batch(qb / (32 * NB));
#pragma unroll
        for (int b = 0; b < NB; b++) {
            if (q0 + 32 * b < total) {
                bool anyb = false, anyl = false;
                if (PACK && LOGIT_BYTES == 2) {
                    bw_piece_class16(v[b], anyb, anyl);
                } else {
#pragma unroll
                    for (int j = 0; j < BW_PE; j++) {
                        bool bad, live;
                        bw_raw_class(bw_piece_raw(v[b], j), bad, live);
                        anyb = anyb || bad;
                        anyl = anyl || live;
                    }
                }
                if (anyb) badm |= 1u << rr[b];
                if (anyl) livem |= 1u << rr[b];
            }
        }
    }
    after_batch(-1);
}

// The tile's zeros: rows r0 .. r0 + rows of dz, 16 bytes per store.
__device__ __forceinline__ void bw_rows_zero(const BwdParams& p, long long r0, int rows, int lane) {
    float4* out = (float4*)((float*)p.dz + r0 * p.E);
    const int nz = rows * (p.E >> 2);
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int i = lane; i < nz; i += 32) out[i] = zero;
}

// Lane `lane`'s ids: out of range or repeated (the check after the loads of bw_rows_slots).
template <int BW_RK>
__device__ __forceinline__ bool bw_rows_repeated(const BwdParams& p, const int* id, bool ids_bad) {
#pragma unroll
    for (int j = 1; j < BW_RK; j++)
#pragma unroll
        for (int jj = 0; jj < j; jj++)
            if (j < p.K) ids_bad = ids_bad || id[jj] == id[j];
    return ids_bad;
}

// The early order of a rows tile: the row's ids, upstream gradient and logits at the slot ids
// are loaded first and stay in flight with the flat pass (an id out of range is clamped for its
// load and reported below, never used), the slot values are computed before the zeros, and the
// K slot stores follow the zeros at once, while the zeroed sectors are still in L2. Same values,
// same checks and reports as the late order below.
// The staged slot stores of a tile (BW_RK = 8): entry lane * 8 + ((j + lane) & 7) of the warp's
// stage (rotated: fewer bank conflicts) holds slot j of row r0 + lane, its offset in the tile in
// the high word (-1: no store) and its value in the low word.
__device__ __forceinline__ u64* bw_stage() {
    __shared__ u64 stage[BWD_ROWS_WARPS][32 * 8];
    return stage[threadIdx.x >> 5];
}

__device__ __forceinline__ void bw_stage_put(u64* st, int lane, int E, bool write, u32 live, const int* id,
                                             const float* v) {
    __syncwarp();  // the previous tile's reads of the stage
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int off = write && ((live >> j) & 1u) ? lane * E + id[j] : -1;
        const u32 bits = off >= 0 ? __float_as_uint(v[j]) : 0u;
        st[lane * 8 + ((j + lane) & 7)] = ((u64)(u32)off << 32) | (u64)bits;
    }
}

// The tile's zeros, then its staged slot stores: one store instruction writes the slots of 4 rows.
__device__ __forceinline__ void bw_stage_drain(const BwdParams& p, const u64* st, long long r0, int rows, int lane) {
    bw_rows_zero(p, r0, rows, lane);
    __syncwarp();  // the zeros and the stage before the slot stores
    float* out = (float*)p.dz + r0 * p.E;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const u64 e = st[k * 32 + lane];
        const int off = (int)(u32)(e >> 32);
        if (off >= 0) out[off] = __uint_as_float((u32)e);
    }
}

// FAST: the ids and upstream gradient read 16 bytes at a time (bw_rows_slots' VEC) and 16-bit
// logits classified two per word (bw_rows_scan's PACK). STAGE (BW_RK = 8, 8 warps per block):
// the K slot stores of the tile's 32 rows go through shared memory so that each store
// instruction writes the slots of 4 rows (at most 4 rows' lines) rather than one slot of 32 rows.
// PIPE (with STAGE): the stores of the warp's previous tile (prev_r0, prev_rows; prev_rows 0:
// none) are issued while this tile's first loads are in flight; the caller drains the last tile.
template <int BW_RK, int NB, bool SPEC, bool FAST = false, bool STAGE = false, bool PIPE = false>
__device__ __forceinline__ void bw_rows_tile_early(const BwdParams& p, long long r0, int lane, long long prev_r0 = 0,
                                                   int prev_rows = 0) {
    const int E = p.E, K = p.K;
    const int rows = p.T - r0 < 32 ? (int)(p.T - r0) : 32;
    const bool mine = lane < rows;
    const long long row = r0 + lane;
    int id[BW_RK];
    float g[BW_RK], x[BW_RK], v[BW_RK];
    bool ids_bad = false, valued = false, ok = false;
    u32 live = 0u;  // bit j: slot j above -inf (stored)
    if (mine) bw_rows_slots<BW_RK, FAST>(p, row, id, g, ids_bad);
    u32 badm, livem;
    // During the pass: the gather waits for the ids while the first batch is in flight, and (SPEC)
    // the slot values, computed before the row's checks and used only if they pass, while the
    // second batch is, or after the pass when there is none; else after the checks.
    auto during = [&](int it) {
        if (PIPE && it == 0 && prev_rows > 0) bw_stage_drain(p, bw_stage(), prev_r0, prev_rows, lane);
        if (!mine) return;
        if (it == 0) {
            const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
#pragma unroll
            for (int j = 0; j < BW_RK; j++)
                x[j] = j < K ? load_logit(lr, (u32)id[j] < (u32)E ? id[j] : E - 1) : 0.0f;
        } else if (SPEC && !valued) {
            valued = true;
            ok = bw_rows_values<BW_RK, false>(p, row, g, x, v);
#pragma unroll
            for (int j = 0; j < BW_RK; j++)
                if (j < K && x[j] != F32_NEG_INF) live |= 1u << j;
        }
    };
    bw_rows_scan<NB, decltype(during), FAST>(p, r0, rows, lane, badm, livem, during);
    badm = bw_warp_or(badm);
    livem = bw_warp_or(livem);
    bool write = false;
    if (mine) {
        if (bw_rows_repeated<BW_RK>(p, id, ids_bad)) {
            bw_report(p, err_ids(row));
        } else if ((badm >> lane) & 1u) {
            bw_report(p, err_nonfinite(row, bw_first_bad(p, row)));
        } else {
            if (!SPEC) {
                ok = bw_rows_values<BW_RK, false>(p, row, g, x, v);
#pragma unroll
                for (int j = 0; j < BW_RK; j++)
                    if (j < K && x[j] != F32_NEG_INF) live |= 1u << j;
            }
            if (!((livem >> lane) & 1u) || !ok)
                bw_report(p, err_all_masked(row));
            else
                write = true;
        }
    }
    if (STAGE) {
        static_assert(!STAGE || BW_RK == 8, "the staged stores hold 8 slots per row");
        u64* st = bw_stage();
        bw_stage_put(st, lane, E, write, live, id, v);
        if (!PIPE) bw_stage_drain(p, st, r0, rows, lane);
        return;
    }
    bw_rows_zero(p, r0, rows, lane);
    __syncwarp();  // the zeros before the slot stores (memory order within the warp)
    if (!write) return;
    float* out = (float*)p.dz + row * E;
#pragma unroll
    for (int j = 0; j < BW_RK; j++)
        if ((live >> j) & 1u) out[id[j]] = v[j];
}

// BW_RK: slot arrays; NB: 16-byte pieces in flight per lane; PF: the row's ids and upstream
// gradient loaded before the flat pass (in flight with it) rather than after.
template <int BW_RK, int NB, bool PF>
__device__ __forceinline__ void bw_rows_tile(const BwdParams& p, long long r0, int lane) {
    const int E = p.E, K = p.K;
    const int rows = p.T - r0 < 32 ? (int)(p.T - r0) : 32;
    int id[BW_RK];
    float g[BW_RK];
    bool ids_bad = false;
    if (PF && lane < rows) bw_rows_slots<BW_RK>(p, r0 + lane, id, g, ids_bad);
    // 1. Flat pass over the tile.
    u32 badm, livem;
    bw_rows_scan<NB>(p, r0, rows, lane, badm, livem);
    bw_rows_zero(p, r0, rows, lane);
    badm = bw_warp_or(badm);
    livem = bw_warp_or(livem);
    __syncwarp();  // the zeros before the slot stores (memory order within the warp)

    // 2. Row r0 + lane.
    if (lane >= rows) return;
    const long long row = r0 + lane;
    if (!PF) bw_rows_slots<BW_RK>(p, row, id, g, ids_bad);
    if (bw_rows_repeated<BW_RK>(p, id, ids_bad)) {
        bw_report(p, err_ids(row));
        return;
    }
    if ((badm >> lane) & 1u) {
        bw_report(p, err_nonfinite(row, bw_first_bad(p, row)));
        return;
    }
    if (!((livem >> lane) & 1u)) {
        bw_report(p, err_all_masked(row));
        return;
    }
    const logit_t* lr = (const logit_t*)p.logits + row * p.ld;
    float x[BW_RK], v[BW_RK];
#pragma unroll
    for (int j = 0; j < BW_RK; j++) x[j] = j < K ? load_logit(lr, id[j]) : 0.0f;
    if (!bw_rows_values<BW_RK>(p, row, g, x, v)) return;
    float* out = (float*)p.dz + row * E;
#pragma unroll
    for (int j = 0; j < BW_RK; j++)
        if (j < K && x[j] != F32_NEG_INF) out[id[j]] = v[j];
}

// EARLY: bw_rows_tile_early's order (PF implied; SPEC: the values during the pass), else
// bw_rows_tile's.
template <int RK, int NB, bool PF, bool EARLY, bool SPEC = true, bool FAST = false, bool STAGE = false,
          bool PIPE = false>
__device__ __forceinline__ void bw_rows(const BwdParams& p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long tiles = (p.T + 31) / 32;
    long long prev_r0 = 0;
    int prev_rows = 0;
    for (long long t = (long long)blockIdx.x * (blockDim.x >> 5) + warp; t < tiles;
         t += (long long)gridDim.x * (blockDim.x >> 5)) {
        if (EARLY) {
            bw_rows_tile_early<RK, NB, SPEC, FAST, STAGE, PIPE>(p, t * 32, lane, prev_r0, prev_rows);
            prev_r0 = t * 32;
            prev_rows = p.T - prev_r0 < 32 ? (int)(p.T - prev_r0) : 32;
        } else {
            bw_rows_tile<RK, NB, PF>(p, t * 32, lane);
        }
    }
    if (PIPE && prev_rows > 0) bw_stage_drain(p, bw_stage(), prev_r0, prev_rows, lane);
}

// The instantiations (BackwardRowsVariant in src/backward.rs; the first two are the defaults for
// K <= 8 and K <= 16, the others are measured against the first by bench-cuda --backward). On the
// H200 (2026-12-03): the early order is 14-26% faster than the late one; staging the slot stores
// saves up to 9% more (Qwen3 bf16), and piping each tile's stores behind the next tile's loads
// (resident grid: 2 blocks per SM) up to 9% more again. At most 128 registers: 2 blocks of 256
// threads per SM. The piped kernel launches at most 2 blocks per SM (src/backward.rs), the
// others one tile per warp.
extern "C" __global__ void __launch_bounds__(256, 2) bwd_grad_rows8(BwdParams p) { bw_rows<8, 8, true, true, true, true, true, true>(p); }
extern "C" __global__ void __launch_bounds__(256) bwd_grad_rows16(BwdParams p) { bw_rows<16, 4, true, false>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) bwd_grad_rows8_staged(BwdParams p) { bw_rows<8, 8, true, true, true, true, true>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) bwd_grad_rows8_early(BwdParams p) { bw_rows<8, 8, true, true>(p); }
extern "C" __global__ void __launch_bounds__(256) bwd_grad_rows8_late(BwdParams p) { bw_rows<8, 8, true, false>(p); }
