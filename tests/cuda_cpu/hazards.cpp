// Small kernels with the hazards the sanitizers are there to find, each beside its correct form, so
// the tests can show that the emulation under a sanitizer reports the one and passes the other:
//
//   race       every thread writes its shared-memory slot, then reads a slot another warp wrote,
//              with no barrier between (on a GPU: a stale or a new value, by timing)
//   synced     the same with __syncthreads() between
//   overrun    thread 0 reads one float past the end of the block's dynamic shared memory
//   inside     thread 0 reads the last float of it
//
// Usage: hazards <case>; exits 0 when the kernel ran (the sanitizer exits otherwise), 2 on a bad case.
#include <cstring>

__global__ void neighbours(float* out, bool sync) {
    WKV_DYNAMIC_SMEM(smem);
    float* slot = reinterpret_cast<float*>(smem);
    slot[threadIdx.x] = float(threadIdx.x);
    if (sync) __syncthreads();
    out[threadIdx.x] = slot[(threadIdx.x + 32) % blockDim.x];  // written by the next warp
}

__global__ void last(float* out, int past) {
    WKV_DYNAMIC_SMEM(smem);
    float* slot = reinterpret_cast<float*>(smem);
    slot[threadIdx.x] = 1.f;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = slot[blockDim.x - 1 + past];
}

int main(int argc, char** argv) {
    constexpr unsigned threads = 64;
    float out[threads];
    const char* which = argc > 1 ? argv[1] : "";
    if (!std::strcmp(which, "race") || !std::strcmp(which, "synced"))
        WKV_LAUNCH(neighbours, dim3(1), dim3(threads), threads * sizeof(float), nullptr, out, !std::strcmp(which, "synced"));
    else if (!std::strcmp(which, "overrun") || !std::strcmp(which, "inside"))
        WKV_LAUNCH(last, dim3(1), dim3(threads), threads * sizeof(float), nullptr, out, !std::strcmp(which, "overrun"));
    else
        return 2;
    return 0;
}
