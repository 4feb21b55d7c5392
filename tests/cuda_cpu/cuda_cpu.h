// Runs CUDA kernel sources on the CPU, for tests on machines without a GPU.
//
// A kernel file compiled as C++ with this header forced in (g++ -include cuda_cpu.h -I<this folder>)
// runs each thread block with one std::thread per CUDA thread: __syncthreads() and __syncwarp() are
// barriers, dynamic shared memory is one buffer per block, blocks run one after another. A launch
// with thread block clusters (WKV_LAUNCH_CLUSTER) runs a cluster's blocks together, with a barrier
// over all of their threads and each block's shared memory reachable from the others
// (cooperative_groups::this_cluster(), in cooperative_groups.h beside this file). The
// tensor-core API the kernels use (nvcuda::wmma, bf16 operands, float accumulators) is computed
// exactly from the tiles it names, with the alignment and leading-dimension rules of the real one
// checked. What it cannot show: timing or register pressure; it shows the arithmetic, the indexing
// and the order of the barriers. A run can get a race right by luck of timing: built with
// -fsanitize=thread (tests/cuda_on_cpu.py's build_program) every access the barriers leave unordered
// is reported instead, and with -fsanitize=address every access outside shared memory's exact size.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define WKV_CPU_EMULATION 1

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3() = default;
    dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace cuda_cpu {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_cpu: %s\n", what);
    std::abort();
}

// A copy of a BYTES-byte vector type (named `what`) between to and from: as the hardware requires of
// one access of that width, both addresses must be BYTES-aligned.
template <int BYTES>
inline void check_vector_copy(const void* to, const void* from, const char* what) {
    if (reinterpret_cast<uintptr_t>(to) % BYTES == 0 && reinterpret_cast<uintptr_t>(from) % BYTES == 0) return;
    char message[160];
    std::snprintf(message, sizeof message, "a %d-byte access (%s) to an address that is not %d-byte aligned", BYTES,
                  what, BYTES);
    fail(message);
}

struct Cluster;

// Shared memory: exactly the bytes the launch asked for, 128-byte aligned as the hardware aligns it,
// so an address sanitizer reports an access past its end.
struct SharedFree {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(128)); }
};

struct Block {
    int threads = 0;
    Cluster* cluster = nullptr;  // the cluster it runs in, and its rank there
    unsigned rank = 0;
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::unique_ptr<unsigned char[], SharedFree> smem;
    unsigned char* smem_base = nullptr;  // smem.get()
    size_t smem_bytes = 0;
    std::vector<int> votes;
};

struct Cluster {
    std::unique_ptr<std::barrier<>> all;  // every thread of every block in the cluster
    std::vector<Block*> blocks;           // by rank
};

inline thread_local Block* block = nullptr;

}  // namespace cuda_cpu

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// CUDA's 16-byte vectors (uint4, float4): four T; copying one checks that both addresses are 16-byte
// aligned, as the hardware requires of a 16-byte access.
template <typename T>
struct alignas(16) Vector16 {
    T x, y, z, w;
    Vector16() = default;
    Vector16(const Vector16& o) { *this = o; }
    Vector16& operator=(const Vector16& o) {
        cuda_cpu::check_vector_copy<16>(this, &o, "uint4, float4");
        std::memcpy(static_cast<void*>(this), &o, sizeof(Vector16));
        return *this;
    }
};
using uint4 = Vector16<unsigned>;
using float4 = Vector16<float>;
inline float4 make_float4(float x, float y, float z, float w) {
    float4 v;
    v.x = x, v.y = y, v.z = z, v.w = w;
    return v;
}
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    uint4 v;
    v.x = x, v.y = y, v.z = z, v.w = w;
    return v;
}
// CUDA's 8-byte float2, whose copies check for 8-byte alignment likewise.
struct alignas(8) float2 {
    float x, y;
    float2() = default;
    float2(const float2& o) { *this = o; }
    float2& operator=(const float2& o) {
        cuda_cpu::check_vector_copy<8>(this, &o, "float2");
        x = o.x, y = o.y;
        return *this;
    }
};
inline float2 make_float2(float x, float y) {
    float2 v;
    v.x = x, v.y = y;
    return v;
}

inline void __syncthreads() { cuda_cpu::block->all->arrive_and_wait(); }

inline void __syncwarp(unsigned = 0xffffffffu) { cuda_cpu::block->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline int __syncthreads_or(int pred) {
    auto* blk = cuda_cpu::block;
    blk->votes[threadIdx.x] = pred != 0;
    __syncthreads();
    int any = 0;
    for (int v : blk->votes) any |= v;
    __syncthreads();
    return any;
}
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

// Dynamic shared memory of the running block (the kernels name it through WKV_DYNAMIC_SMEM).
#define WKV_DYNAMIC_SMEM(name) unsigned char* name = cuda_cpu::block->smem_base

namespace cuda_cpu {

// kernel<<<grid, block, smem, stream>>>(args...) becomes launch(grid, block, smem, kernel, args...); a
// launch whose blocks form clusters of `cluster` consecutive blocks along x (cudaLaunchKernelEx with
// a cluster dimension) becomes launch_cluster(grid, block, smem, cluster, kernel, args...).
template <typename Kernel, typename... Args>
void launch_cluster(dim3 grid, dim3 threads, size_t smem_bytes, unsigned cluster_size, Kernel kernel, Args... args) {
    if (threads.y != 1 || threads.z != 1 || threads.x % 32 != 0 || threads.x > 1024)
        fail("blocks must be one-dimensional whole warps of at most 1024 threads");
    if (smem_bytes > 227 * 1024) fail("more dynamic shared memory than a Hopper multiprocessor has (227 KB)");
    if (cluster_size < 1 || cluster_size > 8 || grid.x % cluster_size != 0)
        fail("a cluster is 1 to 8 blocks (the portable limit) and must divide the grid's x dimension");
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster_size) {
                Cluster cl;
                cl.all = std::make_unique<std::barrier<>>(threads.x * cluster_size);
                std::vector<Block> blocks(cluster_size);
                for (unsigned rank = 0; rank < cluster_size; rank++) {
                    Block& blk = blocks[rank];
                    blk.threads = int(threads.x);
                    blk.cluster = &cl, blk.rank = rank;
                    blk.all = std::make_unique<std::barrier<>>(threads.x);
                    for (unsigned w = 0; w < threads.x / 32; w++) blk.warps.push_back(std::make_unique<std::barrier<>>(32));
                    // Garbage, not zeros, so a kernel that reads shared memory it never wrote shows it.
                    void* bytes = ::operator new[](std::max<size_t>(smem_bytes, 1), std::align_val_t(128));
                    blk.smem.reset(static_cast<unsigned char*>(bytes));
                    blk.smem_base = blk.smem.get(), blk.smem_bytes = smem_bytes;
                    std::memset(blk.smem_base, 0xFF, smem_bytes);
                    blk.votes.assign(threads.x, 0);
                    cl.blocks.push_back(&blk);
                }
                std::vector<std::thread> pool;
                pool.reserve(threads.x * cluster_size);
                for (unsigned rank = 0; rank < cluster_size; rank++)
                    for (unsigned t = 0; t < threads.x; t++)
                        pool.emplace_back([&, rank, t] {
                            block = &blocks[rank];
                            threadIdx = dim3(t), blockIdx = dim3(bx0 + rank, by, bz), blockDim = threads, gridDim = grid;
                            kernel(args...);
                        });
                for (auto& th : pool) th.join();
            }
}

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 threads, size_t smem_bytes, Kernel kernel, Args... args) {
    launch_cluster(grid, threads, smem_bytes, 1, kernel, args...);  // every block is a cluster of its own
}

}  // namespace cuda_cpu

#define WKV_LAUNCH(kernel, grid, threads, smem, stream, ...) cuda_cpu::launch(grid, threads, smem, kernel, __VA_ARGS__)
#define WKV_LAUNCH_CLUSTER(kernel, grid, threads, smem, stream, cluster, ...) \
    cuda_cpu::launch_cluster(grid, threads, smem, cluster, kernel, __VA_ARGS__)

using std::max;
using std::min;
