// Host shim: compiles the kernels' device math as plain C++ (g++ -ffp-contract=off) so that the
// CUDA C mirror of the portable math can be compared with core/src/math.rs without a GPU.
#include <cmath>
#include <cstring>
#include <cstdint>
#define __device__
#define __forceinline__ inline
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
