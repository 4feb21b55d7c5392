// RWKV-4 WKV recurrence: bf16 inputs and output, float32 arithmetic, state in and out, any T.
//
// One thread per (batch b, channel c); consecutive threads take consecutive channels, so every load
// and store of a [B, T, C] tensor is coalesced. Each thread runs the recurrence for its channel:
//
//   State (A, Bs, P) stands for the sums (A e^P, Bs e^P), numerator and denominator of wkv.
//   For token t with k = k_t, v = v_t, log-decay w <= 0 and bonus u:
//     read out:  o  = max(P, u + k);   e1 = e^(P - o);       e2 = e^(u + k - o)
//                y_t = (e1 A + e2 v) / den,   den = e1 Bs + e2
//     take in:   o2 = max(P + w, k);   f1 = e^(P + w - o2);  f2 = e^(k - o2)
//                A <- f1 A + f2 v;   Bs <- f1 Bs + f2;   P <- o2
//   Every exponent is <= 0, so nothing overflows whatever k is. The final state is returned at the
//   scale ppT the caller chose (aa, bb) = (A, Bs) e^(P_T - ppT); ppT is the largest exponent, so the
//   factor is 1 up to rounding.
//
// Backward. The outputs do not depend on which scale P a state is kept at, so the gradient is taken
// with every P (and o, o2) held fixed. GA, GB are dL/dA, dL/dBs at the current scale; they start as
// (g_aa, g_bb) e^(P_T - ppT) and walk back through each token (state (A, Bs, P) before it, dy = dL/dy_t):
//     dv_t = f2 GA + dy e2 / den
//     dk_t = f2 (GA v + GB) + dy e2 (v - y_t) / den          du += dy e2 (v - y_t) / den
//     dw  += f1 (GA A + GB Bs)
//     GA <- f1 GA + dy e1 / den;   GB <- f1 GB - dy y_t e1 / den
// After token 0, (GA, GB) = dL/d(aa0, bb0). dw and du are per-(b, c) partial sums (the caller sums
// over b). The backward needs the states before every token: the forward saves the state before
// every chunk of kChunk tokens, and the backward recomputes one chunk at a time into registers.

#ifndef WKV_KERNELS_ONLY  // defined by `make cuda-check`: compile the kernels alone, fast
#include <torch/extension.h>

// c10's stream header, not ATen/cuda/CUDAContext.h: that one needs the cuSPARSE/cuBLAS headers,
// which a minimal CUDA toolkit does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <cuda_bf16.h>

#include <cstdint>

namespace wkv4 {

using bf16 = __nv_bfloat16;

// Tokens between checkpoints. The backward holds a chunk's states in registers (five floats per
// token), so this trades checkpoint memory (3 floats per (b, c) per chunk) against registers.
// rwkv_train/ops/wkv4_cuda.py allocates the checkpoint buffer with the same value.
constexpr int kChunk = 16;
// Small blocks spread the B * C threads over as many multiprocessors as possible: each thread is a
// long sequential chain, so occupancy comes from the number of threads, not from the block size.
constexpr int kThreads = 32;

// y_t and the weights it was formed with, read from the state before token t.
struct Readout {
  float e1, e2, inv_den, y;
};

__device__ __forceinline__ Readout read_out(float A, float Bs, float P, float u, float k, float v) {
  const float o = fmaxf(P, u + k);
  Readout r;
  r.e1 = __expf(P - o);
  r.e2 = __expf(u + k - o);
  r.inv_den = 1.0f / (r.e1 * Bs + r.e2);
  r.y = (r.e1 * A + r.e2 * v) * r.inv_den;
  return r;
}

// The weights of the state update: the state decays one step, then takes token t in.
struct TakeIn {
  float f1, f2, p;
};

__device__ __forceinline__ TakeIn take_in(float P, float w, float k) {
  const float o2 = fmaxf(P + w, k);
  return {__expf(P + w - o2), __expf(k - o2), o2};
}

// Offset of checkpoint slot s (0: A, 1: Bs, 2: P) of chunk j in the [B, n_chunks, 3, C] buffer.
__device__ __forceinline__ int64_t checkpoint_at(int b, int j, int s, int n_chunks, int C) {
  return ((static_cast<int64_t>(b) * n_chunks + j) * 3 + s) * C;
}

__global__ void wkv4_forward_kernel(int B, int T, int C, const float* __restrict__ w, const float* __restrict__ u,
                                    const bf16* __restrict__ k, const bf16* __restrict__ v,
                                    const float* __restrict__ aa0, const float* __restrict__ bb0,
                                    const float* __restrict__ pp0, const float* __restrict__ ppT,
                                    bf16* __restrict__ y, float* __restrict__ aa, float* __restrict__ bb,
                                    float* __restrict__ checkpoints) {
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // index into [B, C]
  if (bc >= static_cast<int64_t>(B) * C) return;
  const int b = static_cast<int>(bc / C), c = static_cast<int>(bc % C);
  const float wc = w[c], uc = u[c];
  const int64_t first = static_cast<int64_t>(b) * T * C + c;  // token 0 of this (b, c) in [B, T, C]
  const int n_chunks = (T + kChunk - 1) / kChunk;

  float A = aa0[bc], Bs = bb0[bc], P = pp0[bc];
  for (int j = 0; j < n_chunks; ++j) {
    checkpoints[checkpoint_at(b, j, 0, n_chunks, C) + c] = A;
    checkpoints[checkpoint_at(b, j, 1, n_chunks, C) + c] = Bs;
    checkpoints[checkpoint_at(b, j, 2, n_chunks, C) + c] = P;
    const int t0 = j * kChunk;
    // All of the chunk's loads first, so they are in flight together rather than one per step.
    float ks[kChunk], vs[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (t0 + i < T) {
        ks[i] = __bfloat162float(k[first + static_cast<int64_t>(t0 + i) * C]);
        vs[i] = __bfloat162float(v[first + static_cast<int64_t>(t0 + i) * C]);
      }
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (t0 + i < T) {
        const Readout r = read_out(A, Bs, P, uc, ks[i], vs[i]);
        y[first + static_cast<int64_t>(t0 + i) * C] = __float2bfloat16(r.y);
        const TakeIn d = take_in(P, wc, ks[i]);
        A = d.f1 * A + d.f2 * vs[i];
        Bs = d.f1 * Bs + d.f2;
        P = d.p;
      }
    }
  }
  const float to_final = __expf(P - ppT[bc]);
  aa[bc] = A * to_final;
  bb[bc] = Bs * to_final;
}

__global__ void wkv4_backward_kernel(int B, int T, int C, const float* __restrict__ w, const float* __restrict__ u,
                                     const bf16* __restrict__ k, const bf16* __restrict__ v,
                                     const float* __restrict__ checkpoints, const float* __restrict__ ppT,
                                     const bf16* __restrict__ gy, const float* __restrict__ g_aa,
                                     const float* __restrict__ g_bb, float* __restrict__ gw, float* __restrict__ gu,
                                     bf16* __restrict__ gk, bf16* __restrict__ gv, float* __restrict__ g_aa0,
                                     float* __restrict__ g_bb0) {
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // index into [B, C]
  if (bc >= static_cast<int64_t>(B) * C) return;
  const int b = static_cast<int>(bc / C), c = static_cast<int>(bc % C);
  const float wc = w[c], uc = u[c];
  const int64_t first = static_cast<int64_t>(b) * T * C + c;
  const int n_chunks = (T + kChunk - 1) / kChunk;

  float GA = 0.0f, GB = 0.0f, dw = 0.0f, du = 0.0f;
  for (int j = n_chunks - 1; j >= 0; --j) {
    const int t0 = j * kChunk;
    // Recompute the chunk from its checkpoint: the state before each token, and its inputs.
    float A = checkpoints[checkpoint_at(b, j, 0, n_chunks, C) + c];
    float Bs = checkpoints[checkpoint_at(b, j, 1, n_chunks, C) + c];
    float P = checkpoints[checkpoint_at(b, j, 2, n_chunks, C) + c];
    float As[kChunk], Bss[kChunk], Ps[kChunk], ks[kChunk], vs[kChunk], gys[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (t0 + i < T) {
        const int64_t at = first + static_cast<int64_t>(t0 + i) * C;
        ks[i] = __bfloat162float(k[at]);
        vs[i] = __bfloat162float(v[at]);
        gys[i] = __bfloat162float(gy[at]);
      }
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (t0 + i < T) {
        As[i] = A;
        Bss[i] = Bs;
        Ps[i] = P;
        const TakeIn d = take_in(P, wc, ks[i]);
        A = d.f1 * A + d.f2 * vs[i];
        Bs = d.f1 * Bs + d.f2;
        P = d.p;
      }
    }
    if (j == n_chunks - 1) {  // P is now P_T: the final outputs' gradient at the kernel's own scale
      const float from_final = __expf(P - ppT[bc]);
      GA = g_aa[bc] * from_final;
      GB = g_bb[bc] * from_final;
    }
    // Walk the chunk backwards; (GA, GB) goes from the state after token t to the state before it.
#pragma unroll
    for (int i = kChunk - 1; i >= 0; --i) {
      if (t0 + i < T) {
        const Readout r = read_out(As[i], Bss[i], Ps[i], uc, ks[i], vs[i]);
        const TakeIn d = take_in(Ps[i], wc, ks[i]);
        const float g = gys[i] * r.inv_den;  // dy / den
        const float g_bonus = g * r.e2 * (vs[i] - r.y);  // through e2 = e^(u + k - o)
        const int64_t at = first + static_cast<int64_t>(t0 + i) * C;
        gv[at] = __float2bfloat16(d.f2 * GA + g * r.e2);
        gk[at] = __float2bfloat16(d.f2 * (GA * vs[i] + GB) + g_bonus);
        du += g_bonus;
        dw += d.f1 * (GA * As[i] + GB * Bss[i]);
        GA = d.f1 * GA + g * r.e1;
        GB = d.f1 * GB - g * r.y * r.e1;
      }
    }
  }
  gw[bc] = dw;
  gu[bc] = du;
  g_aa0[bc] = GA;
  g_bb0[bc] = GB;
}

#ifndef WKV_KERNELS_ONLY
// ---- host side ------------------------------------------------------------------------------------

void check_tensor(const at::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  const at::Device& device) {
  TORCH_CHECK(x.device() == device, "wkv4 CUDA kernel: ", name, " is on ", x.device(), ", expected ", device,
              " like k; move every input to the same CUDA device");
  TORCH_CHECK(x.scalar_type() == dtype, "wkv4 CUDA kernel: ", name, " has dtype ", x.scalar_type(), ", expected ",
              dtype, "; the Python wrapper (rwkv_train.ops.wkv4_cuda) casts inputs, call it instead");
  TORCH_CHECK(x.sizes() == shape, "wkv4 CUDA kernel: ", name, " has shape ", x.sizes(), ", expected ", shape);
  TORCH_CHECK(x.is_contiguous(), "wkv4 CUDA kernel: ", name, " is not contiguous; pass x.contiguous()");
}

int n_chunks_for(int64_t T) { return static_cast<int>((T + kChunk - 1) / kChunk); }

int64_t check_sizes(const at::Tensor& k) {
  TORCH_CHECK(k.is_cuda(), "wkv4 CUDA kernel: k is on ", k.device(), "; use the torch backend for CPU tensors");
  TORCH_CHECK(k.dim() == 3, "wkv4 CUDA kernel: k must be [B, T, C], got shape ", k.sizes());
  TORCH_CHECK(k.size(1) >= 1, "wkv4 CUDA kernel: T must be >= 1, got k with shape ", k.sizes());
  TORCH_CHECK(k.size(0) * k.size(2) <= INT32_MAX && k.size(1) <= INT32_MAX,
              "wkv4 CUDA kernel: B * C and T must fit in 32 bits, got k with shape ", k.sizes());
  return k.size(0) * k.size(2);
}

void forward(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& aa0, const at::Tensor& bb0, const at::Tensor& pp0, const at::Tensor& ppT,
             at::Tensor& y, at::Tensor& aa, at::Tensor& bb, at::Tensor& checkpoints) {
  const int64_t BC = check_sizes(k);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const at::Device device = k.device();
  const auto f32 = at::kFloat, bf = at::kBFloat16;
  check_tensor(w, "w", f32, {C}, device);
  check_tensor(u, "u", f32, {C}, device);
  check_tensor(k, "k", bf, {B, T, C}, device);
  check_tensor(v, "v", bf, {B, T, C}, device);
  for (const auto& [x, name] : {std::pair{&aa0, "aa0"}, {&bb0, "bb0"}, {&pp0, "pp0"}, {&ppT, "ppT"}, {&aa, "aa"},
                                {&bb, "bb"}}) {
    check_tensor(*x, name, f32, {B, C}, device);
  }
  check_tensor(y, "y", bf, {B, T, C}, device);
  check_tensor(checkpoints, "checkpoints", f32, {B, n_chunks_for(T), 3, C}, device);
  if (BC == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const int blocks = static_cast<int>((BC + kThreads - 1) / kThreads);
  wkv4_forward_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), reinterpret_cast<const bf16*>(k.data_ptr<at::BFloat16>()),
      reinterpret_cast<const bf16*>(v.data_ptr<at::BFloat16>()), aa0.data_ptr<float>(), bb0.data_ptr<float>(),
      pp0.data_ptr<float>(), ppT.data_ptr<float>(), reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()),
      aa.data_ptr<float>(), bb.data_ptr<float>(), checkpoints.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& checkpoints, const at::Tensor& ppT, const at::Tensor& gy, const at::Tensor& g_aa,
              const at::Tensor& g_bb, at::Tensor& gw, at::Tensor& gu, at::Tensor& gk, at::Tensor& gv,
              at::Tensor& g_aa0, at::Tensor& g_bb0) {
  const int64_t BC = check_sizes(k);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const at::Device device = k.device();
  const auto f32 = at::kFloat, bf = at::kBFloat16;
  check_tensor(w, "w", f32, {C}, device);
  check_tensor(u, "u", f32, {C}, device);
  for (const auto& [x, name] : {std::pair{&k, "k"}, {&v, "v"}, {&gy, "gy"}, {&gk, "gk"}, {&gv, "gv"}}) {
    check_tensor(*x, name, bf, {B, T, C}, device);
  }
  check_tensor(checkpoints, "checkpoints", f32, {B, n_chunks_for(T), 3, C}, device);
  for (const auto& [x, name] : {std::pair{&ppT, "ppT"}, {&g_aa, "g_aa"}, {&g_bb, "g_bb"}, {&gw, "gw"},
                                {&gu, "gu"}, {&g_aa0, "g_aa0"}, {&g_bb0, "g_bb0"}}) {
    check_tensor(*x, name, f32, {B, C}, device);
  }
  if (BC == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const int blocks = static_cast<int>((BC + kThreads - 1) / kThreads);
  wkv4_backward_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), reinterpret_cast<const bf16*>(k.data_ptr<at::BFloat16>()),
      reinterpret_cast<const bf16*>(v.data_ptr<at::BFloat16>()), checkpoints.data_ptr<float>(),
      ppT.data_ptr<float>(), reinterpret_cast<const bf16*>(gy.data_ptr<at::BFloat16>()), g_aa.data_ptr<float>(),
      g_bb.data_ptr<float>(), gw.data_ptr<float>(), gu.data_ptr<float>(),
      reinterpret_cast<bf16*>(gk.data_ptr<at::BFloat16>()), reinterpret_cast<bf16*>(gv.data_ptr<at::BFloat16>()),
      g_aa0.data_ptr<float>(), g_bb0.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // WKV_KERNELS_ONLY
}  // namespace wkv4

#ifndef WKV_KERNELS_ONLY
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-4 WKV kernel: bf16 k, v, y; float32 state and arithmetic (see cuda/wkv4.cu)";
  m.def("forward", &wkv4::forward, "y, final (aa, bb) and the chunk checkpoints, written into the given outputs");
  m.def("backward", &wkv4::backward, "gradients of w, u (per batch row), k, v and the initial (aa, bb)");
}
#endif  // WKV_KERNELS_ONLY
