// Reads f32 pairs (a, b) from stdin, writes exp(a), div(a,b), ln|a|, sqrt|a|, sigmoid(a),
// sqrt_softplus(a) as f32 bits to stdout (the portable mirror in kernels/math.cu).
// With the argument `bounded`: compares the bounded forms with the general ones on their domains
// (p_exp_bounded with p_exp on every 7th bit pattern of x <= C_EXP_HI and on every pattern
// near the cases' edges; p_div_by_pos with p_div_by on the pairs of stdin whose a is finite with
// its sign bit clear and whose b is positive, finite and normal), prints "checked N mismatched M"
// and the first mismatches.
#include "host_emu.h"
#include <cstdio>
#include <cstring>
#include <vector>
#define PORTABLE 1
#include "../kernels/math.cu"

static unsigned long long checked = 0, bad = 0;

static void check_exp(u32 bits) {
    const float x = __uint_as_float(bits);
    if (is_nan_f(x) || x > C_EXP_HI) return;
    checked++;
    const float w = p_exp(x), g = p_exp_bounded(x);
    if (__float_as_uint(w) != __float_as_uint(g) && bad++ < 10)
        std::printf("exp(%a): %08x bounded %08x\n", x, __float_as_uint(w), __float_as_uint(g));
}

static int bounded() {
    for (unsigned long long b = 0; b <= 0xffffffffull; b += 7) check_exp((u32)b);
    // Around the edges: 0, C_TINY, C_EXP_LO, C_EXP_HI, the subnormals, -inf (both signs).
    const float edges[] = {0.0f, C_TINY, C_EXP_LO, C_EXP_HI, 1.17549435e-38f, F32_POS_INF, 1.0f, 0.5f};
    for (float e : edges)
        for (u32 sgn : {0u, 0x80000000u})
            for (int d = -200000; d <= 200000; d++) check_exp((__float_as_uint(e) | sgn) + (u32)d);
    float ab[2];
    while (std::fread(ab, 4, 2, stdin) == 2) {
        const float a = ab[0], b = ab[1];
        if (!is_finite_f(a) || (__float_as_uint(a) >> 31) != 0u || !(b >= 1.17549435e-38f) || !is_finite_f(b)) continue;
        checked++;
        const PDiv d = p_div_pre(b);
        const float w = p_div_by(a, d), g = p_div_by_pos(a, d);
        if (__float_as_uint(w) != __float_as_uint(g) && bad++ < 10)
            std::printf("div(%a, %a): %08x bounded %08x\n", a, b, __float_as_uint(w), __float_as_uint(g));
    }
    std::printf("checked %llu mismatched %llu\n", checked, bad);
    return 0;
}

int main(int argc, char** argv) {
    if (argc > 1 && std::strcmp(argv[1], "bounded") == 0) return bounded();
    float ab[2];
    std::vector<float> out;
    while (std::fread(ab, 4, 2, stdin) == 2) {
        float a = ab[0], b = ab[1];
        float r[6] = {p_exp(a), p_div(a, b), p_ln(abs_f(a)), p_sqrt(abs_f(a)), p_sigmoid(a), p_sqrt_softplus(a)};
        std::fwrite(r, 4, 6, stdout);
    }
    return 0;
}
