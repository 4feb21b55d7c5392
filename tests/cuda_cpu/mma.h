// nvcuda::wmma for cuda_cpu.h: 16x16x16 tiles, bf16 operands, float accumulators. Every lane holds
// the whole tile and computes it (the real fragments are spread over the warp's lanes, which the
// kernels never rely on: they only load, multiply, add fragments of the same kind element by element
// and store). Stores come from lane 0 only. The
// rules of the real API are checked: 32-byte aligned pointers, ldm a multiple of 16 bytes.
#pragma once

#include <type_traits>

#include "cuda_bf16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "cuda_cpu emulates 16x16x16 tiles only");
    static constexpr int num_elements = 256;
    float x[256];  // [row * 16 + column] of the tile: A is m x k, B is k x n, the accumulator m x n
    float& at(int i, int j) { return x[i * 16 + j]; }
    float at(int i, int j) const { return x[i * 16 + j]; }
};

namespace detail {
inline void check(const void* ptr, unsigned ldm, unsigned element_bytes) {
    if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) cuda_cpu::fail("wmma: tile pointer is not 32-byte aligned");
    if ((ldm * element_bytes) % 16 != 0) cuda_cpu::fail("wmma: ldm is not a multiple of 16 bytes");
}
inline float value(const __nv_bfloat16& x) { return __bfloat162float(x); }
inline float value(const float& x) { return x; }
}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
    detail::check(ptr, ldm, sizeof(T));
    constexpr bool row = std::is_same_v<Layout, row_major>;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) f.at(i, j) = detail::value(row ? ptr[i * ldm + j] : ptr[j * ldm + i]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
    detail::check(ptr, ldm, 4);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) f.at(i, j) = layout == mem_row_major ? ptr[i * ldm + j] : ptr[j * ldm + i];
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
    detail::check(ptr, ldm, 4);
    __syncwarp();  // every lane has finished reading what the store may overwrite
    if (threadIdx.x % 32 == 0)
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 16; j++) (layout == mem_row_major ? ptr[i * ldm + j] : ptr[j * ldm + i]) = f.at(i, j);
    __syncwarp();
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
    for (float& e : f.x) e = v;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    fragment<accumulator, 16, 16, 16, float> out;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float s = c.at(i, j);
            for (int k = 0; k < 16; k++) s += a.at(i, k) * b.at(k, j);
            out.at(i, j) = s;
        }
    d = out;
}

}  // namespace wmma
}  // namespace nvcuda
