// Shared machinery of the matrix-state WKV kernels (v5, v6, v7).
//
// One thread block runs one (batch, head) pair through time. The N x N float32 state is split over
// the block by lines: a line is one row or one column of the state (which one depends on the pass).
// SPLIT = N / SEG consecutive lanes of a warp share a group of LINES consecutive lines, each lane
// holding the same SEG-element segment of each of them in registers, so one segment of a per-step
// vector read from shared memory feeds LINES lines (shared-memory bandwidth is what limits these
// kernels). A dot product along a line is a per-thread partial sum plus a shuffle reduction over
// the SPLIT lanes.
//
// The per-step vectors (r, k, v, decay, ...) are staged in shared memory CT steps at a time, converted
// to float32 once. In shared memory a vector of N values is stored in SPLIT segments of SEG floats,
// each padded by 4 floats, so the SPLIT lanes of a line read their segments as float4 without bank
// conflicts, and lanes of different lines reading the same segment get a broadcast. Outputs are
// collected the same way and written out CT steps at a time, coalesced.
//
// Nothing depends on T at compile time: the last chunk is padded with zeros inside the kernel and
// only its first T - t0 steps are run.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#ifndef HEAD_SIZE
#error "compile with -DHEAD_SIZE=<head size>"
#endif

namespace wkv {

using bf16 = __nv_bfloat16;

constexpr int N = HEAD_SIZE;
constexpr int SEG = 16;                        // state elements per thread and line
constexpr int SPLIT = N / SEG;                 // lanes per state line
constexpr int LINES = N >= 64 ? 4 : 2;         // state lines per thread: each staged segment feeds LINES lines
constexpr int THREADS = N / LINES * SPLIT;     // one block: every line of one (batch, head)
constexpr int PAD_SEG = SEG + 4;               // a segment in shared memory, padded against bank conflicts
constexpr int ROW = SPLIT * PAD_SEG;           // one staged vector (one step) in shared memory
// Blocks per multiprocessor the register budget is planned for: up to 255 registers per thread (the
// state, LINES x SEG floats, plus the next chunk's loads in flight).
constexpr int MIN_BLOCKS = 65536 / (THREADS * 255) < 1 ? 1 : 65536 / (THREADS * 255);
static_assert(N % SEG == 0 && SPLIT >= 1 && SPLIT <= 32, "head size must be a multiple of 16, at most 512");
static_assert(SEG % LINES == 0, "a thread's lines must lie in one padded segment");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "a block must be whole warps, at most 1024 threads");

// Steps staged per chunk: at most 4 (the next chunk's loads wait in registers), and `vectors` staged vectors within about 40 KB of shared memory.
constexpr int chunk_steps(int vectors) {
    return (40000 / (vectors * ROW * 4)) < 1 ? 1 : (40000 / (vectors * ROW * 4)) > 4 ? 4 : (40000 / (vectors * ROW * 4));
}

__device__ __forceinline__ int padded(int j) { return j + (j / SEG) * (PAD_SEG - SEG); }

// Sum over the SPLIT lanes that share a line (consecutive lanes, aligned to SPLIT).
__device__ __forceinline__ float line_sum(float x) {
#pragma unroll
    for (int offset = SPLIT / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// Where one per-step vector lives in global memory: element j of step t is at
// ptr[b * batch_stride + t * step_stride + h * N + j]. Inputs [B, T, H, N] have step_stride H*N;
// a per-head constant (v5's decay) has step_stride = batch_stride = 0.
template <typename T>
struct Stream {
    T* ptr;
    int64_t batch_stride;
    int64_t step_stride;
    __device__ __forceinline__ int64_t offset(int b, int h, int t) const {
        return b * batch_stride + t * step_stride + int64_t(h) * N;
    }
};

template <typename T>
__host__ __device__ inline Stream<T> stream(T* ptr, int T_, int H) {
    return Stream<T>{ptr, int64_t(T_) * H * N, int64_t(H) * N};
}

__device__ __forceinline__ void unpack8(const uint4& raw, float out[8]) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(pairs[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

struct Identity {
    __device__ __forceinline__ float operator()(float x, int) const { return x; }
};
struct Exp {  // log-decay -> decay
    __device__ __forceinline__ float operator()(float x, int) const { return __expf(x); }
};
struct TimesConst {  // x * c[j], c a per-head constant vector (v5/v6's bonus u)
    const float* c;
    __device__ __forceinline__ float operator()(float x, int j) const { return x * c[j]; }
};

// Software pipelining of the staging: `get` issues this thread's global loads of one vector for one
// chunk into registers (all vectors' loads are in flight together, and the next chunk's loads
// overlap the current chunk's compute); `put` converts them into the shared-memory layout.
template <int CT, typename T>
struct Fetch;

template <int CT>
struct Fetch<CT, bf16> {
    static constexpr int UNITS = CT * N / 8, PER = (UNITS + THREADS - 1) / THREADS;  // 8 bf16 = 16 bytes
    uint4 raw[PER];
    __device__ __forceinline__ void get(Stream<const bf16> src, int b, int h, int t0, int T) {
#pragma unroll
        for (int m = 0; m < PER; m++) {
            const int u = threadIdx.x + m * THREADS, s = u / (N / 8), j = (u % (N / 8)) * 8;
            raw[m] = make_uint4(0u, 0u, 0u, 0u);
            if (u < UNITS && t0 + s < T) raw[m] = *reinterpret_cast<const uint4*>(src.ptr + src.offset(b, h, t0 + s) + j);
        }
    }
    template <typename Op = Identity>
    __device__ __forceinline__ void put(float* dst, Op op = Op()) const {
#pragma unroll
        for (int m = 0; m < PER; m++) {
            const int u = threadIdx.x + m * THREADS, s = u / (N / 8), j = (u % (N / 8)) * 8;
            if (u >= UNITS) break;
            float x[8];
            unpack8(raw[m], x);
            float* row = dst + s * ROW + padded(j);  // j .. j+7 lie in one segment
#pragma unroll
            for (int i = 0; i < 8; i++) row[i] = op(x[i], j + i);
        }
    }
};

template <int CT>
struct Fetch<CT, float> {
    static constexpr int UNITS = CT * N / 4, PER = (UNITS + THREADS - 1) / THREADS;  // 4 floats = 16 bytes
    float4 raw[PER];
    __device__ __forceinline__ void get(Stream<const float> src, int b, int h, int t0, int T) {
#pragma unroll
        for (int m = 0; m < PER; m++) {
            const int u = threadIdx.x + m * THREADS, s = u / (N / 4), j = (u % (N / 4)) * 4;
            raw[m] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (u < UNITS && t0 + s < T) raw[m] = *reinterpret_cast<const float4*>(src.ptr + src.offset(b, h, t0 + s) + j);
        }
    }
    template <typename Op = Identity>
    __device__ __forceinline__ void put(float* dst, Op op = Op()) const {
#pragma unroll
        for (int m = 0; m < PER; m++) {
            const int u = threadIdx.x + m * THREADS, s = u / (N / 4), j = (u % (N / 4)) * 4;
            if (u >= UNITS) break;
            float* row = dst + s * ROW + padded(j);
            row[0] = op(raw[m].x, j);
            row[1] = op(raw[m].y, j + 1);
            row[2] = op(raw[m].z, j + 2);
            row[3] = op(raw[m].w, j + 3);
        }
    }
};

// Write steps t0 .. min(t0+CT, T)-1 of a staged output vector src[CT][ROW] to global memory.
template <int CT>
__device__ __forceinline__ void unstage(const float* src, Stream<bf16> dst, int b, int h, int t0, int T) {
    constexpr int UNITS = CT * N / 8;
    for (int u = threadIdx.x; u < UNITS; u += THREADS) {
        const int s = u / (N / 8), j = (u % (N / 8)) * 8;
        if (t0 + s >= T) continue;
        const float* row = src + s * ROW + padded(j);
        uint4 raw;
        __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; i++) pairs[i] = __floats2bfloat162_rn(row[2 * i], row[2 * i + 1]);
        *reinterpret_cast<uint4*>(dst.ptr + dst.offset(b, h, t0 + s) + j) = raw;
    }
}

template <int CT>
__device__ __forceinline__ void unstage(const float* src, Stream<float> dst, int b, int h, int t0, int T) {
    constexpr int UNITS = CT * N / 4;
    for (int u = threadIdx.x; u < UNITS; u += THREADS) {
        const int s = u / (N / 4), j = (u % (N / 4)) * 4;
        if (t0 + s >= T) continue;
        const float* row = src + s * ROW + padded(j);
        *reinterpret_cast<float4*>(dst.ptr + dst.offset(b, h, t0 + s) + j) = make_float4(row[0], row[1], row[2], row[3]);
    }
}

// This thread's segment of a staged vector (one step), as SEG floats.
__device__ __forceinline__ void load_segment(const float* row, int q, float out[SEG]) {
    const float4* p = reinterpret_cast<const float4*>(row + q * PAD_SEG);
#pragma unroll
    for (int m = 0; m < SEG / 4; m++) {
        float4 x = p[m];
        out[4 * m] = x.x;
        out[4 * m + 1] = x.y;
        out[4 * m + 2] = x.z;
        out[4 * m + 3] = x.w;
    }
}

// Dot product of two SEG-vectors with four independent accumulators (shorter dependency chain).
__device__ __forceinline__ float dot(const float x[SEG], const float y[SEG]) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int e = 0; e < SEG; e++) acc[e % 4] = fmaf(x[e], y[e], acc[e % 4]);
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// The state lines of one (batch, head) in global memory: a [N, N] float32 matrix.
// Row-owned lines read a contiguous segment; column-owned lines read a strided one.
__device__ __forceinline__ void load_row(const float* m, int line, int q, float out[SEG]) {
    const float4* p = reinterpret_cast<const float4*>(m + line * N + q * SEG);
#pragma unroll
    for (int i = 0; i < SEG / 4; i++) {
        float4 x = p[i];
        out[4 * i] = x.x;
        out[4 * i + 1] = x.y;
        out[4 * i + 2] = x.z;
        out[4 * i + 3] = x.w;
    }
}
__device__ __forceinline__ void store_row(float* m, int line, int q, const float in[SEG]) {
    float4* p = reinterpret_cast<float4*>(m + line * N + q * SEG);
#pragma unroll
    for (int i = 0; i < SEG / 4; i++) p[i] = make_float4(in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]);
}
__device__ __forceinline__ void load_col(const float* m, int line, int q, float out[SEG]) {
#pragma unroll
    for (int e = 0; e < SEG; e++) out[e] = m[(q * SEG + e) * N + line];
}
__device__ __forceinline__ void store_col(float* m, int line, int q, const float in[SEG]) {
#pragma unroll
    for (int e = 0; e < SEG; e++) m[(q * SEG + e) * N + line] = in[e];
}

// Thread geometry shared by the passes: lines line0 .. line0+LINES-1, segment q.
struct Place {
    int h, b, line0, q, pl;  // pl: padded(line0), where line0's per-line values sit in a staged vector
    int64_t mat;             // offset of this (batch, head)'s N x N state
    __device__ Place(int H) {
        h = blockIdx.x;
        b = blockIdx.y;
        line0 = threadIdx.x / SPLIT * LINES;
        q = threadIdx.x % SPLIT;
        pl = padded(line0);
        mat = (int64_t(b) * H + h) * N * N;
    }
};

#define UNROLL_LINES _Pragma("unroll") for (int l = 0; l < LINES; l++)
#define UNROLL_SEG _Pragma("unroll") for (int e = 0; e < SEG; e++)

}  // namespace wkv
