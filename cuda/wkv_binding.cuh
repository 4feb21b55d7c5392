// Host side shared by the torch bindings of the matrix-state kernels (wkv_diag.cu, wkv7.cu,
// wkv7_chunked.cu, wkv_diag_chunked.cu); left out when WKV_KERNELS_ONLY compiles the kernels alone.
#pragma once

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_bf16.h>

#include <cstdint>
#include <vector>

namespace wkv_binding {

// What would make a kernel read or write out of bounds: a buffer on the wrong device, of the wrong
// dtype, strided, or of the wrong size. `op` starts the message: "wkv7: r must be contiguous".
inline void check(const char* op, const torch::Tensor& x, const char* name, at::ScalarType dtype, int64_t numel) {
    TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " has dtype ", x.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(x.numel() == numel, op, ": ", name, " has ", x.numel(), " elements, expected ", numel);
}

// check, and that x starts 16-byte aligned: the chunked kernels move states 16 bytes at a time.
inline void check_aligned(const char* op, const torch::Tensor& x, const char* name, at::ScalarType dtype,
                          int64_t numel) {
    check(op, x, name, dtype, numel);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, op, ": ", name,
                " must start 16-byte aligned (a fresh tensor or .clone() is)");
}

// A head split over `split` blocks (a thread block cluster in the backward) needs a split the kernel
// was built for (`valid`) and compute capability 9.0 or later.
inline void check_split(const char* op, int64_t split, bool valid, int head_size, const torch::Tensor& on) {
    TORCH_CHECK(valid, op, ": split ", split, " is not one of 1, 2, 4 with ", head_size,
                " / split values a multiple of 16");
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, on.get_device()));
    TORCH_CHECK(split == 1 || major >= 9, op, ": split ", split,
                " needs thread block clusters (compute capability 9.0 or later); this device has ", major, ".x");
}

// The blocks a head may be split over, of 1, 2 and 4, that the kernel was built for (`valid`): what a
// chunked kernel's module lists as `splits`.
inline std::vector<int> splits(bool (*valid)(int)) {
    std::vector<int> allowed;
    for (int split : {1, 2, 4})
        if (valid(split)) allowed.push_back(split);
    return allowed;
}

// A bf16 tensor's data as CUDA's bf16 type.
inline const __nv_bfloat16* bf16_in(const torch::Tensor& x) {
    return reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
}
inline __nv_bfloat16* bf16_out(const torch::Tensor& x) { return reinterpret_cast<__nv_bfloat16*>(x.data_ptr()); }

}  // namespace wkv_binding
