// Reads f32 pairs (a, b) from stdin, writes exp(a), div(a,b), ln|a|, sqrt|a|, sigmoid(a),
// sqrt_softplus(a) as f32 bits to stdout (the portable mirror in kernels/math.cu).
#include "host_emu.h"
#include <cstdio>
#include <vector>
#define PORTABLE 1
#include "../kernels/math.cu"
int main() {
    float ab[2];
    std::vector<float> out;
    while (std::fread(ab, 4, 2, stdin) == 2) {
        float a = ab[0], b = ab[1];
        float r[6] = {p_exp(a), p_div(a, b), p_ln(abs_f(a)), p_sqrt(abs_f(a)), p_sigmoid(a), p_sqrt_softplus(a)};
        std::fwrite(r, 4, 6, stdout);
    }
    return 0;
}
