// What the chunked WKV kernels (wkv7_chunked.cu, wkv_diag_chunked.cu) share: launch spellings,
// 16 x 16 x 16 tile products on tensor cores from shared memory, shared-memory layout helpers, and the
// moves of a block's float32 state (and its bf16 copy) between global and shared memory. Every
// build defines HEAD_SIZE; tests/cuda_cpu/cuda_cpu.h supplies CPU spellings of what is CUDA-only.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <cstdint>
#include <type_traits>

#ifndef HEAD_SIZE
#error "compile with -DHEAD_SIZE=<head size>"
#endif

#ifndef WKV_LAUNCH  // the CUDA spellings; tests/cuda_cpu/cuda_cpu.h defines CPU ones
#define WKV_LAUNCH(kernel, grid, threads, smem, stream, ...) kernel<<<grid, threads, smem, stream>>>(__VA_ARGS__)
#define WKV_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
// A launch in clusters of `cluster` consecutive blocks along x.
#define WKV_LAUNCH_CLUSTER(kernel, grid, threads, smem, stream, cluster, ...)                 \
    do {                                                                                      \
        cudaLaunchConfig_t config_ = {};                                                      \
        config_.gridDim = grid, config_.blockDim = dim3(threads);                             \
        config_.dynamicSmemBytes = smem, config_.stream = stream;                             \
        cudaLaunchAttribute attribute_[1];                                                    \
        attribute_[0].id = cudaLaunchAttributeClusterDimension;                               \
        attribute_[0].val.clusterDim.x = cluster;                                             \
        attribute_[0].val.clusterDim.y = 1, attribute_[0].val.clusterDim.z = 1;               \
        config_.attrs = attribute_, config_.numAttrs = 1;                                     \
        cudaLaunchKernelEx(&config_, kernel, __VA_ARGS__);                                    \
    } while (0)
#define WKV_ALLOW_SMEM(kernel, bytes)                                                         \
    (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),   \
     cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, int(cudaSharedmemCarveoutMaxShared)))
#else
#define WKV_ALLOW_SMEM(kernel, bytes) ((void)0)
#endif

namespace wkvc {

using bf16 = __nv_bfloat16;
namespace wmma = nvcuda::wmma;
namespace cg = cooperative_groups;
using row = wmma::row_major;
using col = wmma::col_major;

constexpr int N = HEAD_SIZE;
constexpr int L = 16;  // steps per chunk
constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int LDH = N + 8;  // leading dimension of [rows][N] tiles (bf16 and float): 16-byte multiples

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Shared memory of one block, carved in 128-byte aligned pieces (wmma needs 32-byte aligned tiles).
struct Carve {
    size_t end = 0;
    __host__ __device__ constexpr size_t take(size_t bytes) {
        const size_t at = end;
        end = align128(end + bytes);
        return at;
    }
};

__host__ __device__ constexpr size_t larger(size_t a, size_t b) { return a > b ? a : b; }

__device__ __forceinline__ float f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16(x); }

template <typename Layout>
constexpr bool is_row = std::is_same<Layout, row>::value;

// A bf16 fragment from shared memory. wmma::load_matrix_sync names no state space for bf16, so ptxas
// moves the fragment with per-lane generic loads (LD, and MOVM to transpose a column-major one); the
// same PTX instruction with .shared is one LDSM per fragment. `make cuda-check` counts what is left.
template <typename Use, typename Layout>
__device__ __forceinline__ void load_shared(wmma::fragment<Use, 16, 16, 16, bf16, Layout>& f, const bf16* p,
                                            unsigned ld) {
#ifdef WKV_CPU_EMULATION
    wmma::load_matrix_sync(f, p, ld);
#else
    unsigned* x = reinterpret_cast<unsigned*>(&f.x[0]);  // 8 bf16: 4 registers, as the wmma builtin fills them
    const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(p));
#define WKV_LOAD_SHARED(use, layout)                                                                    \
    asm volatile("wmma.load." use ".sync.aligned." layout ".m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;" \
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])                                       \
                 : "r"(at), "r"(ld)                                                                      \
                 : "memory")
    constexpr bool a = std::is_same<Use, wmma::matrix_a>::value;
    if constexpr (a && is_row<Layout>)
        WKV_LOAD_SHARED("a", "row");
    else if constexpr (a)
        WKV_LOAD_SHARED("a", "col");
    else if constexpr (is_row<Layout>)
        WKV_LOAD_SHARED("b", "row");
    else
        WKV_LOAD_SHARED("b", "col");
#undef WKV_LOAD_SHARED
#endif
}

// C (+)= A B for the 16 x 16 tile of C at c; a, b point at the tile's first row of A and first
// column of B (element (m, k) of A is a[m * lda + k] row-major, a[k * lda + m] column-major).
// Alternate k steps go to two accumulators, added at the end: two dependent chains of half the
// length, so a warp waits on the tensor cores' latency half as long. Where a_lo is given (at the
// same offsets as a), C (+)= (A + A_lo) B: a float32 A passed as its bf16 rounding and the bf16
// rounding of the rest, 16 bits of mantissa, each B fragment used twice (A_lo into the second
// accumulator). Where c_t is given, the tile is also stored transposed there (c_t[j * ldc_t + i] = C[i][j]).
template <typename LA, typename LB>
__device__ __forceinline__ void tile_mma(float* c, int ldc, const bf16* a, int lda, const bf16* b, int ldb, int K,
                                         bool accumulate, float* c_t = nullptr, int ldc_t = 0,
                                         const bf16* a_lo = nullptr) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    if (accumulate)
        wmma::load_matrix_sync(acc[0], c, ldc, wmma::mem_row_major);
    else
        wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
#pragma unroll
    for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> fb;
        const int at = is_row<LA> ? k : k * lda;
        load_shared(fa, a + at, lda);
        load_shared(fb, b + (is_row<LB> ? k * ldb : k), ldb);
        if (a_lo) {
            wmma::mma_sync(acc[0], fa, fb, acc[0]);
            load_shared(fa, a_lo + at, lda);
            wmma::mma_sync(acc[1], fa, fb, acc[1]);
        } else {
            wmma::mma_sync(acc[k / 16 % 2], fa, fb, acc[k / 16 % 2]);
        }
    }
    if (K > 16 || a_lo)
#pragma unroll
        for (int i = 0; i < acc[0].num_elements; i++) acc[0].x[i] += acc[1].x[i];
    wmma::store_matrix_sync(c, acc[0], ldc, wmma::mem_row_major);
    if (c_t) wmma::store_matrix_sync(c_t, acc[0], ldc_t, wmma::mem_col_major);
}

// C[rows x cols] (+)= A[rows x K] B[K x cols], row-major float C, and where c_t is given C^T there
// too, and where a_lo is given (A + A_lo) B as tile_mma takes it; the tiles are dealt out to the warps.
template <typename LA, typename LB>
__device__ __forceinline__ void matmul(float* c, int ldc, const bf16* a, int lda, const bf16* b, int ldb, int rows,
                                       int cols, int K, bool accumulate, float* c_t = nullptr, int ldc_t = 0,
                                       const bf16* a_lo = nullptr) {
    const int warp = threadIdx.x / 32, tiles_n = cols / 16, tiles = rows / 16 * tiles_n;
    for (int tile = warp; tile < tiles; tile += WARPS) {
        const int m0 = tile / tiles_n * 16, n0 = tile % tiles_n * 16, a_at = is_row<LA> ? m0 * lda : m0;
        const bf16* b0 = b + (is_row<LB> ? n0 : n0 * ldb);
        tile_mma<LA, LB>(c + m0 * ldc + n0, ldc, a + a_at, lda, b0, ldb, K, accumulate,
                         c_t ? c_t + n0 * ldc_t + m0 : nullptr, ldc_t, a_lo ? a_lo + a_at : nullptr);
    }
}

// Offsets into a [B, T, H, N] tensor for one block's batch b and head h: element (b, t, h, n) is
// at(t, n), a step further is stride on. Worked out once per block, so an access costs an add.
struct HeadRows {
    int64_t first, stride;  // the offsets of (b, 0, h, 0) and of one step
    __device__ __forceinline__ HeadRows(int T, int H, int b, int h)
        : first((int64_t(b) * T * H + h) * N), stride(int64_t(H) * N) {}
    __device__ __forceinline__ int64_t at(int t, int n) const { return first + t * stride + n; }
};

// A block's ROWS value rows of the float32 state (or its gradient), N columns, in shared memory:
// row-major with leading dimension LDH, with a bf16 copy for the products. The helpers deal them
// out in 16-byte pieces of 4 columns: a thread's i-th piece is row tid / QROW + i * (THREADS /
// QROW), columns 4 (tid % QROW) .. + 3, so a thread keeps the same columns (one decay per column)
// and its global pieces are contiguous (the rows are consecutive rows of the [N][N] state).
constexpr int QROW = N / 4;  // 4-float pieces per row
template <int ROWS>
constexpr int QUADS = ROWS * N / (4 * THREADS);  // pieces per thread
static_assert(THREADS % QROW == 0 && 16 * N % (4 * THREADS) == 0 && LDH % 4 == 0, "whole aligned pieces");
__device__ __forceinline__ int quad_at(int i) {  // the piece's offset in a [rows][LDH] tile
    return (threadIdx.x / QROW + i * (THREADS / QROW)) * LDH + threadIdx.x % QROW * 4;
}
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void store4(float* p, float4 x) { *reinterpret_cast<float4*>(p) = x; }
__device__ __forceinline__ float4 add4(float4 a, float4 b) {
    a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
    return a;
}
__device__ __forceinline__ void store_bf16x4(bf16* p, float4 x) {  // 8-byte aligned p
    __nv_bfloat162* q = reinterpret_cast<__nv_bfloat162*>(p);
    q[0] = __floats2bfloat162_rn(x.x, x.y), q[1] = __floats2bfloat162_rn(x.z, x.w);
}
__device__ __forceinline__ uint4 to_bf16x8(float4 a, float4 b) {  // 8 floats as one 16-byte piece of bf16
    uint4 q;
    bf16* h = reinterpret_cast<bf16*>(&q);
    store_bf16x4(h, a), store_bf16x4(h + 4, b);
    return q;
}
template <int ROWS>
__device__ __forceinline__ void load_state(const float* src, float* f, bf16* h) {  // src 16-byte aligned
    float4 q[QUADS<ROWS>];
#pragma unroll
    for (int i = 0; i < QUADS<ROWS>; i++) q[i] = load4(src + (threadIdx.x + i * THREADS) * 4);
#pragma unroll
    for (int i = 0; i < QUADS<ROWS>; i++) store4(f + quad_at(i), q[i]), store_bf16x4(h + quad_at(i), q[i]);
}
template <int ROWS>
__device__ __forceinline__ void store_state(const float* f, float* dst) {
#pragma unroll
    for (int i = 0; i < QUADS<ROWS>; i++) store4(dst + (threadIdx.x + i * THREADS) * 4, load4(f + quad_at(i)));
}
template <int ROWS>
__device__ __forceinline__ void round_state(const float* f, bf16* h) {
#pragma unroll
    for (int i = 0; i < QUADS<ROWS>; i++) store_bf16x4(h + quad_at(i), load4(f + quad_at(i)));
}
template <int ROWS>
__device__ __forceinline__ void scale_columns(float* f, const float* decay) {  // f[:, j] *= decay[j]
    const float4 d = load4(decay + threadIdx.x % QROW * 4);
#pragma unroll
    for (int i = 0; i < QUADS<ROWS>; i++) {
        float4 x = load4(f + quad_at(i));
        x.x *= d.x, x.y *= d.y, x.z *= d.z, x.w *= d.w;
        store4(f + quad_at(i), x);
    }
}
// A block's rows of a chunk-start state saved in global memory ([N][N] bf16), to and from Sh, 16
// bytes per access; a thread's loads are all issued before its stores. With few rows (16 at N = 32)
// there are fewer pieces than threads, and the rest sit out.
constexpr int VEC = 8;  // bf16 per 16-byte access
template <int ROWS>
constexpr int STATE_VECS = (ROWS * N / VEC + THREADS - 1) / THREADS;  // 16-byte pieces per thread
static_assert(N % VEC == 0 && LDH % VEC == 0, "whole 16-byte pieces, aligned in Sh");
__device__ __forceinline__ bool has_piece(int rows, int i) { return (int(threadIdx.x) + i * THREADS) * VEC < rows * N; }
template <int ROWS>
struct SavedState {
    uint4 piece[STATE_VECS<ROWS>];
};
template <int ROWS>
__device__ __forceinline__ void load_saved(const bf16* src, SavedState<ROWS>& s) {
#pragma unroll
    for (int i = 0; i < STATE_VECS<ROWS>; i++)
        if (has_piece(ROWS, i)) s.piece[i] = *reinterpret_cast<const uint4*>(src + (threadIdx.x + i * THREADS) * VEC);
}
template <int ROWS>
__device__ __forceinline__ void store_saved(const SavedState<ROWS>& s, bf16* Sh) {
#pragma unroll
    for (int i = 0; i < STATE_VECS<ROWS>; i++) {
        const int e = (threadIdx.x + i * THREADS) * VEC;
        if (has_piece(ROWS, i)) *reinterpret_cast<uint4*>(Sh + e / N * LDH + e % N) = s.piece[i];
    }
}
template <int ROWS>
__device__ __forceinline__ void save_state(const bf16* Sh, bf16* dst) {
#pragma unroll
    for (int i = 0; i < STATE_VECS<ROWS>; i++) {
        const int e = (threadIdx.x + i * THREADS) * VEC;
        if (has_piece(ROWS, i))
            *reinterpret_cast<uint4*>(dst + e) = *reinterpret_cast<const uint4*>(Sh + e / N * LDH + e % N);
    }
}

// A chunk's tile of a [B, T, H, N] tensor, L steps by COLS channels, moved between global and shared
// memory in 16-byte pieces (E elements each): piece p = tid + i THREADS is step p / ROW, channels
// column(i) .. + E - 1, so a warp's accesses are whole rows and one instruction moves E elements.
// Loads fill the pieces past the chunk's last step with zeros; stores leave those steps alone.
template <typename T, int COLS>
struct Pieces {
    static constexpr int E = 16 / int(sizeof(T)), ROW = COLS / E, COUNT = L * ROW;
    static constexpr int PER_THREAD = (COUNT + THREADS - 1) / THREADS;
    static_assert(COLS % E == 0, "whole 16-byte pieces per row");
    uint4 piece[PER_THREAD];

    __device__ __forceinline__ static bool has(int i) {
        return COUNT % THREADS == 0 || int(threadIdx.x) + i * THREADS < COUNT;
    }
    __device__ __forceinline__ static int step(int i) { return (int(threadIdx.x) + i * THREADS) / ROW; }
    __device__ __forceinline__ static int column(int i) { return (int(threadIdx.x) + i * THREADS) % ROW * E; }

    // From channels c0 .. c0 + COLS - 1 of `src` at steps t0 .. t0 + steps - 1 (16-byte aligned rows).
    __device__ __forceinline__ void load(const T* src, const HeadRows& rows, int t0, int steps, int c0) {
#pragma unroll
        for (int i = 0; i < PER_THREAD; i++)
            if (has(i))
                piece[i] = step(i) < steps
                               ? *reinterpret_cast<const uint4*>(src + rows.at(t0 + step(i), c0 + column(i)))
                               : make_uint4(0, 0, 0, 0);
    }
    // Into a [L][ld] tile in shared memory (its first column at `tile`, 16-byte aligned rows).
    __device__ __forceinline__ void store(T* tile, int ld) const {
#pragma unroll
        for (int i = 0; i < PER_THREAD; i++)
            if (has(i)) *reinterpret_cast<uint4*>(tile + step(i) * ld + column(i)) = piece[i];
    }
    // The chunk's first `steps` rows of a [L][ld] shared-memory tile to channels c0 .. of `dst`.
    __device__ __forceinline__ static void write(const T* tile, int ld, T* dst, const HeadRows& rows, int t0, int steps,
                                                 int c0) {
#pragma unroll
        for (int i = 0; i < PER_THREAD; i++)
            if (has(i) && step(i) < steps)
                *reinterpret_cast<uint4*>(dst + rows.at(t0 + step(i), c0 + column(i))) =
                    *reinterpret_cast<const uint4*>(tile + step(i) * ld + column(i));
    }
};

// A chunk's factors are built one channel n = tid % N per thread, PER consecutive steps of it each.
constexpr int GROUPS = THREADS / N;  // threads per channel
constexpr int PER = L / GROUPS;      // steps per thread
static_assert(THREADS % N == 0 && L % GROUPS == 0 && PER % 2 == 0, "each thread builds whole steps of one channel");

// The end of a chunk's log-decay gradient, dlw_s = sum_{t>=s} dc_t + sum_{t>s} dc_ex[t] + dc_L, for
// key channel n at steps first .. first + STEPS - 1, where GROUPS_ threads share the channel, STEPS
// consecutive steps each. Each thread has summed its own steps (suffix[j]: over its steps u >= t of
// dc_t[u] and u > t of dc_ex[u]) and, before the barrier that precedes this, left two numbers in its
// own (step, channel) places of `shared` ([L][LDH] floats): at its first step the sum of dc_t + dc_ex
// over its steps, at the next its terms of dc_L. dc_L also has Z[n] e^(c_L) (decay[n]) from the
// state's decay. Steps whose log-decay was floored (bits of `floored`) get 0, as do none past `steps`.
template <int GROUPS_, int STEPS>
__device__ __forceinline__ void write_dlw(const float* shared, const float* Z, const float* decay, int n, int group,
                                          const float suffix[STEPS], unsigned floored, int steps, float* dlw,
                                          const HeadRows& g, int t0) {
    float later = Z[n] * decay[n];  // dc_L, then the later threads' steps
#pragma unroll
    for (int other = 0; other < GROUPS_; other++) {
        later += shared[(other * STEPS + 1) * LDH + n];
        if (other > group) later += shared[other * STEPS * LDH + n];
    }
    const int first = group * STEPS;
    dlw += g.at(t0 + first, n);
#pragma unroll
    for (int j = 0; j < STEPS; j++, dlw += g.stride) {
        const int t = first + j;
        if (t < steps) *dlw = floored >> t & 1 ? 0.f : later + suffix[j];
    }
}

// How many blocks a head's values may be split over (the state's value rows in RWKV-7's layout, its
// value columns in RWKV-5/6's): N / SPLIT each, whole 16-wide tiles (so 1 and 2 at N = 32, 1, 2 and 4
// at N = 64).
__host__ __device__ constexpr bool valid_split(int split) {
    return split >= 1 && split <= 4 && N % split == 0 && (N / split) % 16 == 0;
}

// Which part of a head a block works on: blockIdx.x = h * SPLIT + rank, values [v0, v0 + VALUES) of
// head h, and in the backward key channels [k0, k0 + KEYS) for the input gradients.
template <int SPLIT>
struct Part {
    static_assert(valid_split(SPLIT), "N / SPLIT values per block, whole 16-wide tiles");
    static constexpr int VALUES = N / SPLIT, KEYS = N / SPLIT;
    int h, rank, v0, k0;
    __device__ __forceinline__ Part()
        : h(blockIdx.x / SPLIT), rank(blockIdx.x % SPLIT), v0(rank * VALUES), k0(rank * KEYS) {}
};

// f(std::integral_constant<int, SPLIT>{}), the launch of one compiled split, and true for a split of 1,
// 2 or 4 that valid_split allows; false, launching nothing, for any other.
template <int SPLIT, typename F>
inline bool call_split(F& f) {
    if constexpr (valid_split(SPLIT)) {
        f(std::integral_constant<int, SPLIT>{});
        return true;
    } else {
        return false;
    }
}
template <typename F>
inline bool with_split(int split, F&& f) {
    switch (split) {
        case 1: return call_split<1>(f);
        case 2: return call_split<2>(f);
        case 4: return call_split<4>(f);
        default: return false;
    }
}

// kernel over B x H heads at SPLIT blocks each (blockIdx.x = h * SPLIT + rank, blockIdx.y = b) with
// `smem` bytes of dynamic shared memory; with `cluster` a head's blocks run as a thread block cluster.
template <int SPLIT, typename... Params, typename... Args>
inline void launch_heads(void (*kernel)(Params...), size_t smem, bool cluster, cudaStream_t stream, int B, int H,
                         Args... args) {
    WKV_ALLOW_SMEM(kernel, smem);
    if (SPLIT > 1 && cluster)
        WKV_LAUNCH_CLUSTER(kernel, dim3(H * SPLIT, B), THREADS, smem, stream, SPLIT, args...);
    else
        WKV_LAUNCH(kernel, dim3(H * SPLIT, B), THREADS, smem, stream, args...);
}

// The blocks of a split head form a thread block cluster (sm_90 and later; a build for an older
// device has the split kernels trap, and the binding never launches them there).
template <typename T>
__device__ __forceinline__ T* in_block(T* p, int rank) {  // p's place in the shared memory of cluster block `rank`
#if defined(_CG_HAS_CLUSTER_GROUP)
    return cg::this_cluster().map_shared_rank(p, rank);
#else
    __trap();
    return p;
#endif
}
// A barrier for every thread of the blocks sharing a head, with their shared-memory writes before it
// visible to all of them after it (one block: __syncthreads).
template <int SPLIT>
__device__ __forceinline__ void sync_head() {
    if constexpr (SPLIT == 1) {
        __syncthreads();
    } else {
#if defined(_CG_HAS_CLUSTER_GROUP)
        cg::this_cluster().sync();
#else
        __trap();
#endif
    }
}

}  // namespace wkvc
